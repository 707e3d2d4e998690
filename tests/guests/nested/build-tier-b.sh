#!/usr/bin/env bash
# Build (or reuse) the artifacts of Ferrite's tier-B test harness.
#
# Tier B runs the VMM under test inside QEMU (TCG, -cpu max, which emulates AMD
# SVM) booting Debian's cloud kernel with kvm-amd loaded, so the VMM talks to
# real upstream KVM. The VMM itself boots the same, unmodified cloud kernel.
#
# Output: progress on stderr; the LAST line on stdout is the absolute path of
# the cache directory, which holds
#   outer-vmlinuz            Debian cloud kernel (bzImage) for the outer QEMU guest
#   guest-vmlinuz            the same kernel, for the VMM's (inner) guest
#   guest-initramfs.cpio.gz  busybox + tests/guests/linux/init + marker (+ virtio modules,
#                            evdev and button for the power button)
#   outer-base.cpio          busybox, outer /init, kvm modules, /guest/{vmlinuz,initramfs.cpio.gz}
#   kernel-config            the kernel's /boot/config-*
#   versions                 package names and versions used
#
# The directory name carries a hash of the inputs (this script, the outer init,
# the inner init, the package versions), so any change rebuilds it.
#
# Environment:
#   FERRITE_CACHE       cache root (default $HOME/.cache/ferrite)
#   FERRITE_GUEST_INIT  inner /init to use instead of tests/guests/linux/init
#                       (only for testing the harness itself)
set -euo pipefail

log() { echo "build-tier-b: $*" >&2; }
die() { log "error: $*"; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
outer_init="$here/outer-init"
guest_init="${FERRITE_GUEST_INIT:-$here/../linux/init}"
cache_root="${FERRITE_CACHE:-$HOME/.cache/ferrite}"

[ -f "$outer_init" ] || die "missing $outer_init"
[ -f "$guest_init" ] || die "missing inner guest init $guest_init"
guest_init=$(cd "$(dirname "$guest_init")" && pwd)/$(basename "$guest_init")

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_update() {
    if [ "$apt_updated" -eq 0 ]; then
        log "apt-get update"
        as_root apt-get update -q >&2
        apt_updated=1
    fi
}

# --- host tools ------------------------------------------------------------
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v cpio >/dev/null || missing+=(cpio)
command -v gzip >/dev/null || missing+=(gzip)
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update
    log "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi

# --- resolve package versions (from the local apt lists) -------------------
resolve() {
    kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    kernel_ver=""
    busybox_ver=""
    [ -n "$kernel_pkg" ] || return 1
    # One apt-cache call for both packages (each call costs ~0.5-1 s).
    local policy
    policy=$(apt-cache policy "$kernel_pkg" busybox-static 2>/dev/null)
    kernel_ver=$(awk -v p="$kernel_pkg:" '$1 == p { f = 1 } f && /Candidate:/ { print $2; exit }' <<<"$policy")
    busybox_ver=$(awk '$1 == "busybox-static:" { f = 1 } f && /Candidate:/ { print $2; exit }' <<<"$policy")
    [ -n "$kernel_ver" ] && [ "$kernel_ver" != "(none)" ] &&
        [ -n "$busybox_ver" ] && [ "$busybox_ver" != "(none)" ]
}

if ! resolve; then
    apt_update
    resolve || die "cannot resolve linux-image-cloud-amd64 / busybox-static with apt-cache"
fi

compute_key() {
    versions="$kernel_pkg=$kernel_ver busybox-static=$busybox_ver"
    key=$({
        sha256sum <"$self"
        sha256sum <"$outer_init"
        sha256sum <"$guest_init"
        echo "$versions"
    } | sha256sum | cut -c1-16)
    out="$cache_root/tier-b-$key"
}
compute_key

if [ -f "$out/outer-base.cpio" ]; then
    log "cached: $out ($versions)"
    touch "$out" 2>/dev/null || true
    echo "$out"
    exit 0
fi

log "building $out ($versions)"
if [ -e "$out" ]; then
    log "removing incomplete $out"
    rm -rf "$out"
fi
mkdir -p "$cache_root/debs"
tmp=$(mktemp -d "$cache_root/.tier-b-build.XXXXXX")
scratch=$(mktemp -d "${TMPDIR:-/tmp}/ferrite-tier-b.XXXXXX")
cleanup() {
    rm -rf "$scratch"
    if [ -n "${tmp:-}" ]; then rm -rf "$tmp"; fi
}
trap cleanup EXIT

# --- download the two packages (kept in $cache_root/debs) -------------------
fetch() { # pkg version -> path of the .deb
    local pkg=$1 ver=$2 deb
    deb="$cache_root/debs/${pkg}_${ver//:/%3a}_amd64.deb"
    if [ ! -s "$deb" ]; then
        log "apt-get download $pkg=$ver"
        (cd "$scratch" && apt-get download -q "$pkg=$ver" >&2 2>/dev/null) || {
            apt_update
            (cd "$scratch" && apt-get download -q "$pkg=$ver" >&2)
        } || die "apt-get download $pkg=$ver failed"
        local got
        got=$(find "$scratch" -maxdepth 1 -name "${pkg}_*.deb" | head -n1)
        mv "$got" "$deb.part" && mv "$deb.part" "$deb"
    fi
    echo "$deb"
}
kernel_deb=$(fetch "$kernel_pkg" "$kernel_ver")
busybox_deb=$(fetch busybox-static "$busybox_ver")

log "unpacking"
mkdir -p "$scratch/k" "$scratch/bb"
dpkg-deb -x "$kernel_deb" "$scratch/k"
dpkg-deb -x "$busybox_deb" "$scratch/bb"

vmlinuz=$(find "$scratch/k/boot" -name 'vmlinuz-*' | head -n1)
config=$(find "$scratch/k/boot" -name 'config-*' | head -n1)
krel=${vmlinuz##*/vmlinuz-}
moddir="$scratch/k/lib/modules/$krel"
busybox="$scratch/bb/bin/busybox"
if [ ! -f "$vmlinuz" ] || [ ! -d "$moddir" ] || [ ! -x "$busybox" ]; then
    die "unexpected package layout"
fi

# Copy module NAME to DEST as a plain .ko (decompressing .ko.xz / .ko.zst).
get_module() {
    local name=$1 dest=$2 src
    src=$(find "$moddir" \( -name "$name.ko" -o -name "$name.ko.xz" -o -name "$name.ko.zst" \
        -o -name "$name.ko.gz" \) | head -n1)
    [ -n "$src" ] || die "module $name not found in $kernel_pkg"
    case "$src" in
        *.ko) cp "$src" "$dest" ;;
        *.ko.xz) "$busybox" unxz -c "$src" >"$dest" ;;
        *.ko.gz) gzip -dc "$src" >"$dest" ;;
        *.ko.zst)
            command -v zstd >/dev/null || die "$src is zstd-compressed: apt-get install zstd"
            zstd -q -dc "$src" >"$dest"
            ;;
    esac
}

