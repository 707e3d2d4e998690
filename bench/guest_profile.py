#!/usr/bin/env python3
"""Where a tier-A Linux boot spends its time, per guest kernel function.

On the project's hosts (an emulation-backed /dev/kvm) every guest kernel-mode
instruction goes through KVM's instruction emulator, and the kvm:kvm_emulate_insn
tracepoint records each one with its RIP: a complete instruction profile of the
guest kernel. This script boots the tier-A guest (ferrite.test=reboot) under a VMM
with that tracepoint, kvm_pio, kvm_mmio and kvm_userspace_exit enabled for the VMM's
threads only, then maps RIPs to the kernel's System.map and prints, per function,
the instructions emulated and the trace time until the next event (which shows the
slow instructions: `rep stos`/`movs`, CR3 writes). Tracing slows the boot ~2x, which
inflates everything driven by wall time (timer ticks).

usage (root; tracefs is mounted at /sys/kernel/tracing if it is not):
  bench/guest_profile.py [VMM]   VMM: ferrite (default) or firecracker (FIRECRACKER=path)
"""
import bisect
import collections
import json
import os
import subprocess
import sys
import tempfile

import tier_a
from tier_a import ROOT

T = "/sys/kernel/tracing"
EVENTS = ["kvm:kvm_emulate_insn", "kvm:kvm_pio", "kvm:kvm_mmio", "kvm:kvm_userspace_exit"]
CMDLINE = "console=ttyS0 reboot=k panic=-1 ferrite.test=reboot"


def put(name, value):
    with open(os.path.join(T, name), "w") as f:
        f.write(value)


def symbols(system_map):
    syms = sorted((int(a, 16), n) for a, t, n in (line.split()[:3] for line in open(system_map))
                  if t in "tTwW")
    return [a for a, _ in syms], [n for _, n in syms]


def event_key(event, rest):
    """`kvm_pio pio_write 0x3f8`, `kvm_mmio write 0xfee000b0`, or the event's name."""
    w = rest.split(":", 1)[1].split()
    if event == "kvm_pio" and len(w) >= 3:
        return f"{event} {w[0]} {w[2]}"
    if event == "kvm_mmio" and len(w) >= 6:
        return f"{event} {w[1]} {w[5]}"
    return event


def main():
    vmm = sys.argv[1] if len(sys.argv) > 1 else "ferrite"
    if not os.path.isdir(os.path.join(T, "events", "kvm")):
        subprocess.run(["mount", "-t", "tracefs", "nodev", T], check=False)
    kernel, initrd = tier_a.kernel()
    tmp = tempfile.TemporaryDirectory(prefix="ferrite-profile-")
    if vmm == "firecracker":
        config = os.path.join(tmp.name, "vm.json")
        with open(config, "w") as f:
            json.dump({"boot-source": {"kernel_image_path": kernel, "initrd_path": initrd,
                                       "boot_args": CMDLINE}, "drives": [],
                       "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}, f)
        cmd = [os.environ["FIRECRACKER"], "--no-api", "--config-file", config]
    else:
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
        ferrite = os.environ.get("FERRITE") or os.path.join(
            target, "x86_64-unknown-linux-gnu", "release", "ferrite")
        cmd = [ferrite, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "128",
               "--cmdline", CMDLINE]
    put("tracing_on", "0")
    put("trace", "")
    put("buffer_size_kb", "1200000")  # per CPU: ~25M events fit
    put("options/event-fork", "1")
    put("set_event", "\n".join(EVENTS) + "\n")
    put("tracing_on", "1")
    try:
        # The shell puts its own PID (the VMM's, after exec) in the event PID filter.
        subprocess.run(["sh", "-c", f'echo $$ > {T}/set_event_pid; exec "$@"', "sh"] + cmd,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
    finally:
        put("tracing_on", "0")
    addrs, names = symbols(os.path.join(os.path.dirname(kernel), "System.map"))
    count, secs, other = collections.Counter(), collections.Counter(), collections.Counter()
    prev, prev_ts = None, None
    with open(os.path.join(T, "trace")) as trace:
        for line in trace:
            if line.startswith("#"):
                continue
            i = line.find(": ", 30)
            if i < 0:
                continue
            ts = float(line[line.rfind(" ", 0, i) + 1:i])
            if prev is not None:
                secs[prev] += ts - prev_ts
            prev_ts = ts
            rest = line[i + 2:]
            event = rest.split(":", 1)[0]
            if event == "kvm_emulate_insn":
                rip = int(rest.split(":", 3)[2], 16)
                k = bisect.bisect_right(addrs, rip) - 1
                prev = names[k] if k >= 0 else hex(rip)
                count[prev] += 1
            else:
                prev = f"[{event}]"
                other[event_key(event, rest)] += 1
    for name, value in (("set_event", ""), ("set_event_pid", ""), ("trace", ""),
                        ("buffer_size_kb", "1408")):
        put(name, value)
    n, t = sum(count.values()), sum(secs.values())
    print(f"{vmm}: {n / 1e6:.1f} M emulated guest kernel instructions, {t:.1f} s traced")
    print(f"{'time s':>8} {'time %':>6} {'insns':>9}  function")
    for name, s in secs.most_common(40):
        print(f"{s:8.3f} {100 * s / t:6.1f} {count[name]:9}  {name}")
    for name in sorted(k for k in secs if k.startswith("[")):
        print(f"time after {name}: {secs[name]:.3f} s ({100 * secs[name] / t:.1f}%)")
    print("\nother events (top 15):")
    for what, c in other.most_common(15):
        print(f"{c:8}  {what}")


if __name__ == "__main__":
    main()
