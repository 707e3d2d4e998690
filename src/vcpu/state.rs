//! One vCPU's KVM state for a snapshot: saved on the vCPU's own thread while it is
//! paused ([`save`]), written back on the main thread before the vCPU thread starts
//! ([`restore`]).
//!
//! What is saved: general registers, segment/control registers, FPU, the XSAVE area and
//! XCRs (where the host has KVM_CAP_XSAVE / KVM_CAP_XCRS), debug registers, the local
//! APIC (with the in-kernel irqchip), MP state, pending events, the TSC frequency and
//! every MSR the guest can have written: KVM's MSR index list filtered by the vCPU's
//! CPUID ([`msrs_to_save`]), always with KVM's paravirtual MSRs (async page faults,
//! kvm-clock, steal time, PV EOI, poll control); and the CPUID the guest was given
//! (`Vcpu::save_state` puts in the entries Ferrite set, which KVM_GET_CPUID2 need not
//! return).
//!
//! Restore order (each step needs the ones before it):
//! 0. the saved CPUID (KVM_SET_CPUID2, replacing the one computed from the host when
//!    the vCPU was built): the guest keeps the CPU it booted on, and which MSRs KVM
//!    accepts follows it;
//! 1. TSC frequency (KVM_SET_TSC_KHZ, only when it differs): the TSC MSR written later
//!    is scaled by it;
//! 2. sregs (CR0/CR4/EFER, the APIC base) before regs: the mode the registers live in;
//! 3. regs, FPU, XSAVE (which supersedes the FPU image), XCRs, debug registers;
//! 4. LAPIC, after sregs (which enabled it through the APIC base) and before the MSRs:
//!    KVM ignores a TSC-deadline write unless the LAPIC timer is in TSC-deadline mode;
//! 5. MSRs, IA32_TSC among them, then IA32_TSC_DEADLINE on its own: KVM arms the
//!    deadline timer against the TSC, so the TSC must already be the guest's;
//! 6. vCPU events (pending exception/interrupt/NMI), after the LAPIC they refer to;
//! 7. MP state last (it may make the vCPU runnable);
//! 8. KVM_KVMCLOCK_CTRL: tells the guest's kvm-clock its vCPU was stopped, so its
//!    soft-lockup watchdog ignores the gap (EINVAL: the guest has no kvm-clock).
//!
//! Before [`save`] the caller must let KVM complete an I/O exit the vCPU was stopped in
//! (KVM_RUN with `immediate_exit` set; see `Vcpu::save_state`), or the saved RIP would
//! still point at the `out`/`in` instruction and the guest would repeat it.
#![allow(unsafe_code)]

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// IA32_TIME_STAMP_COUNTER.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE: restored after the TSC and the LAPIC.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// KVM's paravirtual MSRs (`MSR_KVM_*` in the kernel's uapi kvm_para.h).
pub const KVM_PV_MSRS: std::ops::RangeInclusive<u32> = 0x4b56_4d00..=0x4b56_4dff;
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
pub const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
pub const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
pub const MSR_KVM_PV_EOI_EN: u32 = 0x4b56_4d04;
pub const MSR_KVM_POLL_CONTROL: u32 = 0x4b56_4d05;
pub const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;
pub const MSR_KVM_ASYNC_PF_ACK: u32 = 0x4b56_4d07;
/// The first kvm-clock MSRs (before the `_NEW` pair), still accepted by KVM.
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;

/// KVM_GET/SET_MSRS take at most 255 entries per call.
const MSR_CHUNK: usize = 128;
/// LAPIC register offsets in `kvm_lapic_state.regs`.
const APIC_LVTT: usize = 0x320;

