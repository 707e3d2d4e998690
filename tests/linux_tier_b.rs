//! Tier B: real upstream KVM. QEMU in software emulation (TCG, AMD SVM) boots Debian's
//! cloud kernel with kvm-amd; inside it the static Ferrite binary boots the unmodified
//! Debian cloud kernel (tests/guests/nested). Needs no /dev/kvm on the host.
//!
//! One outer boot serves every test here (it costs minutes): the runs below execute
//! in order, and each test asserts on its own runs' sections of the output.

mod common;

use common::*;
use ferrite::control::protocol::{
    DebugReport, KvmStats, StatsAnswer, StopMethod, StopReport, StoppedBy,
};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const BASE: &str =
    "--log-level info --kernel /guest/vmlinuz --initrd /guest/initramfs.cpio.gz --mem 256";
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";
/// How long the busy guest stays paused: well past its 4 s soft-lockup threshold
/// (checked: without KVM_KVMCLOCK_CTRL on pause the guest reports "soft lockup - CPU#0
/// stuck for 10s!" and the lockup test fails).
const PAUSE_S: u32 = 10;
/// Where the outer guest mounts tracefs.
const TRACEFS: &str = "/sys/kernel/tracing";
/// MSR_KVM_ASYNC_PF_EN and its bits.
const MSR_ASYNC_PF_EN: &str = "0x4b564d02";
const APF_ENABLED: u64 = 1 << 0;
const APF_DELIVERY_AS_INT: u64 = 1 << 3;

/// The line numbers (1-based) of the runs in the runs file.
struct Lines {
    info_1cpu: usize,
    info_2cpus: usize,
    apf_debug: usize,
    apf_stat: usize,
    apf_pause: usize,
    noapf_debug: usize,
    button_stop: usize,
    apf_trace: usize,
}

struct TierB {
    stdout: String,
    stderr: String,
    code: i32,
    lines: Lines,
    elapsed: Duration,
}

impl TierB {
    fn all(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }

    /// Output of run `i` between its BEGIN and END markers, and its exit status.
    fn run(&self, i: usize) -> (String, Option<i32>) {
        section(
            &self.stdout,
            &format!("FERRITE-RUN-BEGIN {i}"),
            &format!("FERRITE-RUN-END {i} EXIT="),
        )
    }

    /// Output of background VM `name`, and its exit status.
    fn vm(&self, name: &str) -> (String, Option<i32>) {
        section(
            &self.stdout,
            &format!("FERRITE-VM-OUTPUT-BEGIN {name}"),
            &format!("FERRITE-VM-OUTPUT-END {name} EXIT="),
        )
    }

    /// The JSON document a run printed (`ferrite debug|stat NAME --json`).
    fn json<R: serde::de::DeserializeOwned>(&self, i: usize) -> R {
        let (out, status) = self.run(i);
        assert_eq!(status, Some(0), "run {i}:\n{out}");
        out.lines()
            .find(|l| l.starts_with('{'))
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("run {i} printed no JSON:\n{out}"))
    }
}

/// Lines between `begin` and the line starting with `end`, and the number after it.
fn section(out: &str, begin: &str, end: &str) -> (String, Option<i32>) {
    let mut inside = false;
    let mut body = String::new();
    for line in out.lines().map(|l| l.trim_end_matches('\r')) {
        if line == begin {
            inside = true;
        } else if let Some(code) = line.strip_prefix(end).filter(|_| inside) {
            let code = code.split_whitespace().next().unwrap_or("");
            return (body, code.parse().ok());
        } else if inside {
            body.push_str(line);
            body.push('\n');
        }
    }
    (body, None)
}

