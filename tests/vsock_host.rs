//! `--vsock`'s host side over a VM's life, seen from the host only (no vsock driver in
//! the guest needed): the UNIX socket exists while the VM runs and is gone after every
//! way it ends (guest power-off and reboot, `ferrite stop`, SIGTERM, a start that fails
//! after the device was built); a stale socket at the path is replaced; a live one, or
//! any other file, is refused at start with one clear line and left alone; bad
//! `--vsock` values are refused before anything starts.
//!
//! virtio devices need a Linux guest (bare test programs have no interrupt controller
//! for them), so the VMs here boot the tier-A kernel; the checks that need the VM
//! running do not wait for the guest beyond what they observe.

mod common;

use common::*;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// A boot of the emulated guest, to userspace and beyond (several may run at once on
/// two cores).
const BOOT: Duration = Duration::from_secs(300);
/// A refusal at start (before the guest runs).
const QUICK: Duration = Duration::from_secs(60);

fn kernel_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_recipe("tests/guests/linux/build-tier-a.sh"))
}

/// A private directory for one test (its run dir, sockets and files), removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        // Short: the vsock path must fit sockaddr_un with room for `_PORT`.
        let d = std::env::temp_dir().join(format!("fvs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `ferrite run` of the tier-A kernel as VM `name` with `--vsock cid=3,uds=UDS`, the
/// guest told `ferrite.test=MODE` (none: the interactive shell), its run dir in `dir`.
fn run_cmd(dir: &Scratch, name: &str, uds: &Path, mode: Option<&str>) -> Command {
    let k = kernel_dir();
    let mut cmdline = "console=ttyS0 reboot=k panic=-1".to_owned();
    if let Some(m) = mode {
        cmdline.push_str(&format!(" ferrite.test={m}"));
    }
    let mut cmd = ferrite();
    cmd.env("FERRITE_RUN_DIR", dir.path("run"))
        .args(["run", "--name", name, "--kernel"])
        .arg(k.join("vmlinux"))
        .arg("--initrd")
        .arg(k.join("initramfs.cpio.gz"))
        .args(["--cmdline", &cmdline, "--vsock"])
        .arg(format!("cid=3,uds={}", uds.display()));
    cmd
}

fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// Waits until `uds` is a socket that accepts connections (the VM is built and its
/// vsock device listens); fails the test with the VM's output otherwise.
fn wait_listening(vm: &mut Spawned, uds: &Path) {
    let ok = wait_until(BOOT, || {
        (is_socket(uds) && UnixStream::connect(uds).is_ok()) || vm.exited()
    });
    assert!(
        ok && !vm.exited(),
        "{} never listened while the VM ran\n{}",
        uds.display(),
        vm.ctx()
    );
}

fn assert_gone(uds: &Path, vm: &Spawned, after: &str) {
    assert!(
        std::fs::symlink_metadata(uds).is_err(),
        "{} is still there after {after}\n{}",
        uds.display(),
        vm.ctx()
    );
}

#[test]
fn vsock_socket_listens_while_the_vm_runs_and_is_removed_when_the_guest_powers_off() {
    if !require_kvm() {
        return;
    }
    let dir = Scratch::new("off");
    let uds = dir.path("v.sock");
    let mut vm = Spawned::start(run_cmd(&dir, "vs-off", &uds, Some("poweroff")), false);
    wait_listening(&mut vm, &uds);
    let st = vm.expect_exit(BOOT);
    assert_eq!(st.code(), Some(0), "power-off: {st}\n{}", vm.ctx());
    assert!(vm.stdout().contains("FERRITE-USERSPACE"), "{}", vm.ctx());
    assert_gone(&uds, &vm, "the guest powered off");
}

#[test]
fn vsock_socket_is_removed_when_the_guest_reboots() {
    if !require_kvm() {
        return;
    }
    let dir = Scratch::new("reboot");
    let uds = dir.path("v.sock");
    let mut vm = Spawned::start(run_cmd(&dir, "vs-reboot", &uds, Some("reboot")), false);
    wait_listening(&mut vm, &uds);
    let st = vm.expect_exit(BOOT);
    assert_eq!(st.code(), Some(0), "reboot: {st}\n{}", vm.ctx());
    assert!(vm.stdout().contains("FERRITE-USERSPACE"), "{}", vm.ctx());
    assert_gone(&uds, &vm, "the guest rebooted");
}

#[test]
fn vsock_socket_is_shown_by_the_control_api_and_removed_after_ferrite_stop() {
    if !require_kvm() {
        return;
    }
    let dir = Scratch::new("stop");
    let uds = dir.path("v.sock");
    let mut vm = Spawned::start(run_cmd(&dir, "vs-stop", &uds, None), true);
    wait_listening(&mut vm, &uds);
    // The control socket is bound after every device is built (the vsock one first):
    // wait for it as well.
    let control = dir.path("run").join("vs-stop.sock");
    let up = wait_until(BOOT, || {
        UnixStream::connect(&control).is_ok() || vm.exited()
    });
    assert!(
        up && !vm.exited(),
        "{} never listened while the VM ran\n{}",
        control.display(),
        vm.ctx()
    );
    let info: ferrite::control::protocol::InfoAnswer = api_answer(&control, "GET", "/vm");
    let shown = format!("uds {}", uds.display());
    assert!(
        info.devices
            .iter()
            .any(|d| d.starts_with("virtio-vsock cid 3") && d.contains(&shown)),
        "GET /vm devices do not show the vsock and its socket: {:?}",
        info.devices
    );
    let out = ferrite()
        .env("FERRITE_RUN_DIR", dir.path("run"))
        .args(["stop", "--hard", "vs-stop"])
        .output()
        .expect("ferrite stop");
    assert!(
        out.status.success(),
        "ferrite stop: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    vm.expect_exit(QUICK);
    assert_gone(&uds, &vm, "ferrite stop");
}

#[test]
fn stale_vsock_socket_is_replaced_and_the_new_one_removed_after_sigterm() {
    if !require_kvm() {
        return;
    }
    let dir = Scratch::new("term");
    let uds = dir.path("v.sock");
    // A socket nobody listens on any more (its process went without removing it).
    drop(UnixListener::bind(&uds).unwrap());
    assert!(is_socket(&uds) && UnixStream::connect(&uds).is_err());
    let mut vm = Spawned::start(run_cmd(&dir, "vs-term", &uds, None), true);
    // Replaced: a socket that listens is at the path.
    wait_listening(&mut vm, &uds);
    kill(vm.pid(), libc::SIGTERM);
    let st = vm.expect_exit(QUICK);
    assert!(!st.success(), "SIGTERM: {st}");
    assert_gone(&uds, &vm, "SIGTERM");
}

#[test]
fn vsock_socket_is_removed_when_the_start_fails_after_the_device_was_built() {
    if !require_kvm() {
        return;
    }
    let dir = Scratch::new("fail");
    let uds = dir.path("v.sock");
    // The control socket is bound after every device is built: a regular file at its
    // path fails the start there.
    let control = dir.path("c.sock");
    std::fs::write(&control, b"not a socket").unwrap();
    let mut cmd = run_cmd(&dir, "vs-fail", &uds, None);
    cmd.arg("--api-socket").arg(&control);
    let mut vm = Spawned::start(cmd, false);
    let st = vm.expect_exit(QUICK);
    assert_eq!(st.code(), Some(1), "{st}\n{}", vm.ctx());
    assert!(vm.stderr().contains("c.sock"), "{}", vm.ctx());
    assert_gone(&uds, &vm, "a failed start");
}

/// Runs `--vsock` on a path something else holds: refused with one line naming the
/// path, exit status 1, before the guest runs.
fn refused_at_start(dir: &Scratch, name: &str, uds: &Path) -> String {
    let mut vm = Spawned::start(run_cmd(dir, name, uds, None), false);
    let st = vm.expect_exit(QUICK);
    assert_eq!(st.code(), Some(1), "{st}\n{}", vm.ctx());
    assert!(
        !vm.stdout().contains("Linux version"),
        "the guest ran\n{}",
        vm.ctx()
    );
    let err = vm.stderr();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line: {err}");
    assert!(
        lines[0].starts_with("ferrite: error: ") && lines[0].contains(&*uds.to_string_lossy()),
        "the error does not name the path: {err}"
    );
    lines[0].to_owned()
}

#[test]
fn vsock_path_with_a_live_listener_is_refused_and_left_alone() {
    if !require_kvm() {
        return;
    }
    let dir = Scratch::new("live");
    let uds = dir.path("v.sock");
    let listener = UnixListener::bind(&uds).unwrap();
    let ino = std::fs::metadata(&uds).unwrap().ino();
    let line = refused_at_start(&dir, "vs-live", &uds);
    assert!(line.contains("in use"), "{line}");
    assert_eq!(std::fs::metadata(&uds).unwrap().ino(), ino, "replaced");
    // Still that listener's socket: a connection reaches it.
    let _c = UnixStream::connect(&uds).expect("the listener's socket no longer answers");
    listener.accept().expect("the listener got no connection");
}

#[test]
fn vsock_path_with_a_regular_file_is_refused_and_left_untouched() {
    if !require_kvm() {
        return;
    }
    let dir = Scratch::new("file");
    let uds = dir.path("v.sock");
    std::fs::write(&uds, b"precious").unwrap();
    let line = refused_at_start(&dir, "vs-file", &uds);
    assert!(line.contains("not a socket"), "{line}");
    assert_eq!(std::fs::read(&uds).unwrap(), b"precious");
}

#[test]
fn bad_vsock_values_are_refused_with_clear_messages() {
    let long = format!("/tmp/{}", "a".repeat(100));
    for (value, says) in [
        ("cid=2,uds=/tmp/v.sock", "0-2 are reserved"),
        ("cid=3", "uds=PATH is required"),
        ("uds=/tmp/v.sock", "cid=N is required"),
        ("cid=x,uds=/tmp/v.sock", "not a number"),
        ("cid=3,uds=/tmp/v.sock,port=1", "unknown vsock option"),
        (&format!("cid=3,uds={long}"), "at most 96"),
    ] {
        let r = run_ferrite(
            &["run", "--kernel", "/nonexistent", "--vsock", value],
            None,
            QUICK,
        );
        assert_eq!(r.code(), 2, "--vsock {value}: {}", r.stderr);
        assert!(
            r.stderr.contains("--vsock") && r.stderr.contains(says),
            "--vsock {value}: expected {says:?} in: {}",
            r.stderr
        );
    }
}
