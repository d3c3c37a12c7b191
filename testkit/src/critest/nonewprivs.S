# The e2e nonewprivs image's program, as a stand-in: prints
# "Effective uid: <euid>" and exits. Installed setuid root, it shows
# whether no_new_privs kept the setuid bit from taking effect.
        .globl  _start
        .text
_start:
        mov     $107, %eax              # geteuid()
        syscall
        lea     end(%rip), %rdi         # the text is built backwards from end
        dec     %rdi
        movb    $10, (%rdi)             # "\n"
        mov     $10, %ecx
1:      xor     %edx, %edx
        div     %ecx                    # eax /= 10, edx = the digit
        add     $48, %dl
        dec     %rdi
        mov     %dl, (%rdi)
        test    %eax, %eax
        jnz     1b
        mov     $15, %ecx               # then the prefix before the digits
        sub     %rcx, %rdi
        mov     %rdi, %r8
        lea     prefix(%rip), %rsi
        rep movsb
        lea     end(%rip), %rdx         # write(1, r8, end - r8)
        sub     %r8, %rdx
        mov     %r8, %rsi
        mov     $1, %edi
        mov     $1, %eax
        syscall
        mov     $60, %eax               # exit(0)
        xor     %edi, %edi
        syscall

        .section .rodata
prefix: .ascii  "Effective uid: "

        .bss
buf:    .skip   64
end:
