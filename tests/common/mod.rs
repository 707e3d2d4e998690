//! Shared helpers for the integration tests: building the test guests, running the
//! `ferrite` binary with a deadline, and the /dev/kvm policy.
#![allow(dead_code)]

pub mod fc;
pub mod tier_a;

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
/// elsewhere the test says loudly that it did not run and records its name in
/// `target/not-run.log`, which `scripts/test.sh` counts and prints.
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
            record_not_run(&format!(
                "/dev/kvm cannot be opened ({e}); set up KVM to run this test"
            ));
            false
        }
    }
}

/// Says loudly that the current test did not run and why, and records it in
/// `target/not-run.log` (`binary::test: reason`), which `scripts/test.sh` counts,
/// lists and takes out of the passed count. Call it where a test returns early.
pub fn record_not_run(reason: &str) {
    let name = std::thread::current()
        .name()
        .unwrap_or("(unnamed test)")
        .to_owned();
    eprintln!("NOT RUN: {name}: {reason}");
    // The test binary's name too: two test files may have tests of one name.
    let binary = std::env::args()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .map(|f| f.rsplit_once('-').map_or(f.clone(), |(b, _)| b.to_owned()))
        .unwrap_or_default();
    let log = root().join("target").join("not-run.log");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
    {
        let _ = writeln!(f, "{binary}::{name}: {reason}");
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

/// The value of the first complete (newline-terminated) `KEY=value` line in `out`;
/// None while that line is still arriving.
pub fn complete_field(out: &str, key: &str) -> Option<String> {
    out.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| l.trim_end_matches(['\n', '\r']))
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .map(str::to_owned)
}

/// Console output captured in memory, for tests that run a VM in-process.
#[derive(Clone, Default)]
pub struct SharedBuf(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedBuf {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits until the output contains `needle`; false after `deadline`.
    pub fn wait_for(&self, needle: &str, deadline: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if self.text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl SharedBuf {
    /// Waits for a complete `KEY=value` line (see [`complete_field`]) and returns the
    /// value; None after `deadline`.
    pub fn wait_for_field(&self, key: &str, deadline: Duration) -> Option<String> {
        let mut value = None;
        wait_until(deadline, || {
            value = complete_field(&self.text(), key);
            value.is_some()
        });
        value
    }
}

/// Polls `f` until it is true; false after `deadline`.
pub fn wait_until(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f()
}

/// A pseudo-terminal: (master, slave).
pub fn openpty() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors into the provided integers; the name,
    // termios and winsize pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just returned by openpty and are owned by nobody else.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

/// The terminal settings of `fd`.
pub fn termios(fd: &impl std::os::fd::AsRawFd) -> libc::termios {
    // SAFETY: termios is plain data, filled by tcgetattr on a valid terminal fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t
}

/// Sends `sig` to process `pid`.
pub fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child process id we own; no memory is involved.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
}

/// Waits for `child` up to `deadline`; kills it and fails the test on timeout.
pub fn wait_child(child: &mut std::process::Child, deadline: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ferrite did not exit within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Copies `src` into `dst` on a thread of its own until EOF.
pub fn pump(
    mut src: impl Read + Send + 'static,
    mut dst: SharedBuf,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = src.read(&mut buf) {
            if n == 0 {
                break;
            }
            let _ = dst.write_all(&buf[..n]);
        }
    })
}

/// Collects a child's stdout into a buffer as it arrives (wait on the handle after the
/// child has exited).
pub fn capture_stdout(child: &mut std::process::Child) -> (SharedBuf, std::thread::JoinHandle<()>) {
    let out = SharedBuf::default();
    let reader = pump(child.stdout.take().expect("stdout piped"), out.clone());
    (out, reader)
}

/// A run directory of the test's own (FERRITE_RUN_DIR), removed at the end.
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "ferrite-ctl-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&d);
        RunDir(d)
    }
    pub fn sock(&self, name: &str) -> PathBuf {
        self.0.join(format!("{name}.sock"))
    }
    pub fn ferrite(&self) -> Command {
        let mut c = ferrite();
        c.env("FERRITE_RUN_DIR", &self.0);
        c
    }
    /// Runs a control command; (status, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.ferrite().args(args).output().expect("run ferrite");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
    /// Starts `image` as VM `name` (16 MiB unless `extra` has `--mem`); waits for its
    /// socket.
    pub fn start(&self, name: &str, image: &str, extra: &[&str]) -> std::process::Child {
        let g = guest(image);
        let child = self
            .ferrite()
            .args(["run", "--kernel", g.to_str().unwrap(), "--name", name])
            .args(if extra.contains(&"--mem") {
                &[][..]
            } else {
                &["--mem", "16M"][..]
            })
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferrite");
        let sock = self.sock(name);
        assert!(
            wait_until(Duration::from_secs(20), || {
                std::os::unix::net::UnixStream::connect(&sock).is_ok()
            }),
            "no control socket {}",
            sock.display()
        );
        child
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The 2xx answer to `method path` (no body) on the control socket `sock`, as `R` (a
/// `ferrite::control::protocol` type); anything else fails the test.
pub fn api_answer<R>(sock: &Path, method: &str, path: &str) -> R
where
    R: serde::de::DeserializeOwned + std::fmt::Debug,
{
    use ferrite::control::client::{self, Answer};
    match client::call(sock, method, path, client::NO_BODY, Duration::from_secs(20)) {
        Ok(Answer::Ok(v)) => v,
        other => panic!("{method} {path}: {other:?}"),
    }
}

/// Stops the VM serving `sock` at once (`PUT /vm/stop {"mode":"hard"}`).
pub fn hard_stop(sock: &Path) {
    use ferrite::control::client::{self, Answer};
    use ferrite::control::protocol::{StopAnswer, StopMode, StopRequest, VmState};
    let body = StopRequest {
        mode: Some(StopMode::Hard),
        timeout_ms: None,
    };
    let answer = client::call(
        sock,
        "PUT",
        "/vm/stop",
        Some(&body),
        Duration::from_secs(20),
    )
    .expect("control request");
    assert_eq!(
        answer,
        Answer::Ok(StopAnswer::Hard {
            state: VmState::Stopping
        })
    );
}

/// Everything the child wrote to its (piped) stderr; call after it has exited.
pub fn take_stderr(child: &mut std::process::Child) -> String {
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    err
}

/// A running `ferrite` with its stdout and stderr collected as they come.
pub struct Spawned {
    pub child: std::process::Child,
    pub stdin: Option<std::process::ChildStdin>,
    pub out: SharedBuf,
    pub err: SharedBuf,
    readers: Vec<std::thread::JoinHandle<()>>,
    pub status: Option<std::process::ExitStatus>,
}

impl Spawned {
    /// Starts `ferrite ARGS`; stdin is a pipe if `with_stdin`, else /dev/null.
    pub fn spawn(args: &[String], with_stdin: bool) -> Spawned {
        let mut cmd = ferrite();
        cmd.args(args);
        Spawned::start(cmd, with_stdin)
    }

    /// Starts `cmd`; stdin is a pipe if `with_stdin`, else /dev/null.
    pub fn start(cmd: Command, with_stdin: bool) -> Spawned {
        let stdin = if with_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        Spawned::with_stdio(cmd, stdin, Stdio::piped(), Stdio::piped())
    }

    /// Starts `cmd` with the given stdin, stdout and stderr (a terminal, a pipe of the
    /// test's own, ...). Piped streams are handled as by [`Spawned::start`]: stdin is
    /// kept for [`Spawned::send`], stdout and stderr are collected into `out` and
    /// `err`; a stream that is not piped leaves its buffer empty.
    pub fn with_stdio(mut cmd: Command, stdin: Stdio, stdout: Stdio, stderr: Stdio) -> Spawned {
        let mut child = cmd
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn ferrite");
        let stdin = child.stdin.take();
        let (out, err) = (SharedBuf::default(), SharedBuf::default());
        let mut readers = Vec::new();
        if let Some(o) = child.stdout.take() {
            readers.push(pump(o, out.clone()));
        }
        if let Some(e) = child.stderr.take() {
            readers.push(pump(e, err.clone()));
        }
        Spawned {
            child,
            stdin,
            out,
            err,
            readers,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status.is_some()
    }

    /// Waits until stdout contains `needle`; false after `deadline` or if ferrite
    /// exits without printing it.
    pub fn wait_for_stdout(&mut self, needle: &str, deadline: Duration) -> bool {
        let start = Instant::now();
        loop {
            if self.out.text().contains(needle) {
                return true;
            }
            if self.exited() {
                // Let the reader threads catch up with the last output: they end at
                // EOF, which comes once the process (and anything that inherited its
                // stdout) has gone.
                self.readers_done(Duration::from_secs(5));
                return self.out.text().contains(needle);
            }
            if start.elapsed() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes `bytes` to ferrite's stdin.
    pub fn send(&mut self, bytes: &[u8]) {
        let stdin = self
            .stdin
            .as_mut()
            .expect("ferrite was started without stdin");
        stdin.write_all(bytes).expect("write to ferrite's stdin");
        stdin.flush().unwrap();
    }

    /// Waits for ferrite to exit; on timeout kills it and returns None. Either way
    /// its output is complete afterwards.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while !self.exited() {
            if start.elapsed() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.join_readers();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.join_readers();
        self.status
    }

    /// Waits until every output pump has reached EOF (all output collected); false
    /// after `deadline`.
    pub fn readers_done(&self, deadline: Duration) -> bool {
        wait_until(deadline, || self.readers.iter().all(|r| r.is_finished()))
    }

    /// Waits for ferrite to exit; kills it and fails the test (with its output so
    /// far) after `deadline`. Its output is complete afterwards.
    pub fn expect_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        self.wait_exit(deadline)
            .unwrap_or_else(|| panic!("ferrite did not exit within {deadline:?}\n{}", self.ctx()))
    }

    pub fn join_readers(&mut self) {
        self.stdin = None;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    pub fn stdout(&self) -> String {
        self.out.text()
    }

    pub fn stderr(&self) -> String {
        self.err.text()
    }

    /// Both streams, for failure messages.
    pub fn ctx(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.out.text(), self.err.text())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if !self.exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd args` and asserts it succeeded.
pub fn sh(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(st.success(), "{cmd} {args:?}: {st}");
}

/// Root (network namespaces, TAP devices): required under CI (`CI=true` fails the test),
/// otherwise the test records that it did not run, saying `why`.
pub fn require_root(why: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "under CI this test must run as root: {why}"
    );
    record_not_run(why);
    false
}

/// Pseudo-random bytes (xorshift), different per `seed`.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The md5 of `bytes` as `md5sum` prints it (the guest's tool, so both sides agree).
pub fn md5(bytes: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}
