//! Issue 13, control socket path safety and `ferrite list` (defects 1, 2, 3, 4, 11):
//! Ferrite changes no directory it did not create, deletes nothing but a stale socket,
//! refuses an untrusted run directory (server and clients), falls back to a uid-named
//! directory for a user without XDG_RUNTIME_DIR, removes only its own socket on exit,
//! and `ferrite list` asks every VM at once with a short timeout.
//!
//! Defect 3 creates a pseudo-user (`useradd`, so these tests need root; without root
//! that test says it did not run).

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// A directory of the test's own with mode `mode`, removed on drop.
fn temp_dir(tag: &str, mode: u32) -> RunDir {
    let d = RunDir::new(tag);
    std::fs::create_dir(&d.0).unwrap();
    std::fs::set_permissions(&d.0, std::fs::Permissions::from_mode(mode)).unwrap();
    d
}

/// `ferrite run` of counter.elf (16 MiB) with `extra` arguments, not waited for.
fn spawn_vm(mut cmd: Command, extra: &[&str]) -> Child {
    let g = guest("counter.elf");
    cmd.args(["run", "--kernel", g.to_str().unwrap(), "--mem", "16M"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferrite")
}

fn wait_socket(sock: &Path) {
    assert!(
        wait_until(T, || UnixStream::connect(sock).is_ok()),
        "no control socket {}",
        sock.display()
    );
}

/// Runs `ferrite run` expecting it to fail at start; its stderr.
fn run_fails(cmd: Command, extra: &[&str]) -> String {
    let mut child = spawn_vm(cmd, extra);
    let status = wait_child(&mut child, T);
    let err = take_stderr(&mut child);
    assert_eq!(status.code(), Some(1), "{err}");
    err
}

#[test]
fn defect1_api_socket_in_an_existing_dir_keeps_the_dirs_mode() {
    if !require_kvm() {
        return;
    }
    // --api-socket in an existing 0755 directory: used as it is.
    let dir = temp_dir("d1", 0o755);
    let sock = dir.0.join("vm.sock");
    let mut child = spawn_vm(ferrite(), &["--api-socket", sock.to_str().unwrap()]);
    wait_socket(&sock);
    assert_eq!(mode(&dir.0), 0o755, "the directory's mode is unchanged");
    assert_eq!(mode(&sock), 0o600, "the socket is 0600");
    hard_stop(&sock);
    assert_eq!(wait_child(&mut child, T).code(), Some(0));
    assert!(!sock.exists(), "socket removed on exit");
    assert_eq!(mode(&dir.0), 0o755);

    // FERRITE_RUN_DIR naming an existing world-writable directory (like /tmp): refused
    // with a clear error, and its mode left alone.
    let open = temp_dir("d1open", 0o1777);
    let mut cmd = ferrite();
    cmd.env("FERRITE_RUN_DIR", &open.0);
    let err = run_fails(cmd, &["--name", "d1"]);
    assert!(
        err.contains(&open.0.display().to_string()) && err.contains("may write"),
        "{err}"
    );
    assert_eq!(mode(&open.0), 0o1777, "the directory's mode is unchanged");
    assert!(!open.sock("d1").exists());

    // A run directory Ferrite creates itself is private.
    let new = RunDir::new("d1new");
    let mut child = spawn_vm(new.ferrite(), &["--name", "d1"]);
    wait_socket(&new.sock("d1"));
    assert_eq!(mode(&new.0), 0o700);
    hard_stop(&new.sock("d1"));
    assert_eq!(wait_child(&mut child, T).code(), Some(0));
}

#[test]
fn defect2_a_file_or_device_at_the_socket_path_is_left_intact() {
    if !require_kvm() {
        return;
    }
    let dir = temp_dir("d2", 0o700);
    // A regular file given as --api-socket.
    let precious = dir.0.join("precious.txt");
    std::fs::write(&precious, b"keep me").unwrap();
    let err = run_fails(ferrite(), &["--api-socket", precious.to_str().unwrap()]);
    assert!(
        err.contains(&precious.display().to_string()) && err.contains("regular file"),
        "{err}"
    );
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");

    // A regular file NAME.sock in the run directory.
    std::fs::write(dir.sock("file"), b"keep me too").unwrap();
    let err = run_fails(dir.ferrite(), &["--name", "file"]);
    assert!(err.contains("regular file, not a socket"), "{err}");
    assert_eq!(std::fs::read(dir.sock("file")).unwrap(), b"keep me too");

    // A FIFO, and (as root) a /dev/null-like character device.
    let fifo = dir.0.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let err = run_fails(ferrite(), &["--api-socket", fifo.to_str().unwrap()]);
    assert!(err.contains("FIFO"), "{err}");
    assert!(std::fs::symlink_metadata(&fifo).is_ok(), "FIFO kept");
    let null = dir.0.join("null");
    let made = Command::new("mknod")
        .arg(&null)
        .args(["c", "1", "3"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if made {
        let err = run_fails(ferrite(), &["--api-socket", null.to_str().unwrap()]);
        assert!(err.contains("character device"), "{err}");
        let m = std::fs::symlink_metadata(&null).expect("device kept");
        assert_eq!(m.rdev(), libc::makedev(1, 3));
    } else {
        common::record_not_run("not root: the character-device case did not run");
    }
    // The client leaves a non-socket alone too.
    let (code, _, err) = dir.cli(&["pause", "file"]);
    assert_ne!(code, 0);
    assert!(err.contains("regular file"), "{err}");
    assert!(dir.sock("file").exists());
}

/// A pseudo-user made for the test (`useradd`), removed on drop if the test made it.
struct PseudoUser {
    name: &'static str,
    uid: u32,
    gid: u32,
    made: bool,
}

impl PseudoUser {
    fn new() -> Option<PseudoUser> {
        let name = "ferrite-t13";
        let id = |flag: &str| -> Option<u32> {
            let out = Command::new("id").args([flag, name]).output().ok()?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        let mut made = false;
        if id("-u").is_none() {
            let ok = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                ])
                .arg(name)
                .status()
                .is_ok_and(|s| s.success());
            // A concurrent run may have made it meanwhile: only the lookup counts.
            made = ok;
        }
        Some(PseudoUser {
            name,
            uid: id("-u")?,
            gid: id("-g")?,
            made,
        })
    }

    /// `ferrite ARGS` as this user, with a clean environment (no XDG_RUNTIME_DIR, no
    /// FERRITE_RUN_DIR, no TMPDIR).
    fn ferrite(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new("setpriv")
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg(env!("CARGO_BIN_EXE_ferrite"))
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .current_dir("/")
            .output()
            .expect("run setpriv");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for PseudoUser {
    fn drop(&mut self) {
        if self.made {
            let _ = Command::new("userdel").arg(self.name).status();
        }
    }
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

#[test]
fn defect3_untrusted_run_dirs_are_refused_and_non_root_falls_back_to_a_uid_named_dir() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI runs as root: the pseudo-user test must run"
        );
        common::record_not_run("needs root to create a pseudo-user");
        return;
    }
    let Some(user) = PseudoUser::new() else {
        panic!("cannot create or find the pseudo-user ferrite-t13 (useradd)");
    };
    let base = temp_dir("d3", 0o755);
    // The other user's directory, holding a socket that answers like a VM would.
    let theirs = base.0.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fake = theirs.join("victim.sock");
    let listener = UnixListener::bind(&fake).unwrap();
    listener.set_nonblocking(true).unwrap();
    chown(&fake, user.uid, user.gid);
    chown(&theirs, user.uid, user.gid);
    // The run directory root would use is a symbolic link to it.
    let link = base.0.join("run");
    std::os::unix::fs::symlink(&theirs, &link).unwrap();

    let with_dir = |dir: &Path| {
        let mut c = ferrite();
        c.env("FERRITE_RUN_DIR", dir);
        c
    };
    let cli = |dir: &Path, args: &[&str]| {
        let out = with_dir(dir).args(args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (dir, why) in [(&link, "symbolic link"), (&theirs, "owned by uid")] {
        for args in [
            &["list"][..],
            &["pause", "victim"],
            &["stop", "victim", "--hard"],
        ] {
            let (code, err) = cli(dir, args);
            assert_eq!(code, 1, "{args:?} in {}: {err}", dir.display());
            assert!(
                err.contains(&dir.display().to_string()) && err.contains(why),
                "{args:?}: {err}"
            );
        }
    }
    assert!(
        listener.accept().is_err(),
        "no client talked to the other user's socket"
    );
    if require_kvm() {
        let err = run_fails(with_dir(&link), &["--name", "victim"]);
        assert!(err.contains("symbolic link"), "{err}");
    }
    assert_eq!(
        mode(&theirs),
        0o755,
        "the other user's directory is unchanged"
    );
    assert_eq!(std::fs::symlink_metadata(&theirs).unwrap().uid(), user.uid);

    // A user without XDG_RUNTIME_DIR once root has made /run/ferrite: not "Operation
    // not permitted" but a directory of its own named after its uid.
    let run = Path::new("/run/ferrite");
    let made_run = std::fs::create_dir(run).is_ok();
    if made_run {
        std::fs::set_permissions(run, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let fallback = PathBuf::from(format!("/tmp/ferrite-{}", user.uid));
    let _ = std::fs::remove_dir_all(&fallback);
    let (code, out, err) = user.ferrite(&["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("NAME"), "{out}");
    assert!(!err.contains("/run/ferrite"), "{err}");
    // The fallback is named after the uid, and is itself checked: one planted by
    // someone else (here a symbolic link made by root) is refused.
    std::os::unix::fs::symlink(&theirs, &fallback).unwrap();
    let (code, _, err) = user.ferrite(&["list"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&fallback.display().to_string()) && err.contains("symbolic link"),
        "{err}"
    );
    let _ = std::fs::remove_file(&fallback);
    if made_run {
        let _ = std::fs::remove_dir(run);
    }
}

#[test]
fn defect4_an_exiting_vm_leaves_a_second_vms_socket_of_the_same_name() {
    if !require_kvm() {
        return;
    }
    let dir = RunDir::new("d4");
    let mut first = dir.start("same", "counter.elf", &[]);
    let sock = dir.sock("same");
    std::fs::remove_file(&sock).unwrap();
    let mut second = dir.start("same", "counter.elf", &[]);
    // The first VM ends in an orderly way (SIGTERM drops its socket guard).
    kill(first.id(), libc::SIGTERM);
    assert_eq!(wait_child(&mut first, T).code(), Some(143));
    assert!(sock.exists(), "the second VM's socket is still there");
    let v: ferrite::control::protocol::InfoAnswer = api_answer(&sock, "GET", "/vm");
    assert_eq!(v.pid, second.id(), "the second VM answers");
    hard_stop(&sock);
    assert_eq!(wait_child(&mut second, T).code(), Some(0));
    assert!(!sock.exists(), "the second VM removes its own socket");
}

#[test]
fn defect11_list_asks_all_vms_at_once_with_a_short_timeout_and_says_why() {
    let dir = temp_dir("d11", 0o700);
    // Three listeners that accept and never answer.
    let mut held = Vec::new();
    let mut listeners = Vec::new();
    for name in ["a", "b", "c"] {
        let l = UnixListener::bind(dir.sock(name)).unwrap();
        listeners.push(l.try_clone().unwrap());
        held.push(std::thread::spawn(move || {
            let mut conns = Vec::new();
            for s in l.incoming() {
                match s {
                    Ok(s) => conns.push(s),
                    Err(_) => break,
                }
                if conns.len() >= 4 {
                    break;
                }
            }
            std::thread::sleep(Duration::from_secs(5));
        }));
    }
    // One that reads the request and answers garbage.
    let garbage = UnixListener::bind(dir.sock("d")).unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut s, _)) = garbage.accept() {
            let mut req = Vec::new();
            let mut b = [0u8; 512];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut b) {
                    Ok(n) if n > 0 => req.extend_from_slice(&b[..n]),
                    _ => break,
                }
            }
            let _ = s.write_all(b"garbage\r\n\r\n");
        }
    });
    // A stale socket (removed) and a regular file (left alone, named).
    drop(UnixListener::bind(dir.sock("stale")).unwrap());
    std::fs::write(dir.sock("file"), b"x").unwrap();

    let t0 = Instant::now();
    let (code, out, err) = dir.cli(&["list"]);
    let took = t0.elapsed();
    eprintln!("ferrite list with 3 unresponsive VMs took {took:?}");
    assert_eq!(code, 0, "{err}");
    assert!(
        took < Duration::from_millis(2500),
        "took {took:?} (all VMs asked at once, 1 s timeout)"
    );
    for name in ["a", "b", "c"] {
        assert!(
            err.contains(&format!("VM '{name}' left out: timed out")),
            "{name}: {err}"
        );
    }
    assert!(err.contains("VM 'd' left out: bad reply"), "{err}");
    assert!(err.contains("regular file, not a socket"), "{err}");
    assert!(!dir.sock("stale").exists(), "stale socket removed");
    assert!(dir.sock("file").exists(), "regular file kept");
    assert_eq!(out.lines().count(), 1, "only the header: {out}");
    drop(listeners);
}