# Populate DIR with busybox at /bin/busybox and a symlink per applet.
install_busybox() {
    local root=$1 applet
    mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin"
    cp "$busybox" "$root/bin/busybox"
    chmod 755 "$root/bin/busybox"
    for applet in $("$busybox" --list-full); do
        [ "$applet" = bin/busybox ] && continue
        [ -e "$root/$applet" ] || [ -L "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
    done
    [ -L "$root/bin/sh" ] || ln -sf /bin/busybox "$root/bin/sh"
}

# Write a newc archive of DIR (owned by root) to stdout.
mkcpio() {
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0)
}

# --- inner guest initramfs ---------------------------------------------------
log "guest initramfs"
g="$scratch/guest-root"
mkdir -p "$g"/{dev,proc,sys,tmp,run,root,etc,lib/modules/ferrite}
install_busybox "$g"
install -m 755 "$guest_init" "$g/init"
echo ferrite-initrd-ok >"$g/etc/ferrite-initrd-marker"
# The shared init mounts these with a single `mount -a`.
cat >"$g/etc/fstab" <<'FSTAB'
proc      /proc  proc      defaults  0 0
sysfs     /sys   sysfs     defaults  0 0
devtmpfs  /dev   devtmpfs  defaults  0 0
FSTAB
# No /dev/console node is needed here: the kernel's built-in initramfs,
# unpacked before this one, already holds /dev/console.
# The cloud kernel has every virtio driver as a module; ship them so that guest
# tests of virtio devices can insmod them (in the order of load-order).
virtio_modules="virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev
    virtio_pci virtio_blk failover net_failover virtio_net virtio_console virtio-rng"
: >"$g/lib/modules/ferrite/load-order"
for m in $virtio_modules; do
    get_module "$m" "$g/lib/modules/ferrite/$m.ko"
    echo "$m.ko" >>"$g/lib/modules/ferrite/load-order"
done
# The ACPI power button driver and the event device interface, both modules
# here, for the init's `button` mode (it loads them in this order).
: >"$g/lib/modules/ferrite/button-modules"
for m in evdev button; do
    get_module "$m" "$g/lib/modules/ferrite/$m.ko"
    echo "$m.ko" >>"$g/lib/modules/ferrite/button-modules"
done
echo "$krel" >"$g/lib/modules/ferrite/kernel-release"
mkcpio "$g" | gzip -9 -n >"$tmp/guest-initramfs.cpio.gz"

# --- outer initramfs base ----------------------------------------------------
log "outer base initramfs"
o="$scratch/outer-root"
mkdir -p "$o"/{dev,proc,sys,tmp,run,root,etc,lib/modules,guest}
install_busybox "$o"
install -m 755 "$outer_init" "$o/init"
for m in irqbypass kvm kvm-amd; do
    get_module "$m" "$o/lib/modules/$m.ko"
done
cp "$vmlinuz" "$o/guest/vmlinuz"
cp "$tmp/guest-initramfs.cpio.gz" "$o/guest/initramfs.cpio.gz"
mkcpio "$o" >"$tmp/outer-base.cpio"

cp "$vmlinuz" "$tmp/outer-vmlinuz"
cp "$vmlinuz" "$tmp/guest-vmlinuz"
cp "$config" "$tmp/kernel-config"
{
    echo "$kernel_pkg $kernel_ver"
    echo "busybox-static $busybox_ver"
    echo "kernel-release $krel"
} >"$tmp/versions"

# --- publish atomically ------------------------------------------------------
chmod 755 "$tmp"
if mv -T "$tmp" "$out" 2>/dev/null; then
    tmp=""
    log "built $out"
    # Drop other tier-B builds unused for a week (each is ~50 MB).
    find "$cache_root" -mindepth 1 -maxdepth 1 -name 'tier-b-*' ! -path "$out" -mtime +7 \
        -exec rm -rf {} + 2>/dev/null || true
elif [ -f "$out/outer-base.cpio" ]; then
    log "another build published $out first; using it"
else
    die "could not publish $out"
fi
echo "$out"
