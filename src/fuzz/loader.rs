//! The image loaders with hostile files: random bytes, and a small valid ELF and a
//! synthetic bzImage with their header fields set to edge values, bytes flipped and
//! the file cut short. Each load is an error naming the file, or an image that lies
//! inside guest RAM (from 1 MiB for a kernel), entered inside it, with guest memory
//! outside the image untouched.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

use super::cases;
use crate::arch::x86_64::layout;
use crate::arch::x86_64::regs::EntryMode;
use crate::loader::{self, ImageFormat};
use crate::memory::{self, GuestMemory};

/// Guest RAM for the loads: small, so that edge values reach beyond it.
const MEM: u64 = 8 << 20;
/// What the low megabyte holds before each load.
const FILL: u8 = 0xa5;

/// A file of the test's own, removed on drop.
struct TempImage(PathBuf);

impl TempImage {
    fn new(bytes: &[u8]) -> TempImage {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "ferrite-fuzz-image-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = std::fs::File::create(&p).expect("a temp file");
        f.write_all(bytes).expect("written");
        TempImage(p)
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A 64-bit x86-64 ELF: header, two program headers (one PT_LOAD at 1 MiB with a
/// little BSS, one PT_NOTE "Linux"), the code and the note.
pub fn small_elf() -> Vec<u8> {
    elf_with_note(false)
}

/// The same ELF, its note Xen's PVH entry (`XEN_ELFNOTE_PHYS32_ENTRY`, 1 MiB) when
/// `pvh`.
fn elf_with_note(pvh: bool) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let code_off = EHDR + 2 * PHDR;
    let code = [0xf4u8, 0xeb, 0xfd, 0x90, 0x90, 0x90, 0x90, 0x90];
    let note_off = code_off + code.len();
    let mut note = Vec::new();
    let (name, ty): (&[u8], u32) = if pvh {
        (b"Xen\0", 18)
    } else {
        (b"Linux\0\0\0", 1)
    };
    let namesz: u32 = if pvh { 4 } else { 6 };
    note.extend_from_slice(&namesz.to_le_bytes());
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&ty.to_le_bytes());
    note.extend_from_slice(name);
    note.extend_from_slice(&0x10_0000u32.to_le_bytes());
    let mut e = vec![0u8; note_off];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // ELFCLASS64
    e[5] = 1; // little-endian
    e[6] = 1; // EV_CURRENT
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // e_entry
    e[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    e[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes()); // e_ehsize
    e[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes()); // e_phentsize
    e[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
    let ph = |e: &mut Vec<u8>,
              at: usize,
              ty: u32,
              off: usize,
              addr: u64,
              filesz: usize,
              memsz: usize| {
        e[at..at + 4].copy_from_slice(&ty.to_le_bytes());
        e[at + 4..at + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        e[at + 8..at + 16].copy_from_slice(&(off as u64).to_le_bytes());
        e[at + 16..at + 24].copy_from_slice(&addr.to_le_bytes()); // p_vaddr
        e[at + 24..at + 32].copy_from_slice(&addr.to_le_bytes()); // p_paddr
        e[at + 32..at + 40].copy_from_slice(&(filesz as u64).to_le_bytes());
        e[at + 40..at + 48].copy_from_slice(&(memsz as u64).to_le_bytes());
        e[at + 48..at + 56].copy_from_slice(&16u64.to_le_bytes());
    };
    ph(&mut e, EHDR, 1, code_off, 0x10_0000, code.len(), 0x1000);
    ph(&mut e, EHDR + PHDR, 4, note_off, 0, note.len(), note.len());
    e[code_off..note_off].copy_from_slice(&code);
    e.extend_from_slice(&note);
    e
}

/// The ELF's header fields a mutation sets: (offset, width).
const ELF_FIELDS: &[(usize, usize)] = &[
    (4, 1),        // class
    (5, 1),        // data
    (18, 2),       // machine
    (24, 8),       // e_entry
    (32, 8),       // e_phoff
    (54, 2),       // e_phentsize
    (56, 2),       // e_phnum
    (64, 4),       // PT_LOAD p_type
    (64 + 8, 8),   // p_offset
    (64 + 24, 8),  // p_paddr
    (64 + 32, 8),  // p_filesz
    (64 + 40, 8),  // p_memsz
    (120, 4),      // PT_NOTE p_type
    (120 + 8, 8),  // p_offset
    (120 + 32, 8), // p_filesz
    (184, 4),      // the note's namesz
    (188, 4),      // descsz
    (192, 4),      // type
    (200, 4),      // the PVH entry (in the Xen note)
];

/// A bzImage as the boot protocol lays it out: one setup sector after the boot
/// sector, then `payload` bytes of "protected-mode kernel", protocol 2.15, 64-bit,
/// loaded high at 1 MiB, 64 KiB to decompress.
pub fn small_bzimage(payload: usize) -> Vec<u8> {
    let mut b = vec![0u8; 1024 + payload];
    b[0x1f1] = 1; // setup_sects
    b[0x1f4..0x1f8].copy_from_slice(&(payload.div_ceil(16) as u32).to_le_bytes()); // syssize
    b[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version
    b[0x211] = 1; // loadflags: LOADED_HIGH
    b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    b[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    b[0x258..0x260].copy_from_slice(&0x10_0000u64.to_le_bytes()); // pref_address
    b[0x260..0x264].copy_from_slice(&0x1_0000u32.to_le_bytes()); // init_size
    for (i, byte) in b[1024..].iter_mut().enumerate() {
        *byte = i as u8;
    }
    b
}

/// The setup header fields a mutation sets: (offset, width).
const BZ_FIELDS: &[(usize, usize)] = &[
    (0x1f1, 1), // setup_sects
    (0x1f4, 4), // syssize
    (0x202, 4), // header magic
    (0x206, 2), // version
    (0x211, 1), // loadflags
    (0x214, 4), // code32_start
    (0x22c, 4), // initrd_addr_max
    (0x236, 2), // xloadflags
    (0x258, 8), // pref_address
    (0x260, 4), // init_size
];

/// Values at the edges of the guest's RAM and of each width.
fn edge_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        prop::sample::select(vec![
            0,
            1,
            0xfff,
            0x1_0000,
            0xf_ffff,
            0x10_0000,
            0x10_0200,
            MEM - 0x1000,
            MEM - 1,
            MEM,
            MEM + 0x1000,
            layout::IDENTITY_MAPPED,
            u64::from(u32::MAX),
            u64::MAX - 0xfff,
            u64::MAX,
        ]),
        any::<u64>(),
        0..MEM,
    ]
}

#[derive(Debug, Clone)]
enum Edit {
    /// Set field `i` (of the format's table) to a value (truncated to its width).
    Field(prop::sample::Index, u64),
    /// Set one byte anywhere.
    Byte(prop::sample::Index, u8),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(
        prop_oneof![
            3 => (any::<prop::sample::Index>(), edge_value()).prop_map(|(i, v)| Edit::Field(i, v)),
            1 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Byte(i, b)),
        ],
        0..5,
    )
}

fn mutate(
    mut image: Vec<u8>,
    fields: &[(usize, usize)],
    edits: &[Edit],
    cut: Option<prop::sample::Index>,
) -> Vec<u8> {
    for e in edits {
        match e {
            Edit::Field(i, v) => {
                let (at, width) = fields[i.index(fields.len())];
                if at + width <= image.len() {
                    image[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
                }
            }
            Edit::Byte(i, b) => {
                let i = i.index(image.len());
                image[i] = *b;
            }
        }
    }
    if let Some(c) = cut {
        image.truncate(c.index(image.len() + 1));
    }
    image
}

fn guest_memory() -> GuestMemory {
    memory::create(MEM).expect("guest memory")
}

/// Loads `bytes` from a file into `mem` and checks the outcome (see the module doc).
fn check_load(mem: &GuestMemory, bytes: &[u8]) -> Result<(), TestCaseError> {
    let low = vec![FILL; layout::HIGH_MEMORY_START as usize];
    mem.write_slice(&low, GuestAddress(0))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let file = TempImage::new(bytes);
    let path: &Path = &file.0;
    let shown = path.display().to_string();
    // The probe sees what the load sees of the header.
    let probed = loader::probe(path);
    let loaded = loader::load(path, mem);
    match (&probed, &loaded) {
        (Err(p), Err(l)) => prop_assert_eq!(p.to_string(), l.to_string()),
        (Ok(f), Ok(img)) => prop_assert_eq!(*f, img.format),
        (Ok(_), Err(_)) => {} // a header that looks right, a body that does not load
        (Err(p), Ok(_)) => prop_assert!(false, "probe refused ({}) what load took", p),
    }
    let img = match loaded {
        Err(e) => {
            let msg = crate::errors::chain(&e);
            prop_assert!(
                msg.contains(&shown),
                "the error does not name the file: {}",
                msg
            );
            return Ok(());
        }
        Ok(img) => img,
    };
    let ram = memory::ram_size(mem);
    let low_ram = layout::low_ram_end(ram);
    prop_assert!(
        img.end <= low_ram,
        "image ends at {:#x}, beyond RAM ({:#x})",
        img.end,
        low_ram
    );
    let entry = match img.entry {
        EntryMode::Long { rip } => rip,
        EntryMode::Pvh { eip } => eip,
        EntryMode::Real { segment } => u64::from(segment) << 4,
    };
    if img.format == ImageFormat::BzImage {
        // The boot protocol loads the protected-mode kernel at 1 MiB; its 64-bit entry
        // is 0x200 bytes into it.
        let start_64 = layout::HIGH_MEMORY_START + 0x200;
        prop_assert_eq!(img.entry, EntryMode::Long { rip: start_64 });
        prop_assert!(
            start_64 < img.end,
            "entry {:#x} beyond the kernel's end {:#x}",
            start_64,
            img.end
        );
    }
    let below = match img.format {
        ImageFormat::Flat => layout::FLAT_LOAD_ADDR,
        ImageFormat::Elf64 | ImageFormat::BzImage => layout::HIGH_MEMORY_START,
    };
    prop_assert!(
        (below..low_ram).contains(&entry),
        "entry {:#x} outside guest RAM from {:#x} to {:#x}",
        entry,
        below,
        low_ram
    );
    let mut seen = vec![0u8; below as usize];
    mem.read_slice(&mut seen, GuestAddress(0))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(
        seen.iter().all(|&b| b == FILL),
        "a {:?} image wrote below {:#x}",
        img.format,
        below
    );
    Ok(())
}

#[test]
fn the_small_images_load() {
    let mem = guest_memory();
    let file = TempImage::new(&small_elf());
    let img = loader::load(&file.0, &mem).unwrap();
    assert_eq!(img.format, ImageFormat::Elf64);
    assert_eq!(img.entry, EntryMode::Long { rip: 0x10_0000 });
    assert!(img.linux.is_some());
    let file = TempImage::new(&elf_with_note(true));
    let img = loader::load(&file.0, &mem).unwrap();
    assert_eq!(img.entry, EntryMode::Pvh { eip: 0x10_0000 });
    let file = TempImage::new(&small_bzimage(0x800));
    let img = loader::load(&file.0, &mem).unwrap();
    assert_eq!(img.format, ImageFormat::BzImage);
    assert_eq!(img.entry, EntryMode::Long { rip: 0x10_0200 });
    assert_eq!(img.end, 0x10_0800);
}

/// The small ELF with its PT_LOAD segment's `p_paddr` and `p_memsz` set.
fn elf_with_segment(paddr: u64, memsz: u64) -> Vec<u8> {
    let mut e = small_elf();
    e[64 + 24..64 + 32].copy_from_slice(&paddr.to_le_bytes());
    e[64 + 40..64 + 48].copy_from_slice(&memsz.to_le_bytes());
    e
}

fn refused_segment(bytes: &[u8]) -> (String, Vec<u8>) {
    let mem = guest_memory();
    mem.write_slice(&[FILL; 0x1000], GuestAddress(0)).unwrap();
    let file = TempImage::new(bytes);
    let e = loader::load(&file.0, &mem).unwrap_err();
    assert!(matches!(e, loader::Error::SegmentOutsideRam { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&file.0.display().to_string()), "{msg}");
    let mut low = vec![0u8; 0x1000];
    mem.read_slice(&mut low, GuestAddress(0)).unwrap();
    (msg, low)
}

/// Found by `mutated_elf_loads_or_refuses`: a segment's zero-filled tail (p_memsz)
/// reaching beyond guest RAM was accepted, and the image's end reported beyond RAM
/// (where the initrd placement starts from; at u64::MAX it overflowed).
#[test]
fn elf_segment_whose_memsz_reaches_beyond_ram_is_refused() {
    let (msg, _) = refused_segment(&elf_with_segment(0x10_0000, 0x100_1000));
    assert!(
        msg.contains("segment at 0x100000 of 0x1001000 bytes"),
        "{msg}"
    );
    refused_segment(&elf_with_segment(0x10_0000, u64::MAX - 0x10_0000));
    refused_segment(&elf_with_segment(0x10_0000, u64::MAX));
}

/// Found by `mutated_elf_loads_or_refuses`: a segment below 1 MiB was written where
/// the boot structures go (linux-loader checks no segment address).
#[test]
fn elf_segment_below_1mib_is_refused_before_it_is_written() {
    let (msg, low) = refused_segment(&elf_with_segment(0, 0x1000));
    assert!(msg.contains("segment at 0x0 of 0x1000 bytes"), "{msg}");
    assert!(low.iter().all(|&b| b == FILL));
}

/// Found by `mutated_bzimage_loads_or_refuses`: a bzImage was loaded at its
/// `code32_start` (here 1 MiB + 1, or the last 16 bytes of RAM) instead of at 1 MiB,
/// and entered 0x200 bytes further, outside the kernel and even outside RAM.
#[test]
fn bzimage_is_loaded_at_1mib_whatever_code32_start_says() {
    let mem = guest_memory();
    let mut bz = small_bzimage(0x800);
    for code32_start in [0x10_0001u32, 0x40_0000, (MEM - 0x10) as u32] {
        bz[0x214..0x218].copy_from_slice(&code32_start.to_le_bytes());
        let file = TempImage::new(&bz);
        let img = loader::load(&file.0, &mem).unwrap();
        assert_eq!(img.entry, EntryMode::Long { rip: 0x10_0200 });
        assert_eq!(img.end, 0x10_0800);
        let hdr = img
            .linux
            .as_ref()
            .and_then(|l| l.setup_header())
            .copied()
            .unwrap();
        let told = hdr.code32_start;
        assert_eq!(
            told, 0x10_0000,
            "the zero page tells the kernel where it is"
        );
    }
}

/// Found with the one above: a protected-mode kernel shorter than 0x200 bytes has no
/// 64-bit entry point inside it.
#[test]
fn bzimage_too_short_for_its_entry_point_is_refused() {
    let mem = guest_memory();
    let file = TempImage::new(&small_bzimage(0x200));
    let e = loader::load(&file.0, &mem).unwrap_err();
    assert!(
        matches!(e, loader::Error::NoEntryInKernel { size: 0x200, .. }),
        "{e}"
    );
    assert!(e.to_string().contains(&file.0.display().to_string()), "{e}");
    let file = TempImage::new(&small_bzimage(0x210));
    assert!(loader::load(&file.0, &mem).is_ok());
}

/// Found by `mutated_elf_loads_or_refuses`: the entry point of a PVH note was taken
/// as it came (e_entry is checked against RAM, the PVH entry was not), here the first
/// byte after RAM, and below 1 MiB.
#[test]
fn pvh_entry_outside_ram_is_refused() {
    let mem = guest_memory();
    for eip in [MEM as u32, 0x1000, u32::MAX] {
        let mut e = elf_with_note(true);
        e[200..204].copy_from_slice(&eip.to_le_bytes());
        let file = TempImage::new(&e);
        let err = loader::load(&file.0, &mem).unwrap_err();
        assert!(
            matches!(err, loader::Error::PvhEntryOutOfRange { eip: got, .. } if got == u64::from(eip)),
            "{err}"
        );
        assert!(
            err.to_string().contains(&file.0.display().to_string()),
            "{err}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(384)))]

    #[test]
    fn random_bytes_load_or_refuse(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2048),
        // Random bytes behind a real magic, so the format's own checks are reached.
        (prop::sample::select(vec![&b"\x7fELF\x02\x01\x01"[..], b"\x1f\x8b\x08", b"#!", b"BZh9"]),
         prop::collection::vec(any::<u8>(), 0..1024))
            .prop_map(|(m, rest)| [m, &rest].concat()),
    ]) {
        let mem = guest_memory();
        check_load(&mem, &bytes)?;
    }

    #[test]
    fn mutated_elf_loads_or_refuses(
        pvh in any::<bool>(),
        e in edits(),
        cut in prop::option::weighted(0.2, any::<prop::sample::Index>()),
    ) {
        let mem = guest_memory();
        check_load(&mem, &mutate(elf_with_note(pvh), ELF_FIELDS, &e, cut))?;
    }

    #[test]
    fn mutated_bzimage_loads_or_refuses(
        payload in prop_oneof![Just(0x800usize), 0usize..0x2000],
        e in edits(),
        cut in prop::option::weighted(0.2, any::<prop::sample::Index>()),
    ) {
        let mem = guest_memory();
        check_load(&mem, &mutate(small_bzimage(payload), BZ_FIELDS, &e, cut))?;
    }
}
