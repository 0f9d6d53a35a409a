#!/usr/bin/env bash
# Makes a minimal root tree from Debian's busybox-static: /bin/busybox, links
# for the applets below, /etc/passwd and /etc/group, and empty mount points.
# Only a chosen set of applets is linked: every file an initramfs holds costs
# a guest boot tens of milliseconds to unpack where the guest kernel is
# emulated (all 269 links cost ~16 s); `busybox APPLET` reaches the others.
# Usage: hack/mkrootfs-busybox.sh [DIR]   (default $ARROW_CACHE/rootfs/busybox)
# Prints DIR. Rebuilt only when busybox changes.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
dir=${1:-$ARROW_CACHE/rootfs/busybox}
[ -x /bin/busybox ] || apt_ensure busybox-static
stamp=$(cat /bin/busybox "$0" | sha256sum | cut -c1-16)
if [ -f "$dir/.arrow-rootfs" ] && [ "$(cat "$dir/.arrow-rootfs")" = "$stamp" ]; then
  echo "$dir"
  exit 0
fi
tmp="$dir.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,proc,sys,dev,run,var/www}
install -m 0755 /bin/busybox "$tmp/bin/busybox"
applets="sh ash cat echo printf ls ps sleep hostname date nproc grep kill tty
stty true false head tail tr id env mount umount uname wc httpd wget nc ip
ifconfig route nslookup ping cp mv rm mkdir rmdir touch chmod chown ln sed awk
sort uniq cut find xargs test [ expr seq du df free dmesg sync vi less hexdump
od md5sum sha256sum netstat which basename dirname readlink timeout yes dd
mkfifo stat"
# The list is read once: `busybox --list | grep -q` under pipefail fails
# whenever grep exits before busybox has written everything (SIGPIPE), which
# silently left random applets (cat, ip, expr...) out of the tree.
available=$(/bin/busybox --list)
for applet in $applets; do
  if grep -qxF -- "$applet" <<<"$available"; then
    ln -sf busybox "$tmp/bin/$applet"
  else
    echo "mkrootfs-busybox: this busybox has no applet $applet; not linked" >&2
  fi
done
chmod 1777 "$tmp/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$tmp/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$tmp/etc/group"
echo "$stamp" >"$tmp/.arrow-rootfs"
rm -rf "$dir"
mkdir -p "$(dirname "$dir")"
mv "$tmp" "$dir"
echo "$dir"
