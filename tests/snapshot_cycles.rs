//! 20 consecutive snapshot -> kill -> restore cycles of one tier-A guest (issue 17),
//! booted ONCE with 1 vCPU and WITHOUT `nopv`, so the guest runs on kvm-clock and has
//! async page faults enabled, with a virtio disk kept busy and vsock:
//!
//!   setup   a shell loop writes 64 KiB of random data to /dev/vda with fsync and
//!           prints `W<n>` after each write, for ever; a vsock echo server listens
//!   cycle   (20 times) the guest's uptime is read; `ferrite pause`, `ferrite snapshot`,
//!           the process is killed (SIGKILL), `ferrite run --restore` of that snapshot;
//!           then the loop goes on (a `W` line past the last one the killed VM
//!           printed), the shell answers, the uptime is not below the one before the
//!           snapshot, a vsock echo round trip works, and the kvm-clock and async PF
//!           MSRs (0x4b564d01, 0x4b564d02) of vCPU 0 still hold what the booted guest
//!           wrote into them.
//!
//! tests/snapshot_tier_b.rs makes the same MSR check with 2 vCPUs on the Debian kernel
//! and upstream KVM.

mod common;

use common::tier_a::{guest_args, start_vsock_echo, uptime, vsock_echo, BOOT_DEADLINE, CMDLINE};
use common::*;
use ferrite::control::protocol::DebugReport;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const ANSWER: Duration = Duration::from_secs(60);
const CYCLES: usize = 20;
const ECHO_PORT: u32 = 5000;
const MSR_KVM_SYSTEM_TIME_NEW: &str = "0x4b564d01";
const MSR_KVM_ASYNC_PF_EN: &str = "0x4b564d02";

/// The `W<n>` numbers on the console, in order.
fn writes(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix('W'))
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// vCPU 0's kvm-clock and async PF MSRs through `ferrite debug NAME --json`.
fn pv_msrs(run_dir: &RunDir, name: &str) -> Result<(String, String), String> {
    let (code, o, e) = run_dir.cli(&["debug", name, "--json"]);
    if code != 0 {
        return Err(format!("ferrite debug {name}: {o}{e}"));
    }
    let dump: DebugReport =
        serde_json::from_str(&o).map_err(|e| format!("ferrite debug {name} --json: {e}: {o}"))?;
    let cpu = dump.vcpus.first().ok_or("no vCPU in the dump")?;
    let get = |k: &str| {
        cpu.msrs
            .get(k)
            .cloned()
            .ok_or_else(|| format!("MSR {k} not read: {cpu:?}"))
    };
    Ok((get(MSR_KVM_SYSTEM_TIME_NEW)?, get(MSR_KVM_ASYNC_PF_EN)?))
}

fn hex(v: &str) -> u64 {
    u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or(0)
}

#[derive(Debug, Default)]
struct Outcome {
    /// Boot and setup, then one entry per cycle.
    steps: Vec<Result<String, String>>,
    msrs_booted: Option<(String, String)>,
    ctx: String,
}

fn cycles() -> &'static Outcome {
    static O: OnceLock<Outcome> = OnceLock::new();
    O.get_or_init(|| {
        let mut out = Outcome::default();
        run(&mut out);
        out
    })
}

fn run(out: &mut Outcome) {
    let run_dir = RunDir::new("cycles");
    std::fs::create_dir_all(&run_dir.0).expect("run dir");
    let disk = run_dir.0.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(8 << 20))
        .expect("disk image");
    let uds = run_dir.0.join("vsock");
    let mut cmd = run_dir.ferrite();
    cmd.args(["run", "--name", "cyc0", "--mem", "128"]);
    guest_args(&mut cmd, CMDLINE)
        .arg("--disk")
        .arg(&disk)
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()));
    let mut vm = Spawned::start(cmd, true);
    let setup = (|| -> Result<String, String> {
        let t = Instant::now();
        if !vm.wait_for_stdout("/ # ", BOOT_DEADLINE) {
            return Err(format!("no shell prompt within {BOOT_DEADLINE:?}"));
        }
        let booted = t.elapsed();
        start_vsock_echo(&mut vm, ECHO_PORT, ANSWER)?;
        vsock_echo(&uds, ECHO_PORT, b"booted", ANSWER)?;
        vm.send(
            b"n=0; while :; do dd if=/dev/urandom of=/dev/vda bs=4k count=16 \
              seek=$(((n*16)%2000)) conv=fsync 2>/dev/null; echo W$n; n=$((n+1)); done &\n",
        );
        if !wait_until(ANSWER, || writes(&vm.stdout()).last().copied() >= Some(3)) {
            return Err("the disk loop did not print W3".into());
        }
        let msrs = pv_msrs(&run_dir, "cyc0")?;
        if hex(&msrs.0) & 1 == 0 || hex(&msrs.1) & 1 == 0 {
            return Err(format!(
                "the booted guest has not enabled kvm-clock and async PF (is it booted \
                 without nopv?): {MSR_KVM_SYSTEM_TIME_NEW}={} {MSR_KVM_ASYNC_PF_EN}={}",
                msrs.0, msrs.1
            ));
        }
        out.msrs_booted = Some(msrs.clone());
        Ok(format!(
            "booted in {booted:?}; disk loop and vsock echo running; kvm-clock {} async PF {}",
            msrs.0, msrs.1
        ))
    })();
    let ok = setup.is_ok();
    out.steps.push(setup);
    let mut name = "cyc0".to_string();
    let mut prev_snap: Option<PathBuf> = None;
    if ok {
        for i in 1..=CYCLES {
            let snap = run_dir.0.join(format!("snap{i}"));
            let next = format!("cyc{i}");
            let r = cycle(&run_dir, &mut vm, &name, &next, &snap, &uds, i, out);
            let ok = r.is_ok();
            out.steps.push(r);
            if !ok {
                break;
            }
            name = next;
            // The VM restored from the one before has gone: its memory file can go.
            if let Some(p) = prev_snap.replace(snap) {
                let _ = std::fs::remove_dir_all(p);
            }
        }
    }
    let s = vm.ctx();
    let start = s.len().saturating_sub(4000);
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    out.ctx = s[start..].to_owned();
    let sock = run_dir.sock(&name);
    if sock.exists() {
        hard_stop(&sock);
    }
    let _ = vm.wait_exit(Duration::from_secs(20));
}

