//! The tier-A Linux guest (tests/guests/linux, booted as tests/linux_tier_a.rs shows):
//! its kernel, the arguments that boot it under `ferrite run`, and talking to its
//! busybox shell and to its vsock echo server (`vsock-test echo PORT`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::{build_recipe, wait_until, Spawned};

/// Bounds the boot to the shell prompt (25-45 s here; more with parallel boots).
pub const BOOT_DEADLINE: Duration = Duration::from_secs(300);
/// The kernel command line: the console on the serial port, a reboot ends the VM, a
/// panic reboots at once. The tests add `nopv` where the guest must not use KVM's
/// paravirtual features.
pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// The directory with the tier-A `vmlinux` and `initramfs.cpio.gz` (built or taken
/// from the cache once per test binary).
pub fn kernel_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_recipe("tests/guests/linux/build-tier-a.sh"))
}

/// Adds the tier-A kernel, initramfs and `cmdline` to a `ferrite run` command.
pub fn guest_args<'a>(cmd: &'a mut Command, cmdline: &str) -> &'a mut Command {
    let d = kernel_dir();
    cmd.arg("--kernel")
        .arg(d.join("vmlinux"))
        .arg("--initrd")
        .arg(d.join("initramfs.cpio.gz"))
        .args(["--cmdline", cmdline])
}

/// `--log-level info run --name NAME --mem MEM --cpus CPUS` of the guest with
/// `cmdline`, added to a `ferrite` command.
pub fn run_args<'a>(
    cmd: &'a mut Command,
    name: &str,
    mem: &str,
    cpus: &str,
    cmdline: &str,
) -> &'a mut Command {
    cmd.args([
        "--log-level",
        "info",
        "run",
        "--name",
        name,
        "--mem",
        mem,
        "--cpus",
        cpus,
    ]);
    guest_args(cmd, cmdline)
}

/// The number on the last console line `KEY<number>` (not the echoed command: a key
/// ending in `=` is followed there by `$(`).
pub fn value(console: &str, key: &str) -> Option<f64> {
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix(key))
        .filter_map(|v| v.parse().ok())
        .next_back()
}

/// Asks the guest for its uptime (CLOCK_BOOTTIME, seconds) under `key`; waits up to
/// `timeout` for the answer, or until the VM exits.
pub fn uptime(vm: &mut Spawned, key: &str, timeout: Duration) -> Result<f64, String> {
    vm.send(format!("echo {key}$(cut -d' ' -f1 /proc/uptime)\n").as_bytes());
    let mut v = None;
    if !wait_until(timeout, || {
        v = value(&vm.stdout(), key);
        v.is_some() || vm.exited()
    }) {
        return Err(format!("no {key} line"));
    }
    v.ok_or_else(|| format!("no {key} line (the VM exited)"))
}

/// Starts the guest's vsock echo server on `port` in the background of its shell and
/// waits up to `timeout` for it to listen.
pub fn start_vsock_echo(vm: &mut Spawned, port: u32, timeout: Duration) -> Result<(), String> {
    vm.send(format!("vsock-test echo {port} &\n").as_bytes());
    if vm.wait_for_stdout(&format!("VT-LISTEN mode=echo port={port}"), timeout) {
        Ok(())
    } else {
        Err("the guest's vsock echo server did not start".into())
    }
}

/// `CONNECT port` on a vsock host socket, then one echo round trip of `data`; each
/// read waits up to `timeout`.
pub fn vsock_echo(uds: &Path, port: u32, data: &[u8], timeout: Duration) -> Result<(), String> {
    let mut s = UnixStream::connect(uds).map_err(|e| format!("connect {}: {e}", uds.display()))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("write CONNECT: {e}"))?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        match s.read(&mut b) {
            Ok(1) => line.push(b[0]),
            Ok(_) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&line))),
            Err(e) => return Err(format!("reading the CONNECT answer: {e}")),
        }
        if line.len() > 64 {
            return Err(format!(
                "answer too long: {:?}",
                String::from_utf8_lossy(&line)
            ));
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(format!(
            "CONNECT answered {:?}",
            String::from_utf8_lossy(&line)
        ));
    }
    s.write_all(data).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back)
        .map_err(|e| format!("reading the echo: {e}"))?;
    if back != data {
        return Err("the echo differs from what was sent".into());
    }
    Ok(())
}
