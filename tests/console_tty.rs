//! The console on a real terminal (a pseudo-terminal here): raw mode delivers
//! keystrokes as typed (no line buffering, Ctrl-C and escape sequences reach the guest),
//! `Ctrl-A x` quits, and the terminal settings are restored afterwards.

mod common;

use common::*;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::time::Duration;

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
    let mut cmd = ferrite();
    cmd.args(["run", "--kernel", guest.to_str().unwrap(), "--mem", "16M"]);
    let mut f = Spawned::with_stdio(
        cmd,
        Stdio::from(slave.try_clone().unwrap()),
        Stdio::from(slave.try_clone().unwrap()),
        Stdio::piped(),
    );
    let (out, reader) = spawn_reader(&master);
    assert!(out.wait_for("ready", Duration::from_secs(30)), "no prompt");
    // No newline: canonical mode would hold these back. 0x03 would be eaten by ISIG.
    let keys = "ab\x03\x1b[A";
    master.write_all(keys.as_bytes()).unwrap();
    let echoed = out.wait_for(keys, Duration::from_secs(30));
    master.write_all(b"\x01x").unwrap();
    let status = f
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("Ctrl-A x did not end ferrite; saw {:?}", out.text()));
    let err = f.stderr();
    let after = termios(&slave);
    drop(slave);
    drop(master);
    let _ = reader.join();
    let seen = out.text();
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

/// Reads everything the child writes to the pty (until EIO once the last slave
/// descriptor has gone) into a shared buffer.
fn spawn_reader(master: &File) -> (SharedBuf, std::thread::JoinHandle<()>) {
    let out = SharedBuf::default();
    let reader = pump(master.try_clone().unwrap(), out.clone());
    (out, reader)
}

/// Starts `ferrite run` on the echo guest (which never stops on its own) with stdin
/// and stdout on the pty slave, stderr piped, and core dumps off.
fn spawn_echo_on_pty(slave: &OwnedFd) -> Spawned {
    use std::os::unix::process::CommandExt;
    let guest = guest("echo.bin");
    let mut cmd = ferrite();
    cmd.args(["run", "--kernel", guest.to_str().unwrap(), "--mem", "16M"]);
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
    Spawned::with_stdio(
        cmd,
        Stdio::from(slave.try_clone().unwrap()),
        Stdio::from(slave.try_clone().unwrap()),
        Stdio::piped(),
    )
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
        out.wait_for("ready", Duration::from_secs(30)),
        "no prompt; saw {:?}",
        out.text()
    );
    kill(child.pid(), signal);
    let status = child
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("ferrite did not exit after signal {signal}"));
    let err = child.stderr();
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
    let mut cmd = ferrite();
    cmd.args(args);
    let mut child = Spawned::with_stdio(
        cmd,
        Stdio::null(),
        Stdio::null(),
        Stdio::from(slave.try_clone().unwrap()),
    );
    let (out, reader) = spawn_reader(&master);
    let status = child.expect_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0));
    // With the last slave descriptor closed, the reader gets what is left, then EIO.
    drop(slave);
    drop(master);
    let _ = reader.join();
    let seen = out.text();
    assert!(seen.contains("ferrite: INFO: "), "{seen:?}");
    for line in seen.split_inclusive('\n') {
        assert!(line.ends_with("\r\n"), "line {line:?} in {seen:?}");
    }
}
