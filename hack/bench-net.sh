#!/usr/bin/env bash
# Benchmark (not a test): pod <-> host networking through containerd's CRI
# and the CNI bridge, Arrow against runc in the same run: TCP round trip,
# connect latency, HTTP GET latency (busybox httpd) and throughput in both
# directions over the pod IP, port-forward (first byte, throughput) and
# exec round trip (SPDY). Prints median/min/max side by side and the
# ratios arrow/runc; asserts nothing.
#
# Usage: hack/bench-net.sh [N] [-- ARROW-NET-BENCH OPTIONS...]
#   N  transfers per direction per runtime (default 3)
#   e.g. hack/bench-net.sh 5 -- --mib 32 --pings 500
# Builds and installs the runtime binaries (hack/build.sh, hack/install.sh),
# the guest kernel (cached), starts the private containerd and imports the
# test images first. ARROW_BENCH_NO_BUILD=1 skips building and installing the
# runtime (benchmarks what /usr/local/bin holds).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
require_root
runs=3
if [ $# -gt 0 ] && [ "$1" != -- ]; then runs=$1; shift; fi
[ "${1:-}" = -- ] && shift

bench_cri_setup
cd "$ARROW_ROOT"
target=x86_64-unknown-linux-gnu
target_dir=${CARGO_TARGET_DIR:-$ARROW_ROOT/target}
# The pod side runs in a busybox image: static, as hack/images.sh builds
# arrow-pause.
log "building arrow-net-server (static) and arrow-net-bench"
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
  cargo build --release --locked -q -p bench --bin arrow-net-server --target $target
cargo build --release --locked -q -p bench --bin arrow-net-bench
"$target_dir/release/arrow-net-bench" "$runs" --server "$target_dir/$target/release/arrow-net-server" "$@"
