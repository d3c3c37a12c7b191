/* Reached through the VMM's 64-bit boot path: prints EFER, the zero
 * page's E820 map and command line, then powers off. */
        .include "lib.S"
        .globl _start
_start:
        mov %rsi, %r15                  /* zero page */
        lea hello(%rip), %rdi
        call puts
        mov $0xc0000080, %ecx           /* EFER */
        rdmsr
        shl $32, %rdx
        or %rdx, %rax
        call hex
        call newline
        lea e820(%rip), %rdi
        call puts
        movzbq 0x1e8(%r15), %r14        /* e820_entries */
        mov %r14, %rax
        call hex
        call newline
        lea 0x2d0(%r15), %r13           /* e820_table */
5:      test %r14, %r14
        jz 6f
        mov (%r13), %rax
        call hex
        call space
        mov 8(%r13), %rax
        call hex
        call space
        movl 16(%r13), %eax
        call hex
        call newline
        add $20, %r13
        dec %r14
        jmp 5b
6:      lea cmd(%rip), %rdi
        call puts
        movl 0x228(%r15), %edi          /* hdr.cmd_line_ptr */
        call puts
        call newline
        lea rsdp(%rip), %rdi
        call puts
        mov 0x70(%r15), %rax            /* acpi_rsdp_addr */
        call hex
        call newline
        call poweroff
hello:  .asciz "long mode, EFER "
e820:   .asciz "e820 entries "
cmd:    .asciz "cmdline "
rsdp:   .asciz "rsdp "
