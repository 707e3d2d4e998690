//! The KVM half of snapshot/restore (issue 17) against real KVM, without the rest of
//! the snapshot machinery: a tiny real-mode guest counts in VM A; its vCPU and VM state
//! are saved (through JSON, as a snapshot file carries them), VM B gets a copy of A's
//! memory and the state, and B must carry on where A stopped.

mod common;

use common::require_kvm;
use ferrite::snapshot::kvm_vm::{self, Chips, VmState};
use ferrite::vcpu::state::{
    self as vcpu, MsrValue, SavePlan, VcpuState, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE,
    MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT, MSR_KVM_POLL_CONTROL, MSR_KVM_PV_EOI_EN,
    MSR_KVM_SYSTEM_TIME_NEW,
};
use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, kvm_pit_config, Msrs, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 1 << 20;
const CODE_AT: u64 = 0x1000;
const COUNTER_AT: u64 = 0x2000;
const PORT: u16 = 0x10;
/// 16-bit real mode at 0x1000:
///   loop: inc bx; mov [0x2000], bx; mov ax, bx; out 0x10, ax; jmp loop
const COUNTER_GUEST: &[u8] = &[
    0x43, 0x89, 0x1e, 0x00, 0x20, 0x89, 0xd8, 0xe7, 0x10, 0xeb, 0xf5,
];
/// loop: in ax, 0x11; out 0x10, ax; jmp loop
const ECHO_GUEST: &[u8] = &[0xe5, 0x11, 0xe7, 0x10, 0xeb, 0xfa];
const IN_PORT: u16 = 0x11;

struct Machine {
    vm: VmFd,
    vcpu: VcpuFd,
    mem: ferrite::memory::GuestMemory,
}

/// A VM with the in-kernel irqchip and PIT, 1 MiB of RAM and one vCPU with KVM's
/// supported CPUID (plus TSC-deadline, which KVM does not report there), in real mode
/// at the counter guest. `image`: RAM contents to start from (another VM's copy).
fn machine(kvm: &Kvm, image: Option<&[u8]>) -> Machine {
    machine_with(kvm, image, COUNTER_GUEST)
}

/// [`machine`] with `code` at 0x1000 when starting fresh.
fn machine_with(kvm: &Kvm, image: Option<&[u8]>, code: &[u8]) -> Machine {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let mem = ferrite::memory::create(MEM).expect("guest memory");
    ferrite::memory::register(&vm, &mem).expect("register memory");
    vm.set_tss_address(0xfffb_d000).expect("TSS");
    vm.create_irq_chip().expect("irqchip");
    vm.create_pit2(kvm_pit_config::default()).expect("PIT");
    match image {
        Some(bytes) => mem.write_slice(bytes, GuestAddress(0)).unwrap(),
        None => mem.write_slice(code, GuestAddress(CODE_AT)).unwrap(),
    }
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .expect("supported CPUID");
    for e in cpuid.as_mut_slice() {
        if e.function == 1 && kvm.check_extension(Cap::TscDeadlineTimer) {
            e.ecx |= 1 << 24;
        }
    }
    vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = CODE_AT;
    regs.rflags = 2;
    regs.rbx = 0;
    vcpu.set_regs(&regs).unwrap();
    Machine { vm, vcpu, mem }
}

/// Runs until the guest's next `out` to the counter port; returns the value.
fn next_out(vcpu: &mut VcpuFd) -> u16 {
    for _ in 0..1000 {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(PORT, data) => {
                return u16::from_le_bytes([data[0], data.get(1).copied().unwrap_or(0)])
            }
            VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
    panic!("no output in 1000 exits");
}

/// What the vCPU thread does before a save: KVM_RUN with immediate_exit, so KVM
/// completes the `out` it exited for (RIP moves past it).
fn complete_pending_io(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|_| ()).map_err(|e| e.errno());
    vcpu.set_kvm_immediate_exit(0);
    assert_eq!(r, Err(libc::EINTR), "KVM_RUN with immediate_exit");
}

