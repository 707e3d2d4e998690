# Switches to flat 32-bit protected mode, then makes 100000 writes to 0xd0000000
# (inside the 32-bit MMIO hole, so never RAM), then debug-exit 0x11 (status 35).
# Every write is one KVM_EXIT_MMIO: the MMIO exit benchmark and test.
    .code16
    .globl _start
    .set LOAD, 0x10000
_start:
    cli
    lgdtl gdt_desc
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $(LOAD + pm)
    .code32
pm:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $100000, %ecx
1:  movl %ecx, 0xd0000000
    dec %ecx
    jnz 1b
    mov $0x11, %al
    out %al, $0xf4
2:  hlt
    jmp 2b
    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    # 0x08: 32-bit code, base 0, 4 GiB
    .quad 0x00cf92000000ffff    # 0x10: data, base 0, 4 GiB
gdt_desc:
    .word gdt_desc - gdt - 1
    .long LOAD + gdt
