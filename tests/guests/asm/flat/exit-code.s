# Writes 0x2a to the debug-exit port: with --debug-exit Ferrite exits with 32 + 0x2a = 74.
    .code16
    .globl _start
_start:
    mov $0x2a, %al
    out %al, $0xf4
1:  hlt
    jmp 1b