fn set_msr(vcpu: &VcpuFd, index: u32, data: u64) {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(
        vcpu.set_msrs(&msrs).unwrap(),
        1,
        "KVM refused MSR {index:#x}"
    );
}

fn get_msr(vcpu: &VcpuFd, index: u32) -> u64 {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1, "MSR {index:#x}");
    msrs.as_slice()[0].data
}

/// Saves A (vCPU and VM) through JSON, as a snapshot file would carry it.
fn save(kvm: &Kvm, a: &mut Machine) -> (VcpuState, VmState) {
    complete_pending_io(&mut a.vcpu);
    let plan = SavePlan::probe(kvm, &a.vm, true).expect("save plan");
    let vs = vcpu::save(&a.vcpu, 0, &plan).expect("vCPU save");
    let ms = kvm_vm::save(
        &a.vm,
        Chips {
            irqchip: true,
            pit: true,
        },
    )
    .expect("VM save");
    let vs: VcpuState = serde_json::from_str(&serde_json::to_string(&vs).unwrap()).unwrap();
    let ms: VmState = serde_json::from_str(&serde_json::to_string(&ms).unwrap()).unwrap();
    (vs, ms)
}

/// VM B: A's memory, then the saved state.
fn restore(kvm: &Kvm, a: &Machine, vs: &VcpuState, ms: &VmState) -> Machine {
    let mut image = vec![0u8; MEM as usize];
    a.mem.read_slice(&mut image, GuestAddress(0)).unwrap();
    let b = machine(kvm, Some(&image));
    kvm_vm::restore(&b.vm, ms).expect("VM restore");
    vcpu::restore(&b.vcpu, 0, vs).expect("vCPU restore");
    b
}

fn kvm() -> Option<Kvm> {
    if !require_kvm() {
        return None;
    }
    Some(Kvm::new().expect("/dev/kvm"))
}

fn ioapic(vm: &VmFd) -> kvm_irqchip {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).expect("KVM_GET_IRQCHIP");
    chip
}

fn redirection(chip: &kvm_irqchip, pin: usize) -> u64 {
    // SAFETY: the chip was read with chip_id KVM_IRQCHIP_IOAPIC, so `ioapic` is the
    // member KVM filled; every bit pattern is a valid u64.
    unsafe { chip.chip.ioapic.redirtbl[pin].bits }
}

/// Issue 17: a restored VM must continue, not restart; and a state saved right after
/// an `out` exit must not repeat that `out` (the I/O is completed before the save).
#[test]
fn restored_guest_continues_counting_from_where_it_was_saved() {
    let Some(kvm) = kvm() else { return };
    let mut a = machine(&kvm, None);
    let seen: Vec<u16> = (0..5).map(|_| next_out(&mut a.vcpu)).collect();
    assert_eq!(seen, [1, 2, 3, 4, 5]);
    let (vs, ms) = save(&kvm, &mut a);
    assert_eq!(vs.regs.rbx & 0xffff, 5);
    assert_eq!(a.mem.read_obj::<u16>(GuestAddress(COUNTER_AT)).unwrap(), 5);
    let mut b = restore(&kvm, &a, &vs, &ms);
    let after: Vec<u16> = (0..3).map(|_| next_out(&mut b.vcpu)).collect();
    assert_eq!(after, [6, 7, 8], "B must continue after A's 5");
    assert_eq!(b.mem.read_obj::<u16>(GuestAddress(COUNTER_AT)).unwrap(), 8);
    // A is untouched by B (separate memory) and continues on its own.
    assert_eq!(next_out(&mut a.vcpu), 6);
}

