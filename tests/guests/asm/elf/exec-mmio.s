# Jumps to 0x30000000: identity-mapped but not RAM in a small guest, so KVM cannot
# fetch the instruction and stops with KVM_EXIT_INTERNAL_ERROR on any host.
    .code64
    .globl _start
_start:
    mov $0x30000000, %rax
    jmp *%rax
