#!/usr/bin/env python3
"""Ferrite's memory figures, in one run:

1. Own memory overhead: a tier-A Linux guest (1 vCPU, 128 MiB) with a disk, a
   virtio-net device on a TAP, virtio-rng and the balloon is booted to userspace;
   `ferrite stat --json` then gives the process RSS, the resident guest RAM and their
   difference (Ferrite's own memory). The same without devices, for comparison.
   Targets: <= 3 MiB (Firecracker publishes <= 5 MiB for its own overhead).
2. Start-up cost of the memory options: a tiny guest that stops at once
   (exit-code.bin), start -> stop with 1 GiB of RAM, and a tier-A boot to userspace
   with 256 MiB, for the default, --mem-prealloc, --hugepages=thp and --hugepages
   (hugetlbfs: 2 MiB pages are reserved for the run and released afterwards; needs
   root). Interleaved rounds, medians.
usage: bench/memory.py [ROUNDS]   (needs root for the TAP and huge pages)
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import tier_a
from tier_a import FERRITE, ROOT, read_until
GUESTS = os.path.join(ROOT, "target", "guests")
MARK = b"FERRITE-USERSPACE"
TIMEOUT = 300
TAP = "frbench0"
HUGEPAGES = "/proc/sys/vm/nr_hugepages"


def linux_cmd(kernel, initrd, mem, extra, test="", name=None):
    cmd = [FERRITE, "run", "--kernel", kernel, "--initrd", initrd, "--mem", str(mem),
           "--cmdline", f"console=ttyS0 reboot=k panic=-1 {test}".strip()] + extra
    if name:
        cmd += ["--name", name]
    return cmd


def overhead(kernel, initrd, rundir):
    env = dict(os.environ, FERRITE_RUN_DIR=rundir)
    disk = os.path.join(rundir, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["ip", "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"], check=True)
    try:
        results = {}
        for label, extra in [
            ("no devices", []),
            ("disk+net+rng+balloon", ["--disk", disk, "--net", f"tap={TAP}", "--rng", "--balloon"]),
        ]:
            # No ferrite.test: the guest sits in its shell, idle.
            p = subprocess.Popen(linux_cmd(kernel, initrd, 128, extra, name="ovh"), env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL)
            try:
                read_until(p, MARK, TIMEOUT)
                time.sleep(2)
                out = subprocess.run([FERRITE, "stat", "ovh", "--json"], env=env, check=True,
                                     stdout=subprocess.PIPE).stdout
                results[label] = json.loads(out)["memory"]
            finally:
                p.kill()
                p.wait()
        return results
    finally:
        subprocess.run(["ip", "link", "del", TAP], check=False)


def startup(kernel, initrd, rounds):
    options = {
        "default": [],
        "--mem-prealloc": ["--mem-prealloc"],
        "--hugepages=thp": ["--hugepages=thp"],
        "--hugepages": ["--hugepages"],
    }
    tiny = {o: [] for o in options}
    boot = {o: [] for o in options}
    exit_code = os.path.join(GUESTS, "exit-code.bin")
    for r in range(rounds):
        order = list(options) if r % 2 == 0 else list(reversed(list(options)))
        for o in order:
            t0 = time.perf_counter()
            subprocess.run([FERRITE, "run", "--kernel", exit_code, "--mem", "1G"] + options[o],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            tiny[o].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            p = subprocess.Popen(linux_cmd(kernel, initrd, 256, options[o], "ferrite.test=reboot"),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL)
            try:
                read_until(p, MARK, TIMEOUT)
                boot[o].append(time.perf_counter() - t0)
            finally:
                p.kill()
                p.wait()
            print(f"round {r + 1}: {o:16} tiny 1 GiB {tiny[o][-1] * 1e3:8.2f} ms   "
                  f"tier-A 256 MiB {boot[o][-1]:6.2f} s", flush=True)
    return tiny, boot


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    subprocess.run(["cargo", "build", "--release", "--quiet"], check=True, cwd=ROOT)
    subprocess.run(["bash", "tests/guests/build-asm.sh", GUESTS], check=True, cwd=ROOT)
    kernel, initrd = tier_a.kernel()
    with open(HUGEPAGES) as f:
        saved = f.read().strip()
    with tempfile.TemporaryDirectory(prefix="ferrite-bench-mem-") as rundir:
        ovh = overhead(kernel, initrd, rundir)
        # 1 GiB tiny guest + 256 MiB tier-A guest, one at a time.
        with open(HUGEPAGES, "w") as f:
            f.write(str(int(saved) + 512 + 16))
        try:
            tiny, boot = startup(kernel, initrd, rounds)
        finally:
            with open(HUGEPAGES, "w") as f:
                f.write(saved)

    mib = lambda b: b / (1 << 20)
    print("\nFerrite's own memory (process RSS - resident guest RAM), tier-A guest at userspace,"
          " 1 vCPU, 128 MiB:")
    for label, m in ovh.items():
        print(f"  {label:22} own {mib(m['vmm_rss']):5.2f} MiB   process RSS "
              f"{mib(m['process_rss']):6.2f} MiB   guest resident {mib(m['guest_rss']):6.2f} MiB")
    print("  target <= 3 MiB; Firecracker publishes <= 5 MiB")
    print(f"\nstart-up by memory option, medians of {rounds} interleaved rounds")
    base_t, base_b = statistics.median(tiny["default"]), statistics.median(boot["default"])
    for o in tiny:
        t, b = statistics.median(tiny[o]), statistics.median(boot[o])
        print(f"  {o:16} tiny 1 GiB start->stop {t * 1e3:8.2f} ms ({t / base_t:5.2f}x)   "
              f"tier-A 256 MiB to userspace {b:6.2f} s ({b / base_b:5.3f}x)")


if __name__ == "__main__":
    main()
