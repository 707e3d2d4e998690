#!/usr/bin/env python3
"""Asynchronous page faults under host memory pressure, observed with KVM's tracepoints.

A tier-A Linux guest (256 MiB, 1 vCPU) runs with its RAM in a file on the host's disk
(--mem-backing file=...), inside a cgroup-v1 memory cgroup limited to LIMIT_MIB. Once at
userspace busybox awk builds a FILL_MIB string and scans it in user mode: the host must evict
guest pages to the file and fault them back in. When a vCPU touches an evicted page,
KVM (if the guest enabled async PF: MSR 0x4b564d02) tells the guest "page not present"
and lets it schedule other work instead of stalling the vCPU; the tracepoints
kvm:kvm_try_async_get_page, kvm_async_pf_not_present, kvm_async_pf_ready and
kvm_async_pf_completed count that. The guest's MSR is read through the control socket
first. Needs root (tracefs, cgroup).
usage: bench/async_pf.py [LIMIT_MIB] [FILL_MIB]
"""
import json
import os
import subprocess
import sys
import tempfile
import time

from tier_a import FERRITE, ROOT, kernel, read_until
TRACE = "/sys/kernel/tracing"
CGROUP_ROOT = "/sys/fs/cgroup/memory"
EVENTS = ["kvm_try_async_get_page", "kvm_async_pf_not_present", "kvm_async_pf_ready",
          "kvm_async_pf_completed", "kvm_async_pf_repeated_fault"]
TIMEOUT = 900


def write(path, value):
    with open(path, "w") as f:
        f.write(str(value))


def main():
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    fill = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    subprocess.run(["cargo", "build", "--release", "--quiet"], check=True, cwd=ROOT)
    vmlinux, initramfs = kernel()
    if not os.path.isdir(os.path.join(TRACE, "events")):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACE], check=True)
    cg = os.path.join(CGROUP_ROOT, f"ferrite-apf-{os.getpid()}")
    os.mkdir(cg)
    rundir = tempfile.mkdtemp(prefix="ferrite-apf-")
    ram = os.path.join("/var/tmp", f"ferrite-apf-{os.getpid()}.ram")
    env = dict(os.environ, FERRITE_RUN_DIR=rundir)
    p = None
    try:
        write(os.path.join(cg, "memory.limit_in_bytes"), limit << 20)
        for e in EVENTS:
            write(f"{TRACE}/events/kvm/{e}/enable", 1)
        write(f"{TRACE}/trace", "")
        cmd = [FERRITE, "run", "--kernel", vmlinux, "--initrd", initramfs, "--mem", "256", "--name", "apf",
               "--mem-backing", f"file={ram}", "--cmdline", "console=ttyS0 reboot=k panic=-1"]
        # Join the cgroup, then become Ferrite.
        p = subprocess.Popen(["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"] + cmd,
                             env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        buf = read_until(p, b"FERRITE-USERSPACE", 300)
        time.sleep(3)
        sock = os.path.join(rundir, "apf.sock")
        subprocess.run([FERRITE, "pause", "apf"], env=env, check=True, stdout=subprocess.DEVNULL)
        regs = subprocess.run(["curl", "-s", "--unix-socket", sock,
                               "http://localhost/vm/vcpus/0/registers?msrs=0x4b564d02"],
                              check=True, stdout=subprocess.PIPE).stdout
        msr = int(json.loads(regs)["msrs"]["0x4b564d02"], 16)
        subprocess.run([FERRITE, "resume", "apf"], env=env, check=True, stdout=subprocess.DEVNULL)
        t0 = time.monotonic()
        # User-mode touching: with SEND_ALWAYS off (Linux guests since 5.8), KVM only
        # reports "page not present" while the guest runs in user mode; busybox awk
        # builds a FILL_MIB string and scans it a few times in user mode.
        p.stdin.write((f"awk 'BEGIN {{ s = sprintf(\"%{fill << 20}s\", \"\"); "
                       f"for (i = 0; i < 4; i++) n += index(s, \"x\"); "
                       f"print \"APF-\" length(s) \"-DONE\" }}'\n").encode())
        p.stdin.flush()
        # The terminal echoes the command; only awk prints the length.
        buf = read_until(p, f"APF-{fill << 20}-DONE".encode(), TIMEOUT, buf)
        took = time.monotonic() - t0
        with open(f"{TRACE}/trace") as f:
            trace = f.read()
        counts = {e: trace.count(f" {e}:") for e in EVENTS}
        with open(os.path.join(cg, "memory.max_usage_in_bytes")) as f:
            peak = int(f.read())
        with open(os.path.join(cg, "memory.failcnt")) as f:
            failcnt = int(f.read())
    finally:
        for e in EVENTS:
            try:
                write(f"{TRACE}/events/kvm/{e}/enable", 0)
            except OSError:
                pass
        if p:
            p.kill()
            p.wait()
        try:
            os.rmdir(cg)
        except OSError:
            pass
        for path in (ram,):
            if os.path.exists(path):
                os.unlink(path)
        subprocess.run(["rm", "-rf", rundir])

    print(f"\nguest MSR_KVM_ASYNC_PF_EN (0x4b564d02) = {msr:#x}: enabled={msr & 1} "
          f"delivery-as-int={(msr >> 3) & 1}")
    print(f"memory cgroup limit {limit} MiB, peak {peak >> 20} MiB, limit hits {failcnt}")
    print(f"guest built and scanned a {fill} MiB string 4 times in {took:.1f} s")
    for e, n in counts.items():
        print(f"  kvm:{e:28} {n}")


if __name__ == "__main__":
    main()
