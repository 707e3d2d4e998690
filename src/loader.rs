//! Guest image loading. The format is detected from the file's contents:
//!
//! * Linux bzImage (`HdrS` at 0x202): the protected-mode kernel is loaded at 1 MiB by
//!   linux-loader (whatever `code32_start` says) and entered through the 64-bit boot
//!   protocol (`startup_64`, +0x200, which must lie inside it).
//! * ELF64 x86-64 (`\x7fELF`): segments loaded at their physical addresses by
//!   linux-loader, each checked first to lie (with its zero-filled tail) in RAM from
//!   1 MiB; vCPUs enter at `e_entry` in 64-bit long mode. An ELF carrying a
//!   `Linux` or `Xen` ELF note is a vmlinux and gets the Linux boot protocol too.
//! * anything else: a flat binary loaded at 0x10000 and entered in real mode at
//!   CS=0x1000, IP=0 (kvmtool's convention for non-Linux images) -- unless the file is
//!   recognisably something else (text, a script, compressed data, an archive, a boot
//!   sector or a damaged or truncated bzImage), which is refused with what was found.
//!
//! Only regular files are accepted: the image is opened with `O_NONBLOCK` (so a FIFO
//! cannot block the open) and the opened file's type is checked with fstat.
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
use crate::file::{open_regular, OpenFailure};
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
    #[error("kernel image {path} is a {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("kernel image {path} is {what}, not a bootable image")]
    NotAnImage { path: PathBuf, what: String },
    #[error("kernel image {path} looks like a PC boot sector or a bzImage with a damaged header (boot signature 55 aa at 0x1fe but no \"HdrS\" at 0x202)")]
    DamagedBzImage { path: PathBuf },
    #[error(
        "kernel image {path} is a truncated bzImage: {size} bytes, header promises {promised}"
    )]
    TruncatedBzImage {
        path: PathBuf,
        size: u64,
        promised: u64,
    },
    #[error("kernel image {path} ({size} bytes) does not fit in guest memory ({mem} bytes at {load:#x})")]
    TooLarge {
        path: PathBuf,
        size: u64,
        mem: u64,
        load: u64,
    },
    #[error("kernel image {path} is an ELF file but not a 64-bit x86-64 one ({what})")]
    WrongElf { path: PathBuf, what: String },
    #[error("kernel image {path} is not a loadable ELF file: {}", loader_reason(.reason))]
    BadElf {
        path: PathBuf,
        reason: linux_loader::loader::Error,
    },
    #[error("kernel image {path} has a segment at {addr:#x} of {size:#x} bytes in memory, outside guest RAM from {:#x} to {ram_end:#x}", layout::HIGH_MEMORY_START)]
    SegmentOutsideRam {
        path: PathBuf,
        addr: u64,
        size: u64,
        ram_end: u64,
    },
    #[error("kernel image {path}: entry point {entry:#x} is outside the identity-mapped first GiB of guest RAM")]
    EntryOutOfRange { path: PathBuf, entry: u64 },
    #[error("kernel image {path}: its PVH entry point {eip:#x} (Xen's PHYS32_ENTRY note) is outside guest RAM from {:#x}", layout::HIGH_MEMORY_START)]
    PvhEntryOutOfRange { path: PathBuf, eip: u64 },
    #[error("kernel image {path} uses boot protocol {major}.{minor:02}; Ferrite needs 2.12 or newer (a 64-bit kernel)")]
    OldBootProtocol {
        path: PathBuf,
        major: u16,
        minor: u16,
    },
    #[error("kernel image {path} is a 32-bit-only bzImage (no 64-bit entry point)")]
    Not64Bit { path: PathBuf },
    #[error("kernel image {path} is a bzImage whose protected-mode kernel ({size} bytes) ends before its 64-bit entry point at +0x200")]
    NoEntryInKernel { path: PathBuf, size: u64 },
    #[error("kernel image {path} is not a loadable bzImage: {}", loader_reason(.reason))]
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
    /// Set for Linux kernels: the Linux boot protocol applies.
    pub linux: Option<LinuxKernel>,
}

