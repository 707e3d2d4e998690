//! The console on a real terminal (a pseudo-terminal here): raw mode delivers
//! keystrokes as typed (no line buffering, Ctrl-C and escape sequences reach the guest),
//! `Ctrl-A x` quits, and the terminal settings are restored afterwards.

mod common;

use common::*;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn wait_for(buf: &Arc<Mutex<Vec<u8>>>, needle: &[u8], deadline: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if buf
            .lock()
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn raw_keystrokes_reach_guest_and_terminal_is_restored() {
    if !require_kvm() {
        return;
    }
    let (mut master, slave) = openpty();
    let before = termios(&slave);
    assert_ne!(
        before.c_lflag & libc::ICANON,
        0,
        "a fresh pty starts in canonical mode"
    );
    let guest = guest("echo.bin");
    let mut child = ferrite()
        .args(["run", "--kernel", guest.to_str().unwrap(), "--mem", "16M"])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let out = out.clone();
        let mut m = master.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut b = [0u8; 256];
            while let Ok(n) = m.read(&mut b) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&b[..n]);
            }
        })
    };
    assert!(
        wait_for(&out, b"ready", Duration::from_secs(30)),
        "no prompt"
    );
    // No newline: canonical mode would hold these back. 0x03 would be eaten by ISIG.
    let keys = b"ab\x03\x1b[A";
    master.write_all(keys).unwrap();
    let echoed = wait_for(&out, keys, Duration::from_secs(30));
    master.write_all(b"\x01x").unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!(
                "Ctrl-A x did not end ferrite; saw {:?}",
                String::from_utf8_lossy(&out.lock().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = take_stderr(&mut child);
    let after = termios(&slave);
    drop(slave);
    drop(master);
    let _ = reader.join();
    let seen = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    assert!(
        echoed,
        "keystrokes not echoed as typed; saw {seen:?}; stderr {err}"
    );
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    assert_eq!(
        (after.c_iflag, after.c_oflag, after.c_lflag, after.c_cflag),
        (
            before.c_iflag,
            before.c_oflag,
            before.c_lflag,
            before.c_cflag
        ),
        "terminal settings restored"
    );
}

/// Reads everything the child writes to the pty into a shared buffer.
fn spawn_reader(master: &File) -> (Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let buf = out.clone();
    let mut m = master.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut b = [0u8; 256];
        while let Ok(n) = m.read(&mut b) {
            if n == 0 {
                break;
            }
            buf.lock().unwrap().extend_from_slice(&b[..n]);
        }
    });
    (out, reader)
}

/// Kills the child if a test fails before it has exited.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `ferrite run` on the echo guest (which never stops on its own) with stdin
/// and stdout on the pty slave, stderr piped, and core dumps off.
fn spawn_echo_on_pty(slave: &OwnedFd) -> Reap {
    use std::os::unix::process::CommandExt;
    let guest = guest("echo.bin");
    let mut cmd = ferrite();
    cmd.args(["run", "--kernel", guest.to_str().unwrap(), "--mem", "16M"])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::piped());
    // SAFETY: the closure only calls setrlimit, which is async-signal-safe, and touches
    // no state shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::setrlimit(libc::RLIMIT_CORE, &none) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Reap(cmd.spawn().unwrap())
}

fn wait_exit(child: &mut Reap, deadline: Duration) -> Option<std::process::ExitStatus> {
    let mut status = None;
    wait_until(deadline, || {
        status = child.0.try_wait().unwrap();
        status.is_some()
    });
    status
}

fn flags(t: &libc::termios) -> (libc::tcflag_t, libc::tcflag_t, libc::tcflag_t) {
    (t.c_iflag, t.c_oflag, t.c_lflag)
}

