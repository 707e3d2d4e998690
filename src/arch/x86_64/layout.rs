//! Guest physical address map. Everything Ferrite places in guest memory has its
//! address here, so nothing overlaps by accident.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)          0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH start info, module list, memory map
//! 0x0000_7000  boot_params (zero page)  0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD
//! 0x0001_0000  flat binary load address (real mode CS=0x1000, IP=0)
//! 0x0002_0000  kernel command line (up to 64 KiB)
//! 0x0002_0000 .. 0x0008_0000  bare machine: vCPU stacks, 4 KiB each, growing down
//!              from 0x80000 (vCPU i's stack top is 0x80000 - i * 4 KiB)
//! 0x0009_fc00 .. 0x0010_0000  reserved in the E820 map (EBDA, VGA, BIOS area)
//! 0x000e_0000  ACPI tables (RSDP first, where Linux also scans for it)
//! 0x000f_0000  MP table (floating pointer first) for kernels without ACPI
//! 0x0010_0000  ELF / kernel load area starts (1 MiB)
//! initrd       top of low RAM, below the kernel's initrd_addr_max
//! 0xc000_0000 .. 0x1_0000_0000  32-bit MMIO hole (no RAM)
//! 0x1_0000_0000  RAM above 3 GiB continues here
//! ```

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// PVH: hvm_start_info, its module list and memory map (0x6000..0x7000).
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x6080;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const FLAT_LOAD_ADDR: u64 = 0x1_0000;
pub const BARE_STACK_TOP: u64 = 0x8_0000;
pub const BARE_STACK_SIZE: u64 = 0x1000;
/// Bottom of the bare-machine stack region: above the boot page tables and the flat
/// load address's first 64 KiB, so no stack can overlap them.
pub const BARE_STACKS_BOTTOM: u64 = 0x2_0000;
/// vCPUs a bare image can have: one stack each in the region.
pub const BARE_MAX_VCPUS: usize =
    ((BARE_STACK_TOP - BARE_STACKS_BOTTOM) / BARE_STACK_SIZE) as usize;
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 0x1_0000;
pub const EBDA_START: u64 = 0x9_fc00;
pub const ACPI_START: u64 = 0xe_0000;
/// MP floating pointer and table (BIOS area, where kernels scan for `_MP_`).
pub const MPTABLE_START: u64 = 0xf_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// KVM's TSS (3 pages) and identity-map page, inside the MMIO hole.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// virtio-mmio register windows, 4 KiB each, from here (inside the 32-bit MMIO hole).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The GSIs virtio-mmio devices get, in order: ISA IRQs nothing else on the PC uses
/// (4 is COM1, 8 the RTC, 9 the ACPI SCI).
/// Beyond eight devices they share these GSIs in turn: Linux's virtio-mmio driver
/// takes its interrupt as shared and reads the device's interrupt status first.
pub const VIRTIO_IRQS: [u32; 8] = [5, 6, 7, 10, 11, 12, 14, 15];
/// Most virtio-mmio devices on the PC machine (their windows end well inside the hole).
pub const VIRTIO_MAX_DEVICES: usize = 32;
/// Most vCPUs the PC machine describes (xAPIC IDs 0..=253 in the MADT and MP table;
/// 0xff is the broadcast ID).
pub const PC_MAX_VCPUS: usize = 254;
/// Bytes identity-mapped by the boot page tables (512 x 2 MiB pages).
pub const IDENTITY_MAPPED: u64 = 1 << 30;

// Checked at compile time: no bare-machine stack can overlap the boot page tables, the
// first 64 KiB of a flat image, or the EBDA, for any allowed vCPU count.
const _: () = {
    assert!(BARE_STACK_TOP - BARE_MAX_VCPUS as u64 * BARE_STACK_SIZE >= BARE_STACKS_BOTTOM);
    assert!(BARE_STACKS_BOTTOM >= PD_ADDR + 0x1000);
    assert!(BARE_STACKS_BOTTOM >= FLAT_LOAD_ADDR + 0x1_0000);
    assert!(BARE_STACK_TOP <= EBDA_START);
};

/// End of the RAM below the MMIO hole for `size` bytes of guest memory.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

/// RAM ranges `(start, len)` for `size` bytes of guest memory, split around the MMIO hole.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = low_ram_end(size);
    let mut ranges = vec![(0, low)];
    if size > low {
        ranges.push((MMIO_HOLE_END, size - low));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(16 << 20), vec![(0, 16 << 20)]);
        assert_eq!(ram_ranges(MMIO_HOLE_START), vec![(0, MMIO_HOLE_START)]);
    }

    #[test]
    fn large_guest_skips_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, 1 << 30)]);
        let total: u64 = r.iter().map(|(_, l)| l).sum();
        assert_eq!(total, 4 << 30);
    }
}
