#!/usr/bin/env python3
"""Ferrite vs the raw-ioctl floor (bench/raw-ref.c), interleaved in one run.

Workloads (flat real-mode guests from tests/guests/asm/flat, 16 MiB of RAM):
  empty  exit-code.bin: stops at once (start -> stop of the whole process)
  pio    pio-loop.bin:  100,000 PIO exits
  mmio   mmio-loop.bin: 100,000 MMIO exits
For each, the median wall time and peak RSS over ROUNDS rounds (each round runs
every workload on both VMMs, alternating which goes first); per-exit cost is
(median loop time - median empty time) / 100,000.
usage: bench/run.py [ROUNDS]
"""
import os
import statistics
import sys
import time

import spawner
from spawner import sh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "target", "bench")
GUESTS = os.path.join(ROOT, "target", "guests")
EXITS = 100_000
MEM_MIB = 16


def build():
    os.makedirs(OUT, exist_ok=True)
    sh("cargo", "build", "--release", "--quiet")
    sh("bash", "tests/guests/build-asm.sh", GUESTS)
    sh("cc", "-O2", "-Wall", "-o", os.path.join(OUT, "raw-ref"), "bench/raw-ref.c")
    spawner.build(OUT)


def measure(cmd, expect):
    return spawner.measure(OUT, cmd, expect)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    build()
    ferrite = os.path.join(ROOT, "target", "x86_64-unknown-linux-gnu", "release", "ferrite")
    raw = os.path.join(OUT, "raw-ref")
    work = {"empty": ("exit-code.bin", 74), "pio": ("pio-loop.bin", 48), "mmio": ("mmio-loop.bin", 49)}
    vmms = {
        "ferrite": lambda img: [ferrite, "run", "--kernel", img, "--mem", f"{MEM_MIB}M", "--debug-exit"],
        "raw": lambda img: [raw, img, str(MEM_MIB)],
    }
    res = {(v, w): [] for v in vmms for w in work}
    for r in range(rounds):
        order = list(vmms) if r % 2 == 0 else list(reversed(list(vmms)))
        for w, (img, expect) in work.items():
            for v in order:
                res[(v, w)].append(measure(vmms[v](os.path.join(GUESTS, img)), expect))

    def med(v, w, i):
        return statistics.median(x[i] for x in res[(v, w)])

    print(f"\nFerrite vs raw-ioctl reference, {rounds} interleaved rounds, {MEM_MIB} MiB guest, medians\n")
    print(f"{'metric':34} {'ferrite':>12} {'raw-ref':>12} {'ratio':>8}")
    rows = []
    rows.append(("empty guest start->stop (ms)", med("ferrite", "empty", 0) * 1e3, med("raw", "empty", 0) * 1e3))
    for w in ("pio", "mmio"):
        f = (med("ferrite", w, 0) - med("ferrite", "empty", 0)) / EXITS * 1e6
        b = (med("raw", w, 0) - med("raw", "empty", 0)) / EXITS * 1e6
        rows.append((f"{w} per-exit wall (us)", f, b))
    for w in ("pio", "mmio"):
        f = (med("ferrite", w, 2) - med("ferrite", "empty", 2)) / EXITS * 1e9
        b = (med("raw", w, 2) - med("raw", "empty", 2)) / EXITS * 1e9
        rows.append((f"{w} per-exit user CPU (ns)", f, b))
    for w in work:
        rows.append((f"peak RSS {w} (KiB)", med("ferrite", w, 1), med("raw", w, 1)))
    floor = statistics.median(measure(["/bin/true"], 0)[1] for _ in range(3))
    # Per-exit wall is dominated by the host kernel (KVM); user CPU per exit is the
    # VMM's own share of each exit (clock-tick resolution: read it over many exits).
    for name, f, b in rows:
        ratio = f"{f / b:8.3f}" if b else "     n/a"
        print(f"{name:34} {f:12.3f} {b:12.3f} {ratio}")
    print(f"\n(peak RSS of /bin/true through the same spawner: {floor} KiB)")


if __name__ == "__main__":
    main()
