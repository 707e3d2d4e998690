//! Boot-time CPU state beyond registers: FPU/MXCSR, boot MSRs and the local APIC's
//! LINT pins (LINT0 = ExtINT for the PIC, LINT1 = NMI).

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Ioctl(#[from] super::VcpuIoctlError),
    #[error("vCPU {vcpu}: KVM set {set} of {want} boot MSRs")]
    PartialMsrs {
        vcpu: usize,
        set: usize,
        want: usize,
    },
}

/// The MSRs a 64-bit kernel expects at entry.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

fn reg(lapic: &kvm_lapic_state, off: usize) -> u32 {
    let b = |i: usize| lapic.regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_reg(lapic: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().into_iter().enumerate() {
        lapic.regs[off + i] = b as _;
    }
}

/// Replaces the delivery mode (bits 8..10) of an LVT entry.
fn with_delivery_mode(lvt: u32, mode: u32) -> u32 {
    (lvt & !0x700) | (mode << 8)
}

/// Sets FPU control word and MXCSR to their power-on defaults, the boot MSRs, and
/// (with an in-kernel irqchip) the LAPIC's LINT0/LINT1 wiring.
pub fn setup(vcpu: &VcpuFd, index: usize, lapic: bool) -> Result<(), Error> {
    let ioctl = super::vcpu_ioctl(index);
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(ioctl("set FPU state"))?;
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::PartialMsrs {
        vcpu: index,
        set: 0,
        want: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(ioctl("set boot MSRs"))?;
    if set != entries.len() {
        return Err(Error::PartialMsrs {
            vcpu: index,
            set,
            want: entries.len(),
        });
    }
    if lapic {
        let mut state = vcpu.get_lapic().map_err(ioctl("read the local APIC"))?;
        let lint0 = with_delivery_mode(reg(&state, APIC_LVT0), APIC_MODE_EXTINT);
        let lint1 = with_delivery_mode(reg(&state, APIC_LVT1), APIC_MODE_NMI);
        set_reg(&mut state, APIC_LVT0, lint0);
        set_reg(&mut state, APIC_LVT1, lint1);
        vcpu.set_lapic(&state)
            .map_err(ioctl("set the local APIC"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_delivery_mode() {
        assert_eq!(
            with_delivery_mode(0x0001_0000, APIC_MODE_EXTINT),
            0x0001_0700
        );
        assert_eq!(with_delivery_mode(0x0000_0700, APIC_MODE_NMI), 0x0000_0400);
        let mut s = kvm_lapic_state::default();
        set_reg(&mut s, APIC_LVT1, 0xdead_beef);
        assert_eq!(reg(&s, APIC_LVT1), 0xdead_beef);
    }

    #[test]
    fn msr_list_has_misc_enable_and_mtrr() {
        let m = boot_msrs();
        assert!(m
            .iter()
            .any(|e| e.index == MSR_IA32_MISC_ENABLE && e.data == 1));
        assert!(m
            .iter()
            .any(|e| e.index == MSR_MTRR_DEF_TYPE && e.data == MTRR_ENABLE_WB));
    }
}
