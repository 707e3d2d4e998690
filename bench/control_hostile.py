#!/usr/bin/env python3
"""Hostile control-socket clients against a running VM (issue 13, defects 5 and 6):

1. RSS under a client that pipelines `GET /vm/stats` for SECONDS (default 60) and
   never reads an answer. The client writes only while less than 16 KiB of its
   requests wait unread in the socket, so the server reads them in small pieces (a
   burst of more than 80 KiB would just be refused with one 413). When Ferrite drops
   it, it connects again at once and goes on, as a hostile client would. Ferrite's
   VmRSS is sampled every second; the run stops early past 3 GiB.
2. `ferrite stop --hard NAME` with MAX_CLIENTS (64, or --idle N) idle connections
   open: its status and how long it took.

usage: bench/control_hostile.py [--ferrite PATH] [--guest ELF] [--cpus N] [--seconds S]
                                [--idle N]
Default binary: target/x86_64-unknown-linux-gnu/release/ferrite of this tree; run it
also with the binary of an older build for a before/after comparison.
"""
import argparse
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import termios
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRITE = os.path.join(ROOT, "target", "x86_64-unknown-linux-gnu", "release", "ferrite")
GUEST = os.path.join(ROOT, "target", "guests", "counter.elf")
MAX_CLIENTS = 64
RSS_CAP_KIB = 3 << 20
ONE = b"GET /vm/stats HTTP/1.1\r\nHost: x\r\n\r\n"
REQ = ONE * 16


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def unread(sock):
    """Bytes written to `sock` that the peer has not read (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    return s


def start(ferrite, guest, cpus, rundir, name):
    env = dict(os.environ, FERRITE_RUN_DIR=rundir)
    p = subprocess.Popen([ferrite, "run", "--kernel", guest, "--mem", "16M", "--cpus",
                          str(cpus), "--name", name], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock = os.path.join(rundir, name + ".sock")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 20:
        try:
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(sock)
            return p, sock, env
        except OSError:
            time.sleep(0.02)
    p.kill()
    raise SystemExit(f"{ferrite}: no control socket {sock}")


def end(p, ferrite, env, name):
    subprocess.run([ferrite, "stop", name, "--hard"], env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=30)
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def pipelining(ferrite, guest, cpus, seconds, rundir):
    p, sock, env = start(ferrite, guest, cpus, rundir, "pipe")
    try:
        before = rss_kib(p.pid)
        s = connect(sock)
        sent = drops = 0
        peak = before
        t0 = time.monotonic()
        next_sample = t0 + 1
        samples = []
        while time.monotonic() - t0 < seconds:
            try:
                if unread(s) > 16 * 1024:
                    time.sleep(0.001)
                else:
                    sent += s.send(REQ)
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                drops += 1
                s.close()
                s = connect(sock)
            now = time.monotonic()
            if now >= next_sample:
                r = rss_kib(p.pid)
                peak = max(peak, r)
                samples.append((round(now - t0), r))
                next_sample += 1
                if r > RSS_CAP_KIB:
                    print(f"  RSS above {RSS_CAP_KIB >> 10} MiB after {now - t0:.0f} s; stopping")
                    break
        elapsed = time.monotonic() - t0
        after = rss_kib(p.pid)
        s.close()
        every10 = ", ".join(f"{t}s {r >> 10} MiB" for t, r in samples if t % 10 == 0)
        print(f"  pipelining GET /vm/stats without reading, {elapsed:.0f} s, {cpus} vCPU(s):")
        print(f"  RSS before {before} kB, peak {peak} kB, at the end {after} kB; "
              f"{sent} bytes of requests taken ({sent // len(ONE)} requests), "
              f"dropped {drops} times")
        print(f"  RSS over time: {every10}")
        return peak - before
    finally:
        end(p, ferrite, env, "pipe")


def stop_with_idle_clients(ferrite, guest, cpus, rundir, n):
    p, sock, env = start(ferrite, guest, cpus, rundir, "held")
    idle = []
    try:
        # MAX_CLIENTS connections the server holds open: one it closed (it may have
        # counted the start-up probe still) is replaced.
        for _ in range(20 if n <= MAX_CLIENTS else 1):
            while len(idle) < n:
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.connect(sock)
                idle.append(c)
            time.sleep(0.3)
            alive = []
            for c in idle:
                try:
                    c.setblocking(False)
                    c.recv(1)
                    c.close()  # EOF: closed by the server
                except BlockingIOError:
                    alive.append(c)
                except OSError:
                    c.close()
            idle = alive
            if len(idle) == n or n > MAX_CLIENTS:
                break
        t0 = time.monotonic()
        r = subprocess.run([ferrite, "stop", "held", "--hard"], env=env, capture_output=True,
                           text=True, timeout=60)
        took = time.monotonic() - t0
        try:
            p.wait(timeout=15)
            exited = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            exited = None
        what = (r.stdout or r.stderr).strip().splitlines()[-1:] or [""]
        ended = f"VM ended after {exited:.2f} s" if exited is not None else "VM still running"
        print(f"  ferrite stop --hard with {n} idle connections ({len(idle)} held open): "
              f"status {r.returncode} "
              f"in {took:.2f} s ({what[0]}); {ended}")
    finally:
        for c in idle:
            c.close()
        if p.poll() is None:
            end(p, ferrite, env, "held")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferrite", default=FERRITE)
    ap.add_argument("--guest", default=GUEST)
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--idle", type=int, default=MAX_CLIENTS,
                    help="idle connections open during the stop (default 64)")
    a = ap.parse_args()
    rundir = tempfile.mkdtemp(prefix="ferrite-bench-ctl-")
    try:
        print(f"{a.ferrite}")
        pipelining(a.ferrite, a.guest, a.cpus, a.seconds, rundir)
        stop_with_idle_clients(a.ferrite, a.guest, a.cpus, rundir, a.idle)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


if __name__ == "__main__":
    main()
