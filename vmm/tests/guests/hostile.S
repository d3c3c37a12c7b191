/* Misbehaves the way a hostile guest might: programs the virtio-mmio
 * device listed at 0x180000 with rings outside RAM, notifies it, pokes
 * unclaimed ports and MMIO, and reports what it saw. The VMM must carry
 * on and mark the device DEVICE_NEEDS_RESET. */
        .include "lib.S"
        .globl _start
_start:
        mov 0x180008, %rbx              /* the device's window */
        movl $1, 0x70(%rbx)             /* ACKNOWLEDGE */
        movl $3, 0x70(%rbx)             /* DRIVER */
        movl $1, 0x24(%rbx)
        movl $1, 0x20(%rbx)             /* VERSION_1 */
        movl $0xb, 0x70(%rbx)           /* FEATURES_OK */
        movl $0, 0x30(%rbx)
        movl $16, 0x38(%rbx)
        movl $0xfffff000, 0x80(%rbx)    /* rings at 0x7ffffffff000 */
        movl $0x7fff, 0x84(%rbx)
        movl $0xfffff000, 0x90(%rbx)
        movl $0x7fff, 0x94(%rbx)
        movl $0xfffff000, 0xa0(%rbx)
        movl $0x7fff, 0xa4(%rbx)
        movl $1, 0x44(%rbx)
        movl $0xf, 0x70(%rbx)           /* DRIVER_OK */
        movl $0, 0x50(%rbx)             /* notify */
        movl $0xdeadbeef, 0x30(%rbx)    /* select a queue that is not there */
        movl $7, 0x38(%rbx)
        movw $0xffff, 0x72(%rbx)        /* unaligned, narrow */
        movl $0x12345678, 0x4000(%rbx)  /* past the window */
        lea status(%rip), %rdi
        call puts
        movl 0x70(%rbx), %eax
        call hex
        call newline
        mov $0x1234, %dx                /* unclaimed port */
        mov $0x55, %al
        out %al, %dx
        mov $0x4321, %dx
        in %dx, %eax
        mov %rax, %r12
        lea port(%rip), %rdi
        call puts
        mov %r12, %rax
        call hex
        call newline
        mov $0xd00ff000, %rcx           /* unclaimed MMIO */
        movl (%rcx), %eax
        mov %rax, %r12
        lea mmio(%rip), %rdi
        call puts
        mov %r12, %rax
        call hex
        call newline
        call poweroff
status: .asciz "status "
port:   .asciz "port "
mmio:   .asciz "mmio "