/// Saving or restoring one vCPU failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vCPU {vcpu}: {ioctl} failed")]
    Ioctl {
        vcpu: usize,
        ioctl: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("reading KVM's MSR index list (KVM_GET_MSR_INDEX_LIST) failed")]
    MsrIndexList(#[source] kvm_ioctls::Error),
    #[error("vCPU {vcpu}: KVM on this host refuses MSR {index:#x} (value {value:#x}) in KVM_SET_MSRS; the snapshot was taken on a host or CPU model that has it")]
    MsrRefused { vcpu: usize, index: u32, value: u64 },
    #[error("vCPU {vcpu}: building the KVM_{op}_MSRS request for {count} MSRs failed")]
    MsrBuffer {
        vcpu: usize,
        op: &'static str,
        count: usize,
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    #[error("vCPU {vcpu}: the snapshot's TSC runs at {saved_khz} kHz, this vCPU's at {host_khz} kHz, and KVM_SET_TSC_KHZ refused the change (the host cannot scale the TSC to a lower rate: KVM_CAP_TSC_CONTROL)")]
    TscKhz {
        vcpu: usize,
        saved_khz: u32,
        host_khz: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: the snapshot has {what} state but this host's KVM lacks {cap}")]
    HostLacks {
        vcpu: usize,
        what: &'static str,
        cap: &'static str,
    },
    #[error(
        "vCPU {vcpu}: the saved XSAVE area has {words} 32-bit words, KVM_SET_XSAVE takes {max}"
    )]
    XsaveSize {
        vcpu: usize,
        words: usize,
        max: usize,
    },
}

/// What to save of each vCPU on this host: found once per VM, before the guest runs
/// (KVM_GET_MSR_INDEX_LIST is a /dev/kvm ioctl), and handed to each vCPU with
/// `Command::SaveState`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavePlan {
    /// KVM's MSR index list (saved and emulated MSRs KVM can get and set), in KVM's
    /// order; [`save`] filters it by each vCPU's CPUID ([`msrs_to_save`]).
    pub kvm_msrs: Vec<u32>,
    /// KVM_CAP_XSAVE: the vCPU's XSAVE area can be read.
    pub xsave: bool,
    /// KVM_CAP_XCRS: the extended control registers (XCR0) can be read.
    pub xcrs: bool,
    /// KVM_CAP_GET_TSC_KHZ: the vCPU's TSC frequency can be read.
    pub tsc_khz: bool,
    /// The VM has the in-kernel irqchip, so each vCPU has a KVM local APIC.
    pub lapic: bool,
}

impl SavePlan {
    /// Asks KVM what it can save on this host. `irqchip`: the VM has KVM's in-kernel
    /// irqchip (a LAPIC per vCPU).
    pub fn probe(kvm: &Kvm, vm: &VmFd, irqchip: bool) -> Result<Self, Error> {
        let list = kvm.get_msr_index_list().map_err(Error::MsrIndexList)?;
        Ok(Self {
            kvm_msrs: list.as_slice().to_vec(),
            xsave: vm.check_extension(Cap::Xsave),
            xcrs: vm.check_extension(Cap::Xcrs),
            tsc_khz: vm.check_extension(Cap::GetTscKhz),
            lapic: irqchip,
        })
    }
}

/// One saved MSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub value: u64,
}

/// The legacy FPU image (KVM_GET_FPU); kvm-bindings has no serde for `kvm_fpu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&Fpu> for kvm_fpu {
    fn from(f: &Fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The XSAVE area as KVM_GET_XSAVE returns it (4096 bytes as 32-bit words);
/// `kvm_xsave` itself is neither `Clone` nor compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xsave {
    pub region: Vec<u32>,
}

/// One vCPU's KVM state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: Fpu,
    /// `None` where the host has no KVM_CAP_XSAVE.
    pub xsave: Option<Xsave>,
    /// `None` where the host has no KVM_CAP_XCRS.
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: kvm_debugregs,
    /// `None` without the in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// In restore order: IA32_TSC_DEADLINE (if saved) is last.
    pub msrs: Vec<MsrValue>,
    /// KVM_GET_TSC_KHZ; `None` where the host cannot say.
    pub tsc_khz: Option<u32>,
    /// The CPUID the guest was shown (KVM_GET_CPUID2): set again on restore, so the
    /// guest keeps seeing the same CPU, and checked against the restoring host
    /// (the snapshot module's `cpu` check). Empty in snapshots from before it was saved.
    #[serde(default)]
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

impl VcpuState {
    /// The saved value of MSR `index`, if it was saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.value)
    }
}

