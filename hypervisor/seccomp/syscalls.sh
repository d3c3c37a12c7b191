#!/usr/bin/env bash
# Lists the system calls real vhost-device-vsock runs make, the way its
# seccomp filter sees them: every thread, from the exec on (the jail
# installs the filter just before it).
#
#   hypervisor/seccomp/syscalls.sh -- \
#       cargo test -p podvisor-testkit --test agent
#
# Runs the command with VHOST_DEVICE_VSOCK (testkit's vhost-device-vsock)
# set to one traced by strace and the jail off (PODVISOR_JAIL=off, which
# testkit honours: strace and its output are outside a jail's root), then
# sums up every run. Compare with vhost-device-vsock.json beside this
# script (README.md there).
set -euo pipefail
usage() { sed -n '2,13p' "$0"; exit 2; }
[ $# -ge 2 ] && [ "$1" = -- ] || usage
shift
real=$(command -v "${VHOST_DEVICE_VSOCK:-vhost-device-vsock}")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mkdir "$out/runs"
# -D keeps vhost-device-vsock the process its parent started (a kill
# reaches it, not strace); -ff writes a file per thread.
printf '#!/bin/sh\nd=%s/runs/$$; mkdir -p "$d"\nexec strace -D -ff -qq -o "$d/t" %s "$@"\n' \
  "$out" "$(realpath "$real")" > "$out/vhost-device-vsock"
chmod +x "$out/vhost-device-vsock"
VHOST_DEVICE_VSOCK="$out/vhost-device-vsock" PODVISOR_JAIL=off "$@" ||
  echo "(the command failed: $?)" >&2
runs=$(find "$out/runs" -mindepth 1 -maxdepth 1 | wc -l)
cat "$out"/runs/*/t.* 2>/dev/null |
  sed -n 's/^\([a-z0-9_]*\)(.*/\1/p' | sort -u | tr '\n' ' '
echo
echo "($runs runs)" >&2
