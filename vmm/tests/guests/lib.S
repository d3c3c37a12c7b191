/* Helpers shared by the test guests: serial output on COM1, power-off
 * through the ACPI sleep register. 64-bit code; clobbers rax, rcx, rdx, rdi. */
        .code64
        .text
/* putc: %al to COM1 */
putc:
        mov $0x3f8, %dx
        out %al, %dx
        ret
/* puts: NUL-terminated string at %rdi */
puts:
        movb (%rdi), %al
        test %al, %al
        jz 1f
        call putc
        inc %rdi
        jmp puts
1:      ret
/* hex: %rax as 16 hex digits */
hex:
        push %rbx
        mov %rax, %rbx
        mov $16, %rcx
2:      rol $4, %rbx
        mov %bl, %al
        and $0xf, %al
        add $'0', %al
        cmp $'9', %al
        jbe 3f
        add $('a' - '9' - 1), %al
3:      push %rcx
        call putc
        pop %rcx
        loop 2b
        pop %rbx
        ret
space:
        mov $' ', %al
        jmp putc
newline:
        mov $'\n', %al
        jmp putc
poweroff:
        mov $0x600, %dx
        mov $0x34, %al
        out %al, %dx
4:      hlt
        jmp 4b
