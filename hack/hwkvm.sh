#!/usr/bin/env bash
# Runs a command where /dev/kvm is hardware KVM (kvm_amd), on machines whose
# own /dev/kvm is kvm_pvm: an "L1" VM in QEMU's pure emulation (TCG) with a
# nested-SVM EPYC CPU, booting Debian's own kernel, which loads kvm-amd.
# Everything Arrow's VM tests need there comes from the host: the host's /
# is shared read-only over virtio-9p and becomes the L1's root, so the
# host's built (dynamically linked) test binaries, the guest kernel and the
# root tree run unchanged; /tmp, /run, /var/tmp and /dev/shm are the L1's own
# tmpfs, and ARROW_CACHE there is a tmpfs directory whose kernel/, rootfs/
# and images/ are the host cache's.
#
# Usage: hack/hwkvm.sh [--] COMMAND [ARG...]   run COMMAND in the L1 (in the
#                                              current directory), print its
#                                              stdout/stderr, exit with its code
#        hack/hwkvm.sh --build                 only build the L1 image; print
#                                              its directory
# The command sees the caller's PATH, ARROW_* and RUST_* variables and those
# named in ARROW_HWKVM_ENV (space separated), HOME=/tmp/home.
# ARROW_HWKVM_TIMEOUT (seconds, default 1800) ends a run that takes longer
# (exit 124); ARROW_HWKVM_MEMORY (default 4G) and ARROW_HWKVM_CPUS (default
# 2) size the L1. The L1's console is kept in the run's log directory, which
# is printed when the run fails.
#
# The image (Debian's kernel and modules, an initramfs of busybox-static
# and the virtio/9p modules) is built from Debian packages only and cached
# under $ARROW_CACHE/hwkvm/<hash of its inputs>; a warm run builds nothing.
# Guest kernel code runs much faster under TCG than under kvm_pvm's
# emulation, but everything else (the L1's user space: the VMM, the tests)
# runs ~10x slower than on the host: use it to test the hardware path, not
# to time it.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
require_root

timeout_s=${ARROW_HWKVM_TIMEOUT:-1800}
memory=${ARROW_HWKVM_MEMORY:-4G}
cpus=${ARROW_HWKVM_CPUS:-2}
build_only=
case "${1:-}" in
  --build) build_only=1 ;;
  --) shift ;;
  "" | -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
