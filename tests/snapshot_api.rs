//! `PUT /vm/snapshot` and `ferrite run --restore` refusals that need no Linux guest:
//! a bad body, a running VM, a bare machine, the wrong method; a restore with machine
//! options, or from a directory without a snapshot. (tests/snapshot_tier_a.rs has the
//! real snapshots.)

mod common;

use common::*;
use ferrite::control::client;
use ferrite::control::protocol::{ErrorBody, SnapshotRequest};
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// The status and message of a refused `method /vm/snapshot` with `body`.
fn refused(sock: &Path, method: &str, body: Option<&serde_json::Value>) -> (u16, String) {
    let (code, v) =
        client::request(sock, method, "/vm/snapshot", body, T).expect("control request");
    let e: ErrorBody = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
    (code, e.error)
}

#[test]
fn snapshot_requests_that_cannot_be_served_are_refused_and_create_nothing() {
    if !require_kvm() {
        return;
    }
    let dir = RunDir::new("snapapi");
    let mut child = dir.start("s", "counter.elf", &["--cpus", "2"]);
    let sock = dir.sock("s");
    let target = dir.0.join("snap");
    let body = serde_json::to_value(SnapshotRequest {
        dir: target.clone(),
    })
    .unwrap();

    let (code, msg) = refused(&sock, "PUT", Some(&serde_json::json!({"dir": 5})));
    assert_eq!(code, 400, "{msg}");
    let (code, msg) = refused(&sock, "PUT", Some(&serde_json::json!({"path": "/x"})));
    assert_eq!(code, 400, "{msg}");
    let (code, msg) = refused(&sock, "GET", None);
    assert_eq!(code, 405, "{msg}");

    // Running: refused before anything is made.
    let (code, msg) = refused(&sock, "PUT", Some(&body));
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains("pause it first"), "{msg}");
    assert!(!target.exists());

    // Paused, but a bare test image: refused, nothing made.
    assert_eq!(dir.cli(&["pause", "s"]).0, 0);
    let (code, msg) = refused(&sock, "PUT", Some(&body));
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("only Linux guests"), "{msg}");
    assert!(!target.exists());
    let (code, _, err) = dir.cli(&["snapshot", "s", target.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    hard_stop(&sock);
    assert_eq!(wait_child(&mut child, T).code(), Some(0));
}

#[test]
fn restore_from_a_directory_without_a_snapshot_is_one_line_and_exit_1() {
    let dir = RunDir::new("snaprestore");
    std::fs::create_dir_all(&dir.0).unwrap();
    let run = run_with_deadline_stdin_null(
        {
            let mut c = dir.ferrite();
            c.args(["run", "--name", "r", "--restore"]).arg(&dir.0);
            c
        },
        T,
    );
    assert_eq!(run.code(), 1, "{}", run.stderr);
    let lines: Vec<&str> = run.stderr.trim().lines().collect();
    assert_eq!(lines.len(), 1, "{}", run.stderr);
    assert!(
        lines[0].contains("cannot read snapshot state file"),
        "{}",
        lines[0]
    );
    assert!(!dir.sock("r").exists());
}

#[test]
fn restore_with_machine_options_is_refused_by_the_command_line() {
    let run = run_ferrite(
        &["run", "--restore", "/nonexistent", "--mem", "64"],
        None,
        T,
    );
    assert_eq!(run.code(), 2, "{}", run.stderr);
    assert!(run.stderr.contains("--mem"), "{}", run.stderr);
    let run = run_ferrite(&["run", "--name", "x"], None, T);
    assert_eq!(run.code(), 2, "{}", run.stderr);
    assert!(run.stderr.contains("--kernel"), "{}", run.stderr);
}
