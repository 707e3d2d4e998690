//! Guest image loading. The format is detected from the file's contents:
//!
//! * Linux bzImage (`HdrS` at 0x202): the protected-mode kernel is loaded at 1 MiB by
//!   linux-loader and entered through the 64-bit boot protocol (`startup_64`, +0x200).
//! * ELF64 x86-64 (`\x7fELF`): segments loaded at their physical addresses (>= 1 MiB)
//!   by linux-loader; vCPUs enter at `e_entry` in 64-bit long mode. An ELF carrying a
//!   `Linux` or `Xen` ELF note is a vmlinux and gets the Linux boot protocol too.
//! * anything else: a flat binary loaded at 0x10000 and entered in real mode at
//!   CS=0x1000, IP=0 (kvmtool's convention for non-Linux images).
//!
//! Linux images boot on the full PC machine (irqchip, PIT, ACPI, zero page); the
//! others are "bare" test programs: no interrupt controller, every vCPU starts at the
//! entry point, and HLT stops a vCPU.

use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::ByteValued;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::arch::x86_64::layout;
use crate::arch::x86_64::regs::EntryMode;
use crate::memory::{ram_size, GuestMemory};

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open kernel image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read kernel image {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel image {path} is empty")]
    Empty { path: PathBuf },
    #[error("kernel image {path} ({size} bytes) does not fit in guest memory ({mem} bytes at {load:#x})")]
    TooLarge {
        path: PathBuf,
        size: u64,
        mem: u64,
        load: u64,
    },
    #[error("kernel image {path} is an ELF file but not a 64-bit x86-64 one ({what})")]
    WrongElf { path: PathBuf, what: String },
    #[error("kernel image {path} is not a loadable ELF file: {reason:?}")]
    BadElf {
        path: PathBuf,
        reason: linux_loader::loader::Error,
    },
    #[error("kernel image {path}: entry point {entry:#x} is outside the identity-mapped first GiB of guest RAM")]
    EntryOutOfRange { path: PathBuf, entry: u64 },
    #[error("kernel image {path} uses boot protocol {major}.{minor:02}; Ferrite needs 2.12 or newer (a 64-bit kernel)")]
    OldBootProtocol {
        path: PathBuf,
        major: u16,
        minor: u16,
    },
    #[error("kernel image {path} is a 32-bit-only bzImage (no 64-bit entry point)")]
    Not64Bit { path: PathBuf },
    #[error("kernel image {path} is not a loadable bzImage: {reason:?}")]
    BadBzImage {
        path: PathBuf,
        reason: linux_loader::loader::Error,
    },
    #[error("kernel image {path} needs {need} bytes of RAM from {start:#x} to decompress; guest has {have}")]
    KernelTooBig {
        path: PathBuf,
        need: u64,
        start: u64,
        have: u64,
    },
}

/// What was loaded and how the vCPUs enter it.
#[derive(Debug, Clone)]
pub struct LoadedImage {
    pub format: ImageFormat,
    pub entry: EntryMode,
    /// First guest-physical byte after the image.
    pub end: u64,
    /// Set for Linux kernels: the boot protocol applies. Holds the image's setup
    /// header for a bzImage, `None` for a vmlinux.
    pub linux: Option<Option<setup_header>>,
}

