#!/usr/bin/env bash
# Runs the fuzz targets one after another, each for the given number of seconds, from the
# seed corpus in fuzz/corpus/<target>; fails if any target crashes. See fuzz/README.md.
#
#   bash fuzz/run.sh <seconds-per-target> [target…]     (no target: all of them)
#
# Installs cargo-fuzz under target/tools when it is not on PATH. Environment:
#   FUZZ_SANITIZER   none (default, works on stable) or address (needs nightly flags:
#                    RUSTC_BOOTSTRAP=1 is set for it)
#   FUZZ_ARGS        extra libFuzzer flags, e.g. "-max_len=65536"
set -euo pipefail

if [ $# -lt 1 ] || ! [[ $1 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 <seconds-per-target> [target…]" >&2
  exit 2
fi
seconds=$1
shift
cd "$(dirname "$0")/.."

# cargo-fuzz, pinned: a fresh machine has none, so it comes from crates.io into the
# repo's own target/tools (about a minute and a half, once).
tools="$PWD/target/tools"
export PATH="$tools/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz into $tools"
  cargo install --quiet --locked --root "$tools" cargo-fuzz --version 0.13.2
fi

sanitizer=${FUZZ_SANITIZER:-none}
if [ "$sanitizer" != none ]; then
  # Sanitizers take -Z flags: accepted by the stable compiler only with this set.
  export RUSTC_BOOTSTRAP=1
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi

echo "== cargo fuzz build (sanitizer: $sanitizer)"
start=$(date +%s)
cargo fuzz build --sanitizer "$sanitizer"
echo "   built in $(($(date +%s) - start)) s"

# The fuzzer writes what it finds to the first corpus directory: a working copy under
# fuzz/target, so that fuzz/corpus keeps only the seeds that are committed.
summary=()
failed=()
for t in "${targets[@]}"; do
  work="fuzz/target/corpus/$t"
  log="fuzz/target/logs/$t.log"
  mkdir -p "$work" "fuzz/corpus/$t" "$(dirname "$log")"
  echo "== $t: ${seconds} s"
  # -timeout: one input running this long is a hang, reported as a crash.
  # shellcheck disable=SC2086
  if cargo fuzz run --sanitizer "$sanitizer" "$t" "$work" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 ${FUZZ_ARGS:-} \
    >"$log" 2>&1; then
    status=ok
  else
    status=CRASH
    failed+=("$t")
    tail -n 60 "$log"
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -n 1)
  corpus=$(find "$work" -type f | wc -l)
  line="$(printf '%-16s %-6s %10s execs  %-22s corpus %s' "$t" "$status" "${runs:-?}" "${cov:-cov: ?}" "$corpus")"
  echo "   $line"
  summary+=("$line")
done

echo "== fuzz summary (${seconds} s per target; logs in fuzz/target/logs)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
  exit 1
fi
