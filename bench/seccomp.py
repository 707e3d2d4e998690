#!/usr/bin/env python3
"""Seccomp's cost: Ferrite with its per-thread filters on vs --no-seccomp, interleaved.

Workloads (flat real-mode guests from tests/guests/asm/flat, 16 MiB of RAM, release build):
  empty  exit-code.bin: stops at once (start -> stop of the whole process)
  pio    pio-loop.bin:  100,000 PIO exits
Each round runs both workloads with the filters on and off, alternating which goes
first; the empty guest runs EMPTY_PER_ROUND times per round (it is short and noisy).
Per-exit cost is (median pio time - median empty time) / 100,000. The ratio column
is the median of the pair-by-pair ratios (on / off) of runs made next to each other.
Then the number of syscalls each thread kind's filter allows (`ferrite
seccomp-policy`) beside Firecracker v1.16.1's x86_64 filters (distinct syscalls).
usage: bench/seccomp.py [ROUNDS] [FIRECRACKER_FILTER_JSON]
"""
import json
import os
import statistics
import subprocess
import sys

import spawner
from spawner import sh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
OUT = os.path.join(TARGET, "bench")
GUESTS = os.path.join(TARGET, "guests")
EXITS = 100_000
MEM_MIB = 16
EMPTY_PER_ROUND = 4
FC_FILTER = "/work/fc/src/resources/seccomp/x86_64-unknown-linux-musl.json"


def build():
    os.makedirs(OUT, exist_ok=True)
    sh("cargo", "build", "--release", "--quiet")
    sh("bash", "tests/guests/build-asm.sh", GUESTS)
    spawner.build(OUT)


def measure(cmd, expect):
    return spawner.measure(OUT, cmd, expect)


def spread(xs):
    """min / median / max, in the unit given."""
    return f"{min(xs):8.3f} {statistics.median(xs):8.3f} {max(xs):8.3f}"


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    fc_filter = sys.argv[2] if len(sys.argv) > 2 else FC_FILTER
    build()
    ferrite = os.path.join(TARGET, "x86_64-unknown-linux-gnu", "release", "ferrite")
    work = {"empty": ("exit-code.bin", 74), "pio": ("pio-loop.bin", 48)}
    variants = {"on": [], "off": ["--no-seccomp"]}

    def cmd(v, img):
        return [ferrite, "run", "--kernel", os.path.join(GUESTS, img), "--mem", f"{MEM_MIB}M",
                "--debug-exit"] + variants[v]

    res = {(v, w): [] for v in variants for w in work}
    pairs = {w: [] for w in work}
    for r in range(rounds):
        order = ["on", "off"] if r % 2 == 0 else ["off", "on"]
        for w, (img, expect) in work.items():
            for _ in range(EMPTY_PER_ROUND if w == "empty" else 1):
                got = {}
                for v in order:
                    got[v] = measure(cmd(v, img), expect)
                    res[(v, w)].append(got[v])
                pairs[w].append(got["on"][0] / got["off"][0])

    def walls(v, w):
        return [x[0] for x in res[(v, w)]]

    def med(v, w):
        return statistics.median(walls(v, w))

    n_empty = rounds * EMPTY_PER_ROUND
    print(f"\nSeccomp filters on vs --no-seccomp: {rounds} interleaved rounds "
          f"({n_empty} empty-guest pairs, {rounds} PIO-loop pairs), {MEM_MIB} MiB guest\n")
    print(f"{'metric':34} {'on (min/med/max)':>26} {'off (min/med/max)':>26} {'on/off':>8}")
    for w, label in (("empty", "empty guest start->stop (ms)"), ("pio", "100k-PIO guest start->stop (ms)")):
        on = [x * 1e3 for x in walls("on", w)]
        off = [x * 1e3 for x in walls("off", w)]
        print(f"{label:34} {spread(on):>26} {spread(off):>26} {statistics.median(pairs[w]):8.3f}")
    per = {v: (med(v, "pio") - med(v, "empty")) / EXITS * 1e6 for v in variants}
    print(f"{'PIO per-exit wall (us, medians)':34} {per['on']:26.3f} {per['off']:26.3f} "
          f"{per['on'] / per['off']:8.3f}")
    user = {v: (statistics.median(x[2] for x in res[(v, 'pio')])
                - statistics.median(x[2] for x in res[(v, 'empty')])) / EXITS * 1e9 for v in variants}
    ratio = f"{user['on'] / user['off']:8.3f}" if user["off"] > 0 else "     n/a"
    print(f"{'PIO per-exit user CPU (ns)':34} {user['on']:26.1f} {user['off']:26.1f} {ratio}")

    policy = subprocess.run([ferrite, "seccomp-policy"], check=True, stdout=subprocess.PIPE,
                            text=True).stdout
    ours = {l.split()[0]: int(l.split()[1]) for l in policy.splitlines() if l.strip()}
    theirs = {}
    try:
        with open(fc_filter) as f:
            for k, v in json.load(f).items():
                theirs[k] = len({e["syscall"] for e in v["filter"]})
    except OSError as e:
        print(f"\n(Firecracker's filter file {fc_filter}: {e})")
    print("\nSyscalls allowed per thread kind (distinct; argument-filtered ones counted once)")
    print("  Ferrite:     " + ", ".join(f"{k} {n}" for k, n in ours.items()))
    if theirs:
        print("  Firecracker: " + ", ".join(f"{k} {n}" for k, n in theirs.items())
              + "  (v1.16.1, x86_64-unknown-linux-musl.json)")
    print("  (Ferrite's loop thread is also its API thread; Firecracker's vmm thread runs its devices)")


if __name__ == "__main__":
    main()
