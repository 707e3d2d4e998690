# Two vCPUs: vCPU 1 raises a flag in memory, then spins forever without ever leaving
# the guest; vCPU 0 waits for the flag, prints, and debug-exits with 9 (status 32 + 9 with --debug-exit).
# Ferrite can only end the VM if its kick forces vCPU 1 out of KVM_RUN.
    .code64
    .globl _start
_start:
    test %rdi, %rdi
    jnz spin
0:  pause
    cmpl $0, flag(%rip)
    je 0b
    lea msg(%rip), %rsi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $9, %al
    out %al, $0xf4
3:  hlt
    jmp 3b
spin:
    movl $1, flag(%rip)
4:  jmp 4b
msg:
    .asciz "vCPU 0 stopping the VM\n"
    .p2align 2
flag:
    .long 0
