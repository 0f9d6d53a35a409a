#!/usr/bin/env bash
# A private containerd for Arrow's tests and benchmarks: Debian's containerd
# (1.6) with a config, root, state, socket and CNI network of its own, so it
# runs beside a system containerd without touching it. Its CRI plugin has two
# runtime handlers: `runc` (the default, the control case) and `arrow`
# (runtime type io.containerd.arrow.v1: containerd runs the
# containerd-shim-arrow-v1 it finds on PATH, /usr/local/bin first), plus
# `arrow-unjailed` for benchmarks (the same shim, VMMs without their jail).
#
# Usage: hack/containerd.sh start|stop|restart|purge|status|config|address
#   start    write the config, start containerd unless it runs, wait until
#            its socket answers and the CRI plugin is loaded
#   stop     remove every task and container it holds, stop it and its
#            shims, unmount what it left under its root and state, release
#            the CNI addresses, network namespaces, cgroups and logs of its
#            pods
#   restart  stop then start
#   purge    stop, then delete its root too (images, snapshots)
#   status   exit 0 if it runs and answers
#   config   write the containerd config and the CNI conflist, print the config
#   address  print the socket path
# Images: hack/images.sh imports the test images into it.
# Environment: ARROW_CONTAINERD_PATH is put in front of containerd's PATH
# (e.g. a directory with a freshly built containerd-shim-arrow-v1).
# ARROW_TEST_SUBNET is the pods' CNI subnet (default 10.213.0.0/16: not
# containerd's stock 10.88.0.0/16, nor k3s's, kind's or flannel's); start
# refuses when something else on the host already routes it.
# ARROW_TEST_SUBNET6 is their IPv6 subnet (default fd88::/64, a unique local
# one; pods are dual-stack as in a dual-stack cluster).
# ARROW_CONTAINERD_CONFIG names a config to start with instead of the one
# this script writes (integration/tests/arrow_install.rs: containerd's
# stock config edited by `arrow install`); it must use this script's root,
# state, socket and CNI directory, so stop cleans up after it the same way.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

root=${ARROW_CONTAINERD_ROOT:-/var/lib/arrow-test/containerd}
run=${ARROW_TEST_RUN:-/run/arrow-test}
state=$run/containerd
sock=$state/containerd.sock
etc=/etc/arrow-test
config=${ARROW_CONTAINERD_CONFIG:-$etc/containerd/config.toml}
cni_conf_dir=$etc/cni/net.d
cni_bin_dir=/usr/lib/cni
cni_network=arrow-test
bridge=arrow0
subnet=${ARROW_TEST_SUBNET:-10.213.0.0/16}
subnet6=${ARROW_TEST_SUBNET6:-fd88::/64}
logfile=$run/containerd.log
pidfile=$run/containerd.pid
lockfile=$run/containerd.lock
sandbox_image=localhost/arrow/pause:latest
# Pods made by integration/src/cri.rs get cgroups under this parent.
cgroup_parent=/arrow-test
# ... and their logs here.
pod_logs=/var/log/arrow-test/pods

ctr_() { ctr --address "$sock" "$@"; }

# The `arrow-unjailed` handler's shim: containerd-shim-arrow-v1 told to run
# its VMMs without the jail (for measuring what the jail costs).
write_unjailed_shim() {
  mkdir -p "$run/bin"
  printf '#!/bin/sh\nARROW_VMM_NO_CONFINE=1 exec containerd-shim-arrow-v1 "$@"\n' \
    >"$run/bin/containerd-shim-arrow-unjailed-v1.tmp"
  chmod 755 "$run/bin/containerd-shim-arrow-unjailed-v1.tmp"
  mv "$run/bin/containerd-shim-arrow-unjailed-v1.tmp" "$run/bin/containerd-shim-arrow-unjailed-v1"
}

