#!/usr/bin/env bash
# The main job on a fresh machine: installs what it needs, builds the guest
# kernel and Arrow, and runs a program inside a KVM microVM, printing its
# output and exit code. The first run boots the guest and saves a template;
# the second is a clone of it.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
require_root
"$ARROW_ROOT/hack/deps.sh"
kernel=$("$ARROW_ROOT/hack/build-kernel.sh" | tail -n 1)
"$ARROW_ROOT/hack/build.sh"
rootfs=$("$ARROW_ROOT/hack/mkrootfs-busybox.sh")

program='echo "hello from $(uname -sr) on $(hostname), in an Arrow microVM";
         echo "cpus: $(nproc), memory: $(grep MemTotal /proc/meminfo | tr -s " ")";
         echo "pid 1 is $(cat /proc/1/comm)"; exit 3'
for run in first second; do
  log "$run run: a program in a microVM (kernel $kernel, busybox root tree)"
  set +e
  "$ARROW_BIN_DIR/arrow-vmm" run --timings --kernel "$kernel" --rootfs "$rootfs" \
    --memory 128M --hostname "demo-$run" -- /bin/sh -c "$program"
  code=$?
  set -e
  log "the program exited with code $code"
  [ "$code" -eq 3 ]
done
