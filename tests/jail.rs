//! `ferrite jail`: Ferrite started by itself in a jail (its own root, uid/gid, cgroup v2
//! leaf, limits, optionally a new PID namespace) boots the tier-A guest, and what the
//! jailed process sees is checked from outside through /proc. Also the refusals: a bad
//! id, a missing exec file, an existing jail directory — one line, non-zero status,
//! nothing left behind that the jail made.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(300);
const UID: u32 = 40001;
const GID: u32 = 40002;

fn kernel_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_recipe("tests/guests/linux/build-tier-a.sh"))
}

fn ferrite_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferrite")
}

/// A fresh chroot base directory for one test.
fn base_dir(tag: &str) -> PathBuf {
    let d =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("jail-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every path under `dir` (relative), sorted.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The host's cgroup v2 mount point. Missing: a failure under CI, else not run.
fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let root = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    });
    if root.is_none() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "under CI a cgroup v2 hierarchy must be mounted (no cgroup2 line in /proc/mounts)"
        );
        record_not_run("no cgroup v2 hierarchy is mounted");
    }
    root
}

/// The root cgroup's `cgroup.subtree_control` as it was before the first jail of this
/// test binary, and how many jails are running: the last one to finish puts back
/// what the jail enabled (so the host is left as found).
static SUBTREE: Mutex<(Option<String>, usize)> = Mutex::new((None, 0));

/// A running jailed Ferrite and what to clean up.
struct Jailed {
    f: Spawned,
    id: String,
    base: PathBuf,
    cg_root: PathBuf,
    cg_parent: String,
    /// The `--cgroup` settings passed, to read back.
    settings: Vec<(String, String)>,
}

impl Jailed {
    fn root(&self) -> PathBuf {
        self.base.join("ferrite").join(&self.id).join("root")
    }
    fn leaf(&self) -> PathBuf {
        self.cg_root.join(&self.cg_parent).join(&self.id)
    }
}

