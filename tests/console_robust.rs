//! The console against users and readers that misbehave: input a guest never reads,
//! an output nobody reads, an output whose reader has gone.

mod common;

use common::*;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// Bytes waiting to be read in the pipe or terminal `fd` (FIONREAD).
fn unread(fd: &impl AsRawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    n as usize
}

/// The capacity of the pipe `fd` (F_GETPIPE_SZ).
fn pipe_size(fd: &impl AsRawFd) -> usize {
    // SAFETY: F_GETPIPE_SZ reads a property of the descriptor; no memory is involved.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
    assert!(rc > 0, "F_GETPIPE_SZ: {}", std::io::Error::last_os_error());
    rc as usize
}

/// Whether the pipe whose write end is `fd` has no free buffer slot left (poll says
/// it is not writable): a writer with more to write is then blocked in write(2). The
/// byte count alone cannot tell, as partly filled pages keep it below the capacity.
fn pipe_full(fd: &impl AsRawFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; zero timeout.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    assert!(rc >= 0, "poll: {}", std::io::Error::last_os_error());
    p.revents & libc::POLLOUT == 0
}

/// Output bytes the guest has written to its UART so far (every PIO write of the
/// flood guest is one byte to COM1), from `GET /vm/stats`.
fn uart_bytes(sock: &std::path::Path) -> u64 {
    let v: ferrite::control::protocol::StatsAnswer = api_answer(sock, "GET", "/vm/stats");
    v.vcpus
        .first()
        .and_then(|c| c.exits.get("pio_out").copied())
        .unwrap_or_else(|| panic!("no pio_out count in {v:?}"))
}

#[test]
fn ctrl_a_x_is_seen_after_input_the_guest_never_reads() {
    if !require_kvm() {
        return;
    }
    // counter.elf never reads its UART. Type far more than the UART's 64-byte FIFO
    // and Ferrite's pending queue take, then Ctrl-A x: Ferrite must still see the escape.
    let (mut master, slave) = openpty();
    let g = guest("counter.elf");
    let mut cmd = ferrite();
    cmd.args(["run", "--kernel", g.to_str().unwrap(), "--mem", "16M"]);
    let mut f = Spawned::with_stdio(
        cmd,
        Stdio::from(slave.try_clone().unwrap()),
        Stdio::from(slave.try_clone().unwrap()),
        Stdio::piped(),
    );
    assert!(
        wait_until(Duration::from_secs(10), || termios(&slave).c_lflag
            & libc::ICANON
            == 0),
        "ferrite never put the terminal in raw mode\n{}",
        f.ctx()
    );
    // Keep the master drained so the pty never fills.
    let mut m = master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut b = [0u8; 4096];
        while matches!(m.read(&mut b), Ok(n) if n > 0) {}
    });
    // On a thread: a Ferrite that stopped reading its input would block this write
    // (the terminal's buffer is ~4 KiB), and the test should fail, not hang.
    let mut typist = master.try_clone().unwrap();
    let typed = std::thread::spawn(move || typist.write_all(&[b'a'; 6000]).is_ok());
    // The state this test is about: the guest's FIFO and Ferrite's pending queue are
    // full and further input is dropped (Ferrite says so once), and everything typed
    // has been read off the terminal. A Ferrite that stopped reading when the guest
    // does never gets here (and would not see the escape either).
    assert!(
        f.err
            .wait_for("the guest is not reading its UART", Duration::from_secs(10)),
        "ferrite never filled its input queue\n{}",
        f.ctx()
    );
    assert!(
        wait_until(Duration::from_secs(10), || typed.is_finished()
            && unread(&slave) == 0),
        "ferrite left {} typed bytes unread\n{}",
        unread(&slave),
        f.ctx()
    );
    assert!(typed.join().unwrap(), "typing into the pty failed");
    let t = Instant::now();
    master.write_all(b"\x01x").unwrap();
    let status = f.expect_exit(Duration::from_secs(5));
    let err = f.stderr();
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
    // A control socket, to count the bytes the guest prints.
    let dir = RunDir::new("flooding");
    let mut cmd = dir.ferrite();
    cmd.args(["run", "--kernel", g.to_str().unwrap(), "--mem", "16M"])
        .args(["--name", "flooding"]);
    let mut f = Spawned::with_stdio(
        cmd,
        Stdio::piped(),
        Stdio::from(writer.as_fd().try_clone_to_owned().unwrap()),
        Stdio::piped(),
    );
    // The test keeps `writer` only to poll it; it never writes.
    // Wait until the pipe is full: Ferrite's output writer is then blocked in
    // write(2), and a vCPU that wrote to stdout itself (the old defect) would be
    // stuck there with the UART locked.
    let capacity = pipe_size(&reader);
    assert!(
        wait_until(T, || pipe_full(&writer)),
        "the stdout pipe never filled: {} of {capacity} bytes\n{}",
        unread(&reader),
        f.ctx()
    );
    // Then until the guest has printed a few KiB more, which can only wait in
    // Ferrite's queue (they are reported as dropped at the stop). Filling that queue
    // too (256 KiB more of emulated PIO, ~4 s here) is left to output.rs's unit test
    // `a_stuck_reader_never_blocks_the_producer_or_teardown`.
    let sock = dir.sock("flooding");
    assert!(
        wait_until(T, || std::os::unix::net::UnixStream::connect(&sock).is_ok()),
        "no control socket\n{}",
        f.ctx()
    );
    let at_full = uart_bytes(&sock);
    assert!(
        wait_until(T, || uart_bytes(&sock) >= at_full + 4096),
        "the guest stopped printing at {} bytes\n{}",
        uart_bytes(&sock),
        f.ctx()
    );
    assert!(!f.exited(), "ferrite ended on its own\n{}", f.ctx());
    // Typed input makes the console touch the UART while its output is stuck: a
    // vCPU blocked in write(2) with the UART locked would now take the event loop
    // (and with it signal handling) down too. Wait until Ferrite has read the input
    // (the event loop reads it and hands it to the UART in one go).
    f.send(b"hello\n");
    let keys = f.stdin.as_ref().unwrap();
    assert!(
        wait_until(T, || unread(keys) == 0),
        "ferrite never read its input\n{}",
        f.ctx()
    );
    let t = Instant::now();
    kill(f.pid(), libc::SIGTERM);
    let status = f.expect_exit(Duration::from_secs(5));
    let elapsed = t.elapsed();
    let err = f.stderr();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "stderr: {err}");
    assert!(
        elapsed < Duration::from_secs(1),
        "stop took {elapsed:?}: {err}"
    );
    assert!(err.contains("bytes of guest output were dropped"), "{err}");
    drop((reader, writer));
}

