#!/usr/bin/env bash
# hack/fuzz.sh [SECONDS] [TARGET...]: the fuzz targets in fuzz/ (cargo-fuzz,
# libFuzzer, nightly toolchain; the product stays on stable).
# hack/fuzz.sh build: only builds them (hack/test.sh does it beside the
# end-to-end tests).
#
# For each target (all by default, in fuzz/Cargo.toml order): replays its
# seeds (fuzz/seeds/<target>/, in the repo) and its corpus (kept outside the
# repo, $ARROW_CACHE/fuzz/corpus/<target>/), then fuzzes it for SECONDS
# (default 60; 0 only replays), one target at a time. Prints per target the
# executions, executions per second, coverage (libFuzzer's final cov/ft),
# corpus size and crashes, then the targets' own counters; a crash's (or
# hang's) input is kept in $ARROW_CACHE/fuzz/artifacts/<target>/, named on
# stderr, and makes the script exit non-zero.
#
# The nightly build has its own target dir under the cache
# ($ARROW_CACHE/fuzz/target), so a warm machine (CI included: hack/test.sh
# runs this briefly) rebuilds only what changed; fuzz/Cargo.lock is
# committed and must be current (--locked).
#
# Targets are built without a sanitizer (the code under test is safe Rust
# but for a few audited unsafe blocks; doubling the executions per second
# matters more on small machines) and with debug assertions and overflow
# checks. ARROW_FUZZ_SANITIZER=address builds with ASan instead.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

seconds=${1:-60}
shift || true
build_only=0
[ "$seconds" = build ] && build_only=1 && seconds=0
case "$seconds" in
  '' | *[!0-9]*) echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2 ;;
esac

fuzz_dir="$ARROW_ROOT/fuzz"
work="$ARROW_CACHE/fuzz"
target_dir=${ARROW_FUZZ_TARGET_DIR:-$work/target}
sanitizer=${ARROW_FUZZ_SANITIZER:-none}

if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing the nightly toolchain (for cargo-fuzz only)"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz for the nightly toolchain"
  cargo +nightly install cargo-fuzz --locked
fi

mapfile -t all < <(sed -n 's/^name = "\(.*\)"$/\1/p' "$fuzz_dir/Cargo.toml" | grep -v '^arrow-fuzz$')
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all[@]}")
for t in "${targets[@]}"; do
  printf '%s\n' "${all[@]}" | grep -qx "$t" || { echo "$0: no fuzz target $t" >&2; exit 2; }
done

log "building the fuzz targets (sanitizer: $sanitizer, in $target_dir)"
# cargo fuzz has no --locked; fetching with it first fails if the lock file
# would change, and the build then uses the lock file as it is.
cargo +nightly fetch --locked --manifest-path "$fuzz_dir/Cargo.toml"
(cd "$fuzz_dir" && cargo +nightly fuzz build -s "$sanitizer" --target-dir "$target_dir")
bin_dir="$target_dir/x86_64-unknown-linux-gnu/release"
[ "$build_only" = 1 ] && exit 0

mkdir -p "$work"
summary=()
stats=()
failed=()
start=$(date +%s)
for t in "${targets[@]}"; do
  corpus="$work/corpus/$t"
  artifacts="$work/artifacts/$t"
  seeds="$fuzz_dir/seeds/$t"
  mkdir -p "$corpus" "$artifacts" "$seeds"
  out="$work/$t.log"
  if [ "$seconds" -eq 0 ]; then
    limit=(-runs=0)
  else
    limit=(-max_total_time="$seconds")
  fi
  log "fuzzing $t for ${seconds}s"
  rc=0
  # New inputs go to the first directory (the cache); the seeds are only read.
  "$bin_dir/$t" "$corpus" "$seeds" "${limit[@]}" \
    -artifact_prefix="$artifacts/" -print_final_stats=1 \
    -timeout=10 -rss_limit_mb=1536 -max_len=16384 >"$out" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out" | tail -n 1)
  cov=$(grep -ao 'cov: [0-9]*' "$out" | tail -n 1 | cut -d' ' -f2)
  ft=$(grep -ao 'ft: [0-9]*' "$out" | tail -n 1 | cut -d' ' -f2)
  corp=$(grep -ao 'corp: [0-9]*' "$out" | tail -n 1 | cut -d' ' -f2)
  crash="none"
  if [ "$rc" -ne 0 ]; then
    crash=$(grep -ao "$artifacts/[^ ]*" "$out" | tail -n 1)
    crash=${crash:-"exit $rc, see $out"}
    failed+=("$t")
    echo "$0: $t failed: $crash" >&2
    grep -a -m 1 -A 1 -E 'panicked at|^==[0-9]+== ERROR' "$out" >&2 || true
    echo "  log: $out; reproduce: $bin_dir/$t <artifact>" >&2
  fi
  mapfile -t -O "${#stats[@]}" stats < <(sed -n 's/^arrow-fuzz stat //p' "$out")
  summary+=("$(printf '%-16s %12s %9s %7s %8s %7s  %s' "$t" "${execs:-?}" "${rate:-?}" \
    "${cov:-?}" "${ft:-?}" "${corp:-?}" "$crash")")
done

printf '%-16s %12s %9s %7s %8s %7s  %s\n' target execs exec/s cov ft corpus crash
printf '%s\n' "${summary[@]}"
if [ ${#stats[@]} -gt 0 ]; then
  printf '  %s\n' "${stats[@]}"
fi
log "${#targets[@]} target(s) in $(( $(date +%s) - start )) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "$0: crashes in ${failed[*]} (logs in $work/<target>.log)" >&2
  exit 1
fi
