//! Hostile control-socket clients (issue 13, defects 5, 6 and 7): a client that
//! pipelines and never reads, every slot held by idle or dripping clients, slow-drip
//! heads and short bodies, a flood of connections beyond the limit, >80 KiB of
//! pipelined requests in one write, `Expect: 100-continue`.

mod common;

use common::*;
use ferrite::control::client::{self, Answer};
use ferrite::control::protocol::{ErrorBody, InfoAnswer, StatsAnswer, VmState};
use ferrite::control::server::{MAX_CLIENTS, RESERVED_CLIENTS};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

/// Starts counter.elf as VM `name` with `env` set; waits for its socket.
fn start(dir: &RunDir, name: &str, env: &[(&str, &str)]) -> Spawned {
    let g = guest("counter.elf");
    let mut cmd = dir.ferrite();
    cmd.args(["run", "--kernel", g.to_str().unwrap(), "--name", name])
        .args(["--mem", "16M"])
        .envs(env.iter().copied());
    let mut vm = Spawned::start(cmd, false);
    let sock = dir.sock(name);
    assert!(
        wait_until(T, || vm.exited() || UnixStream::connect(&sock).is_ok()) && !vm.exited(),
        "no control socket {}: {}",
        sock.display(),
        vm.ctx()
    );
    vm
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Bytes written to `s` that the peer has not read yet (SIOCOUTQ).
fn unread(s: &UnixStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ on a socket this test owns writes one int into `n`.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    assert_eq!(r, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
    n.max(0) as usize
}

/// Reads until EOF, an error (a reset after the answer) or `deadline`.
fn read_all(s: &mut UnixStream, deadline: Duration) -> String {
    s.set_read_timeout(Some(deadline)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The JSON body of a complete answer.
/// The message of a raw error answer (its `{"error": ...}` body).
fn error_message(answer: &str) -> String {
    let (_, b) = answer.split_once("\r\n\r\n").expect(answer);
    serde_json::from_str::<ErrorBody>(b).expect(answer).error
}

/// `GET /vm`, answered 200.
fn info(sock: &Path) -> InfoAnswer {
    match client::call(sock, "GET", "/vm", client::NO_BODY, T) {
        Ok(Answer::Ok(v)) => v,
        other => panic!("GET /vm: {other:?}"),
    }
}

/// A connection whose request head the server has read, its body still missing
/// (the `100 Continue` proves it): under way, not idle.
fn head_without_body(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(b"PUT /vm/balloon HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 50\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut got = [0u8; 25];
    s.read_exact(&mut got).expect("100 Continue");
    assert_eq!(&got, b"HTTP/1.1 100 Continue\r\n\r\n");
    s
}

fn stop_and_wait(sock: &Path, vm: &mut Spawned) {
    hard_stop(sock);
    let st = vm.wait_exit(T).expect("ferrite exits");
    assert_eq!(st.code(), Some(0), "{}", vm.ctx());
}

/// Defect 5: 641 MB in 20 s with the old server. Now the client is not read while
/// its answers wait (64 KiB + one answer), and it is dropped once it has read
/// nothing for the write timeout (1.5 s here).
#[test]
fn defect5_pipelining_client_that_never_reads_keeps_rss_bounded_and_is_dropped() {
    if !require_kvm() {
        return;
    }
    let dir = RunDir::new("pipe");
    let mut vm = start(&dir, "pipe", &[("FERRITE_CONTROL_WRITE_MS", "1500")]);
    let sock = dir.sock("pipe");
    // Warm up: a few statistics answered the ordinary way.
    for _ in 0..5 {
        let answer = client::call::<_, StatsAnswer>(&sock, "GET", "/vm/stats", client::NO_BODY, T);
        assert!(matches!(answer, Ok(Answer::Ok(_))), "{answer:?}");
    }
    let before = rss_kib(vm.pid());
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_nonblocking(true).unwrap();
    let reqs = b"GET /vm/stats HTTP/1.1\r\nHost: x\r\n\r\n".repeat(16);
    let t = Instant::now();
    let (mut sent, mut peak) = (0usize, before);
    let mut sampled = Instant::now();
    let mut dropped = false;
    while t.elapsed() < Duration::from_secs(5) {
        // Paced by what the server has taken: never more than 16 KiB waiting in the
        // socket, so every read the server does is small and it serves them all.
        if unread(&s) > 16 * 1024 {
            std::thread::sleep(Duration::from_millis(1));
        } else {
            match s.write(&reqs) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Err(_) => {
                    dropped = true;
                    break;
                }
            }
        }
        if sampled.elapsed() > Duration::from_millis(50) {
            peak = peak.max(rss_kib(vm.pid()));
            sampled = Instant::now();
        }
    }
    peak = peak.max(rss_kib(vm.pid()));
    eprintln!(
        "pipelined {sent} bytes of GET /vm/stats in {:?}; RSS {before} kB -> peak {peak} kB",
        t.elapsed()
    );
    assert!(
        peak < before + 20 * 1024,
        "RSS grew from {before} kB to {peak} kB"
    );
    // Dropped: writing fails (EPIPE or ECONNRESET) once Ferrite has closed it.
    let gone = dropped
        || wait_until(
            T,
            || matches!(s.write(b"G"), Err(e) if e.kind() != ErrorKind::WouldBlock),
        );
    assert!(gone, "the client that never reads was not dropped");
    // Everyone else is served throughout.
    assert_eq!(info(&sock).state, VmState::Running);
    stop_and_wait(&sock, &mut vm);
}

/// Defect 6: 64 idle connections locked out the whole API, `ferrite stop --hard`
/// included. Every slot held (MAX_CLIENTS idle, the reserved ones with requests
/// under way): the stop still gets through, at once.
#[test]
fn defect6_every_slot_held_still_lets_ferrite_stop_hard_stop_the_vm_quickly() {
    if !require_kvm() {
        return;
    }
    let dir = RunDir::new("held");
    let mut vm = start(&dir, "held", &[]);
    let sock = dir.sock("held");
    let idle: Vec<UnixStream> = (0..MAX_CLIENTS)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let busy: Vec<UnixStream> = (0..RESERVED_CLIENTS)
        .map(|_| head_without_body(&sock))
        .collect();
    let t = Instant::now();
    let (code, out, err) = dir.cli(&["stop", "held", "--hard"]);
    assert_eq!((code, out.trim()), (0, "held: stopped hard"), "{err}");
    let st = vm.wait_exit(T).expect("ferrite exits");
    let took = t.elapsed();
    assert_eq!(st.code(), Some(0), "{}", vm.ctx());
    assert!(took < Duration::from_secs(5), "stop took {took:?}");
    drop((idle, busy));
}

/// Defect 6: the 65th connection was reset. Now it is served `GET /vm` and
/// `PUT /vm/stop`, and anything else gets 503 with a JSON error.
#[test]
fn defect6_the_65th_connection_gets_a_503_json_answer_not_a_reset() {
    if !require_kvm() {
        return;
    }
    let dir = RunDir::new("full");
    let mut vm = start(&dir, "full", &[]);
    let sock = dir.sock("full");
    let idle: Vec<UnixStream> = (0..MAX_CLIENTS)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"GET /vm/stats HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let answer = read_all(&mut s, T);
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer:?}");
    assert!(
        answer.contains("Content-Type: application/json"),
        "{answer}"
    );
    let msg = error_message(&answer);
    assert!(msg.contains("PUT /vm/stop"), "{answer}");
    // The state is always visible.
    assert_eq!(info(&sock).name, "full");
    drop(idle);
    stop_and_wait(&sock, &mut vm);
}

/// Defect 6: slow-drip heads and short bodies held slots for ever, and so did idle
/// connections. With the timeouts shortened (FERRITE_CONTROL_*_MS), each is closed:
/// a request under way with 408 and a JSON error.
#[test]
fn defect6_slow_drip_short_body_and_idle_clients_are_dropped_after_the_timeouts() {
    if !require_kvm() {
        return;
    }
    let dir = RunDir::new("drip");
    let env = [
        ("FERRITE_CONTROL_IDLE_MS", "800"),
        ("FERRITE_CONTROL_READ_MS", "800"),
    ];
    let mut vm = start(&dir, "drip", &env);
    let sock = dir.sock("drip");

    let t = Instant::now();
    let mut idle = UnixStream::connect(&sock).unwrap();
    let mut short = UnixStream::connect(&sock).unwrap();
    short
        .write_all(b"PUT /vm/balloon HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"tar")
        .unwrap();
    let mut drip = UnixStream::connect(&sock).unwrap();
    drip.write_all(b"GET /vm HTTP/1.1\r\nX-Slow: ").unwrap();
    drip.set_nonblocking(true).unwrap();
    // One byte every 100 ms, until Ferrite answers or closes.
    let mut dripped = Vec::new();
    while t.elapsed() < T {
        let mut buf = [0u8; 4096];
        match drip.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => dripped.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
        if drip.write(b"a").is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drip.set_nonblocking(false).unwrap();
    let rest = read_all(&mut drip, T);
    let dripped = String::from_utf8_lossy(&dripped).into_owned() + &rest;
    let took = t.elapsed();
    assert!(dripped.starts_with("HTTP/1.1 408 "), "{dripped:?}");
    assert!(!error_message(&dripped).is_empty(), "{dripped}");
    assert!(took >= Duration::from_millis(800), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");

    let answer = read_all(&mut short, T);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // Idle: closed without a word.
    assert_eq!(read_all(&mut idle, T), "");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // The VM is fine.
    info(&sock);
    stop_and_wait(&sock, &mut vm);
}

/// Defect 6: "64 clients connected" was logged for every connection beyond the
/// limit (10,227 lines seen). Now at most once per 10 s, with a count.
#[test]
fn defect6_the_full_warning_is_not_repeated_for_every_connection_beyond_the_limit() {
    if !require_kvm() {
        return;
    }
    let dir = RunDir::new("warn");
    let mut vm = start(&dir, "warn", &[]);
    let sock = dir.sock("warn");
    // Every slot, and 300 more, each of which takes the place of the one idle longest.
    let idle: Vec<UnixStream> = (0..MAX_CLIENTS + RESERVED_CLIENTS + 300)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let warnings = |vm: &Spawned| {
        vm.stderr()
            .lines()
            .filter(|l| l.contains("clients connected"))
            .count()
    };
    assert!(wait_until(T, || warnings(&vm) >= 1), "{}", vm.ctx());
    let lines = warnings(&vm);
    assert!(lines <= 2, "{lines} warnings:\n{}", vm.stderr());
    assert!(
        vm.stderr()
            .contains("more such connections since the last warning")
            || lines == 1,
        "{}",
        vm.stderr()
    );
    drop(idle);
    stop_and_wait(&sock, &mut vm);
}

/// Defect 7: >80 KiB of pipelined requests in one write got one 413 and a reset.
#[test]
fn defect7_more_than_80_kib_of_pipelined_requests_in_one_write_are_all_answered() {
    if !require_kvm() {
        return;
    }
    let dir = RunDir::new("burst");
    let mut vm = start(&dir, "burst", &[]);
    let sock = dir.sock("burst");
    let n = 5000;
    let mut reqs = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n".repeat(n);
    reqs.extend_from_slice(b"GET /vm HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(reqs.len() > 80 * 1024);
    let s = UnixStream::connect(&sock).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&reqs).map_err(|e| e.to_string()));
    let mut r = s;
    let answers = read_all(&mut r, T);
    writer.join().unwrap().expect("all requests written");
    assert_eq!(
        answers.matches("HTTP/1.1 404 ").count(),
        n,
        "{}",
        answers.len()
    );
    assert_eq!(answers.matches("HTTP/1.1 200 ").count(), 1);
    assert!(!answers.contains("HTTP/1.1 413"));
    stop_and_wait(&sock, &mut vm);
}

/// Defect 7: `Expect: 100-continue` was never answered (curl waits a second).
#[test]
fn defect7_expect_100_continue_is_answered_before_the_body_is_sent() {
    if !require_kvm() {
        return;
    }
    let dir = RunDir::new("expect");
    let mut vm = start(&dir, "expect", &[]);
    let sock = dir.sock("expect");
    let body_bytes = br#"{"mode":"soft"}"#;
    let mut s = UnixStream::connect(&sock).unwrap();
    write!(
        s,
        "PUT /vm/stop HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body_bytes.len()
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = [0u8; 25];
    s.read_exact(&mut got)
        .expect("a 100 Continue before the body");
    assert_eq!(&got, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body_bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let answer = read_all(&mut s, T);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    assert!(error_message(&answer).contains("soft"), "{answer}");
    stop_and_wait(&sock, &mut vm);
}
