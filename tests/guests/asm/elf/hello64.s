# 64-bit ELF hello: Ferrite enters at _start in long mode (first GiB identity-mapped).
# Prints a line, then asks the i8042 controller for a CPU reset (Ferrite exits 0).
    .code64
    .globl _start
_start:
    lea msg(%rip), %rsi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $0xfe, %al
    out %al, $0x64
3:  hlt
    jmp 3b
msg:
    .asciz "Hello from long mode\n"
