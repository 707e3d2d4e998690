# Executes `lock cmpxchg16b`. Hardware KVM runs it and the guest debug-exits with 7
# (status 32 + 7 with --debug-exit); an emulation-backed KVM that cannot emulate it stops with
# KVM_EXIT_INTERNAL_ERROR, which Ferrite must report with the instruction bytes.
    .code64
    .globl _start
_start:
    xor %eax, %eax
    xor %edx, %edx
    xor %ebx, %ebx
    xor %ecx, %ecx
    lea buf(%rip), %rdi
    lock cmpxchg16b (%rdi)
    mov $7, %al
    out %al, $0xf4
1:  hlt
    jmp 1b
    .p2align 4
buf:
    .quad 0, 0
