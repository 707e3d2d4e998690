"""Shared by the bench scripts that time whole processes: building bench/spawn.c and
running a command under it (wall time, peak RSS and user CPU of that one process)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(*cmd):
    subprocess.run(cmd, check=True, cwd=ROOT)


def build(out):
    """Builds the spawner into the directory `out`."""
    sh("cc", "-O2", "-Wall", "-static", "-o", os.path.join(out, "spawn"), "bench/spawn.c")


def measure(out, cmd, expect):
    """Runs cmd under the spawner built into `out`; returns (wall seconds, peak RSS KiB,
    user CPU seconds). Exits the script when cmd's exit code is not `expect`."""
    p = subprocess.run([os.path.join(out, "spawn")] + cmd, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    code, rss, ns, user = (int(x) for x in p.stdout.split())
    if code != expect:
        sys.exit(f"{cmd} exited {code}, expected {expect}: {p.stderr.decode(errors='replace')}")
    return ns / 1e9, rss, user / 1e9