/// A vCPU stopped in an `in` exit has not stored the value yet: KVM does that when
/// KVM_RUN is entered again. The save must complete it first, or the restored guest
/// loses (or re-reads) the value.
#[test]
fn state_saved_in_an_in_exit_keeps_the_value_read() {
    let Some(kvm) = kvm() else { return };
    let mut a = machine_with(&kvm, None, ECHO_GUEST);
    match a.vcpu.run().expect("KVM_RUN") {
        VcpuExit::IoIn(IN_PORT, data) => data.copy_from_slice(&0x1234u16.to_le_bytes()),
        other => panic!("expected the guest's in, got {other:?}"),
    }
    let (vs, ms) = save(&kvm, &mut a);
    assert_eq!(
        vs.regs.rax & 0xffff,
        0x1234,
        "the in completed before the save"
    );
    let mut image = vec![0u8; MEM as usize];
    a.mem.read_slice(&mut image, GuestAddress(0)).unwrap();
    let mut b = machine_with(&kvm, Some(&image), ECHO_GUEST);
    kvm_vm::restore(&b.vm, &ms).unwrap();
    vcpu::restore(&b.vcpu, 0, &vs).unwrap();
    match b.vcpu.run().expect("KVM_RUN on B") {
        VcpuExit::IoOut(PORT, data) => assert_eq!(data, &0x1234u16.to_le_bytes()),
        other => panic!("B must echo the value A read, got {other:?}"),
    }
}

/// Issue 17: the async page fault MSRs were not saved (Firecracker's bug); every KVM
/// paravirtual MSR the guest wrote must come back.
#[test]
fn kvm_paravirtual_msrs_survive_restore() {
    let Some(kvm) = kvm() else { return };
    let mut a = machine(&kvm, None);
    next_out(&mut a.vcpu);
    let values = [
        (MSR_KVM_ASYNC_PF_INT, 0xec),
        // Enabled, delivered as an interrupt, data at 0x3000.
        (MSR_KVM_ASYNC_PF_EN, 0x3000 | 1 | 1 << 3),
        (MSR_KVM_SYSTEM_TIME_NEW, 0x4000 | 1),
        (MSR_KVM_PV_EOI_EN, 0x5000 | 1),
        (MSR_KVM_POLL_CONTROL, 0),
    ];
    for (index, value) in values {
        set_msr(&a.vcpu, index, value);
    }
    let (vs, ms) = save(&kvm, &mut a);
    for (index, value) in values {
        assert_eq!(vs.msr(index), Some(value), "saved MSR {index:#x}");
    }
    let b = restore(&kvm, &a, &vs, &ms);
    for (index, value) in values {
        assert_eq!(get_msr(&b.vcpu, index), value, "MSR {index:#x} on B");
    }
    // A fresh VM has them off: B's values come from the restore.
    let fresh = machine(&kvm, None);
    assert_eq!(get_msr(&fresh.vcpu, MSR_KVM_ASYNC_PF_EN), 0);
    assert_eq!(get_msr(&fresh.vcpu, MSR_KVM_POLL_CONTROL), 1);
}

/// KVM ignores a TSC-deadline write unless the LAPIC timer is in TSC-deadline mode:
/// the deadline must be restored after the LAPIC (and after the TSC).
#[test]
fn tsc_deadline_survives_restore_after_lapic_and_tsc() {
    let Some(kvm) = kvm() else { return };
    if !kvm.check_extension(Cap::TscDeadlineTimer) {
        common::record_not_run("host KVM has no TSC-deadline timer");
        return;
    }
    let mut a = machine(&kvm, None);
    next_out(&mut a.vcpu);
    let mut lapic = a.vcpu.get_lapic().unwrap();
    let put = |regs: &mut [i8; 1024], off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as i8;
        }
    };
    // Software-enabled (spurious vector 0xff), LVT timer: TSC-deadline mode, vector 0xec.
    put(&mut lapic.regs, 0xf0, 0x1ff);
    put(&mut lapic.regs, 0x320, 2 << 17 | 0xec);
    a.vcpu.set_lapic(&lapic).unwrap();
    let deadline = get_msr(&a.vcpu, MSR_IA32_TSC) + (1 << 40);
    set_msr(&a.vcpu, MSR_IA32_TSC_DEADLINE, deadline);
    assert_eq!(get_msr(&a.vcpu, MSR_IA32_TSC_DEADLINE), deadline);
    let (vs, ms) = save(&kvm, &mut a);
    assert_eq!(vs.msrs.last().map(|m| m.index), Some(MSR_IA32_TSC_DEADLINE));
    let saved_tsc = vs.msr(MSR_IA32_TSC).expect("TSC saved");
    let b = restore(&kvm, &a, &vs, &ms);
    assert_eq!(get_msr(&b.vcpu, MSR_IA32_TSC_DEADLINE), deadline);
    // B's TSC continues from A's, not from 0.
    assert!(get_msr(&b.vcpu, MSR_IA32_TSC) >= saved_tsc);
    assert_eq!(
        b.vcpu.get_lapic().unwrap().regs[0x320..0x324],
        lapic.regs[0x320..0x324]
    );
}

