/* Loads an empty IDT and traps: #BP, then #GP, then a double fault,
 * then a triple fault, which must end the VM as a failure. */
        .include "lib.S"
        .globl _start
_start:
        lea msg(%rip), %rdi
        call puts
        lidt idt(%rip)
        int3
14:     hlt
        jmp 14b
msg:    .asciz "faulting\n"
idt:    .word 0
        .quad 0