/// A view of a vCPU's CPUID for the MSR filter.
struct Cpuid<'a>(&'a [kvm_cpuid_entry2]);

#[derive(Clone, Copy)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Cpuid<'_> {
    fn entry(&self, leaf: u32, sub: u32) -> Option<&kvm_cpuid_entry2> {
        self.0.iter().find(|e| {
            e.function == leaf
                && (e.index == sub || e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
        })
    }

    fn reg(&self, leaf: u32, sub: u32, reg: Reg) -> u32 {
        self.entry(leaf, sub).map_or(0, |e| match reg {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        })
    }

    fn bit(&self, leaf: u32, sub: u32, reg: Reg, bit: u32) -> bool {
        self.reg(leaf, sub, reg) & (1 << bit) != 0
    }

    fn vendor_is(&self, sig: &[u8; 12]) -> bool {
        let Some(e) = self.entry(0, 0) else {
            return false;
        };
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&e.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&e.edx.to_le_bytes());
        v[8..].copy_from_slice(&e.ecx.to_le_bytes());
        &v == sig
    }

    fn amd(&self) -> bool {
        self.vendor_is(b"AuthenticAMD") || self.vendor_is(b"HygonGenuine")
    }

    /// Hyper-V's interface is offered (leaf 0x40000001 EAX "Hv#1").
    fn hyperv(&self) -> bool {
        self.reg(0x4000_0001, 0, Reg::Eax) == u32::from_le_bytes(*b"Hv#1")
    }

    /// Intel architectural PMU: (version, general counters, fixed counters).
    fn intel_pmu(&self) -> (u32, u32, u32) {
        let eax = self.reg(0xa, 0, Reg::Eax);
        let edx = self.reg(0xa, 0, Reg::Edx);
        (eax & 0xff, (eax >> 8) & 0xff, edx & 0x1f)
    }
}

