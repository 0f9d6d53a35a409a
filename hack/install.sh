#!/usr/bin/env bash
# Installs Arrow's runtime binaries where containerd finds them:
# containerd-shim-arrow-v1, arrow-vmm and arrow-init side by side in
# $ARROW_PREFIX (default /usr/local/bin), with the operator's `arrow`, from
# $ARROW_BIN_DIR (hack/build.sh). Idempotent; containerd's config is left
# alone (the tests run their own containerd). On a node, use
# `target/arrow/arrow install` instead: it also adds runtime arrow to
# containerd's or k3s's config, and `arrow uninstall` undoes it.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
require_root
prefix=${ARROW_PREFIX:-/usr/local/bin}
mkdir -p "$prefix"
for bin in containerd-shim-arrow-v1 arrow-vmm arrow-init arrow; do
  if [ ! -x "$ARROW_BIN_DIR/$bin" ]; then
    echo "$0: $ARROW_BIN_DIR/$bin missing: run hack/build.sh first" >&2
    exit 1
  fi
  # Replace atomically: a running shim or VMM keeps its old inode.
  install -m 0755 "$ARROW_BIN_DIR/$bin" "$prefix/.$bin.new"
  mv -f "$prefix/.$bin.new" "$prefix/$bin"
done
log "installed containerd-shim-arrow-v1, arrow-vmm, arrow-init, arrow in $prefix"
