//! The CPUID a vCPU sees: KVM_GET_SUPPORTED_CPUID, then per-vCPU APIC IDs and
//! topology, the hypervisor bit (upstream KVM leaves it clear; without it a guest finds
//! neither kvm-clock nor the KVM leaves), the KVM leaves 0x40000000/0x40000001 with the
//! PV features KVM offers (async page faults only where they can work, see
//! [`kvm_features`]), and features the user hides by name (`--cpu-features`).
#![forbid(unsafe_code)]

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// KVM's paravirtual feature bits in leaf 0x40000001 EAX.
pub mod kvm_feature {
    pub const CLOCKSOURCE: u32 = 0;
    pub const NOP_IO_DELAY: u32 = 1;
    pub const CLOCKSOURCE2: u32 = 3;
    pub const ASYNC_PF: u32 = 4;
    pub const STEAL_TIME: u32 = 5;
    pub const PV_EOI: u32 = 6;
    pub const PV_UNHALT: u32 = 7;
    pub const PV_TLB_FLUSH: u32 = 9;
    pub const ASYNC_PF_VMEXIT: u32 = 10;
    pub const PV_SEND_IPI: u32 = 11;
    pub const POLL_CONTROL: u32 = 12;
    pub const PV_SCHED_YIELD: u32 = 13;
    pub const ASYNC_PF_INT: u32 = 14;
    pub const MSI_EXT_DEST_ID: u32 = 15;
    pub const CLOCKSOURCE_STABLE_BIT: u32 = 24;
}

pub const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
pub const KVM_FEATURES_LEAF: u32 = 0x4000_0001;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// A CPUID feature Ferrite can hide: one bit, or (`async-pf`) several of one register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub mask: u32,
}

const fn f(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u32) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        mask: 1 << bit,
    }
}

/// Every async page fault bit: the feature, its delivery as an interrupt (the only
/// delivery Linux 5.10+ guests accept) and its delivery as a nested #PF vmexit (only
/// meaningful with the feature).
pub const ASYNC_PF_MASK: u32 =
    1 << kvm_feature::ASYNC_PF | 1 << kvm_feature::ASYNC_PF_INT | 1 << kvm_feature::ASYNC_PF_VMEXIT;

