//! Guest memory backings against tiny guests: a 64 GiB guest on a smaller host,
//! file and memfd backings, preallocation, huge-page errors, and the memory figures of
//! `ferrite stat`.

mod common;

use common::*;
use serde_json::Value;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("ferrite-mem-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn ferrite(&self) -> Command {
        let mut c = ferrite();
        c.env("FERRITE_RUN_DIR", &self.0);
        c
    }
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.ferrite().args(args).output().expect("run ferrite");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
    /// Starts the never-ending counter guest as VM `name` with `extra` options.
    fn start(&self, name: &str, extra: &[&str]) -> Child {
        let child = self
            .ferrite()
            .args(["run", "--kernel", guest("counter.elf").to_str().unwrap()])
            .args(["--name", name])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferrite");
        let sock = self.0.join(format!("{name}.sock"));
        assert!(
            wait_until(T, || UnixStream::connect(&sock).is_ok()),
            "no control socket {}",
            sock.display()
        );
        child
    }
    fn stats(&self, name: &str) -> Value {
        let (code, out, err) = self.cli(&["stat", name, "--json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    }
    fn stop(&self, name: &str, mut child: Child) {
        let sock = self.0.join(format!("{name}.sock"));
        let body = serde_json::json!({"mode": "hard"});
        let (code, v) = ferrite::control::client::request(&sock, "PUT", "/vm/stop", Some(&body), T)
            .expect("stop request");
        assert_eq!(code, 200, "{v}");
        wait_child(&mut child, T);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const MIB: u64 = 1 << 20;

/// Runs hello64.elf (prints a line, then resets: status 0) with `extra` options.
fn hello(extra: &[&str]) -> Run {
    let g = guest("hello64.elf");
    let mut args = vec!["run", "--kernel", g.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_ferrite(&args, None, T)
}

#[test]
fn sixty_four_gib_guest_starts_and_touches_only_what_it_uses() {
    if !require_kvm() {
        return;
    }
    let s = Scratch::new("big");
    let child = s.start("big", &["--mem", "64G"]);
    let v = s.stats("big");
    let m = &v["memory"];
    assert_eq!(m["guest_ram"].as_u64(), Some(64 << 30), "{v}");
    let guest_rss = m["guest_rss"].as_u64().unwrap();
    let process_rss = m["process_rss"].as_u64().unwrap();
    assert!(guest_rss < 16 * MIB, "guest RSS {guest_rss}: {v}");
    assert!(process_rss < 32 * MIB, "process RSS {process_rss}: {v}");
    assert_eq!(m["vmm_rss"].as_u64(), Some(process_rss - guest_rss), "{v}");
    let est = m["kvm_metadata_estimate"].as_u64().unwrap();
    assert!((100 * MIB..200 * MIB).contains(&est), "{v}");
    let (code, text, err) = s.cli(&["stat", "big"]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("guest RAM 65536 MiB"), "{text}");
    let (_, info, _) = s.cli(&["list", "--json"]);
    assert!(info.contains("\"anonymous\""), "{info}");
    s.stop("big", child);
}

#[test]
fn file_backing_holds_guest_ram_and_is_locked() {
    if !require_kvm() {
        return;
    }
    let s = Scratch::new("file");
    let file = s.0.join("ram");
    let backing = format!("file={}", file.display());
    // hello64.elf is loaded at 1 MiB: its message must be in the file at that offset.
    let r = hello(&["--mem", "16M", "--mem-backing", &backing]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stdout.contains("Hello from long mode"), "{}", r.stdout);
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len() as u64, 16 * MIB);
    let window = &bytes[0x10_0000..0x10_1000];
    assert!(
        window.windows(20).any(|w| w == b"Hello from long mode"),
        "the guest image is not in the backing file at 1 MiB"
    );

    // A second VM cannot use a file a running VM holds.
    let child = s.start("holder", &["--mem", "16M", "--mem-backing", &backing]);
    let r = hello(&["--mem", "16M", "--mem-backing", &backing]);
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("is in use"), "{}", r.stderr);
    s.stop("holder", child);

    // A file of another size, a directory and a FIFO are refused with the reason.
    let cases = [
        (
            format!("file={}", file.display()),
            "32M",
            "holds 16777216 bytes",
        ),
        (format!("file={}", s.0.display()), "16M", "is a directory"),
        ("file=/dev/null".to_string(), "16M", "is a device"),
    ];
    for (b, mem, want) in cases {
        let r = hello(&["--mem", mem, "--mem-backing", &b]);
        assert_eq!(r.code(), 1, "{b}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{b}: {}", r.stderr);
    }
}

#[test]
fn memfd_prealloc_thp_and_hugepage_errors() {
    if !require_kvm() {
        return;
    }
    let s = Scratch::new("memfd");
    let child = s.start(
        "mfd",
        &["--mem", "64M", "--mem-backing", "memfd", "--mem-prealloc"],
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", child.id())).unwrap();
    assert!(maps.contains("memfd:ferrite-guest-ram"), "{maps}");
    let v = s.stats("mfd");
    let guest_rss = v["memory"]["guest_rss"].as_u64().unwrap();
    assert!(
        guest_rss >= 63 * MIB,
        "preallocated, yet RSS {guest_rss}: {v}"
    );
    s.stop("mfd", child);

    let r = hello(&["--hugepages=thp"]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    // No host has half a million free huge pages: a clear refusal, before the guest.
    let r = hello(&["--mem", "1T", "--hugepages"]);
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("524288 free 2 MiB huge pages are needed"),
        "{}",
        r.stderr
    );
    let r = hello(&["--mem", "3M", "--hugepages"]);
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("multiple of 2 MiB"), "{}", r.stderr);
    let r = hello(&["--mem-backing", "shm"]);
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("unknown memory backing 'shm'"),
        "{}",
        r.stderr
    );
}
