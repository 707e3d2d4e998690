# Console flood: prints a 64-byte line to COM1 forever and never reads its UART.
# Used to check that an output nobody reads never blocks a vCPU or teardown.
    .code16
    .globl _start
_start:
    mov $0x3f8, %dx
0:  mov $msg, %si
1:  lodsb
    test %al, %al
    jz 0b
    out %al, %dx
    jmp 1b
msg:
    .asciz "flood flood flood flood flood flood flood flood flood flood ...\n"
