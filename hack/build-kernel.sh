#!/usr/bin/env bash
# Build Arrow's guest kernel: an uncompressed vmlinux from Debian's
# linux-source-6.1, with hack/kernel/arrow.config and hack/kernel/patches/.
#
# The result is cached outside the repo, keyed by a hash of everything that
# goes into it:
#   ${ARROW_CACHE:-/var/cache/arrow}/kernel/<hash>/vmlinux   (+ config, System.map)
#   ${ARROW_CACHE:-/var/cache/arrow}/kernel/vmlinux -> <hash>/vmlinux
# The last line on stdout is the path of the vmlinux. With a warm cache the
# script does nothing else (no apt, no make). Logs go to stderr; the make log
# of a build is kept in kernel/build-<hash>/build.log.
#
# Environment:
#   ARROW_CACHE          cache root (default /var/cache/arrow)
#   ARROW_KERNEL_JOBS    make -j value (default: nproc)
#   ARROW_KERNEL_VERBOSE=1  stream make output to stderr instead of the log
#   ARROW_KERNEL_KEEP_BUILDS=1  keep build dirs of other hashes (default: the
#                        newest build dir is kept, older ones are removed)
set -euo pipefail

# Bump when the build recipe below changes in a way that changes the output.
RECIPE_VERSION=1
SRC_PKG=linux-source-6.1
SRC_TAR=/usr/src/linux-source-6.1.tar.xz
SRC_DIR=linux-source-6.1
NEEDED_PKGS=(linux-source-6.1 bc bison flex libelf-dev xz-utils cpio gcc make)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
kdir=$here/kernel
frag=$kdir/arrow.config
cache=${ARROW_CACHE:-/var/cache/arrow}/kernel