/// The in-kernel IOAPIC, PICs and PIT come back.
#[test]
fn ioapic_redirection_entry_survives_restore() {
    let Some(kvm) = kvm() else { return };
    let mut a = machine(&kvm, None);
    next_out(&mut a.vcpu);
    let mut chip = ioapic(&a.vm);
    let entry: u64 = 0x0300_0000_0000_0031; // vector 0x31, destination 3
    let mut state = kvm_bindings::kvm_ioapic_state::default();
    // SAFETY: read as in `redirection`: the IOAPIC member KVM filled, plain data.
    unsafe { state.clone_from(&chip.chip.ioapic) };
    state.redirtbl[5] = kvm_bindings::kvm_ioapic_state__bindgen_ty_1 { bits: entry };
    chip.chip.ioapic = state;
    a.vm.set_irqchip(&chip).unwrap();
    let (vs, ms) = save(&kvm, &mut a);
    assert!(ms.pit.is_some() && ms.irqchip.is_some());
    let b = restore(&kvm, &a, &vs, &ms);
    assert_eq!(redirection(&ioapic(&b.vm), 5), entry);
    assert_ne!(
        redirection(&ioapic(&machine(&kvm, None).vm), 5),
        entry,
        "a fresh IOAPIC differs"
    );
}

/// KVM_CLOCK_REALTIME passed back to KVM_SET_CLOCK advances the clock by the wall
/// time since the save: the guest's monotonic clock would jump by the time the
/// snapshot sat on disk. Restore must ignore it.
#[test]
fn kvm_clock_continues_without_jumping_by_saved_wall_time() {
    let Some(kvm) = kvm() else { return };
    let mut a = machine(&kvm, None);
    next_out(&mut a.vcpu);
    let (vs, mut ms) = save(&kvm, &mut a);
    // As if saved an hour ago with the wall time attached.
    ms.clock.flags |= KVM_CLOCK_REALTIME;
    ms.clock.realtime = ms.clock.realtime.saturating_sub(3600 * 1_000_000_000);
    let b = restore(&kvm, &a, &vs, &ms);
    let now = b.vm.get_clock().unwrap().clock;
    assert!(now >= ms.clock.clock, "clock went back");
    assert!(
        now - ms.clock.clock < 60 * 1_000_000_000,
        "clock jumped by {} s",
        (now - ms.clock.clock) / 1_000_000_000
    );
}

