#!/usr/bin/env bash
# Benchmarks (not tests): VMM overhead with the bare-metal test guest, Linux
# boot to arrow-init ready, template clones (start and memory), and the
# VMM's jail (serve jailed vs --no-confine).
# Usage: hack/bench.sh [VMM_RUNS] [LINUX_RUNS] [CLONE_RUNS] [CLONES_AT_ONCE] [JAIL_RUNS]
#        hack/bench.sh flavours [VMM_RUNS] [LINUX_RUNS] [CLONE_RUNS] [CLONES_AT_ONCE]
# `flavours` runs the headline figures here (kvm_pvm) and in the L1 of
# hack/hwkvm.sh (hardware KVM: kvm_amd, under QEMU's emulation) and prints
# them side by side, saying which figures each flavour distorts.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
require_root
"$ARROW_ROOT/hack/deps.sh"
ARROW_KERNEL=$("$ARROW_ROOT/hack/build-kernel.sh" | tail -n 1)
"$ARROW_ROOT/hack/build.sh"
ARROW_ROOTFS=$("$ARROW_ROOT/hack/mkrootfs-busybox.sh")
export ARROW_KERNEL ARROW_ROOTFS
cd "$ARROW_ROOT"
cargo build --release --locked -p bench --bin arrow-bench
if [ "${1:-}" = flavours ]; then
  shift
  runs=("${1:-10}" "${2:-2}" "${3:-5}" "${4:-4}")
  out=$(mktemp -d /tmp/arrow-bench-flavours.XXXXXX)
  trap 'rm -rf "$out"' EXIT
  log "headline figures on this host's KVM"
  target/release/arrow-bench headlines "${runs[@]}" | tee "$out/here" >&2
  log "headline figures in the L1 (kvm_amd)"
  "$ARROW_ROOT/hack/hwkvm.sh" target/release/arrow-bench headlines "${runs[@]}" | tee "$out/l1" >&2
  here=$(awk -F'\t' '$1 == "flavour" { print $2 }' "$out/here")
  echo
  echo "Headline figures, medians (runs: VMM ${runs[0]}, Linux ${runs[1]}, clones ${runs[2]}, ${runs[3]} idle clones at once)"
  printf '%-52s %14s %14s\n' "" "this host" "L1 kvm_amd"
  awk -F'\t' 'FNR == NR && $1 == "headline" { here[$2] = $3; order[++n] = $2; unit[$2] = $4 }
    FNR != NR && $1 == "headline" { l1[$2] = $3 }
    END { for (i = 1; i <= n; i++) { k = order[i]
      printf "%-52s %10s %-3s %10s %-3s\n", k, here[k], unit[k], (k in l1 ? l1[k] : "-"), unit[k] } }' \
    "$out/here" "$out/l1"
  cat <<EOF

This host: $here.
L1: hardware KVM (kvm_amd) with nested SVM, inside QEMU's pure emulation
(TCG) on this host: the L1's own code (arrow-vmm, its ioctls, page faults,
the benchmark) runs ~10x slower than on a real host, while the guest kernel
runs far faster than under kvm_pvm's instruction emulator.
Distorted:
- VMM start -> first guest output, clone -> VM restored: host-side work
  only; near real here on kvm_pvm, ~10x too slow in the L1 (TCG).
- Linux boot, template creation, clone -> arrow-init ready: guest kernel
  work; far too slow on kvm_pvm (guest kernel emulated, ~1.4 M
  instructions/s), too slow in the L1 as well (TCG); neither is the boot
  time on hardware (goal: <= 50 ms to init).
- Memory (peak RSS, PSS, guest RAM private) is counted in pages, not
  distorted by speed; it differs where the guests do different work.
EOF
  exit 0
fi
target/release/arrow-bench vmm "${1:-30}"
echo
target/release/arrow-bench linux "${2:-3}"
echo
target/release/arrow-bench clones "${3:-20}" "${4:-20}"
echo
target/release/arrow-bench jail "${5:-20}"
