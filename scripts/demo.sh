#!/usr/bin/env bash
# README's first command: build Ferrite and boot a guest.
# Boots the committed 64-bit test guest; see README for booting Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v as >/dev/null || { apt-get update -qq && apt-get install -y -qq binutils; }
cargo build --release
tests/guests/build-asm.sh target/guests
exec target/x86_64-unknown-linux-gnu/release/ferrite run --kernel target/guests/hello64.elf --mem 16M "$@"