/// The outer boot, run once for every test in this file.
fn tier_b() -> &'static TierB {
    static RUN: OnceLock<TierB> = OnceLock::new();
    RUN.get_or_init(|| {
        let mut runs: Vec<String> = Vec::new();
        let mut add = |line: String| {
            runs.push(line);
            runs.len()
        };
        let wait = |name: &str, marker: &str| format!("! vm_wait_for {name} {marker} 300");
        let lines = Lines {
            // 1 vCPU, then `poweroff` through ACPI S5.
            info_1cpu: add(format!(
                "run {BASE} --cpus 1 --cmdline \"{CMDLINE} ferrite.test=info ferrite.then=poweroff\""
            )),
            // 2 vCPUs (no nopv: upstream KVM), then `reboot` through the i8042.
            info_2cpus: add(format!(
                "run {BASE} --cpus 2 --cmdline \"{CMDLINE} ferrite.test=info ferrite.then=reboot\""
            )),
            // A busy guest with async page faults offered (the default) and a 4 s
            // soft-lockup threshold: registers and statistics, then a long pause
            // during which the next guest (async PF hidden) boots.
            apf_debug: {
                // KVM's async page fault tracepoints in the outer kernel, counted at
                // the end (KVM's statistics have no async PF counter).
                add(format!(
                    "! mount -t tracefs nodev {TRACEFS} && \
                     for f in {TRACEFS}/events/kvm/*async*/enable; do echo 1 >$f; done"
                ));
                add(format!(
                    "! vm_start apf {BASE} --cmdline \"{CMDLINE} watchdog_thresh=2 \
                     ferrite.test=wait ferrite.busy=1 ferrite.then=poweroff\""
                ));
                add(wait("apf", "FERRITE-WAITING"));
                add("! ferrite debug apf --json".into())
            },
            apf_stat: add("! ferrite stat apf --json".into()),
            apf_pause: add(format!(
                "! ferrite pause apf && vm_start noapf --cpu-features=-async-pf {BASE} \
                 --cmdline \"{CMDLINE} ferrite.test=wait ferrite.then=poweroff\" && \
                 sleep {PAUSE_S} && ferrite resume apf"
            )),
            noapf_debug: {
                // Some seconds of running after the pause, then the lockup count.
                add("! sleep 5; vm_input apf go; vm_end apf 120".into());
                add(wait("noapf", "FERRITE-WAITING"));
                let i = add("! ferrite debug noapf --json".into());
                add("! vm_input noapf go; vm_end noapf 120".into());
                i
            },
            // The power button: the guest loads button.ko and evdev.ko and powers
            // off on the key; `ferrite stop` (graceful) presses it.
            button_stop: {
                add(format!("! vm_start button {BASE} --cmdline \"{CMDLINE} ferrite.test=button\""));
                add(wait("button", "FERRITE-BUTTON-READY"));
                let i = add("! ferrite stop button --timeout 120 --json".into());
                add("! vm_end button 30".into());
                i
            },
            apf_trace: add(format!(
                "! for e in {TRACEFS}/events/kvm/*async*; do e=${{e##*/}}; \
                 echo \"TRACE_$e=$(grep -c \" $e:\" {TRACEFS}/trace)\"; done; \
                 grep async_pf {TRACEFS}/trace | tail -n 4"
            )),
        };
        let dir = root().join("target").join("tier-b");
        std::fs::create_dir_all(&dir).unwrap();
        let runs_file = dir.join("runs");
        std::fs::write(&runs_file, runs.join("\n") + "\n").unwrap();
        let outer = |timeout_s: u32| {
            let mut cmd = Command::new("bash");
            cmd.arg(root().join("tests/guests/nested/run-tier-b.sh"))
                .arg(env!("CARGO_BIN_EXE_ferrite"))
                .arg(&runs_file)
                .env("FERRITE_TIER_B_TIMEOUT", timeout_s.to_string());
            run_with_deadline_stdin_null(cmd, Duration::from_secs(u64::from(timeout_s) + 60))
        };
        let t = Instant::now();
        // The whole outer run takes ~50 s. About one run in five today, an inner guest's
        // boot under QEMU's TCG never got past its first kernel lines (the same code
        // passed again at once): such a run is cut at 300 s, shown here, and the outer
        // run made once more (one retry, never more; any other failure is final).
        let mut r = outer(300);
        if r.code() != 0 && r.stderr.contains("without FERRITE-ALL-DONE") {
            let tail: Vec<&str> = r.stdout.lines().rev().take(15).collect();
            eprintln!(
                "tier-B: the outer run timed out; its last lines (newest first):\n  {}\n\
                 tier-B: running it once more",
                tail.join("\n  ")
            );
            r = outer(600);
        }
        let tb = TierB {
            code: r.code(),
            stdout: r.stdout,
            stderr: r.stderr,
            lines,
            elapsed: t.elapsed(),
        };
        // Kept for a look after the run.
        let _ = std::fs::write(dir.join("output.txt"), &tb.stdout);
        eprintln!("tier-B outer run took {:?}", tb.elapsed);
        for l in tb.stdout.lines() {
            if l.contains("guest userspace reached after")
                || l.starts_with("FERRITE-VM-")
                || l.starts_with("FERRITE-RUN-TIME")
                || l.starts_with("FERRITE-KVM-READY")
            {
                eprintln!("  {l}");
            }
        }
        tb
    })
}

fn harness_ok(tb: &TierB) {
    assert_eq!(tb.code, 0, "harness failed: {}", tb.all());
    assert!(tb.stdout.contains("FERRITE-ALL-DONE"), "{}", tb.all());
}

/// MSR `index` from vCPU 0 of a `ferrite debug --json` dump: Some(value), or None when
/// KVM refused to read it (listed in `unreadable_msrs`).
fn msr(dump: &DebugReport, index: &str) -> Option<u64> {
    let cpu = dump.vcpus.first().expect("vCPU 0 in the dump");
    match cpu.msrs.get(index) {
        Some(v) => Some(u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()),
        None => {
            assert!(
                cpu.unreadable_msrs.iter().any(|v| v == index),
                "MSR {index} missing: {dump:?}"
            );
            None
        }
    }
}

