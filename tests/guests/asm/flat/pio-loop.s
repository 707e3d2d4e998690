# 100000 port writes to an unclaimed port (0x510), then debug-exit 0x10 (status 33).
# Every `out` is one KVM_EXIT_IO: the PIO exit benchmark and test.
    .code16
    .globl _start
_start:
    mov $0x510, %dx
    mov $100000, %ecx
1:  out %al, %dx
    dec %ecx
    jnz 1b
    mov $0x10, %al
    out %al, $0xf4
2:  hlt
    jmp 2b
