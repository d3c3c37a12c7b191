#!/usr/bin/env bash
# Lists the system calls real podvisor-vmm runs make, per kind of thread,
# the way the seccomp filters see them: a vCPU, control or signal thread
# once Rust's thread start is done (its signal stack set), the main thread
# from its last thread spawn (the vCPUs) on, since each installs its
# filter there. ioctl request codes are listed with it, in hex. The VMM
# runs under strace with --no-seccomp, so a call the rules lack shows here
# instead of killing the run.
#
#   vmm/seccomp/syscalls.sh target/release/podvisor-vmm --config vm.json
#   vmm/seccomp/syscalls.sh --suite target/release/podvisor-vmm -- \
#       cargo test -p podvisor-testkit --test vmm_linux -- --test-threads=1
#
# --suite runs the command with PODVISOR_VMM (testkit's VMM) set to a
# traced podvisor-vmm and sums up every run. Compare with x86_64.json
# beside this script (README.md there).
set -euo pipefail
usage() { sed -n '2,17p' "$0"; exit 2; }
[ $# -ge 1 ] || usage
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mkdir "$out/runs"

# A podvisor-vmm that runs the real one under strace: -D keeps the VMM the
# process its parent started (a kill reaches it, not strace); -ff writes a
# file per thread; raw ioctl arguments give the request codes.
traced() {
  printf '#!/bin/sh\nd=%s/runs/$$; mkdir -p "$d"\nexec strace -D -ff -qq -X raw -e raw=ioctl -o "$d/t" %s --no-seccomp "$@"\n' \
    "$out" "$(realpath "$1")" > "$out/podvisor-vmm"
  chmod +x "$out/podvisor-vmm"
}

if [ "$1" = --suite ]; then
  [ $# -ge 4 ] && [ "$3" = -- ] || usage
  traced "$2"
  shift 3
  PODVISOR_VMM="$out/podvisor-vmm" "$@" || echo "(the command failed: $?)" >&2
else
  traced "$1"
  shift
  "$out/podvisor-vmm" "$@" || echo "(podvisor-vmm exited $?)" >&2
fi

for run in "$out"/runs/*; do
  main=${run##*/}
  for f in "$run"/t.*; do
    awk -v main="$([ "${f##*.}" = "$main" ] && echo 1 || echo 0)" '
      # The thread name, as Rust sets it (prctl(PR_SET_NAME) is 15).
      /^prctl\(0xf, / { if (match($0, /"[^"]*"/)) name = substr($0, RSTART + 1, RLENGTH - 2) }
      /^[a-z0-9_]+\(/ {
        call = substr($0, 1, index($0, "(") - 1)
        if (call == "ioctl") { split($0, a, /[(,]/); gsub(/ /, "", a[3]); call = "ioctl " a[3] }
        n++; calls[n] = call
        if (main && (call == "clone" || call == "clone3")) start = n
        if (!main && !start && /^sigaltstack\(\{ss_sp=0x/) start = n
      }
      END {
        kind = main ? "vmm" : name ~ /^vcpu/ ? "vcpu" : name == "control" ? "control" : name == "signals" ? "vmm" : "other:" name
        for (i = start + 1; i <= n; i++) print kind "\t" calls[i]
      }' "$f"
  done
done | sort -u | awk -F'\t' '
  $1 != kind { if (kind != "") print ""; kind = $1; printf "%s:", kind }
  { printf " %s", $2 }
  END { print "" }'
