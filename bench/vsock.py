#!/usr/bin/env python3
"""virtio-vsock: Ferrite vs Firecracker in one run, on the same tier-A kernel and
initramfs (its /bin/vsock-test, see tests/guests/linux/vsock-test.c), 1 vCPU,
256 MiB, guest CID 3, the hybrid UNIX-socket host side of both:

  CONNECT->OK     host client connects to the uds, writes `CONNECT 5000\\n`, reads
                  `OK <port>\\n` (the guest's echo server accepts): median of 20, ms
  host->guest     one connection, BYTES written by the host to the guest's
                  `vsock-test sink`, until the guest closes after EOF: MiB/s
  guest->host     one connection, BYTES written by the guest's `vsock-test source`,
                  read by the host until EOF: MiB/s
  RSS             the VMM's VmRSS (/proc/PID/status) at the shell before, and with
                  64 open connections to the guest's echo server, MiB

Ferrite runs with its native CLI (`ferrite run ... --vsock cid=3,uds=PATH`),
Firecracker through its API (`PUT /vsock {"guest_cid":3,"uds_path":PATH}`). Both
consoles are the process's stdin/stdout; the guest is driven through its shell.

usage: [FIRECRACKER=/path] [FERRITE=/path] [BYTES_MIB=32] [VMMS=ferrite,firecracker]
       bench/vsock.py [ROUNDS]
FIRECRACKER defaults to /work/fc/target/x86_64-unknown-linux-gnu/release/firecracker
(skipped with a note if absent); FERRITE to a release build of this tree.
"""
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import tier_a
from boot_firecracker import ferrite_binary
from firecracker_front import http, status_kib
from tier_a import read_until

DEFAULT_FC = "/work/fc/target/x86_64-unknown-linux-gnu/release/firecracker"
MEM_MIB = 256
CMDLINE = "console=ttyS0 reboot=k panic=-1"
CID = 3
BOOT_TIMEOUT = 300
IO_TIMEOUT = 300
BYTES = int(os.environ.get("BYTES_MIB", "32")) << 20
LATENCY_SAMPLES = 20
OPEN_CONNS = 64


