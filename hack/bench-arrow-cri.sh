#!/usr/bin/env bash
# Benchmark (not a test): pod start (RunPodSandbox + CreateContainer +
# StartContainer to the first log line) and stop+remove, median of N, side
# by side: arrow-cri (no containerd in its path), containerd's CRI with
# handler `arrow`, and containerd with `runc`; memory per idle pod; and
# arrow-cri's own RSS idle and with P pods running. Asserts nothing.
#
# Usage: hack/bench-arrow-cri.sh [N] [M] [P]
#   N  timed pod starts per runtime (default 5)
#   M  idle pods per runtime at once for the memory figures (default 3)
#   P  pods running while arrow-cri's RSS is read (default 20)
# Builds and installs as hack/bench-cri.sh does (ARROW_BENCH_NO_BUILD=1
# skips it); arrow-cri is the one hack/build.sh put in target/arrow.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
require_root
runs=${1:-5} idle=${2:-3} pods=${3:-20}

bench_cri_setup
cd "$ARROW_ROOT"
log "building arrow-cri-bench"
cargo build --release --locked -p bench --bin arrow-cri-bench
target/release/arrow-cri-bench "$runs" "$idle" --arrow-cri --daemon-pods "$pods" \
  --handlers arrow,runc
