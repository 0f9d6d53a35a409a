#!/usr/bin/env bash
# Builds arrow-vmm, the containerd shim and the static arrow-init (release),
# arrow-cri and the operator's `arrow` command, and puts them in $ARROW_BIN_DIR (default target/arrow/),
# where arrow-vmm finds arrow-init and the shim finds arrow-vmm (and the
# arrow-cri end-to-end test finds arrow-cri and the shim).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ARROW_ROOT"
# Both binaries are static and not position-independent: arrow-init because
# the guest has no dynamic loader (and self-relocation costs guest page
# faults), arrow-vmm because it then starts without ld.so and holds less
# memory (peak RSS 2.3 MiB instead of 3.2 MiB). --target keeps these flags
# away from build scripts and proc macros.
export RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static"
target=x86_64-unknown-linux-gnu
log "building arrow-vmm (static)"
cargo build --release --locked -p arrow-vmm --bin arrow-vmm --target $target
log "building containerd-shim-arrow-v1 (static)"
cargo build --release --locked -p shim --bin containerd-shim-arrow-v1 --target $target
log "building arrow-init (static)"
# Its profile also strips symbols, halving what the initramfs carries.
cargo build --profile release-init --locked -p guest-init --bin arrow-init --target $target
# arrow-cri is dynamic (it resolves registry names through the system's
# resolver), built as `cargo test` builds it so the two share their work.
log "building arrow-cri"
env -u RUSTFLAGS cargo build --release --locked -p cri-server --bin arrow-cri
# `arrow` (install, check): dynamic too, built as `cargo test` builds it.
log "building arrow"
env -u RUSTFLAGS cargo build --release --locked -p arrowctl --bin arrow
mkdir -p "$ARROW_BIN_DIR"
install -m 0755 target/$target/release/arrow-vmm "$ARROW_BIN_DIR/arrow-vmm"
install -m 0755 target/$target/release-init/arrow-init "$ARROW_BIN_DIR/arrow-init"
install -m 0755 target/$target/release/containerd-shim-arrow-v1 "$ARROW_BIN_DIR/containerd-shim-arrow-v1"
install -m 0755 "${CARGO_TARGET_DIR:-target}/release/arrow-cri" "$ARROW_BIN_DIR/arrow-cri"
install -m 0755 "${CARGO_TARGET_DIR:-target}/release/arrow" "$ARROW_BIN_DIR/arrow"
log "binaries in $ARROW_BIN_DIR: $(cd "$ARROW_BIN_DIR" && ls | tr '\n' ' ')"