#[allow(clippy::too_many_arguments)]
fn cycle(
    run_dir: &RunDir,
    vm: &mut Spawned,
    name: &str,
    next: &str,
    snap: &Path,
    uds: &Path,
    i: usize,
    out: &Outcome,
) -> Result<String, String> {
    let up = uptime(vm, &format!("UPB{i}="), ANSWER)?;
    let (code, o, e) = run_dir.cli(&["pause", name]);
    if code != 0 {
        return Err(format!("cycle {i}: pause {name}: {o}{e}"));
    }
    let t = Instant::now();
    let (code, o, e) = run_dir.cli(&["snapshot", name, snap.to_str().unwrap()]);
    let snap_took = t.elapsed();
    if code != 0 {
        return Err(format!("cycle {i}: snapshot of {name}: {o}{e}"));
    }
    let _ = vm.child.kill();
    let _ = vm.wait_exit(Duration::from_secs(20));
    let last = writes(&vm.stdout()).last().copied().unwrap_or(0);
    let mut cmd = run_dir.ferrite();
    cmd.args(["--log-level", "info", "run", "--restore"])
        .arg(snap)
        .args(["--name", next]);
    let t = Instant::now();
    *vm = Spawned::start(cmd, true);
    if !wait_until(ANSWER, || {
        writes(&vm.stdout()).iter().any(|&w| w > last) || vm.exited()
    }) {
        return Err(format!(
            "cycle {i}: the disk loop did not go on past W{last} within {ANSWER:?}"
        ));
    }
    if vm.exited() {
        return Err(format!("cycle {i}: the restored VM exited"));
    }
    let resumed = t.elapsed();
    let seen = writes(&vm.stdout());
    if seen.first().is_some_and(|&w| w + 1 < last) {
        return Err(format!(
            "cycle {i}: the loop went back: W{last} before the snapshot, {seen:?} after"
        ));
    }
    vm.send(format!("echo ALIVE{i}-$((6*7))\n").as_bytes());
    if !vm.wait_for_stdout(&format!("ALIVE{i}-42"), ANSWER) {
        return Err(format!("cycle {i}: the shell did not answer"));
    }
    let up2 = uptime(vm, &format!("UPA{i}="), ANSWER)?;
    if up2 < up {
        return Err(format!(
            "cycle {i}: the guest's uptime went back: {up} s before the snapshot, {up2} s after"
        ));
    }
    vsock_echo(uds, ECHO_PORT, format!("cycle {i}").as_bytes(), ANSWER)
        .map_err(|e| format!("cycle {i}: vsock: {e}"))?;
    let msrs = pv_msrs(run_dir, next).map_err(|e| format!("cycle {i}: {e}"))?;
    if out.msrs_booted.as_ref() != Some(&msrs) {
        return Err(format!(
            "cycle {i}: the PV MSRs changed: booted {:?}, restored {msrs:?}",
            out.msrs_booted
        ));
    }
    let running = vm
        .stderr()
        .lines()
        .find(|l| l.contains("restored from"))
        .and_then(|l| l.split("running in ").nth(1))
        .unwrap_or("?")
        .to_owned();
    Ok(format!(
        "cycle {i}: snapshot {snap_took:?}, running in {running}, W{last} -> {:?} after \
         {resumed:?}, uptime {up} -> {up2}",
        seen.first()
    ))
}

fn steps() -> &'static Outcome {
    let o = cycles();
    for s in o.steps.iter().flatten() {
        eprintln!("{s}");
    }
    o
}

#[test]
fn twenty_snapshot_restore_cycles_with_a_busy_disk_and_vsock_never_hang_or_go_back_in_time() {
    if !require_kvm() {
        return;
    }
    let o = steps();
    if let Some(Err(e)) = o.steps.iter().find(|s| s.is_err()) {
        panic!("{e}\n{}", o.ctx);
    }
    assert_eq!(o.steps.len(), CYCLES + 1, "not every cycle ran\n{}", o.ctx);
}

#[test]
fn kvm_clock_and_async_pf_msrs_survive_each_restore() {
    if !require_kvm() {
        return;
    }
    let o = steps();
    let (clock, apf) = o
        .msrs_booted
        .clone()
        .unwrap_or_else(|| panic!("setup failed: {:?}\n{}", o.steps.first(), o.ctx));
    // Each cycle compared vCPU 0's MSRs with these; a cycle that failed on them says so.
    for s in &o.steps {
        if let Err(e) = s {
            assert!(!e.contains("PV MSRs"), "{e}");
        }
    }
    let compared = o.steps.iter().skip(1).filter(|s| s.is_ok()).count();
    assert!(
        compared > 0,
        "no restore got as far as the MSR check: {:?}\n{}",
        o.steps,
        o.ctx
    );
    eprintln!("kvm-clock {clock}, async PF {apf}: the same after {compared} restores");
}