/// What kind of Linux kernel an image is.
#[derive(Debug, Clone, Copy)]
pub enum LinuxKernel {
    /// A bzImage: its setup header goes into the zero page.
    BzImage(setup_header),
    /// An ELF vmlinux (64-bit boot protocol, or PVH when it carries the note).
    Vmlinux,
}

impl LinuxKernel {
    /// The bzImage's setup header (a vmlinux has none).
    pub fn setup_header(&self) -> Option<&setup_header> {
        match self {
            LinuxKernel::BzImage(h) => Some(h),
            LinuxKernel::Vmlinux => None,
        }
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
/// Setup header fields read before linux-loader sees the image (offsets in the file).
const SETUP_SECTS_OFFSET: usize = 0x1f1;
const SYSSIZE_OFFSET: usize = 0x1f4;
const BOOT_SIGNATURE_OFFSET: usize = 0x1fe;
const VERSION_OFFSET: usize = 0x206;
const XLF_KERNEL_64: u16 = 1;
/// The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;
const PT_NOTE: u32 = 4;
const PT_LOAD: u32 = 1;
/// How much of an image [`detect`] looks at.
const HEAD_LEN: usize = 1024;

/// Magic numbers of files that are recognisably not a bootable image.
const FOREIGN_MAGICS: &[(&[u8], &str)] = &[
    // ID1 ID2 and CM=8 (deflate, the only method gzip defines).
    (b"\x1f\x8b\x08", "gzip-compressed data"),
    (b"\xfd7zXZ\x00", "xz-compressed data"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data"),
    (b"PK\x03\x04", "a zip archive"),
    (b"!<arch>\ndebian-binary", "an ar archive (a .deb package)"),
    (b"!<arch>\n", "an ar archive"),
];

/// Looks at the first bytes of an image (up to 1 KiB) and names its format; validates
/// what the header can tell on its own. Anything not recognised is a flat binary.
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
    let not_image = |what: String| Error::NotAnImage {
        path: path.into(),
        what,
    };
    if let Some((_, what)) = FOREIGN_MAGICS.iter().find(|(m, _)| head.starts_with(m)) {
        return Err(not_image((*what).to_string()));
    }
    if let [b'B', b'Z', b'h', b'1'..=b'9', ..] = head {
        return Err(not_image("bzip2-compressed data".to_string()));
    }
    if head.starts_with(b"#!") {
        return Err(not_image(match text_prefix(head) {
            Some(text) => format!("a script ({})", first_line(text)),
            None => "a script".to_string(),
        }));
    }
    if head.get(BOOT_SIGNATURE_OFFSET..BOOT_SIGNATURE_OFFSET + 2) == Some(&[0x55, 0xaa]) {
        return Err(Error::DamagedBzImage { path: path.into() });
    }
    if let Some(text) = text_prefix(head) {
        return Err(not_image(format!(
            "a text file (it begins \"{}\")",
            first_line(text)
        )));
    }
    Ok(ImageFormat::Flat)
}

/// `head` as text when it is valid UTF-8 without control characters other than tab,
/// newline, carriage return and form feed. A multi-byte character cut off by the end
/// of a full-length head does not count against it.
fn text_prefix(head: &[u8]) -> Option<&str> {
    let text = match std::str::from_utf8(head) {
        Ok(t) => t,
        Err(e) if e.error_len().is_none() && head.len() >= HEAD_LEN => {
            std::str::from_utf8(&head[..e.valid_up_to()]).ok()?
        }
        Err(_) => return None,
    };
    let is_text = !text.is_empty()
        && text
            .chars()
            .all(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r' | '\x0c'));
    is_text.then_some(text)
}

/// The first line of `text`, at most 40 characters, escaped to stay on one line.
fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    let mut out: String = line.chars().take(40).flat_map(char::escape_debug).collect();
    if line.chars().nth(40).is_some() {
        out.push_str("...");
    }
    out
}

/// Refuses a bzImage shorter than its setup header says: setup sectors (0 means 4)
/// plus the boot sector, then `syssize` 16-byte paragraphs of protected-mode kernel.
fn check_bzimage_size(path: &Path, head: &[u8], size: u64) -> Result<(), Error> {
    let byte = |o: usize| head.get(o).copied().unwrap_or(0);
    let setup_sects = match byte(SETUP_SECTS_OFFSET) {
        0 => 4,
        n => u64::from(n),
    };
    let mut syssize = u32::from_le_bytes([
        byte(SYSSIZE_OFFSET),
        byte(SYSSIZE_OFFSET + 1),
        byte(SYSSIZE_OFFSET + 2),
        byte(SYSSIZE_OFFSET + 3),
    ]);
    // Before boot protocol 2.04 only the low 16 bits of syssize are defined.
    if u16::from_le_bytes([byte(VERSION_OFFSET), byte(VERSION_OFFSET + 1)]) < 0x0204 {
        syssize &= 0xffff;
    }
    let promised = (setup_sects + 1) * 512 + u64::from(syssize) * 16;
    if size < promised {
        return Err(Error::TruncatedBzImage {
            path: path.into(),
            size,
            promised,
        });
    }
    Ok(())
}

/// Opens the image and checks what its first bytes and its size tell: the one checked
/// open shared by [`probe`] and [`load`]. Returns the file, its size and its format.
fn open_image(path: &Path) -> Result<(File, u64, ImageFormat), Error> {
    let (mut file, size) = open_regular(path).map_err(|e| match e {
        OpenFailure::Io(source) => Error::Open {
            path: path.into(),
            source,
        },
        OpenFailure::NotRegular(kind) => Error::NotRegular {
            path: path.into(),
            kind,
        },
    })?;
    let mut head = Vec::with_capacity(HEAD_LEN);
    (&mut file)
        .take(HEAD_LEN as u64)
        .read_to_end(&mut head)
        .map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?;
    let format = detect(path, &head)?;
    if format == ImageFormat::BzImage {
        check_bzimage_size(path, &head, size)?;
    }
    Ok((file, size, format))
}

/// Opens the image and checks what its header alone can tell (a readable regular
/// file, not empty, a supported format, not truncated), without guest memory.
pub fn probe(path: &Path) -> Result<ImageFormat, Error> {
    open_image(path).map(|(_, _, format)| format)
}

/// Loads the image at `path` into `mem`.
pub fn load(path: &Path, mem: &GuestMemory) -> Result<LoadedImage, Error> {
    let (mut file, size, format) = open_image(path)?;
    let mem_size = ram_size(mem);
    match format {
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

/// linux-loader's reason in words (its own Display repeats "Kernel Loader:" prefixes).
fn loader_reason(e: &linux_loader::loader::Error) -> &'static str {
    use linux_loader::loader::bzimage::Error as Bz;
    use linux_loader::loader::elf::Error as Elf;
    use linux_loader::loader::Error as L;
    match e {
        L::Bzimage(Bz::InvalidBzImage) => {
            "invalid setup header (boot protocol before 2.00, or LOADED_HIGH not set)"
        }
        L::Bzimage(Bz::Overflow) => "setup size overflows",
        L::Bzimage(Bz::Underflow) => "file is shorter than its setup code",
        L::Bzimage(Bz::ReadBzImageHeader) => "cannot read the setup header",
        L::Bzimage(Bz::ReadBzImageCompressedKernel) => "cannot read the compressed kernel",
        L::Bzimage(
            Bz::SeekBzImageEnd | Bz::SeekBzImageHeader | Bz::SeekBzImageCompressedKernel,
        ) => "cannot seek in the file",
        L::Elf(Elf::Align) => "invalid alignment",
        L::Elf(Elf::BigEndianElfOnLittle) => "big-endian ELF file",
        L::Elf(Elf::InvalidElfMagicNumber) => "bad ELF magic number",
        L::Elf(Elf::InvalidProgramHeaderSize) => "bad program header size",
        L::Elf(Elf::InvalidProgramHeaderOffset) => "program header offset out of range",
        L::Elf(Elf::InvalidProgramHeaderAddress) => {
            "a segment's load address is below 1 MiB or outside guest memory"
        }
        L::Elf(Elf::InvalidEntryAddress) => "invalid entry address",
        L::Elf(Elf::Overflow) => "arithmetic overflow in its headers",
        L::Elf(Elf::ReadElfHeader) => "cannot read the ELF header (file truncated?)",
        L::Elf(Elf::ReadKernelImage) => {
            "cannot read a segment (file truncated, or segment outside guest memory)"
        }
        L::Elf(Elf::ReadProgramHeader) => "cannot read the program headers (file truncated?)",
        L::Elf(Elf::SeekKernelStart) => "cannot seek to a segment",
        L::Elf(Elf::SeekElfStart) => "cannot seek to the ELF header",
        L::Elf(Elf::SeekProgramHeader) => "cannot seek to the program headers",
        L::Elf(Elf::SeekNoteHeader) => "cannot seek to an ELF note",
        L::Elf(Elf::ReadNoteHeader) => "cannot read an ELF note (file truncated?)",
        L::Elf(Elf::InvalidPvhNote) => "invalid PVH entry note",
        L::InvalidCommandLine | L::CommandLineCopy | L::CommandLineOverflow => "command line error",
        L::InvalidKernelStartAddress => "kernel start address is below the load address",
        L::MemoryOverflow => "the kernel does not fit in guest memory",
    }
}

fn load_flat(
    path: &Path,
    file: &mut File,
    size: u64,
    mem: &GuestMemory,
) -> Result<LoadedImage, Error> {
    let load = layout::FLAT_LOAD_ADDR;
    let low_ram = layout::low_ram_end(ram_size(mem));
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
    check_elf_segments(path, file, layout::low_ram_end(ram_size(mem)))?;
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
    if let Some(eip) = pvh {
        if eip < layout::HIGH_MEMORY_START || !mem.address_in_range(GuestAddress(eip)) {
            return Err(Error::PvhEntryOutOfRange {
                path: path.into(),
                eip,
            });
        }
    }
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
        linux: is_linux.then_some(LinuxKernel::Vmlinux),
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
    if start.saturating_add(need) > layout::low_ram_end(have) {
        return Err(Error::KernelTooBig {
            path: path.into(),
            need,
            start,
            have,
        });
    }
    // At 1 MiB, as the boot protocol says, wherever code32_start points (linux-loader
    // would load at code32_start and enter at +0x200 from there; the room checked
    // above is from 1 MiB).
    let res = BzImage::load(
        mem,
        Some(GuestAddress(layout::HIGH_MEMORY_START)),
        file,
        Some(GuestAddress(layout::HIGH_MEMORY_START)),
    )
    .map_err(|reason| Error::BadBzImage {
        path: path.into(),
        reason,
    })?;
    let rip = res.kernel_load.0 + STARTUP_64_OFFSET;
    if rip >= res.kernel_end {
        return Err(Error::NoEntryInKernel {
            path: path.into(),
            size: res.kernel_end - res.kernel_load.0,
        });
    }
    // linux-loader hands back the header it read, code32_start set to the load address.
    let header = res.setup_header.unwrap_or(hdr);
    Ok(LoadedImage {
        format: ImageFormat::BzImage,
        entry: EntryMode::Long { rip },
        end: res.kernel_end,
        linux: Some(LinuxKernel::BzImage(header)),
    })
}

/// Refuses an ELF with a segment linux-loader would load (`PT_LOAD` with file bytes)
/// that does not lie, with its zero-filled tail (`p_memsz`), in guest RAM between
/// 1 MiB and `ram_end`: linux-loader writes a segment wherever its `p_paddr` says (low
/// memory holds the boot structures Ferrite writes next) and reports the image's end
/// from `p_memsz` unchecked (the initrd is placed after it). Headers it cannot read
/// are left for linux-loader to report.
fn check_elf_segments(path: &Path, file: &mut File, ram_end: u64) -> Result<(), Error> {
    let read = |file: &mut File, at: u64, buf: &mut [u8]| {
        file.seek(std::io::SeekFrom::Start(at))
            .and_then(|_| file.read_exact(buf))
            .is_ok()
    };
    let mut ehdr = [0u8; 64];
    if !read(file, 0, &mut ehdr) {
        return Ok(());
    }
    let u64_at = |b: &[u8], o: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(w)
    };
    let phoff = u64_at(&ehdr, 0x20);
    let phnum = u64::from(u16::from_le_bytes([ehdr[0x38], ehdr[0x39]]));
    // linux-loader reads program headers of its own size, one after another.
    const PHDR_LEN: u64 = 56;
    for i in 0..phnum {
        let mut ph = [0u8; PHDR_LEN as usize];
        let Some(at) = phoff.checked_add(i * PHDR_LEN) else {
            return Ok(());
        };
        if !read(file, at, &mut ph) {
            return Ok(());
        }
        let (p_type, paddr) = (
            u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]),
            u64_at(&ph, 24),
        );
        let (filesz, memsz) = (u64_at(&ph, 32), u64_at(&ph, 40));
        if p_type != PT_LOAD || filesz == 0 {
            continue;
        }
        let size = memsz.max(filesz);
        let inside = paddr >= layout::HIGH_MEMORY_START
            && paddr.checked_add(size).is_some_and(|end| end <= ram_end);
        if !inside {
            return Err(Error::SegmentOutsideRam {
                path: path.into(),
                addr: paddr,
                size,
                ram_end,
            });
        }
    }
    Ok(())
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

