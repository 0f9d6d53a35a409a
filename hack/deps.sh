#!/usr/bin/env bash
# Installs what building and testing Arrow needs, idempotently: Debian
# packages, and a Rust toolchain check. The guest kernel has its own script.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
require_root
apt_ensure protobuf-compiler busybox-static gcc make libc6-dev \
  containerd runc containernetworking-plugins iproute2 \
  docker-registry
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
