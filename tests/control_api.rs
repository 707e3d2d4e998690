//! The control socket and CLI against running test guests: round trips, pause and
//! resume (also 1,000 cycles on a busy 2-vCPU guest), registers, stop while paused,
//! busy and hostile clients, the socket gone after every way of exiting, curl.

mod common;

use common::*;
use ferrite::control::client::{self, Answer};
use ferrite::control::protocol::{
    DebugReport, ErrorBody, InfoAnswer, NmiAnswer, NmiRequest, StateAnswer, StopAnswer, StopMethod,
    StopMode, StopReport, StopRequest, StoppedBy, VmState,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

/// The 2xx answer to `method path` (no body) as `R`.
fn req<R: DeserializeOwned + std::fmt::Debug>(sock: &Path, method: &str, path: &str) -> R {
    match client::call(sock, method, path, client::NO_BODY, T) {
        Ok(Answer::Ok(v)) => v,
        other => panic!("{method} {path}: {other:?}"),
    }
}

/// `PUT /vm/stop` with `body`, any JSON (bad ones included): the status and message
/// of a refusal.
fn stop_refused(sock: &Path, body: &Value) -> (u16, String) {
    let (code, v) =
        client::request(sock, "PUT", "/vm/stop", Some(body), T).expect("control request");
    let e: ErrorBody = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
    (code, e.error)
}

#[test]
fn round_trip_pause_resume_registers_and_stop_while_paused() {
    if !require_kvm() {
        return;
    }
    let dir = RunDir::new("rt");
    let mut child = dir.start("rt", "counter.elf", &["--cpus", "2"]);
    let sock = dir.sock("rt");

    let (code, out, err) = dir.cli(&["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let list: Vec<InfoAnswer> = serde_json::from_str(&out).expect(&out);
    assert_eq!(list[0].name, "rt", "{out}");
    assert_eq!(list[0].state, VmState::Running, "{out}");
    assert_eq!(list[0].vcpus, 2, "{out}");

    let (code, out, err) = dir.cli(&["pause", "rt"]);
    assert_eq!((code, out.trim()), (0, "rt: running -> paused"), "{err}");
    let (code, out, _) = dir.cli(&["pause", "rt"]);
    assert_eq!(
        (code, out.trim()),
        (0, "rt: paused -> paused"),
        "idempotent"
    );

    // Registers: RIP inside counter.elf (linked at 1 MiB), read while paused.
    let (code, out, err) = dir.cli(&["debug", "rt", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: DebugReport = serde_json::from_str(&out).expect(&out);
    assert_eq!(v.vcpus.len(), 2, "{out}");
    for cpu in &v.vcpus {
        let rip = u64::from_str_radix(cpu.general.rip.trim_start_matches("0x"), 16).expect(&out);
        assert!((0x10_0000..0x10_1000).contains(&rip), "rip {rip:#x}: {out}");
        assert!(cpu.msrs.contains_key("0xc0000080"), "EFER: {out}");
    }
    // debug on a paused VM leaves it paused.
    assert_eq!(
        req::<InfoAnswer>(&sock, "GET", "/vm").state,
        VmState::Paused
    );

    let (code, out, _) = dir.cli(&["resume", "rt"]);
    assert_eq!((code, out.trim()), (0, "rt: paused -> running"));
    let (code, out, _) = dir.cli(&["stat", "rt"]);
    assert_eq!(code, 0);
    assert!(out.contains("vCPU 0:") && out.contains("vCPU 1:"), "{out}");

    // Stop while paused: a graceful stop is refused (a paused guest cannot react),
    // a hard one ends the VM at once, with status 0, and its socket goes.
    assert_eq!(dir.cli(&["pause", "rt"]).0, 0);
    let (code, _, err) = dir.cli(&["stop", "rt"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("paused") && err.contains("HTTP 409") && err.contains("--hard"),
        "{err}"
    );
    let t = Instant::now();
    let (code, out, err) = dir.cli(&["stop", "rt", "--hard"]);
    assert_eq!((code, out.trim()), (0, "rt: stopped hard"), "{err}");
    let st = wait_child(&mut child, T);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(st.code(), Some(0));
    assert!(!sock.exists(), "socket removed");
    let (code, _, err) = dir.cli(&["pause", "rt"]);
    assert_ne!(code, 0);
    assert!(err.contains("no VM named 'rt'"), "{err}");

    // An NMI to one vCPU (not the first) reaches that vCPU alone: counter.elf has no
    // IDT, so exactly vCPU 1 triple-faults and the VM ends with status 4.
    let mut child = dir.start("nmi", "counter.elf", &["--cpus", "2"]);
    let body = NmiRequest { vcpu: Some(1) };
    let answer = client::call(&dir.sock("nmi"), "PUT", "/vm/nmi", Some(&body), T).unwrap();
    assert_eq!(answer, Answer::Ok(NmiAnswer { nmi: 1 }));
    assert_eq!(wait_child(&mut child, T).code(), Some(4));
    let err = take_stderr(&mut child);
    assert!(err.contains("vCPU 1 triple-faulted"), "{err}");
}

#[test]
fn a_thousand_pause_resume_cycles_through_the_socket() {
    if !require_kvm() {
        return;
    }
    let dir = RunDir::new("cycles");
    let mut child = dir.start("cycles", "counter.elf", &["--cpus", "2"]);
    let sock = dir.sock("cycles");
    let mut pause = Vec::with_capacity(1000);
    for i in 0..1000 {
        let t = Instant::now();
        let v: StateAnswer = req(&sock, "PUT", "/vm/pause");
        pause.push(t.elapsed());
        assert_eq!(v.state, VmState::Paused, "cycle {i}");
        let v: StateAnswer = req(&sock, "PUT", "/vm/resume");
        assert_eq!(v.state, VmState::Running, "cycle {i}");
    }
    pause.sort();
    eprintln!(
        "pause through the socket, 2 vCPUs: median {:?}, p99 {:?}",
        pause[500], pause[990]
    );
    hard_stop(&sock);
    assert_eq!(wait_child(&mut child, T).code(), Some(0));
}

#[test]
fn busy_silent_and_hostile_clients_do_not_hold_up_a_pause() {
    if !require_kvm() {
        return;
    }
    let dir = RunDir::new("busy");
    let mut child = dir.start("busy", "counter.elf", &[]);
    let sock = dir.sock("busy");
    // One client that connects and sends nothing, one that drips a request slowly,
    // 50 that hammer GET /vm.
    let _silent = UnixStream::connect(&sock).unwrap();
    let drip_sock = sock.clone();
    let drip = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&drip_sock).unwrap();
        for b in b"GET /vm HTTP/1.1\r\nHost: x\r\n\r\n" {
            s.write_all(&[*b]).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut resp = String::new();
        s.set_read_timeout(Some(T)).unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        resp.push_str(&String::from_utf8_lossy(&buf[..n]));
        resp
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Hammers that have had at least one answer.
    let going = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hammers: Vec<_> = (0..50)
        .map(|_| {
            let s = sock.clone();
            let stop = stop.clone();
            let going = going.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let _: InfoAnswer = req(&s, "GET", "/vm");
                    if n == 0 {
                        going.fetch_add(1, Ordering::Relaxed);
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    // Pause once every hammer is busy rather than after a fixed time.
    assert!(
        wait_until(T, || going.load(Ordering::Relaxed) == 50),
        "only {} of 50 clients got an answer",
        going.load(Ordering::Relaxed)
    );
    let t = Instant::now();
    let _: StateAnswer = req(&sock, "PUT", "/vm/pause");
    let took = t.elapsed();
    // Stated bound: 1 s with 50 busy clients on this 2-core host.
    assert!(took < Duration::from_secs(1), "pause took {took:?}");
    stop.store(true, Ordering::Relaxed);
    let served: usize = hammers.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(served > 50, "{served}");
    let dripped = drip.join().unwrap();
    assert!(dripped.starts_with("HTTP/1.1 200"), "{dripped}");

    // Malformed, oversized, unknown.
    let raw = |bytes: &[u8]| -> String {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let _ = s.write_all(bytes);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    let r = raw(b"\x00\x01garbage\r\n\r\n");
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("\"error\""),
        "{r}"
    );
    let mut big = b"PUT /vm/stop HTTP/1.1\r\nContent-Length: 200000\r\n\r\n".to_vec();
    big.extend(vec![b'x'; 200_000]);
    let r = raw(&big);
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    let r = raw(b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    // The VM is fine and still paused.
    assert_eq!(
        req::<InfoAnswer>(&sock, "GET", "/vm").state,
        VmState::Paused
    );
    hard_stop(&sock);
    assert_eq!(wait_child(&mut child, T).code(), Some(0));
}

#[test]
fn the_socket_is_gone_after_every_way_of_exiting_and_names_are_unique() {
    if !require_kvm() {
        return;
    }
    let dir = RunDir::new("exit");
    // Guest ends by itself (i8042 reset).
    let r = run_named(&dir, "hello64.elf", "self");
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(!dir.sock("self").exists());
    // SIGTERM.
    let mut child = dir.start("term", "counter.elf", &[]);
    // A second VM with the same name is refused while the first runs.
    let r = run_named(&dir, "counter.elf", "term");
    assert_eq!(r.status, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("already running"), "{}", r.stderr);
    kill(child.id(), libc::SIGTERM);
    assert_eq!(wait_child(&mut child, T).code(), Some(143));
    assert!(!dir.sock("term").exists());
    // A stale socket (left by a killed VM) is replaced by the next VM of that name and
    // removed by `ferrite list`.
    let mut child = dir.start("killed", "counter.elf", &[]);
    kill(child.id(), libc::SIGKILL);
    let _ = child.wait();
    assert!(dir.sock("killed").exists(), "SIGKILL leaves the socket");
    let (code, out, _) = dir.cli(&["list"]);
    assert_eq!(code, 0);
    assert!(!out.contains("killed"), "{out}");
    assert!(
        !dir.sock("killed").exists(),
        "list removed the stale socket"
    );
    let mut child = dir.start("killed", "counter.elf", &[]);
    // curl, as documented.
    let out = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(dir.sock("killed"))
        .arg("http://localhost/vm")
        .output();
    if let Ok(out) = out {
        let v: InfoAnswer = serde_json::from_slice(&out.stdout).expect("curl got JSON");
        assert_eq!(v.name, "killed");
        let out = Command::new("curl")
            .args([
                "-s",
                "-X",
                "PUT",
                "-d",
                r#"{"mode":"hard"}"#,
                "--unix-socket",
            ])
            .arg(dir.sock("killed"))
            .arg("http://localhost/vm/stop")
            .output()
            .unwrap();
        let v: StopAnswer = serde_json::from_slice(&out.stdout).expect("curl got JSON");
        assert_eq!(
            v,
            StopAnswer::Hard {
                state: VmState::Stopping
            }
        );
    } else {
        hard_stop(&dir.sock("killed"));
    }
    assert_eq!(wait_child(&mut child, T).code(), Some(0));
    assert!(!dir.sock("killed").exists());
}

#[test]
fn graceful_stop_of_a_guest_that_never_reacts_ends_hard_after_the_timeout() {
    if !require_kvm() {
        return;
    }
    let dir = RunDir::new("graceful");
    // Through the CLI: counter.elf never reads its keyboard, so Ctrl-Alt-Del goes
    // unanswered and the VM is stopped hard once the timeout has passed.
    let mut child = dir.start("deaf", "counter.elf", &["--log-level", "info"]);
    let t = Instant::now();
    let (code, out, err) = dir.cli(&["stop", "deaf", "--timeout", "1.5", "--json"]);
    let took = t.elapsed();
    assert_eq!(code, 0, "{err}");
    let v: StopReport = serde_json::from_str(&out).expect(&out);
    assert_eq!(v.mode, StopMode::Graceful, "{v:?}");
    assert_eq!(v.method, Some(StopMethod::CtrlAltDel), "{v:?}");
    assert_eq!(v.timeout_ms, Some(1500), "{v:?}");
    assert_eq!(v.stopped_by, Some(StoppedBy::Timeout), "{v:?}");
    assert!(v.elapsed_ms >= 1500, "{v:?}");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    assert_eq!(wait_child(&mut child, T).code(), Some(0));
    let err = take_stderr(&mut child);
    assert!(
        err.contains("graceful stop requested: ctrl-alt-del; hard stop in 1.5 s"),
        "{err}"
    );
    assert!(
        err.contains("guest did not stop within 1.5 s; hard stop"),
        "{err}"
    );
    assert!(!dir.sock("deaf").exists());

    // Through the API: the reply comes at once and says what was done; bad bodies are
    // refused; the process ends no sooner than the timeout, with status 0.
    let mut child = dir.start("deaf2", "counter.elf", &[]);
    let sock = dir.sock("deaf2");
    for bad in [
        serde_json::json!({"mode": "soft"}),
        serde_json::json!({"timeout_ms": 0}),
        serde_json::json!({"mode": "hard", "timeout_ms": 10}),
    ] {
        let (code, msg) = stop_refused(&sock, &bad);
        assert_eq!(code, 400, "{bad}: {msg}");
    }
    let _: StateAnswer = req(&sock, "PUT", "/vm/pause");
    let answer =
        client::call::<_, StopAnswer>(&sock, "PUT", "/vm/stop", Some(&StopRequest::default()), T)
            .unwrap();
    match answer {
        Answer::Refused {
            status: 409,
            message,
        } => assert!(message.contains("paused"), "{message}"),
        other => panic!("{other:?}"),
    }
    let _: StateAnswer = req(&sock, "PUT", "/vm/resume");
    let t = Instant::now();
    let body = StopRequest {
        mode: None,
        timeout_ms: Some(1500),
    };
    let answer = client::call(&sock, "PUT", "/vm/stop", Some(&body), T).unwrap();
    assert!(t.elapsed() < Duration::from_millis(1500), "reply at once");
    match answer {
        Answer::Ok(StopAnswer::Graceful {
            method: StopMethod::CtrlAltDel,
            timeout_ms: 1500,
            state: VmState::Running,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(wait_child(&mut child, T).code(), Some(0));
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert!(!sock.exists());
}

/// `ferrite run --kernel GUEST --mem 16M --name NAME` in `dir`, to its end (deadline T).
fn run_named(dir: &RunDir, image: &str, name: &str) -> Run {
    let g = guest(image);
    let mut cmd = dir.ferrite();
    cmd.args([
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--mem",
        "16M",
        "--name",
        name,
    ]);
    run_with_deadline_stdin_null(cmd, T)
}