    fn not_image(head: &[u8]) -> String {
        match detect(Path::new("k"), head) {
            Err(Error::NotAnImage { what, .. }) => what,
            other => panic!("expected NotAnImage, got {other:?}"),
        }
    }

    #[test]
    fn detects_foreign_formats() {
        assert_eq!(not_image(b"\x1f\x8b\x08\x00rest"), "gzip-compressed data");
        assert_eq!(not_image(b"\xfd7zXZ\x00\x00\x04"), "xz-compressed data");
        assert_eq!(not_image(b"\x28\xb5\x2f\xfd\x04"), "zstd-compressed data");
        assert_eq!(not_image(b"BZh91AY&SY"), "bzip2-compressed data");
        assert_eq!(not_image(b"PK\x03\x04\x14\x00"), "a zip archive");
        assert_eq!(
            not_image(b"!<arch>\ndebian-binary   1342943816  0     0     100644  4         `\n"),
            "an ar archive (a .deb package)"
        );
        assert_eq!(not_image(b"!<arch>\nfoo.o/"), "an ar archive");
        assert_eq!(not_image(b"#!/bin/sh\necho hi\n"), "a script (#!/bin/sh)");
        assert_eq!(not_image(b"#!\xff\xfe"), "a script");
        assert_eq!(
            not_image(b"# Ferrite\r\n\x0cA small VMM.\tText.\n"),
            "a text file (it begins \"# Ferrite\")"
        );
        // A long first line is cut; quotes and backslashes are escaped.
        let long = format!("\"{}\\\n", "a".repeat(60));
        let what = not_image(long.as_bytes());
        assert!(
            what.starts_with("a text file (it begins \"\\\"aaa"),
            "{what}"
        );
        assert!(what.ends_with("a...\")"), "{what}");
        // UTF-8 text, with a character cut off by the 1 KiB head.
        let mut utf8 = "€uro ".repeat(300).into_bytes();
        utf8.truncate(HEAD_LEN);
        assert!(std::str::from_utf8(&utf8).is_err());
        assert!(not_image(&utf8).starts_with("a text file"));
        // ... but a cut-off character at the end of a short (whole) file is not text.
        assert_eq!(
            detect(Path::new("k"), b"AB\xc3").unwrap(),
            ImageFormat::Flat
        );
        // Boot-sector signature without "HdrS".
        let mut mbr = vec![0u8; 512];
        mbr[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        assert!(matches!(
            detect(Path::new("k"), &mbr),
            Err(Error::DamagedBzImage { .. })
        ));
    }

    #[test]
    fn machine_code_is_flat_not_text() {
        let p = Path::new("k");
        for code in [
            // The flat test guests' first instructions: mov $imm,%si / mov $imm,%al / cli.
            &b"\xbe\x12\x00\xba\xf8\x03\xac\x84\xc0\x74\x03\xee\xeb\xf8\xf4\xeb\xfd"[..],
            b"\xb0\x2a\xe6\xf4\xf4\xeb\xfd",
            b"\xfa\x66\x0f\x01\x16\x40\x00",
            b"\x90",
            b"\x00\x00",
            // Printable bytes with a control byte among them.
            b"ABC\x01DEF",
        ] {
            assert_eq!(detect(p, code).unwrap(), ImageFormat::Flat, "{code:x?}");
        }
    }

    #[test]
    fn bzimage_size_is_checked_against_the_header() {
        let p = Path::new("k");
        let mut bz = vec![0u8; 0x400];
        bz[0x1f1] = 1; // setup_sects
        bz[0x1f4..0x1f8].copy_from_slice(&0x100u32.to_le_bytes()); // syssize: 4 KiB
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        let promised = 2 * 512 + 0x1000;
        assert!(check_bzimage_size(p, &bz, promised).is_ok());
        assert!(check_bzimage_size(p, &bz, promised + 1).is_ok());
        match check_bzimage_size(p, &bz, promised - 1) {
            Err(e @ Error::TruncatedBzImage { .. }) => assert_eq!(
                e.to_string(),
                "kernel image k is a truncated bzImage: 5119 bytes, header promises 5120"
            ),
            other => panic!("{other:?}"),
        }
        // setup_sects 0 means 4.
        bz[0x1f1] = 0;
        assert!(check_bzimage_size(p, &bz, 5 * 512 + 0x1000 - 1).is_err());
        assert!(check_bzimage_size(p, &bz, 5 * 512 + 0x1000).is_ok());
        // Before protocol 2.04 only the low 16 bits of syssize count.
        bz[0x1f4..0x1f8].copy_from_slice(&0xffff_0100u32.to_le_bytes());
        assert!(check_bzimage_size(p, &bz, 5 * 512 + 0x1000 - 1).is_err());
        bz[0x206..0x208].copy_from_slice(&0x0202u16.to_le_bytes());
        assert!(check_bzimage_size(p, &bz, 5 * 512 + 0x1000).is_ok());
    }

    #[test]
    fn only_regular_files_are_images() {
        // The kinds in words are file.rs's (tested there); here: the loader refuses them.
        assert!(matches!(
            probe(Path::new("/")),
            Err(Error::NotRegular { .. })
        ));
        assert!(matches!(
            probe(Path::new("/dev/zero")),
            Err(Error::NotRegular { .. })
        ));
        let fifo = std::env::temp_dir().join(format!("ferrite-loader-{}-fifo", std::process::id()));
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // Probing a FIFO with no writer must not block.
        assert!(matches!(probe(&fifo), Err(Error::NotRegular { .. })));
        std::fs::remove_file(fifo).unwrap();
        let p = tmp("regular", b"\xf4");
        assert_eq!(probe(&p).unwrap(), ImageFormat::Flat);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn loader_errors_read_as_words() {
        let e = Error::BadBzImage {
            path: "bz".into(),
            reason: linux_loader::loader::Error::Bzimage(
                linux_loader::loader::bzimage::Error::Underflow,
            ),
        };
        assert_eq!(
            e.to_string(),
            "kernel image bz is not a loadable bzImage: file is shorter than its setup code"
        );
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
        std::fs::remove_file(p).unwrap();
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