/// A restore onto a host (or CPU model) that refuses a saved MSR value says which
/// MSR, instead of an opaque KVM_SET_MSRS count.
#[test]
fn restore_names_the_msr_kvm_refuses() {
    let Some(kvm) = kvm() else { return };
    let mut a = machine(&kvm, None);
    next_out(&mut a.vcpu);
    let (mut vs, ms) = save(&kvm, &mut a);
    let bad = MsrValue {
        index: MSR_KVM_ASYNC_PF_EN,
        // Reserved bits 4-5 set: KVM refuses the value.
        value: 0x3000 | 0x31,
    };
    match vs.msrs.iter_mut().find(|m| m.index == bad.index) {
        Some(m) => *m = bad,
        None => panic!("async PF MSR not saved"),
    }
    let mut image = vec![0u8; MEM as usize];
    a.mem.read_slice(&mut image, GuestAddress(0)).unwrap();
    let b = machine(&kvm, Some(&image));
    kvm_vm::restore(&b.vm, &ms).unwrap();
    let err = vcpu::restore(&b.vcpu, 0, &vs).expect_err("KVM must refuse the MSR");
    assert!(
        matches!(
            err,
            vcpu::Error::MsrRefused {
                vcpu: 0,
                index: MSR_KVM_ASYNC_PF_EN,
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("0x4b564d02") && msg.contains("vCPU 0"),
        "{msg}"
    );
}

/// A snapshot taken at another TSC rate: scaled where the host can, else a clear
/// error naming both rates.
#[test]
fn tsc_rate_is_restored_or_refused_clearly() {
    let Some(kvm) = kvm() else { return };
    let mut a = machine(&kvm, None);
    next_out(&mut a.vcpu);
    let (mut vs, ms) = save(&kvm, &mut a);
    let host = vs.tsc_khz.expect("TSC rate saved");
    let wanted = host / 2;
    vs.tsc_khz = Some(wanted);
    let mut image = vec![0u8; MEM as usize];
    a.mem.read_slice(&mut image, GuestAddress(0)).unwrap();
    let b = machine(&kvm, Some(&image));
    kvm_vm::restore(&b.vm, &ms).unwrap();
    match vcpu::restore(&b.vcpu, 0, &vs) {
        Ok(()) => {
            assert!(kvm.check_extension(Cap::TscControl));
            assert_eq!(b.vcpu.get_tsc_khz().unwrap(), wanted);
        }
        Err(e) => {
            assert!(
                matches!(e, vcpu::Error::TscKhz { saved_khz, host_khz, .. }
                    if saved_khz == wanted && host_khz == host),
                "{e:?}"
            );
            let msg = e.to_string();
            assert!(msg.contains(&wanted.to_string()) && msg.contains(&host.to_string()));
        }
    }
}

/// Two vCPUs: the boot vCPU counting, the second one held in INIT (waiting for a
/// SIPI) with registers of its own. Each comes back in its own state (a fresh second
/// vCPU would be UNINITIALIZED), and their TSCs stay together.
#[test]
fn two_vcpus_restore_each_in_its_own_state() {
    let Some(kvm) = kvm() else { return };
    let mut a = machine(&kvm, None);
    let cpuid = a.vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
    let ap_a = a.vm.create_vcpu(1).expect("second vCPU");
    ap_a.set_cpuid2(&cpuid).unwrap();
    let mut regs = ap_a.get_regs().unwrap();
    regs.rbx = 0x77;
    ap_a.set_regs(&regs).unwrap();
    ap_a.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_INIT_RECEIVED,
    })
    .unwrap();
    for _ in 0..3 {
        next_out(&mut a.vcpu);
    }
    let (vs0, ms) = save(&kvm, &mut a);
    let plan = SavePlan::probe(&kvm, &a.vm, true).unwrap();
    let vs1 = vcpu::save(&ap_a, 1, &plan).unwrap();
    assert_eq!(
        vs1.mp_state.mp_state,
        kvm_bindings::KVM_MP_STATE_INIT_RECEIVED
    );
    let mut b = restore(&kvm, &a, &vs0, &ms);
    let ap_b = b.vm.create_vcpu(1).unwrap();
    ap_b.set_cpuid2(&cpuid).unwrap();
    assert_eq!(
        ap_b.get_mp_state().unwrap().mp_state,
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
        "a fresh second vCPU"
    );
    vcpu::restore(&ap_b, 1, &vs1).unwrap();
    assert_eq!(
        ap_b.get_mp_state().unwrap().mp_state,
        kvm_bindings::KVM_MP_STATE_INIT_RECEIVED
    );
    assert_eq!(ap_b.get_regs().unwrap().rbx, 0x77);
    let (t0, t1) = (get_msr(&b.vcpu, MSR_IA32_TSC), get_msr(&ap_b, MSR_IA32_TSC));
    let khz = u64::from(vs0.tsc_khz.unwrap_or(1_000_000));
    assert!(
        t0.abs_diff(t1) < khz * 1000,
        "TSCs {t0} and {t1} more than 1 s apart"
    );
    assert_eq!(next_out(&mut b.vcpu), 4);
}