/// Features that can be named in `--cpu-features`.
pub const FEATURES: &[Feature] = &[
    f("fma", 1, 0, Reg::Ecx, 12),
    f("cx16", 1, 0, Reg::Ecx, 13),
    f("pcid", 1, 0, Reg::Ecx, 17),
    f("x2apic", 1, 0, Reg::Ecx, 21),
    f("movbe", 1, 0, Reg::Ecx, 22),
    f("popcnt", 1, 0, Reg::Ecx, 23),
    f("tsc-deadline", 1, 0, Reg::Ecx, 24),
    f("aes", 1, 0, Reg::Ecx, 25),
    f("xsave", 1, 0, Reg::Ecx, 26),
    f("avx", 1, 0, Reg::Ecx, 28),
    f("f16c", 1, 0, Reg::Ecx, 29),
    f("rdrand", 1, 0, Reg::Ecx, 30),
    f("hypervisor", 1, 0, Reg::Ecx, 31),
    f("fsgsbase", 7, 0, Reg::Ebx, 0),
    f("avx2", 7, 0, Reg::Ebx, 5),
    f("smep", 7, 0, Reg::Ebx, 7),
    f("erms", 7, 0, Reg::Ebx, 9),
    f("invpcid", 7, 0, Reg::Ebx, 10),
    f("rdseed", 7, 0, Reg::Ebx, 18),
    f("smap", 7, 0, Reg::Ebx, 20),
    f("clflushopt", 7, 0, Reg::Ebx, 23),
    f("clwb", 7, 0, Reg::Ebx, 24),
    f("umip", 7, 0, Reg::Ecx, 2),
    f("pku", 7, 0, Reg::Ecx, 3),
    f("rdpid", 7, 0, Reg::Ecx, 22),
    f("fsrm", 7, 0, Reg::Edx, 4),
    f("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
    f(
        "kvmclock",
        KVM_FEATURES_LEAF,
        0,
        Reg::Eax,
        kvm_feature::CLOCKSOURCE2,
    ),
    f(
        "kvmclock-stable",
        KVM_FEATURES_LEAF,
        0,
        Reg::Eax,
        kvm_feature::CLOCKSOURCE_STABLE_BIT,
    ),
    // `-async-pf` turns async page faults off altogether.
    Feature {
        name: "async-pf",
        leaf: KVM_FEATURES_LEAF,
        subleaf: 0,
        reg: Reg::Eax,
        mask: ASYNC_PF_MASK,
    },
    f(
        "async-pf-int",
        KVM_FEATURES_LEAF,
        0,
        Reg::Eax,
        kvm_feature::ASYNC_PF_INT,
    ),
    f(
        "steal-time",
        KVM_FEATURES_LEAF,
        0,
        Reg::Eax,
        kvm_feature::STEAL_TIME,
    ),
    f(
        "pv-eoi",
        KVM_FEATURES_LEAF,
        0,
        Reg::Eax,
        kvm_feature::PV_EOI,
    ),
    f(
        "pv-unhalt",
        KVM_FEATURES_LEAF,
        0,
        Reg::Eax,
        kvm_feature::PV_UNHALT,
    ),
    f(
        "pv-tlb-flush",
        KVM_FEATURES_LEAF,
        0,
        Reg::Eax,
        kvm_feature::PV_TLB_FLUSH,
    ),
    f(
        "pv-send-ipi",
        KVM_FEATURES_LEAF,
        0,
        Reg::Eax,
        kvm_feature::PV_SEND_IPI,
    ),
    f(
        "pv-sched-yield",
        KVM_FEATURES_LEAF,
        0,
        Reg::Eax,
        kvm_feature::PV_SCHED_YIELD,
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown CPU feature '{name}' in --cpu-features (known: {known})")]
    Unknown { name: String, known: String },
    #[error("--cpu-features entry '{0}' must start with '-' (features can only be hidden)")]
    NotRemoval(String),
    #[error("cannot read the CPUID KVM supports")]
    Supported(#[source] kvm_ioctls::Error),
    #[error("cannot enable KVM_CAP_ENFORCE_PV_FEATURE_CPUID on vCPU {vcpu}")]
    EnforcePv {
        vcpu: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot set CPUID for vCPU {vcpu}")]
    Set {
        vcpu: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Every name in [`FEATURES`], comma-separated (error messages, `--help`).
pub fn feature_names() -> String {
    FEATURES
        .iter()
        .map(|f| f.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses `-x2apic,-cx16`.
pub fn parse_hidden(spec: &str) -> Result<Vec<Feature>, Error> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let name = item
            .strip_prefix('-')
            .ok_or_else(|| Error::NotRemoval(item.into()))?;
        let feat = FEATURES
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| Error::Unknown {
                name: name.into(),
                known: feature_names(),
            })?;
        out.push(*feat);
    }
    Ok(out)
}

fn reg_mut(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

fn set_bit(v: &mut u32, bit: u32, on: bool) {
    if on {
        *v |= 1 << bit;
    } else {
        *v &= !(1 << bit);
    }
}

/// Bits needed to number `n` items.
fn bits_for(n: usize) -> u32 {
    usize::BITS - n.saturating_sub(1).leading_zeros()
}

/// What the VM offers beyond KVM_GET_SUPPORTED_CPUID.
#[derive(Debug, Clone, Copy, Default)]
pub struct VmCaps {
    /// The in-kernel LAPIC implements the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER
    /// with an irqchip). KVM does not list it among supported CPUID bits; without it a
    /// guest calibrates and verifies the LAPIC timer against the PIT, which is slow and
    /// fails under heavy host load.
    pub tsc_deadline: bool,
    /// Async page faults can work: KVM has `KVM_CAP_ASYNC_PF_INT` (delivery as an
    /// interrupt, which Linux 5.10+ guests require) and the LAPIC is KVM's, which
    /// delivers that interrupt. Without both, the async PF bits are not offered.
    pub async_pf: bool,
}

/// The KVM PV feature bits (leaf 0x40000001 EAX) a guest is offered: what KVM supports,
/// without the async page fault bits unless `caps.async_pf`, without what the user hides.
pub fn kvm_features(supported_eax: u32, caps: VmCaps, hidden: &[Feature]) -> u32 {
    let mut eax = supported_eax;
    if !caps.async_pf {
        eax &= !ASYNC_PF_MASK;
    }
    for h in hidden
        .iter()
        .filter(|h| h.leaf == KVM_FEATURES_LEAF && h.subleaf == 0 && h.reg == Reg::Eax)
    {
        eax &= !h.mask;
    }
    eax
}

/// The CPUID entries for vCPU `index` of `nr_vcpus`, from KVM's supported set.
pub fn vcpu_entries(
    supported: &[kvm_cpuid_entry2],
    index: usize,
    nr_vcpus: usize,
    caps: VmCaps,
    hidden: &[Feature],
) -> Vec<kvm_cpuid_entry2> {
    let apic_id = index as u32;
    let nr = nr_vcpus.max(1) as u32;
    let mut entries: Vec<kvm_cpuid_entry2> = supported.to_vec();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (nr.min(255) << 16);
                set_bit(&mut e.ecx, 31, true); // hypervisor present
                if caps.tsc_deadline {
                    set_bit(&mut e.ecx, 24, true);
                }
                set_bit(&mut e.edx, 28, nr > 1); // HTT: more than one logical CPU
            }
            4 => {
                // Cores per package - 1 in EAX[31:26]; one thread per cache share.
                e.eax = (e.eax & 0x03ff_c3ff) | ((nr - 1).min(63) << 26);
            }
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8; // SMT level, one thread per core
                    }
                    1 => {
                        e.eax = bits_for(nr as usize);
                        e.ebx = nr;
                        e.ecx = (2 << 8) | 1; // core level
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            KVM_SIGNATURE_LEAF => set_kvm_signature(e),
            KVM_FEATURES_LEAF => e.eax = kvm_features(e.eax, caps, hidden),
            _ => {}
        }
    }
    if !entries.iter().any(|e| e.function == KVM_SIGNATURE_LEAF) {
        let mut e = kvm_cpuid_entry2 {
            function: KVM_SIGNATURE_LEAF,
            ..Default::default()
        };
        set_kvm_signature(&mut e);
        entries.push(e);
    }
    for h in hidden {
        for e in entries
            .iter_mut()
            .filter(|e| e.function == h.leaf && e.index == h.subleaf)
        {
            *reg_mut(e, h.reg) &= !h.mask;
        }
    }
    entries
}

fn set_kvm_signature(e: &mut kvm_cpuid_entry2) {
    let sig = b"KVMKVMKVM\0\0\0";
    e.eax = KVM_FEATURES_LEAF;
    e.ebx = u32::from_le_bytes([sig[0], sig[1], sig[2], sig[3]]);
    e.ecx = u32::from_le_bytes([sig[4], sig[5], sig[6], sig[7]]);
    e.edx = u32::from_le_bytes([sig[8], sig[9], sig[10], sig[11]]);
}

/// Sets vCPU `index`'s CPUID; returns the entries set (what a snapshot saves).
pub fn apply(
    vcpu: &kvm_ioctls::VcpuFd,
    supported: &CpuId,
    index: usize,
    nr_vcpus: usize,
    caps: VmCaps,
    hidden: &[Feature],
) -> Result<Vec<kvm_cpuid_entry2>, Error> {
    let entries = vcpu_entries(supported.as_slice(), index, nr_vcpus, caps, hidden);
    let cpuid = CpuId::from_entries(&entries).map_err(|_| Error::Set {
        vcpu: index,
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(|source| Error::Set {
        vcpu: index,
        source,
    })?;
    Ok(entries)
}

/// Makes KVM refuse (#GP) the PV MSRs and hypercalls whose feature bit vCPU `index`'s
/// CPUID does not offer (`KVM_CAP_ENFORCE_PV_FEATURE_CPUID`); without it a guest could
/// enable, e.g., async page faults that were not offered. Call only where the host has
/// the capability.
pub fn enforce_pv_features(vcpu: &kvm_ioctls::VcpuFd, index: usize) -> Result<(), Error> {
    let cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_ENFORCE_PV_FEATURE_CPUID,
        args: [1, 0, 0, 0],
        ..Default::default()
    };
    vcpu.enable_cap(&cap).map_err(|source| Error::EnforcePv {
        vcpu: index,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

    fn supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0000_0800,
                ecx: 1 << 21 | 1 << 13,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: KVM_FEATURES_LEAF,
                eax: 1 << kvm_feature::ASYNC_PF
                    | 1 << kvm_feature::ASYNC_PF_INT
                    | 1 << kvm_feature::CLOCKSOURCE2,
                ..Default::default()
            },
        ]
    }

    fn leaf(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn apic_ids_topology_and_hypervisor_bit() {
        let v = vcpu_entries(
            &supported(),
            3,
            4,
            VmCaps {
                tsc_deadline: true,
                ..VmCaps::default()
            },
            &[],
        );
        let l1 = leaf(&v, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & (1 << 31), 0);
        assert_ne!(l1.edx & (1 << 28), 0);
        assert_ne!(l1.ecx & (1 << 24), 0, "TSC deadline offered");
        assert_eq!(leaf(&v, 0xb, 0).edx, 3);
        assert_eq!(leaf(&v, 0xb, 1).ebx, 4);
        assert_eq!(leaf(&v, 0xb, 1).eax, 2);
    }

    #[test]
    fn kvm_leaves_present_with_pv_features() {
        let caps = VmCaps {
            async_pf: true,
            ..VmCaps::default()
        };
        let v = vcpu_entries(&supported(), 0, 1, caps, &[]);
        let sig = leaf(&v, KVM_SIGNATURE_LEAF, 0);
        let mut s = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            s.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&s[..9], b"KVMKVMKVM");
        assert_eq!(sig.eax, KVM_FEATURES_LEAF);
        let feats = leaf(&v, KVM_FEATURES_LEAF, 0).eax;
        assert_ne!(feats & (1 << kvm_feature::ASYNC_PF), 0);
        assert_ne!(feats & (1 << kvm_feature::ASYNC_PF_INT), 0);
    }

    #[test]
    fn hidden_features_are_cleared() {
        let hidden = parse_hidden("-x2apic, -cx16,-async-pf,-tsc-deadline").unwrap();
        let v = vcpu_entries(
            &supported(),
            0,
            1,
            VmCaps {
                tsc_deadline: true,
                ..VmCaps::default()
            },
            &hidden,
        );
        assert_eq!(
            leaf(&v, 1, 0).ecx & (1 << 21 | 1 << 13 | 1 << 24),
            0,
            "hiding wins over caps"
        );
        assert_eq!(
            leaf(&v, KVM_FEATURES_LEAF, 0).eax & (1 << kvm_feature::ASYNC_PF),
            0
        );
        assert!(matches!(
            parse_hidden("-warp-drive"),
            Err(Error::Unknown { .. })
        ));
        assert!(matches!(parse_hidden("x2apic"), Err(Error::NotRemoval(_))));
        assert!(parse_hidden("").unwrap().is_empty());
    }

    #[test]
    fn async_pf_offered_only_with_the_interrupt_cap_and_the_kernel_lapic() {
        const APF: u32 = 1 << kvm_feature::ASYNC_PF;
        const INT: u32 = 1 << kvm_feature::ASYNC_PF_INT;
        const VMEXIT: u32 = 1 << kvm_feature::ASYNC_PF_VMEXIT;
        const CLOCK: u32 = 1 << kvm_feature::CLOCKSOURCE2;
        let all = APF | INT | VMEXIT | CLOCK;
        let on = VmCaps {
            async_pf: true,
            ..VmCaps::default()
        };
        let off = VmCaps::default();
        assert_eq!(kvm_features(all, on, &[]), all);
        assert_eq!(
            kvm_features(all, off, &[]),
            CLOCK,
            "no cap or no LAPIC: no bits"
        );
        // Only what KVM supports is ever offered.
        assert_eq!(kvm_features(CLOCK, on, &[]), CLOCK);
        let hide = |s| parse_hidden(s).unwrap();
        assert_eq!(
            kvm_features(all, on, &hide("-async-pf")),
            CLOCK,
            "both bits"
        );
        assert_eq!(
            kvm_features(all, on, &hide("-async-pf-int")),
            APF | VMEXIT | CLOCK
        );
        assert_eq!(
            kvm_features(all, on, &hide("-kvmclock")),
            APF | INT | VMEXIT
        );
        // Hiding a bit of another leaf leaves the KVM leaf alone.
        assert_eq!(kvm_features(all, on, &hide("-x2apic")), all);
        // The same decision reaches the vCPU's CPUID.
        let eax = |caps, hidden: &[Feature]| {
            leaf(
                &vcpu_entries(&supported(), 0, 1, caps, hidden),
                KVM_FEATURES_LEAF,
                0,
            )
            .eax
        };
        assert_eq!(eax(on, &[]) & (APF | INT), APF | INT);
        assert_eq!(eax(off, &[]) & (APF | INT), 0);
        assert_eq!(eax(on, &hide("-async-pf")) & (APF | INT), 0);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
    }
}