/// Whether a guest with this CPUID can have written MSR `index` (so it must be saved).
/// MSRs no rule names (the SYSCALL/SYSENTER MSRs, PAT, MISC_ENABLE, ...) every x86-64
/// guest has.
fn guest_can_write(index: u32, c: &Cpuid) -> bool {
    let in_count = |base: u32, n: u32| index >= base && index < base + n;
    match index {
        // KVM's paravirtual MSRs and the first kvm-clock pair: always (whatever KVM
        // lists; a guest may use them whether or not CPUID advertises them unless KVM
        // enforces the PV CPUID, and then KVM refuses nothing it lists on save).
        i if KVM_PV_MSRS.contains(&i) => true,
        MSR_KVM_WALL_CLOCK | MSR_KVM_SYSTEM_TIME => true,
        // x2APIC registers: part of the LAPIC state.
        0x800..=0x8ff => false,
        // Hyper-V synthetic MSRs: only when the Hyper-V interface is offered.
        0x4000_0000..=0x4000_10ff => c.hyperv(),
        MSR_IA32_TSC_DEADLINE => c.bit(1, 0, Reg::Ecx, 24),
        // IA32_TSC_ADJUST.
        0x3b => c.bit(7, 0, Reg::Ebx, 1),
        // IA32_SPEC_CTRL: IBRS/STIBP/SSBD (Intel leaf 7 or AMD leaf 0x80000008).
        0x48 => {
            c.bit(7, 0, Reg::Edx, 26)
                || c.bit(7, 0, Reg::Edx, 27)
                || c.bit(7, 0, Reg::Edx, 31)
                || c.bit(0x8000_0008, 0, Reg::Ebx, 14)
                || c.bit(0x8000_0008, 0, Reg::Ebx, 15)
                || c.bit(0x8000_0008, 0, Reg::Ebx, 24)
        }
        // IA32_ARCH_CAPABILITIES, IA32_TSX_CTRL (enumerated by it).
        0x10a | 0x122 => c.bit(7, 0, Reg::Edx, 29),
        // IA32_UMWAIT_CONTROL: WAITPKG.
        0xe1 => c.bit(7, 0, Reg::Ecx, 5),
        // SGX launch-enclave key hash: SGX_LC.
        0x8c..=0x8f => c.bit(7, 0, Reg::Ecx, 30),
        // IA32_MCG_* and the machine-check banks: MCE / MCA.
        0x179..=0x17b | 0x400..=0x47f | 0x4d0 => {
            c.bit(1, 0, Reg::Edx, 7) || c.bit(1, 0, Reg::Edx, 14)
        }
        // IA32_XFD, IA32_XFD_ERR: XFD.
        0x1c4 | 0x1c5 => c.bit(0xd, 1, Reg::Eax, 4),
        // FRED.
        0x1cc..=0x1d4 => c.bit(7, 1, Reg::Eax, 17),
        // IA32_PERF_CAPABILITIES: PDCM.
        0x345 => c.bit(1, 0, Reg::Ecx, 15),
        // VMX capability MSRs: VMX.
        0x480..=0x492 => c.bit(1, 0, Reg::Ecx, 5),
        // Intel PT (RTIT).
        0x560..=0x58f => c.bit(7, 0, Reg::Ebx, 25),
        // CET: SHSTK or IBT.
        0x6a0..=0x6a8 => c.bit(7, 0, Reg::Ecx, 7) || c.bit(7, 0, Reg::Edx, 20),
        // IA32_PKRS: PKS.
        0x6e1 => c.bit(7, 0, Reg::Ecx, 31),
        // IA32_BNDCFGS: MPX.
        0xd90 => c.bit(7, 0, Reg::Ebx, 14),
        // IA32_XSS: XSAVES.
        0xda0 => c.bit(0xd, 1, Reg::Eax, 3),
        // Intel PMU: general counters, event selects, full-width counters, fixed
        // counters, as many as CPUID leaf 0xA offers; the global controls from v2.
        0xc1..=0xc8 => in_count(0xc1, c.intel_pmu().1),
        0x186..=0x18f => in_count(0x186, c.intel_pmu().1),
        0x4c1..=0x4c8 => in_count(0x4c1, c.intel_pmu().1),
        0x309..=0x30f => in_count(0x309, c.intel_pmu().2),
        0x38d..=0x390 => c.intel_pmu().0 >= 2,
        // TSC_AUX: RDTSCP or RDPID.
        0xc000_0103 => c.bit(0x8000_0001, 0, Reg::Edx, 27) || c.bit(7, 0, Reg::Ecx, 22),
        // AMD TSC ratio, VM_HSAVE_PA: SVM.
        0xc000_0104 | 0xc001_0117 => c.bit(0x8000_0001, 0, Reg::Ecx, 2),
        // AMD PerfMonV2 global controls.
        0xc000_0300..=0xc000_0303 => c.amd() && c.bit(0x8000_0022, 0, Reg::Eax, 0),
        // AMD legacy performance counters.
        0xc001_0000..=0xc001_0007 => c.amd(),
        // AMD core performance counter extensions.
        0xc001_0200..=0xc001_020b => c.amd() && c.bit(0x8000_0001, 0, Reg::Ecx, 23),
        // AMD VIRT_SPEC_CTRL: VIRT_SSBD.
        0xc001_011f => c.bit(0x8000_0008, 0, Reg::Ebx, 25),
        _ => true,
    }
}

/// The MSRs to save for a vCPU with CPUID `cpuid`, from KVM's index list `kvm_list`:
/// those the guest can have written, in KVM's order, with IA32_TSC_DEADLINE moved
/// last (restored after the TSC and the LAPIC). Duplicates are dropped.
pub fn msrs_to_save(kvm_list: &[u32], cpuid: &[kvm_cpuid_entry2]) -> Vec<u32> {
    let c = Cpuid(cpuid);
    let mut out: Vec<u32> = Vec::with_capacity(kvm_list.len());
    let mut deadline = false;
    for &index in kvm_list {
        if out.contains(&index) || !guest_can_write(index, &c) {
            continue;
        }
        if index == MSR_IA32_TSC_DEADLINE {
            deadline = true;
        } else {
            out.push(index);
        }
    }
    if deadline {
        out.push(MSR_IA32_TSC_DEADLINE);
    }
    out
}

