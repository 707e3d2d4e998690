//! Running as an ordinary user (issue 18, "no root needed"): a user created by the test,
//! in the kvm group only, boots the tier-A guest with a disk, a TAP it owns, a balloon,
//! the control socket under its `$XDG_RUNTIME_DIR`, seccomp filters and Landlock on;
//! `ferrite list/stat/stop` as that user see and stop it. Without the kvm group the
//! start fails with the line naming the fix; a fallback run directory that another
//! user created first is refused.
//!
//! The host set-up is the operator's (README, "Running without root"): the tests make
//! /dev/kvm root:kvm 0660 and /dev/net/tun 0666 for their run and put the original
//! owner and mode back afterwards; the users, the kvm group (if the test made it) and
//! the TAP are deleted again, also when a test fails.
#![allow(unsafe_code)]

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(300);

/// The tests change /dev/kvm's group and mode for their run: one at a time.
static HOST: Mutex<()> = Mutex::new(());

fn kernel_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_recipe("tests/guests/linux/build-tier-a.sh"))
}

fn output(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn unique(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{tag}{}{}",
        std::process::id() % 100_000,
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    )
}

/// A device node's owner and mode, put back on drop.
struct DeviceMode {
    path: &'static str,
    uid: u32,
    gid: u32,
    mode: u32,
}

impl DeviceMode {
    fn set(path: &'static str, gid: Option<u32>, mode: u32) -> DeviceMode {
        let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let saved = DeviceMode {
            path,
            uid: m.uid(),
            gid: m.gid(),
            mode: m.mode() & 0o7777,
        };
        if let Some(g) = gid {
            std::os::unix::fs::chown(path, None, Some(g)).unwrap();
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        saved
    }
}

impl Drop for DeviceMode {
    fn drop(&mut self) {
        let _ = std::os::unix::fs::chown(self.path, Some(self.uid), Some(self.gid));
        let _ = std::fs::set_permissions(self.path, std::fs::Permissions::from_mode(self.mode));
    }
}

/// The kvm group (made if missing, deleted again then) and /dev/kvm root:kvm 0660.
struct KvmGroup {
    made: bool,
    _dev: Option<DeviceMode>,
}

impl KvmGroup {
    fn set_up() -> KvmGroup {
        let made = Command::new("getent")
            .args(["group", "kvm"])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true);
        if made {
            sh("groupadd", &["--system", "kvm"]);
        }
        let line = output("getent", &["group", "kvm"]);
        let gid = line.split(':').nth(2).unwrap().parse().unwrap();
        let mut g = KvmGroup { made, _dev: None };
        g._dev = Some(DeviceMode::set("/dev/kvm", Some(gid), 0o660));
        g
    }
}

impl Drop for KvmGroup {
    fn drop(&mut self) {
        self._dev = None;
        if self.made {
            let _ = Command::new("groupdel").arg("kvm").status();
        }
    }
}

/// An ordinary user made for the test (no home, no login shell), deleted on drop.
struct User {
    name: String,
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

impl User {
    fn new(extra_group: Option<&str>) -> User {
        let name = unique("fnr");
        let mut args = vec!["-M", "-s", "/usr/sbin/nologin"];
        if let Some(g) = extra_group {
            args.extend(["-G", g]);
        }
        args.push(&name);
        sh("useradd", &args);
        let mut u = User {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            name: name.clone(),
        };
        u.uid = output("id", &["-u", &name]).parse().unwrap();
        u.gid = output("id", &["-g", &name]).parse().unwrap();
        u.groups = output("id", &["-G", &name])
            .split_whitespace()
            .map(|g| g.parse().unwrap())
            .collect();
        assert_ne!(u.uid, 0);
        u
    }

