#!/usr/bin/env python3
"""Drives a `firecracker` binary with firecracker-python (PyPI), a client written for
Firecracker, through the client's public API: MicroVM(...).create(), MicroVM.list(),
config(), pause(), resume(), delete(), and its Api class for GET / and GET /version.

Usage: firecracker_python_client.py FIRECRACKER KERNEL INITRD WORKDIR

FIRECRACKER is the binary under test: a link named `firecracker` to Ferrite, or a real
Firecracker. KERNEL and INITRD are the tier-A guest (tests/guests/linux); its /init
prints FERRITE-USERSPACE on the console and, with no ferrite.test= word on the command
line (the client writes its own), waits at a shell. WORKDIR is a scratch directory for
the disk image and for copies of the VM's console and log.

The client has fixed paths and host side effects: it runs /usr/local/bin/firecracker,
keeps its state under /var/lib/firecracker, creates a TAP device and nftables rules per
VM and names the host's uplink from the default route. So the script first re-executes
itself in private mount and network namespaces (unshare), where /usr/local/bin and
/var/lib are fresh tmpfs mounts (the first holding only a link to FIRECRACKER) and a
TAP device with a default route stands in for the uplink: nothing of the host's network,
files or firewall is touched. Needs root, `unshare`, `ip`, `mkfs.ext4`, and Debian's
python3-nftables for the client's NAT rules (it imports it from the system's
dist-packages).

Two calls that MicroVM() makes have no place here and are replaced before it runs:
docker.from_env() (asks a Docker daemon for its API version; Docker only builds a root
disk from an image, which is not asked for) and get_public_ip() (asks web services for
the host's address; used only for port forwarding). All else is the client's own code.

Prints `CHECK <what>: ok` per check and `PYCLIENT-OK` at the end; on the first failure
`PYCLIENT-FAIL: <reason>` and exit status 1.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback

NS_ENV = "FERRITE_PYCLIENT_IN_NAMESPACES"
BOOT_DEADLINE_S = float(os.environ.get("FERRITE_PYCLIENT_BOOT_DEADLINE", "240"))
EXIT_DEADLINE_S = 30.0
MEM_MIB = 128


class Fail(Exception):
    pass


def check(ok, what, detail=""):
    if not ok:
        raise Fail(f"{what}: {detail}" if detail else what)
    print(f"CHECK {what}: ok", flush=True)


def sh(*argv):
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)


def enter_namespaces():
    """Re-executes this script under `unshare` (private mounts and network) once."""
    if os.environ.get(NS_ENV) == "1":
        return
    if os.geteuid() != 0:
        print("PYCLIENT-FAIL: needs root (TAP devices, namespaces, /dev/kvm)", flush=True)
        sys.exit(1)
    env = dict(os.environ, **{NS_ENV: "1"})
    argv = ["unshare", "--mount", "--net", "--propagation", "private", "--fork",
            "--kill-child", "--", sys.executable, os.path.abspath(__file__)] + sys.argv[1:]
    os.execvpe("unshare", argv, env)


def prepare_host_view(binary):
    """Inside the namespaces: the client's paths on tmpfs, an uplink with a default route."""
    sh("mount", "-t", "tmpfs", "-o", "mode=0755", "ferrite-pyclient-bin", "/usr/local/bin")
    os.symlink(binary, "/usr/local/bin/firecracker")
    sh("mount", "-t", "tmpfs", "-o", "mode=0755", "ferrite-pyclient-var", "/var/lib")
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "tuntap", "add", "dev", "uplink0", "mode", "tap")
    sh("ip", "addr", "add", "10.0.2.15/24", "dev", "uplink0")
    sh("ip", "link", "set", "uplink0", "up")
    sh("ip", "route", "add", "default", "via", "10.0.2.2", "dev", "uplink0")


def make_disk(workdir):
    """A small ext4 image: the client insists on a root disk (with an initrd it is
    attached as an ordinary drive, is_root_device false)."""
    src = os.path.join(workdir, "disk-src")
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "marker"), "w") as f:
        f.write("ferrite pyclient disk\n")
    img = os.path.join(workdir, "disk.ext4")
    sh("mkfs.ext4", "-q", "-F", "-L", "pyclient", "-d", src, img, "4M")
    return img


