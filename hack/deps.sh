#!/usr/bin/env bash
# Installs what building and testing Arrow needs, idempotently: Debian
# packages, and a Rust toolchain check. The guest kernel has its own script.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
require_root
apt_ensure protobuf-compiler busybox-static gcc make libc6-dev \
  containerd runc containernetworking-plugins iproute2 \
  iptables nftables \
  docker-registry
# Debian's docker-registry starts a system registry on :5000 where systemd
# runs; the tests start their own on loopback ports, so keep it off.
if command -v systemctl >/dev/null && systemctl is-enabled --quiet docker-registry 2>/dev/null; then
  systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
