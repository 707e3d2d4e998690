#!/usr/bin/env bash
# README's first command: build Ferrite and the tier-A test kernel (once per machine,
# cached in ~/.cache/ferrite), then boot it to an interactive shell. Ctrl-A x quits.
# Extra arguments go to `ferrite run` (e.g. --cpus 2 --mem 512).
set -euo pipefail
cd "$(dirname "$0")/.."
# The userfaultfd crate's -sys part generates its bindings with bindgen (libclang).
if ! compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' >/dev/null; then
    if [[ $(id -u) != 0 ]]; then
        echo "run-linux.sh: libclang is missing (apt-get install libclang-dev) and this is not root to install it" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev
fi
cargo build --release
dir=$(tests/guests/linux/build-tier-a.sh | tail -n 1)
exec target/x86_64-unknown-linux-gnu/release/ferrite run \
    --kernel "$dir/vmlinux" --initrd "$dir/initramfs.cpio.gz" --mem 256 \
    --cmdline "console=ttyS0 reboot=k panic=-1" "$@"