def wait_for(deadline_s, what, f):
    end = time.monotonic() + deadline_s
    while True:
        v = f()
        if v:
            return v
        if time.monotonic() > end:
            raise Fail(f"{what}: not within {deadline_s:.0f} s")
        time.sleep(0.05)


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def reap(pid, deadline_s):
    """Waits for the VMM process (a child of this process: the client starts it with
    Popen) to end; returns its wait status, or None when the client's Popen object
    reaped it first."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if got == pid:
            return status
        if time.monotonic() > end:
            raise Fail(f"the VMM process {pid} still runs {deadline_s:.0f} s after delete()")
        time.sleep(0.05)


def main():
    if len(sys.argv) != 5:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
    enter_namespaces()
    binary, kernel, initrd, workdir = (os.path.abspath(a) for a in sys.argv[1:])
    prepare_host_view(binary)
    disk = make_disk(workdir)

    # Importing the package checks /usr/local/bin/firecracker and makes
    # /var/lib/firecracker (on the tmpfs).
    import docker
    import firecracker
    import firecracker.microvm as fc_microvm
    from firecracker import Api, MicroVM

    print(f"client: firecracker-python {firecracker.__version__}", flush=True)
    docker.from_env = lambda *a, **k: docker.DockerClient(
        base_url="unix:///nonexistent/docker.sock", version="1.45")
    fc_microvm.get_public_ip = lambda *a, **k: "192.0.2.1"

    vm = MicroVM(kernel_file=kernel, initrd_file=initrd, base_rootfs=disk,
                 vcpu=1, memory=MEM_MIB)
    pid = None
    vm_dir = None
    try:
        msg = vm.create()
        m = re.fullmatch(r"VMM ([a-z0-9]{8}) created", str(msg))
        check(m is not None, "MicroVM.create() boots the VM", repr(msg))
        vm_id = m.group(1)
        vm_dir = f"/var/lib/firecracker/{vm_id}"
        console = f"{vm_dir}/firecracker.log"

        listed = [v for v in MicroVM.list() if v["id"] == vm_id]
        check(len(listed) == 1 and listed[0]["state"] == "Running",
              "MicroVM.list() shows it running", repr(MicroVM.list()))
        pid = int(listed[0]["pid"])

        api = Api(f"{vm_dir}/firecracker.socket")
        desc = api.describe.get().json()
        check(desc.get("id") == vm_id and desc.get("state") == "Running",
              "GET / (Api.describe): its --id, state Running", repr(desc))
        ver = api.version.get().json()
        check(isinstance(ver.get("firecracker_version"), str),
              "GET /version (Api.version)", repr(ver))

        cfg = vm.config()
        boot = cfg.get("boot-source", {})
        mc = cfg.get("machine-config", {})
        drives = cfg.get("drives", [])
        nets = cfg.get("network-interfaces", [])
        check(boot.get("kernel_image_path") == kernel
              and boot.get("initrd_path") == initrd
              and "console=ttyS0" in boot.get("boot_args", "")
              and mc.get("vcpu_count") == 1 and mc.get("mem_size_mib") == MEM_MIB
              and [d.get("drive_id") for d in drives] == ["rootfs"]
              and drives[0].get("is_root_device") is False
              and [n.get("host_dev_name") for n in nets] == [f"tap_{vm_id}"]
              and [n.get("iface_id") for n in nets] == ["uplink0"],
              "MicroVM.config() (GET /vm/config) returns what the client configured",
              json.dumps(cfg))

        wait_for(BOOT_DEADLINE_S, "FERRITE-USERSPACE on the guest console",
                 lambda: "FERRITE-USERSPACE" in read(console))
        check(True, "the guest reached userspace (FERRITE-USERSPACE on the console)")

        out = vm.pause()
        state = api.describe.get().json().get("state")
        check(out == f"VMM {vm_id} paused successfully" and state == "Paused",
              "MicroVM.pause() (PATCH /vm Paused)", f"{out!r}, state {state!r}")
        out = vm.resume()
        state = api.describe.get().json().get("state")
        check(out == f"VMM {vm_id} resumed successfully" and state == "Running",
              "MicroVM.resume() (PATCH /vm Resumed)", f"{out!r}, state {state!r}")
        api.close()

        for name in ("firecracker.log", f"logs/{vm_id}.log"):
            src = os.path.join(vm_dir, name)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(workdir, os.path.basename(name)))

        out = vm.delete()
        check(out == f"VMM {vm_id} is deleted", "MicroVM.delete()", repr(out))
        status = reap(pid, EXIT_DEADLINE_S)
        check(not os.path.exists(f"/proc/{pid}") or status is not None,
              "the VMM process is gone after delete()", f"pid {pid}")
        if status is not None:
            how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"exit status {os.WEXITSTATUS(status)}")
            print(f"VMM process ended with {how}", flush=True)
            check(not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL),
                  "the VMM process ended on the client's SIGTERM (not its later SIGKILL)",
                  how)
        check(not os.path.exists(vm_dir), "delete() removed the VM's directory", vm_dir)
        gone = subprocess.run(["ip", "link", "show", f"tap_{vm_id}"],
                              capture_output=True).returncode != 0
        check(gone, "delete() removed the VM's TAP device", f"tap_{vm_id}")
        pid = None
        print("PYCLIENT-OK", flush=True)
    finally:
        if vm_dir and os.path.isdir(vm_dir):
            logs = os.path.join(vm_dir, "logs")
            names = ["firecracker.log"] + (
                [f"logs/{n}" for n in sorted(os.listdir(logs))] if os.path.isdir(logs) else [])
            for name in names:
                p = os.path.join(vm_dir, name)
                if os.path.isfile(p):
                    print(f"--- {name} (last lines) ---\n" + "\n".join(read(p).splitlines()[-25:]),
                          flush=True)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    try:
        main()
    except Fail as e:
        print(f"PYCLIENT-FAIL: {e}", flush=True)
        sys.exit(1)
    except Exception:
        traceback.print_exc()
        print("PYCLIENT-FAIL: the client raised (traceback above)", flush=True)
        sys.exit(1)
