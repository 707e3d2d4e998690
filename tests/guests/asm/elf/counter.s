# Progress counters: every vCPU increments its own 64-bit counter at
# 0x200000 + 8 * index forever, in guest code only (no exits, no UART reads).
# Tests read the counters from guest memory to see whether vCPUs make progress
# (pause, resume) and read RIP, which must lie inside this program.
    .code64
    .globl _start
_start:
    lea 0x200000(,%rdi,8), %rbx
    movq $0, (%rbx)
1:  incq (%rbx)
    jmp 1b
