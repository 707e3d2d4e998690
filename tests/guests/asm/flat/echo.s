# Serial echo: prints "ready", then polls the UART's line status register and echoes
# every received byte until it reads 'q', then debug-exits with 1 (status 33 with --debug-exit).
    .code16
    .globl _start
_start:
    mov $msg, %si
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz wait
    out %al, %dx
    jmp 1b
wait:
    mov $0x3fd, %dx         # LSR
    in %dx, %al
    test $1, %al            # data ready?
    jz wait
    mov $0x3f8, %dx         # RBR
    in %dx, %al
    cmp $'q', %al
    je done
    out %al, %dx            # THR
    jmp wait
done:
    mov $1, %al
    out %al, $0xf4
2:  hlt
    jmp 2b
msg:
    .asciz "ready\n"
