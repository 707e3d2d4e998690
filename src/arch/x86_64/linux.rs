//! The Linux x86 boot protocol: zero page (boot_params) with the image's setup header,
//! the command line, the initrd and the E820 memory map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::layout;
use crate::file::{open_regular, OpenFailure};
use crate::memory::GuestMemory;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
/// Default initrd_addr_max for kernels without a setup header (the protocol's value
/// for versions before 2.03, safe for all).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE: u64 = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitrdTooLarge {
        path: std::path::PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("cannot open initrd {path}")]
    InitrdOpen {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path} is a {kind}, not a regular file")]
    InitrdNotRegular {
        path: std::path::PathBuf,
        kind: &'static str,
    },
    #[error("initrd {path} is empty")]
    InitrdEmpty { path: std::path::PathBuf },
    #[error("cannot read initrd {path}")]
    InitrdRead {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write boot {what} to guest memory at {addr:#x}")]
    Write {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// A loaded initrd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initrd {
    pub addr: u64,
    pub size: u64,
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as possible below both
/// the kernel's limit and the end of low RAM, and above the kernel.
pub fn initrd_placement(
    size: u64,
    kernel_end: u64,
    low_ram_end: u64,
    addr_max: u64,
) -> Option<u64> {
    let limit = low_ram_end.min(addr_max.saturating_add(1));
    let addr = limit.checked_sub(size)? & !(PAGE - 1);
    (addr >= kernel_end.next_multiple_of(PAGE)).then_some(addr)
}

/// The kernel's initrd_addr_max (from its setup header when it has one).
pub fn initrd_addr_max(hdr: Option<&setup_header>) -> u64 {
    match hdr {
        Some(h) if h.version >= 0x0203 && h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        _ => DEFAULT_INITRD_ADDR_MAX,
    }
}

/// Opens the initrd: a non-empty regular file (opened with `O_NONBLOCK`, type checked
/// on the opened file). Returns it with its size.
fn open_initrd(path: &std::path::Path) -> Result<(std::fs::File, u64), Error> {
    let (file, size) = open_regular(path).map_err(|e| match e {
        OpenFailure::Io(source) => Error::InitrdOpen {
            path: path.into(),
            source,
        },
        OpenFailure::NotRegular(kind) => Error::InitrdNotRegular {
            path: path.into(),
            kind,
        },
    })?;
    if size == 0 {
        return Err(Error::InitrdEmpty { path: path.into() });
    }
    Ok((file, size))
}

/// Checks the initrd before any VM exists: it must be a readable, non-empty regular
/// file. Returns its size. [`load_initrd`] makes the same checks.
pub fn probe_initrd(path: &std::path::Path) -> Result<u64, Error> {
    open_initrd(path).map(|(_, size)| size)
}

/// Copies the initrd file into guest memory.
pub fn load_initrd(
    path: &std::path::Path,
    mem: &GuestMemory,
    kernel_end: u64,
    hdr: Option<&setup_header>,
) -> Result<Initrd, Error> {
    let (mut file, size) = open_initrd(path)?;
    let low_end = super::layout::low_ram_end(crate::memory::ram_size(mem));
    let max = initrd_addr_max(hdr);
    let addr = initrd_placement(size, kernel_end, low_end, max).ok_or(Error::InitrdTooLarge {
        path: path.into(),
        size,
        kernel_end,
        limit: low_end.min(max.saturating_add(1)),
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| Error::InitrdRead {
            path: path.into(),
            source: std::io::Error::other(e),
        })?;
    Ok(Initrd { addr, size })
}

/// The E820 map for `mem_size` bytes of RAM laid out by [`layout::ram_ranges`].
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let ranges = layout::ram_ranges(mem_size);
    let low_end = ranges[0].1;
    let mut map = vec![
        (0, layout::EBDA_START.min(low_end), E820_RAM),
        (
            layout::EBDA_START,
            layout::HIGH_MEMORY_START - layout::EBDA_START,
            E820_RESERVED,
        ),
    ];
    if low_end > layout::HIGH_MEMORY_START {
        map.push((
            layout::HIGH_MEMORY_START,
            low_end - layout::HIGH_MEMORY_START,
            E820_RAM,
        ));
    }
    for &(start, len) in &ranges[1..] {
        map.push((start, len, E820_RAM));
    }
    map
}

/// Inputs for the zero page.
pub struct BootSetup<'a> {
    pub header: Option<&'a setup_header>,
    pub cmdline: &'a str,
    pub initrd: Option<Initrd>,
    pub mem_size: u64,
    pub rsdp: Option<u64>,
}

/// Builds the zero page.
pub fn boot_params(setup: &BootSetup<'_>) -> Result<boot_params, Error> {
    let mut params = boot_params::default();
    if let Some(h) = setup.header {
        params.hdr = *h;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    let max = match setup.header {
        Some(h) if h.version >= 0x0206 && h.cmdline_size != 0 => h.cmdline_size as usize,
        _ => layout::CMDLINE_MAX - 1,
    }
    .min(layout::CMDLINE_MAX - 1);
    if setup.cmdline.contains('\0') {
        return Err(Error::CmdlineNul);
    }
    if setup.cmdline.len() > max {
        return Err(Error::CmdlineTooLong {
            len: setup.cmdline.len(),
            max,
        });
    }
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = setup.cmdline.len() as u32 + 1;
    if let Some(i) = setup.initrd {
        params.hdr.ramdisk_image = i.addr as u32;
        params.hdr.ramdisk_size = i.size as u32;
        params.ext_ramdisk_image = (i.addr >> 32) as u32;
        params.ext_ramdisk_size = (i.size >> 32) as u32;
    }
    if let Some(rsdp) = setup.rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    let map = e820_map(setup.mem_size);
    for (slot, &(addr, size, type_)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    Ok(params)
}

/// Writes the command line and, unless `zero_page` is false (PVH boots), the zero page.
pub fn write_boot_params(
    mem: &GuestMemory,
    setup: &BootSetup<'_>,
    zero_page: bool,
) -> Result<(), Error> {
    let params = boot_params(setup)?;
    let w = |what, addr: u64, e| Error::Write {
        what,
        addr,
        source: e,
    };
    let mut cmdline = setup.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(layout::CMDLINE_ADDR))
        .map_err(|e| w("command line", layout::CMDLINE_ADDR, e))?;
    if zero_page {
        mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_ADDR))
            .map_err(|e| w("zero page", layout::ZERO_PAGE_ADDR, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initrd_goes_high_and_aligned() {
        let a = initrd_placement(0x1234, 0x200_0000, 0x800_0000, DEFAULT_INITRD_ADDR_MAX).unwrap();
        assert_eq!(a % PAGE, 0);
        assert!(a + 0x1234 <= 0x800_0000 && a >= 0x200_0000);
        // Capped by initrd_addr_max.
        let a = initrd_placement(0x1000, 0x100_0000, 0x1_0000_0000, 0x37ff_ffff).unwrap();
        assert_eq!(a, 0x3800_0000 - 0x1000);
        // Does not fit above the kernel.
        assert_eq!(
            initrd_placement(0x700_0000, 0x200_0000, 0x800_0000, u64::MAX),
            None
        );
        assert_eq!(initrd_placement(u64::MAX, 0, 0x800_0000, u64::MAX), None);
    }

    #[test]
    fn e820_has_hole_and_reserved_bios_area() {
        let m = e820_map(4 << 30);
        assert_eq!(m[0], (0, layout::EBDA_START, E820_RAM));
        assert_eq!(m[1].2, E820_RESERVED);
        assert_eq!(
            m[2],
            (
                layout::HIGH_MEMORY_START,
                layout::MMIO_HOLE_START - layout::HIGH_MEMORY_START,
                E820_RAM
            )
        );
        assert_eq!(m[3], (layout::MMIO_HOLE_END, 1 << 30, E820_RAM));
        let ram: u64 = m.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(
            ram,
            (4 << 30) - (layout::HIGH_MEMORY_START - layout::EBDA_START)
        );
    }

    #[test]
    fn zero_page_fields() {
        let setup = BootSetup {
            header: None,
            cmdline: "console=ttyS0",
            initrd: Some(Initrd {
                addr: 0x700_0000,
                size: 0x1000,
            }),
            mem_size: 128 << 20,
            rsdp: Some(layout::ACPI_START),
        };
        let p = boot_params(&setup).unwrap();
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ p.hdr.cmd_line_ptr }, layout::CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.acpi_rsdp_addr }, layout::ACPI_START);
        assert_eq!(p.e820_entries, 3);
    }

    #[test]
    fn long_or_nul_cmdline_is_rejected() {
        let long = "x".repeat(layout::CMDLINE_MAX);
        let mk = |c: &'static str| BootSetup {
            header: None,
            cmdline: c,
            initrd: None,
            mem_size: 1 << 27,
            rsdp: None,
        };
        assert!(matches!(
            boot_params(&mk(Box::leak(long.into_boxed_str()))),
            Err(Error::CmdlineTooLong { .. })
        ));
        assert!(matches!(boot_params(&mk("a\0b")), Err(Error::CmdlineNul)));
    }
}
