#!/usr/bin/env bash
# Installs Arrow's runtime binaries where containerd finds them:
# containerd-shim-arrow-v1, arrow-vmm and arrow-init side by side in
# $ARROW_PREFIX (default /usr/local/bin), from $ARROW_BIN_DIR (hack/build.sh).
# Idempotent. containerd then runs pods with runtime_type
# "io.containerd.arrow.v1" (see README.md for its config).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
require_root
prefix=${ARROW_PREFIX:-/usr/local/bin}
mkdir -p "$prefix"
for bin in containerd-shim-arrow-v1 arrow-vmm arrow-init; do
  if [ ! -x "$ARROW_BIN_DIR/$bin" ]; then
    echo "$0: $ARROW_BIN_DIR/$bin missing: run hack/build.sh first" >&2
    exit 1
  fi
  # Replace atomically: a running shim or VMM keeps its old inode.
  install -m 0755 "$ARROW_BIN_DIR/$bin" "$prefix/.$bin.new"
  mv -f "$prefix/.$bin.new" "$prefix/$bin"
done
log "installed containerd-shim-arrow-v1, arrow-vmm, arrow-init in $prefix"
