//! The metadata service on the native CLI: `ferrite run --mmds --metadata FILE` with a
//! TAP, then `ferrite mmds NAME` reads the document, `--patch` and `--put` change it,
//! a document over the size limit (or over the control socket's body limit) is refused
//! and changes nothing, a VM without `--mmds` refuses, and a native snapshot taken
//! with `--mmds` restores with the service (an empty document).
//!
//! Virtio devices need a Linux kernel, so the VM is the tier-A kernel (no initramfs),
//! paused as soon as its socket is up: the MMDS store is the VMM's, and nothing here
//! needs the guest to run (the guest side is covered by the front door's tests).

mod common;

use common::*;
use ferrite::control::client;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn kernel_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_recipe("tests/guests/linux/build-tier-a.sh"))
}

/// Starts the tier-A kernel as VM `name` with `extra`, and pauses it once its control
/// socket answers.
fn start_paused(dir: &RunDir, name: &str, extra: &[&str]) -> std::process::Child {
    let child = dir
        .ferrite()
        .args(["run", "--name", name, "--mem", "64M", "--kernel"])
        .arg(kernel_dir().join("vmlinux"))
        .args(["--cmdline", "console=ttyS0 reboot=k panic=-1"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferrite");
    let sock = dir.sock(name);
    assert!(
        wait_until(T, || std::os::unix::net::UnixStream::connect(&sock).is_ok()),
        "no control socket {}",
        sock.display()
    );
    let (code, _, err) = dir.cli(&["pause", name]);
    assert_eq!(code, 0, "{err}");
    child
}

/// A TAP device, deleted when dropped.
struct Tap(String);

impl Tap {
    fn new(tag: &str) -> Tap {
        let name = format!("fmn{tag}{}", std::process::id() % 100_000);
        let _ = Command::new("ip")
            .args(["link", "del", "dev", &name])
            .stderr(Stdio::null())
            .status();
        sh("ip", &["tuntap", "add", "dev", &name, "mode", "tap"]);
        Tap(name)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", "dev", &self.0])
            .status();
    }
}

/// `ferrite mmds ARGS --json`: the status, the document (Null unless it printed one)
/// and stderr.
fn mmds(dir: &RunDir, args: &[&str]) -> (i32, Value, String) {
    let mut all = vec!["mmds"];
    all.extend_from_slice(args);
    all.push("--json");
    let (code, out, err) = dir.cli(&all);
    (code, serde_json::from_str(&out).unwrap_or(Value::Null), err)
}

#[test]
fn native_mmds_serves_reads_patches_and_refuses_over_limit_documents() {
    if !require_kvm() || !require_root("the MMDS test needs root (a TAP device)") {
        return;
    }
    let dir = RunDir::new("mmds");
    let files = RunDir::new("mmds-files");
    std::fs::create_dir_all(&files.0).unwrap();
    let tap = Tap::new("a");
    let meta = files.0.join("meta.json");
    std::fs::write(&meta, r#"{ "latest": { "meta-data": { "id": "i-1" } } }"#).unwrap();
    let mut child = start_paused(
        &dir,
        "md",
        &[
            "--net",
            &format!("tap={}", tap.0),
            "--mmds",
            "--metadata",
            meta.to_str().unwrap(),
            "--mmds-size-limit",
            "200",
        ],
    );

    let first = json!({"latest": {"meta-data": {"id": "i-1"}}});
    let (code, v, err) = mmds(&dir, &["md"]);
    assert_eq!((code, &v), (0, &first), "{err}");
    // The human form is the same document, pretty-printed.
    let (code, out, err) = dir.cli(&["mmds", "md"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).ok(),
        Some(first),
        "{out}"
    );

    let patch = files.0.join("patch.json");
    std::fs::write(&patch, r#"{"latest": {"meta-data": {"zone": "z1"}}}"#).unwrap();
    let (code, v, err) = mmds(&dir, &["md", "--patch", patch.to_str().unwrap()]);
    let patched = json!({"latest": {"meta-data": {"id": "i-1", "zone": "z1"}}});
    assert_eq!((code, &v), (0, &patched), "{err}");

    // Over --mmds-size-limit: refused with the store's reason, the document unchanged.
    let big = files.0.join("big.json");
    std::fs::write(&big, format!(r#"{{"blob": "{}"}}"#, "x".repeat(300))).unwrap();
    let (code, _, err) = mmds(&dir, &["md", "--put", big.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("HTTP 413") && err.contains("limit is 200"),
        "{err}"
    );
    assert_eq!(mmds(&dir, &["md"]).1, patched);

    // Over the control socket's body limit: the CLI refuses it before sending, and a
    // raw request with such a body is refused by the server's reader.
    let huge = files.0.join("huge.json");
    std::fs::write(&huge, format!(r#"{{"blob": "{}"}}"#, "x".repeat(70_000))).unwrap();
    let (code, _, err) = mmds(&dir, &["md", "--put", huge.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("at most 65536"), "{err}");
    let body = json!({"blob": "x".repeat(70_000)});
    let r = client::request(&dir.sock("md"), "PUT", "/vm/mmds", Some(&body), T);
    assert!(
        matches!(r, Ok((413, _)) | Err(_)),
        "a 70 KB body was taken: {r:?}"
    );
    assert_eq!(mmds(&dir, &["md"]).1, patched);

    // From standard input.
    let mut put = dir
        .ferrite()
        .args(["mmds", "md", "--put", "-", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut put.stdin.take().unwrap(), br#"["a", 1]"#).unwrap();
    let out = put.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mmds(&dir, &["md"]).1, json!(["a", 1]));

    // A snapshot of it, restored on the same TAP once this VM is gone: the service
    // answers again, with an empty document (documents are not kept in snapshots).
    let snap = files.0.join("snap");
    let (code, _, err) = dir.cli(&["snapshot", "md", snap.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = dir.cli(&["stop", "md", "--hard"]);
    assert_eq!(code, 0, "{err}");
    wait_child(&mut child, T);
    let mut restored = dir
        .ferrite()
        .args(["run", "--restore", snap.to_str().unwrap(), "--name", "mr"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sock = dir.sock("mr");
    assert!(
        wait_until(T, || std::os::unix::net::UnixStream::connect(&sock).is_ok()),
        "the restored VM has no control socket"
    );
    let (code, v, err) = mmds(&dir, &["mr"]);
    assert_eq!((code, v), (0, json!({})), "{err}");
    let (code, v, err) = mmds(&dir, &["mr", "--put", meta.to_str().unwrap()]);
    assert_eq!(
        (code, v),
        (0, json!({"latest": {"meta-data": {"id": "i-1"}}})),
        "{err}"
    );
    assert_eq!(dir.cli(&["stop", "mr", "--hard"]).0, 0);
    wait_child(&mut restored, T);
}

#[test]
fn native_mmds_is_refused_without_mmds_or_without_a_net() {
    if !require_kvm() {
        return;
    }
    let dir = RunDir::new("nommds");
    let mut child = dir.start("plain", "counter.elf", &[]);
    let (code, _, err) = mmds(&dir, &["plain"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no metadata service") && err.contains("HTTP 404"),
        "{err}"
    );
    assert_eq!(dir.cli(&["stop", "plain", "--hard"]).0, 0);
    wait_child(&mut child, T);

    let k = guest("counter.elf");
    let (code, _, err) = dir.cli(&["run", "--kernel", k.to_str().unwrap(), "--mmds"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--mmds needs a network interface"), "{err}");
    let (code, _, err) = dir.cli(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--metadata",
        "/nonexistent.json",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("go with --mmds"), "{err}");
}
