//! The `Vm` object driven from a program (in-process): pause, resume, register reads
//! and stop on running test guests.

mod common;

use common::*;
use ferrite::console::{ConsoleIo, InputSource};
use ferrite::outcome::VmOutcome;
use ferrite::vcpu::command::{Command, Reply};
use ferrite::vm::{Vm, VmConfig};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(10);
/// counter.elf: vCPU i increments the u64 at COUNTERS + 8 * i.
const COUNTERS: u64 = 0x20_0000;
/// counter.elf is linked at 1 MiB and is a few bytes long.
const CODE: std::ops::Range<u64> = 0x10_0000..0x10_1000;
const MSR_EFER: u32 = 0xc000_0080;

fn start(image: &str, cpus: usize, debug_exit: bool) -> (Vm, SharedBuf) {
    let mut cfg = VmConfig::new(guest(image));
    cfg.memory.size = 16 << 20;
    cfg.vcpus = cpus;
    cfg.debug_exit = debug_exit;
    let out = SharedBuf::default();
    let io = ConsoleIo {
        input: InputSource::None,
        output: Box::new(out.clone()),
    };
    let mut vm = Vm::new(&cfg, io).expect("build VM");
    vm.start().expect("start VM");
    (vm, out)
}

fn counters(vm: &Vm) -> Vec<u64> {
    (0..vm.vcpus().len() as u64)
        .map(|i| {
            vm.memory()
                .read_obj::<u64>(GuestAddress(COUNTERS + 8 * i))
                .unwrap()
        })
        .collect()
}

fn all_advanced(vm: &Vm, since: &[u64]) -> bool {
    counters(vm).iter().zip(since).all(|(now, then)| now > then)
}

/// Checks that paused vCPU `i` does not run: its exit counters and its registers are
/// the same before, between and after two register reads on its thread.
///
/// No sleep is needed for this to fail on a vCPU that keeps running: each read is a
/// command the vCPU thread answers, and a running vCPU answers it between two KVM_RUNs.
/// The request kicks it out of KVM_RUN (counted as `interrupted`) or finds it handling
/// an exit, and after answering it enters KVM_RUN again and exits again: flood.bin at
/// its next `out`, a few instructions on; counter.elf, which never exits by itself,
/// when the next read kicks it. So between the first snapshot and the last some exit
/// counter moves (checked to fail with a Pause that leaves the vCPU running), and
/// RIP moves on too, unless the vCPU is really parked.
fn assert_stays_paused(vm: &Vm, i: usize, what: &str) {
    let exits = |vm: &Vm| {
        let s = vm.vcpus()[i].stats.snapshot();
        (s.exits, s.pio, s.mmio)
    };
    let before = exits(vm);
    let a = vm
        .read_registers(i, &[], T)
        .expect("registers while paused");
    let between = exits(vm);
    let b = vm
        .read_registers(i, &[], T)
        .expect("registers while paused");
    let after = exits(vm);
    assert_eq!(
        before, between,
        "{what}: vCPU {i} exited while paused (first register read)"
    );
    assert_eq!(
        between, after,
        "{what}: vCPU {i} exited while paused (second register read)"
    );
    assert_eq!(
        a.regs, b.regs,
        "{what}: vCPU {i}'s registers changed while paused"
    );
}

