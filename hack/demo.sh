#!/usr/bin/env bash
# The main job on a fresh machine: installs what it needs, builds the guest
# kernel and Arrow, and runs a program inside a KVM microVM, printing its
# output and exit code.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
require_root
"$ARROW_ROOT/hack/deps.sh"
kernel=$("$ARROW_ROOT/hack/build-kernel.sh" | tail -n 1)
"$ARROW_ROOT/hack/build.sh"
rootfs=$("$ARROW_ROOT/hack/mkrootfs-busybox.sh")

log "running a program in a microVM (busybox root tree, kernel $kernel)"
set +e
time "$ARROW_BIN_DIR/arrow-vmm" run --kernel "$kernel" --rootfs "$rootfs" --memory 256M -- \
  /bin/sh -c 'echo "hello from $(uname -sr) in an Arrow microVM";
              echo "cpus: $(nproc), memory: $(grep MemTotal /proc/meminfo | tr -s " ")";
              echo "pid 1 is $(cat /proc/1/comm)"; exit 3'
code=$?
set -e
log "the program exited with code $code"
[ "$code" -eq 3 ]
