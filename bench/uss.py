#!/usr/bin/env python3
"""Per-VM private memory: what decides how many VMs fit on a host.

N copies of the same tiny guest (echo.bin, a flat real-mode program polling the UART,
16 MiB of RAM) run at once under each VMM; for each process, USS = Private_Clean +
Private_Dirty of /proc/PID/smaps_rollup (the binary's text is shared by all N, so it
drops out), and peak RSS (VmHWM). Medians over the N, side by side:
  ferrite  this tree's release build
  base     another Ferrite binary, if FERRITE_BASE=PATH is set (e.g. a build of main)
  raw-ref  bench/raw-ref.c, the raw-ioctl floor (same guest, same RAM)
usage: bench/uss.py [N]   (default 10)
"""
import os
import statistics
import subprocess
import sys
import time

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


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
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


if __name__ == "__main__":
    main()
