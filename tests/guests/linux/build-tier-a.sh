#!/usr/bin/env bash
# Build Ferrite's "tier A" test guest: a small, patched Linux 6.1 kernel
# (Debian's linux-source-6.1) and a busybox initramfs, for booting directly on
# the project hosts' emulation-backed /dev/kvm.
#
# Output: ${FERRITE_CACHE:-$HOME/.cache/ferrite}/tier-a-<hash16>/ with
#   vmlinux            uncompressed ELF kernel (has the PVH entry note)
#   bzImage            compressed kernel (LZ4)
#   initramfs.cpio.gz  busybox + /init + /etc/ferrite-initrd-marker +
#                      /bin/vsock-test (vsock-test.c, gcc -static -O2) (gzip
#                      with stored blocks: cheap to unpack in the guest)
#   initramfs.cpio     the same archive uncompressed
#   config, System.map, inputs.txt (for debugging)
# <hash16> = first 16 hex digits of a sha256 over every input: this script,
# tier-a.config, patches/*.patch, init, vsock-test.c, and the versions of linux-source-6.1,
# busybox-static and gcc. A complete directory is never rebuilt.
#
# The LAST line of stdout is the absolute path of that directory; everything
# else (progress, make output) goes to stderr.
#
# The kernel tree lives in the cache too (linux-src-6.1-<version>/) so that a
# rebuild after a patch or config change is incremental.
#
# Environment: FERRITE_CACHE (cache root), FERRITE_JOBS (make -j, default 2).
set -euo pipefail

# All ordinary output goes to stderr; fd 3 is the real stdout.
exec 3>&1 1>&2

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
CONFIG_FRAGMENT="$HERE/tier-a.config"
PATCH_DIR="$HERE/patches"
INIT_SCRIPT="$HERE/init"
VSOCK_TEST_SRC="$HERE/vsock-test.c"
CACHE_ROOT=${FERRITE_CACHE:-${HOME:?HOME or FERRITE_CACHE must be set}/.cache/ferrite}
JOBS=${FERRITE_JOBS:-2}
KERNEL_TARBALL=/usr/src/linux-source-6.1.tar.xz
# Fixed timestamps and names for reproducible-ish output.
SOURCE_DATE_EPOCH=1704067200
export SOURCE_DATE_EPOCH
export KBUILD_BUILD_TIMESTAMP="2024-01-01 00:00:00 UTC"
export KBUILD_BUILD_USER=ferrite KBUILD_BUILD_HOST=ferrite KBUILD_BUILD_VERSION=1
export LC_ALL=C

START=$(date +%s)
log() { printf '[build-tier-a] %s\n' "$*" >&2; }
die() { printf '[build-tier-a] ERROR: %s\n' "$*" >&2; exit 1; }

for f in "$CONFIG_FRAGMENT" "$INIT_SCRIPT" "$VSOCK_TEST_SRC"; do
	[[ -f $f ]] || die "missing input $f"
