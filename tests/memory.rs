//! Guest memory backings against tiny guests: a 64 GiB guest on a smaller host,
//! file and memfd backings, preallocation, huge-page errors, and the memory figures of
//! `ferrite stat`.

mod common;

use common::*;
use ferrite::control::protocol::{InfoAnswer, MemoryFigures, MemoryUsage, StatsAnswer};
use std::process::Child;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// `ferrite stat NAME --json`.
fn stats(dir: &RunDir, name: &str) -> StatsAnswer {
    let (code, out, err) = dir.cli(&["stat", name, "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect(&out)
}

/// The memory figures of `ferrite stat NAME --json`.
fn memory(dir: &RunDir, name: &str) -> MemoryUsage {
    match stats(dir, name).memory {
        Some(MemoryFigures::Usage(m)) => m,
        other => panic!("no memory figures: {other:?}"),
    }
}

/// A hard stop through the socket (the counter guest ignores a graceful one).
fn stop_hard(dir: &RunDir, name: &str, mut child: Child) {
    hard_stop(&dir.sock(name));
    wait_child(&mut child, T);
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
    let s = RunDir::new("big");
    let child = s.start("big", "counter.elf", &["--mem", "64G"]);
    let m = memory(&s, "big");
    assert_eq!(m.guest_ram, 64 << 30, "{m:?}");
    let guest_rss = m.guest_rss;
    let process_rss = m.process_rss;
    assert!(guest_rss < 16 * MIB, "guest RSS {guest_rss}: {m:?}");
    assert!(process_rss < 32 * MIB, "process RSS {process_rss}: {m:?}");
    assert_eq!(m.vmm_rss, process_rss - guest_rss, "{m:?}");
    let est = m.kvm_metadata_estimate;
    assert!((100 * MIB..200 * MIB).contains(&est), "{m:?}");
    let (code, text, err) = s.cli(&["stat", "big"]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("guest RAM 65536 MiB"), "{text}");
    let (_, out, _) = s.cli(&["list", "--json"]);
    let list: Vec<InfoAnswer> = serde_json::from_str(&out).expect(&out);
    assert!(
        list.iter().any(|i| i.memory_backing == "anonymous"),
        "{out}"
    );
    stop_hard(&s, "big", child);
}

#[test]
fn file_backing_holds_guest_ram_and_is_locked() {
    if !require_kvm() {
        return;
    }
    let s = RunDir::new("file");
    std::fs::create_dir_all(&s.0).unwrap();
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
    let child = s.start(
        "holder",
        "counter.elf",
        &["--mem", "16M", "--mem-backing", &backing],
    );
    let r = hello(&["--mem", "16M", "--mem-backing", &backing]);
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("is in use"), "{}", r.stderr);
    stop_hard(&s, "holder", child);

    // A file of another size, a directory and a FIFO are refused with the reason.
    let cases = [
        (
            format!("file={}", file.display()),
            "32M",
            "holds 16777216 bytes",
        ),
        (format!("file={}", s.0.display()), "16M", "is a directory"),
        ("file=/dev/null".to_string(), "16M", "is a character device"),
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
    let s = RunDir::new("memfd");
    let child = s.start(
        "mfd",
        "counter.elf",
        &["--mem", "64M", "--mem-backing", "memfd", "--mem-prealloc"],
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", child.id())).unwrap();
    assert!(maps.contains("memfd:ferrite-guest-ram"), "{maps}");
    let m = memory(&s, "mfd");
    let guest_rss = m.guest_rss;
    assert!(
        guest_rss >= 63 * MIB,
        "preallocated, yet RSS {guest_rss}: {m:?}"
    );
    stop_hard(&s, "mfd", child);

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

/// A memory cgroup made for one test (cgroup v2, or the v1 memory hierarchy where the
/// host has that), removed when dropped.
struct TestCgroup {
    dir: std::path::PathBuf,
    /// The v2 root's `cgroup.subtree_control` when this test enabled +memory there.
    enabled_memory: Option<std::path::PathBuf>,
}

impl TestCgroup {
    /// A cgroup limited to `limit` bytes, or why none can be made here.
    fn new(tag: &str, limit: u64) -> Result<Self, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root to create a cgroup".into());
        }
        let name = format!("ferrite-test-{tag}-{}", std::process::id());
        let v2 = std::path::Path::new("/sys/fs/cgroup");
        let v1 = v2.join("memory");
        if v2.join("cgroup.controllers").exists() {
            let controllers = std::fs::read_to_string(v2.join("cgroup.controllers"))
                .map_err(|e| format!("cgroup.controllers: {e}"))?;
            if !controllers.split_whitespace().any(|c| c == "memory") {
                return Err("the cgroup v2 root has no memory controller".into());
            }
            let subtree = v2.join("cgroup.subtree_control");
            let on = std::fs::read_to_string(&subtree).unwrap_or_default();
            let mut enabled_memory = None;
            if !on.split_whitespace().any(|c| c == "memory") {
                std::fs::write(&subtree, "+memory")
                    .map_err(|e| format!("enabling +memory in {}: {e}", subtree.display()))?;
                enabled_memory = Some(subtree);
            }
            let cg = Self {
                dir: v2.join(&name),
                enabled_memory,
            };
            std::fs::create_dir(&cg.dir).map_err(|e| format!("{}: {e}", cg.dir.display()))?;
            std::fs::write(cg.dir.join("memory.max"), limit.to_string())
                .map_err(|e| format!("memory.max: {e}"))?;
            // No swap for the test cgroup: the limit must be a hard one.
            let _ = std::fs::write(cg.dir.join("memory.swap.max"), "0");
            Ok(cg)
        } else if v1.join("memory.limit_in_bytes").exists() {
            let cg = Self {
                dir: v1.join(&name),
                enabled_memory: None,
            };
            std::fs::create_dir(&cg.dir).map_err(|e| format!("{}: {e}", cg.dir.display()))?;
            std::fs::write(cg.dir.join("memory.limit_in_bytes"), limit.to_string())
                .map_err(|e| format!("memory.limit_in_bytes: {e}"))?;
            Ok(cg)
        } else {
            Err("no memory cgroup controller (neither cgroup v2 nor a v1 memory hierarchy)".into())
        }
    }

    /// `ferrite ARGS` run inside the cgroup (the shell moves itself in, then execs).
    fn run(&self, args: &[&str]) -> Run {
        let mut script = format!(
            "echo $$ > '{}' && exec '{}'",
            self.dir.join("cgroup.procs").display(),
            env!("CARGO_BIN_EXE_ferrite")
        );
        for a in args {
            script += &format!(" '{a}'");
        }
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c").arg(script);
        run_with_deadline_stdin_null(cmd, Duration::from_secs(60))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The processes have exited; an empty cgroup can be removed (retried briefly
        // while the kernel finishes tearing the last one down).
        wait_until(Duration::from_secs(5), || {
            std::fs::remove_dir(&self.dir).is_ok()
        });
        if let Some(subtree) = &self.enabled_memory {
            let _ = std::fs::write(subtree, "-memory");
        }
    }
}

/// Issue 13 defect 10: `--mem 1G --mem-prealloc` in a 256 MiB memory cgroup was
/// killed by the OOM killer (status 137, nothing on stderr). It is refused at start,
/// naming the cgroup, its limit and the sizes.
#[test]
fn prealloc_beyond_cgroup_limit_fails_cleanly() {
    if !require_kvm() {
        return;
    }
    let cg = match TestCgroup::new("prealloc", 256 * MIB) {
        Ok(c) => c,
        Err(why) => {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "a memory cgroup is required under CI: {why}"
            );
            common::record_not_run(&why.to_string());
            return;
        }
    };
    let g = guest("hello64.elf");
    let gs = g.to_str().unwrap();
    for backing in ["anon", "memfd"] {
        let r = cg.run(&[
            "run",
            "--kernel",
            gs,
            "--mem",
            "1G",
            "--mem-backing",
            backing,
            "--mem-prealloc",
        ]);
        assert_eq!(
            r.status,
            Some(1),
            "{backing}: killed or wrong status; stderr: {}",
            r.stderr
        );
        let err = &r.stderr;
        assert!(
            err.contains("--mem-prealloc: 1024 MiB of guest memory"),
            "{err}"
        );
        assert!(
            err.contains(&format!("memory cgroup {}", cg.dir.display())),
            "{err}"
        );
        assert!(err.contains("has a limit of 256 MiB"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    // What fits is still populated and runs.
    let r = cg.run(&["run", "--kernel", gs, "--mem", "64M", "--mem-prealloc"]);
    assert_eq!(r.status, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("Hello from long mode"), "{}", r.stdout);
}
