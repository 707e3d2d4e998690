//! vCPU register state at entry: real mode for flat binaries, 64-bit long mode with an
//! identity map for ELF images. Building the values is pure (testable without KVM);
//! only [`apply`] touches a vCPU fd.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout;
use crate::memory::GuestMemory;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Selectors of the Linux 64-bit boot protocol (__BOOT_CS, __BOOT_DS).
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write boot {what} at guest address {addr:#x}")]
    WriteGuest {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error(transparent)]
    Ioctl(#[from] super::VcpuIoctlError),
}

/// Where and how a vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 16-bit real mode at `segment:0` (flat binaries).
    Real { segment: u16 },
    /// 64-bit long mode at `rip` with the boot page tables and GDT.
    Long { rip: u64 },
    /// 32-bit protected mode, paging off, at `eip`; `ebx` = the PVH start info.
    Pvh { eip: u64 },
}

/// A GDT descriptor from its flags, base and limit (the packed x86 layout).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The boot GDT: null, null, 64-bit code (0x10), data (0x18), 32-bit code (0x20).
pub const BOOT_GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0xc09b, 0, 0xfffff),
];

/// The segment limit in bytes, as KVM wants it: the descriptor's 20-bit limit, scaled
/// by 4 KiB when the granularity bit is set.
fn scaled_limit(entry: u64) -> u32 {
    let raw = (((entry >> 32) & 0xf_0000) | (entry & 0xffff)) as u32;
    if (entry >> 55) & 1 == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The hidden-part segment KVM wants for a GDT descriptor at `index`.
fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: scaled_limit(entry),
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the boot GDT, an empty IDT and page tables identity-mapping the first GiB
/// with 2 MiB pages.
pub fn write_long_mode_tables(mem: &GuestMemory) -> Result<(), Error> {
    let w = |what: &'static str, addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|source| Error::WriteGuest { what, addr, source })
    };
    for (i, e) in BOOT_GDT.iter().enumerate() {
        w("GDT", layout::GDT_ADDR + 8 * i as u64, *e)?;
    }
    w("IDT", layout::IDT_ADDR, 0)?;
    w("PML4", layout::PML4_ADDR, layout::PDPT_ADDR | 0x3)?;
    w("PDPT", layout::PDPT_ADDR, layout::PD_ADDR | 0x3)?;
    for i in 0..512u64 {
        // Present | writable | 2 MiB page.
        w("PD", layout::PD_ADDR + i * 8, (i << 21) | 0x83)?;
    }
    Ok(())
}

/// Points GDTR at the boot GDT, CS at its entry `code`, the data segments at the flat
/// data entry.
fn load_boot_gdt(sregs: &mut kvm_sregs, code: u16) {
    let data = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.cs = segment_from_gdt(BOOT_GDT[usize::from(code)], code);
    for seg in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *seg = data;
    }
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
}

/// Applies `mode` to `sregs` (as read from the vCPU, so the rest stays KVM's reset state).
pub fn set_sregs(sregs: &mut kvm_sregs, mode: EntryMode) {
    match mode {
        EntryMode::Real { segment } => {
            for seg in [
                &mut sregs.cs,
                &mut sregs.ds,
                &mut sregs.es,
                &mut sregs.fs,
                &mut sregs.gs,
                &mut sregs.ss,
            ] {
                seg.selector = segment;
                seg.base = u64::from(segment) << 4;
            }
        }
        EntryMode::Pvh { .. } => {
            load_boot_gdt(sregs, 4);
            sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_ET) & !X86_CR0_PG;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Long { .. } => {
            load_boot_gdt(sregs, 2);
            sregs.idt.base = layout::IDT_ADDR;
            sregs.idt.limit = 7;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = layout::PML4_ADDR;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
}

/// General registers at entry for vCPU `index`: `rdi` carries the index, `rsp` a private
/// stack, `rsi` the zero page (Linux protocol; harmless for other images).
pub fn entry_regs(mode: EntryMode, index: usize) -> kvm_regs {
    let stack = layout::BARE_STACK_TOP - index as u64 * layout::BARE_STACK_SIZE;
    let mut regs = kvm_regs {
        rflags: 0x2,
        rdi: index as u64,
        ..Default::default()
    };
    match mode {
        EntryMode::Real { .. } => {
            regs.rip = 0;
            // The stack shares the image's 64 KiB segment; it grows down from its top.
            regs.rsp = 0xfff0;
        }
        EntryMode::Long { rip } => {
            regs.rip = rip;
            regs.rsp = stack;
            regs.rsi = layout::ZERO_PAGE_ADDR;
        }
        EntryMode::Pvh { eip } => {
            regs.rip = eip;
            regs.rbx = layout::PVH_INFO_ADDR;
        }
    }
    regs
}

/// Puts vCPU `index` into `mode`.
pub fn apply(vcpu: &VcpuFd, index: usize, mode: EntryMode) -> Result<(), Error> {
    let ioctl = super::vcpu_ioctl(index);
    let mut sregs = vcpu.get_sregs().map_err(ioctl("read special registers"))?;
    set_sregs(&mut sregs, mode);
    vcpu.set_sregs(&sregs)
        .map_err(ioctl("set special registers"))?;
    vcpu.set_regs(&entry_regs(mode, index))
        .map_err(ioctl("set general registers"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        assert_eq!(BOOT_GDT[2], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.type_, cs.present),
            (BOOT_CS, 1, 0, 0xb, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff, "4 GiB: granularity applied");
        let ds = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!((ds.selector, ds.db, ds.type_), (BOOT_DS, 1, 0x3));
    }

    #[test]
    fn long_mode_sregs_enable_paging() {
        let mut s = kvm_sregs::default();
        set_sregs(&mut s, EntryMode::Long { rip: 0x100000 });
        assert_eq!(s.cr3, layout::PML4_ADDR);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.efer & EFER_LMA, 0);
    }

    #[test]
    fn pvh_entry_is_flat_protected_mode_without_paging() {
        let mut s = kvm_sregs {
            cr0: X86_CR0_PG,
            efer: EFER_LME,
            ..Default::default()
        };
        set_sregs(&mut s, EntryMode::Pvh { eip: 0x100_0000 });
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!((s.efer, s.cr4), (0, 0));
        assert_eq!(
            (s.cs.selector, s.cs.db, s.cs.l, s.cs.limit),
            (0x20, 1, 0, 0xffff_ffff)
        );
        let r = entry_regs(EntryMode::Pvh { eip: 0x100_0000 }, 0);
        assert_eq!((r.rip, r.rbx), (0x100_0000, layout::PVH_INFO_ADDR));
    }

    #[test]
    fn real_mode_segments_point_at_image() {
        let mut s = kvm_sregs::default();
        set_sregs(&mut s, EntryMode::Real { segment: 0x1000 });
        assert_eq!(
            (s.cs.selector, s.cs.base, s.ss.base),
            (0x1000, 0x10000, 0x10000)
        );
        let r = entry_regs(EntryMode::Real { segment: 0x1000 }, 1);
        assert_eq!((r.rip, r.rdi), (0, 1));
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = crate::memory::create(4 << 20).unwrap();
        write_long_mode_tables(&mem).unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress(layout::PD_ADDR + 8 * 511))
            .unwrap();
        assert_eq!(pde, (511 << 21) | 0x83);
    }

    #[test]
    fn stacks_are_distinct_per_vcpu() {
        let a = entry_regs(EntryMode::Long { rip: 1 }, 0);
        let b = entry_regs(EntryMode::Long { rip: 1 }, 1);
        assert_ne!(a.rsp, b.rsp);
        assert_eq!(b.rdi, 1);
    }
}
