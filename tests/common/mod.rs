//! Shared helpers for the integration tests: building the test guests, running the
//! `ferrite` binary with a deadline, and the /dev/kvm policy.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Assembles the guests once per test binary and returns their directory.
pub fn guests_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = root().join("target").join("guests");
        let status = Command::new("bash")
            .arg(root().join("tests/guests/build-asm.sh"))
            .arg(&out)
            .status()
            .expect("run tests/guests/build-asm.sh");
        assert!(
            status.success(),
            "building the test guests failed: {status}"
        );
        out
    })
}

pub fn guest(name: &str) -> PathBuf {
    let p = guests_dir().join(name);
    assert!(p.exists(), "test guest {} was not built", p.display());
    p
}

/// Whether KVM tests can run. Under CI (`CI=true`) a missing /dev/kvm is a failure;
/// elsewhere the test says loudly that it did not run.
pub fn require_kvm() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("/dev/kvm is required under CI but cannot be opened: {e}");
            }
            eprintln!("NOT RUN: /dev/kvm cannot be opened ({e}); set up KVM to run this test");
            false
        }
    }
}

pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.status
            .unwrap_or_else(|| panic!("ferrite was killed by a signal; stderr:\n{}", self.stderr))
    }
}

pub fn ferrite() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferrite"))
}

/// Runs `ferrite ARGS` with `input` on stdin (closed after writing), killing it after
/// `deadline`. Fails the test on timeout.
pub fn run_ferrite(args: &[&str], input: Option<&[u8]>, deadline: Duration) -> Run {
    let mut cmd = ferrite();
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    run_with_deadline(cmd, input, deadline)
}

/// Runs `cmd` with stdin from /dev/null and piped output, killing it after `deadline`.
pub fn run_with_deadline_stdin_null(mut cmd: Command, deadline: Duration) -> Run {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    run_with_deadline(cmd, None, deadline)
}

pub fn run_with_deadline(mut cmd: Command, input: Option<&[u8]>, deadline: Duration) -> Run {
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn ferrite");
    if let Some(bytes) = input {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(bytes).expect("write stdin");
    }
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
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = String::from_utf8_lossy(&t_out.join().unwrap()).into_owned();
            let stderr = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
            panic!(
                "ferrite did not finish within {deadline:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        status: status.code(),
        stdout: String::from_utf8_lossy(&t_out.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap()).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// Runs a guest-recipe script (tests/guests/...) that prints its cache directory on
/// its last stdout line; progress goes to stderr (shown by the test harness).
pub fn build_recipe(script: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(root().join(script))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(out.status.success(), "{script} failed: {}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout.lines().last().unwrap_or_default().trim();
    let dir = PathBuf::from(dir);
    assert!(
        dir.is_dir(),
        "{script} printed no cache directory: {stdout}"
    );
    dir
}

/// The value of a `KEY=value` line in guest output (carriage returns ignored).
pub fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .map(|l| l.trim_end_matches('\r'))
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}
