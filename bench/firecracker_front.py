#!/usr/bin/env python3
"""Ferrite's Firecracker-compatible front door vs Firecracker itself, driven the same
way (a binary named `firecracker`, its REST API on a UNIX socket), interleaved in one
run on the same tier-A kernel and initrd, 1 vCPU, 128 MiB:

  (a) process start -> API socket answering `GET /` with 200: wall ms, and the
      process's CPU ms at that moment (utime+stime of /proc/PID/stat, in clock ticks
      of 10 ms; and the sum of /proc/PID/task/*/schedstat run times, in ns, which
      resolves what the ticks cannot). Firecracker's spec asks <= 8 CPU ms.
  (b) `PUT /actions InstanceStart` -> FERRITE-USERSPACE on the console (the guest
      is configured through PUT /machine-config and PUT /boot-source first).
  (c) memory while the guest idles at its shell: VmRSS and RssAnon of
      /proc/PID/status (guest RAM the guest touched is in both).

Ferrite runs as `firecracker` through a symlink of that name to its release build
(as a host's PATH would have it). If Ferrite does not have the front door yet (the
link does not answer `--version` in Firecracker's form), only Firecracker is
measured and the script says so.

usage: [FIRECRACKER=/path] [FERRITE=/path] bench/firecracker_front.py [ROUNDS]
FIRECRACKER defaults to /work/fc/target/x86_64-unknown-linux-gnu/release/firecracker;
FERRITE defaults to a release build of this tree (CARGO_TARGET_DIR honoured).
"""
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import tier_a
from boot_firecracker import ferrite_binary
from tier_a import read_until

DEFAULT_FC = "/work/fc/target/x86_64-unknown-linux-gnu/release/firecracker"
MEM_MIB = 128
VCPUS = 1
CMDLINE = "console=ttyS0 reboot=k panic=-1"
SOCKET_TIMEOUT = 5.0
BOOT_TIMEOUT = 300
SETTLE_S = 2.0
TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def http(sock, method, path, body=None, timeout=10.0):
    """One request on a fresh connection: (status, body text)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock)
        req = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
        if body is not None:
            data = json.dumps(body) + "\n"
            req += (f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                    f"\r\n{data}")
        else:
            req += "\r\n"
        s.sendall(req.encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError(f"{method} {path}: connection closed")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip())
        while len(rest) < length:
            chunk = s.recv(4096)
            if not chunk:
                break
            rest += chunk
        return status, rest[:length].decode(errors="replace")
    finally:
        s.close()


def cpu_ms(pid):
    """(utime+stime ms from /proc/PID/stat, run time ms summed over its threads'
    schedstat)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may contain spaces: fields after the closing parenthesis.
        fields = f.read().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return ticks * TICK_MS, ns / 1e6


def status_kib(pid, keys=("VmRSS", "RssAnon")):
    kb = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                kb[k] = int(v.split()[0])
    return kb


