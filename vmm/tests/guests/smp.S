/* The boot CPU wakes CPU 1 with INIT/SIPI; CPU 1 starts in real mode at
 * 0x10000, says so and sets a flag; the boot CPU waits for it, then
 * powers off. */
        .include "lib.S"
        .globl _start
_start:
        lea tramp(%rip), %rsi
        mov $0x10000, %rdi
        mov $(tramp_end - tramp), %rcx
        rep movsb
        mov $0xfee00000, %rbx           /* LAPIC */
        movl $0x1ff, 0xf0(%rbx)         /* software enable */
        movl $(1 << 24), 0x310(%rbx)    /* destination: APIC id 1 */
        movl $0x4500, 0x300(%rbx)       /* INIT */
        movl $(1 << 24), 0x310(%rbx)
        movl $0x4610, 0x300(%rbx)       /* SIPI, vector 0x10 -> 0x10000 */
        mov $2000000, %rcx
10:     cmpb $1, 0x11000
        je 11f
        pause
        loop 10b
        lea timeout(%rip), %rdi
        call puts
        call poweroff
11:     lea seen(%rip), %rdi
        call puts
        call poweroff
timeout: .asciz "CPU 1 never started\n"
seen:   .asciz "CPU 0 saw CPU 1\n"

        .code16
tramp:
        mov %cs, %ax
        mov %ax, %ds
        mov $0x3f8, %dx
        mov $'1', %al
        out %al, %dx
        mov $'\n', %al
        out %al, %dx
        movb $1, (0x1000)
12:     hlt
        jmp 12b
tramp_end:
