# Shared helpers for the hack/ scripts. Source it; do not run it.

ARROW_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ARROW_CACHE=${ARROW_CACHE:-/var/cache/arrow}
# Where hack/build.sh puts arrow-vmm and the static arrow-init.
ARROW_BIN_DIR=${ARROW_BIN_DIR:-$ARROW_ROOT/target/arrow}
export ARROW_ROOT ARROW_CACHE ARROW_BIN_DIR

log() { printf '==> %s\n' "$*" >&2; }

# apt_ensure PKG...: installs the Debian packages that are missing, and only
# those, so a warm machine does no apt work.
apt_ensure() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  if [ ! -f /var/lib/apt/lists/lock ] || [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
    apt-get update -qq
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  }
}

require_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "$0: needs root (KVM, apt, containerd); run it with sudo" >&2
    exit 1
  fi
}

# CRI benchmarks' set-up: builds and installs the runtime (unless
# ARROW_BENCH_NO_BUILD is set), the guest kernel (cached), starts the private
# containerd and imports the test images.
bench_cri_setup() {
  if [ -z "${ARROW_BENCH_NO_BUILD:-}" ]; then
    "$ARROW_ROOT/hack/deps.sh"
    "$ARROW_ROOT/hack/build-kernel.sh" >/dev/null
    "$ARROW_ROOT/hack/build.sh"
    "$ARROW_ROOT/hack/install.sh"
  fi
  "$ARROW_ROOT/hack/containerd.sh" start
  "$ARROW_ROOT/hack/images.sh" import >/dev/null
}
