//! Tier B: real upstream KVM. QEMU in software emulation (TCG, AMD SVM) boots Debian's
//! cloud kernel with kvm-amd; inside it the static Ferrite binary boots the unmodified
//! Debian cloud kernel (tests/guests/nested). Needs no /dev/kvm on the host.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const BASE: &str = "--kernel /guest/vmlinuz --initrd /guest/initramfs.cpio.gz --mem 256";
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

/// Output of run `i` (1-based) between its BEGIN and END markers, and its exit status.
fn run_section(out: &str, i: usize) -> (String, Option<i32>) {
    let begin = format!("FERRITE-RUN-BEGIN {i}");
    let end = format!("FERRITE-RUN-END {i} EXIT=");
    let mut inside = false;
    let mut body = String::new();
    for line in out.lines().map(|l| l.trim_end_matches('\r')) {
        if line == begin {
            inside = true;
        } else if let Some(code) = line.strip_prefix(&end) {
            return (body, code.trim().parse().ok());
        } else if inside {
            body.push_str(line);
            body.push('\n');
        }
    }
    (body, None)
}

#[test]
fn unmodified_debian_kernel_on_upstream_kvm() {
    let runs = [
        // 1 vCPU, then `poweroff` through ACPI S5.
        format!(
            "run {BASE} --cpus 1 --cmdline \"{CMDLINE} ferrite.test=info ferrite.then=poweroff\""
        ),
        // 2 vCPUs (no nopv: upstream KVM), then `reboot` through the i8042.
        format!(
            "run {BASE} --cpus 2 --cmdline \"{CMDLINE} ferrite.test=info ferrite.then=reboot\""
        ),
    ];
    let dir = root().join("target").join("tier-b");
    std::fs::create_dir_all(&dir).unwrap();
    let runs_file = dir.join("runs");
    std::fs::write(&runs_file, runs.join("\n") + "\n").unwrap();
    let mut cmd = Command::new("bash");
    cmd.arg(root().join("tests/guests/nested/run-tier-b.sh"))
        .arg(env!("CARGO_BIN_EXE_ferrite"))
        .arg(&runs_file);
    let r = run_with_deadline_stdin_null(cmd, Duration::from_secs(1200));
    let all = format!("stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert_eq!(r.code(), 0, "harness failed: {all}");
    assert!(r.stdout.contains("FERRITE-ALL-DONE"), "{all}");
    for (i, cpus) in [(1, "1"), (2, "2")] {
        let (out, status) = run_section(&r.stdout, i);
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