def host_connect(uds, port):
    """(socket after OK, seconds from connect() to the OK line)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(IO_TIMEOUT)
    t0 = time.perf_counter()
    s.connect(uds)
    s.sendall(f"CONNECT {port}\n".encode())
    line = b""
    while not line.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            raise RuntimeError(f"CONNECT {port}: closed without OK ({line!r})")
        line += b
    if not line.startswith(b"OK "):
        raise RuntimeError(f"CONNECT {port}: answered {line!r}")
    return s, time.perf_counter() - t0


class Vm:
    def __init__(self, kind, binary, kernel, initrd, tmp):
        self.uds = os.path.join(tmp, "v.sock")
        self.buf = b""
        self.mark = 0
        if kind == "ferrite":
            cmd = [binary, "run", "--kernel", kernel, "--initrd", initrd, "--mem",
                   str(MEM_MIB), "--cpus", "1", "--cmdline", CMDLINE, "--vsock",
                   f"cid={CID},uds={self.uds}"]
        else:
            api = os.path.join(tmp, "api.sock")
            cmd = [binary, "--api-sock", api, "--id", "bench"]
        self.p = subprocess.Popen(cmd, cwd=tmp, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if kind != "ferrite":
            t0 = time.monotonic()
            while not os.path.exists(api):
                if time.monotonic() - t0 > 5 or self.p.poll() is not None:
                    raise RuntimeError(f"{binary}: no API socket")
                time.sleep(0.001)
            for path, body in (("/machine-config", {"vcpu_count": 1,
                                                    "mem_size_mib": MEM_MIB}),
                               ("/boot-source", {"kernel_image_path": kernel,
                                                 "initrd_path": initrd,
                                                 "boot_args": CMDLINE}),
                               ("/vsock", {"guest_cid": CID, "uds_path": self.uds}),
                               ("/actions", {"action_type": "InstanceStart"})):
                status, text = http(api, "PUT", path, body)
                if status != 204:
                    raise RuntimeError(f"{binary}: PUT {path} answered {status} {text}")

    def wait(self, needle, timeout=BOOT_TIMEOUT):
        start = len(self.buf)
        self.buf = read_until(self.p, needle, timeout, self.buf)
        return self.buf[start:]

    def line_with(self, marker, timeout=IO_TIMEOUT):
        """The key=value words of the first complete console line holding `marker`
        since the last `type`."""
        t0 = time.monotonic()
        while True:
            idx = self.buf.find(marker, self.mark)
            if idx >= 0 and b"\n" in self.buf[idx:]:
                end = self.buf.index(b"\n", idx)
                line = self.buf[idx:end].decode(errors="replace")
                self.mark = end
                return dict(w.split("=", 1) for w in line.split() if "=" in w)
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                raise RuntimeError(f"no {marker!r}: {self.buf[-2000:]!r}")
            r, _, _ = select.select([self.p.stdout], [], [], min(left, 0.2))
            if r:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"the VMM exited: {self.buf[-2000:]!r}")
                self.buf += chunk

    def type(self, line):
        self.mark = len(self.buf)
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def rss_mib(self):
        return status_kib(self.p.pid)["VmRSS"] / 1024

    def close(self):
        if self.p.poll() is None:
            try:
                self.type("reboot -f")
                self.p.communicate(timeout=30)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                pass
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def measure(kind, binary, kernel, initrd):
    with tempfile.TemporaryDirectory(prefix=f"ferrite-bench-vsock-{kind}-") as tmp:
        vm = Vm(kind, binary, kernel, initrd, tmp)
        try:
            t0 = time.perf_counter()
            vm.wait(b"/ # ")
            boot_s = time.perf_counter() - t0
            rss_idle = vm.rss_mib()
            vm.type("vsock-test echo 5000 &")
            vm.line_with(b"VT-LISTEN mode=echo")
            # CONNECT -> OK latency.
            lat = []
            for _ in range(LATENCY_SAMPLES):
                s, dt = host_connect(vm.uds, 5000)
                lat.append(dt * 1000)
                s.close()
            # host -> guest.
            vm.type("vsock-test sink l:5002 1 &")
            vm.line_with(b"VT-LISTEN mode=sink")
            s, _ = host_connect(vm.uds, 5002)
            chunk = bytes(range(256)) * 256
            t = time.perf_counter()
            sent = 0
            while sent < BYTES:
                s.sendall(chunk)
                sent += len(chunk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
            h2g = sent / (1 << 20) / (time.perf_counter() - t)
            s.close()
            sink = vm.line_with(b"VT-SINK conn")
            if int(sink.get("bytes", -1)) != sent:
                raise RuntimeError(f"the guest's sink got {sink} of {sent} bytes")
            # guest -> host.
            vm.type(f"vsock-test source l:5003 {BYTES} 1 &")
            vm.line_with(b"VT-LISTEN mode=source")
            s, _ = host_connect(vm.uds, 5003)
            t = time.perf_counter()
            got = 0
            # Exactly BYTES (not to EOF: Firecracker does not pass the guest's
            # SHUTDOWN SEND on as a half close).
            while got < BYTES:
                b = s.recv(1 << 20)
                if not b:
                    break
                got += len(b)
            g2h = got / (1 << 20) / (time.perf_counter() - t)
            s.close()
            if got != BYTES:
                raise RuntimeError(f"guest->host: {got} of {BYTES} bytes")
            # RSS with 64 open connections.
            conns = [host_connect(vm.uds, 5000)[0] for _ in range(OPEN_CONNS)]
            time.sleep(1)
            rss_open = vm.rss_mib()
            for c in conns:
                c.sendall(b"x")
            for c in conns:
                if c.recv(1) != b"x":
                    raise RuntimeError("echo on an open connection failed")
                c.close()
            return {"boot_s": boot_s, "connect_ms": statistics.median(lat),
                    "connect_max_ms": max(lat), "h2g": h2g, "g2h": g2h,
                    "rss_idle": rss_idle, "rss_open": rss_open}
        finally:
            vm.close()


ROWS = [("boot_s", "boot to shell, s", "{:.1f}"),
        ("connect_ms", "CONNECT->OK median, ms", "{:.2f}"),
        ("connect_max_ms", "CONNECT->OK max, ms", "{:.2f}"),
        ("h2g", "host->guest MiB/s", "{:.1f}"),
        ("g2h", "guest->host MiB/s", "{:.1f}"),
        ("rss_idle", "VmRSS at the shell, MiB", "{:.1f}"),
        ("rss_open", "VmRSS, 64 open conns, MiB", "{:.1f}")]


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    kernel, initrd = tier_a.kernel()
    only = os.environ.get("VMMS", "ferrite,firecracker").split(",")
    vmms = {"ferrite": ferrite_binary()} if "ferrite" in only else {}
    fc = os.environ.get("FIRECRACKER", DEFAULT_FC)
    if "firecracker" not in only:
        pass
    elif os.access(fc, os.X_OK):
        vmms["firecracker"] = fc
    else:
        print(f"no Firecracker at {fc} (set FIRECRACKER=...): Ferrite only",
              file=sys.stderr)
    print(f"{BYTES >> 20} MiB per direction; load average at start: "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    res = {v: [] for v in vmms}
    for r in range(rounds):
        order = list(vmms) if r % 2 == 0 else list(reversed(list(vmms)))
        for v in order:
            f = measure(v, vmms[v], kernel, initrd)
            res[v].append(f)
            print(f"round {r + 1}: {v:12} " + "  ".join(
                f"{k}={fmt.format(f[k])}" for k, _, fmt in ROWS), flush=True)
    names = list(vmms)
    print(f"\nmedian of {rounds} round(s)")
    print(f"{'':30}" + "".join(f"{n:>14}" for n in names))
    for key, label, fmt in ROWS:
        print(f"{label:30}" + "".join(
            f"{fmt.format(statistics.median(x[key] for x in res[n])):>14}" for n in names))
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
