#!/usr/bin/env bash
# Builds arrow-vmm (release) and the static arrow-init, and puts both in
# $ARROW_BIN_DIR (default target/arrow/), where arrow-vmm finds arrow-init.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ARROW_ROOT"
log "building arrow-vmm"
cargo build --release --locked -p vmm-core --bin arrow-vmm
log "building arrow-init (static)"
# --target keeps these flags away from build scripts and proc macros. A
# non-PIE static binary skips self-relocation at start (fewer guest page
# faults); stripping (profile) halves what the initramfs carries.
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
  cargo build --profile release-init --locked -p guest-init --bin arrow-init \
  --target x86_64-unknown-linux-gnu
mkdir -p "$ARROW_BIN_DIR"
install -m 0755 target/release/arrow-vmm "$ARROW_BIN_DIR/arrow-vmm"
install -m 0755 target/x86_64-unknown-linux-gnu/release-init/arrow-init "$ARROW_BIN_DIR/arrow-init"
log "binaries in $ARROW_BIN_DIR: $(cd "$ARROW_BIN_DIR" && ls | tr '\n' ' ')"
