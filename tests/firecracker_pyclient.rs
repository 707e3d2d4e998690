//! A real Firecracker client from PyPI, firecracker-python, drives Ferrite through a
//! link named `firecracker`: tests/clients/firecracker_python_client.py creates a
//! microVM with the client (its TAP device, drive, machine config, boot source with the
//! tier-A kernel and initramfs, InstanceStart), checks what the client observes (list,
//! GET /, /version, /vm/config, the guest's console marker, pause and resume) and
//! deletes it (SIGTERM); the process must be gone. One guest boot.
//!
//! The client is installed from tests/clients/firecracker-python.requirements.txt
//! (every package pinned) into a venv cached outside the repository, in
//! `${FERRITE_CACHE:-~/.cache/ferrite}/pyclient-<hash of that file and the Python
//! version>`. The script runs in private mount and network namespaces (see its header):
//! it needs root, `unshare`, `ip`, `mkfs.ext4` and Debian's python3-nftables (.ci/run
//! installs them). Set FERRITE_FC_UNDER_TEST to a real Firecracker to check the script
//! against it.

mod common;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fc;

const SCRIPT: &str = "tests/clients/firecracker_python_client.py";
const REQUIREMENTS: &str = "tests/clients/firecracker-python.requirements.txt";
/// One boot of the tier-A guest to its shell plus the client's fixed waits (about 1.5 s
/// at start, about 7 s in delete); the guest's kernel code is emulated on this
/// project's hosts, and a busy machine has taken over a minute.
const DEADLINE: Duration = Duration::from_secs(480);

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A set-up step that cannot be done here: a failure under CI, otherwise the test says
/// it did not run.
fn cannot_run(reason: &str) -> bool {
    assert!(!in_ci(), "under CI this test must run: {reason}");
    common::record_not_run(reason);
    false
}

fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    (unsafe { libc::geteuid() } == 0)
        || cannot_run("the Python client test needs root (namespaces, TAP devices)")
}

/// FNV-1a, 64 bits: a stable key for the venv's cache directory.
fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(std::iter::once(&0u8)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn cache_root() -> Option<PathBuf> {
    if let Some(c) = std::env::var_os("FERRITE_CACHE") {
        return Some(PathBuf::from(c));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ferrite"))
}

fn run_ok(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The venv with the pinned client, built once per requirements file and Python
/// version; its `python`.
fn client_python() -> Result<PathBuf, String> {
    let reqs = common::root().join(REQUIREMENTS);
    let pinned = std::fs::read(&reqs).map_err(|e| format!("read {}: {e}", reqs.display()))?;
    let version = run_ok(Command::new("python3").args(["-c", "import sys; print(sys.version)"]))?;
    let root = cache_root().ok_or("neither FERRITE_CACHE nor HOME is set")?;
    let dir = root.join(format!(
        "pyclient-{:016x}",
        fnv64(&[&pinned, version.as_bytes()])
    ));
    let python = dir.join("bin/python");
    if python.exists() {
        return Ok(python);
    }
    std::fs::create_dir_all(&root).map_err(|e| format!("mkdir {}: {e}", root.display()))?;
    // Built beside its final place and renamed into it: a half-built venv is never used.
    let partial = root.join(format!(
        "{}.partial-{}",
        dir.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&partial);
    eprintln!("building the client's venv in {}", dir.display());
    let built = (|| {
        run_ok(Command::new("python3").arg("-m").arg("venv").arg(&partial))?;
        run_ok(
            Command::new(partial.join("bin/python"))
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--no-deps",
                    "-r",
                ])
                .arg(&reqs),
        )?;
        std::fs::rename(&partial, &dir).map_err(|e| format!("rename to {}: {e}", dir.display()))
    })();
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&partial);
        // Another test process may have finished the same venv meanwhile.
        if !python.exists() {
            return Err(e);
        }
    }
    Ok(python)
}

struct Outcome {
    status: std::process::ExitStatus,
    output: String,
}

/// Runs the client script in a process group of its own (it, `unshare` and the VMM the
/// client starts), killing the group after `deadline`.
fn run_script(python: &Path, args: &[&Path], deadline: Duration) -> Outcome {
    let mut child = Command::new(python)
        .arg(common::root().join(SCRIPT))
        .args(args)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("spawn the client script");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for the client script") {
            break Some(st);
        }
        if start.elapsed() > deadline {
            // The group: the script, unshare and the VMM process the client started.
            // SAFETY: kill(2) on the process group this test created; no memory involved.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut output = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    output.push_str(&String::from_utf8_lossy(&t_err.join().unwrap_or_default()));
    let status = status.unwrap_or_else(|| {
        panic!("the client script did not finish within {deadline:?}; its output:\n{output}")
    });
    Outcome { status, output }
}

/// The checks the script prints, in order (see tests/clients/firecracker_python_client.py).
const CHECKS: &[&str] = &[
    "MicroVM.create() boots the VM",
    "MicroVM.list() shows it running",
    "GET / (Api.describe): its --id, state Running",
    "GET /version (Api.version)",
    "MicroVM.config() (GET /vm/config) returns what the client configured",
    "the guest reached userspace (FERRITE-USERSPACE on the console)",
    "MicroVM.pause() (PATCH /vm Paused)",
    "MicroVM.resume() (PATCH /vm Resumed)",
    "MicroVM.delete()",
    "the VMM process is gone after delete()",
    "delete() removed the VM's directory",
    "delete() removed the VM's TAP device",
];

/// Failed on Ferrite before its TAP lookup moved into the process's own network
/// namespace (tap.rs, if_nametoindex): at InstanceStart, because the client makes the
/// VM's TAP device in a network namespace of its own and Ferrite looked for it in
/// /sys/class/net, which showed the host's namespace ("no such network interface");
/// Firecracker opens it.
#[test]
fn firecracker_python_client_creates_pauses_resumes_and_deletes_a_microvm() {
    if !common::require_kvm() || !require_root() {
        return;
    }
    for tool in ["unshare", "ip", "mkfs.ext4"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            cannot_run(&format!("`{tool}` is not installed"));
            return;
        }
    }
    if !Path::new("/usr/lib/python3/dist-packages/nftables").exists() {
        cannot_run("Debian's python3-nftables is not installed (the client's NAT rules)");
        return;
    }
    let python = match client_python() {
        Ok(p) => p,
        Err(e) => {
            cannot_run(&format!("cannot install firecracker-python: {e}"));
            return;
        }
    };

    let dir = fc::scratch("pyclient");
    let binary = fc::firecracker_in(&dir);
    let kernel = fc::tier_a_dir().join("vmlinux");
    let initrd = fc::tier_a_dir().join("initramfs.cpio.gz");
    let r = run_script(&python, &[&binary, &kernel, &initrd, &dir], DEADLINE);
    eprintln!("{}", r.output);

    let ctx = format!("client script: {}; output:\n{}", r.status, r.output);
    assert!(r.status.success(), "{ctx}");
    assert!(r.output.contains("\nPYCLIENT-OK\n"), "{ctx}");
    let mut from = 0;
    for check in CHECKS {
        let line = format!("CHECK {check}: ok\n");
        let at = r.output[from..]
            .find(&line)
            .unwrap_or_else(|| panic!("missing or out of order: {line}{ctx}"));
        from += at + line.len();
    }
    // The console (the VMM's stdout) the script kept: the guest reached its /init.
    let console = std::fs::read_to_string(dir.join("firecracker.log")).unwrap_or_default();
    assert!(console.contains("FERRITE-USERSPACE"), "console:\n{console}");
    let _ = std::fs::remove_dir_all(&dir);
}
