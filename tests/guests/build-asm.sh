#!/usr/bin/env bash
# Assembles the test guests with binutils into OUTDIR (default: target/guests).
#   asm/flat/NAME.s -> OUTDIR/NAME.bin  (flat binary, linked at 0, run in real mode)
#   asm/elf/NAME.s  -> OUTDIR/NAME.elf  (64-bit ELF, one RWX segment at 1 MiB)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../target/guests}
mkdir -p "$out"
command -v as >/dev/null && command -v ld >/dev/null || {
    echo "build-asm.sh: binutils (as, ld) not found; install the 'binutils' package" >&2
    exit 1
}
for src in "$here"/asm/flat/*.s; do
    name=$(basename "$src" .s)
    as --64 -o "$out/$name.o" "$src"
    ld -m elf_x86_64 -N -Ttext=0 -e _start --oformat=binary -o "$out/$name.bin" "$out/$name.o"
done
for src in "$here"/asm/elf/*.s; do
    name=$(basename "$src" .s)
    as --64 -o "$out/$name.o" "$src"
    ld -m elf_x86_64 --no-warn-rwx-segments -N -Ttext=0x100000 -e _start -o "$out/$name.elf" "$out/$name.o"
done
rm -f "$out"/*.o
