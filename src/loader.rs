//! Guest image loading. The format is detected from the file's contents:
//!
//! * ELF64 x86-64 (`\x7fELF`): segments loaded at their physical addresses (>= 1 MiB)
//!   by linux-loader; vCPUs enter at `e_entry` in 64-bit long mode.
//! * anything else: a flat binary loaded at 0x10000 and entered in real mode at
//!   CS=0x1000, IP=0 (kvmtool's convention for non-Linux images).

use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout;
use crate::arch::x86_64::regs::EntryMode;
use crate::memory::GuestMemory;

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
}

/// What was loaded and how the vCPUs enter it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedImage {
    pub format: ImageFormat,
    pub entry: EntryMode,
    /// First guest-physical byte after the image.
    pub end: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Flat,
    Elf64,
}

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
    Ok(ImageFormat::Flat)
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
        .take(64)
        .read_to_end(&mut head)
        .map_err(read_err)?;
    let mem_size = ram_size(mem);
    match detect(path, &head)? {
        ImageFormat::Flat => load_flat(path, &mut file, size, mem),
        ImageFormat::Elf64 => {
            if size > mem_size {
                return Err(Error::TooLarge {
                    path: path.into(),
                    size,
                    mem: mem_size,
                    load: layout::HIGH_MEMORY_START,
                });
            }
            load_elf(path, &mut file, mem)
        }
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
    Ok(LoadedImage {
        format: ImageFormat::Elf64,
        entry: EntryMode::Long { rip: entry },
        end: res.kernel_end,
    })
}

/// Total bytes of guest RAM.
pub fn ram_size(mem: &GuestMemory) -> u64 {
    mem.iter().map(|r| r.len()).sum()
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
