# Real-mode serial hello. Loaded at 0x10000, entered at CS=0x1000, IP=0 with
# DS=0x1000. Prints a line to COM1 and halts; with one vCPU Ferrite then exits 0.
    .code16
    .globl _start
_start:
    mov $msg, %si
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  hlt
    jmp 2b
msg:
    .asciz "Hello from real mode\n"