#[test]
fn a_vanished_stdout_reader_costs_a_few_log_lines_not_one_per_byte() {
    if !require_kvm() {
        return;
    }
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let g = guest("flood.bin");
    // A control socket, to count the bytes the guest prints.
    let dir = RunDir::new("vanished");
    let mut cmd = dir.ferrite();
    cmd.args(["run", "--kernel", g.to_str().unwrap(), "--mem", "16M"])
        .args(["--name", "vanished"]);
    let mut f = Spawned::with_stdio(cmd, Stdio::null(), Stdio::from(writer), Stdio::piped());
    // Output met the closed pipe (Ferrite says so) ...
    assert!(
        f.err.wait_for("cannot write guest output", T),
        "no word of the closed pipe\n{}",
        f.ctx()
    );
    let sock = dir.sock("vanished");
    assert!(
        wait_until(T, || std::os::unix::net::UnixStream::connect(&sock).is_ok()),
        "no control socket\n{}",
        f.ctx()
    );
    // ... and tens of thousands of bytes after it: one log line per write would show.
    let first = uart_bytes(&sock);
    assert!(
        wait_until(T, || uart_bytes(&sock) >= first + 20_000),
        "the guest stopped printing at {} bytes\n{}",
        uart_bytes(&sock),
        f.ctx()
    );
    kill(f.pid(), libc::SIGTERM);
    let status = f.expect_exit(Duration::from_secs(5));
    let err = f.stderr();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "stderr: {err}");
    let lines = err.lines().count();
    assert!(lines <= 4, "{lines} lines on stderr:\n{err}");
    assert!(err.contains("bytes of guest output were dropped"), "{err}");
}
