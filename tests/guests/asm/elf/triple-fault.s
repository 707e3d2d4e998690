# Loads an empty interrupt table and executes ud2: #UD cannot be delivered (#GP), nor
# can #GP (#DF), nor #DF: the CPU shuts down. Ferrite reports a triple fault (status 4).
    .code64
    .globl _start
_start:
    lidt idt_desc(%rip)
    ud2
1:  hlt
    jmp 1b
idt_desc:
    .word 0
    .quad 0
