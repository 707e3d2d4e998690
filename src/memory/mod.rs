//! Guest RAM: creation with vm-memory from a [`MemoryConfig`] (anonymous
//! `MAP_NORESERVE` by default, so it can be overcommitted; or a shared memfd or file;
//! optionally huge pages and populated at start), the host-fit check, registration of
//! each region as a KVM memory slot, and the host RSS of guest RAM.
#![allow(unsafe_code)]

pub mod cgroup;
pub mod config;
pub mod host;
pub mod usage;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

pub use config::{Backing, HugePages, MemoryConfig, HUGE_PAGE_SIZE};

pub type GuestMemory = GuestMemoryMmap<()>;

/// Smallest guest Ferrite accepts: room for its boot structures and a tiny image.
pub const MIN_MEM_SIZE: u64 = 1 << 20;
/// Largest guest Ferrite accepts (1 TiB): beyond it a typo is likelier than intent.
pub const MAX_MEM_SIZE: u64 = 1 << 40;

/// `--mem-prealloc` populates guest RAM this much at a time, checking the memory
/// limits before each piece.
pub const POPULATE_CHUNK: u64 = 64 << 20;
/// What Ferrite still allocates after populating guest RAM (devices, threads, buffers),
/// kept free by the prealloc checks.
const PREALLOC_SLACK: u64 = 16 << 20;

