#!/usr/bin/env bash
# Benchmark (not a test): pods through containerd's CRI, Arrow against runc in
# the same run against the same private containerd (hack/containerd.sh):
# pod start to the container's first output line, stop+remove, and host
# memory (PSS) per idle pod. Prints median/min/max side by side and the
# ratios arrow/runc; asserts nothing.
#
# Usage: hack/bench-cri.sh [--jail] [N] [M] [-- ARROW-CRI-BENCH OPTIONS...]
#   --jail  compare Arrow without its VMM jail (handler `arrow-unjailed`,
#           see hack/containerd.sh) against Arrow as it runs (`arrow`)
#           instead of runc against Arrow: what the jail costs a pod start
#   N  timed pod starts per runtime (default 5)
#   M  idle pods per runtime at once for the memory figures (default 3)
#   e.g. hack/bench-cri.sh 10 5 -- --settle 10
# Builds and installs the runtime binaries (hack/build.sh, hack/install.sh),
# the guest kernel (cached), starts the private containerd and imports the
# test images first. ARROW_BENCH_NO_BUILD=1 skips building and installing the
# runtime (benchmarks what /usr/local/bin holds).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
require_root
runs=5 idle=3 handlers=()
if [ "${1:-}" = --jail ]; then handlers=(--handlers arrow-unjailed,arrow); shift; fi
if [ $# -gt 0 ] && [ "$1" != -- ]; then runs=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" != -- ]; then idle=$1; shift; fi
[ "${1:-}" = -- ] && shift

bench_cri_setup
cd "$ARROW_ROOT"
log "building arrow-cri-bench"
cargo build --release --locked -p bench --bin arrow-cri-bench
target/release/arrow-cri-bench "$runs" "$idle" "${handlers[@]}" "$@"
