//! Tier A: the project's small patched Linux (tests/guests/linux, built once per
//! machine into ~/.cache/ferrite) booted by Ferrite on this host's /dev/kvm, driven
//! by the test init through `ferrite.test=` on the kernel command line.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(300);
const MEM_MIB: u64 = 256;

fn kernel_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_recipe("tests/guests/linux/build-tier-a.sh"))
}

fn boot(cpus: u32, cmdline: &str) -> Run {
    let d = kernel_dir();
    let kernel = d.join("vmlinux");
    let initrd = d.join("initramfs.cpio.gz");
    let mem = MEM_MIB.to_string();
    let cpus = cpus.to_string();
    let args = [
        "--log-level",
        "info",
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--mem",
        &mem,
        "--cpus",
        &cpus,
        "--cmdline",
        cmdline,
    ];
    run_ferrite(&args, None, DEADLINE)
}

#[test]
fn boots_to_userspace_with_cmdline_initrd_and_memory() {
    if !require_kvm() {
        return;
    }
    let cmdline = "console=ttyS0 reboot=k panic=-1 ferrite.test=info ferrite.then=reboot";
    let r = boot(1, cmdline);
    let ctx = format!("stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("FERRITE-USERSPACE"), "{ctx}");
    assert_eq!(field(&r.stdout, "CMDLINE"), Some(cmdline), "{ctx}");
    assert_eq!(
        field(&r.stdout, "INITRD_MARKER"),
        Some("ferrite-initrd-ok"),
        "{ctx}"
    );
    assert_eq!(field(&r.stdout, "NPROC"), Some("1"), "{ctx}");
    let mem_kb: u64 = field(&r.stdout, "MEMTOTAL_KB")
        .and_then(|v| v.parse().ok())
        .expect(&ctx);
    // MemTotal is RAM less what the kernel keeps for itself (its image, page tables).
    assert!(
        (MEM_MIB * 1024 * 85 / 100..=MEM_MIB * 1024).contains(&mem_kb),
        "MemTotal {mem_kb} KiB for {MEM_MIB} MiB: {ctx}"
    );
    assert!(
        r.stderr.contains("guest userspace reached after"),
        "boot marker: {ctx}"
    );
    // `reboot` goes through the i8042 reset line and ends Ferrite with status 0.
    assert_eq!(r.code(), 0, "{ctx}");
    assert!(r.stderr.contains("guest requested reset"), "{ctx}");
}

#[test]
fn forced_panic_is_reported() {
    if !require_kvm() {
        return;
    }
    let r = boot(1, "console=ttyS0 reboot=k panic=-1 ferrite.test=panic");
    let ctx = format!("stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("FERRITE-PANIC-NOW"), "{ctx}");
    assert_eq!(r.code(), 3, "{ctx}");
    assert!(r.stderr.contains("Kernel panic - not syncing"), "{ctx}");
    assert!(r.stderr.contains("guest kernel panicked"), "{ctx}");
}

#[test]
fn two_vcpus_boot() {
    if !require_kvm() {
        return;
    }
    // `nopv`: this host's KVM never completes the PV send-IPI hypercall, and an SMP
    // guest using it livelocks (see ../shared/notes).
    let r = boot(
        2,
        "console=ttyS0 reboot=k panic=-1 nopv ferrite.test=info ferrite.then=reboot",
    );
    let ctx = format!("stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert_eq!(field(&r.stdout, "NPROC"), Some("2"), "{ctx}");
    assert_eq!(r.code(), 0, "{ctx}");
}
