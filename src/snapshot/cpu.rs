//! The host check of a restore: every CPU feature bit the snapshot's guest was shown
//! (its saved CPUID, [`crate::vcpu::state::VcpuState::cpuid`]) must be one this
//! host's KVM can offer (KVM_GET_SUPPORTED_CPUID), else the restore is refused before
//! anything is built: a guest that found AVX-512 at boot and then runs where it is
//! missing takes #UD at its next use.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::Path;

use kvm_bindings::{kvm_cpuid_entry2, KVM_MAX_CPUID_ENTRIES};

/// The host check failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot needs CPU feature{} {} that this host lacks", if .0.len() == 1 { "" } else { "s" }, list(.0))]
    Missing(Vec<Missing>),
    #[error("cannot open {path} to compare the snapshot's CPU features with this host's")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    Supported(#[source] kvm_ioctls::Error),
}

fn list(m: &[Missing]) -> String {
    m.iter()
        .map(|m| m.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    fn of(self, e: &kvm_cpuid_entry2) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }
}

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reg::Eax => "EAX",
            Reg::Ebx => "EBX",
            Reg::Ecx => "ECX",
            Reg::Edx => "EDX",
        })
    }
}

/// A feature bit the guest saw and the host lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missing {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u32,
}

impl Missing {
    /// The feature's usual name, where it is a common one.
    pub fn name(&self) -> Option<&'static str> {
        NAMES
            .iter()
            .find(|n| (n.0, n.1, n.2, n.3) == (self.leaf, self.subleaf, self.reg, self.bit))
            .map(|n| n.4)
    }
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(n) = self.name() {
            write!(f, "{n} (")?;
        }
        write!(
            f,
            "leaf {:#x} subleaf {} {} bit {}",
            self.leaf, self.subleaf, self.reg, self.bit
        )?;
        if self.name().is_some() {
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// The feature registers compared: (leaf, subleaf, register, bits to ignore). Ignored
/// are bits that reflect the guest's own state rather than what it was offered
/// (OSXSAVE follows its CR4.OSXSAVE, OSPKE its CR4.PKE) and bits Ferrite itself sets on
/// top of KVM's list (hypervisor present, HTT; TSC-deadline is added to the host side
/// by the caller where the host's KVM has the timer).
const COMPARED: &[(u32, u32, Reg, u32)] = &[
    (0x1, 0, Reg::Ecx, 1 << 27 | 1 << 31),
    (0x1, 0, Reg::Edx, 1 << 28),
    (0x7, 0, Reg::Ebx, 0),
    (0x7, 0, Reg::Ecx, 1 << 4),
    (0x7, 0, Reg::Edx, 0),
    (0x7, 1, Reg::Eax, 0),
    (0xd, 1, Reg::Eax, 0),
    (0x8000_0001, 0, Reg::Ecx, 0),
    (0x8000_0001, 0, Reg::Edx, 0),
    (0x4000_0001, 0, Reg::Eax, 0),
];

/// Names of common feature bits: (leaf, subleaf, register, bit, name).
const NAMES: &[(u32, u32, Reg, u32, &str)] = &[
    (0x1, 0, Reg::Ecx, 0, "sse3"),
    (0x1, 0, Reg::Ecx, 1, "pclmulqdq"),
    (0x1, 0, Reg::Ecx, 5, "vmx"),
    (0x1, 0, Reg::Ecx, 9, "ssse3"),
    (0x1, 0, Reg::Ecx, 12, "fma"),
    (0x1, 0, Reg::Ecx, 13, "cx16"),
    (0x1, 0, Reg::Ecx, 19, "sse4.1"),
    (0x1, 0, Reg::Ecx, 20, "sse4.2"),
    (0x1, 0, Reg::Ecx, 21, "x2apic"),
    (0x1, 0, Reg::Ecx, 22, "movbe"),
    (0x1, 0, Reg::Ecx, 23, "popcnt"),
    (0x1, 0, Reg::Ecx, 24, "tsc-deadline"),
    (0x1, 0, Reg::Ecx, 25, "aes"),
    (0x1, 0, Reg::Ecx, 26, "xsave"),
    (0x1, 0, Reg::Ecx, 28, "avx"),
    (0x1, 0, Reg::Ecx, 29, "f16c"),
    (0x1, 0, Reg::Ecx, 30, "rdrand"),
    (0x1, 0, Reg::Edx, 0, "fpu"),
    (0x1, 0, Reg::Edx, 4, "tsc"),
    (0x1, 0, Reg::Edx, 5, "msr"),
    (0x1, 0, Reg::Edx, 8, "cx8"),
    (0x1, 0, Reg::Edx, 9, "apic"),
    (0x1, 0, Reg::Edx, 15, "cmov"),
    (0x1, 0, Reg::Edx, 19, "clflush"),
    (0x1, 0, Reg::Edx, 23, "mmx"),
    (0x1, 0, Reg::Edx, 24, "fxsr"),
    (0x1, 0, Reg::Edx, 25, "sse"),
    (0x1, 0, Reg::Edx, 26, "sse2"),
    (0x7, 0, Reg::Ebx, 0, "fsgsbase"),
    (0x7, 0, Reg::Ebx, 3, "bmi1"),
    (0x7, 0, Reg::Ebx, 5, "avx2"),
    (0x7, 0, Reg::Ebx, 7, "smep"),
    (0x7, 0, Reg::Ebx, 8, "bmi2"),
    (0x7, 0, Reg::Ebx, 9, "erms"),
    (0x7, 0, Reg::Ebx, 10, "invpcid"),
    (0x7, 0, Reg::Ebx, 16, "avx512f"),
    (0x7, 0, Reg::Ebx, 17, "avx512dq"),
    (0x7, 0, Reg::Ebx, 18, "rdseed"),
    (0x7, 0, Reg::Ebx, 19, "adx"),
    (0x7, 0, Reg::Ebx, 20, "smap"),
    (0x7, 0, Reg::Ebx, 23, "clflushopt"),
    (0x7, 0, Reg::Ebx, 24, "clwb"),
    (0x7, 0, Reg::Ebx, 28, "avx512cd"),
    (0x7, 0, Reg::Ebx, 29, "sha"),
    (0x7, 0, Reg::Ebx, 30, "avx512bw"),
    (0x7, 0, Reg::Ebx, 31, "avx512vl"),
    (0x7, 0, Reg::Ecx, 1, "avx512vbmi"),
    (0x7, 0, Reg::Ecx, 2, "umip"),
    (0x7, 0, Reg::Ecx, 3, "pku"),
    (0x7, 0, Reg::Ecx, 8, "gfni"),
    (0x7, 0, Reg::Ecx, 9, "vaes"),
    (0x7, 0, Reg::Ecx, 10, "vpclmulqdq"),
    (0x7, 0, Reg::Ecx, 11, "avx512vnni"),
    (0x7, 0, Reg::Ecx, 22, "rdpid"),
    (0x7, 0, Reg::Edx, 4, "fsrm"),
    (0x7, 0, Reg::Edx, 10, "md-clear"),
    (0x7, 0, Reg::Edx, 26, "ibrs"),
    (0x7, 0, Reg::Edx, 29, "arch-capabilities"),
    (0x7, 0, Reg::Edx, 31, "ssbd"),
    (0x7, 1, Reg::Eax, 4, "avx-vnni"),
    (0x7, 1, Reg::Eax, 5, "avx512bf16"),
    (0xd, 1, Reg::Eax, 0, "xsaveopt"),
    (0xd, 1, Reg::Eax, 1, "xsavec"),
    (0xd, 1, Reg::Eax, 2, "xgetbv1"),
    (0xd, 1, Reg::Eax, 3, "xsaves"),
    (0x8000_0001, 0, Reg::Ecx, 0, "lahf-lm"),
    (0x8000_0001, 0, Reg::Ecx, 5, "abm"),
    (0x8000_0001, 0, Reg::Ecx, 8, "3dnowprefetch"),
    (0x8000_0001, 0, Reg::Edx, 11, "syscall"),
    (0x8000_0001, 0, Reg::Edx, 20, "nx"),
    (0x8000_0001, 0, Reg::Edx, 26, "pdpe1gb"),
    (0x8000_0001, 0, Reg::Edx, 27, "rdtscp"),
    (0x8000_0001, 0, Reg::Edx, 29, "lm"),
    (0x4000_0001, 0, Reg::Eax, 3, "kvm-clocksource2"),
    (0x4000_0001, 0, Reg::Eax, 4, "kvm-async-pf"),
    (0x4000_0001, 0, Reg::Eax, 5, "kvm-steal-time"),
    (0x4000_0001, 0, Reg::Eax, 6, "kvm-pv-eoi"),
    (0x4000_0001, 0, Reg::Eax, 14, "kvm-async-pf-int"),
];

fn find(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    entries.iter().find(|e| {
        e.function == leaf
            && (e.index == subleaf || e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
    })
}

/// The feature bits (of the [`COMPARED`] registers) set in `guest` and clear in `host`,
/// in leaf, register and bit order. A leaf the host does not list counts as all clear.
pub fn missing(guest: &[kvm_cpuid_entry2], host: &[kvm_cpuid_entry2]) -> Vec<Missing> {
    let mut out = Vec::new();
    for &(leaf, subleaf, reg, ignore) in COMPARED {
        let Some(g) = find(guest, leaf, subleaf) else {
            continue;
        };
        let have = find(host, leaf, subleaf).map_or(0, |h| reg.of(h));
        let lacks = reg.of(g) & !have & !ignore;
        for bit in (0..32).filter(|b| lacks & (1 << b) != 0) {
            out.push(Missing {
                leaf,
                subleaf,
                reg,
                bit,
            });
        }
    }
    out
}

/// What this host's KVM (`kvm_device`) can offer a Ferrite guest: its supported CPUID,
/// plus TSC-deadline where KVM has the timer (Ferrite offers it then; KVM does not list
/// it).
pub fn host_cpuid(kvm_device: &Path) -> Result<Vec<kvm_cpuid_entry2>, Error> {
    let err = |source| Error::Open {
        path: kvm_device.to_path_buf(),
        source,
    };
    let cpath = std::ffi::CString::new(kvm_device.as_os_str().as_encoded_bytes())
        .map_err(|_| err(kvm_ioctls::Error::new(libc::EINVAL)))?;
    let kvm = kvm_ioctls::Kvm::new_with_path(&cpath).map_err(err)?;
    let mut entries = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::Supported)?
        .as_slice()
        .to_vec();
    if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
        for e in entries.iter_mut().filter(|e| e.function == 1) {
            e.ecx |= 1 << 24;
        }
    }
    Ok(entries)
}

