#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run): installs what it needs,
# builds the guest kernel (cached), the binaries and a busybox root tree,
# checks formatting and lints, then runs every unit, VMM and end-to-end test
# against real KVM.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
require_root
cd "$ARROW_ROOT"
start=$(date +%s)

"$ARROW_ROOT/hack/deps.sh"
ARROW_KERNEL=$("$ARROW_ROOT/hack/build-kernel.sh" | tail -n 1)
"$ARROW_ROOT/hack/build.sh"
ARROW_ROOTFS=$("$ARROW_ROOT/hack/mkrootfs-busybox.sh")
export ARROW_KERNEL ARROW_ROOTFS

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --release --locked --workspace --all-targets -- -D warnings
log "cargo test (unit, VMM on KVM, end to end with the Linux guest)"
cargo test --release --locked --workspace
log "all tests passed in $(( $(date +%s) - start )) s"