impl Drop for Jailed {
    fn drop(&mut self) {
        // The VMM may outlive a failed test (with --new-pid-ns it is not our child).
        if let Ok(pid) = std::fs::read_to_string(self.root().join("ferrite.pid")) {
            if let Ok(pid) = pid.trim().parse::<u32>() {
                if Path::new(&format!("/proc/{pid}")).exists() {
                    kill(pid, libc::SIGKILL);
                    wait_until(Duration::from_secs(10), || {
                        !Path::new(&format!("/proc/{pid}")).exists()
                    });
                }
            }
        }
        let _ = std::fs::remove_dir(self.leaf());
        let _ = std::fs::remove_dir(self.cg_root.join(&self.cg_parent));
        let mut s = SUBTREE.lock().unwrap_or_else(|e| e.into_inner());
        s.1 -= 1;
        if s.1 == 0 {
            let before = s.0.take().unwrap_or_default();
            let control = self.cg_root.join("cgroup.subtree_control");
            let now = std::fs::read_to_string(&control).unwrap_or_default();
            for c in now.split_whitespace() {
                if !before.split_whitespace().any(|b| b == c) {
                    let _ = std::fs::write(&control, format!("-{c}"));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Starts `ferrite jail` on the tier-A guest's interactive shell, with the cgroup
/// limits this host's v2 hierarchy can take, and waits for the shell prompt.
fn start(id: &str, new_pid_ns: bool) -> Option<Jailed> {
    if !require_root("ferrite jail makes device nodes, namespaces and cgroups") || !require_kvm() {
        return None;
    }
    let cg_root = cgroup2_root()?;
    let available = std::fs::read_to_string(cg_root.join("cgroup.controllers")).unwrap();
    let available: Vec<&str> = available.split_whitespace().collect();
    // Core files always; the controllers' files where this host's v2 hierarchy has them
    // (hosts that keep memory and pids on cgroup v1 have neither in v2).
    let mut settings = vec![
        ("cgroup.max.descendants".to_string(), "3".to_string()),
        ("cgroup.max.depth".to_string(), "2".to_string()),
    ];
    if available.contains(&"memory") {
        settings.push(("memory.max".into(), "1073741824".into()));
    }
    if available.contains(&"pids") {
        settings.push(("pids.max".into(), "64".into()));
    }
    if available.contains(&"hugetlb")
        && Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB").exists()
    {
        settings.push(("hugetlb.2MB.max".into(), "0".into()));
    }
    eprintln!(
        "cgroup v2 at {}: controllers {available:?}; writing {settings:?}",
        cg_root.display()
    );
    {
        let mut s = SUBTREE.lock().unwrap_or_else(|e| e.into_inner());
        if s.1 == 0 {
            s.0 = Some(std::fs::read_to_string(cg_root.join("cgroup.subtree_control")).unwrap());
        }
        s.1 += 1;
    }
    let base = base_dir(id);
    let k = kernel_dir();
    let cg_parent = format!("ferrite-test-{}", std::process::id());
    let mut cmd = Command::new(ferrite_bin());
    cmd.args(["jail", "--id", id, "--exec-file", ferrite_bin()])
        .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
        .arg("--chroot-base-dir")
        .arg(&base)
        .args([
            "--parent-cgroup",
            &cg_parent,
            "--resource-limit",
            "no-file=1000",
        ])
        .arg("--link-file")
        .arg(k.join("vmlinux"))
        .arg("--link-file")
        .arg(k.join("initramfs.cpio.gz"));
    for (file, value) in &settings {
        cmd.arg("--cgroup").arg(format!("{file}={value}"));
    }
    if new_pid_ns {
        cmd.arg("--new-pid-ns");
    }
    cmd.args([
        "--",
        "--log-level",
        "info",
        "run",
        "--mem",
        "256",
        "--kernel",
        "/vmlinux",
    ])
    .args([
        "--initrd",
        "/initramfs.cpio.gz",
        "--api-socket",
        "/run/ferrite.sock",
    ]);
    let j = Jailed {
        f: Spawned::start(cmd, true),
        id: id.to_string(),
        base,
        cg_root,
        cg_parent,
        settings,
    };
    assert!(
        wait_until(DEADLINE, || j.f.out.text().contains("/ # ")),
        "no shell prompt from the jailed Ferrite: {}",
        j.f.ctx()
    );
    Some(j)
}

fn pid_of(j: &Jailed) -> u32 {
    let text =
        std::fs::read_to_string(j.root().join("ferrite.pid")).expect("the jail's ferrite.pid");
    text.trim().parse().expect("a pid in ferrite.pid")
}

fn status_field(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// What every jailed Ferrite shows from outside: its root, ids, cgroup, limits and
/// environment.
fn check_confinement(j: &Jailed, pid: u32) {
    let ctx = j.f.ctx();
    let proc_root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut entries: Vec<String> = std::fs::read_dir(&proc_root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        [
            "dev",
            "ferrite",
            "ferrite.pid",
            "initramfs.cpio.gz",
            "run",
            "vmlinux"
        ],
        "the jailed process's root: {ctx}"
    );
    let mut devs = tree(&proc_root.join("dev"));
    devs.sort();
    let uffd = std::fs::read_to_string("/proc/misc")
        .unwrap()
        .contains(" userfaultfd");
    let mut want = vec!["kvm", "net", "net/tun", "urandom"];
    if uffd {
        want.push("userfaultfd");
    }
    assert_eq!(devs, want, "/dev in the jail: {ctx}");
    for (path, major, minor) in [
        ("dev/kvm", 10, 232),
        ("dev/net/tun", 10, 200),
        ("dev/urandom", 1, 9),
    ] {
        let m = std::fs::metadata(proc_root.join(path)).unwrap();
        let (ma, mi) = (libc::major(m.rdev()), libc::minor(m.rdev()));
        assert_eq!(
            (ma, mi, m.mode() & 0o7777, m.uid(), m.gid()),
            (major, minor, 0o600, UID, GID),
            "{path}"
        );
    }
    // The program is a copy owned by the jail's ids, not a link to the host's binary.
    let exe = std::fs::metadata(proc_root.join("ferrite")).unwrap();
    assert_eq!((exe.nlink(), exe.uid(), exe.gid()), (1, UID, GID));
    assert_eq!(
        status_field(pid, "Uid"),
        format!("{UID} {UID} {UID} {UID}"),
        "{ctx}"
    );
    assert_eq!(
        status_field(pid, "Gid"),
        format!("{GID} {GID} {GID} {GID}"),
        "{ctx}"
    );
    assert_eq!(status_field(pid, "Groups"), "", "no supplementary groups");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let want_leaf = format!("0::/{}/{}", j.cg_parent, j.id);
    assert!(
        cgroup.lines().any(|l| l == want_leaf),
        "cgroup {want_leaf:?} not in /proc/{pid}/cgroup:\n{cgroup}"
    );
    for (file, value) in &j.settings {
        let got = std::fs::read_to_string(j.leaf().join(file)).unwrap();
        assert_eq!(got.trim(), value, "{file} in {}", j.leaf().display());
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        open_files.split_whitespace().collect::<Vec<_>>()[3..5],
        ["1000", "1000"],
        "{open_files}"
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ.is_empty(),
        "environment not cleared: {:?}",
        String::from_utf8_lossy(&environ)
    );
}

#[test]
fn jailed_ferrite_boots_tier_a_in_its_own_root_as_the_given_ids_in_its_cgroup_leaf() {
    let Some(mut j) = start("tier-a-1", false) else {
        return;
    };
    // Without --new-pid-ns the jail exec's Ferrite: the same process.
    let pid = pid_of(&j);
    assert_eq!(pid, j.f.pid());
    check_confinement(&j, pid);
    assert_eq!(status_field(pid, "NSpid"), pid.to_string());
    j.f.send(b"reboot\n");
    let status = j.f.expect_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", j.f.ctx());
    assert!(
        j.f.err.text().contains("guest requested reset"),
        "{}",
        j.f.ctx()
    );
}

#[test]
fn jailed_ferrite_with_new_pid_ns_is_pid_1_of_its_namespace() {
    let Some(mut j) = start("tier-a-2", true) else {
        return;
    };
    let pid = pid_of(&j);
    // The jail forked the VMM into the new namespace and exited 0 (only polled: the
    // VMM still holds the output pipes and our stdin).
    assert!(
        wait_until(Duration::from_secs(10), || j.f.exited()),
        "the jail did not exit after forking: {}",
        j.f.ctx()
    );
    assert_eq!(j.f.status.and_then(|s| s.code()), Some(0), "{}", j.f.ctx());
    assert_ne!(pid, j.f.pid());
    check_confinement(&j, pid);
    assert_eq!(status_field(pid, "NSpid"), format!("{pid} 1"));
    j.f.send(b"reboot\n");
    assert!(
        wait_until(DEADLINE, || !Path::new(&format!("/proc/{pid}")).exists()),
        "the jailed VMM did not end after reboot: {}",
        j.f.ctx()
    );
    assert!(
        wait_until(Duration::from_secs(10), || j
            .f
            .err
            .text()
            .contains("guest requested reset")),
        "{}",
        j.f.ctx()
    );
}

fn jail_cmd(base: &Path, id: &str, exec: &str, extra: &[&str]) -> Run {
    let mut cmd = Command::new(ferrite_bin());
    cmd.args([
        "jail",
        "--id",
        id,
        "--exec-file",
        exec,
        "--uid",
        "1",
        "--gid",
        "1",
    ])
    .arg("--chroot-base-dir")
    .arg(base)
    .args(extra)
    .args(["--", "run", "--kernel", "/none"]);
    run_with_deadline_stdin_null(cmd, Duration::from_secs(30))
}

/// A refusal: status 1, one line on stderr containing `needle`, nothing on stdout.
fn assert_refused(r: &Run, needle: &str) {
    let ctx = format!("stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert_eq!(r.code(), 1, "{ctx}");
    assert_eq!(r.stderr.lines().count(), 1, "{ctx}");
    assert!(
        r.stderr.starts_with("ferrite jail: ") && r.stderr.contains(needle),
        "{ctx}"
    );
}

#[test]
fn jail_refuses_a_bad_id_in_one_line_and_creates_nothing() {
    let base = base_dir("bad-id");
    for id in ["a b", "../x", "x/y", "", "a_b", &"a".repeat(65)] {
        let r = jail_cmd(&base, id, ferrite_bin(), &[]);
        assert_refused(&r, "invalid jail id");
        assert!(tree(&base).is_empty(), "{id:?} left {:?}", tree(&base));
    }
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn jail_refuses_a_missing_exec_file_in_one_line_and_creates_nothing() {
    let base = base_dir("no-exec");
    let missing = base.join("no-such-vmm");
    let r = jail_cmd(&base, "t1", missing.to_str().unwrap(), &[]);
    assert_refused(&r, &format!("exec file {}", missing.display()));
    assert!(tree(&base).is_empty(), "left {:?}", tree(&base));
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn jail_refuses_an_existing_jail_dir_and_leaves_it_as_it_was() {
    let base = base_dir("exists");
    let root = base.join("ferrite/t1/root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("operator-file"), "keep").unwrap();
    let before = tree(&base);
    let r = jail_cmd(&base, "t1", ferrite_bin(), &[]);
    assert_refused(
        &r,
        &format!("{} already exists", base.join("ferrite/t1").display()),
    );
    assert_eq!(tree(&base), before);
    assert_eq!(
        std::fs::read_to_string(root.join("operator-file")).unwrap(),
        "keep"
    );
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn jail_failing_after_making_its_dir_removes_only_what_it_made() {
    if !require_root("the jail makes device nodes before it joins the network namespace") {
        return;
    }
    // A failure late in the preparation (the network namespace to join is missing):
    // the jail's directory, and the <exec name> directory it made, are gone again;
    // an operator's file beside them stays.
    let base = base_dir("late");
    std::fs::write(base.join("operator-file"), "keep").unwrap();
    let r = jail_cmd(
        &base,
        "t1",
        ferrite_bin(),
        &["--netns", "/nonexistent/netns"],
    );
    assert_refused(&r, "cannot open network namespace /nonexistent/netns");
    assert_eq!(tree(&base), ["operator-file"]);
    // With the <exec name> directory already there (the operator's), it stays.
    std::fs::create_dir(base.join("ferrite")).unwrap();
    let r = jail_cmd(
        &base,
        "t1",
        ferrite_bin(),
        &["--netns", "/nonexistent/netns"],
    );
    assert_refused(&r, "network namespace");
    assert_eq!(tree(&base), ["ferrite", "operator-file"]);
    // A cgroup file the kernel refuses: the cgroup directories the jail made go too.
    if let Some(cg_root) = cgroup2_root() {
        let parent = format!("ferrite-test-late-{}", std::process::id());
        let r = jail_cmd(
            &base,
            "t1",
            ferrite_bin(),
            &[
                "--parent-cgroup",
                &parent,
                "--cgroup",
                "cgroup.max.descendants=lots",
            ],
        );
        assert_refused(&r, "cannot write \"lots\" to");
        assert!(
            !cg_root.join(&parent).exists(),
            "cgroup {parent} left behind"
        );
        assert_eq!(tree(&base), ["ferrite", "operator-file"]);
    }
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn binary_run_as_jailer_starts_the_firecracker_front_door_with_the_jail_id() {
    if !require_root("the jail makes device nodes and a mount namespace") {
        return;
    }
    // Tools that start Firecracker through its jailer: `jailer --id ... --exec-file
    // .../firecracker -- --api-sock ...`, where both are Ferrite (a link named
    // `jailer`, a copy named `firecracker`). As Firecracker's jailer, the jail passes
    // `--id <id>` to the program; GET / on the jailed API socket answers with it.
    use std::io::{Read, Write};
    let base = base_dir("jailer-link");
    let bin = base.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(ferrite_bin(), bin.join("jailer")).unwrap();
    std::fs::copy(ferrite_bin(), bin.join("firecracker")).unwrap();
    let mut cmd = Command::new(bin.join("jailer"));
    cmd.args([
        "--id",
        "fc-1",
        "--uid",
        &UID.to_string(),
        "--gid",
        &GID.to_string(),
    ])
    .arg("--exec-file")
    .arg(bin.join("firecracker"))
    .arg("--chroot-base-dir")
    .arg(&base)
    .args(["--", "--api-sock", "/run/api.sock"]);
    let mut f = Spawned::start(cmd, false);
    let root = base.join("firecracker/fc-1/root");
    let sock = root.join("run/api.sock");
    let mut answer = String::new();
    let got = wait_until(Duration::from_secs(30), || {
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) else {
            return false;
        };
        answer.clear();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .is_ok()
            && s.read_to_string(&mut answer).is_ok()
            && answer.contains("\"id\"")
    });
    assert!(
        got,
        "no answer on {}: {answer}\n{}",
        sock.display(),
        f.ctx()
    );
    assert!(answer.contains("\"id\":\"fc-1\""), "{answer}");
    assert_eq!(
        std::fs::read_to_string(root.join("firecracker.pid"))
            .unwrap()
            .trim(),
        f.pid().to_string()
    );
    kill(f.pid(), libc::SIGTERM);
    f.expect_exit(Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn daemonized_jail_detaches_the_program_onto_dev_null_in_a_new_session() {
    if !require_root("the jail makes device nodes and a mount namespace") {
        return;
    }
    // --daemonize: the jail forks twice and exits 0; the program (the grandchild,
    // whose pid the pid file holds) has its own session and /dev/null as 0-2.
    use std::os::unix::fs::FileTypeExt;
    let base = base_dir("daemon");
    let mut cmd = Command::new(ferrite_bin());
    cmd.args([
        "jail",
        "--id",
        "d1",
        "--uid",
        &UID.to_string(),
        "--gid",
        &GID.to_string(),
    ])
    .args(["--exec-file", ferrite_bin(), "--daemonize"])
    .arg("--chroot-base-dir")
    .arg(&base)
    .args([
        "--",
        "firecracker",
        "--api-sock",
        "/run/api.sock",
        "--id",
        "d1",
    ]);
    let mut f = Spawned::start(cmd, false);
    let status = f.expect_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", f.ctx());
    let root = base.join("ferrite/d1/root");
    let pid: u32 = std::fs::read_to_string(root.join("ferrite.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let alive = wait_until(Duration::from_secs(30), || {
        root.join("run/api.sock").exists()
    });
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let std_fds: Vec<Option<(bool, u32, u32)>> = (0..3)
        .map(|fd| {
            let m = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).ok()?;
            Some((
                m.file_type().is_char_device(),
                libc::major(m.rdev()),
                libc::minor(m.rdev()),
            ))
        })
        .collect();
    kill(pid, libc::SIGKILL);
    assert!(alive, "the daemonized program never made its API socket");
    // Fields after the command name: state ppid pgrp session.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    assert_ne!(fields.get(3).copied(), Some(f.pid().to_string().as_str()));
    assert_ne!(fields.get(3).copied(), Some("0"), "{stat}");
    let own_sid = {
        // SAFETY: getsid(0) only returns this process's session id.
        unsafe { libc::getsid(0) }
    };
    assert_ne!(
        fields.get(3).copied(),
        Some(own_sid.to_string().as_str()),
        "still in the test's session: {stat}"
    );
    assert_eq!(
        std_fds,
        vec![Some((true, 1, 3)); 3],
        "fds 0-2 are not /dev/null"
    );
    assert_eq!(f.out.text(), "", "the program wrote to the jail's stdout");
    wait_until(Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    let _ = std::fs::remove_dir_all(&base);
}
