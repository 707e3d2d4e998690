#!/usr/bin/env python3
"""Linux boot time: Ferrite vs Firecracker on the same tier-A kernel and initrd,
1 vCPU, 128 MiB, interleaved in one run.

Each boot runs the tier-A guest (tests/guests/linux/build-tier-a.sh) with
`ferrite.test=reboot`: its init prints FERRITE-USERSPACE as soon as userspace
starts, then reboots; with `reboot=k` both VMMs then exit 0. Two figures per boot,
from spawning the VMM: the marker on the console ("userspace") and the VMM's exit
("total", what the issue compares). Firecracker gets the same kernel, initrd and
command line through a config file (--no-api; it appends `pci=off` and logs to
stdout, which is read with the console).

Where the time goes (bench/guest_profile.py, 2026-12-06): on the project's hosts the
guest kernel's ~25 M instructions are emulated one by one, and both VMMs give the guest
the same work (same instruction counts per function within a few %). Exits to the VMM
are ~17,000 per boot (16,000 of them the 8250 console: a THR write and an LSR read per
character) and take ~1% of the boot; no calibration loop runs (kvm-clock gives the TSC
frequency) and no absent port is polled. The rest is the guest's own work: timer ticks
~15%, struct page init/free ~9%, `rep stos`/`movs` ~10% of the time, turning the
kernel's lock prefixes off for one CPU through text_poke ~7%, an entropy pool that is
never credited ~6%, printk/console ~6%, set_memory_* ~4%. Runs on a shared 2-core host
vary by up to 1.8x between rounds: compare medians of many rounds, and the minima.

usage: FIRECRACKER=/path/to/firecracker bench/boot_firecracker.py [ROUNDS]
Without FIRECRACKER (or with a path that is not executable) only Ferrite is timed.
FERRITE=/path overrides the Ferrite binary (default: a release build of this tree,
in CARGO_TARGET_DIR if set).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import tier_a
from tier_a import ROOT, read_until

MEM_MIB = 128
VCPUS = 1
MARK = b"FERRITE-USERSPACE"
TIMEOUT = 300
CMDLINE = "console=ttyS0 reboot=k panic=-1 ferrite.test=reboot"


def ferrite_binary():
    if os.environ.get("FERRITE"):
        return os.environ["FERRITE"]
    subprocess.run(["cargo", "build", "--release", "--quiet"], check=True, cwd=ROOT)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(target, "x86_64-unknown-linux-gnu", "release", "ferrite")


def boot(cmd):
    """(seconds to the userspace marker, seconds to the VMM's exit)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    try:
        buf = read_until(p, MARK, TIMEOUT)
        userspace = time.perf_counter() - t0
        # Drain the console until the VMM exits (the guest reboots).
        rest, _ = p.communicate(timeout=TIMEOUT)
        buf += rest
        code = p.returncode
        total = time.perf_counter() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if code != 0:
        sys.exit(f"{cmd[0]} exited {code} after the guest rebooted; output:\n"
                 f"{buf[-2000:].decode(errors='replace')}")
    return userspace, total


def stats(xs):
    return statistics.median(xs), min(xs), max(xs)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    kernel, initrd = tier_a.kernel()
    vmms = {"ferrite": [ferrite_binary(), "run", "--kernel", kernel, "--initrd", initrd,
                        "--mem", str(MEM_MIB), "--cpus", str(VCPUS), "--cmdline", CMDLINE]}
    fc = os.environ.get("FIRECRACKER")
    tmp = tempfile.TemporaryDirectory(prefix="ferrite-bench-fc-")
    if fc and os.access(fc, os.X_OK):
        config = os.path.join(tmp.name, "vm.json")
        with open(config, "w") as f:
            json.dump({"boot-source": {"kernel_image_path": kernel, "initrd_path": initrd,
                                       "boot_args": CMDLINE},
                       "drives": [],
                       "machine-config": {"vcpu_count": VCPUS, "mem_size_mib": MEM_MIB}}, f)
        vmms["firecracker"] = [fc, "--no-api", "--config-file", config]
    else:
        print("FIRECRACKER is not set to an executable: timing Ferrite only "
              "(build Firecracker from source, then FIRECRACKER=/path/to/firecracker)",
              file=sys.stderr)
    print(f"load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f}", flush=True)
    times = {v: ([], []) for v in vmms}
    for r in range(rounds):
        order = list(vmms) if r % 2 == 0 else list(reversed(list(vmms)))
        for v in order:
            u, t = boot(vmms[v])
            times[v][0].append(u)
            times[v][1].append(t)
            print(f"round {r + 1}: {v:12} userspace {u:7.2f} s  total {t:7.2f} s "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
    print(f"\nboot to userspace and reboot, {MEM_MIB} MiB, {VCPUS} vCPU, "
          f"{rounds} interleaved rounds: median (min-max) s")
    for v, (us, ts) in times.items():
        print(f"{v:12} userspace {stats(us)[0]:6.2f} ({stats(us)[1]:.2f}-{stats(us)[2]:.2f})"
              f"  total {stats(ts)[0]:6.2f} ({stats(ts)[1]:.2f}-{stats(ts)[2]:.2f})")
    if "firecracker" in times:
        f, c = times["ferrite"], times["firecracker"]
        print(f"ratio ferrite/firecracker: userspace "
              f"{statistics.median(f[0]) / statistics.median(c[0]):.3f}, total "
              f"{statistics.median(f[1]) / statistics.median(c[1]):.3f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