impl LoadedImage {
    pub fn is_linux(&self) -> bool {
        self.linux.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Flat,
    Elf64,
    BzImage,
}

const HDRS_OFFSET: usize = 0x202;
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
const XLF_KERNEL_64: u16 = 1;
/// The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;
const PT_NOTE: u32 = 4;

/// Looks at the first bytes of an image and names its format; validates what the
/// header can tell on its own.
pub fn detect(path: &Path, head: &[u8]) -> Result<ImageFormat, Error> {
    if head.is_empty() {
        return Err(Error::Empty { path: path.into() });
    }
    if head.starts_with(ELF_MAGIC) {
        let wrong = |what: String| Error::WrongElf {
            path: path.into(),
            what,
        };
        if head.len() < 20 {
            return Err(wrong(format!("header truncated at {} bytes", head.len())));
        }
        if head[4] != ELFCLASS64 {
            return Err(wrong(format!("ELF class {}", head[4])));
        }
        let machine = u16::from_le_bytes([head[18], head[19]]);
        if machine != EM_X86_64 {
            return Err(wrong(format!("machine {machine}")));
        }
        return Ok(ImageFormat::Elf64);
    }
    if head.get(HDRS_OFFSET..HDRS_OFFSET + 4) == Some(b"HdrS") {
        return Ok(ImageFormat::BzImage);
    }
    Ok(ImageFormat::Flat)
}

/// Opens the image and checks what its header alone can tell (readable, not empty,
/// a supported format), without guest memory.
pub fn probe(path: &Path) -> Result<ImageFormat, Error> {
    let mut file = File::open(path).map_err(|source| Error::Open {
        path: path.into(),
        source,
    })?;
    let mut head = Vec::with_capacity(1024);
    (&mut file)
        .take(1024)
        .read_to_end(&mut head)
        .map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?;
    detect(path, &head)
}

/// Loads the image at `path` into `mem`.
pub fn load(path: &Path, mem: &GuestMemory) -> Result<LoadedImage, Error> {
    let read_err = |source| Error::Read {
        path: path.into(),
        source,
    };
    let mut file = File::open(path).map_err(|source| Error::Open {
        path: path.into(),
        source,
    })?;
    let size = file.metadata().map_err(read_err)?.len();
    let mut head = Vec::with_capacity(64);
    (&mut file)
        .take(1024)
        .read_to_end(&mut head)
        .map_err(read_err)?;
    let mem_size = ram_size(mem);
    match detect(path, &head)? {
        ImageFormat::Flat => load_flat(path, &mut file, size, mem),
        ImageFormat::Elf64 | ImageFormat::BzImage if size > mem_size => Err(Error::TooLarge {
            path: path.into(),
            size,
            mem: mem_size,
            load: layout::HIGH_MEMORY_START,
        }),
        ImageFormat::Elf64 => load_elf(path, &mut file, mem),
        ImageFormat::BzImage => load_bzimage(path, &mut file, mem),
    }
}

fn load_flat(
    path: &Path,
    file: &mut File,
    size: u64,
    mem: &GuestMemory,
) -> Result<LoadedImage, Error> {
    let load = layout::FLAT_LOAD_ADDR;
    let low_ram = layout::ram_ranges(ram_size(mem))[0].1;
    let end = load.checked_add(size).filter(|&e| e <= low_ram);
    let Some(end) = end else {
        return Err(Error::TooLarge {
            path: path.into(),
            size,
            mem: low_ram,
            load,
        });
    };
    file.rewind()
        .and_then(|_| {
            mem.read_exact_volatile_from(GuestAddress(load), file, size as usize)
                .map_err(std::io::Error::other)
        })
        .map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?;
    Ok(LoadedImage {
        format: ImageFormat::Flat,
        entry: EntryMode::Real {
            segment: (load >> 4) as u16,
        },
        end,
        linux: None,
    })
}

fn load_elf(path: &Path, file: &mut File, mem: &GuestMemory) -> Result<LoadedImage, Error> {
    let res = Elf::load(
        mem,
        None,
        file,
        Some(GuestAddress(layout::HIGH_MEMORY_START)),
    )
    .map_err(|reason| Error::BadElf {
        path: path.into(),
        reason,
    })?;
    let entry = res.kernel_load.0;
    if entry >= layout::IDENTITY_MAPPED || !mem.address_in_range(GuestAddress(entry)) {
        return Err(Error::EntryOutOfRange {
            path: path.into(),
            entry,
        });
    }
    let pvh = match res.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
        _ => None,
    };
    let is_linux = pvh.is_some()
        || elf_has_linux_note(file).map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?;
    Ok(LoadedImage {
        format: ImageFormat::Elf64,
        // A vmlinux with the PVH note is entered through it (32-bit, start info).
        entry: match pvh {
            Some(eip) => EntryMode::Pvh { eip },
            None => EntryMode::Long { rip: entry },
        },
        end: res.kernel_end,
        linux: is_linux.then_some(None),
    })
}