if [ -z "$build_only" ] && [ $# -eq 0 ]; then
  echo "usage: $0 [--] COMMAND [ARG...] | --build" >&2
  exit 2
fi

apt_ensure qemu-system-x86 busybox-static kmod cpio

# The modules the initramfs loads before the host root can be mounted (the
# rest come from the image's module tree afterwards).
initramfs_modules="virtio_pci 9pnet_virtio 9p"

# The kernel package linux-image-amd64 currently points at, unless pinned.
kernel_pkg=${ARROW_HWKVM_KERNEL_PKG:-$(apt-cache depends linux-image-amd64 2>/dev/null |
  awk '/Depends: linux-image-[0-9]/ { print $2; exit }')}
if [ -z "$kernel_pkg" ]; then
  apt-get update -qq
  kernel_pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
fi
kernel_ver=$(apt-cache show --no-all-versions "$kernel_pkg" | awk '/^Version:/ { print $2; exit }')
busybox_ver=$(dpkg-query -W -f='${Version}' busybox-static)

# build_image: Debian's kernel package, unpacked (never installed: the host
# keeps its own boot set-up), its module index made with depmod, and an
# uncompressed initramfs (TCG pays for every decompressed byte).
build_image() {
  local tmp="$image.tmp.$$" release mod
  log "building the L1 image ($kernel_pkg $kernel_ver) in $image"
  rm -rf "$tmp"
  mkdir -p "$tmp/deb" "$tmp/initramfs"/{bin,dev,proc,sys,modules,newroot}
  (cd "$tmp/deb" && apt-get download -q "$kernel_pkg=$kernel_ver" >/dev/null 2>&1) || {
    apt-get update -qq
    (cd "$tmp/deb" && apt-get download -q "$kernel_pkg=$kernel_ver" >/dev/null)
  }
  dpkg-deb -x "$tmp/deb/"*.deb "$tmp/root"
  rm -rf "$tmp/deb"
  release=$(ls "$tmp/root/lib/modules")
  depmod -b "$tmp/root" "$release"
  cp "$tmp/root/boot/vmlinuz-$release" "$tmp/vmlinuz"
  install -m 0755 /bin/busybox "$tmp/initramfs/bin/busybox"
  # Each module after those it needs, as modprobe would load them.
  for mod in $(modprobe -d "$tmp/root" -S "$release" --show-depends -a $initramfs_modules |
    awk '$1 == "insmod" { print $2 }'); do
    if ! grep -qxF "$(basename "$mod")" "$tmp/initramfs/modules/order" 2>/dev/null; then
      cp "$mod" "$tmp/initramfs/modules/"
      basename "$mod" >>"$tmp/initramfs/modules/order"
    fi
  done
  write_init >"$tmp/initramfs/init"
  chmod 0755 "$tmp/initramfs/init"
  (cd "$tmp/initramfs" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$tmp/initramfs.cpio"
  rm -rf "$tmp/initramfs"
  echo "$release" >"$tmp/release"
  rm -rf "$image"
  mv "$tmp" "$image"
  # Images of other inputs are stale (each holds a whole module tree).
  find "$ARROW_CACHE/hwkvm" -mindepth 1 -maxdepth 1 -type d ! -path "$image" -exec rm -rf {} +
}

# The L1's PID 1 (busybox sh): loads the 9p modules, mounts the host's / as
# the new root with the L1's own tmpfs where things are written, mounts the
# run's exchange directory, then hands over to stage 2 (written by the host
# into the exchange directory) on the host's bash.
write_init() {
  cat <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
fail() { echo "hwkvm init: $*" >/dev/console; sync; poweroff -f; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do insmod "/modules/$m" || fail "insmod $m"; done
opts=trans=virtio,version=9p2000.L,msize=524288
n=0
until mount -t 9p -o "$opts,cache=loose,ro" hostroot /newroot 2>/dev/null; do
  n=$((n + 1)); [ $n -lt 50 ] || fail "mounting the host root"; sleep 0.1
done
for d in tmp run var/tmp; do
  mount -t tmpfs -o mode=1777 tmpfs "/newroot/$d" || fail "tmpfs on /$d"
done
mkdir -p /newroot/run/hwkvm
mount -t 9p -o "$opts,cache=none" xchg /newroot/run/hwkvm || fail "mounting the exchange directory"
mount --move /dev /newroot/dev
mount --move /sys /newroot/sys
mount --move /proc /newroot/proc
exec switch_root /newroot /bin/bash /run/hwkvm/stage2
EOF
}

# Stage 2, on the host's root with the L1's kernel: the rest of the mounts,
# kvm-amd, the command, its exit code into the exchange directory, power off.
write_stage2() {
  cat <<EOF
#!/bin/bash
modroot=$image/root
EOF
  cat <<'EOF'
x=/run/hwkvm
fail() { echo "hwkvm stage 2: $*" >/dev/console; echo 125 >"$x/rc.tmp"; mv "$x/rc.tmp" "$x/rc"; sync; /bin/busybox poweroff -f; }
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts && ln -sf pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
/bin/busybox hostname hwkvm
/bin/busybox ip link set lo up
# Modules the kernel asks for (tun, veth, ...) come from the image's tree.
printf '#!/bin/sh\nexec /sbin/modprobe -d %s "$@"\n' "$modroot" >/run/hwkvm-modprobe
chmod 0755 /run/hwkvm-modprobe
echo /run/hwkvm-modprobe >/proc/sys/kernel/modprobe
/sbin/modprobe -d "$modroot" kvm_amd || fail "modprobe kvm_amd"
# /dev/net/tun exists only once tun is loaded (opening it cannot load it).
/sbin/modprobe -d "$modroot" tun || echo "hwkvm stage 2: no tun module" >/dev/console
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm_amd"
# The kernel's code symbols (Debian's System.map is a placeholder), so the
# host can name where a wedged L1's CPUs are.
awk '$2 ~ /^[tT]$/ { print $1, $3 }' /proc/kallsyms >"$x/kallsyms" 2>/dev/null
echo "hwkvm: $(uname -r), /dev/kvm is kvm_amd (nested=$(cat /sys/module/kvm_amd/parameters/nested)), $(nproc) CPUs" >/dev/console
/bin/bash "$x/cmd" >"$x/out" 2>"$x/err" </dev/null
echo $? >"$x/rc.tmp"
mv "$x/rc.tmp" "$x/rc"
sync
/bin/busybox poweroff -f
EOF
}

# write_cmd ARGS...: the command, run from the caller's directory with the
# caller's variables that matter.
write_cmd() {
  local var
  echo "#!/bin/bash"
  for var in PATH $(compgen -e | grep -E '^(ARROW|RUST|CARGO)_' || true) ${ARROW_HWKVM_ENV:-}; do
    if [ -n "${!var+x}" ]; then printf 'export %s=%q\n' "$var" "${!var}"; fi
  done
  cat <<EOF
export HOME=/tmp/home
export ARROW_CACHE=/tmp/arrow-cache
mkdir -p "\$HOME" "\$ARROW_CACHE"
for d in kernel rootfs images; do
  [ -e $(printf %q "$ARROW_CACHE")/\$d ] && ln -s $(printf %q "$ARROW_CACHE")/\$d "\$ARROW_CACHE/\$d"
done
cd $(printf %q "$PWD")
EOF
  printf 'exec'
  printf ' %q' "$@"
  echo
}

# The image's key: what goes into it (the functions that build it, not the
# rest of this script, so editing how runs work rebuilds nothing).
key=$( { declare -f build_image write_init; echo "$kernel_pkg $kernel_ver busybox $busybox_ver $initramfs_modules"; } |
  sha256sum | cut -c1-16)
image=$ARROW_CACHE/hwkvm/$key
if [ ! -f "$image/initramfs.cpio" ]; then
  mkdir -p "$ARROW_CACHE/hwkvm"
  exec 9>"$ARROW_CACHE/hwkvm/.lock"
  flock 9
  [ -f "$image/initramfs.cpio" ] || build_image
  exec 9>&-
fi
if [ -n "$build_only" ]; then
  echo "$image"
  exit 0
fi

# The L1 sees the host's / except these, which are its own: a command run
# from (or a checkout under) one of them would find nothing there.
case "$PWD/" in
  /tmp/* | /run/* | /var/tmp/* | /dev/shm/*)
    echo "$0: the L1 cannot see $PWD (/tmp, /run, /var/tmp and /dev/shm are its own tmpfs); run from a checkout elsewhere" >&2
    exit 2 ;;
esac
run=$(mktemp -d /tmp/arrow-hwkvm.XXXXXX)
write_stage2 >"$run/stage2"
write_cmd "$@" >"$run/cmd"
: >"$run/out"
: >"$run/err"
qemu_pid=
tails=()
cleanup() {
  local code=$?
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill "$qemu_pid" 2>/dev/null || true
    sleep 1
    kill -KILL "$qemu_pid" 2>/dev/null || true
  fi
  for t in "${tails[@]}"; do kill "$t" 2>/dev/null || true; done
  if [ "$code" -eq 0 ]; then rm -rf "$run"; fi
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Each L1 CPU's instruction pointer, named from the symbols the L1 wrote
# at boot, read over QEMU's monitor: where a wedged L1 is stuck.
l1_cpus() {
  python3 - "$run/monitor.sock" "$run/kallsyms" <<'PY'
import bisect, re, socket, sys, time
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
sock.settimeout(5)
sock.sendall(b"info registers -a\n")
time.sleep(2)
out = b""
try:
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        out += chunk
except socket.timeout:
    pass
syms = []
try:
    for line in open(sys.argv[2]):
        addr, name = line.split()[:2]
        syms.append((int(addr, 16), name))
    syms.sort()
except OSError:
    pass
addrs = [a for a, _ in syms]
for cpu, rip in re.findall(rb"CPU#(\d+).*?RIP=([0-9a-f]+)", out, re.S):
    rip = int(rip, 16)
    i = bisect.bisect_right(addrs, rip) - 1
    where = f"{syms[i][1]}+{rip - syms[i][0]:#x}" if i >= 0 else "?"
    print(f"L1 CPU {int(cpu)}: RIP {rip:#x} {where}")
print(out.decode(errors="replace"))
PY
}

summary=$(printf '%s ' "$@" | tr '\n' ' ' | cut -c1-100)
log "L1 ($(cat "$image/release"), TCG, nested SVM, $cpus CPUs, $memory): $summary"
started=$(date +%s)
qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot \
  -machine q35 -accel tcg,thread=multi -cpu EPYC,+svm,+npt -smp "$cpus" -m "$memory" \
  -kernel "$image/vmlinuz" -initrd "$image/initramfs.cpio" \
  -append "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init" \
  -monitor "unix:$run/monitor.sock,server=on,wait=off" \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
  -virtfs "local,path=$run,mount_tag=xchg,security_model=none,multidevs=remap" \
  -serial "file:$run/console.log" -pidfile "$run/qemu.pid" 2>"$run/qemu.log" &
qemu_pid=$!
tail -n +1 -f --pid="$qemu_pid" "$run/out" &
tails+=($!)
tail -n +1 -f --pid="$qemu_pid" "$run/err" >&2 &
tails+=($!)

timed_out=
while kill -0 "$qemu_pid" 2>/dev/null; do
  if [ $(( $(date +%s) - started )) -ge "$timeout_s" ]; then
    timed_out=1
    log "L1 run exceeded ${timeout_s} s: stopping it; where its CPUs are:"
    l1_cpus >&2 || true
    kill "$qemu_pid" 2>/dev/null || true
    break
  fi
  sleep 1
done
wait "$qemu_pid" 2>/dev/null || true
qemu_pid=
for t in "${tails[@]}"; do wait "$t" 2>/dev/null || true; done
tails=()

elapsed=$(( $(date +%s) - started ))
if [ -n "$timed_out" ]; then
  rc=124
elif [ -f "$run/rc" ]; then
  rc=$(cat "$run/rc")
else
  rc=125
  log "the L1 ended without the command's exit code; QEMU said and the console shows:"
  grep -v "TCG doesn't support requested feature" "$run/qemu.log" >&2 || true
  tail -n 40 "$run/console.log" >&2 || true
fi
log "L1 run ended after ${elapsed} s: exit code $rc"
if [ "$rc" -ne 0 ]; then
  log "L1 console and output kept in $run"
fi
exit "$rc"
