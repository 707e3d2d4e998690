#!/usr/bin/env python3
"""MMDS (issue 19): Ferrite's Firecracker front door vs Firecracker v1.16.1 in one run,
the same tier-A kernel and initramfs, 1 vCPU, 256 MiB, one virtio-net interface `eth0`
on a TAP in a network namespace of the script's own (host side 10.0.9.1/24, guest
10.0.9.2/24), both VMMs configured through the same API calls (`PUT /machine-config`,
`/boot-source`, `/network-interfaces/eth0`, and for the MMDS boots `PUT /mmds/config
{"version":"V2","network_interfaces":["eth0"]}` and `PUT /mmds`, then InstanceStart).

Figures, each VMM booted twice (with MMDS on eth0, and without any MMDS):

  MMDS GET, ms      guest-side latency of one MMDS request: one busybox `wget`
                    process fetching N URLs one after another (a new TCP connection
                    each, with the V2 token header) minus the same process fetching
                    one URL, divided by N-1; timed in the guest from /proc/uptime
                    (10 ms ticks; N=REQS, default 20: one request takes ~0.5 s in
                    the emulated guest here, mostly the guest kernel; the tick
                    makes the figure move in steps of 10/(N-1) ms). Median of 3
                    such runs.
  host GET, ms      the same loop against a small HTTP server on the host end of the
                    TAP (Python, in the namespace): the guest's TCP/IP cost to a peer
                    that is not inside the VMM, for scale.
  PUT token, ms     `PUT /latest/api/token` through busybox `nc` (one process per
                    request, so it includes a process start): median of 5, host
                    timed from typing to the answer line. Informative only.
  guest->host       the host GETs a file of BYTES from busybox `httpd` in the
                    guest (which sends with sendfile): KiB/s from the first byte
  host->guest       the host writes BYTES to the guest's `nc -l -p 5001 >/dev/null`
                    and half-closes; KiB/s until the guest closes

usage: [FIRECRACKER=/path] [FERRITE=/path] [BYTES_KIB=4096] [REQS=20]
       [VMMS=ferrite,firecracker] [PARTS=lat,tcp] bench/mmds.py [ROUNDS]
Needs root (network namespace, TAP). FERRITE defaults to a release build of this
tree (CARGO_TARGET_DIR honoured); it runs as `firecracker` through a symlink of that
name.
"""
import ctypes
from http.server import BaseHTTPRequestHandler
import os
import select
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import tier_a
from boot_firecracker import ferrite_binary
from firecracker_front import http

DEFAULT_FC = "/work/fc/target/x86_64-unknown-linux-gnu/release/firecracker"
MEM_MIB = 256
CMDLINE = "console=ttyS0 reboot=k panic=-1"
HOST_IP = "10.0.9.1"
GUEST_IP = "10.0.9.2"
MMDS_IP = "169.254.169.254"
BOOT_TIMEOUT = 300
IO_TIMEOUT = 300
BYTES = int(os.environ.get("BYTES_KIB", "4096")) << 10
REQS = int(os.environ.get("REQS", "20"))
LOOPS = 3
# PARTS=lat,tcp: which figures to take (both by default).
PARTS = os.environ.get("PARTS", "lat,tcp").split(",")
# MMDS_BENCH_TRACE=FILE: the consoles go to FILE as they arrive.
TRACE = open(os.environ["MMDS_BENCH_TRACE"], "ab") if os.environ.get("MMDS_BENCH_TRACE") else None
DOC = {"latest": {"meta-data": {"ami-id": "ami-12345678", "instance-id": "i-0bench",
                                "local-hostname": "bench"}}}

_libc = ctypes.CDLL(None, use_errno=True)