fn load_bzimage(path: &Path, file: &mut File, mem: &GuestMemory) -> Result<LoadedImage, Error> {
    let read_err = |source| Error::Read {
        path: path.into(),
        source,
    };
    let mut hdr = setup_header::default();
    file.seek(std::io::SeekFrom::Start(SETUP_HEADER_OFFSET))
        .map_err(read_err)?;
    file.read_exact(hdr.as_mut_slice()).map_err(read_err)?;
    let version = hdr.version;
    if version < 0x020c {
        return Err(Error::OldBootProtocol {
            path: path.into(),
            major: version >> 8,
            minor: version & 0xff,
        });
    }
    let xloadflags = hdr.xloadflags;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::Not64Bit { path: path.into() });
    }
    // The kernel decompresses itself in place: it needs init_size bytes from the
    // larger of its load and preferred addresses.
    let start = layout::HIGH_MEMORY_START.max(hdr.pref_address);
    let need = u64::from(hdr.init_size);
    let have = ram_size(mem);
    if start.saturating_add(need) > layout::ram_ranges(have)[0].1 {
        return Err(Error::KernelTooBig {
            path: path.into(),
            need,
            start,
            have,
        });
    }
    let res = BzImage::load(
        mem,
        None,
        file,
        Some(GuestAddress(layout::HIGH_MEMORY_START)),
    )
    .map_err(|reason| Error::BadBzImage {
        path: path.into(),
        reason,
    })?;
    Ok(LoadedImage {
        format: ImageFormat::BzImage,
        entry: EntryMode::Long {
            rip: res.kernel_load.0 + STARTUP_64_OFFSET,
        },
        end: res.kernel_end,
        linux: Some(res.setup_header),
    })
}

/// True when the ELF's notes name it a Linux kernel (an ELF note owned by "Linux",
/// or the "Xen" notes a PVH-capable vmlinux carries).
fn elf_has_linux_note(file: &mut File) -> std::io::Result<bool> {
    let mut ehdr = [0u8; 64];
    file.rewind()?;
    file.read_exact(&mut ehdr)?;
    let phoff = u64::from_le_bytes(ehdr[0x20..0x28].try_into().unwrap_or_default());
    let phentsize = u64::from(u16::from_le_bytes([ehdr[0x36], ehdr[0x37]]));
    let phnum = u64::from(u16::from_le_bytes([ehdr[0x38], ehdr[0x39]]));
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        file.seek(std::io::SeekFrom::Start(
            phoff.saturating_add(i * phentsize),
        ))?;
        file.read_exact(&mut ph)?;
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) != PT_NOTE {
            continue;
        }
        let offset = u64::from_le_bytes(ph[8..16].try_into().unwrap_or_default());
        let filesz = u64::from_le_bytes(ph[32..40].try_into().unwrap_or_default()).min(1 << 16);
        let mut notes = vec![0u8; filesz as usize];
        file.seek(std::io::SeekFrom::Start(offset))?;
        file.read_exact(&mut notes)?;
        if notes_name_linux(&notes) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Walks an ELF note segment looking for an owner named "Linux" or "Xen".
