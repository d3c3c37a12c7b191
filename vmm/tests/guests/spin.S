/* Halts forever with interrupts off: only the VMM can end it. */
        .include "lib.S"
        .globl _start
_start:
        lea msg(%rip), %rdi
        call puts
        cli
13:     hlt
        jmp 13b
msg:    .asciz "spinning\n"