def one(binary, kernel, initrd):
    """One VM through the API: dict of figures."""
    with tempfile.TemporaryDirectory(prefix="ferrite-bench-fcfront-") as tmp:
        sock = os.path.join(tmp, "api.sock")
        t0 = time.perf_counter()
        p = subprocess.Popen([binary, "--api-sock", sock, "--id", "bench"], cwd=tmp,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        try:
            # (a) start -> GET / answered with 200.
            while True:
                if p.poll() is not None:
                    out = p.stdout.read().decode(errors="replace")
                    raise RuntimeError(f"{binary} exited {p.returncode} before its API "
                                       f"socket answered:\n{out[-2000:]}")
                if time.perf_counter() - t0 > SOCKET_TIMEOUT:
                    raise RuntimeError(f"{binary}: no API socket within {SOCKET_TIMEOUT}s")
                try:
                    status, body = http(sock, "GET", "/")
                except (FileNotFoundError, ConnectionRefusedError):
                    time.sleep(0.0005)
                    continue
                break
            api_ms = (time.perf_counter() - t0) * 1000
            api_cpu_ticks_ms, api_cpu_ms = cpu_ms(p.pid)
            if status != 200 or json.loads(body).get("state") != "Not started":
                raise RuntimeError(f"{binary}: GET / answered {status} {body}")
            # (b) configure, InstanceStart -> userspace marker.
            for path, body in (("/machine-config", {"vcpu_count": VCPUS,
                                                    "mem_size_mib": MEM_MIB}),
                               ("/boot-source", {"kernel_image_path": kernel,
                                                 "initrd_path": initrd,
                                                 "boot_args": CMDLINE})):
                status, text = http(sock, "PUT", path, body)
                if status != 204:
                    raise RuntimeError(f"{binary}: PUT {path} answered {status} {text}")
            t1 = time.perf_counter()
            status, text = http(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
            if status != 204:
                raise RuntimeError(f"{binary}: InstanceStart answered {status} {text}")
            buf = read_until(p, b"FERRITE-USERSPACE", BOOT_TIMEOUT)
            userspace_s = time.perf_counter() - t1
            # (c) memory at the idle shell.
            read_until(p, b"/ # ", BOOT_TIMEOUT, buf)
            time.sleep(SETTLE_S)
            kb = status_kib(p.pid)
            return {"api_ms": api_ms, "api_cpu_ms": api_cpu_ms,
                    "api_cpu_ticks_ms": api_cpu_ticks_ms, "userspace_s": userspace_s,
                    "rss_mib": kb["VmRSS"] / 1024, "anon_mib": kb["RssAnon"] / 1024}
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()


def ferrite_as_firecracker(tmpdir):
    """A `firecracker` symlink to Ferrite's release build, or None (with the reason
    printed) if that binary has no Firecracker front door yet."""
    ferrite = ferrite_binary()
    link = os.path.join(tmpdir, "firecracker")
    os.symlink(ferrite, link)
    r = subprocess.run([link, "--version"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = (r.stdout.decode(errors="replace").splitlines() or [""])[0]
    if r.returncode != 0 or not first.startswith("Firecracker v"):
        print(f"Ferrite's Firecracker front door is not there: {ferrite} started as "
              f"`firecracker --version` exited {r.returncode} with {first!r} (expected "
              f"'Firecracker vX.Y.Z'); measuring Firecracker only", file=sys.stderr)
        return None
    return link


ROWS = [("api_ms", "start -> API answering, wall ms", "{:.1f}"),
        ("api_cpu_ms", "  CPU ms then (schedstat)", "{:.2f}"),
        ("api_cpu_ticks_ms", "  CPU ms then (stat ticks)", "{:.0f}"),
        ("userspace_s", "InstanceStart -> userspace, s", "{:.2f}"),
        ("rss_mib", "idle shell VmRSS, MiB", "{:.1f}"),
        ("anon_mib", "idle shell RssAnon, MiB", "{:.1f}")]


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    kernel, initrd = tier_a.kernel()
    tmp = tempfile.TemporaryDirectory(prefix="ferrite-bench-fclink-")
    vmms = {}
    link = ferrite_as_firecracker(tmp.name)
    if link:
        vmms["ferrite"] = link
    fc = os.environ.get("FIRECRACKER", DEFAULT_FC)
    if os.access(fc, os.X_OK):
        vmms["firecracker"] = fc
    else:
        print(f"no Firecracker at {fc} (set FIRECRACKER=/path/to/firecracker)",
              file=sys.stderr)
    if not vmms:
        sys.exit("nothing to measure")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
          flush=True)
    res = {v: [] for v in vmms}
    for r in range(rounds):
        order = list(vmms) if r % 2 == 0 else list(reversed(list(vmms)))
        for v in order:
            if v not in vmms:
                continue
            try:
                f = one(vmms[v], kernel, initrd)
            except (RuntimeError, OSError) as e:
                if v != "ferrite" or len(vmms) == 1:
                    sys.exit(f"round {r + 1}, {v}: {e}")
                # The front door answers --version but not yet the whole sequence.
                print(f"round {r + 1}: Ferrite as firecracker failed, measuring "
                      f"Firecracker only from here: {e}", file=sys.stderr, flush=True)
                del vmms[v], res[v]
                continue
            res[v].append(f)
            print(f"round {r + 1}: {v:12} API {f['api_ms']:6.1f} ms "
                  f"({f['api_cpu_ms']:5.2f} CPU ms)  userspace {f['userspace_s']:6.2f} s  "
                  f"VmRSS {f['rss_mib']:6.1f} MiB  RssAnon {f['anon_mib']:6.1f} MiB  "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
    names = list(vmms)
    print(f"\n{VCPUS} vCPU, {MEM_MIB} MiB, tier-A guest, {rounds} interleaved rounds: "
          f"median (min-max)")
    header = f"{'':34}" + "".join(f"{n:>24}" for n in names)
    if len(names) == 2:
        header += f"{names[0] + '/' + names[1]:>24}"
    print(header)
    for key, label, fmt in ROWS:
        line = f"{label:34}"
        meds = []
        for n in names:
            xs = [f[key] for f in res[n]]
            med = statistics.median(xs)
            meds.append(med)
            cell = f"{fmt.format(med)} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"
            line += f"{cell:>24}"
        if len(meds) == 2:
            # Tick-based CPU time is often 0 at this point: no ratio then.
            line += f"{meds[0] / meds[1]:>24.3f}" if meds[1] else f"{'-':>24}"
        print(line)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