fn notes_name_linux(mut notes: &[u8]) -> bool {
    let align4 = |n: usize| n.div_ceil(4) * 4;
    while notes.len() >= 12 {
        let word = |o: usize| {
            u32::from_le_bytes([notes[o], notes[o + 1], notes[o + 2], notes[o + 3]]) as usize
        };
        let (namesz, descsz) = (word(0), word(4));
        let name_end = 12usize.saturating_add(namesz);
        let Some(name) = notes.get(12..name_end) else {
            return false;
        };
        let name = name.strip_suffix(&[0]).unwrap_or(name);
        if name == b"Linux" || name == b"Xen" {
            return true;
        }
        let next = 12usize
            .saturating_add(align4(namesz))
            .saturating_add(align4(descsz));
        let Some(rest) = notes.get(next..) else {
            return false;
        };
        notes = rest;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ferrite-loader-{}-{name}", std::process::id()));
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn detects_formats() {
        let p = Path::new("k");
        assert!(matches!(detect(p, b""), Err(Error::Empty { .. })));
        assert_eq!(detect(p, b"\xeb\xfe").unwrap(), ImageFormat::Flat);
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(ELF_MAGIC);
        elf[4] = 1;
        assert!(matches!(detect(p, &elf), Err(Error::WrongElf { .. })));
        elf[4] = 2;
        elf[18] = 3; // EM_386
        assert!(matches!(detect(p, &elf), Err(Error::WrongElf { .. })));
        elf[18] = 62;
        assert_eq!(detect(p, &elf).unwrap(), ImageFormat::Elf64);
        assert!(matches!(detect(p, &elf[..10]), Err(Error::WrongElf { .. })));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect(p, &bz).unwrap(), ImageFormat::BzImage);
    }

    #[test]
    fn linux_notes_are_recognised() {
        let note = |name: &[u8], desc: usize| {
            let mut n = Vec::new();
            n.extend_from_slice(&(name.len() as u32).to_le_bytes());
            n.extend_from_slice(&(desc as u32).to_le_bytes());
            n.extend_from_slice(&1u32.to_le_bytes());
            n.extend_from_slice(name);
            n.resize(n.len().div_ceil(4) * 4 + desc.div_ceil(4) * 4, 0);
            n
        };
        let mut notes = note(b"GNU\0", 20);
        assert!(!notes_name_linux(&notes));
        notes.extend(note(b"Linux\0", 4));
        assert!(notes_name_linux(&notes));
        assert!(notes_name_linux(&note(b"Xen\0", 8)));
        // Truncated and hostile sizes end the walk without panicking.
        let mut bad = note(b"GNU\0", 4);
        bad[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!notes_name_linux(&bad));
        assert!(!notes_name_linux(&notes[..7]));
    }

    #[test]
    fn bzimage_header_checks() {
        let mem = crate::memory::create(64 << 20).unwrap();
        let mut bz = vec![0u8; 0x1000];
        bz[0x1f1] = 1; // setup_sects
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
        let p = tmp("old-bz", &bz);
        assert!(matches!(load(&p, &mem), Err(Error::OldBootProtocol { .. })));
        bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        let p = tmp("bz32", &bz);
        assert!(matches!(load(&p, &mem), Err(Error::Not64Bit { .. })));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn flat_image_lands_at_0x10000() {
        let mem = crate::memory::create(1 << 20).unwrap();
        let p = tmp("flat", &[0xf4, 0x90]);
        let img = load(&p, &mem).unwrap();
        assert_eq!(img.entry, EntryMode::Real { segment: 0x1000 });
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x10000)).unwrap(), 0x90f4);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn oversized_and_missing_images_are_errors() {
        let mem = crate::memory::create(1 << 20).unwrap();
        let p = tmp("big", &vec![0x90; 1 << 20]);
        assert!(matches!(load(&p, &mem), Err(Error::TooLarge { .. })));
        std::fs::remove_file(&p).unwrap();
        assert!(matches!(load(&p, &mem), Err(Error::Open { .. })));
    }

    #[test]
    fn truncated_elf_is_an_error() {
        let mem = crate::memory::create(4 << 20).unwrap();
        let mut elf = vec![0u8; 40];
        elf[..4].copy_from_slice(ELF_MAGIC);
        elf[4] = 2;
        elf[5] = 1;
        elf[18] = 62;
        let p = tmp("trunc", &elf);
        let err = load(&p, &mem).unwrap_err();
        assert!(matches!(err, Error::BadElf { .. }), "{err}");
        std::fs::remove_file(p).unwrap();
    }
}
