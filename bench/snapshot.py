#!/usr/bin/env python3
"""Snapshot and restore: Ferrite vs Firecracker in one run, both driven through the
same Firecracker API (Ferrite as a `firecracker` link to its release build), the same
tier-A kernel and initramfs, 1 vCPU, 128 MiB, serial console on stdin/stdout.

Once per VMM: boot to the shell, `PATCH /vm Paused`, `PUT /snapshot/create` (Full)
-> create ms, state and memory file sizes (apparent and allocated). Then ROUNDS
interleaved restores per VMM, each a new process:

  load           `PUT /snapshot/load` (File backend, resume_vm) request -> 204, ms
  spawn->answer  process spawn -> the restored shell echoes a typed line, ms
  RSS            the VMM's VmRSS once the shell answered, MiB

usage: [FIRECRACKER=/path] [FERRITE=/path] bench/snapshot.py [ROUNDS]
FIRECRACKER defaults to /work/fc/target/x86_64-unknown-linux-gnu/release/firecracker
(skipped with a note if absent); FERRITE to a release build of this tree.
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time

import tier_a
from firecracker_front import ferrite_as_firecracker, http, status_kib
from tier_a import read_until

DEFAULT_FC = "/work/fc/target/x86_64-unknown-linux-gnu/release/firecracker"
MEM_MIB = 128
CMDLINE = "console=ttyS0 reboot=k panic=-1"
BOOT_TIMEOUT = 300
ANSWER_TIMEOUT = 60


def spawn(binary, tmp, name):
    """(process, API socket path, spawn time) once the API socket exists."""
    api = os.path.join(tmp, f"{name}.sock")
    t0 = time.perf_counter()
    p = subprocess.Popen([binary, "--api-sock", api, "--id", name], cwd=tmp,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    while not os.path.exists(api):
        if time.perf_counter() - t0 > 5 or p.poll() is not None:
            p.kill()
            raise RuntimeError(f"{binary}: no API socket")
        time.sleep(0.0005)
    return p, api, t0


def put(api, path, body, method="PUT"):
    status, text = http(api, method, path, body, timeout=120)
    if status != 204:
        raise RuntimeError(f"{method} {path} answered {status}: {text}")


def stop(p):
    if p.poll() is None:
        p.kill()
    p.wait()


def make_snapshot(binary, kernel, initrd, tmp):
    """Boots, pauses and snapshots: (state path, memory path, create ms)."""
    p, api, _ = spawn(binary, tmp, "boot")
    try:
        put(api, "/machine-config", {"vcpu_count": 1, "mem_size_mib": MEM_MIB})
        put(api, "/boot-source", {"kernel_image_path": kernel, "initrd_path": initrd,
                                  "boot_args": CMDLINE})
        put(api, "/actions", {"action_type": "InstanceStart"})
        read_until(p, b"/ # ", BOOT_TIMEOUT)
        time.sleep(1.0)  # the shell settles at its prompt
        put(api, "/vm", {"state": "Paused"}, method="PATCH")
        state, mem = os.path.join(tmp, "state"), os.path.join(tmp, "memory")
        t = time.perf_counter()
        put(api, "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": state,
                                      "mem_file_path": mem})
        return state, mem, (time.perf_counter() - t) * 1000
    finally:
        stop(p)


def restore(binary, tmp, state, mem, i):
    """One restore in a new process: dict of figures."""
    p, api, t0 = spawn(binary, tmp, f"r{i}")
    try:
        t1 = time.perf_counter()
        put(api, "/snapshot/load", {"snapshot_path": state,
                                    "mem_backend": {"backend_type": "File",
                                                    "backend_path": mem},
                                    "resume_vm": True})
        t2 = time.perf_counter()
        mark = f"R{i}X{os.getpid()}"
        p.stdin.write(f"echo {mark[:2]}\"\"{mark[2:]}\n".encode())
        p.stdin.flush()
        read_until(p, mark.encode(), ANSWER_TIMEOUT)
        t3 = time.perf_counter()
        kb = status_kib(p.pid)
        return {"load_ms": (t2 - t1) * 1000, "answer_ms": (t3 - t0) * 1000,
                "rss_mib": kb["VmRSS"] / 1024}
    finally:
        stop(p)


def sizes(path):
    st = os.stat(path)
    return st.st_size / 2**20, st.st_blocks * 512 / 2**20


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    kernel, initrd = tier_a.kernel()
    links = tempfile.TemporaryDirectory(prefix="ferrite-bench-snap-")
    vmms = {}
    link = ferrite_as_firecracker(links.name)
    if link:
        vmms["ferrite"] = link
    fc = os.environ.get("FIRECRACKER", DEFAULT_FC)
    if os.path.exists(fc):
        vmms["firecracker"] = fc
    else:
        print(f"no Firecracker at {fc}: measuring Ferrite only", file=sys.stderr)
    dirs, snaps, rows = {}, {}, {k: [] for k in vmms}
    for kind, binary in vmms.items():
        dirs[kind] = tempfile.TemporaryDirectory(prefix=f"ferrite-bench-snap-{kind}-")
        snaps[kind] = make_snapshot(binary, kernel, initrd, dirs[kind].name)
        print(f"{kind}: snapshot made in {snaps[kind][2]:.0f} ms", file=sys.stderr)
    for i in range(rounds):
        for kind, binary in vmms.items():
            state, mem, _ = snaps[kind]
            rows[kind].append(restore(binary, dirs[kind].name, state, mem, i))
    print(f"snapshot/restore, tier-A guest, 1 vCPU, {MEM_MIB} MiB, {rounds} interleaved "
          f"restores each (median [min-max])")
    names = list(vmms)
    print(f"{'':34}" + "".join(f"{n:>26}" for n in names))

    def line(label, values):
        print(f"{label:34}" + "".join(f"{v:>26}" for v in values))

    line("create (Full), ms", [f"{snaps[n][2]:.0f}" for n in names])
    line("state file, KiB", [f"{os.path.getsize(snaps[n][0]) / 1024:.1f}" for n in names])
    line("memory file MiB, size/allocated",
         ["{:.0f} / {:.1f}".format(*sizes(snaps[n][1])) for n in names])
    for key, label, fmt in (("load_ms", "PUT /snapshot/load -> 204, ms", "{:.1f}"),
                            ("answer_ms", "spawn -> restored shell answers, ms", "{:.0f}"),
                            ("rss_mib", "VmRSS after the answer, MiB", "{:.1f}")):
        vals = []
        for n in names:
            xs = [r[key] for r in rows[n]]
            vals.append(f"{fmt.format(statistics.median(xs))} "
                        f"[{fmt.format(min(xs))}-{fmt.format(max(xs))}]")
        line(label, vals)


if __name__ == "__main__":
    main()