    /// `program` run as this user (its groups only), with an environment of `env` and
    /// PATH, USER.
    fn command(&self, program: &Path, env: &[(&str, &Path)]) -> Command {
        let mut c = Command::new(program);
        c.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("USER", &self.name)
            .current_dir("/");
        for (k, v) in env {
            c.env(k, v);
        }
        let (uid, gid, groups) = (self.uid, self.gid, self.groups.clone());
        // SAFETY: the closure runs in the child between fork and exec; it calls only
        // setgroups, setgid and setuid (async-signal-safe) on data allocated before
        // the fork, and reports failure as an error.
        unsafe {
            c.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// A directory of the test's own (0755, root's), removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(unique(&format!("ferrite-noroot-{tag}-")));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        Dir(d)
    }

    /// A copy of `from` that everyone may read (and run, with `exec`).
    fn copy(&self, from: &Path, exec: bool) -> PathBuf {
        let to = self.0.join(from.file_name().unwrap());
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
        let mode = if exec { 0o755 } else { 0o644 };
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
        to
    }

    /// A directory (or file, if `file` is Some(size)) owned by `user`, mode 0700/0600.
    fn owned_by(&self, user: &User, name: &str, file: Option<u64>) -> PathBuf {
        let p = self.0.join(name);
        match file {
            Some(size) => {
                std::fs::File::create(&p).unwrap().set_len(size).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
            None => {
                std::fs::create_dir(&p).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
            }
        }
        std::os::unix::fs::chown(&p, Some(user.uid), Some(user.gid)).unwrap();
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A TAP device owned by `uid`, as an operator makes it beforehand; deleted on drop.
struct Tap(String);

impl Tap {
    fn new(uid: u32) -> Tap {
        let name = unique("fnrtap");
        sh(
            "ip",
            &[
                "tuntap",
                "add",
                "dev",
                &name,
                "mode",
                "tap",
                "user",
                &uid.to_string(),
            ],
        );
        Tap(name)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", "dev", &self.0])
            .status();
    }
}

/// `ferrite ARGS` as `user` with `env`: (status, stdout, stderr).
fn cli(user: &User, bin: &Path, env: &[(&str, &Path)], args: &[&str]) -> (i32, String, String) {
    let out = user
        .command(bin, env)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ferrite");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ordinary_user_in_the_kvm_group_runs_tier_a_with_disk_net_balloon_and_control_socket() {
    if !require_kvm() || !require_root("creates a user, a TAP and sets /dev/kvm's group") {
        return;
    }
    let kernel = kernel_dir().clone();
    let _host = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let _kvm = KvmGroup::set_up();
    let _tun = DeviceMode::set("/dev/net/tun", None, 0o666);
    let user = User::new(Some("kvm"));
    let tap = Tap::new(user.uid);
    let dir = Dir::new("boot");
    let bin = dir.copy(Path::new(env!("CARGO_BIN_EXE_ferrite")), true);
    let vmlinux = dir.copy(&kernel.join("vmlinux"), false);
    let initrd = dir.copy(&kernel.join("initramfs.cpio.gz"), false);
    let disk = dir.owned_by(&user, "disk.img", Some(1 << 20));
    let xdg = dir.owned_by(&user, "xdg", None);
    let env = [("XDG_RUNTIME_DIR", xdg.as_path())];
    let name = "noroot";

    let mut cmd = user.command(&bin, &env);
    cmd.args(["--log-level", "info", "run", "--name", name, "--landlock"])
        .arg("--kernel")
        .arg(&vmlinux)
        .arg("--initrd")
        .arg(&initrd)
        .args([
            "--mem",
            "256",
            "--mem-prealloc",
            "--balloon",
            "--rng",
            "--disk",
        ])
        .arg(&disk)
        .args(["--net", &format!("tap={}", tap.0)])
        .args(["--cmdline", "console=ttyS0 reboot=k panic=-1"]);
    let mut vm = Spawned::start(cmd, true);
    assert!(
        vm.wait_for_stdout("/ # ", DEADLINE),
        "no shell prompt: {}",
        vm.ctx()
    );
    // The guest sees its disk and network card.
    vm.send(b"ls /sys/block /sys/class/net\n");
    assert!(
        vm.wait_for_stdout("eth0", DEADLINE) && vm.wait_for_stdout("vda", DEADLINE),
        "no vda/eth0 in the guest: {}",
        vm.ctx()
    );

    let sock = xdg.join("ferrite").join(format!("{name}.sock"));
    let m = std::fs::symlink_metadata(&sock)
        .unwrap_or_else(|e| panic!("{}: {e}: {}", sock.display(), vm.ctx()));
    assert_eq!(m.uid(), user.uid, "the socket is the user's");
    let (code, out, err) = cli(&user, &bin, &env, &["list"]);
    assert_eq!(code, 0, "list: {out}{err}");
    assert!(out.lines().any(|l| l.starts_with(name)), "list: {out}{err}");
    let (code, out, err) = cli(&user, &bin, &env, &["stat", name]);
    assert_eq!(code, 0, "stat: {out}{err}");
    assert!(
        out.contains("balloon"),
        "stat shows the balloon: {out}{err}"
    );

    let (code, out, err) = cli(&user, &bin, &env, &["stop", "--hard", name]);
    assert_eq!(code, 0, "stop: {out}{err}");
    let status = vm.wait_exit(DEADLINE);
    assert!(status.is_some(), "still running after stop: {}", vm.ctx());
    assert!(!sock.exists(), "socket removed: {}", vm.ctx());
    let stderr = vm.stderr();
    assert!(
        stderr.contains("landlock: file access restricted to the named files"),
        "{}",
        vm.ctx()
    );
    assert!(!stderr.contains("seccomp:"), "{}", vm.ctx());
    // The entropy device reads /dev/urandom (the static build's getrandom crate does):
    // Landlock allows it.
    assert!(!stderr.contains("virtio-rng: bad request"), "{}", vm.ctx());
    assert!(!stderr.contains("error"), "{}", vm.ctx());
}

#[test]
fn user_outside_the_kvm_group_is_told_to_join_it() {
    if !require_kvm() || !require_root("creates a user and sets /dev/kvm's group") {
        return;
    }
    let _host = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let _kvm = KvmGroup::set_up();
    let user = User::new(None);
    let dir = Dir::new("nokvm");
    let bin = dir.copy(Path::new(env!("CARGO_BIN_EXE_ferrite")), true);
    let image = dir.copy(&guest("hello.bin"), false);
    let xdg = dir.owned_by(&user, "xdg", None);
    let env = [("XDG_RUNTIME_DIR", xdg.as_path())];
    let (code, out, err) = cli(
        &user,
        &bin,
        &env,
        &["run", "--kernel", image.to_str().unwrap(), "--mem", "16M"],
    );
    assert_eq!(code, 1, "{out}{err}");
    let want = format!(
        "ferrite: error: uid {} may not open /dev/kvm read-write (add the user to the kvm group",
        user.uid
    );
    let line = err
        .lines()
        .find(|l| l.starts_with(&want))
        .unwrap_or_else(|| panic!("no line starting {want:?} in:\n{err}"));
    assert!(line.ends_with("Permission denied (os error 13)"), "{line}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn fallback_run_dir_made_by_another_user_is_refused() {
    if !require_kvm() || !require_root("creates a user") {
        return;
    }
    let _host = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let _kvm = KvmGroup::set_up();
    let user = User::new(Some("kvm"));
    let dir = Dir::new("fallback");
    let bin = dir.copy(Path::new(env!("CARGO_BIN_EXE_ferrite")), true);
    let image = dir.copy(&guest("hello.bin"), false);
    // A shared temporary directory (like /tmp), where root got first to the name the
    // user's fallback run directory has.
    let tmp = dir.0.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let squatted = tmp.join(format!("ferrite-{}", user.uid));
    std::fs::create_dir(&squatted).unwrap();
    std::fs::set_permissions(&squatted, std::fs::Permissions::from_mode(0o700)).unwrap();
    let env = [("TMPDIR", tmp.as_path())];
    let want = format!(
        "refusing the control directory {}: it is owned by uid 0, not by uid {}",
        squatted.display(),
        user.uid
    );
    let (code, out, err) = cli(
        &user,
        &bin,
        &env,
        &["run", "--kernel", image.to_str().unwrap(), "--mem", "16M"],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains(&want), "run: {err}");
    let (code, out, err) = cli(&user, &bin, &env, &["list"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains(&want), "list: {err}");
    // Without the squatter, the user's own directory is made 0700.
    std::fs::remove_dir(&squatted).unwrap();
    let (code, out, err) = cli(
        &user,
        &bin,
        &env,
        &["run", "--kernel", image.to_str().unwrap(), "--mem", "16M"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let m = std::fs::symlink_metadata(&squatted).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (user.uid, 0o700));
}

#[test]
fn jail_as_an_ordinary_user_says_it_needs_root_and_makes_nothing() {
    if !require_root("creates a user") {
        return;
    }
    let user = User::new(None);
    let dir = Dir::new("jail");
    let bin = dir.copy(Path::new(env!("CARGO_BIN_EXE_ferrite")), true);
    let base = dir.0.join("base");
    std::fs::create_dir(&base).unwrap();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
    let uid = user.uid.to_string();
    let gid = user.gid.to_string();
    let (code, out, err) = cli(
        &user,
        &bin,
        &[],
        &[
            "jail",
            "--id",
            "t1",
            "--exec-file",
            bin.to_str().unwrap(),
            "--uid",
            &uid,
            "--gid",
            &gid,
            "--chroot-base-dir",
            base.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.starts_with(&format!(
            "ferrite jail: must run as root (uid {uid} is not)"
        )),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&base).unwrap().count(), 0, "nothing made");
}