/// Refuses a snapshot whose vCPUs were shown a feature this host lacks (each vCPU's
/// saved CPUID; a snapshot without saved CPUID is not checked).
pub fn check(saved: &[&[kvm_cpuid_entry2]], host: &[kvm_cpuid_entry2]) -> Result<(), Error> {
    let mut all: Vec<Missing> = Vec::new();
    for m in saved.iter().flat_map(|g| missing(g, host)) {
        if !all.contains(&m) {
            all.push(m);
        }
    }
    if all.is_empty() {
        Ok(())
    } else {
        Err(Error::Missing(all))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

    fn e(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if function == 7 || function == 0xd {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    #[test]
    fn a_feature_the_host_lacks_is_named_with_leaf_register_and_bit() {
        let host = [e(1, 0, [0, 0, 1 << 0, 1]), e(7, 0, [0, 1 << 5, 0, 0])];
        let guest = [
            e(1, 0, [0, 0, 1 << 0, 1]),
            e(7, 0, [0, 1 << 5 | 1 << 16, 0, 0]),
        ];
        let m = missing(&guest, &host);
        assert_eq!(
            m,
            vec![Missing {
                leaf: 7,
                subleaf: 0,
                reg: Reg::Ebx,
                bit: 16
            }]
        );
        let err = check(&[&guest], &host).unwrap_err().to_string();
        assert_eq!(
            err,
            "snapshot needs CPU feature avx512f (leaf 0x7 subleaf 0 EBX bit 16) that this host lacks"
        );
    }

    #[test]
    fn unnamed_bits_leaves_the_host_lacks_and_several_bits_are_all_listed() {
        // Leaf 0xd subleaf 1 missing on the host: every bit the guest saw is missing.
        let host = [e(1, 0, [0, 0, 0, 0]), e(0xd, 0, [7, 0, 0, 0])];
        let guest = [
            e(1, 0, [0, 0, 0, 1 << 26]),
            e(0xd, 0, [7, 0, 0, 0]),
            e(0xd, 1, [1, 0, 0, 0]),
            e(0x8000_0001, 0, [0, 0, 1 << 30, 0]),
        ];
        let err = check(&[&guest, &guest], &host).unwrap_err().to_string();
        assert_eq!(
            err,
            "snapshot needs CPU features sse2 (leaf 0x1 subleaf 0 EDX bit 26), \
             xsaveopt (leaf 0xd subleaf 1 EAX bit 0), \
             leaf 0x80000001 subleaf 0 ECX bit 30 that this host lacks"
        );
    }

    #[test]
    fn same_or_fewer_features_pass_and_guest_state_bits_are_ignored() {
        let host = [
            e(1, 0, [0, 0, 1 << 28 | 1, 1 << 26]),
            e(7, 0, [0, 1 << 5, 0, 0]),
        ];
        // Fewer (a feature hidden with --cpu-features), and OSXSAVE, hypervisor, HTT
        // and OSPKE, which are not host features.
        let guest = [
            e(1, 0, [0, 0, 1 << 28 | 1 << 27 | 1 << 31, 1 << 26 | 1 << 28]),
            e(7, 0, [0, 0, 1 << 4, 0]),
        ];
        assert!(missing(&guest, &host).is_empty());
        assert!(check(&[&guest], &host).is_ok());
        // A snapshot without saved CPUID checks nothing.
        assert!(check(&[&[]], &host).is_ok());
        // Non-feature leaves (topology, cache) may differ freely.
        let guest = [e(4, 0, [u32::MAX; 4]), e(0xb, 0, [u32::MAX; 4])];
        assert!(missing(&guest, &host).is_empty());
    }
}