class Netns:
    """A network namespace with `tap0` (HOST_IP/24), deleted by close()."""

    def __init__(self):
        self.name = f"ferrite-bench-mmds-{os.getpid()}"
        subprocess.run(["ip", "netns", "del", self.name], stderr=subprocess.DEVNULL)
        for args in (["netns", "add", self.name],
                     ["-n", self.name, "tuntap", "add", "dev", "tap0", "mode", "tap"],
                     ["-n", self.name, "addr", "add", f"{HOST_IP}/24", "dev", "tap0"],
                     ["-n", self.name, "link", "set", "tap0", "up"],
                     ["-n", self.name, "link", "set", "lo", "up"]):
            subprocess.run(["ip"] + args, check=True)

    def enter(self):
        """Moves the calling thread into the namespace."""
        fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)

    def close(self):
        subprocess.run(["ip", "netns", "del", self.name])


def in_netns(ns, fn):
    """Runs fn() on a thread inside `ns`; returns its result (or raises its error)."""
    out = {}

    def run():
        try:
            ns.enter()
            out["v"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["e"] = e
    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "e" in out:
        raise out["e"]
    return out["v"]


class Vm:
    def __init__(self, binary, kernel, initrd, tmp, ns, mmds):
        self.buf = b""
        self.mark = 0
        api = os.path.join(tmp, "api.sock")
        cmd = ["ip", "netns", "exec", ns.name, binary, "--api-sock", api, "--id", "bench"]
        self.p = subprocess.Popen(cmd, cwd=tmp, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while not os.path.exists(api):
            if time.monotonic() - t0 > 10 or self.p.poll() is not None:
                raise RuntimeError(f"{binary}: no API socket: {self.p.stdout.read()!r}")
            time.sleep(0.002)
        calls = [("/machine-config", {"vcpu_count": 1, "mem_size_mib": MEM_MIB}),
                 ("/boot-source", {"kernel_image_path": kernel, "initrd_path": initrd,
                                   "boot_args": CMDLINE}),
                 ("/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                               "guest_mac": "06:00:0a:00:09:02"})]
        if mmds:
            calls += [("/mmds/config", {"version": "V2", "network_interfaces": ["eth0"]}),
                      ("/mmds", DOC)]
        calls.append(("/actions", {"action_type": "InstanceStart"}))
        for path, body in calls:
            status, text = http(api, "PUT", path, body)
            if status != 204:
                raise RuntimeError(f"{binary}: PUT {path} answered {status} {text}")

    def _read(self, timeout):
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if r:
            chunk = os.read(self.p.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the VMM exited: {self.buf[-2000:]!r}")
            self.buf += chunk
            if TRACE:
                TRACE.write(chunk)
                TRACE.flush()

    def wait(self, needle, timeout=BOOT_TIMEOUT):
        t0 = time.monotonic()
        while needle not in self.buf[self.mark:]:
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                raise RuntimeError(f"no {needle!r}: {self.buf[-2000:]!r}")
            self._read(min(left, 0.2))

    def type(self, line):
        self.mark = len(self.buf)
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def ask(self, line, key, timeout=IO_TIMEOUT):
        """Types `line`; returns the value of the first complete `KEY=` line after it
        (the echo of the typed line starts with the prompt, so it never matches)."""
        self.type(line)
        return self.wait_key(key, timeout)

    def wait_key(self, key, timeout=IO_TIMEOUT):
        """The value of the first complete `KEY=` line since the last `type` (a value
        starting with `$` is the shell's echo of a wrapped command line: skipped)."""
        t0 = time.monotonic()
        pre = key.encode() + b"="
        while True:
            for ln in self.buf[self.mark:].split(b"\n")[:-1]:
                ln = ln.rstrip(b"\r")
                if ln.startswith(pre) and not ln[len(pre):].startswith(b"$"):
                    return ln[len(pre):].decode(errors="replace")
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                raise RuntimeError(f"no {key}= after {line!r}: {self.buf[-2000:]!r}")
            self._read(min(left, 0.2))

    def close(self):
        if self.p.poll() is None:
            try:
                self.type("reboot -f")
                self.p.communicate(timeout=30)
            except (subprocess.TimeoutExpired, BrokenPipeError, ValueError):
                pass
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def serve_http(ns):
    """A threaded HTTP server on HOST_IP:8080 in `ns` answering every GET with a short
    body; returns it (shut down by the caller)."""
    class H(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            body = b"ami-12345678"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    srv = in_netns(ns, lambda: socketserver.ThreadingTCPServer((HOST_IP, 8080), H))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def loop_ms(vm, url, n, tag, hdr):
    """Guest ms for one wget process fetching `url` n times (URLs built by the shell)."""
    vm.ask(f"U=; i=0; while [ $i -lt {n} ]; do U=\"$U {url}\"; i=$((i+1)); done; "
           f"echo BUILT{tag}=$i", f"BUILT{tag}")
    v = vm.ask(f"read a b </proc/uptime; wget -q -O /dev/null {hdr} $U; r=$?; "
               f"read c d </proc/uptime; echo T{tag}=$r,$a,$c", f"T{tag}")
    rc, a, c = v.split(",")
    if rc != "0":
        raise RuntimeError(f"wget of {url} x{n} failed with {rc}: {vm.buf[-2000:]!r}")
    return (float(c) - float(a)) * 1000


def per_request_ms(vm, url, hdr, tag):
    runs = []
    for k in range(LOOPS):
        many = loop_ms(vm, url, REQS, f"{tag}M{k}", hdr)
        one = loop_ms(vm, url, 1, f"{tag}O{k}", hdr)
        runs.append((many - one) / (REQS - 1))
    return statistics.median(runs)


def g2h(vm, ns):
    """guest -> host KiB/s: the host GETs a file of BYTES from busybox httpd in the
    guest (sendfile: full-sized segments; busybox nc writes 1 KiB at a time, which
    measures the guest's per-packet cost rather than the path)."""
    count = BYTES // 65536
    vm.ask(f"dd if=/dev/zero of=/tmp/big bs=65536 count={count} 2>/dev/null; "
           "httpd -p 8000 -h /tmp; echo HTTPD=$?", "HTTPD")

    def get():
        t_end = time.monotonic() + IO_TIMEOUT
        while True:
            s = socket.socket()
            try:
                s.connect((GUEST_IP, 8000))
                break
            except OSError:
                s.close()
                if time.monotonic() > t_end:
                    raise
                time.sleep(0.05)
        s.settimeout(IO_TIMEOUT)
        s.sendall(b"GET /big HTTP/1.0\r\n\r\n")
        buf, t0 = b"", None
        while b"\r\n\r\n" not in buf:
            b = s.recv(65536)
            if not b:
                raise RuntimeError(f"guest httpd: {buf!r}")
            if t0 is None:
                t0 = time.perf_counter()
            buf += b
        head, _, body = buf.partition(b"\r\n\r\n")
        if b" 200" not in head.split(b"\r\n")[0]:
            raise RuntimeError(f"guest httpd: {head!r}")
        got = len(body)
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            got += len(b)
        dt = time.perf_counter() - t0
        s.close()
        return got, dt
    got, dt = in_netns(ns, get)
    if got != count * 65536:
        raise RuntimeError(f"guest->host: {got} of {count * 65536} bytes")
    vm.ask("rm /tmp/big; echo RM=$?", "RM")
    return got / 1024 / dt


def h2g(vm, ns):
    """host -> guest KiB/s."""
    vm.type("nc -l -p 5001 >/dev/null; echo H2G=$?")

    def send():
        t_end = time.monotonic() + IO_TIMEOUT
        while True:
            s = socket.socket()
            try:
                s.connect((GUEST_IP, 5001))
                break
            except OSError:
                s.close()
                if time.monotonic() > t_end:
                    raise
                time.sleep(0.05)
        s.settimeout(IO_TIMEOUT)
        chunk = b"\0" * 65536
        t0 = time.perf_counter()
        sent = 0
        while sent < BYTES:
            s.sendall(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
        dt = time.perf_counter() - t0
        s.close()
        return sent / 1024 / dt
    mibs = in_netns(ns, send)
    vm.wait_key("H2G")
    return mibs


def measure(binary, kernel, initrd, mmds):
    ns = Netns()
    srv = None
    with tempfile.TemporaryDirectory(prefix="ferrite-bench-mmds-") as tmp:
        link = os.path.join(tmp, "firecracker")
        os.symlink(binary, link)
        vm = Vm(link, kernel, initrd, tmp, ns, mmds)
        try:
            vm.wait(b"/ # ")
            vm.ask(f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && "
                   f"ip route add {MMDS_IP} dev eth0; echo NETUP=$?", "NETUP")
            f = {}
            if "tcp" in PARTS:
                f["g2h"] = g2h(vm, ns)
                f["h2g"] = h2g(vm, ns)
            if "lat" not in PARTS:
                return f
            srv = serve_http(ns)
            f["host_get"] = per_request_ms(vm, f"http://{HOST_IP}:8080/x", "", "H")
            if mmds:
                put = ("printf 'PUT /latest/api/token HTTP/1.1\\r\\n"
                       "X-metadata-token-ttl-seconds: 600\\r\\n\\r\\n' "
                       f"| nc {MMDS_IP} 80 | tail -n 1")
                lat = []
                for k in range(5):
                    t0 = time.perf_counter()
                    tok = vm.ask(f"T=$({put}); echo TOK{k}=$T", f"TOK{k}")
                    lat.append((time.perf_counter() - t0) * 1000)
                if len(tok) < 20:
                    raise RuntimeError(f"no token: {tok!r}")
                f["put_ms"] = statistics.median(lat)
                f["mmds_get"] = per_request_ms(
                    vm, f"http://{MMDS_IP}/latest/meta-data/ami-id",
                    "--header \"X-metadata-token: $T\"", "M")
            return f
        finally:
            if srv:
                srv.shutdown()
                srv.server_close()
            vm.close()
            ns.close()


ROWS = [("mmds_get", "MMDS GET (V2, token), ms", "{:.2f}"),
        ("host_get", "host-server GET over TAP, ms", "{:.2f}"),
        ("put_ms", "PUT token via nc (+exec), ms", "{:.0f}"),
        ("g2h", "guest->host TCP KiB/s", "{:.0f}"),
        ("h2g", "host->guest TCP KiB/s", "{:.0f}")]


def main():
    # SIGTERM unwinds (the VMM is stopped, the namespace deleted) as an exception would.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
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
    print(f"{BYTES >> 10} KiB per direction, {REQS} requests per loop; load average "
          f"at start: {os.getloadavg()[0]:.2f}", flush=True)
    cols = [(v, m) for v in vmms for m in (True, False)]
    res = {c: [] for c in cols}
    for r in range(rounds):
        order = cols if r % 2 == 0 else list(reversed(cols))
        for v, m in order:
            f = measure(vmms[v], kernel, initrd, m)
            res[(v, m)].append(f)
            print(f"round {r + 1}: {v:12} mmds={'on ' if m else 'off'} " + "  ".join(
                f"{k}={fmt.format(f[k])}" for k, _, fmt in ROWS if k in f), flush=True)
    names = [f"{v}{'+mmds' if m else ''}" for v, m in cols]
    print(f"\nmedian of {rounds} round(s)")
    print(f"{'':32}" + "".join(f"{n:>18}" for n in names))
    for key, label, fmt in ROWS:
        cells = []
        for c in cols:
            xs = [x[key] for x in res[c] if key in x]
            cells.append(fmt.format(statistics.median(xs)) if xs else "-")
        print(f"{label:32}" + "".join(f"{x:>18}" for x in cells))
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
