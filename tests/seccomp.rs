//! Seccomp: for each thread kind, a syscall outside its filter ends Ferrite with status
//! 148 and a line naming the thread, its filter and the syscall (the
//! FERRITE_TEST_FORBIDDEN_SYSCALL hook makes `getppid`, listed for no thread, right
//! after the named kind installs its filter). And `--no-seccomp` turns the filters off.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(240);

fn kernel_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_recipe("tests/guests/linux/build-tier-a.sh"))
}

/// Boots the tier-A guest with a disk (so a block worker starts) and the hook set for
/// `kind`; `extra` goes before the other `run` arguments.
fn boot_with_hook(kind: &str, extra: &[&str]) -> Run {
    require_kvm();
    let d = kernel_dir();
    let dir = tempfile_dir();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut cmd = ferrite();
    cmd.env("FERRITE_TEST_FORBIDDEN_SYSCALL", kind)
        .args(["run"])
        .args(extra)
        .arg("--kernel")
        .arg(d.join("vmlinux"))
        .arg("--initrd")
        .arg(d.join("initramfs.cpio.gz"))
        .args(["--mem", "256", "--disk"])
        .arg(&disk)
        // The guest powers off at once after boot, if nothing ended Ferrite first.
        .args([
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1 ferrite.test=poweroff",
        ]);
    let run = run_with_deadline_stdin_null(cmd, DEADLINE);
    let _ = std::fs::remove_dir_all(&dir);
    run
}

fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ferrite-seccomp-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn assert_reported(kind: &str, thread: &str) {
    let run = boot_with_hook(kind, &[]);
    let want =
        format!("({kind} filter) made forbidden syscall 110 (getppid); exiting with status 148");
    assert_eq!(run.code(), 148, "stderr:\n{}", run.stderr);
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains(&want))
        .unwrap_or_else(|| panic!("no report line {want:?} in stderr:\n{}", run.stderr));
    assert!(
        line.starts_with(&format!("ferrite: seccomp: thread '{thread}")),
        "{line}"
    );
}

#[test]
fn forbidden_syscall_on_the_main_thread_ends_the_vm_with_the_report() {
    assert_reported("main", "main");
}

#[test]
fn forbidden_syscall_on_the_event_loop_ends_the_vm_with_the_report() {
    assert_reported("loop", "ferrite-events");
}

#[test]
fn forbidden_syscall_on_a_vcpu_thread_ends_the_vm_with_the_report() {
    assert_reported("vcpu", "ferrite-vcpu-0");
}

#[test]
fn forbidden_syscall_on_a_block_worker_ends_the_vm_with_the_report() {
    assert_reported("block", "ferrite-blk-vda");
}

#[test]
fn forbidden_syscall_on_the_console_writer_ends_the_vm_with_the_report() {
    assert_reported("console", "ferrite-console");
}

#[test]
fn no_seccomp_leaves_the_threads_unfiltered() {
    let run = boot_with_hook("vcpu", &["--no-seccomp"]);
    assert!(!run.stderr.contains("seccomp:"), "{}", run.stderr);
    assert_ne!(run.status, Some(148), "stderr:\n{}", run.stderr);
}

/// The Firecracker front door: the loop builds the VM first and takes its filter once
/// `InstanceStart` (here from a config file) has succeeded.
#[test]
fn firecracker_front_door_filters_the_loop_after_the_start() {
    require_kvm();
    let d = kernel_dir();
    let dir = tempfile_dir();
    let config = dir.join("vm.json");
    let json = serde_json::json!({
        "boot-source": {
            "kernel_image_path": d.join("vmlinux"),
            "initrd_path": d.join("initramfs.cpio.gz"),
            "boot_args": "console=ttyS0 reboot=k panic=1 ferrite.test=poweroff"
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
        "drives": []
    });
    std::fs::write(&config, json.to_string()).unwrap();
    let mut cmd = ferrite();
    cmd.env("FERRITE_TEST_FORBIDDEN_SYSCALL", "loop")
        .args(["firecracker", "--no-api", "--config-file"])
        .arg(&config);
    let run = run_with_deadline_stdin_null(cmd, DEADLINE);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(run.code(), 148, "stderr:\n{}", run.stderr);
    assert!(
        run.stderr.contains(
            "ferrite: seccomp: thread 'ferrite-events' (loop filter) made forbidden syscall 110 (getppid)"
        ),
        "{}",
        run.stderr
    );
}

/// Firecracker's `--seccomp-filter FILE` (a JSON filter set) is refused with a reason,
/// not silently ignored.
#[test]
fn firecracker_seccomp_filter_file_is_refused_with_a_reason() {
    let dir = tempfile_dir();
    let sock = dir.join("api.sock");
    let mut cmd = ferrite();
    cmd.args(["firecracker", "--api-sock"])
        .arg(&sock)
        .args(["--seccomp-filter", "/nonexistent/filter.json"]);
    let run = run_with_deadline_stdin_null(cmd, Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
    assert_ne!(run.code(), 0, "{}", run.stderr);
    assert!(
        run.stderr.contains(
            "--seccomp-filter /nonexistent/filter.json: custom filters are not supported"
        ),
        "{}",
        run.stderr
    );
    assert!(!sock.exists());
}
