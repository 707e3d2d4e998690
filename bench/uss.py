#!/usr/bin/env python3
"""Per-VM private memory: what decides how many VMs fit on a host.

N copies of the same tiny guest (echo.bin, a flat real-mode program polling the UART,
16 MiB of RAM) run at once under each VMM; for each process, USS = Private_Clean +
Private_Dirty of /proc/PID/smaps_rollup (the binary's text is shared by all N, so it
drops out), and peak RSS (VmHWM). Medians over the N, side by side:
  ferrite  this tree's release build
  base     another Ferrite binary, if FERRITE_BASE=PATH is set (e.g. a build of main)
  raw-ref  bench/raw-ref.c, the raw-ioctl floor (same guest, same RAM)
Then, with --linux, the tier-A Linux guest (1 vCPU, 128 MiB) idling at its shell under
each Ferrite: own anonymous memory (RssAnon minus resident guest RAM, which `ferrite
stat` counts with mincore) and file-backed RSS (the binary's text, shared by all VMs).
usage: bench/uss.py [N] [--linux]   (default N = 10)
"""
import os
import statistics
import subprocess
import sys
import json
import tempfile
import time

import tier_a

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "target", "bench")
GUESTS = os.path.join(ROOT, "target", "guests")
FERRITE = os.path.join(ROOT, "target", "x86_64-unknown-linux-gnu", "release", "ferrite")
SETTLE_S = 2.0


def sh(*cmd):
    subprocess.run(cmd, check=True, cwd=ROOT)


def build():
    os.makedirs(OUT, exist_ok=True)
    sh("cargo", "build", "--release", "--quiet")
    sh("bash", "tests/guests/build-asm.sh", GUESTS)
    sh("cc", "-O2", "-Wall", "-o", os.path.join(OUT, "raw-ref"), "bench/raw-ref.c")


def figures(pid):
    kb = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                kb[parts[0].rstrip(":")] = int(parts[1])
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                kb["VmHWM"] = int(line.split()[1])
    return kb["Private_Clean"] + kb["Private_Dirty"], kb["Private_Dirty"], kb["VmHWM"]


def measure(cmd, n):
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(n)]
    try:
        time.sleep(SETTLE_S)
        for p in procs:
            if p.poll() is not None:
                sys.exit(f"{cmd} ended early with status {p.returncode}")
        rows = [figures(p.pid) for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
    return [statistics.median(r[i] for r in rows) for i in range(3)]


def linux_idle(ferrite, kernel, initrd):
    """(own anonymous KiB, file-backed KiB) of `ferrite` with the tier-A guest idle."""
    with tempfile.TemporaryDirectory(prefix="ferrite-uss-") as rundir:
        os.chmod(rundir, 0o700)
        env = dict(os.environ, FERRITE_RUN_DIR=rundir)
        cmd = [ferrite, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "128",
               "--name", "idle", "--cmdline", "console=ttyS0 reboot=k panic=-1"]
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
        try:
            tier_a.read_until(p, b"FERRITE-USERSPACE", 300)
            time.sleep(SETTLE_S)
            out = subprocess.run([ferrite, "stat", "idle", "--json"], env=env, check=True,
                                 stdout=subprocess.PIPE).stdout
            guest = json.loads(out)["memory"]["guest_rss"] // 1024
            kb = {}
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in ("RssAnon", "RssFile"):
                        kb[k] = int(v.split()[0])
            return kb["RssAnon"] - guest, kb["RssFile"]
        finally:
            p.kill()
            p.wait()


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 10
    build()
    img = os.path.join(GUESTS, "echo.bin")
    vmms = {"ferrite": [FERRITE, "run", "--kernel", img, "--mem", "16M"]}
    base = os.environ.get("FERRITE_BASE")
    if base:
        vmms["base"] = [base, "run", "--kernel", img, "--mem", "16M"]
    vmms["raw-ref"] = [os.path.join(OUT, "raw-ref"), img, "16"]
    res = {v: measure(cmd, n) for v, cmd in vmms.items()}
    print(f"\nPer-VM memory, {n} VMs of echo.bin (16 MiB) at once, medians (KiB)\n")
    print(f"{'vmm':10} {'USS':>8} {'priv dirty':>11} {'peak RSS':>9}")
    for v, (uss, dirty, hwm) in res.items():
        print(f"{v:10} {uss:8.0f} {dirty:11.0f} {hwm:9.0f}")
    if "--linux" in sys.argv:
        kernel, initrd = tier_a.kernel()
        print("\nTier-A Linux guest idle at its shell (1 vCPU, 128 MiB), KiB\n")
        print(f"{'vmm':10} {'own anon':>9} {'file-backed':>12}")
        for v, ferrite in [("ferrite", FERRITE)] + ([("base", base)] if base else []):
            anon, file_kb = linux_idle(ferrite, kernel, initrd)
            print(f"{v:10} {anon:9} {file_kb:12}")


if __name__ == "__main__":
    main()
