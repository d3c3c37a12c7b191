#!/bin/sh
# Assembles tests/guests/<name>.S into <out>/<name>.elf: a vmlinux-style
# ELF entered at 1 MiB through the VMM's 64-bit boot path. Used by the KVM
# guest tests and by `make bench`. Needs binutils.
set -eu
name=$1
out=$2
here=$(cd "$(dirname "$0")" && pwd)
as --64 -I "$here" -o "$out/$name.o" "$here/$name.S"
ld -static -nostdlib -Ttext=0x100000 -e _start --no-warn-rwx-segments \
   -z max-page-size=0x1000 -o "$out/$name.elf" "$out/$name.o"
echo "$out/$name.elf"
