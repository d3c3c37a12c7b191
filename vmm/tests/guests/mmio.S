/* Reads magic, version and device id of each virtio-mmio window listed
 * at 0x180000 (count, then addresses; the test fills it in from the
 * DSDT), prints them, then resets through the i8042. */
        .include "lib.S"
        .globl _start
_start:
        mov $0x180000, %r15
        mov (%r15), %r14
        add $8, %r15
7:      test %r14, %r14
        jz 8f
        mov (%r15), %r13
        mov %r13, %rax
        call hex
        call space
        movl (%r13), %eax
        call hex
        call space
        movl 4(%r13), %eax
        call hex
        call space
        movl 8(%r13), %eax
        call hex
        call newline
        add $8, %r15
        dec %r14
        jmp 7b
8:      lea bye(%rip), %rdi
        call puts
        mov $0xfe, %al                  /* i8042: pulse reset */
        out %al, $0x64
9:      hlt
        jmp 9b
bye:    .asciz "resetting\n"