/// `--restore-clock realtime`: the restored KVM clock is ahead of the saved one by the
/// wall time the snapshot waited (2 s here), not by zero as with `continue`.
#[test]
fn kvm_clock_with_realtime_mode_is_ahead_by_the_time_the_snapshot_waited() {
    let Some(kvm) = kvm() else { return };
    let mut a = machine(&kvm, None);
    next_out(&mut a.vcpu);
    let (vs, ms) = save(&kvm, &mut a);
    assert!(kvm_vm::has_realtime(&ms), "save records the host wall time");
    let waited = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut image = vec![0u8; MEM as usize];
    a.mem.read_slice(&mut image, GuestAddress(0)).unwrap();
    let b = machine(&kvm, Some(&image));
    kvm_vm::restore_with(&b.vm, &ms, kvm_vm::ClockMode::Realtime).expect("VM restore");
    vcpu::restore(&b.vcpu, 0, &vs).expect("vCPU restore");
    let ahead =
        b.vm.get_clock()
            .unwrap()
            .clock
            .saturating_sub(ms.clock.clock);
    let waited = waited.elapsed().as_nanos() as u64;
    // At least the 2 s waited (less 100 ms for the saved wall time being read just
    // after the clock), at most what passed since the save plus slack.
    assert!(
        ahead >= 1_900_000_000 && ahead <= waited + 1_000_000_000,
        "clock ahead by {ahead} ns after {waited} ns"
    );
    // `continue` on the same state: no jump.
    let c = machine(&kvm, Some(&image));
    kvm_vm::restore_with(&c.vm, &ms, kvm_vm::ClockMode::Continue).expect("VM restore");
    let ahead =
        c.vm.get_clock()
            .unwrap()
            .clock
            .saturating_sub(ms.clock.clock);
    assert!(ahead < 1_000_000_000, "continue jumped by {ahead} ns");
}

/// mov eax, 1; cpuid; mov eax, ecx; shr eax, 16; out 0x10, ax; jmp $
const CPUID_GUEST: &[u8] = &[
    0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0xa2, 0x66, 0x89, 0xc8, 0x66, 0xc1, 0xe8, 0x10, 0xe7,
    0x10, 0xeb, 0xfe,
];

/// The restored vCPU is given the CPUID saved with it, not one recomputed from the
/// host: a feature bit cleared in the saved CPUID (x2APIC, leaf 1 ECX bit 21) is clear
/// for the guest's CPUID instruction after restore.
#[test]
fn restored_vcpu_sees_the_saved_cpuid_not_the_hosts() {
    let Some(kvm) = kvm() else { return };
    let mut a = machine_with(&kvm, None, CPUID_GUEST);
    let (mut vs, ms) = save(&kvm, &mut a);
    assert!(!vs.cpuid.is_empty(), "CPUID saved");
    let leaf1 = vs
        .cpuid
        .iter_mut()
        .find(|e| e.function == 1)
        .expect("leaf 1 saved");
    assert_ne!(leaf1.ecx & (1 << 21), 0, "the host offers x2APIC");
    leaf1.ecx &= !(1 << 21);
    let mut image = vec![0u8; MEM as usize];
    a.mem.read_slice(&mut image, GuestAddress(0)).unwrap();
    let mut b = machine(&kvm, Some(&image));
    kvm_vm::restore(&b.vm, &ms).expect("VM restore");
    vcpu::restore(&b.vcpu, 0, &vs).expect("vCPU restore");
    let ecx_high = next_out(&mut b.vcpu);
    assert_eq!(
        ecx_high & (1 << 5),
        0,
        "the guest saw x2APIC: CPUID recomputed from the host (ECX >> 16 = {ecx_high:#x})"
    );
    // Without the saved CPUID set, the same guest sees it (the test can tell).
    let mut c = machine_with(&kvm, None, CPUID_GUEST);
    assert_ne!(next_out(&mut c.vcpu) & (1 << 5), 0);
}
