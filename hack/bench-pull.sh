#!/usr/bin/env bash
# Image pull benchmark (issue 15): pull + unpack of a ~50 MB, 4-layer image
# from Debian's docker-registry on loopback, arrow-cri (CRI PullImage) vs
# Debian's containerd (`ctr images pull --plain-http`, a private instance with
# its own root, state and socket: no lock on the shared test containerd is
# needed), median of 5 (ARROW_BENCH_RUNS), side by side; then the disk each
# store uses for two images sharing three of their four layers.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
require_root
cd "$ARROW_ROOT"
apt_ensure docker-registry containerd
cargo test --release --locked -p cri-server --test bench_pull -- --ignored --nocapture --test-threads 1 2>&1 \
  | grep -v -E '^(running|test |$)|Finished|Running|test result'