#[test]
fn pause_stops_guest_progress_and_resume_restarts_it() {
    if !require_kvm() {
        return;
    }
    let (mut vm, _) = start("counter.elf", 2, false);
    assert!(
        wait_until(T, || all_advanced(&vm, &[0, 0])),
        "counters never moved: {:?}",
        counters(&vm)
    );
    vm.pause(T).expect("pause");
    let paused = counters(&vm);

    // Registers, read on the vCPU's own thread while it is paused.
    let r = vm
        .read_registers(0, &[MSR_EFER, 0xdead_beef], T)
        .expect("read registers");
    // Stays paused across the round trips to its thread (see `assert_stays_paused`).
    assert_stays_paused(&vm, 0, "counter.elf");
    assert_stays_paused(&vm, 1, "counter.elf");
    assert_eq!(counters(&vm), paused, "guest made progress while paused");
    assert!(CODE.contains(&r.regs.rip), "rip {:#x}", r.regs.rip);
    assert_eq!(r.regs.rbx, COUNTERS, "rbx points at vCPU 0's counter");
    assert_ne!(r.sregs.cr0 & 1, 0, "protected mode");
    let efer = r.msrs.iter().find(|(i, _)| *i == MSR_EFER).map(|(_, v)| *v);
    assert_eq!(
        efer.map(|v| v & 0x500),
        Some(0x500),
        "EFER.LME|LMA: {:?}",
        r.msrs
    );
    assert_eq!(r.unreadable_msrs, vec![0xdead_beef]);

    // Pause is idempotent and says so.
    match vm.vcpus()[1].request(Command::Pause, T) {
        Some(Reply::Paused { already: true }) => {}
        other => panic!("second pause: {other:?}"),
    }
    vm.resume(T).expect("resume");
    assert!(
        wait_until(T, || all_advanced(&vm, &paused)),
        "no progress after resume: {:?} vs {paused:?}",
        counters(&vm)
    );
    match vm.vcpus()[0].request(Command::Resume, T) {
        Some(Reply::Resumed { already: true }) => {}
        other => panic!("second resume: {other:?}"),
    }

    // Stop while paused ends the VM promptly.
    vm.pause(T).expect("pause again");
    let t = Instant::now();
    vm.stop(VmOutcome::Stopped);
    assert_eq!(vm.wait(), VmOutcome::Stopped);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn a_thousand_pause_resume_cycles_on_two_vcpus() {
    if !require_kvm() {
        return;
    }
    let (mut vm, _) = start("counter.elf", 2, false);
    assert!(wait_until(T, || all_advanced(&vm, &[0, 0])));
    let mut worst = Duration::ZERO;
    for i in 0..1000 {
        let t = Instant::now();
        vm.pause(T)
            .unwrap_or_else(|e| panic!("cycle {i}: pause: {e}"));
        worst = worst.max(t.elapsed());
        vm.resume(T)
            .unwrap_or_else(|e| panic!("cycle {i}: resume: {e}"));
    }
    eprintln!("worst pause over 1000 cycles: {worst:?}");
    let now = counters(&vm);
    assert!(
        wait_until(T, || all_advanced(&vm, &now)),
        "guest still runs"
    );
    vm.stop(VmOutcome::Stopped);
    assert_eq!(vm.wait(), VmOutcome::Stopped);
}

#[test]
fn pause_reaches_vcpus_that_exit_constantly_and_halted_ones() {
    if !require_kvm() {
        return;
    }
    // flood.bin: one vCPU always in or just out of a PIO exit, so commands land while
    // it handles exits or is about to enter KVM_RUN.
    let (mut vm, out) = start("flood.bin", 1, false);
    assert!(out.wait_for("flood", T));
    for i in 0..200 {
        vm.pause(T)
            .unwrap_or_else(|e| panic!("cycle {i}: pause: {e}"));
        // Output queued before the pause may still be written, so the console buffer
        // says nothing; the vCPU's own exit counters and registers do.
        assert_stays_paused(&vm, 0, &format!("flood.bin, cycle {i}"));
        vm.resume(T)
            .unwrap_or_else(|e| panic!("cycle {i}: resume: {e}"));
    }
    vm.stop(VmOutcome::Stopped);
    assert_eq!(vm.wait(), VmOutcome::Stopped);

    // kick-spin.elf without --debug-exit: vCPU 0 prints, its debug-exit write goes
    // nowhere and it halts (parked by Ferrite); vCPU 1 spins in guest code.
    let (mut vm, out) = start("kick-spin.elf", 2, false);
    assert!(out.wait_for("vCPU 0 stopping the VM", T), "{}", out.text());
    assert!(wait_until(T, || vm.vcpus()[0].stats.hlt.get() == 1));
    for _ in 0..100 {
        vm.pause(T).expect("pause with a halted vCPU");
        vm.resume(T).expect("resume with a halted vCPU");
    }
    vm.stop(VmOutcome::Stopped);
    assert_eq!(vm.wait(), VmOutcome::Stopped);
}

#[test]
fn commands_to_a_stopped_vcpu_are_answered() {
    if !require_kvm() {
        return;
    }
    let (mut vm, _) = start("counter.elf", 1, false);
    let h = vm.vcpus()[0].clone();
    match h.request(Command::Stop, T) {
        Some(Reply::Stopped) => {}
        other => panic!("stop: {other:?}"),
    }
    // The vCPU has gone: later commands get `Stopped` at once instead of hanging.
    match h.request(Command::Pause, T) {
        Some(Reply::Stopped) => {}
        other => panic!("pause after stop: {other:?}"),
    }
    vm.stop(VmOutcome::Stopped);
    assert_eq!(vm.wait(), VmOutcome::Stopped);
}

#[test]
fn replies_reach_the_event_loop_without_blocking_it() {
    if !require_kvm() {
        return;
    }
    // The shape the control channel will use: code on the loop thread sends a command;
    // the vCPU's reply is handed back to the loop as a remote call.
    let (mut vm, _) = start("counter.elf", 1, false);
    let lh = vm.event_loop().expect("running");
    let vcpu = vm.vcpus()[0].clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let back = lh.clone();
    lh.call(move |_ctx| {
        let sent_on = std::thread::current().name().map(str::to_owned);
        vcpu.send(
            Command::Pause,
            Box::new(move |index, reply| {
                let _ = back.call(move |_ctx| {
                    let on = std::thread::current().name().map(str::to_owned);
                    let _ = tx.send((sent_on, on, index, reply));
                });
            }),
        );
    })
    .unwrap();
    let (sent_on, answered_on, index, reply) = rx.recv_timeout(T).expect("reply");
    assert_eq!(sent_on.as_deref(), Some("ferrite-events"));
    assert_eq!(answered_on.as_deref(), Some("ferrite-events"));
    assert_eq!(index, 0);
    assert!(
        matches!(reply, Reply::Paused { already: false }),
        "{reply:?}"
    );
    vm.stop(VmOutcome::Stopped);
    assert_eq!(vm.wait(), VmOutcome::Stopped);
}

#[test]
fn a_panic_on_the_event_loop_ends_the_vm_with_an_error() {
    if !require_kvm() {
        return;
    }
    let (mut vm, _) = start("counter.elf", 2, false);
    vm.event_loop()
        .expect("running")
        .call(|_ctx| panic!("deliberate test panic on the loop"))
        .unwrap();
    let t = Instant::now();
    match vm.wait() {
        VmOutcome::Error(m) => assert!(m.contains("deliberate test panic"), "{m}"),
        o => panic!("unexpected outcome {o:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn graceful_stop_in_process_ends_hard_after_the_timeout() {
    if !require_kvm() {
        return;
    }
    use ferrite::graceful::Method;
    // counter.elf has no ACPI and never reads its keyboard: Ctrl-Alt-Del goes
    // unanswered and the VM is stopped once the timeout has passed, still counting.
    let (mut vm, _) = start("counter.elf", 1, false);
    assert!(wait_until(T, || all_advanced(&vm, &[0])));
    let timeout = Duration::from_millis(300);
    let t = Instant::now();
    let r = vm.stop_gracefully(timeout).expect("graceful stop");
    assert_eq!(
        (r.method, r.timeout, r.delivered),
        (Method::CtrlAltDel, timeout, true)
    );
    // Asking again before the deadline: the keyboard has no room for the keys the
    // guest never read, and the first deadline still holds.
    let again = vm.stop_gracefully(Duration::from_secs(60)).unwrap();
    assert!(!again.delivered);
    let before = counters(&vm);
    assert_eq!(vm.wait(), VmOutcome::Stopped);
    let took = t.elapsed();
    assert!(took >= timeout, "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        counters(&vm)[0] > before[0],
        "the guest ran until the hard stop"
    );
    assert!(matches!(
        vm.stop_gracefully(timeout),
        Err(ferrite::vm::Error::NotRunning)
    ));
}
