#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/) with clang-14, ASan and UBSan into build-fuzz/ and runs
# each for FUZZ_SECONDS (default 60) on a copy of its seed corpus (fuzz/corpus/TARGET; the copy
# grows, the seeds stay). Prints the executions per target; exits 1 when a target crashes,
# leaks, times out or trips a sanitizer (the reproducer is in build-fuzz/fuzz-run/TARGET/).
#   FUZZ_TARGETS="fuzz_jwe" FUZZ_SECONDS=600 scripts/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
BUILD_DIR=${FUZZ_BUILD_DIR:-build-fuzz}
TARGETS=${FUZZ_TARGETS:-fuzz_jws fuzz_jwe fuzz_jwk fuzz_policy fuzz_custody_uri}

CC=clang-14 CXX=clang++-14 cmake -S . -B "$BUILD_DIR" -G Ninja -DCUSTODY_FUZZ=ON \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
# Only the fuzz targets (and the three libraries they link) are built here.
# shellcheck disable=SC2086
cmake --build "$BUILD_DIR" -j "$(nproc)" --target $TARGETS

RUN_DIR=$ROOT/$BUILD_DIR/fuzz-run
rm -rf "$RUN_DIR"
failed=0
summary=""
for target in $TARGETS; do
  dir=$RUN_DIR/$target
  mkdir -p "$dir/corpus"
  cp "$ROOT/fuzz/corpus/$target/"* "$dir/corpus/"
  echo "== $target: ${FUZZ_SECONDS}s"
  if (cd "$dir" && "$ROOT/$BUILD_DIR/bin/$target" -max_total_time="$FUZZ_SECONDS" \
      -timeout=25 -print_final_stats=1 -artifact_prefix="$dir/" corpus) >"$dir/log" 2>&1; then
    result=ok
  else
    result=FAILED
    failed=1
    tail -n 40 "$dir/log"
    ls "$dir"/crash-* "$dir"/leak-* "$dir"/timeout-* "$dir"/oom-* 2>/dev/null || true
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log" | tail -n 1)
  per_sec=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$dir/log" | tail -n 1)
  cov=$(grep -o 'cov: [0-9]*' "$dir/log" | tail -n 1 || true)
  corpus=$(find "$dir/corpus" -type f | wc -l)
  summary+=$(printf '%-12s %-6s executions=%-10s exec/s=%-7s %-10s corpus=%s' "$target" \
    "$result" "${execs:-?}" "${per_sec:-?}" "${cov:-cov: ?}" "$corpus")$'\n'
done
echo
printf '%s' "$summary"
exit $failed