done
mapfile -t PATCHES < <(find "$PATCH_DIR" -maxdepth 1 -type f -name '*.patch' | sort)
((${#PATCHES[@]} > 0)) || die "no patches in $PATCH_DIR"

# --- build dependencies -------------------------------------------------------
DEPS=(build-essential flex bison bc libelf-dev libssl-dev cpio lz4 xz-utils
	patch python3 linux-source-6.1)
APT_UPDATED=0
apt_update() {
	if ((APT_UPDATED == 0)); then
		log "apt-get update"
		apt-get update -q >&2
		APT_UPDATED=1
	fi
}
missing=()
for p in "${DEPS[@]}"; do
	if ! dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii'; then
		missing+=("$p")
	fi
done
if ((${#missing[@]} > 0)); then
	[[ $(id -u) == 0 ]] || die "missing packages (${missing[*]}) and not root to install them"
	apt_update
	log "installing ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		"${missing[@]}" >&2
fi
[[ -f $KERNEL_TARBALL ]] || die "$KERNEL_TARBALL not found (linux-source-6.1 installed?)"

KSRC_VERSION=$(dpkg-query -W -f='${Version}' linux-source-6.1)
bb_candidate() { apt-cache policy busybox-static 2>/dev/null | awk '$1 == "Candidate:" { print $2 }'; }
BB_VERSION=$(bb_candidate)
if [[ -z $BB_VERSION || $BB_VERSION == "(none)" ]]; then
	apt_update
	BB_VERSION=$(bb_candidate)
	[[ -n $BB_VERSION && $BB_VERSION != "(none)" ]] || die "apt knows no busybox-static package"
fi
GCC_VERSION=$(gcc --version | head -n1)

# --- input hash ------------------------------------------------------------------
inputs_manifest() {
	echo "build-tier-a.sh $(sha256sum <"$SELF" | cut -d' ' -f1)"
	echo "tier-a.config $(sha256sum <"$CONFIG_FRAGMENT" | cut -d' ' -f1)"
	local p
	for p in "${PATCHES[@]}"; do
		echo "patches/$(basename "$p") $(sha256sum <"$p" | cut -d' ' -f1)"
	done
	echo "init $(sha256sum <"$INIT_SCRIPT" | cut -d' ' -f1)"
	echo "vsock-test.c $(sha256sum <"$VSOCK_TEST_SRC" | cut -d' ' -f1)"
	echo "linux-source-6.1 $KSRC_VERSION"
	echo "busybox-static $BB_VERSION"
	echo "gcc $GCC_VERSION"
}
MANIFEST=$(inputs_manifest)
HASH=$(printf '%s\n' "$MANIFEST" | sha256sum | cut -c1-16)
OUT="$CACHE_ROOT/tier-a-$HASH"

is_complete() {
	[[ -s $OUT/vmlinux && -s $OUT/bzImage && -s $OUT/initramfs.cpio.gz ]]
}
if is_complete; then
	log "up to date: $OUT"
	echo "$OUT" >&3
	exit 0
fi

mkdir -p "$CACHE_ROOT"
CACHE_ROOT=$(cd "$CACHE_ROOT" && pwd)
OUT="$CACHE_ROOT/tier-a-$HASH"
# One build at a time per cache (they share the kernel tree).
exec 9>"$CACHE_ROOT/.tier-a.lock"
log "waiting for the cache lock" && flock 9
if is_complete; then
	log "built meanwhile by another process: $OUT"
	echo "$OUT" >&3
	exit 0
fi
log "building $OUT"
printf '%s\n' "$MANIFEST" | sed 's/^/[build-tier-a]   /' >&2

# --- kernel tree -----------------------------------------------------------------------
SRC="$CACHE_ROOT/linux-src-6.1-$(printf '%s' "$KSRC_VERSION" | tr -c 'A-Za-z0-9.-' '_')"
APPLIED="$SRC/.ferrite-applied-patches"

extract_tree() {
	log "extracting $KERNEL_TARBALL into $SRC"
	rm -rf "$SRC" "$SRC.tmp"
	mkdir -p "$SRC.tmp"
	tar -xf "$KERNEL_TARBALL" -C "$SRC.tmp" --strip-components=1
	mkdir "$SRC.tmp/.ferrite-applied-patches"
	mv "$SRC.tmp" "$SRC"
}

# True if the patches recorded as applied in the tree are exactly PATCHES.
patches_match() {
	local p names=()
	for p in "${PATCHES[@]}"; do
		names+=("$(basename "$p")")
		cmp -s "$p" "$APPLIED/$(basename "$p")" || return 1
	done
	[[ $(ls -A "$APPLIED" | sort) == "$(printf '%s\n' "${names[@]}")" ]]
}

sync_patches() {
	if patches_match; then
		log "patches already applied"
		return
	fi
	# A tree whose patch state is unknown (interrupted run) is re-extracted.
	touch "$SRC/.ferrite-dirty"
	local p old=()
	mapfile -t old < <(find "$APPLIED" -maxdepth 1 -type f -name '*.patch' | sort -r)
	for p in ${old[@]+"${old[@]}"}; do
		log "reverting $(basename "$p")"
		if ! patch -d "$SRC" -p1 -R -s -f --dry-run <"$p" >&2 ||
			! patch -d "$SRC" -p1 -R -s -f --no-backup-if-mismatch <"$p" >&2; then
			log "cannot revert $(basename "$p"); starting from a fresh tree"
			extract_tree
			touch "$SRC/.ferrite-dirty"
			break
		fi
		rm -f "$p"
	done
	for p in "${PATCHES[@]}"; do
		log "applying $(basename "$p")"
		patch -d "$SRC" -p1 -s -f -N --dry-run <"$p" >&2 ||
			die "patch $(basename "$p") does not apply to linux-source-6.1 $KSRC_VERSION"
		patch -d "$SRC" -p1 -s -f -N --no-backup-if-mismatch <"$p" >&2 ||
			die "patch $(basename "$p") failed"
		cp "$p" "$APPLIED/"
	done
	rm -f "$SRC/.ferrite-dirty"
}

if [[ ! -d $APPLIED || -e $SRC/.ferrite-dirty ]]; then
	extract_tree
fi
sync_patches

# --- kernel config ------------------------------------------------------------------------
kmake() { make -C "$SRC" "$@" >&2; }

log "configuring: tinyconfig + tier-a.config + olddefconfig"
# Keep the old .config (and its mtime) if the result is identical.
if [[ -f $SRC/.config ]]; then cp -p "$SRC/.config" "$SRC/.config.ferrite-prev"; fi
kmake -s tinyconfig
(cd "$SRC" && scripts/kconfig/merge_config.sh -m .config "$CONFIG_FRAGMENT" >&2)
kmake -s olddefconfig
if [[ -f $SRC/.config.ferrite-prev ]]; then
	if cmp -s "$SRC/.config" "$SRC/.config.ferrite-prev"; then
		mv -f "$SRC/.config.ferrite-prev" "$SRC/.config"
	else
		rm -f "$SRC/.config.ferrite-prev"
	fi
fi

# Every option the fragment sets must have ended up that way.
bad=0
while IFS= read -r line; do
	case "$line" in
	CONFIG_*=*)
		if ! grep -qxF -- "$line" "$SRC/.config"; then
			log "config: wanted '$line', got '$(grep -E "^(# )?${line%%=*}[= ]" "$SRC/.config" || echo "<absent>")'"
			bad=1
		fi
		;;
	"# CONFIG_"*" is not set")
		sym=${line#\# }
		sym=${sym%% *}
		if grep -qE "^$sym=[ym]" "$SRC/.config"; then
			log "config: wanted $sym off, got '$(grep -E "^$sym=" "$SRC/.config")'"
			bad=1
		fi
		;;
	esac
done <"$CONFIG_FRAGMENT"
((bad == 0)) || die "the kernel config does not match tier-a.config (see above)"
log "config verified against tier-a.config"

# --- kernel build -----------------------------------------------------------------------------
log "make -j$JOBS vmlinux bzImage (a full build takes ~4.5 min on 2 cores)"
kmake -j"$JOBS" vmlinux bzImage
[[ $(head -c4 "$SRC/vmlinux" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]] ||
	die "vmlinux is not an ELF file"

# --- assemble the output in a temporary directory --------------------------------------------
TMP=$(mktemp -d "$CACHE_ROOT/.tier-a-$HASH.tmp.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
cp "$SRC/vmlinux" "$TMP/vmlinux"
cp "$SRC/arch/x86/boot/bzImage" "$TMP/bzImage"
cp "$SRC/.config" "$TMP/config"
cp "$SRC/System.map" "$TMP/System.map"
printf '%s\n' "$MANIFEST" >"$TMP/inputs.txt"

# busybox-static, unpacked (not installed: it conflicts with Debian's busybox).
log "fetching busybox-static $BB_VERSION"
mkdir "$TMP/bb"
(cd "$TMP/bb" && apt-get download -q "busybox-static=$BB_VERSION" >&2) ||
	die "apt-get download busybox-static failed"
dpkg-deb -x "$TMP"/bb/busybox-static_*.deb "$TMP/bb/x"
BUSYBOX="$TMP/bb/x/bin/busybox"
[[ -x $BUSYBOX ]] || die "no bin/busybox in the busybox-static package"

log "building initramfs"
ROOT="$TMP/rootfs"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,etc,tmp,root,run,mnt}
chmod 1777 "$ROOT/tmp"
chmod 0700 "$ROOT/root"
install -m 0755 "$BUSYBOX" "$ROOT/bin/busybox"
# Applet links: only a few. Every initramfs entry costs the guest kernel
# ~40 ms to unpack here (all ~270 links: +11 s of boot), and Debian's static
# busybox runs any applet by name from its shell anyway (standalone shell,
# once /proc is mounted). These are the ones /init uses, plus a few basics.
APPLET_LINKS=(sh mount umount dd nproc dmesg stty setsid cttyhack reboot poweroff
	cat ls ps grep sync md5sum od head timeout ip nc wc)
declare -A APPLET_PATH=()
while IFS= read -r path; do
	APPLET_PATH[${path##*/}]=$path
done < <("$BUSYBOX" --list-full)
for applet in "${APPLET_LINKS[@]}"; do
	path=${APPLET_PATH[$applet]:-}
	[[ -n $path ]] || die "busybox has no applet '$applet'"
	up=${path//[^\/]/}
	up=${up//\//../}
	ln -s "${up}bin/busybox" "$ROOT/$path"
done
[[ -L $ROOT/bin/sh ]] || die "busybox provides no bin/sh"
install -m 0755 "$INIT_SCRIPT" "$ROOT/init"
# The vsock test program (static glibc, like busybox).
gcc -static -O2 -Wall -o "$TMP/vsock-test" "$VSOCK_TEST_SRC" -lpthread >&2 ||
	die "compiling vsock-test.c failed"
install -m 0755 "$TMP/vsock-test" "$ROOT/bin/vsock-test"
rm -f "$TMP/vsock-test"
printf 'ferrite-initrd-ok\n' >"$ROOT/etc/ferrite-initrd-marker"
chmod 0644 "$ROOT/etc/ferrite-initrd-marker"
cat >"$ROOT/etc/fstab" <<'EOF'
# Mounted by /init with `mount -a` (a single process).
proc      /proc  proc      defaults  0 0
sysfs     /sys   sysfs     defaults  0 0
devtmpfs  /dev   devtmpfs  defaults  0 0
EOF
chmod 0644 "$ROOT/etc/fstab"
# The kernel opens /dev/console for init before anything is mounted.
mknod -m 0600 "$ROOT/dev/console" c 5 1 || die "mknod failed (this step needs root)"
mknod -m 0666 "$ROOT/dev/null" c 1 3
find "$ROOT" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$ROOT" && find . -print0 | sort -z |
	cpio -o -H newc --null --owner=0:0 --reproducible --quiet) >"$TMP/initramfs.cpio"
# gzip format, but with stored (uncompressed) deflate blocks: inflating is
# emulated in the guest, and inflating gzip -9 output took ~37 s longer here.
python3 - "$TMP/initramfs.cpio" "$TMP/initramfs.cpio.gz" <<'PY'
import gzip, sys
with open(sys.argv[1], "rb") as src:
    data = src.read()
with open(sys.argv[2], "wb") as dst:
    dst.write(gzip.compress(data, compresslevel=0, mtime=0))
PY
gzip -t "$TMP/initramfs.cpio.gz" || die "bad initramfs.cpio.gz"
rm -rf "$ROOT" "$TMP/bb"

# --- publish atomically -----------------------------------------------------------------------
chmod 0755 "$TMP"
rm -rf "$OUT"
mv -T "$TMP" "$OUT"
trap - EXIT
log "done in $(($(date +%s) - START)) s: $(du -h "$OUT/vmlinux" | cut -f1) vmlinux," \
	"$(du -h "$OUT/bzImage" | cut -f1) bzImage, $(du -h "$OUT/initramfs.cpio.gz" | cut -f1) initramfs"
echo "$OUT" >&3