fn ioctl(vcpu: usize, ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Ioctl {
        vcpu,
        ioctl,
        source,
    }
}

/// The KVM_GET/SET_MSRS buffer (`op`: "GET" or "SET") of `entries`.
fn msr_buffer(vcpu: usize, op: &'static str, entries: &[kvm_msr_entry]) -> Result<Msrs, Error> {
    Msrs::from_entries(entries).map_err(|source| Error::MsrBuffer {
        vcpu,
        op,
        count: entries.len(),
        source,
    })
}

/// Reads `indices`; an MSR KVM cannot read (KVM_GET_MSRS stops at the first one) is
/// left out: the guest cannot have written it either.
fn read_msrs(fd: &VcpuFd, vcpu: usize, indices: &[u32]) -> Result<Vec<MsrValue>, Error> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msr_buffer(vcpu, "GET", &entries)?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(ioctl(vcpu, "KVM_GET_MSRS"))?
            .min(chunk.len());
        out.extend(msrs.as_slice()[..n].iter().map(|e| MsrValue {
            index: e.index,
            value: e.data,
        }));
        if n < chunk.len() {
            log::debug!("vCPU {vcpu}: MSR {:#x} unreadable, not saved", chunk[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(out)
}

/// Writes `msrs` in order; the first one KVM refuses is named.
fn write_msrs(fd: &VcpuFd, vcpu: usize, msrs: &[MsrValue]) -> Result<(), Error> {
    for chunk in msrs.chunks(MSR_CHUNK) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.value,
                ..Default::default()
            })
            .collect();
        let set = msr_buffer(vcpu, "SET", &entries)?;
        let n = fd.set_msrs(&set).map_err(ioctl(vcpu, "KVM_SET_MSRS"))?;
        if n < chunk.len() {
            return Err(Error::MsrRefused {
                vcpu,
                index: chunk[n].index,
                value: chunk[n].value,
            });
        }
    }
    Ok(())
}

/// The LAPIC timer is armed in TSC-deadline mode (LVT timer mode 2, not masked).
fn lapic_tsc_deadline_mode(lapic: &kvm_lapic_state) -> bool {
    let b = &lapic.regs[APIC_LVTT..APIC_LVTT + 4];
    let lvtt = u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]);
    (lvtt >> 17) & 3 == 2 && lvtt & (1 << 16) == 0
}

