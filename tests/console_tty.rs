//! The console on a real terminal (a pseudo-terminal here): raw mode delivers
//! keystrokes as typed (no line buffering, Ctrl-C and escape sequences reach the guest),
//! `Ctrl-A x` quits, and the terminal settings are restored afterwards.

mod common;

use common::*;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn openpty() -> (File, OwnedFd) {
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
    unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

fn termios(fd: &OwnedFd) -> libc::termios {
    // SAFETY: termios is plain data, filled by tcgetattr on a valid terminal fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t
}

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
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
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
