#!/usr/bin/env bash
# Builds Arrow's local test images without a registry and imports them into
# a containerd:
#   localhost/arrow/busybox:latest  Debian's static busybox at /bin/busybox,
#                                   a link in /bin for each of its applets,
#                                   /etc/passwd and /etc/group (root, nobody),
#                                   an empty /tmp; Cmd ["sh"]
#   localhost/arrow/pause:latest    the static arrow-pause at /pause;
#                                   Entrypoint ["/pause"] (the sandbox image)
#   localhost/arrow/nettools:latest the busybox image plus this machine's
#                                   iptables (legacy and nft back ends,
#                                   iptables-legacy/-nft, ip6tables-*), nft
#                                   and iproute2's ip, with the libraries
#                                   they load; Cmd ["sh"]
# Each is an OCI image layout tarball written by arrow-image, cached in
# $ARROW_CACHE/images under a key of its inputs (the image's files, the
# arrow-image binary, this script), so a warm run builds nothing. Import is
# skipped when containerd already has the image at the same digest.
#
# Usage: hack/images.sh [build]                   build, print the tarballs
#        hack/images.sh import [ADDRESS [NAMESPACE]]
#            build, then import into the containerd at ADDRESS (default: the
#            private one of hack/containerd.sh) in NAMESPACE (default k8s.io)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ARROW_ROOT"

cmd=${1:-build}
address=${2:-/run/arrow-test/containerd/containerd.sock}
namespace=${3:-k8s.io}
images_dir=$ARROW_CACHE/images
target=x86_64-unknown-linux-gnu
target_dir=${CARGO_TARGET_DIR:-$ARROW_ROOT/target}

[ -x /bin/busybox ] || { require_root; apt_ensure busybox-static; }
nettools_bins=(/usr/sbin/xtables-legacy-multi /usr/sbin/xtables-nft-multi /usr/sbin/nft /usr/sbin/ip)
xtables_ext=/usr/lib/x86_64-linux-gnu/xtables
for f in "${nettools_bins[@]}"; do
  [ -x "$f" ] || { require_root; apt_ensure iptables nftables iproute2; break; }
done
# One run at a time (test binaries may call this at once).
mkdir -p "$images_dir"
exec 9>"$images_dir/.lock"
flock 9

# arrow-pause must be static: the pause image holds nothing else. Built as
# hack/build.sh builds arrow-init, with the same flags (so the two share
# their common dependencies' builds); --target keeps the flags away from
# build scripts and proc macros. arrow-image comes along in the same build.
# Both are stripped when staged.
log "building arrow-pause and arrow-image (static)"
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
  cargo build --release --locked -q -p arrow-pause -p arrow-image --target $target
mkdir -p "$ARROW_BIN_DIR"
for bin in arrow-pause arrow-image; do
  strip -o "$ARROW_BIN_DIR/.$bin.tmp" "$target_dir/$target/release/$bin"
  if cmp -s "$ARROW_BIN_DIR/.$bin.tmp" "$ARROW_BIN_DIR/$bin"; then
    rm -f "$ARROW_BIN_DIR/.$bin.tmp"
  else
    chmod 0755 "$ARROW_BIN_DIR/.$bin.tmp"
    mv "$ARROW_BIN_DIR/.$bin.tmp" "$ARROW_BIN_DIR/$bin"
  fi
done
arrow_image=$ARROW_BIN_DIR/arrow-image

# key FILE...: a short hash of the files' contents and of the tools that
# turn them into an image.
key() { cat "$@" "$arrow_image" "$0" | sha256sum | cut -c1-16; }

