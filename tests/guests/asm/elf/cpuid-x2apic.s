# Reports CPUID.1:ECX bit 21 (x2APIC) through the debug-exit port: with --debug-exit
# Ferrite exits 32 + bit. Shows whether --cpu-features reaches a bare image.
    .code64
    .globl _start
_start:
    mov $1, %eax
    xor %ecx, %ecx
    cpuid
    mov %ecx, %eax
    shr $21, %eax
    and $1, %eax
    out %al, $0xf4
1:  hlt
    jmp 1b