write_config() {
  mkdir -p "$cni_conf_dir"
  write_cni_config
  [ -z "${ARROW_CONTAINERD_CONFIG:-}" ] || return 0
  mkdir -p "$(dirname "$config")"
  cat >"$config.tmp" <<EOF
# Written by hack/containerd.sh: Arrow's private test containerd.
version = 2
root = "$root"
state = "$state"
oom_score = 0
# Plugins that only fail or idle here: no aufs/btrfs/zfs/devmapper storage,
# no tracing exporter. (The v1 runtime io.containerd.runtime.v1.linux stays:
# containerd 1.6's tasks service, and so CRI, fail without it.)
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "$sock"

[ttrpc]
  address = "$sock.ttrpc"

[debug]
  address = "$state/debug.sock"
  level = "info"

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$root/opt"

  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "$sandbox_image"
    # Root here lacks CAP_SYS_RESOURCE: never lower a container's
    # oom_score_adj below containerd's own.
    restrict_oom_score_adj = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    disable_apparmor = true
    max_container_log_line_size = 16384
    # Pod network namespaces under our state dir, not /run/netns beside a
    # system containerd's.
    netns_mounts_under_state_dir = true

    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      discard_unpacked_layers = false

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          # cgroup v1 (hybrid) here, and no systemd: the cgroupfs driver.
          SystemdCgroup = false
          # runc's state beside ours, not in /run/containerd/runc.
          Root = "$run/runc"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.arrow]
        runtime_type = "io.containerd.arrow.v1"
        pod_annotations = ["io.arrow.*"]
        container_annotations = ["io.arrow.*"]

      # Benchmarks only (hack/bench-cri.sh --jail): the same shim with
      # ARROW_VMM_NO_CONFINE=1, so its VMMs run without their jail.
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.arrow-unjailed]
        runtime_type = "io.containerd.arrow-unjailed.v1"
        pod_annotations = ["io.arrow.*"]
        container_annotations = ["io.arrow.*"]

    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "$cni_bin_dir"
      conf_dir = "$cni_conf_dir"
      max_conf_num = 1

  [plugins."io.containerd.runtime.v2.task"]
    platforms = ["linux/amd64"]
EOF
  mv "$config.tmp" "$config"
}

write_cni_config() {
  # Pods get an address of each family on bridge $bridge (dual stack, as a
  # Kubernetes dual-stack cluster's CNI gives them; IPv4 first, so it is the
  # pod's primary IP); no masquerading: they reach this machine and each
  # other, nothing further.
  cat >"$cni_conf_dir/10-$cni_network.conflist.tmp" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$cni_network",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "$subnet" }], [{ "subnet": "$subnet6" }]],
        "routes": [{ "dst": "0.0.0.0/0" }, { "dst": "::/0" }]
      }
    },
    { "type": "loopback" }
  ]
}
EOF
  mv "$cni_conf_dir/10-$cni_network.conflist.tmp" "$cni_conf_dir/10-$cni_network.conflist"
}

