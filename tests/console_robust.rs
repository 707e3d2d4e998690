//! The console against users and readers that misbehave: input a guest never reads,
//! an output nobody reads, an output whose reader has gone.

mod common;

use common::*;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn ctrl_a_x_is_seen_after_input_the_guest_never_reads() {
    if !require_kvm() {
        return;
    }
    // counter.elf never reads its UART. Type far more than the UART's 64-byte FIFO,
    // then Ctrl-A x: Ferrite must still see the escape.
    let (mut master, slave) = openpty();
    let g = guest("counter.elf");
    let mut child = ferrite()
        .args(["run", "--kernel", g.to_str().unwrap(), "--mem", "16M"])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || termios(&slave).c_lflag
            & libc::ICANON
            == 0),
        "ferrite never put the terminal in raw mode"
    );
    // Keep the master drained so the pty never fills.
    let mut m = master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut b = [0u8; 4096];
        while matches!(m.read(&mut b), Ok(n) if n > 0) {}
    });
    master.write_all(&[b'a'; 6000]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    master.write_all(b"\x01x").unwrap();
    let status = wait_child(&mut child, Duration::from_secs(5));
    let err = take_stderr(&mut child);
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    assert!(err.contains("Ctrl-A x"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_ne!(
        termios(&slave).c_lflag & libc::ICANON,
        0,
        "terminal restored"
    );
}

#[test]
fn sigterm_stops_a_guest_flooding_a_stdout_nobody_reads() {
    if !require_kvm() {
        return;
    }
    let (reader, writer) = std::io::pipe().unwrap();
    let g = guest("flood.bin");
    let mut child = ferrite()
        .args(["run", "--kernel", g.to_str().unwrap(), "--mem", "16M"])
        .stdin(Stdio::piped())
        .stdout(Stdio::from(writer.as_fd().try_clone_to_owned().unwrap()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(writer);
    // Long enough for the pipe (64 KiB) and Ferrite's own queue to fill.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "ferrite ended on its own"
    );
    // Typed input makes the console touch the UART while its output is stuck: a
    // vCPU blocked in write(2) with the UART locked would now take the event loop
    // (and with it signal handling) down too.
    let mut keys = child.stdin.take().unwrap();
    keys.write_all(b"hello\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    kill(child.id(), libc::SIGTERM);
    let status = wait_child(&mut child, Duration::from_secs(5));
    let elapsed = t.elapsed();
    let err = take_stderr(&mut child);
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "stderr: {err}");
    assert!(
        elapsed < Duration::from_secs(1),
        "stop took {elapsed:?}: {err}"
    );
    assert!(err.contains("bytes of guest output were dropped"), "{err}");
    drop(reader);
    drop(keys);
}

#[test]
fn a_vanished_stdout_reader_costs_a_few_log_lines_not_one_per_byte() {
    if !require_kvm() {
        return;
    }
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let g = guest("flood.bin");
    let mut child = ferrite()
        .args(["run", "--kernel", g.to_str().unwrap(), "--mem", "16M"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // Tens of thousands of output bytes meet a closed pipe in this time.
    std::thread::sleep(Duration::from_millis(1500));
    kill(child.id(), libc::SIGTERM);
    let status = wait_child(&mut child, Duration::from_secs(5));
    let err = err_reader.join().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "stderr: {err}");
    let lines = err.lines().count();
    assert!(lines <= 4, "{lines} lines on stderr:\n{err}");
    assert!(err.contains("bytes of guest output were dropped"), "{err}");
}
