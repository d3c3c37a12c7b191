/* A minimal virtio-vsock driver: it answers one host connection (CONNECT
 * on the host's hybrid-vsock socket), echoes the first data packet back,
 * reports the interrupt status bits the device raised, and powers off.
 * It polls the used rings: a nested KVM that emulates guest code cannot
 * be trusted to deliver interrupts, so the test checks the device's
 * INTERRUPT_STATUS instead (the irqfd is written alongside).
 *
 * The test writes the device's MMIO base at 0x180000 (none: the first
 * virtio-mmio slot, where a config's only device is). Rings (16
 * entries): RX at 0x200000/0x201000/0x202000, TX at
 * 0x210000/0x211000/0x212000; buffers at 0x300000 (RX) and 0x310000 (TX);
 * the interrupt status bits seen are ORed at 0x160000. */
        .include "lib.S"
        .set RXD, 0x200000
        .set RXA, 0x201000
        .set RXU, 0x202000
        .set TXD, 0x210000
        .set TXA, 0x211000
        .set TXU, 0x212000
        .set RXBUF, 0x300000
        .set TXBUF, 0x310000
        .set IRQS, 0x160000
        .globl _start
_start:
        mov 0x180000, %rbx              /* device */
        test %rbx, %rbx
        jnz 1f
        mov $0xd0000000, %rbx           /* VIRTIO_MMIO_BASE */
1:
        /* virtio: reset, ACKNOWLEDGE|DRIVER, VERSION_1, FEATURES_OK */
        movl $0, 0x70(%rbx)
        movl $1, 0x70(%rbx)
        movl $3, 0x70(%rbx)
        movl $1, 0x24(%rbx)
        movl $1, 0x20(%rbx)
        movl $0, 0x24(%rbx)
        movl $0, 0x20(%rbx)
        movl $0xb, 0x70(%rbx)
        /* queue 0: RX */
        movl $0, 0x30(%rbx)
        movl $16, 0x38(%rbx)
        movl $RXD, 0x80(%rbx)
        movl $0, 0x84(%rbx)
        movl $RXA, 0x90(%rbx)
        movl $0, 0x94(%rbx)
        movl $RXU, 0xa0(%rbx)
        movl $0, 0xa4(%rbx)
        movl $1, 0x44(%rbx)
        /* queue 1: TX */
        movl $1, 0x30(%rbx)
        movl $16, 0x38(%rbx)
        movl $TXD, 0x80(%rbx)
        movl $0, 0x84(%rbx)
        movl $TXA, 0x90(%rbx)
        movl $0, 0x94(%rbx)
        movl $TXU, 0xa0(%rbx)
        movl $0, 0xa4(%rbx)
        movl $1, 0x44(%rbx)
        movl $0xf, 0x70(%rbx)           /* DRIVER_OK */

        call post_rx
        lea ready(%rip), %rdi
        call puts

        /* 1: the host's REQUEST */
        mov $1, %r14
        call wait_rx
        cmpw $1, RXBUF + 30             /* op REQUEST */
        jne fail
        lea request(%rip), %rdi
        call puts
        movl RXBUF + 20, %eax           /* dst_port */
        call hex
        call newline
        movl RXBUF + 16, %r15d          /* the host's port */
        movl RXBUF + 20, %r14d          /* ours */
        mov $2, %ax                     /* RESPONSE */
        xor %ecx, %ecx
        call send
        call post_rx

        /* 2: data from the host, echoed back */
        push %r14
        mov $2, %r14
        call wait_rx
        pop %r14
        cmpw $5, RXBUF + 30             /* op RW */
        jne fail
        lea got(%rip), %rdi
        call puts
        movl RXBUF + 24, %ecx           /* len */
        mov %ecx, %r13d
        lea RXBUF + 44, %rsi
        mov $TXBUF + 44, %rdi
        push %rcx
        rep movsb
        pop %rcx
        mov $RXBUF + 44, %rsi
1:      lodsb
        push %rcx
        call putc
        pop %rcx
        loop 1b
        call newline
        mov $5, %ax                     /* RW */
        mov %r13d, %ecx
        call send

        /* wait until the device took both TX packets */
        lea irqs(%rip), %rdi
        call puts
        mov IRQS, %rax
        call hex
        call newline
        call poweroff

fail:   lea failed(%rip), %rdi
        call puts
        movzwq RXBUF + 30, %rax
        call hex
        call newline
        call poweroff

/* post_rx: offer the 4 KiB RX buffer (descriptor 0) and kick queue 0 */
post_rx:
        movq $RXBUF, RXD
        movl $4096, RXD + 8
        movw $2, RXD + 12               /* WRITE */
        movw $0, RXD + 14
        movzwl RXA + 2, %eax
        mov %eax, %edx
        and $15, %edx
        movw $0, RXA + 4(,%rdx,2)
        inc %eax
        movw %ax, RXA + 2
        movl $0, 0x50(%rbx)
        ret

/* wait_rx: sleep until the RX used index reaches %r14 */
wait_rx:
        call see_irq
        movzwq RXU + 2, %rax
        cmp %r14, %rax
        jae 4f
        pause
        jmp wait_rx
4:      call see_irq
        ret

/* see_irq: OR the device's INTERRUPT_STATUS into IRQS and acknowledge it */
see_irq:
        movl 0x60(%rbx), %eax
        or %rax, IRQS
        movl %eax, 0x64(%rbx)
        ret

/* send: op %ax, payload length %ecx (already at TXBUF + 44), from our
 * port %r14d to the host's %r15d; descriptor = TX avail index */
send:
        movq $3, TXBUF                  /* src_cid: the guest */
        movq $2, TXBUF + 8              /* dst_cid: the host */
        movl %r14d, TXBUF + 16
        movl %r15d, TXBUF + 20
        movl %ecx, TXBUF + 24
        movw $1, TXBUF + 28             /* STREAM */
        movw %ax, TXBUF + 30
        movl $0, TXBUF + 32
        movl $65536, TXBUF + 36         /* buf_alloc */
        movl %ecx, TXBUF + 40           /* fwd_cnt: what we have consumed */
        movzwl TXA + 2, %eax
        mov %eax, %edx
        and $15, %edx
        mov %rdx, %rdi
        shl $4, %rdi
        movq $TXBUF, TXD(%rdi)
        add $44, %ecx
        movl %ecx, TXD + 8(%rdi)
        movw $0, TXD + 12(%rdi)
        movw %dx, TXA + 4(,%rdx,2)
        inc %eax
        movw %ax, TXA + 2
        movl $1, 0x50(%rbx)
        /* the device copies the packet before it completes it: wait */
5:      movzwl TXU + 2, %ecx
        movzwl TXA + 2, %eax
        cmp %eax, %ecx
        jae 6f
        pause
        jmp 5b
6:      jmp see_irq

ready:  .asciz "ready\n"
request: .asciz "request for port "
got:    .asciz "got "
irqs:   .asciz "interrupt status seen "
failed: .asciz "unexpected op "
