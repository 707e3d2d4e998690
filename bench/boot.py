#!/usr/bin/env python3
"""Boot to userspace: Ferrite vs QEMU -M microvm, same kernel, initrd, memory, vCPUs,
interleaved in one run.

QEMU uses its default CPU model: `-cpu host` fails on the project's nested host
(KVM rejects an MSR write), and Ferrite passes KVM's supported CPUID through.
Both boot the tier-A test kernel (tests/guests/linux/build-tier-a.sh) and its init,
which prints FERRITE-USERSPACE as soon as userspace starts. The time from spawning the
VMM to that line on its serial console is the boot time; the VMM is then stopped.
usage: bench/boot.py [ROUNDS] [VCPUS]
"""
import shutil
import statistics
import subprocess
import sys
import time

import tier_a
from tier_a import FERRITE, ROOT, read_until
MEM_MIB = 256
MARK = b"FERRITE-USERSPACE"
TIMEOUT = 300


def boot_time(cmd):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        read_until(p, MARK, TIMEOUT)
        return time.perf_counter() - t0
    finally:
        p.kill()
        p.wait()


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    vcpus = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        subprocess.run(["apt-get", "install", "-y", "-qq", "qemu-system-x86"], check=True)
        qemu = shutil.which("qemu-system-x86_64")
    subprocess.run(["cargo", "build", "--release", "--quiet"], check=True, cwd=ROOT)
    kernel, initrd = tier_a.kernel()
    cmdline = "console=ttyS0 reboot=k panic=-1 ferrite.test=reboot" + (" nopv" if vcpus > 1 else "")
    ferrite = FERRITE
    vmms = {
        "ferrite": [ferrite, "run", "--kernel", kernel, "--initrd", initrd, "--mem", str(MEM_MIB),
                    "--cpus", str(vcpus), "--cmdline", cmdline],
        "qemu-microvm": [qemu, "-M", "microvm", "-accel", "kvm", "-m", str(MEM_MIB),
                         "-smp", str(vcpus), "-nodefaults", "-no-user-config", "-display", "none",
                         "-serial", "stdio", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
                         "-append", cmdline],
    }
    times = {v: [] for v in vmms}
    for r in range(rounds):
        order = list(vmms) if r % 2 == 0 else list(reversed(list(vmms)))
        for v in order:
            t = boot_time(vmms[v])
            times[v].append(t)
            print(f"round {r + 1}: {v:13} {t:7.2f} s", flush=True)
    f, q = statistics.median(times["ferrite"]), statistics.median(times["qemu-microvm"])
    print(f"\nboot to userspace, {MEM_MIB} MiB, {vcpus} vCPU(s), median of {rounds} interleaved rounds")
    print(f"{'ferrite':14} {f:7.2f} s")
    print(f"{'qemu-microvm':14} {q:7.2f} s")
    print(f"{'ratio':14} {f / q:7.3f}  (ferrite / qemu)")


if __name__ == "__main__":
    main()
