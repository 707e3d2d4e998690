//! The PVH boot protocol, used for an ELF vmlinux that carries the PVH entry note:
//! the vCPU starts in 32-bit protected mode (paging off) at the note's entry with
//! `ebx` pointing at an `hvm_start_info` (command line, initrd as module 0, RSDP, and
//! the memory map). Written with linux-loader's PVH configurator.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

use super::layout;
use super::linux::{e820_map, Initrd};
use crate::memory::GuestMemory;

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write the PVH start info: {0}")]
    Write(String),
}

/// The start info and its tables, ready to write.
pub fn boot_params(initrd: Option<Initrd>, mem_size: u64, rsdp: u64) -> BootParams {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem_size)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|i| hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            layout::PVH_MODLIST_ADDR
        },
        cmdline_paddr: layout::CMDLINE_ADDR,
        rsdp_paddr: rsdp,
        memmap_paddr: layout::PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(layout::PVH_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(layout::PVH_MODLIST_ADDR));
    }
    params
}

/// Writes the start info, memory map and module list.
pub fn write(
    mem: &GuestMemory,
    initrd: Option<Initrd>,
    mem_size: u64,
    rsdp: u64,
) -> Result<(), Error> {
    let params = boot_params(initrd, mem_size, rsdp);
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)
        .map_err(|e| Error::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn start_info_points_at_tables() {
        let mem = crate::memory::create(64 << 20).unwrap();
        let initrd = Initrd {
            addr: 0x300_0000,
            size: 0x2000,
        };
        write(&mem, Some(initrd), 64 << 20, layout::ACPI_START).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.rsdp_paddr, layout::ACPI_START);
        assert_eq!(info.memmap_entries, 3);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x300_0000, 0x2000));
        let e: hvm_memmap_table_entry = mem.read_obj(GuestAddress(info.memmap_paddr)).unwrap();
        assert_eq!((e.addr, e.type_), (0, 1));
    }
}