# build_image NAME KEY STAGE_FUNCTION ARROW_IMAGE_ARGS...: prints the tarball.
build_image() {
  local name=$1 k=$2 stage=$3
  shift 3
  local short=${name#localhost/arrow/}
  short=${short%%:*}
  local tarball=$images_dir/$short-$k.tar
  if [ ! -f "$tarball" ] || [ ! -f "$tarball.digest" ]; then
    local t0 tmp
    t0=$(date +%s%N)
    tmp=$(mktemp -d "$images_dir/.stage-$short.XXXXXX")
    "$stage" "$tmp/rootfs"
    "$arrow_image" --rootfs "$tmp/rootfs" --name "$name" --output "$tarball.tmp" "$@" >"$tarball.digest.tmp"
    rm -rf "$tmp"
    mv "$tarball.tmp" "$tarball"
    mv "$tarball.digest.tmp" "$tarball.digest"
    # Older builds of the same image go.
    find "$images_dir" -maxdepth 1 -name "$short-*.tar*" ! -name "$short-$k.tar*" -delete
    log "built $name $(cat "$tarball.digest") in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  fi
  echo "$tarball"
}

stage_busybox() {
  local r=$1 applet
  mkdir -p "$r"/{bin,etc,tmp,root,proc,sys,dev,run}
  install -m 0755 /bin/busybox "$r/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$r/bin/$applet"
  done
  chmod 1777 "$r/tmp"
  chmod 0700 "$r/root"
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$r/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnogroup:x:65534:\n' >"$r/etc/group"
}

stage_pause() {
  local r=$1
  mkdir -p "$r"
  install -m 0755 "$ARROW_BIN_DIR/arrow-pause" "$r/pause"
}

# copy_with_libs ROOT FILE...: each FILE at its own path under ROOT, with
# the shared libraries (and loader) ldd names for it.
copy_with_libs() {
  local r=$1 f lib
  shift
  for f in "$@"; do
    cp -L --parents "$f" "$r/"
    for lib in $(ldd "$f" | grep -oE '/[^ ]+'); do
      [ -e "$r$lib" ] || cp -L --parents "$lib" "$r/"
    done
  done
}

stage_nettools() {
  local r=$1 b
  stage_busybox "$r"
  copy_with_libs "$r" "${nettools_bins[@]}" "$xtables_ext"/*.so
  for b in iptables ip6tables; do
    ln -sf xtables-legacy-multi "$r/usr/sbin/$b-legacy"
    ln -sf xtables-legacy-multi "$r/usr/sbin/$b"
    ln -sf xtables-nft-multi "$r/usr/sbin/$b-nft"
    # What a mesh's init uses: one transaction per table.
    for t in legacy nft; do
      ln -sf "xtables-$t-multi" "$r/usr/sbin/$b-$t-restore"
    done
  done
  # iptables-legacy takes its lock here.
  mkdir -p "$r/run"
}

busybox_tar=$(build_image localhost/arrow/busybox:latest "$(key /bin/busybox)" stage_busybox --cmd sh)
pause_tar=$(build_image localhost/arrow/pause:latest "$(key "$ARROW_BIN_DIR/arrow-pause")" stage_pause --entrypoint /pause)

nettools_tar=$(build_image localhost/arrow/nettools:latest \
  "$(key /bin/busybox "${nettools_bins[@]}" "$xtables_ext"/*.so)" stage_nettools --cmd sh)

case "$cmd" in
  build)
    echo "$busybox_tar"
    echo "$pause_tar"
    echo "$nettools_tar"
    ;;
  import)
    command -v ctr >/dev/null || { echo "ctr not installed: run hack/deps.sh" >&2; exit 1; }
    for tarball in "$busybox_tar" "$pause_tar" "$nettools_tar"; do
      digest=$(cat "$tarball.digest")
      name=$(tar -xOf "$tarball" index.json | grep -oE '"io.containerd.image.name":"[^"]+"' | cut -d'"' -f4)
      if ctr --address "$address" -n "$namespace" images ls "name==$name" 2>/dev/null | awk 'NR > 1 {print $3}' | grep -qxF "$digest"; then
        continue
      fi
      t0=$(date +%s%N)
      ctr --address "$address" -n "$namespace" images import "$tarball" >/dev/null
      log "imported $name $digest into $address ($namespace) in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
    done
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
