//! Issue 17's host checks of a restore that need a real snapshot but no booted guest:
//! a snapshot whose guest saw a CPU feature this host lacks is refused with one line
//! naming the feature, exit 1, nothing started; and `--restore-clock` takes only its
//! two values. The snapshot is of the tier-A Linux paused right after start (its boot
//! need not get anywhere: only the state file is doctored).

mod common;

use common::*;
use ferrite::snapshot::{cpu, format, Snapshot, STATE_FILE};
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// A bit of leaf 7 subleaf 0 (EBX, ECX, EDX) this host's KVM cannot offer, set in
/// `cpuid` (which must have that leaf): returns (register, bit).
fn set_a_bit_the_host_lacks(
    cpuid: &mut [kvm_bindings::kvm_cpuid_entry2],
    host: &[kvm_bindings::kvm_cpuid_entry2],
) -> Option<(cpu::Reg, u32)> {
    for reg in [cpu::Reg::Ebx, cpu::Reg::Ecx, cpu::Reg::Edx] {
        for bit in 0..32 {
            let mut trial = cpuid.to_vec();
            let e = trial.iter_mut().find(|e| e.function == 7 && e.index == 0)?;
            let r = match reg {
                cpu::Reg::Ebx => &mut e.ebx,
                cpu::Reg::Ecx => &mut e.ecx,
                _ => &mut e.edx,
            };
            *r |= 1 << bit;
            let want = cpu::Missing {
                leaf: 7,
                subleaf: 0,
                reg,
                bit,
            };
            if cpu::missing(&trial, host).contains(&want) {
                cpuid.copy_from_slice(&trial);
                return Some((reg, bit));
            }
        }
    }
    None
}

#[test]
fn restore_of_a_snapshot_needing_a_cpu_feature_the_host_lacks_is_refused_naming_it() {
    if !require_kvm() {
        return;
    }
    let k = build_recipe("tests/guests/linux/build-tier-a.sh");
    let dir = RunDir::new("snapcpu");
    std::fs::create_dir_all(&dir.0).unwrap();
    let mut cmd = dir.ferrite();
    cmd.args(["run", "--name", "c", "--mem", "128", "--kernel"])
        .arg(k.join("vmlinux"))
        .arg("--initrd")
        .arg(k.join("initramfs.cpio.gz"));
    let mut vm = Spawned::start(cmd, false);
    let sock = dir.sock("c");
    assert!(
        wait_until(T, || std::os::unix::net::UnixStream::connect(&sock).is_ok()),
        "no control socket: {}",
        vm.ctx()
    );
    assert_eq!(dir.cli(&["pause", "c"]).0, 0);
    let snap = dir.0.join("snap");
    let (code, out, err) = dir.cli(&["snapshot", "c", snap.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    hard_stop(&sock);
    vm.wait_exit(T);

    // The restore of the untouched snapshot passes the check (here only up to the
    // point where it would run: the check is before anything is built).
    let state = snap.join(STATE_FILE);
    let mut s: Snapshot = format::read(&state).expect("the snapshot reads back");
    assert!(
        s.vcpus.iter().all(|v| !v.cpuid.is_empty()),
        "the guest's CPUID is saved"
    );
    let host = cpu::host_cpuid(Path::new("/dev/kvm")).expect("host CPUID");
    let saved: Vec<&[kvm_bindings::kvm_cpuid_entry2]> =
        s.vcpus.iter().map(|v| v.cpuid.as_slice()).collect();
    if let Err(e) = cpu::check(&saved, &host) {
        panic!("a snapshot of this host must fit it: {e}");
    }

    // ... and restores (with the saved CPUID set back, the clock by wall time).
    let mut cmd = dir.ferrite();
    cmd.args([
        "run",
        "--name",
        "ok",
        "--restore-clock",
        "realtime",
        "--restore",
    ])
    .arg(&snap);
    let mut ok = Spawned::start(cmd, false);
    let ok_sock = dir.sock("ok");
    assert!(
        wait_until(T, || std::os::unix::net::UnixStream::connect(&ok_sock)
            .is_ok()),
        "the untouched snapshot did not restore: {}",
        ok.ctx()
    );
    hard_stop(&ok_sock);
    ok.wait_exit(T);

    let Some((reg, bit)) = set_a_bit_the_host_lacks(&mut s.vcpus[0].cpuid, &host) else {
        panic!("this host's KVM offers every leaf 7 feature bit");
    };
    std::fs::remove_file(&state).unwrap();
    format::write(&state, &s).expect("rewrite the state file");

    let mut cmd = dir.ferrite();
    cmd.args(["run", "--name", "r", "--restore"]).arg(&snap);
    let run = run_with_deadline_stdin_null(cmd, T);
    assert_eq!(run.code(), 1, "{}", run.stderr);
    let lines: Vec<&str> = run.stderr.trim().lines().collect();
    assert_eq!(lines.len(), 1, "{}", run.stderr);
    let want = format!("leaf 0x7 subleaf 0 {reg} bit {bit}");
    assert!(
        lines[0].contains("snapshot needs CPU feature")
            && lines[0].contains(&want)
            && lines[0].contains("that this host lacks"),
        "{} (wanted {want})",
        lines[0]
    );
    assert!(!dir.sock("r").exists(), "the refused restore left a socket");
}

#[test]
fn restore_clock_takes_continue_or_realtime_and_only_with_restore() {
    let run = run_ferrite(
        &[
            "run",
            "--restore",
            "/nonexistent",
            "--restore-clock",
            "wall",
        ],
        None,
        T,
    );
    assert_eq!(run.code(), 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("continue or realtime"),
        "{}",
        run.stderr
    );
    for mode in ["continue", "realtime"] {
        let run = run_ferrite(
            &["run", "--restore", "/nonexistent", "--restore-clock", mode],
            None,
            T,
        );
        // Accepted: the restore itself fails on the missing snapshot.
        assert_eq!(run.code(), 1, "{}", run.stderr);
        assert!(
            run.stderr.contains("cannot read snapshot state file"),
            "{}",
            run.stderr
        );
    }
    let run = run_ferrite(
        &["run", "--kernel", "/x", "--restore-clock", "realtime"],
        None,
        T,
    );
    assert_eq!(run.code(), 2, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("--restore-clock and --mem-backend go with --restore DIR"),
        "{}",
        run.stderr
    );
}
