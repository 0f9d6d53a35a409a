#!/usr/bin/env bash
# Benchmarks (not tests): VMM overhead with the bare-metal test guest, Linux
# boot to arrow-init ready, template clones (start and memory), and the
# VMM's jail (serve jailed vs --no-confine).
# Usage: hack/bench.sh [VMM_RUNS] [LINUX_RUNS] [CLONE_RUNS] [CLONES_AT_ONCE] [JAIL_RUNS]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
require_root
"$ARROW_ROOT/hack/deps.sh"
ARROW_KERNEL=$("$ARROW_ROOT/hack/build-kernel.sh" | tail -n 1)
"$ARROW_ROOT/hack/build.sh"
ARROW_ROOTFS=$("$ARROW_ROOT/hack/mkrootfs-busybox.sh")
export ARROW_KERNEL ARROW_ROOTFS
cd "$ARROW_ROOT"
cargo build --release --locked -p integration --bin arrow-bench
target/release/arrow-bench vmm "${1:-30}"
echo
target/release/arrow-bench linux "${2:-3}"
echo
target/release/arrow-bench clones "${3:-20}" "${4:-20}"
echo
target/release/arrow-bench jail "${5:-20}"
