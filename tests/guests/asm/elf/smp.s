# Two-vCPU guest. Ferrite starts every vCPU of a non-Linux image at the entry point,
# with rdi = vCPU index and rsp = a private stack. Each vCPU prints "vCPU <n> up"
# under a spinlock; the last one to finish debug-exits with the count (2 -> status 34 with --debug-exit).
    .code64
    .globl _start
_start:
    mov %rdi, %rbx
1:  mov $1, %eax
    xchg %eax, lock(%rip)
    test %eax, %eax
    jz 2f
    pause
    jmp 1b
2:  lea msg(%rip), %rsi
    mov $0x3f8, %dx
3:  lodsb
    test %al, %al
    jz 4f
    out %al, %dx
    jmp 3b
4:  mov %bl, %al
    add $'0', %al
    out %al, %dx
    lea up(%rip), %rsi
5:  lodsb
    test %al, %al
    jz 6f
    out %al, %dx
    jmp 5b
6:  movl $0, lock(%rip)
    mov $1, %eax
    lock xadd %eax, count(%rip)
    inc %eax
    cmp $2, %eax
    jne 7f
    out %al, $0xf4
7:  hlt
    jmp 7b
msg:
    .asciz "vCPU "
up:
    .asciz " up\n"
    .p2align 2
lock:
    .long 0
count:
    .long 0