#[test]
fn unmodified_debian_kernel_on_upstream_kvm() {
    let tb = tier_b();
    harness_ok(tb);
    for (i, cpus) in [(tb.lines.info_1cpu, "1"), (tb.lines.info_2cpus, "2")] {
        let (out, status) = tb.run(i);
        let ctx = format!("run {i}:\n{out}");
        assert!(out.contains("FERRITE-USERSPACE"), "{ctx}");
        assert_eq!(field(&out, "NPROC"), Some(cpus), "{ctx}");
        assert_eq!(field(&out, "CLOCKSOURCE"), Some("kvm-clock"), "{ctx}");
        assert_eq!(field(&out, "HYPERVISOR"), Some("KVM"), "{ctx}");
        assert_eq!(
            field(&out, "INITRD_MARKER"),
            Some("ferrite-initrd-ok"),
            "{ctx}"
        );
        assert_eq!(
            status,
            Some(0),
            "poweroff/reboot must end Ferrite with 0: {ctx}"
        );
    }
}

#[test]
fn unmodified_guest_enables_async_page_faults_only_when_offered() {
    let tb = tier_b();
    harness_ok(tb);
    let on: DebugReport = tb.json(tb.lines.apf_debug);
    let v = msr(&on, MSR_ASYNC_PF_EN).unwrap_or(0);
    eprintln!("async PF offered: MSR {MSR_ASYNC_PF_EN} = {v:#x}");
    assert_eq!(
        v & (APF_ENABLED | APF_DELIVERY_AS_INT),
        APF_ENABLED | APF_DELIVERY_AS_INT,
        "async PF not enabled as an interrupt: {on:?}"
    );
    // --cpu-features=-async-pf: the guest never enables it (and, with
    // KVM_CAP_ENFORCE_PV_FEATURE_CPUID, KVM refuses the MSR altogether).
    let off: DebugReport = tb.json(tb.lines.noapf_debug);
    let v = msr(&off, MSR_ASYNC_PF_EN);
    eprintln!("async PF hidden: MSR {MSR_ASYNC_PF_EN} = {v:x?} (None: refused by KVM)");
    assert_eq!(v.unwrap_or(0), 0, "{off:?}");
    // KVM statistics of the busy guest: whatever the host counts about page faults.
    let stat: StatsAnswer = tb.json(tb.lines.apf_stat);
    let kvm = &stat.vcpus.first().expect("vCPU 0 in the statistics").kvm;
    let pf: Vec<String> = match kvm {
        KvmStats::Stats(m) => m
            .iter()
            .filter(|(k, _)| k.contains("pf") || k.contains("async"))
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect(),
        KvmStats::Unavailable(u) => vec![format!("unavailable ({})", u.unavailable)],
    };
    eprintln!("vCPU 0 KVM page-fault statistics: {}", pf.join(" "));
    // Async page faults seen by the outer KVM (tracepoints): the outer guest has no
    // swap, so guest RAM is never paged out and none are expected; printed, not asserted.
    let (trace, status) = tb.run(tb.lines.apf_trace);
    assert_eq!(status, Some(0), "{trace}");
    assert!(trace.contains("TRACE_kvm_async_pf_ready="), "{trace}");
    eprintln!("outer KVM async PF tracepoints:\n{trace}");
    for name in ["apf", "noapf"] {
        let (out, status) = tb.vm(name);
        assert_eq!(status, Some(0), "VM {name}:\n{out}");
        assert!(out.contains("FERRITE-WAIT-END"), "VM {name}:\n{out}");
    }
}

#[test]
fn busy_guest_paused_past_its_soft_lockup_threshold_reports_no_lockup() {
    let tb = tier_b();
    harness_ok(tb);
    let (out, status) = tb.run(tb.lines.apf_pause);
    assert_eq!(status, Some(0), "{out}");
    assert!(out.contains("apf: running -> paused"), "{out}");
    assert!(out.contains("apf: paused -> running"), "{out}");
    let (out, status) = tb.vm("apf");
    assert_eq!(status, Some(0), "{out}");
    let before = field(&out, "SOFT_LOCKUPS_BEFORE").and_then(|v| v.parse::<u32>().ok());
    assert!(before.is_some(), "{out}");
    assert_eq!(
        field(&out, "SOFT_LOCKUPS").and_then(|v| v.parse::<u32>().ok()),
        before,
        "soft lockup after a {PAUSE_S} s pause:\n{out}"
    );
}

#[test]
fn graceful_stop_presses_the_acpi_power_button() {
    let tb = tier_b();
    harness_ok(tb);
    let stop: StopReport = tb.json(tb.lines.button_stop);
    eprintln!("ferrite stop (graceful): {stop:?}");
    assert_eq!(stop.method, Some(StopMethod::AcpiPowerButton), "{stop:?}");
    assert_eq!(stop.stopped_by, Some(StoppedBy::Guest), "{stop:?}");
    let (out, status) = tb.vm("button");
    assert!(
        out.contains("BUTTON=event"),
        "no power button device:\n{out}"
    );
    assert_eq!(field(&out, "BUTTON_EVENT"), Some("1 116"), "{out}");
    assert!(out.contains("FERRITE-POWER-BUTTON"), "{out}");
    assert_eq!(status, Some(0), "{out}");
}
