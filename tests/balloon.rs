//! Tier A with a virtio-balloon (`--balloon`): the project's small Linux (see
//! tests/linux_tier_a.rs) in the test init's `ferrite.test=balloon` mode, which reads
//! memory commands from the console (tests/guests/linux/init documents them).
//!
//! Guest kernel code is emulated on the project's hosts: a boot takes 25-60 s, filling
//! 32 MiB of tmpfs ~40 s, inflating the balloon by 64 MiB ~30 s. So one boot runs every
//! step in order, and each step waits for an answer (a console line, a balloon figure
//! over the control socket, the host RSS) with a generous deadline instead of sleeping
//! for a fixed time: a slow, loaded host only makes the test slower.
//!
//! 1. `ferrite balloon NAME 64M`: the driver takes 64 MiB (actual reaches the target)
//!    and the guest's MemFree drops by about 64 MiB; `ferrite balloon NAME 0` gives it
//!    back.
//! 2. Statistics arrive over the socket and follow the guest: MemFree in them drops
//!    when the guest fills 32 MiB of tmpfs.
//! 3. Free page reporting: with 64 MiB of tmpfs filled, the guest frees it and Ferrite's
//!    RSS (guest RAM is anonymous memory in the Ferrite process) drops by >= 40 MiB.

mod common;

use common::*;
use ferrite::control::protocol::BalloonAnswer;
use std::path::PathBuf;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

const NAME: &str = "balloon-tier-a";
const MIB: u64 = 1 << 20;
/// Deadline of any one step (a boot, a fill, an inflation).
const STEP: Duration = Duration::from_secs(300);

fn kernel_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_recipe("tests/guests/linux/build-tier-a.sh"))
}

struct Vm {
    f: Spawned,
    run_dir: PathBuf,
}

impl Vm {
    fn start() -> Vm {
        let d = kernel_dir();
        let run_dir = root().join("target").join("balloon-run");
        let _ = std::fs::remove_dir_all(&run_dir);
        let mut cmd = ferrite();
        cmd.env("FERRITE_RUN_DIR", &run_dir)
            .args(["--log-level", "info", "run", "--name", NAME, "--mem", "256"])
            .arg("--kernel")
            .arg(d.join("vmlinux"))
            .arg("--initrd")
            .arg(d.join("initramfs.cpio.gz"))
            .args([
                "--balloon",
                "--cmdline",
                "console=ttyS0 reboot=k panic=-1 ferrite.test=balloon",
            ]);
        Vm {
            f: Spawned::start(cmd, true),
            run_dir,
        }
    }

    fn ctx(&self) -> String {
        self.f.ctx()
    }

    /// Waits for the guest line `KEY=value` and returns the value.
    fn field(&self, key: &str) -> String {
        // The whole line, up to its newline: the value may still be arriving when
        // `KEY=` is first seen.
        self.f
            .out
            .wait_for_field(key, STEP)
            .unwrap_or_else(|| panic!("no {key} line from the guest\n{}", self.ctx()))
    }

    /// Sends one command line to the guest's console.
    fn send(&mut self, line: &str) {
        self.f.send(format!("{line}\n").as_bytes());
    }

    /// The guest's MemFree (KiB), the largest of three reads.
    fn memfree_kb(&mut self, tag: &str) -> u64 {
        self.send(&format!("mem {tag}"));
        let v = self.field(&format!("MEMFREE_KB_{tag}"));
        v.parse()
            .unwrap_or_else(|_| panic!("MEMFREE_KB_{tag}={v}\n{}", self.ctx()))
    }

