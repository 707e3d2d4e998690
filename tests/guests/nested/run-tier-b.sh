#!/usr/bin/env bash
# Run a VMM binary inside Ferrite's tier-B harness.
#
#   run-tier-b.sh VMM_BINARY RUNS_FILE
#
# VMM_BINARY must be statically linked (the outer guest has no libc); it is
# installed as /bin/ferrite in the outer guest. Each line of RUNS_FILE is one
# invocation: the line is the VMM's arguments, evaluated by the outer guest's
# busybox sh (`eval /bin/ferrite <line>`), so shell quoting works; or a line
# `! <shell command>` runs that command in the outer guest's shell, which has
# helpers to run VMs in the background and drive them with `ferrite pause|
# resume|debug|stat|stop NAME` (vm_start, vm_wait_for, vm_input, vm_end: see
# outer-init). Blank lines and '#' comment lines are skipped. The guest kernel and initramfs are at
# /guest/vmlinuz and /guest/initramfs.cpio.gz in the outer guest, e.g.
#   run --kernel /guest/vmlinuz --initrd /guest/initramfs.cpio.gz --cmdline "console=ttyS0 ..."
#
# stdout: the outer guest's serial output (carriage returns removed), with the
# markers FERRITE-KVM-READY, FERRITE-RUN-BEGIN <i>, FERRITE-RUN-END <i> EXIT=<n>
# (i = line number in RUNS_FILE), FERRITE-VM-OUTPUT-BEGIN <name> ...
# FERRITE-VM-OUTPUT-END <name> EXIT=<n> for background VMs, and FERRITE-ALL-DONE.
# Progress goes to stderr.
# Exit status: 0 if FERRITE-ALL-DONE appeared (whatever the VMM runs returned;
# read their EXIT= values), 1 if it did not (timeout, crash, outer error),
# 2 for a usage error.
#
# Environment:
#   FERRITE_TIER_B_TIMEOUT      seconds for the whole QEMU run (default 600)
#   FERRITE_TIER_B_RUN_TIMEOUT  seconds for each single VMM run (default: none)
#   FERRITE_TIER_B_APPEND       extra words for the outer kernel's command line
#   FERRITE_TIER_B_LOG          also write the raw serial output to this file
#   FERRITE_TIER_B_QEMU_ARGS    extra QEMU arguments (split at spaces), e.g. a disk
#                               for experiments: -drive file=IMG,if=virtio,format=raw
#   FERRITE_CACHE, FERRITE_GUEST_INIT   passed on to build-tier-b.sh
set -euo pipefail

log() { echo "run-tier-b: $*" >&2; }

if [ $# -ne 2 ]; then
    echo "usage: $0 VMM_BINARY RUNS_FILE" >&2
    exit 2
fi
vmm=$1
runs=$2
[ -f "$vmm" ] || { log "error: no such file: $vmm"; exit 2; }
[ -f "$runs" ] || { log "error: no such file: $runs"; exit 2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
timeout_s=${FERRITE_TIER_B_TIMEOUT:-600}

# A dynamically linked binary cannot run in the outer guest: warn early.
if [ "$(head -c 4 "$vmm" | od -An -c | tr -d ' ')" = '177ELF' ] &&
    LC_ALL=C grep -aq -m1 '/ld-linux' <(head -c 8192 "$vmm"); then
    log "warning: $vmm looks dynamically linked; the outer guest has no libc"
fi

cache=$("$here/build-tier-b.sh" | tail -n1)
[ -f "$cache/outer-base.cpio" ] || { log "error: build-tier-b.sh gave no usable cache dir"; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/ferrite-tier-b-run.XXXXXX")
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/root/bin"
cp "$vmm" "$work/root/bin/ferrite"
chmod 755 "$work/root/bin/ferrite"
cp "$runs" "$work/root/ferrite-runs"
chmod 644 "$work/root/ferrite-runs"
(cd "$work/root" && printf '%s\n' bin bin/ferrite ferrite-runs |
    cpio --quiet -o -H newc -R 0:0) >"$work/run.cpio"
cat "$cache/outer-base.cpio" "$work/run.cpio" >"$work/initrd.cpio"

append="console=ttyS0 panic=-1 quiet"
if [ -n "${FERRITE_TIER_B_RUN_TIMEOUT:-}" ]; then
    append="$append ferrite.run_timeout=$FERRITE_TIER_B_RUN_TIMEOUT"
fi
if [ -n "${FERRITE_TIER_B_APPEND:-}" ]; then
    append="$append $FERRITE_TIER_B_APPEND"
fi

raw_log=${FERRITE_TIER_B_LOG:-$work/serial.log}
# `-display none` rather than -nographic: with -nographic QEMU also points
# SeaBIOS's console at the serial port, which adds escape sequences to stdout.
log "booting outer guest (timeout ${timeout_s}s)"
start=$(date +%s)
set +e
timeout --kill-after=10 "$timeout_s" \
    qemu-system-x86_64 -M pc -accel tcg -cpu max -m 1536 -smp 1 \
    -display none -nodefaults -serial stdio -no-reboot \
    -kernel "$cache/outer-vmlinuz" -initrd "$work/initrd.cpio" \
    -append "$append" ${FERRITE_TIER_B_QEMU_ARGS:-} </dev/null |
    tee "$raw_log" | tr -d '\r'
status=("${PIPESTATUS[@]}")
set -e
elapsed=$(($(date +%s) - start))

if tr -d '\r' <"$raw_log" | grep -qx 'FERRITE-ALL-DONE'; then
    log "done in ${elapsed}s"
    exit 0
fi
if [ "${status[0]}" -eq 124 ] || [ "${status[0]}" -eq 137 ]; then
    log "error: timed out after ${timeout_s}s without FERRITE-ALL-DONE"
elif tr -d '\r' <"$raw_log" | grep -q '^FERRITE-OUTER-ERROR'; then
    log "error: outer guest failed: $(tr -d '\r' <"$raw_log" | grep -m1 '^FERRITE-OUTER-ERROR')"
else
    log "error: QEMU exited (status ${status[0]}) after ${elapsed}s without FERRITE-ALL-DONE"
fi
exit 1