/// Saves vCPU `vcpu`'s state through `fd`. Call on the vCPU's thread while it is
/// paused, after any pending I/O exit was completed (see the module doc).
pub fn save(fd: &VcpuFd, vcpu: usize, plan: &SavePlan) -> Result<VcpuState, Error> {
    let regs = fd.get_regs().map_err(ioctl(vcpu, "KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(ioctl(vcpu, "KVM_GET_SREGS"))?;
    let fpu = Fpu::from(&fd.get_fpu().map_err(ioctl(vcpu, "KVM_GET_FPU"))?);
    // KVM_GET_XSAVE copies the legacy 4096-byte area and fails (EINVAL) if the vCPU's
    // area is larger (dynamic features such as AMX, which Ferrite never enables).
    let xsave = if plan.xsave {
        let x = fd.get_xsave().map_err(ioctl(vcpu, "KVM_GET_XSAVE"))?;
        Some(Xsave {
            region: x.region.to_vec(),
        })
    } else {
        None
    };
    let xcrs = if plan.xcrs {
        Some(fd.get_xcrs().map_err(ioctl(vcpu, "KVM_GET_XCRS"))?)
    } else {
        None
    };
    let debug_regs = fd
        .get_debug_regs()
        .map_err(ioctl(vcpu, "KVM_GET_DEBUGREGS"))?;
    let lapic = if plan.lapic {
        Some(fd.get_lapic().map_err(ioctl(vcpu, "KVM_GET_LAPIC"))?)
    } else {
        None
    };
    let mp_state = fd.get_mp_state().map_err(ioctl(vcpu, "KVM_GET_MP_STATE"))?;
    let events = fd
        .get_vcpu_events()
        .map_err(ioctl(vcpu, "KVM_GET_VCPU_EVENTS"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl(vcpu, "KVM_GET_CPUID2"))?;
    let list = msrs_to_save(&plan.kvm_msrs, cpuid.as_slice());
    let mut msrs = read_msrs(fd, vcpu, &list)?;
    // TSC-deadline fix-up: a deadline timer that fired just before the save can read
    // as 0 while its interrupt is not yet in the LAPIC; restored as 0 the timer would
    // never fire again and the guest would stall. Setting the deadline to the saved
    // TSC makes it fire at once after restore (a guest takes a spurious timer
    // interrupt in its stride).
    let tsc = msrs
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.value);
    if let (Some(tsc), Some(lapic)) = (tsc, &lapic) {
        if lapic_tsc_deadline_mode(lapic) {
            for m in msrs
                .iter_mut()
                .filter(|m| m.index == MSR_IA32_TSC_DEADLINE && m.value == 0)
            {
                log::debug!("vCPU {vcpu}: TSC deadline 0 in deadline mode, set to {tsc:#x}");
                m.value = tsc;
            }
        }
    }
    let tsc_khz = if plan.tsc_khz {
        Some(fd.get_tsc_khz().map_err(ioctl(vcpu, "KVM_GET_TSC_KHZ"))?)
    } else {
        None
    };
    Ok(VcpuState {
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        mp_state,
        events,
        msrs,
        tsc_khz,
        cpuid: cpuid.as_slice().to_vec(),
    })
}

/// Writes `state` into vCPU `vcpu` (whose CPUID is already set), in the order the
/// module doc gives. Call on the main thread before the vCPU thread starts.
pub fn restore(fd: &VcpuFd, vcpu: usize, state: &VcpuState) -> Result<(), Error> {
    // 0. The CPUID the guest saw (not recomputed from this host).
    if !state.cpuid.is_empty() {
        let cpuid = kvm_bindings::CpuId::from_entries(&state.cpuid).map_err(|_| {
            ioctl(vcpu, "KVM_SET_CPUID2 (saved CPUID)")(kvm_ioctls::Error::new(libc::E2BIG))
        })?;
        fd.set_cpuid2(&cpuid)
            .map_err(ioctl(vcpu, "KVM_SET_CPUID2 (saved CPUID)"))?;
    }
    // 1. TSC frequency.
    if let Some(saved_khz) = state.tsc_khz {
        let host_khz = fd.get_tsc_khz().map_err(ioctl(vcpu, "KVM_GET_TSC_KHZ"))?;
        if host_khz != saved_khz {
            fd.set_tsc_khz(saved_khz).map_err(|source| Error::TscKhz {
                vcpu,
                saved_khz,
                host_khz,
                source,
            })?;
        }
    }
    // 2-3. sregs, then regs, FPU, XSAVE, XCRs, debug registers.
    fd.set_sregs(&state.sregs)
        .map_err(ioctl(vcpu, "KVM_SET_SREGS"))?;
    fd.set_regs(&state.regs)
        .map_err(ioctl(vcpu, "KVM_SET_REGS"))?;
    fd.set_fpu(&kvm_fpu::from(&state.fpu))
        .map_err(ioctl(vcpu, "KVM_SET_FPU"))?;
    if let Some(saved) = &state.xsave {
        set_xsave(fd, vcpu, saved)?;
    }
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(ioctl(vcpu, "KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&state.debug_regs)
        .map_err(ioctl(vcpu, "KVM_SET_DEBUGREGS"))?;
    // 4. LAPIC.
    if let Some(lapic) = &state.lapic {
        fd.set_lapic(lapic).map_err(ioctl(vcpu, "KVM_SET_LAPIC"))?;
    }
    // 5. MSRs; the TSC deadline after the TSC and the LAPIC.
    let (deferred, first): (Vec<MsrValue>, Vec<MsrValue>) = state
        .msrs
        .iter()
        .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    write_msrs(fd, vcpu, &first)?;
    write_msrs(fd, vcpu, &deferred)?;
    // 6. Events: the NMI and SIPI fields count only when flagged valid on a set.
    let mut events = state.events;
    events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    fd.set_vcpu_events(&events)
        .map_err(ioctl(vcpu, "KVM_SET_VCPU_EVENTS"))?;
    // 7. MP state.
    fd.set_mp_state(state.mp_state)
        .map_err(ioctl(vcpu, "KVM_SET_MP_STATE"))?;
    // 8. The guest's kvm-clock learns that its vCPU was stopped.
    match fd.kvmclock_ctrl() {
        Ok(()) => {}
        Err(e) if e.errno() == libc::EINVAL => {
            log::debug!("vCPU {vcpu}: guest has no kvm-clock to notify");
        }
        Err(e) => return Err(ioctl(vcpu, "KVM_KVMCLOCK_CTRL")(e)),
    }
    Ok(())
}

fn set_xsave(fd: &VcpuFd, vcpu: usize, saved: &Xsave) -> Result<(), Error> {
    let mut xsave: kvm_xsave = Default::default();
    if saved.region.len() > xsave.region.len() {
        return Err(Error::XsaveSize {
            vcpu,
            words: saved.region.len(),
            max: xsave.region.len(),
        });
    }
    // KVM_GET_XSAVE succeeds only when this vCPU's XSAVE area fits the 4096-byte
    // kvm_xsave (it returns EINVAL for a larger one), which is also the size
    // KVM_SET_XSAVE then reads: the check that makes the set below sound.
    if let Err(e) = fd.get_xsave() {
        return Err(if e.errno() == libc::ENOTTY || e.errno() == libc::ENOSYS {
            Error::HostLacks {
                vcpu,
                what: "XSAVE",
                cap: "KVM_CAP_XSAVE",
            }
        } else {
            ioctl(vcpu, "KVM_GET_XSAVE")(e)
        });
    }
    xsave.region[..saved.region.len()].copy_from_slice(&saved.region);
    // SAFETY: KVM_SET_XSAVE reads the vCPU's XSAVE area size from `xsave`; the
    // successful KVM_GET_XSAVE above shows that size is at most size_of::<kvm_xsave>(),
    // the size of the struct passed here, so the kernel reads only memory we own.
    unsafe { fd.set_xsave(&xsave) }.map_err(ioctl(vcpu, "KVM_SET_XSAVE"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// The start of the test host's MSR index list (see [`kvm_list`]).
    const KVM_LIST: &[u32] = &[
        0x174,
        0x175,
        0x176,
        MSR_IA32_TSC,
        0x277,
        MSR_IA32_TSC_DEADLINE,
        0x3b,
        0xda0,
        0xd90,
        0xc1,
        0xc2,
        0xc3,
        0x186,
        0x187,
        0x309,
        0x38f,
        0x40000000,
        0x40000001,
    ];

    /// KVM's paravirtual MSRs as KVM lists them (0x4b564d08 is one Ferrite has no
    /// name for).
    const KVM_PV_LIST: &[u32] = &[
        MSR_KVM_WALL_CLOCK,
        MSR_KVM_SYSTEM_TIME,
        MSR_KVM_WALL_CLOCK_NEW,
        MSR_KVM_SYSTEM_TIME_NEW,
        MSR_KVM_ASYNC_PF_EN,
        MSR_KVM_STEAL_TIME,
        MSR_KVM_PV_EOI_EN,
        MSR_KVM_POLL_CONTROL,
        MSR_KVM_ASYNC_PF_INT,
        MSR_KVM_ASYNC_PF_ACK,
        0x4b564d08,
    ];

    /// The MSR index list of the test host: [`KVM_LIST`], the paravirtual MSRs, then
    /// TSC_AUX and an x2APIC register.
    fn kvm_list() -> Vec<u32> {
        [KVM_LIST, KVM_PV_LIST, &[0xc0000103, 0x830]].concat()
    }

    /// Issue 17: MSRs were hand-picked; the async PF MSRs were missed. With an empty
    /// CPUID every KVM paravirtual MSR KVM lists is still saved.
    #[test]
    fn pv_msrs_are_always_saved_whatever_the_cpuid() {
        let list = msrs_to_save(&kvm_list(), &[]);
        for &pv in KVM_PV_LIST {
            assert!(list.contains(&pv), "{pv:#x} missing from {list:x?}");
        }
        // Feature MSRs the CPUID does not offer are not saved.
        for absent in [
            MSR_IA32_TSC_DEADLINE,
            0x3b,
            0xda0,
            0xd90,
            0xc1,
            0x186,
            0x309,
        ] {
            assert!(!list.contains(&absent), "{absent:#x} in {list:x?}");
        }
        // Always-present MSRs are, x2APIC and Hyper-V ones are not.
        for present in [0x174, MSR_IA32_TSC, 0x277] {
            assert!(list.contains(&present));
        }
        assert!(!list.contains(&0x830) && !list.contains(&0x40000000));
    }

    #[test]
    fn only_msrs_listed_by_kvm_are_saved() {
        let list = msrs_to_save(&[MSR_IA32_TSC, MSR_KVM_SYSTEM_TIME_NEW], &[]);
        assert_eq!(list, vec![MSR_IA32_TSC, MSR_KVM_SYSTEM_TIME_NEW]);
    }

    #[test]
    fn cpuid_features_select_their_msrs_and_tsc_deadline_goes_last() {
        let cpuid = [
            // TSC-deadline.
            leaf(1, 0, 0, 0, 1 << 24, 0),
            // TSC_ADJUST, MPX.
            leaf(7, 0, 0, 1 << 1 | 1 << 14, 0, 0),
            // XSAVES.
            leaf(0xd, 1, 1 << 3, 0, 0, 0),
            // PMU v2, 2 general counters, 1 fixed.
            leaf(0xa, 0, 2 | 2 << 8, 0, 0, 1),
            // RDTSCP.
            leaf(0x8000_0001, 0, 0, 0, 0, 1 << 27),
        ];
        let list = msrs_to_save(&kvm_list(), &cpuid);
        for present in [
            0x3b, 0xda0, 0xd90, 0xc1, 0xc2, 0x186, 0x187, 0x309, 0x38f, 0xc0000103,
        ] {
            assert!(
                list.contains(&present),
                "{present:#x} missing from {list:x?}"
            );
        }
        // Only as many counters as CPUID offers.
        assert!(!list.contains(&0xc3));
        assert_eq!(list.last(), Some(&MSR_IA32_TSC_DEADLINE));
        let tsc = list.iter().position(|&m| m == MSR_IA32_TSC).unwrap();
        assert!(tsc < list.len() - 1);
        // Hyper-V MSRs come with Hyper-V's CPUID only.
        let mut hv = cpuid.to_vec();
        hv.push(leaf(0x4000_0001, 0, u32::from_le_bytes(*b"Hv#1"), 0, 0, 0));
        assert!(msrs_to_save(&kvm_list(), &hv).contains(&0x40000000));
    }

    #[test]
    fn duplicates_in_kvm_list_are_saved_once() {
        let list = msrs_to_save(&[MSR_IA32_TSC, MSR_IA32_TSC, MSR_KVM_ASYNC_PF_EN], &[]);
        assert_eq!(list, vec![MSR_IA32_TSC, MSR_KVM_ASYNC_PF_EN]);
    }

    #[test]
    fn lvt_timer_mode_decoding() {
        let mut lapic = kvm_lapic_state::default();
        let set = |l: &mut kvm_lapic_state, v: u32| {
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                l.regs[APIC_LVTT + i] = *b as i8;
            }
        };
        set(&mut lapic, 2 << 17 | 0xec);
        assert!(lapic_tsc_deadline_mode(&lapic));
        set(&mut lapic, 2 << 17 | 1 << 16 | 0xec);
        assert!(!lapic_tsc_deadline_mode(&lapic), "masked");
        set(&mut lapic, 1 << 17 | 0xec);
        assert!(!lapic_tsc_deadline_mode(&lapic), "periodic");
    }

    #[test]
    fn msr_refusal_names_the_msr_and_vcpu() {
        let e = Error::MsrRefused {
            vcpu: 1,
            index: 0x4b564d02,
            value: 0x41,
        };
        let s = e.to_string();
        assert!(s.contains("vCPU 1") && s.contains("0x4b564d02"), "{s}");
    }
}
