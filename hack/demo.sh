#!/usr/bin/env bash
# The main job on a fresh machine: installs what it needs, builds the guest
# kernel and Arrow, and runs a program inside a KVM microVM, printing its
# output and exit code (the first run boots the guest and saves a template;
# the second is a clone of it). Then it installs the containerd shim and,
# under Debian's containerd (a private instance: hack/containerd.sh), runs a
# container with `ctr run --runtime io.containerd.arrow.v1` and a Kubernetes
# pod through containerd's CRI plugin with runtime handler `arrow`, and a
# pod whose web server answers at its pod IP from the host.
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

"$ARROW_ROOT/hack/install.sh"
"$ARROW_ROOT/hack/containerd.sh" start
"$ARROW_ROOT/hack/images.sh" import >/dev/null
"$ARROW_ROOT/hack/images.sh" import "$("$ARROW_ROOT/hack/containerd.sh" address)" default >/dev/null
cargo build --release --locked -q -p arrow-pod --bin arrow-pod
ctr=(ctr --address "$("$ARROW_ROOT/hack/containerd.sh" address)")
in_vm='echo "hello from $(uname -sr) ($(cat /proc/1/comm) is PID 1 of the VM), hostname $(hostname)"'

log "ctr run --runtime io.containerd.arrow.v1: a container in its own microVM"
"${ctr[@]}" run --rm --runtime io.containerd.arrow.v1 localhost/arrow/busybox:latest \
  "arrow-demo-$$" sh -c "$in_vm; exit 3" || code=$?
log "the container exited with code ${code:-0}"
[ "${code:-0}" -eq 3 ]

log "a pod through containerd's CRI plugin, runtime handler arrow (RuntimeClass arrow)"
"$ARROW_ROOT/target/release/arrow-pod" run --handler arrow -- \
  sh -c "$in_vm; echo pod cgroup: \$(cat /proc/self/cgroup); ls /etc/hosts /etc/resolv.conf"
log "a web server in a pod's microVM, answering at the pod IP from the host"
pod_out=$(mktemp)
"$ARROW_ROOT/target/release/arrow-pod" run --handler arrow -- sh -c \
  'mkdir -p /tmp/www; echo "<h1>served by $(hostname) from inside an Arrow microVM ($(uname -r))</h1>" >/tmp/www/index.html; exec httpd -f -v -p 8080 -h /tmp/www' \
  >"$pod_out" 2>&1 &
pod_pid=$!
stop_pod() { kill -INT "$pod_pid" 2>/dev/null || true; wait "$pod_pid" || true; cat "$pod_out"; rm -f "$pod_out"; }
ip=""
for _ in $(seq 1200); do
  ip=$(sed -n 's/.*handler arrow, IP \([0-9.]*\).*/\1/p' "$pod_out")
  [ -n "$ip" ] && break
  sleep 0.1
done
[ -n "$ip" ] || { stop_pod; log "ERROR: the pod got no IP"; exit 1; }
# GET / from $1:$2 through bash's /dev/tcp; fails quietly while nothing
# listens there yet.
http_get() {
  { exec 3<>"/dev/tcp/$1/$2"; } 2>/dev/null || return 1
  printf 'GET / HTTP/1.0\r\n\r\n' >&3
  cat <&3
}
# One progress line: a dot per refused try until the server answers.
printf '==> pod IP %s; waiting for http://%s:8080/ ' "$ip" "$ip" >&2
page=""
for _ in $(seq 120); do
  if page=$(http_get "$ip" 8080) && [ -n "$page" ]; then
    break
  fi
  printf '.' >&2
  sleep 0.5
done
printf '\n' >&2
stop_pod
[ -n "$page" ] || { log "ERROR: no answer from $ip:8080"; exit 1; }
printf '%s\n' "$page"
log "done; stop the demo containerd with hack/containerd.sh stop"