pid_of_ours() {
  local pid
  [ -f "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
  # The pid must still be our containerd, not a recycled number.
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "--config $config" || return 1
  echo "$pid"
}

answers() { ctr_ version >/dev/null 2>&1; }

# Routes of this host that overlap the pods' subnets, other than our
# bridge's own (the default route aside): with one, a pod IP would be
# reachable through the wrong interface, or not at all.
routes_over_subnet() {
  { ip -4 route show root "$subnet"; ip -4 route show match "$subnet"
    ip -6 route show root "$subnet6"; ip -6 route show match "$subnet6"; } 2>/dev/null |
    grep -v '^default ' | grep -vw "dev $bridge" || true
}

start() {
  require_root
  command -v containerd >/dev/null || { echo "containerd not installed: run hack/deps.sh" >&2; exit 1; }
  if pid_of_ours >/dev/null && answers; then
    log "containerd already running (pid $(pid_of_ours)), socket $sock"
    return 0
  fi
  if pid_of_ours >/dev/null; then
    log "containerd (pid $(pid_of_ours)) does not answer: restarting it"
    stop_daemon
  fi
  local clash
  clash=$(routes_over_subnet)
  if [ -n "$clash" ]; then
    echo "the test pods' subnet $subnet or $subnet6 is already routed on this host:" >&2
    printf '  %s\n' "$clash" >&2
    echo "pick a free one with ARROW_TEST_SUBNET=a.b.0.0/16 or ARROW_TEST_SUBNET6=fdXX::/64 (or remove that route)" >&2
    exit 1
  fi
  write_config
  mkdir -p "$root" "$state" "$run"
  write_unjailed_shim
  rm -f "$sock" "$sock.ttrpc"
  local t0 t1
  t0=$(date +%s%N)
  # Its own session, stdio to the log: it outlives this script and holds
  # none of the caller's pipes, nor any other descriptor it inherited (a
  # caller's `flock /tmp/arrow-e2e.lock` would stay held for as long as
  # containerd and its shims run).
  (
    for fd in /proc/self/fd/*; do
      fd=${fd##*/}
      if [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    PATH="${ARROW_CONTAINERD_PATH:+$ARROW_CONTAINERD_PATH:}$run/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
      exec setsid containerd --config "$config" </dev/null >>"$logfile" 2>&1
  ) &
  echo $! >"$pidfile"
  local i
  for i in $(seq 1 300); do
    answers && break
    if ! alive "$(cat "$pidfile")"; then
      echo "containerd exited; the end of $logfile:" >&2
      tail -n 30 "$logfile" >&2
      exit 1
    fi
    sleep 0.1
  done
  if ! answers; then
    echo "containerd did not answer on $sock within 30 s; the end of $logfile:" >&2
    tail -n 30 "$logfile" >&2
    exit 1
  fi
  t1=$(date +%s%N)
  # The CRI plugin is skipped (not fatal) when its config is wrong.
  if ! ctr_ plugins ls 2>/dev/null | awk '$2 == "cri" && $NF == "ok" {found=1} END {exit !found}'; then
    echo "containerd runs but its CRI plugin did not load; the end of $logfile:" >&2
    grep -iE 'cri|error' "$logfile" | tail -n 20 >&2
    stop_daemon
    exit 1
  fi
  log "containerd up in $(( (t1 - t0) / 1000000 )) ms (pid $(cat "$pidfile")), socket $sock, log $logfile"
}

# Whether process $1 lives (a zombie does not: the init here may reap late).
alive() {
  local st
  st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# Kills the daemon only.
stop_daemon() {
  local pid i
  pid=$(pid_of_ours) || { rm -f "$pidfile"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do
    alive "$pid" || break
    sleep 0.1
  done
  if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$pidfile"
}

# Pids of shims started by this containerd: their command line names its
# socket.
our_shims() {
  local p
  for p in /proc/[0-9]*; do
    [ -r "$p/cmdline" ] || continue
    if tr '\0' '\n' <"$p/cmdline" 2>/dev/null | grep -qxF -- "$sock"; then
      tr '\0' '\n' <"$p/cmdline" 2>/dev/null | head -n 1 | grep -q 'containerd-shim' && echo "${p#/proc/}"
    fi
  done
}

# Unmounts every mount point under $1, deepest first.
unmount_under() {
  local dir=$1 m
  awk -v d="$dir/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
  done
}

stop() {
  require_root
  local netns=() ns id
  if pid_of_ours >/dev/null && answers; then
    for ns in $(ctr_ namespaces ls -q 2>/dev/null); do
      for id in $(ctr_ -n "$ns" tasks ls -q 2>/dev/null); do
        ctr_ -n "$ns" tasks kill -a -s SIGKILL "$id" >/dev/null 2>&1 || true
      done
      for id in $(ctr_ -n "$ns" containers ls -q 2>/dev/null); do
        # CRI sandboxes name their network namespace in their spec.
        while read -r path; do
          netns+=("$path")
        done < <(ctr_ -n "$ns" containers info "$id" 2>/dev/null |
          grep -oE '"path": *"/(var/)?run/netns/[^"]+"' | sed -E 's/.*"(\/[^"]+)"$/\1/')
        ctr_ -n "$ns" tasks delete -f "$id" >/dev/null 2>&1 || true
        ctr_ -n "$ns" containers delete "$id" >/dev/null 2>&1 || true
      done
    done
  fi
  stop_daemon
  local pid
  for pid in $(our_shims); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  unmount_under "$state"
  unmount_under "$root"
  for ns in ${netns[@]+"${netns[@]}"}; do
    umount "$ns" 2>/dev/null || umount -l "$ns" 2>/dev/null || true
    rm -f "$ns"
  done
  # No pod of this containerd lives on: free the addresses they held.
  rm -rf "/var/lib/cni/networks/$cni_network"
  ip link del "$bridge" 2>/dev/null || true
  # The per-pod cgroups the test pods asked for (cgroupfs, under $cgroup_parent).
  local d
  for d in /sys/fs/cgroup/*/"${cgroup_parent#/}" /sys/fs/cgroup/"${cgroup_parent#/}"; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  # And the container logs of the test pods (integration/src/cri.rs).
  rm -rf "$pod_logs"
  rm -rf "$state" "$run/runc"
  log "containerd stopped"
}

cmd=${1:-}
case "$cmd" in
  start|stop|restart|purge)
    mkdir -p "$run"
    exec 9>"$lockfile"
    flock 9
    case "$cmd" in
      start) start ;;
      stop) stop ;;
      restart) stop; start ;;
      purge) stop; unmount_under "$root"; rm -rf "$root"; log "removed $root" ;;
    esac
    ;;
  status)
    pid_of_ours >/dev/null && answers
    ;;
  config)
    write_config
    cat "$config"
    ;;
  address)
    echo "$sock"
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
