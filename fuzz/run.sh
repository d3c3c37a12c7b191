#!/usr/bin/env bash
# Runs each fuzz target (cargo-fuzz, libFuzzer) for SECONDS and prints,
# per target, the executions and crashes; fails on any crash, naming the
# input that caused it (fuzz/artifacts/<target>/). Each corpus grows in
# the cache outside the checkout ($CORPUS_ROOT/<target>), from the seeds
# committed in fuzz/seeds/<target>/.
#
#   fuzz/run.sh SECONDS [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
corpus_root=${CORPUS_ROOT:-/var/cache/podvisor/fuzz-corpus}
# Optimised, with debug assertions and overflow checks (arithmetic on
# guest data that overflows is a finding); built where FUZZ_TARGET_DIR
# says, kept across runs.
flags=(-O -a ${FUZZ_TARGET_DIR:+--target-dir "$FUZZ_TARGET_DIR"})
cargo +nightly fuzz build "${flags[@]}"
failed=0
report=()
for t in "${targets[@]}"; do
  corpus="$corpus_root/$t"
  mkdir -p "$corpus" "artifacts/$t"
  log=$(mktemp)
  rc=0
  cargo +nightly fuzz run "${flags[@]}" "$t" "$corpus" "seeds/$t" -- \
    -max_total_time="$seconds" -artifact_prefix="artifacts/$t/" -print_final_stats=1 \
    >"$log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
  if [ "$rc" -ne 0 ]; then
    failed=1
    tail -n 40 "$log" >&2
    report+=("$(printf '%-22s %12s executions  CRASH: %s (rc %s)' "$t" "${runs:-?}" "${crash:-see above}" "$rc")")
  else
    report+=("$(printf '%-22s %12s executions  0 crashes  (%s s, corpus %s inputs)' "$t" "${runs:-?}" "$seconds" "$(ls "$corpus" | wc -l)")")
  fi
  rm -f "$log"
done
printf '%s\n' "fuzz target            executions"
printf '%s\n' "${report[@]}"
exit "$failed"