    /// `ferrite ARGS` against this VM: (exit status, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = ferrite()
            .env("FERRITE_RUN_DIR", &self.run_dir)
            .args(args)
            .output()
            .expect("run ferrite");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `ferrite balloon NAME [SIZE] --json`.
    fn balloon(&self, size: Option<&str>) -> BalloonAnswer {
        let mut args = vec!["balloon", NAME, "--json"];
        args.extend(size);
        let (st, out, err) = self.cli(&args);
        assert_eq!(st, 0, "ferrite {args:?}: {err}\n{}", self.ctx());
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// Polls the balloon until `f` holds; the last state either way.
    fn balloon_until(&self, what: &str, f: impl Fn(&BalloonAnswer) -> bool) -> BalloonAnswer {
        let start = Instant::now();
        loop {
            let v = self.balloon(None);
            if f(&v) {
                return v;
            }
            assert!(
                start.elapsed() < STEP,
                "balloon never reached: {what}; last {v:?}\n{}",
                self.ctx()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Ferrite's resident set (bytes), from /proc.
    fn rss(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.f.pid())).unwrap();
        let kb: u64 = s
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kb * 1024
    }

    /// Waits for the guest to fill `mib` MiB of tmpfs (as file `tag`).
    fn fill(&mut self, mib: u64, tag: &str) -> Duration {
        let t = Instant::now();
        self.send(&format!("fill {mib} {tag}"));
        assert_eq!(self.field(&format!("FILLED_{tag}")), "0", "{}", self.ctx());
        t.elapsed()
    }
}

fn stat(v: &BalloonAnswer, key: &str) -> u64 {
    v.guest_stats
        .as_ref()
        .and_then(|g| g.get(key).copied())
        .unwrap_or_else(|| panic!("no guest statistic {key} in {v:?}"))
}

#[test]
fn balloon_inflates_deflates_reports_statistics_and_free_pages() {
    if !require_kvm() {
        return;
    }
    let mut vm = Vm::start();
    assert!(
        vm.f.out.wait_for("BALLOON-READY", STEP),
        "guest not ready\n{}",
        vm.ctx()
    );
    assert_eq!(vm.field("BALLOON-DRIVER"), "yes", "{}", vm.ctx());
    assert!(!vm.f.stdout().contains("BALLOON-TMPFS=failed"));

    // The driver negotiated statistics and reporting; statistics arrive.
    let v = vm.balloon_until("guest statistics", |v| v.guest_stats.is_some());
    assert!(v.driver_active, "{v:?}");
    assert!(v.statistics, "{v:?}");
    assert!(v.free_page_reporting, "{v:?}");
    assert!(v.deflate_on_oom, "{v:?}");
    // MemTotal: RAM less what the kernel keeps for itself.
    let total = stat(&v, "total_memory") / MIB;
    assert!((200..=256).contains(&total), "total_memory {total} MiB");
    assert!(
        v.guest_stats_age_ms.unwrap() < 10_000,
        "statistics are refreshed: {v:?}"
    );

    // More than the guest's RAM is refused (a VM without a balloon: the API's unit
    // tests).
    let (st, _, err) = vm.cli(&["balloon", NAME, "1G"]);
    assert_eq!(st, 1);
    assert!(err.contains("exceeds the guest's RAM"), "{err}");

    // 1. Inflate by 64 MiB, then empty the balloon.
    let base = vm.memfree_kb("base");
    let t = Instant::now();
    let v = vm.balloon(Some("64M"));
    assert_eq!(v.target_bytes, 64 * MIB, "{v:?}");
    vm.balloon_until("actual = 64 MiB", |v| v.actual_bytes == 64 * MIB);
    let inflate_time = t.elapsed();
    let inflated = vm.memfree_kb("in");
    let drop_mib = (base as f64 - inflated as f64) / 1024.0;
    eprintln!(
        "inflate 64 MiB: {inflate_time:?}; MemFree {base} KiB -> {inflated} KiB ({drop_mib:.1} MiB less)"
    );
    assert!(
        (56.0..=72.0).contains(&drop_mib),
        "MemFree dropped by {drop_mib:.1} MiB, expected about 64\n{}",
        vm.ctx()
    );
    let t = Instant::now();
    let v = vm.balloon(Some("0"));
    assert_eq!(v.target_bytes, 0, "{v:?}");
    let v = vm.balloon_until("actual = 0", |v| v.actual_bytes == 0);
    let deflate_time = t.elapsed();
    let back = vm.memfree_kb("out");
    let diff_mib = (base as f64 - back as f64) / 1024.0;
    eprintln!(
        "deflate: {deflate_time:?}; MemFree back to {back} KiB ({diff_mib:.1} MiB below the start); inflated {} pages, deflated {}",
        v.inflated_pages, v.deflated_pages
    );
    assert!(
        diff_mib.abs() <= 8.0,
        "MemFree {back} KiB after emptying the balloon, {base} KiB before\n{}",
        vm.ctx()
    );
    assert_eq!(v.inflated_pages, 16384, "{v:?}");
    assert_eq!(v.deflated_pages, 16384, "{v:?}");
    assert_eq!(v.ignored_pfns, 0, "{v:?}");
    assert_eq!(v.discard_errors, 0, "{v:?}");

    // 2. Statistics follow the guest: its MemFree drops when it fills 32 MiB.
    let before = vm.balloon_until("statistics", |v| v.guest_stats.is_some());
    let fill_time = vm.fill(32, "a");
    let after = vm.balloon_until("statistics show the 32 MiB", |v| {
        stat(v, "free_memory") + 24 * MIB <= stat(&before, "free_memory")
    });
    eprintln!(
        "statistics: free {} -> {} MiB, available {} -> {} MiB, minor faults {} -> {} (fill 32 MiB: {fill_time:?})",
        stat(&before, "free_memory") / MIB,
        stat(&after, "free_memory") / MIB,
        stat(&before, "available_memory") / MIB,
        stat(&after, "available_memory") / MIB,
        stat(&before, "minor_faults"),
        stat(&after, "minor_faults"),
    );
    assert!(stat(&after, "minor_faults") > stat(&before, "minor_faults"));
    // `ferrite stat` shows the balloon too.
    let (st, out, err) = vm.cli(&["stat", NAME]);
    assert_eq!(st, 0, "{err}");
    assert!(out.contains("balloon target 0.0 MiB"), "{out}");
    assert!(out.contains("guest free"), "{out}");

    // 3. Free page reporting gives the memory of freed tmpfs pages back to the host.
    vm.fill(32, "b");
    let full = vm.rss();
    let reported_before = vm.balloon(None).reported_bytes;
    let t = Instant::now();
    vm.send("free c");
    assert_eq!(vm.field("FREED_c"), "0");
    let mut low = full;
    let deadline = Instant::now() + Duration::from_secs(120);
    while full - low < 40 * MIB && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        low = low.min(vm.rss());
    }
    let reported = vm.balloon(None).reported_bytes - reported_before;
    eprintln!(
        "free page reporting: RSS {} MiB with 64 MiB of tmpfs, {} MiB after freeing it ({:.1} MiB back, {:?}); {} MiB reported",
        full / MIB,
        low / MIB,
        (full - low) as f64 / MIB as f64,
        t.elapsed(),
        reported / MIB
    );
    assert!(
        full - low >= 40 * MIB,
        "only {} MiB of RSS came back\n{}",
        (full - low) / MIB,
        vm.ctx()
    );
    assert!(reported >= 40 * MIB, "reported {reported} bytes");

    vm.send("end");
    let status = wait_child(&mut vm.f.child, STEP);
    assert_eq!(status.code(), Some(0), "{}", vm.ctx());
}