log() { echo "build-kernel: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ -f $frag ]] || die "missing config fragment $frag"
shopt -s nullglob
patches=("$kdir"/patches/*.patch)
shopt -u nullglob

# --- packages: only touch apt when something is missing -------------------
ensure_packages() {
	local missing=() p st
	while read -r p st; do
		[[ $st == installed ]] || missing+=("$p")
	done < <(for p in "${NEEDED_PKGS[@]}"; do
		st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
		echo "$p ${st:-missing}"
	done)
	((${#missing[@]} == 0)) && return 0
	log "installing missing packages: ${missing[*]}"
	local sudo=()
	((EUID == 0)) || sudo=(sudo)
	if ! DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y "${missing[@]}" >&2; then
		"${sudo[@]}" apt-get update >&2
		DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y "${missing[@]}" >&2
	fi
}

# --- cache key -------------------------------------------------------------
compute_hash() {
	local src_ver gcc_ver
	src_ver=$(dpkg-query -W -f='${Version}' "$SRC_PKG")
	gcc_ver=$(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)
	{
		echo "recipe $RECIPE_VERSION"
		echo "source $SRC_PKG $src_ver"
		echo "gcc $gcc_ver"
		echo "config"
		cat "$frag"
		for p in "${patches[@]}"; do
			echo "patch $(basename "$p")"
			cat "$p"
		done
	} | sha256sum | cut -c1-16
}

# Key of the extracted + patched source tree (no config): build dirs with the
# same key can seed each other.
prep_key() {
	{
		echo "recipe $RECIPE_VERSION"
		echo "source $SRC_PKG $(dpkg-query -W -f='${Version}' "$SRC_PKG")"
		echo "gcc $(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)"
		for p in "${patches[@]}"; do
			echo "patch $(basename "$p")"
			cat "$p"
		done
	} | sha256sum | cut -c1-16
}

# Every CONFIG_X=... and "# CONFIG_X is not set" line of the fragment must be
# in the final .config (a "not set" symbol may also be absent altogether).
verify_config() {
	local cfg=$1 line sym bad=()
	while IFS= read -r line; do
		case $line in
		CONFIG_*=*) sym=${line%%=*} ;;
		"# CONFIG_"*" is not set") sym=${line#\# } sym=${sym%% *} ;;
		*) continue ;;
		esac
		grep -qxF -- "$line" "$cfg" && continue
		if [[ $line == "# "* ]] && ! grep -q "^$sym=" "$cfg"; then
			continue
		fi
		bad+=("$line  (final: $(grep -E "^$sym=|^# $sym is not set" "$cfg" || echo absent))")
	done <"$frag"
	if ((${#bad[@]})); then
		log "config fragment lines that did not survive olddefconfig:"
		printf '  %s\n' "${bad[@]}" >&2
		die "fix hack/kernel/arrow.config (dependencies/selects) and rerun"
	fi
}

publish_link() {
	ln -sfn "$hash/vmlinux" "$cache/.vmlinux.link.$$"
	mv -T "$cache/.vmlinux.link.$$" "$cache/vmlinux"
}

ensure_packages
hash=$(compute_hash)
out=$cache/$hash
if [[ -s $out/vmlinux ]]; then
	[[ $(readlink "$cache/vmlinux" 2>/dev/null) == "$hash/vmlinux" ]] || publish_link
	echo "$out/vmlinux"
	exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
log "waiting for the build lock $cache/.lock"
flock 9
if [[ -s $out/vmlinux ]]; then # built by someone else meanwhile
	publish_link
	echo "$out/vmlinux"
	exit 0
fi

start=$(date +%s)
build=$cache/build-$hash
src=$build/$SRC_DIR
jobs=${ARROW_KERNEL_JOBS:-$(nproc)}
log "cold build $hash in $build (make -j$jobs)"

# Extract + patch once per hash; the marker says both completed and holds
# the key of the patched tree (everything but the config).
prep=$(prep_key)
if [[ $(cat "$build/.prepared" 2>/dev/null) != "$prep" ]]; then
	rm -rf "$build"
	# Seed from another build dir of the same patched source when one is
	# kept: kbuild (fixdep + include/config/) then recompiles only what the
	# changed CONFIG_ symbols touch. Same output as a cold build, minutes
	# instead of a quarter hour. We hold the build lock, so no other build
	# is writing the seed.
	seed=
	for d in "$cache"/build-*; do
		[[ $d != "$build" && $d != *.tmp && $(cat "$d/.prepared" 2>/dev/null) == "$prep" ]] || continue
		[[ -z $seed || $d -nt $seed ]] && seed=$d
	done
	if [[ -n $seed ]]; then
		log "seeding from $seed (incremental rebuild)"
		rm -rf "$build.tmp"
		cp -a "$seed" "$build.tmp"
		rm -f "$build.tmp/build.log"
		mv -T "$build.tmp" "$build"
	else
		mkdir -p "$build"
		log "extracting $SRC_TAR"
		tar -C "$build" -xf "$SRC_TAR"
		[[ -d $src ]] || die "$SRC_TAR did not contain $SRC_DIR/"
		for p in "${patches[@]}"; do
			log "applying $(basename "$p")"
			patch -d "$src" -p1 --forward --batch --quiet <"$p" >&2 ||
				die "patch $(basename "$p") does not apply"
		done
		echo "$prep" >"$build/.prepared"
	fi
fi

mk() {
	local logf=$build/build.log
	echo "+ make $*" >>"$logf"
	if [[ ${ARROW_KERNEL_VERBOSE:-0} == 1 ]]; then
		make -C "$src" ARCH=x86_64 "$@" 2>&1 | tee -a "$logf" >&2
	elif ! make -C "$src" ARCH=x86_64 "$@" >>"$logf" 2>&1; then
		tail -n 60 "$logf" >&2
		die "make $* failed (full log: $logf)"
	fi
}

: >"$build/build.log"
mk allnoconfig KCONFIG_ALLCONFIG="$frag"
mk olddefconfig
verify_config "$src/.config"
log "config verified; compiling (log: $build/build.log)"
mk -j"$jobs" vmlinux

# Publish atomically: everything goes into a temp dir that is renamed into
# place, so an interrupted build never leaves a (bad) cached vmlinux.
tmp=$(mktemp -d "$cache/.tmp-$hash.XXXXXX")
cp "$src/vmlinux" "$tmp/vmlinux"
cp "$src/.config" "$tmp/config"
cp "$src/System.map" "$tmp/System.map"
secs=$(($(date +%s) - start))
echo "cold build ${secs}s, make -j$jobs, $(nproc) cpus, $(date -u +%FT%TZ)" >"$tmp/build-time"
chmod 755 "$tmp"
rm -rf "$out"
mv -T "$tmp" "$out"
publish_link
log "cold build took ${secs}s"

# We hold the global build lock, so no other build dir is in use: drop
# stale ones (~1.5 GB each) unless asked to keep them.
if [[ ${ARROW_KERNEL_KEEP_BUILDS:-0} != 1 ]]; then
	for d in "$cache"/build-*; do
		[[ -d $d && $d != "$build" ]] || continue
		log "removing stale build dir $d"
		rm -rf "$d"
	done
fi
echo "$out/vmlinux"