/// What stands in the way of populating guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shortfall {
    /// A memory cgroup Ferrite is charged to.
    Cgroup(cgroup::Limit),
    /// The host's available memory (MemAvailable).
    Host { available: u64 },
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shortfall::Cgroup(l) => write!(
                f,
                "memory cgroup {} has a limit of {} MiB ({}), {} MiB in use of which {} MiB is \
                 reclaimable page cache: {} MiB free",
                l.dir.display(),
                l.limit >> 20,
                l.limit_file(),
                l.usage >> 20,
                l.reclaimable >> 20,
                l.headroom() >> 20
            ),
            Shortfall::Host { available } => write!(
                f,
                "the host has {} MiB available (MemAvailable in /proc/meminfo)",
                available >> 20
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest memory size {0} bytes is below the minimum of 1 MiB")]
    TooSmall(u64),
    #[error("guest memory size {0} bytes is above the maximum of 1 TiB")]
    TooLarge(u64),
    #[error("guest RAM ranges {ranges:x?} do not add up to the guest memory size {size:#x}")]
    Layout { size: u64, ranges: Vec<(u64, u64)> },
    #[error(
        "guest memory of {} MiB would cost the host ~{} MiB of KVM kernel memory (not part of \
         Ferrite's RSS), more than half of the {} MiB the host has available; use a smaller --mem",
        size >> 20, cost >> 20, available >> 20
    )]
    HostCannotHold {
        size: u64,
        cost: u64,
        available: u64,
    },
    #[error(
        "--hugepages=hugetlbfs needs a memory size that is a multiple of 2 MiB (got {0} bytes)"
    )]
    HugeUnaligned(u64),
    #[error(
        "--hugepages=hugetlbfs: {needed} free 2 MiB huge pages are needed, the host has {free} \
         (HugePages_Free in /proc/meminfo); reserve them (echo N > /proc/sys/vm/nr_hugepages) \
         or use --hugepages=thp"
    )]
    NoHugePages { needed: u64, free: u64 },
    #[error("--hugepages=thp: the host has transparent huge pages {0}")]
    NoThp(&'static str),
    #[error("--hugepages=thp works with anon or memfd backing, not a file")]
    ThpOnFile,
    #[error("memory backing file {path}: {what}")]
    BackingFile { path: PathBuf, what: String },
    #[error("memory backing file {path}")]
    BackingFileIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "snapshot memory file {path} has {got} bytes; the snapshot's guest memory needs \
         {expected}"
    )]
    SnapshotFileSize {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    #[error("snapshot memory file {path}")]
    SnapshotFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a snapshot's memory cannot be mapped with --hugepages")]
    SnapshotHuge,
    #[error("cannot create a memfd for guest memory")]
    Memfd(#[source] memfd::Error),
    #[error("cannot duplicate the guest memory file descriptor")]
    CloneFd(#[source] std::io::Error),
    #[error("cannot size the guest memory file to {size} bytes")]
    SetLen {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map {size} bytes of guest memory ({backing}, huge pages {hugepages})")]
    Map {
        size: u64,
        backing: String,
        hugepages: HugePages,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest memory regions overlap or are empty")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    #[error("madvise({advice}) on guest memory at {host:#x} ({len} bytes) failed")]
    Madvise {
        advice: &'static str,
        host: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--mem-prealloc: {} MiB of guest memory (~{} MiB with page tables, KVM's memory-slot \
         metadata and Ferrite's own needs) cannot be populated: {shortfall}; use a smaller \
         --mem, raise the limit, or leave out --mem-prealloc",
        size >> 20, needed >> 20
    )]
    PreallocWontFit {
        size: u64,
        needed: u64,
        shortfall: Shortfall,
    },
    #[error(
        "--mem-prealloc: stopped after populating {} of {} MiB of guest memory, as the rest \
         (~{} MiB) no longer fits: {shortfall}",
        done >> 20, size >> 20, needed >> 20
    )]
    PreallocStopped {
        done: u64,
        size: u64,
        needed: u64,
        shortfall: Shortfall,
    },
    #[error(
        "--mem-prealloc: populating guest memory failed after {} of {} MiB ({why})",
        done >> 20, size >> 20
    )]
    Populate {
        done: u64,
        size: u64,
        why: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM refused memory slot {slot} (guest {guest:#x}, {size} bytes)")]
    Register {
        slot: u32,
        guest: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Guest RAM and how it was made.
pub struct Ram {
    pub mem: GuestMemory,
    pub config: MemoryConfig,
    /// The backing file or memfd, kept open (and, for a file, locked) for the VM's life.
    pub file: Option<RamFile>,
}

/// The memfd or backing file behind guest RAM. A backing file that this run created is
/// removed when this is dropped before [`RamFile::keep`]: a start that fails after
/// creating it (a bad disk, a missing TAP device, a kernel too big) leaves nothing
/// behind. Only that file is removed: the path must still name the same inode.
#[derive(Debug)]
pub struct RamFile {
    file: File,
    created: Option<CreatedFile>,
}

#[derive(Debug)]
struct CreatedFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl RamFile {
    fn new(file: File) -> Self {
        Self {
            file,
            created: None,
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The VM has started: a backing file it created stays when the VM ends.
    pub fn keep(&mut self) {
        self.created = None;
    }
}

impl Drop for RamFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let Some(c) = self.created.take() else {
            return;
        };
        match std::fs::symlink_metadata(&c.path) {
            Ok(m) if m.dev() == c.dev && m.ino() == c.ino => {
                if let Err(e) = std::fs::remove_file(&c.path) {
                    log::warn!(
                        "cannot remove the memory backing file {} this run created: {e}",
                        c.path.display()
                    );
                }
            }
            // Gone, or another file now: not this run's to remove.
            _ => {}
        }
    }
}

/// Maps `size` bytes of private anonymous guest RAM at guest address 0, in one piece
/// (tests and tools; the VM uses [`create_ram`] with the machine's layout).
pub fn create(size: u64) -> Result<GuestMemory, Error> {
    create_ram(&MemoryConfig::new(size), &[(0, size)]).map(|ram| ram.mem)
}

fn check_size(size: u64) -> Result<(), Error> {
    if size < MIN_MEM_SIZE {
        return Err(Error::TooSmall(size));
    }
    if size > MAX_MEM_SIZE {
        return Err(Error::TooLarge(size));
    }
    Ok(())
}

/// Checks `cfg` against the host (refusing a size whose fixed KVM cost the host cannot
/// hold, warning when guest RAM exceeds host RAM), then maps guest RAM as `cfg` asks,
/// at the guest-physical `ranges` (start, length) the machine's layout gives (they
/// must add up to `cfg.size`; the x86 layout splits RAM around the 32-bit MMIO hole).
/// Where RAM goes is the caller's (the architecture's) to say: this module decides only
/// how it is backed.
pub fn create_ram(cfg: &MemoryConfig, ranges: &[(u64, u64)]) -> Result<Ram, Error> {
    check_size(cfg.size)?;
    let total = ranges
        .iter()
        .try_fold(0u64, |sum, &(_, len)| sum.checked_add(len));
    if total != Some(cfg.size) {
        return Err(Error::Layout {
            size: cfg.size,
            ranges: ranges.to_vec(),
        });
    }
    let huge = cfg.hugepages == HugePages::Hugetlbfs;
    let host_mem = host::HostMemory::for_guest(cfg.size, huge);
    match host::fit(cfg.size, &host_mem) {
        host::Fit::Fits => {}
        host::Fit::Overcommitted { guest, host_total } => log::warn!(
            "guest memory ({} MiB) exceeds host RAM ({} MiB): the guest can only run \
             while it touches less than the host can give it",
            guest >> 20,
            host_total >> 20
        ),
        host::Fit::TooCostly { cost, available } => {
            return Err(Error::HostCannotHold {
                size: cfg.size,
                cost,
                available,
            })
        }
    }
    if huge {
        if !cfg.size.is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(Error::HugeUnaligned(cfg.size));
        }
        // Anonymous and memfd hugetlb memory comes from the default pool (2 MiB here).
        let needed = cfg.size / HUGE_PAGE_SIZE;
        if !matches!(cfg.backing, Backing::File(_)) && host_mem.hugepages_free < needed {
            return Err(Error::NoHugePages {
                needed,
                free: host_mem.hugepages_free,
            });
        }
    }
    if matches!(cfg.backing, Backing::Snapshot(_)) && cfg.hugepages != HugePages::Off {
        return Err(Error::SnapshotHuge);
    }
    if cfg.hugepages == HugePages::Thp {
        if matches!(cfg.backing, Backing::File(_)) {
            return Err(Error::ThpOnFile);
        }
        match host::thp_mode().as_deref() {
            Some("always") | Some("madvise") => {}
            Some(_) => return Err(Error::NoThp("disabled (\"never\")")),
            None => return Err(Error::NoThp("not built in")),
        }
    }

    // Populating memory the host or a memory cgroup cannot supply summons the OOM
    // killer (SIGKILL, no message): check first, before anything is created, and again
    // while populating (`populate`).
    let mut headroom = if cfg.prealloc && charged_to_memory(cfg)? {
        Some(Headroom::new())
    } else {
        None
    };
    if let Some(h) = &mut headroom {
        let needed = prealloc_need(cfg.size, cfg.size);
        h.check(needed)
            .map_err(|shortfall| Error::PreallocWontFit {
                size: cfg.size,
                needed,
                shortfall,
            })?;
    }

    let file = match &cfg.backing {
        Backing::Anonymous => None,
        Backing::Memfd => {
            let mut opts = memfd::MemfdOptions::default().close_on_exec(true);
            if huge {
                opts = opts.hugetlb(Some(memfd::HugetlbSize::Huge2MB));
            }
            let f = opts
                .create("ferrite-guest-ram")
                .map_err(Error::Memfd)?
                .into_file();
            f.set_len(cfg.size).map_err(|source| Error::SetLen {
                size: cfg.size,
                source,
            })?;
            Some(RamFile::new(f))
        }
        Backing::File(path) => Some(open_backing_file(path, cfg.size, huge)?),
        Backing::Snapshot(path) => Some(open_snapshot_file(path, cfg.size)?),
    };
    let private_file = matches!(cfg.backing, Backing::Snapshot(_));

    let mut regions = Vec::new();
    let mut offset = 0u64;
    for &(start, len) in ranges {
        let mut flags = match file {
            // Pages load from the file on first touch; writes copy them (clones of one
            // snapshot share the unmodified pages through the page cache).
            Some(_) if private_file => libc::MAP_PRIVATE,
            Some(_) => libc::MAP_SHARED,
            None => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        };
        if huge {
            // No MAP_NORESERVE: hugetlb pages are then reserved at mmap time, so a host
            // short of them fails here instead of SIGBUS when the guest touches a page.
            if file.is_none() {
                flags |= libc::MAP_HUGETLB;
            }
        } else {
            flags |= libc::MAP_NORESERVE;
        }
        let mut b = MmapRegionBuilder::new(len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(huge);
        if let Some(f) = &file {
            let f = f.file.try_clone().map_err(Error::CloneFd)?;
            b = b.with_file_offset(FileOffset::new(f, offset));
        }
        let region = b.build().map_err(|source| Error::Map {
            size: cfg.size,
            backing: cfg.backing.to_string(),
            hugepages: cfg.hugepages,
            source,
        })?;
        let region = GuestRegionMmap::new(region, GuestAddress(start)).ok_or(Error::Regions(
            vm_memory::GuestRegionCollectionError::NoMemoryRegion,
        ))?;
        regions.push(region);
        offset += len;
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(Error::Regions)?;
    for region in mem.iter() {
        if cfg.hugepages == HugePages::Thp {
            let host = region.as_ptr() as u64;
            madvise(host, region.len(), libc::MADV_HUGEPAGE, "MADV_HUGEPAGE")?;
        }
    }
    if cfg.prealloc {
        let ranges: Vec<(u64, u64)> = mem.iter().map(|r| (r.as_ptr() as u64, r.len())).collect();
        let check = |rest: u64| match &mut headroom {
            Some(h) => h.check(prealloc_need(cfg.size, rest)),
            None => Ok(()),
        };
        populate(&ranges, cfg.size, POPULATE_CHUNK, check, |host, len| {
            // SAFETY: `host..host+len` lies inside one of `mem`'s live mappings (a
            // piece of a region's range, see `populate`); MADV_POPULATE_WRITE only
            // faults pages in, it never changes their contents.
            unsafe { madvise_raw(host, len, libc::MADV_POPULATE_WRITE) }
        })?;
    }
    Ok(Ram {
        mem,
        config: cfg.clone(),
        file,
    })
}

/// Whether populating `cfg`'s memory is charged to the memory cgroup and taken from
/// the host's available memory: anonymous and memfd memory, and a file on tmpfs. Not
/// hugetlb pages (a pool of their own, checked apart) or a file on a disk file system
/// (its page cache can be written back).
fn charged_to_memory(cfg: &MemoryConfig) -> Result<bool, Error> {
    if cfg.hugepages == HugePages::Hugetlbfs {
        return Ok(false);
    }
    match &cfg.backing {
        Backing::Anonymous | Backing::Memfd | Backing::Snapshot(_) => Ok(true),
        Backing::File(path) => {
            host::is_tmpfs(parent_dir(path)).map_err(|source| Error::BackingFileIo {
                path: path.clone(),
                source,
            })
        }
    }
}

/// Memory that populating the rest of guest RAM (`rest` of `size` bytes) still needs:
/// the RAM, its page tables (8 bytes per 4 KiB page), KVM's memory-slot metadata for
/// all of guest RAM (charged when the slots are registered, after populating) and
/// Ferrite's own later needs.
fn prealloc_need(size: u64, rest: u64) -> u64 {
    rest + rest.div_ceil(512) + host::kvm_metadata_estimate(size) + PREALLOC_SLACK
}

/// The memory limits a prealloc must stay within: the memory cgroups with a limit,
/// and the host's available memory.
struct Headroom {
    limits: Vec<cgroup::Limit>,
}

impl Headroom {
    fn new() -> Self {
        Self {
            limits: cgroup::limits(),
        }
    }

    /// Whether `need` bytes can still be had, from every limited cgroup (innermost
    /// first) and from the host.
    fn check(&mut self, need: u64) -> Result<(), Shortfall> {
        for l in &mut self.limits {
            if let Some(now) = l.refresh() {
                *l = now;
            }
            if l.headroom() < need {
                return Err(Shortfall::Cgroup(l.clone()));
            }
        }
        if let Ok(h) = host::HostMemory::read() {
            if h.available > 0 && h.available < need {
                return Err(Shortfall::Host {
                    available: h.available,
                });
            }
        }
        Ok(())
    }
}

/// Populates `ranges` (host address, length) of guest RAM (`size` bytes in all) in
/// pieces of at most `chunk` bytes with `fill`, asking `check` before each piece
/// whether the rest still fits, so that a limit reached mid-way (another process
/// taking memory) ends with an error rather than the OOM killer.
fn populate(
    ranges: &[(u64, u64)],
    size: u64,
    chunk: u64,
    mut check: impl FnMut(u64) -> Result<(), Shortfall>,
    mut fill: impl FnMut(u64, u64) -> std::io::Result<()>,
) -> Result<(), Error> {
    let mut done = 0u64;
    for &(host, len) in ranges {
        let mut off = 0;
        while off < len {
            let n = chunk.min(len - off);
            let rest = size.saturating_sub(done);
            check(rest).map_err(|shortfall| {
                let needed = prealloc_need(size, rest);
                if done == 0 {
                    Error::PreallocWontFit {
                        size,
                        needed,
                        shortfall,
                    }
                } else {
                    Error::PreallocStopped {
                        done,
                        size,
                        needed,
                        shortfall,
                    }
                }
            })?;
            fill(host + off, n).map_err(|source| Error::Populate {
                done,
                size,
                why: populate_failure(&source),
                source,
            })?;
            off += n;
            done += n;
        }
    }
    Ok(())
}

/// What a MADV_POPULATE_WRITE error means.
fn populate_failure(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOMEM) => "the host or its memory cgroup is out of memory",
        Some(libc::EFAULT) => {
            "the memory could not be supplied (a SIGBUS: no free huge page, or the backing \
             file's file system is full)"
        }
        Some(libc::EINVAL) => "this kernel lacks MADV_POPULATE_WRITE (Linux 5.14 or later)",
        Some(libc::EHWPOISON) => "a hardware memory error",
        _ => "madvise(MADV_POPULATE_WRITE)",
    }
}

/// The directory that holds `path`.
fn parent_dir(path: &std::path::Path) -> &std::path::Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
}

/// Opens a snapshot's memory file read-only for `size` bytes of guest RAM: a file of
/// another length is refused before anything is mapped.
fn open_snapshot_file(path: &std::path::Path, size: u64) -> Result<RamFile, Error> {
    let err = |source| Error::SnapshotFile {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(err)?;
    let got = f.metadata().map_err(err)?.len();
    if got != size {
        return Err(Error::SnapshotFileSize {
            path: path.to_path_buf(),
            expected: size,
            got,
        });
    }
    Ok(RamFile::new(f))
}

/// Opens (creating if missing) the regular file at `path` for `size` bytes of guest
/// RAM and locks it, so two VMs never share one file by mistake. A file it creates is
/// removed again if the start fails ([`RamFile`]).
fn open_backing_file(path: &std::path::Path, size: u64, huge: bool) -> Result<RamFile, Error> {
    let bad = |what: String| Error::BackingFile {
        path: path.to_path_buf(),
        what,
    };
    let io = |source| Error::BackingFileIo {
        path: path.to_path_buf(),
        source,
    };
    // A regular file of size 0 or exactly `size`; anything else is refused by name.
    let check = |meta: &std::fs::Metadata| {
        if let Some(kind) = crate::file::special_kind(meta.file_type()) {
            return Err(bad(format!("is a {kind}; give a regular file path")));
        }
        if meta.len() != 0 && meta.len() != size {
            return Err(bad(format!(
                "holds {} bytes but guest memory is {size} bytes; remove it or give another path",
                meta.len()
            )));
        }
        Ok(())
    };
    // Checked before opening too, so that opening never touches a device or FIFO.
    if let Ok(meta) = std::fs::metadata(path) {
        check(&meta)?;
    }
    let on_hugetlbfs = host::is_hugetlbfs(parent_dir(path)).map_err(io)?;
    if huge && !on_hugetlbfs {
        return Err(bad(
            "is not on hugetlbfs; --hugepages=hugetlbfs with a file needs a hugetlbfs mount".into(),
        ));
    }
    // O_EXCL says whether this run created the file; if it exists, it is opened as is.
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).mode(0o600);
    let (f, created) = match opts.clone().create_new(true).open(path) {
        Ok(f) => (f, true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            (opts.open(path).map_err(io)?, false)
        }
        Err(e) => return Err(io(e)),
    };
    let mut ram_file = RamFile::new(f);
    if created {
        use std::os::unix::fs::MetadataExt;
        let m = ram_file.file.metadata().map_err(io)?;
        ram_file.created = Some(CreatedFile {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        });
    }
    let f = &ram_file.file;
    // What was opened is what was checked (the path may have changed in between).
    check(&f.metadata().map_err(io)?)?;
    match crate::file::lock(f, crate::file::Lock::Exclusive) {
        Ok(()) => {}
        Err(crate::file::LockFailure::Held) => {
            return Err(bad("is in use by another process (locked)".into()))
        }
        Err(crate::file::LockFailure::Io(e)) => return Err(io(e)),
    }
    f.set_len(size)
        .map_err(|source| Error::SetLen { size, source })?;
    Ok(ram_file)
}

fn madvise(host: u64, len: u64, advice: i32, name: &'static str) -> Result<(), Error> {
    // SAFETY: `host..host+len` is one whole guest memory mapping owned by the caller's
    // GuestMemory; the advice values used here (MADV_HUGEPAGE, MADV_POPULATE_WRITE)
    // change how pages are backed, never their contents.
    unsafe { madvise_raw(host, len, advice) }.map_err(|source| Error::Madvise {
        advice: name,
        host,
        len,
        source,
    })
}

/// madvise(2) on host memory.
///
/// # Safety
/// `host..host+len` must lie inside a live guest memory mapping, and `advice` must not
/// change memory that Rust code holds references into (guest RAM is only accessed
/// through vm-memory's volatile accessors, so even a discard is fine).
unsafe fn madvise_raw(host: u64, len: u64, advice: i32) -> std::io::Result<()> {
    // SAFETY: the caller upholds this function's contract (see above).
    if unsafe { libc::madvise(host as *mut libc::c_void, len as usize, advice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The unit in which guest RAM is given back (the guest's base page size).
pub const PAGE_SIZE: u64 = 4096;

/// Why a range of guest RAM could not be given back.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    #[error("range {gpa:#x}+{len:#x} is not page-aligned")]
    Unaligned { gpa: u64, len: u64 },
    #[error("range {gpa:#x}+{len:#x} is not guest RAM")]
    NotRam { gpa: u64, len: u64 },
    #[error("madvise({advice}) of guest {gpa:#x}+{len:#x} failed")]
    Madvise {
        advice: &'static str,
        gpa: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Gives the host pages behind guest `gpa..gpa+len` back: `MADV_DONTNEED` for private
/// mappings (the next guest access gets a zero page), `MADV_REMOVE` for shared ones
/// (memfd or a shared file: DONTNEED would only unmap the page, the file keeps it).
/// Decided per region, so mixed backings work. On hugetlb memory only whole huge
/// pages can go: the part of the range covering them is discarded, the rest kept.
/// The whole range must be guest RAM, else nothing is discarded. Returns the bytes
/// given back.
pub fn discard(mem: &GuestMemory, gpa: u64, len: u64) -> Result<u64, DiscardError> {
    if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(DiscardError::Unaligned { gpa, len });
    }
    let not_ram = || DiscardError::NotRam { gpa, len };
    let end = gpa.checked_add(len).ok_or_else(not_ram)?;
    // Collect the pieces first: nothing is discarded unless all of the range is RAM.
    let mut pieces = Vec::new();
    let mut at = gpa;
    while at < end {
        let region = mem.find_region(GuestAddress(at)).ok_or_else(not_ram)?;
        let offset = at - region.start_addr().0;
        let n = (end - at).min(region.len() - offset);
        pieces.push((region, offset, n, at));
        at += n;
    }
    let mut done = 0;
    for (region, mut offset, mut n, mut piece_gpa) in pieces {
        if region.is_hugetlbfs() == Some(true) {
            let start = offset.next_multiple_of(HUGE_PAGE_SIZE);
            let end = (offset + n) / HUGE_PAGE_SIZE * HUGE_PAGE_SIZE;
            if end <= start {
                continue;
            }
            piece_gpa += start - offset;
            (offset, n) = (start, end - start);
        }
        let (advice, name) = if region.flags() & libc::MAP_SHARED != 0 {
            (libc::MADV_REMOVE, "MADV_REMOVE")
        } else {
            (libc::MADV_DONTNEED, "MADV_DONTNEED")
        };
        let host = region.as_ptr() as u64 + offset;
        // SAFETY: `host..host+n` lies inside the region's live mapping (`offset + n <=
        // region.len()`, checked above), which `mem` keeps mapped; guest RAM is only
        // accessed through vm-memory's volatile accessors, which may see zero (or file)
        // contents afterwards — the guest gave these pages up.
        unsafe { madvise_raw(host, n, advice) }.map_err(|source| DiscardError::Madvise {
            advice: name,
            gpa: piece_gpa,
            len: n,
            source,
        })?;
        done += n;
    }
    Ok(done)
}

/// Total bytes of guest RAM.
pub fn ram_size(mem: &GuestMemory) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Registers every region of `mem` with KVM, one slot per region.
pub fn register(vm: &VmFd, mem: &GuestMemory) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let guest = region.start_addr().0;
        let size = region.len();
        let host = region.as_ptr() as u64;
        let desc = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: guest,
            memory_size: size,
            userspace_addr: host,
            flags: 0,
        };
        // SAFETY: `host..host+size` is a live mapping owned by `mem`'s region, which the
        // caller keeps alive for as long as the VM (the Vmm struct owns both and drops
        // the VM fd first). Slots never overlap: regions of a GuestMemoryMmap are disjoint.
        unsafe { vm.set_user_memory_region(desc) }.map_err(|source| Error::Register {
            slot,
            guest,
            size,
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All of `cfg`'s RAM at guest address 0.
    fn whole(cfg: &MemoryConfig) -> [(u64, u64); 1] {
        [(0, cfg.size)]
    }
    use vm_memory::Bytes;

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(create(0), Err(Error::TooSmall(0))));
        assert!(matches!(create(MAX_MEM_SIZE + 1), Err(Error::TooLarge(_))));
    }

    fn cgroup_limit(limit: u64, usage: u64) -> cgroup::Limit {
        cgroup::Limit {
            dir: "/sys/fs/cgroup/test".into(),
            version: cgroup::Version::V2,
            limit,
            usage,
            reclaimable: 0,
        }
    }

    /// Issue 13 defect 10: populating in one madvise let a limit reached mid-way end in
    /// the OOM killer. In pieces, with the limit checked before each, it is an error.
    #[test]
    fn populate_checks_between_chunks_and_stops_with_an_error() {
        const C: u64 = POPULATE_CHUNK;
        let ranges = [(0x1000_0000, 3 * C), (0x9000_0000, C + 4096)];
        let size = 4 * C + 4096;
        // Everything fits: every piece filled, the rest asked for before each.
        let (mut asked, mut filled) = (Vec::new(), Vec::new());
        populate(
            &ranges,
            size,
            C,
            |rest| {
                asked.push(rest);
                Ok(())
            },
            |h, l| {
                filled.push((h, l));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            asked,
            vec![size, size - C, size - 2 * C, size - 3 * C, 4096]
        );
        assert_eq!(filled.len(), 5);
        assert_eq!(filled[3], (0x9000_0000, C));
        assert_eq!(filled[4], (0x9000_0000 + C, 4096));
        assert_eq!(filled.iter().map(|f| f.1).sum::<u64>(), size);

        // The limit is reached after two pieces: an error naming the cgroup and how
        // far it got, and nothing more is filled.
        let mut n = 0;
        let e = populate(
            &ranges,
            size,
            C,
            |_| {
                n += 1;
                if n > 2 {
                    Err(Shortfall::Cgroup(cgroup_limit(256 << 20, 250 << 20)))
                } else {
                    Ok(())
                }
            },
            |_, _| Ok(()),
        )
        .unwrap_err();
        assert!(matches!(e, Error::PreallocStopped { done, .. } if done == 2 * C));
        let msg = e.to_string();
        assert!(msg.contains("after populating 128 of 256 MiB"), "{msg}");
        assert!(
            msg.contains("memory cgroup /sys/fs/cgroup/test has a limit of 256 MiB (memory.max)"),
            "{msg}"
        );

        // Refused before the first piece: nothing populated.
        let e = populate(
            &ranges,
            size,
            C,
            |_| Err(Shortfall::Host { available: 1 << 20 }),
            |_, _| panic!("filled"),
        )
        .unwrap_err();
        assert!(matches!(e, Error::PreallocWontFit { .. }), "{e}");
        assert!(
            e.to_string().contains("the host has 1 MiB available"),
            "{e}"
        );

        // A madvise error (ENOMEM) is an error saying what it means, not a panic.
        let e = populate(
            &ranges,
            size,
            C,
            |_| Ok(()),
            |h, _| {
                if h > 0x1000_0000 {
                    Err(std::io::Error::from_raw_os_error(libc::ENOMEM))
                } else {
                    Ok(())
                }
            },
        )
        .unwrap_err();
        let msg = crate::errors::chain(&e);
        assert!(
            msg.contains(
                "failed after 64 of 256 MiB (the host or its memory cgroup is out of memory)"
            ),
            "{msg}"
        );
    }

    #[test]
    fn prealloc_of_real_memory_in_chunks() {
        let mut cfg = MemoryConfig::new(POPULATE_CHUNK * 2 + (8 << 20));
        cfg.prealloc = true;
        let ram = create_ram(&cfg, &whole(&cfg)).unwrap();
        let rss = usage::read(&ram.mem).unwrap();
        assert!(rss.guest_rss >= cfg.size, "{rss:?}");
    }

    /// Issue 13 defect 12: a failed start left the backing file it had created.
    #[test]
    fn backing_file_created_by_a_failed_start_is_removed() {
        let dir = std::env::temp_dir().join(format!("ferrite-ramfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ram");
        let cfg = |p: &std::path::Path| MemoryConfig {
            backing: Backing::File(p.to_path_buf()),
            ..MemoryConfig::new(4 << 20)
        };
        // Created, then the start fails (dropped before keep): removed.
        let ram = create_ram(&cfg(&path), &whole(&cfg(&path))).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);
        drop(ram);
        assert!(!path.exists(), "the created file was left behind");

        // Created and the VM started (keep): it stays.
        let mut ram = create_ram(&cfg(&path), &whole(&cfg(&path))).unwrap();
        ram.file.as_mut().unwrap().keep();
        drop(ram);
        assert!(path.exists());

        // Given, not created (it exists, even empty): never removed.
        drop(create_ram(&cfg(&path), &whole(&cfg(&path))).unwrap());
        assert!(path.exists());
        std::fs::remove_file(&path).unwrap();
        std::fs::File::create(&path).unwrap();
        drop(create_ram(&cfg(&path), &whole(&cfg(&path))).unwrap());
        assert!(path.exists(), "a file this run did not create was removed");
        std::fs::remove_file(&path).unwrap();

        // Created, but the path names another file by the time it is dropped: that
        // file is not this run's and stays.
        let ram = create_ram(&cfg(&path), &whole(&cfg(&path))).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(ram);
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");

        // A second start refused because the file is locked did not create it and
        // removes nothing.
        std::fs::remove_file(&path).unwrap();
        let holder = create_ram(&cfg(&path), &whole(&cfg(&path))).unwrap();
        assert!(create_ram(&cfg(&path), &whole(&cfg(&path))).is_err());
        assert!(
            path.exists(),
            "the second start removed the first one's file"
        );
        drop(holder);
        assert!(!path.exists());
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn ram_is_mapped_at_the_ranges_given_and_they_must_add_up() {
        let (hole, high) = (3u64 << 30, 4u64 << 30);
        let cfg = MemoryConfig::new(4 << 30);
        let mem = create_ram(&cfg, &[(0, hole), (high, 1 << 30)]).unwrap().mem;
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0xabu8, GuestAddress(high)).unwrap();
        assert!(mem.read_obj::<u8>(GuestAddress(hole)).is_err());
        let short = create_ram(&cfg, &[(0, hole)]);
        assert!(matches!(short, Err(Error::Layout { .. })));
    }
}
