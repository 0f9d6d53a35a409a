#!/usr/bin/env bash
# Makes a minimal root tree from Debian's busybox-static: /bin/busybox, a
# link per applet, /etc/passwd and /etc/group, and empty mount points.
# Usage: hack/mkrootfs-busybox.sh [DIR]   (default $ARROW_CACHE/rootfs/busybox)
# Prints DIR. Rebuilt only when busybox changes.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
dir=${1:-$ARROW_CACHE/rootfs/busybox}
[ -x /bin/busybox ] || apt_ensure busybox-static
stamp=$(sha256sum /bin/busybox | cut -c1-16)
if [ -f "$dir/.arrow-rootfs" ] && [ "$(cat "$dir/.arrow-rootfs")" = "$stamp" ]; then
  echo "$dir"
  exit 0
fi
tmp="$dir.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,proc,sys,dev,run,var/www}
install -m 0755 /bin/busybox "$tmp/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$tmp/bin/$applet"
done
chmod 1777 "$tmp/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$tmp/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$tmp/etc/group"
echo "$stamp" >"$tmp/.arrow-rootfs"
rm -rf "$dir"
mkdir -p "$(dirname "$dir")"
mv "$tmp" "$dir"
echo "$dir"
