"""Shared by the bench scripts: the tier-A guest (built by the project's own script,
cached by its inputs) and reading a VMM's output up to a marker."""
import os
import select
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRITE = os.path.join(ROOT, "target", "x86_64-unknown-linux-gnu", "release", "ferrite")


def kernel():
    """(vmlinux, initramfs) of the tier-A guest."""
    out = subprocess.run(["bash", "tests/guests/linux/build-tier-a.sh"], cwd=ROOT, check=True,
                         stdout=subprocess.PIPE).stdout.decode().strip().splitlines()[-1]
    return os.path.join(out, "vmlinux"), os.path.join(out, "initramfs.cpio.gz")


def read_until(p, needle, timeout, buf=b""):
    """Reads p.stdout until `needle` appears; exits the script on timeout or EOF.
    Returns everything read (starting with `buf`)."""
    t0 = time.monotonic()
    while needle not in buf:
        left = timeout - (time.monotonic() - t0)
        if left <= 0:
            sys.exit(f"no {needle!r} within {timeout}s; last output:\n"
                     f"{buf[-3000:].decode(errors='replace')}")
        r, _, _ = select.select([p.stdout], [], [], left)
        chunk = os.read(p.stdout.fileno(), 65536) if r else b""
        if r and not chunk:
            sys.exit(f"{p.args[0]} exited before {needle!r}: "
                     f"{buf[-3000:].decode(errors='replace')}")
        buf += chunk
    return buf