/// Runs the echo guest on a pty, waits until ferrite has the terminal in raw mode and
/// the guest is running, sends `signal`, and returns the exit status, what ferrite
/// printed on stderr, and the terminal flags before and after.
fn signal_running_vm(
    signal: i32,
) -> (
    std::process::ExitStatus,
    String,
    libc::termios,
    libc::termios,
) {
    let (master, slave) = openpty();
    let before = termios(&slave);
    assert_ne!(before.c_lflag & libc::ICANON, 0, "a fresh pty is canonical");
    let mut child = spawn_echo_on_pty(&slave);
    let (out, reader) = spawn_reader(&master);
    assert!(
        wait_until(Duration::from_secs(30), || termios(&slave).c_lflag
            & libc::ICANON
            == 0),
        "ferrite never put the terminal in raw mode"
    );
    // The vCPU runs only after every handler is installed, so the prompt means the
    // signal can no longer race with the setup.
    assert!(
        wait_for(&out, b"ready", Duration::from_secs(30)),
        "no prompt; saw {:?}",
        String::from_utf8_lossy(&out.lock().unwrap())
    );
    // SAFETY: kill sends a signal to our own child, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, signal) }, 0);
    let status = wait_exit(&mut child, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("ferrite did not exit after signal {signal}"));
    let mut err = String::new();
    let _ = child.0.stderr.take().unwrap().read_to_string(&mut err);
    let after = termios(&slave);
    drop(slave);
    drop(master);
    let _ = reader.join();
    (status, err, before, after)
}

#[test]
fn sigusr1_stops_orderly_and_restores_terminal() {
    if !require_kvm() {
        return;
    }
    let (status, err, before, after) = signal_running_vm(libc::SIGUSR1);
    assert_eq!(status.code(), Some(128 + libc::SIGUSR1), "{status}; {err}");
    assert!(err.contains("terminated by signal 10"), "stderr: {err}");
    assert_eq!(flags(&after), flags(&before), "terminal settings restored");
}

#[test]
fn realtime_signal_stops_orderly_and_restores_terminal() {
    if !require_kvm() {
        return;
    }
    let signal = libc::SIGRTMIN() + 2;
    let (status, err, before, after) = signal_running_vm(signal);
    assert_eq!(status.code(), Some(128 + signal), "{status}; {err}");
    assert_eq!(flags(&after), flags(&before), "terminal settings restored");
}

#[test]
fn fault_signal_restores_terminal_and_still_kills() {
    use std::os::unix::process::ExitStatusExt;
    if !require_kvm() {
        return;
    }
    for signal in [libc::SIGABRT, libc::SIGSEGV] {
        let (status, err, before, after) = signal_running_vm(signal);
        assert_eq!(status.signal(), Some(signal), "{status}; {err}");
        assert_eq!(
            flags(&after),
            flags(&before),
            "terminal settings restored after signal {signal}"
        );
    }
}

#[test]
fn log_lines_end_in_crlf_only_on_a_terminal() {
    if !require_kvm() {
        return;
    }
    let guest = guest("hello.bin");
    let args = [
        "--log-level",
        "info",
        "run",
        "--kernel",
        guest.to_str().unwrap(),
        "--mem",
        "16M",
    ];
    // stderr is a pipe: plain "\n".
    let r = run_ferrite(&args, None, Duration::from_secs(60));
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains("ferrite: INFO: "),
        "stderr: {:?}",
        r.stderr
    );
    assert!(!r.stderr.contains('\r'), "stderr: {:?}", r.stderr);

    // stderr is a terminal: "\r\n". Output post-processing is switched off on the pty
    // so the bytes arrive exactly as written.
    let (master, slave) = openpty();
    let mut raw = termios(&slave);
    // SAFETY: cfmakeraw edits the struct; tcsetattr gets a valid fd and termios.
    unsafe {
        libc::cfmakeraw(&mut raw);
        assert_eq!(libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &raw), 0);
    }
    let mut child = Reap(
        ferrite()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(slave.try_clone().unwrap()))
            .spawn()
            .unwrap(),
    );
    let (out, reader) = spawn_reader(&master);
    let status = wait_exit(&mut child, Duration::from_secs(60)).expect("ferrite exits");
    assert_eq!(status.code(), Some(0));
    // With the last slave descriptor closed, the reader gets what is left, then EIO.
    drop(slave);
    drop(master);
    let _ = reader.join();
    let seen = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    assert!(seen.contains("ferrite: INFO: "), "{seen:?}");
    for line in seen.split_inclusive('\n') {
        assert!(line.ends_with("\r\n"), "line {line:?} in {seen:?}");
    }
}
