//! virtio-blk (virtio 1.2, section 5.2) backed by a regular file.
//!
//! The device model ([`Block`]) answers the transport (features, configuration space)
//! and, once activated, hands its single request queue to a worker thread
//! (`ferrite-blk-vdX`) that owns the queue, the guest memory and the interrupt. The
//! event loop's [`VirtioDevice::queue_notify`] only sets a flag and wakes the worker
//! through a condvar; all file I/O (`pread`/`pwrite`, `fdatasync`, `fallocate`) happens
//! on the worker. Guest memory is only touched through vm-memory's checked
//! `read_slice`/`write_slice`, in chunks of a bounded bounce buffer.
//!
//! Reset and activation never wait for the worker's I/O (they run on a vCPU thread
//! under the transport's and the device's mutexes). Each activation has a number (an
//! epoch); a reset bumps it. The worker touches guest memory and the rings only while
//! it holds the gate (`Shared::gate`) and has seen its activation's epoch still
//! current after taking it; it lets go of the gate for every file system call and
//! between requests. So a reset waits at most for one copy of a bounce buffer or one
//! ring update in progress, and a request whose file I/O ends after the reset is
//! abandoned: nothing is written to the guest's buffers, its status byte or the used
//! ring of that activation or the next. The thread starts at the first activation and
//! outlives resets: a new activation is handed to it (it takes the new queue once its
//! current system call returns), so a disk never has more than one worker.
//!
//! A guest can put anything in its rings. Per request: a chain with a writable status
//! byte at its end gets IOERR (or UNSUPP) there when something about it is wrong, a chain
//! without one is completed with used length 0. When the queue itself is unusable (rings
//! outside guest memory, an available index that runs ahead of the ring, a head index
//! outside the table) the worker stops serving it and calls
//! [`Interrupt::device_error`]; the driver must reset the device. Log lines about guest
//! behaviour and I/O errors are limited to one per second per device, with a count of
//! those left out.
//!
//! The image is locked with `flock` (through std's `File::try_lock*`): exclusive for a
//! writable image, shared for a read-only one, so two VMs never write one image.
//!
//! While the VM runs, a [`DiskHandle`] swaps the image (Firecracker's `PATCH /drives`):
//! the worker takes the current image at the start of each request, so a request ends
//! on the image it started on; the capacity in the configuration space changes with the
//! configuration generation, and a configuration interrupt tells the driver. The handle
//! also changes the rate limit ([`super::token_bucket`]), which the worker enforces
//! before each request by waiting on its own condvar, never holding the gate.
#![forbid(unsafe_code)]

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::{offset_of, size_of};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::Level;
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use super::token_bucket::{RateLimiter, RateLimiterConfig, TokenBucketConfig};
use super::{ActivateError, Interrupt, RateLimit, VirtioDevice};
use crate::file;
use crate::memory::GuestMemory;
use crate::threads::{Joinable, Joined};

/// Bytes per sector (the unit of `sector`, `capacity` and the discard fields).
pub const SECTOR_SIZE: u64 = 512;
const SECTOR_SHIFT: u32 = 9;
/// Size of the request queue the device offers.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request: the queue size minus the header and status descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Longest chain served; longer ones (possible only through indirect tables, which are
/// not offered) fail with IOERR.
const MAX_CHAIN_DESCS: usize = QUEUE_SIZE as usize;
/// Largest discard or write-zeroes segment (64 MiB): bounds the work of one request,
/// including the zero-writing fallback.
const MAX_DISCARD_SECTORS: u32 = 1 << 17;
const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 17;
/// Segments per discard or write-zeroes request.
const MAX_DISCARD_SEG: u32 = 1;
const MAX_WRITE_ZEROES_SEG: u32 = 1;
/// Discard granularity hint, in sectors (4 KiB).
const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// Bounce buffer between guest memory and the file.
const BOUNCE_SIZE: usize = 128 << 10;
/// Request header: type (le32), reserved/ioprio (le32), sector (le64).
const HEADER_SIZE: u64 = 16;
/// Discard / write-zeroes segment: sector (le64), num_sectors (le32), flags (le32).
const DWZ_SEG_SIZE: u64 = 16;
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// How long `Drop` (not a reset) waits for the worker to end.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Used buffers between two interrupt checks while a long batch is being served.
const NOTIFY_BATCH: u32 = 32;
const CONFIG_SIZE: usize = size_of::<virtio_blk_config>();

/// Why a disk could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open disk image {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the attributes of disk image {}", path.display())]
    Metadata {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {} is a {kind}, not a regular image file", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("disk image {} is in use by another process (locked)", path.display())]
    Locked { path: PathBuf },
    #[error(
        "disk image {} is given twice (--disk {first} and --disk {second}, counting from 1{}); \
         a writable image can be attached once",
        path.display(),
        if *same_name { "" } else { ", under two names" }
    )]
    GivenTwice {
        path: PathBuf,
        first: usize,
        second: usize,
        same_name: bool,
    },
    #[error("cannot lock disk image {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot flush disk image {}", path.display())]
    Flush {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What a guest's flush does (Firecracker's drive `cache_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// VIRTIO_BLK_F_FLUSH is not offered: the guest believes its writes are stable once
    /// written (Firecracker's default). A flush sent anyway is still served.
    #[default]
    Unsafe,
    /// VIRTIO_BLK_F_FLUSH is offered and a flush is an `fdatasync` of the image.
    Writeback,
}

/// One disk: a `--disk` argument (`PATH[,ro][,serial=ID]`) or a Firecracker drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// At most 20 bytes of printable ASCII, reported by GET_ID.
    pub serial: Option<String>,
    /// `--disk` always says [`CacheType::Writeback`].
    pub cache: CacheType,
    /// No limit by default.
    pub rate_limiter: RateLimiterConfig,
}

impl DiskConfig {
    /// A writable disk on `path` without serial or rate limit, flushes offered (what
    /// `--disk PATH` means).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            serial: None,
            cache: CacheType::Writeback,
            rate_limiter: RateLimiterConfig::default(),
        }
    }
}

impl DiskConfig {
    /// Parses `PATH[,ro][,serial=ID]` (a path cannot contain a comma).
    pub fn parse(spec: &str) -> Result<Self, String> {
        const FORM: &str = "expected PATH[,ro][,serial=ID]";
        let mut parts = spec.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(format!("disk '{spec}': the image path is empty ({FORM})"));
        }
        let mut read_only = false;
        let mut serial: Option<String> = None;
        for opt in parts {
            if opt == "ro" {
                if read_only {
                    return Err(format!("disk '{spec}': ro given more than once"));
                }
                read_only = true;
            } else if let Some(id) = opt.strip_prefix("serial=") {
                if serial.is_some() {
                    return Err(format!("disk '{spec}': serial given more than once"));
                }
                check_serial(id).map_err(|why| format!("disk '{spec}': serial '{id}' {why}"))?;
                serial = Some(id.to_string());
            } else if opt.is_empty() {
                return Err(format!("disk '{spec}': empty option ({FORM})"));
            } else {
                return Err(format!(
                    "disk '{spec}': unknown option '{opt}' (options are ro and serial=ID)"
                ));
            }
        }
        Ok(Self {
            read_only,
            serial,
            ..Self::new(path)
        })
    }
}

/// Refuses an image given twice where one of them is writable: both would take the
/// image's lock, and the second would read as "in use by another process". Compared by
/// device and inode, so another name (a link) for the same file counts; a path that
/// cannot be examined is left for [`Block::new`] to report.
pub fn check_distinct(disks: &[DiskConfig]) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let ids: Vec<Option<(u64, u64)>> = disks
        .iter()
        .map(|d| std::fs::metadata(&d.path).ok().map(|m| (m.dev(), m.ino())))
        .collect();
    for (j, dj) in disks.iter().enumerate() {
        for (i, di) in disks[..j].iter().enumerate() {
            if ids[i].is_some() && ids[i] == ids[j] && !(di.read_only && dj.read_only) {
                return Err(Error::GivenTwice {
                    path: dj.path.clone(),
                    first: i + 1,
                    second: j + 1,
                    same_name: di.path == dj.path,
                });
            }
        }
    }
    Ok(())
}

fn check_serial(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("is empty".into());
    }
    if id.len() > ID_BYTES {
        return Err(format!(
            "is {} bytes long, at most {ID_BYTES} fit",
            id.len()
        ));
    }
    if !id.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err("must be printable ASCII".into());
    }
    Ok(())
}

/// Linux's name for the `index`th virtio disk: vda … vdz, vdaa … vdzz, vdaaa …
pub fn disk_name(index: usize) -> String {
    let mut letters = Vec::new();
    let mut n = index;
    loop {
        letters.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.reverse();
    format!("vd{}", String::from_utf8_lossy(&letters))
}

/// The backing file and what the worker needs to know about it.
struct Disk {
    file: File,
    path: PathBuf,
    read_only: bool,
    /// In sectors.
    capacity: u64,
    id: [u8; ID_BYTES],
    /// (device, inode) of the image.
    file_id: (u64, u64),
}

impl Disk {
    fn open(cfg: &DiskConfig) -> Result<Self, Error> {
        let mut id = [0u8; ID_BYTES];
        if let Some(serial) = &cfg.serial {
            let n = serial.len().min(ID_BYTES);
            id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        }
        Self::open_path(&cfg.path, cfg.read_only, id, None)
    }

    /// The image at `path` opened in `old`'s mode, for a swap. When `path` names the
    /// file `old` has open (a resized image), the open file is shared (its lock with
    /// it: a second `flock` of the same file would be refused as held).
    fn reopen(old: &Disk, path: &Path) -> Result<Self, Error> {
        Self::open_path(path, old.read_only, old.id, Some(old))
    }

    fn open_path(
        path: &Path,
        read_only: bool,
        id: [u8; ID_BYTES],
        old: Option<&Disk>,
    ) -> Result<Self, Error> {
        use std::os::unix::fs::MetadataExt;
        let path = path.to_path_buf();
        // O_NONBLOCK so that opening a FIFO cannot block; it has no effect on the regular
        // files that pass the check below.
        let opened = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(|source| Error::Open {
                path: path.clone(),
                source,
            })?;
        let meta = opened.metadata().map_err(|source| Error::Metadata {
            path: path.clone(),
            source,
        })?;
        if let Some(kind) = file::special_kind(meta.file_type()) {
            return Err(Error::NotRegular { path, kind });
        }
        let file_id = (meta.dev(), meta.ino());
        let file = match old {
            Some(old) if old.file_id == file_id => {
                old.file.try_clone().map_err(|source| Error::Open {
                    path: path.clone(),
                    source,
                })?
            }
            _ => {
                let how = if read_only {
                    file::Lock::Shared
                } else {
                    file::Lock::Exclusive
                };
                match file::lock(&opened, how) {
                    Ok(()) => {}
                    Err(file::LockFailure::Held) => return Err(Error::Locked { path }),
                    Err(file::LockFailure::Io(source)) => return Err(Error::Lock { path, source }),
                }
                opened
            }
        };
        let size = meta.len();
        let capacity = size >> SECTOR_SHIFT;
        if !size.is_multiple_of(SECTOR_SIZE) {
            log::warn!(
                "disk image {}: size {size} is not a multiple of {SECTOR_SIZE}; the last {} \
                 bytes are not visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        Ok(Self {
            file,
            path,
            read_only,
            capacity,
            id,
            file_id,
        })
    }

    /// The byte range of `sectors` sectors from `sector`, if it lies within the disk.
    fn byte_range(&self, sector: u64, sectors: u64) -> Option<(u64, u64)> {
        let end = sector.checked_add(sectors)?;
        if end > self.capacity {
            return None;
        }
        // Cannot overflow: capacity is a file size divided by 512.
        Some((sector << SECTOR_SHIFT, sectors << SECTOR_SHIFT))
    }
}

fn config_bytes(capacity: u64) -> Vec<u8> {
    let mut c = vec![0u8; CONFIG_SIZE];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(
        offset_of!(virtio_blk_config, capacity),
        &capacity.to_le_bytes(),
    );
    // size_max stays 0: VIRTIO_BLK_F_SIZE_MAX is not offered. Geometry and topology
    // stay 0, writeback (wce) 0.
    put(
        offset_of!(virtio_blk_config, seg_max),
        &SEG_MAX.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, blk_size),
        &(SECTOR_SIZE as u32).to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, num_queues),
        &1u16.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_discard_sectors),
        &MAX_DISCARD_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_discard_seg),
        &MAX_DISCARD_SEG.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, discard_sector_alignment),
        &DISCARD_SECTOR_ALIGNMENT.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_write_zeroes_sectors),
        &MAX_WRITE_ZEROES_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_write_zeroes_seg),
        &MAX_WRITE_ZEROES_SEG.to_le_bytes(),
    );
    put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
    c
}

/// A disk in a snapshot: its identity, checked when the snapshot is restored (the
/// guest's page cache and file systems hold what they read from this image).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub path: PathBuf,
    /// The image's size in bytes when the snapshot was taken.
    pub size_bytes: u64,
    /// The capacity the guest was told, in 512-byte sectors.
    pub sectors: u64,
    /// The GET_ID serial (NUL bytes dropped).
    pub serial: String,
    pub read_only: bool,
}

impl BlockState {
    fn of(disk: &Disk) -> Result<Self, String> {
        let meta = disk
            .file
            .metadata()
            .map_err(|e| format!("cannot read the size of {}: {e}", disk.path.display()))?;
        Ok(Self {
            path: disk.path.clone(),
            size_bytes: meta.len(),
            sectors: disk.capacity,
            serial: String::from_utf8_lossy(&disk.id)
                .trim_end_matches('\0')
                .to_owned(),
            read_only: disk.read_only,
        })
    }
}

/// A virtio block device on a regular file.
pub struct Block {
    name: String,
    thread_name: String,
    read_only: bool,
    avail_features: u64,
    acked_features: u64,
    queue_sizes: [u16; 1],
    /// Shared with the worker thread and the [`DiskHandle`]s.
    shared: Arc<Shared>,
    /// The worker, from the first activation on (it outlives resets).
    thread: Option<Joinable>,
    /// Between activate and reset.
    active: bool,
}

impl Block {
    /// Opens and locks the image of `cfg`; `index` names the disk (0 → "vda").
    pub fn new(index: usize, cfg: &DiskConfig) -> Result<Self, Error> {
        let disk = Disk::open(cfg)?;
        let short = disk_name(index);
        let mut features = (1u64 << VIRTIO_BLK_F_BLK_SIZE)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX);
        if cfg.cache == CacheType::Writeback {
            features |= 1u64 << VIRTIO_BLK_F_FLUSH;
        }
        if disk.read_only {
            features |= 1u64 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1u64 << VIRTIO_BLK_F_DISCARD) | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let name = format!("virtio-blk {short}");
        Ok(Self {
            thread_name: format!("ferrite-blk-{short}"),
            read_only: disk.read_only,
            avail_features: features,
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE],
            shared: Arc::new(Shared::new(
                name.clone(),
                disk,
                RateLimiter::new(&cfg.rate_limiter, Instant::now()),
            )),
            name,
            thread: None,
            active: false,
        })
    }

    /// A handle to swap the image and change the rate limit from another thread (the
    /// control API).
    pub fn handle(&self) -> DiskHandle {
        DiskHandle {
            shared: self.shared.clone(),
        }
    }

    /// Size of the disk in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.shared.current_disk().capacity
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn path(&self) -> PathBuf {
        self.shared.current_disk().path.clone()
    }

    /// Whether the queue is being served (between activate and reset).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Ends the current activation without waiting for the worker's file I/O: once this
    /// returns, the worker neither touches guest memory nor completes a request of that
    /// activation. It waits only for a worker inside the gate (copying at most one
    /// bounce buffer to or from guest memory, or updating a ring).
    fn retire(&mut self) {
        self.active = false;
        self.shared.epoch.fetch_add(1, Ordering::AcqRel);
        // The worker checks the epoch after taking the gate: once we had it, every
        // later look sees the new epoch.
        drop(lock(&self.shared.gate));
        let mut st = lock(&self.shared.wake);
        st.job = None;
        st.pending = false;
        // A worker waiting for the rate limiter gives up its request.
        self.shared.cond.notify_all();
    }

    /// Ends the worker thread (on drop), waiting at most [`STOP_TIMEOUT`]. A worker stuck
    /// in a file system call is left behind (logged); it touches neither guest memory nor
    /// the queue any more.
    fn stop_worker(&mut self) {
        self.retire();
        lock(&self.shared.wake).quit = true;
        self.shared.cond.notify_all();
        let Some(thread) = self.thread.take() else {
            return;
        };
        match thread.join_until(Instant::now() + STOP_TIMEOUT) {
            Joined::Finished => {}
            Joined::Panicked => log::error!("{}: the I/O thread panicked", self.name),
            Joined::TimedOut => log::error!(
                "{}: the I/O thread did not stop within {} s (stuck in file I/O?); left behind",
                self.name,
                STOP_TIMEOUT.as_secs()
            ),
        }
    }

    /// Waits until the worker has no pending work and is not serving the queue (tests
    /// only). False on timeout.
    #[cfg(test)]
    fn wait_idle(&self, timeout: Duration) -> bool {
        if self.thread.is_none() {
            return true;
        }
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.wake);
        while st.running && (st.pending || st.busy || st.job.is_some()) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// (the worker thread runs, panics it caught), once it was started (tests only).
    #[cfg(test)]
    fn worker_health(&self) -> Option<(bool, u64)> {
        self.thread.as_ref().map(|_| {
            (
                lock(&self.shared.wake).running,
                self.shared.panics.load(Ordering::Acquire),
            )
        })
    }

    /// Runs `hook` on the worker before each of its file system calls, with the gate
    /// released (tests only: holds a request's I/O to test resets meanwhile).
    #[cfg(test)]
    fn set_io_hook(&self, hook: Arc<dyn Fn() + Send + Sync>) {
        *lock(&self.shared.io_hook) = Some(hook);
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for Block {
    fn name(&self) -> &str {
        &self.name
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features;
    }

    /// Every field is read-only (writeback would need VIRTIO_BLK_F_CONFIG_WCE): the
    /// default `write_config` ignores writes. Read under the lock a swap holds while it
    /// changes the capacity and the generation.
    fn config_space(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Owned(config_bytes(lock(&self.shared.disk).capacity))
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let [queue] = super::take_queues(&self.name, queues, self.acked_features)?;
        // Activation without a reset in between: the old activation ends first.
        self.retire();
        // The transport's interrupt (already connected by the VM's build; tests
        // activate with interrupts of their own): a swap raises its config bit.
        *lock(&self.shared.irq) = Some(interrupt.clone());
        let job = Job {
            epoch: self.shared.epoch.load(Ordering::Acquire),
            mem,
            queue,
            interrupt,
        };
        let mut st = lock(&self.shared.wake);
        // A first pass picks up requests queued before the first notification.
        st.pending = true;
        if st.running {
            // The worker takes the new queue over when it is idle or done with the
            // system call it is in (whose request it then abandons): never waited for.
            st.job = Some(job);
            drop(st);
            self.shared.cond.notify_all();
            self.active = true;
            return Ok(());
        }
        // First activation (or the worker ended after a panic it could not catch; its
        // handle is dropped: it has returned or is returning).
        st.running = true;
        drop(st);
        let worker = WorkerState {
            name: self.name.clone(),
            epoch: job.epoch,
            mem: job.mem,
            queue: job.queue,
            interrupt: job.interrupt,
            shared: self.shared.clone(),
            bounce: vec![0u8; BOUNCE_SIZE],
            descs: Vec::with_capacity(MAX_CHAIN_DESCS),
            log: RateLimit::default(),
            broken: false,
        };
        let thread_shared = self.shared.clone();
        match Joinable::spawn(self.thread_name.clone(), move || {
            worker_main(worker, thread_shared)
        }) {
            Ok(thread) => self.thread = Some(thread),
            Err(e) => {
                let mut st = lock(&self.shared.wake);
                st.running = false;
                st.pending = false;
                return Err(ActivateError::Failed {
                    device: self.name.clone(),
                    what: format!("cannot start the I/O thread: {e}"),
                });
            }
        }
        self.active = true;
        Ok(())
    }

    fn queue_notify(&mut self, index: usize) {
        if index != 0 {
            log::debug!("{}: notification for absent queue {index}", self.name);
            return;
        }
        if self.active {
            // The worker holds this mutex only to flip flags, never across I/O.
            lock(&self.shared.wake).pending = true;
            self.shared.cond.notify_all();
        }
    }

    fn reset(&mut self) {
        self.retire();
        self.acked_features = 0;
    }

    /// The image's identity (a snapshot flushes the image first, with
    /// [`DiskHandle::flush`], outside the device's mutex). A request the worker has in
    /// progress is not waited for: it is served again after a restore (see
    /// `MmioTransport::save`).
    fn save_state(&self) -> Result<super::BackendState, String> {
        BlockState::of(&self.shared.current_disk()).map(super::BackendState::Block)
    }

    /// Refuses an image whose path, size, serial or mode is not what the snapshot's
    /// guest knows.
    fn restore_state(&mut self, state: &super::BackendState) -> Result<(), String> {
        let super::BackendState::Block(saved) = state else {
            return Err(format!("the snapshot holds the state of {}", state.kind()));
        };
        let now = BlockState::of(&self.shared.current_disk())?;
        if saved.path != now.path {
            return Err(format!(
                "image changed from {} to {}",
                saved.path.display(),
                now.path.display()
            ));
        }
        if saved.size_bytes != now.size_bytes || saved.sectors != now.sectors {
            return Err(format!(
                "size of {} changed from {} to {} bytes",
                now.path.display(),
                saved.size_bytes,
                now.size_bytes
            ));
        }
        if saved.serial != now.serial {
            return Err(format!(
                "serial changed from {:?} to {:?}",
                saved.serial, now.serial
            ));
        }
        if saved.read_only != now.read_only {
            let mode = |ro| if ro { "read-only" } else { "writable" };
            return Err(format!(
                "mode changed from {} to {}",
                mode(saved.read_only),
                mode(now.read_only)
            ));
        }
        Ok(())
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Shared between the device (event loop / vCPU side), its worker and its
/// [`DiskHandle`]s.
struct Shared {
    /// The device's name, for logs.
    name: String,
    /// The image requests are served on from now on (a request in progress keeps the
    /// one it started on). Also taken by configuration reads: a swap changes the
    /// capacity and the generation under it.
    disk: Mutex<Arc<Disk>>,
    /// One swap at a time.
    swapping: Mutex<()>,
    /// The device's interrupt, for configuration changes (None until connected or
    /// activated).
    irq: Mutex<Option<Arc<Interrupt>>>,
    /// Taken by the worker before each request; changed by [`DiskHandle`].
    limiter: Mutex<RateLimiter>,
    wake: Mutex<WakeState>,
    cond: Condvar,
    /// Held by the worker while it touches guest memory or the rings, never across a
    /// file system call; a reset takes it once after bumping `epoch`.
    gate: Mutex<()>,
    /// The current activation's number: bumped by every reset and activation.
    epoch: AtomicU64,
    /// Panics caught while serving the queue (there should be none).
    panics: AtomicU64,
    #[cfg(test)]
    io_hook: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

impl Shared {
    fn new(name: String, disk: Disk, limiter: RateLimiter) -> Self {
        Self {
            name,
            disk: Mutex::new(Arc::new(disk)),
            swapping: Mutex::new(()),
            irq: Mutex::new(None),
            limiter: Mutex::new(limiter),
            wake: Mutex::default(),
            cond: Condvar::new(),
            gate: Mutex::new(()),
            epoch: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            #[cfg(test)]
            io_hook: Mutex::new(None),
        }
    }

    fn current_disk(&self) -> Arc<Disk> {
        lock(&self.disk).clone()
    }
}

/// A disk's controls from outside the VM's threads (Firecracker's `PATCH /drives`):
/// swap its image, change its rate limit, read what is in force. Cheap to clone.
#[derive(Clone)]
pub struct DiskHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for DiskHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskHandle")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl DiskHandle {
    /// "virtio-blk vda".
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The image requests go to now.
    pub fn path(&self) -> PathBuf {
        self.shared.current_disk().path.clone()
    }

    /// The capacity the guest is told, in bytes (the image's size rounded down to whole
    /// sectors).
    pub fn capacity_bytes(&self) -> u64 {
        self.shared.current_disk().capacity << SECTOR_SHIFT
    }

    pub fn read_only(&self) -> bool {
        self.shared.current_disk().read_only
    }

    /// Makes `path` the disk's image (Firecracker's `PATCH /drives/{id}` with
    /// `path_on_host`; the same path again after the file behind it was replaced or
    /// resized reopens it). The file is opened in the disk's mode and locked like the
    /// first one (a file this disk already has open keeps its lock); then requests
    /// started from now on go to it (one in progress ends on the old file, which is
    /// closed and unlocked after it), the capacity in the configuration space
    /// changes, the configuration generation moves on and a configuration interrupt
    /// tells the driver (Linux logs "capacity change"). Returns the new capacity in
    /// bytes. On error the disk keeps its image.
    pub fn swap(&self, path: &Path) -> Result<u64, Error> {
        let _one = lock(&self.shared.swapping);
        let old = self.shared.current_disk();
        let new = Disk::reopen(&old, path)?;
        drop(old);
        let (bytes, sectors) = (new.capacity << SECTOR_SHIFT, new.capacity);
        let irq = lock(&self.shared.irq).clone();
        let old = {
            let mut current = lock(&self.shared.disk);
            let old = std::mem::replace(&mut *current, Arc::new(new));
            // Under the lock configuration reads take: a driver reading the capacity
            // in two halves around the swap sees the generation change.
            if let Some(irq) = &irq {
                irq.bump_config_generation();
            }
            old
        };
        // Closed (and unlocked) here, or after the request in progress on it.
        drop(old);
        log::info!(
            "{}: image {} ({sectors} sectors)",
            self.shared.name,
            path.display()
        );
        if let Some(irq) = &irq {
            irq.signal_config();
        }
        Ok(bytes)
    }

    /// Changes the rate limit (Firecracker's `PATCH /drives/{id}` with
    /// `rate_limiter`): a bucket given replaces the one in force and starts full, None
    /// keeps it, one of size 0 or refill time 0 removes that limit. A worker waiting
    /// for tokens looks again at once.
    pub fn set_rate_limiter(
        &self,
        bandwidth: Option<&TokenBucketConfig>,
        ops: Option<&TokenBucketConfig>,
    ) {
        lock(&self.shared.limiter).update(bandwidth, ops, Instant::now());
        let _st = lock(&self.shared.wake);
        self.shared.cond.notify_all();
    }

    /// `fdatasync` of a writable image (a snapshot's first step): what the guest wrote
    /// so far is on stable storage. A read-only image has nothing to flush.
    pub fn flush(&self) -> Result<(), Error> {
        let disk = self.shared.current_disk();
        if disk.read_only {
            return Ok(());
        }
        disk.file.sync_data().map_err(|source| Error::Flush {
            path: disk.path.clone(),
            source,
        })
    }

    /// The rate limit in force.
    pub fn rate_limiter(&self) -> RateLimiterConfig {
        lock(&self.shared.limiter).config()
    }

    /// Connects the transport's interrupt before the driver activates the device, so
    /// that a swap before activation moves the configuration generation too (the VM's
    /// build does this).
    pub fn connect_interrupt(&self, interrupt: Arc<Interrupt>) {
        *lock(&self.shared.irq) = Some(interrupt);
    }
}

#[derive(Default)]
struct WakeState {
    /// A new activation for the worker to take over.
    job: Option<Job>,
    /// A notification for the current activation arrived since the worker last looked.
    pending: bool,
    /// The worker is serving the queue.
    busy: bool,
    /// The worker thread runs (cleared when its function ends).
    running: bool,
    /// The device is being dropped: the worker ends.
    quit: bool,
}

/// What the worker needs to serve one activation.
struct Job {
    epoch: u64,
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// Clears `WakeState::running` when dropped (the worker returning or unwinding).
struct RunningGuard(Arc<Shared>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        lock(&self.0.wake).running = false;
        self.0.cond.notify_all();
    }
}

/// The activation a worker was serving has ended: abandon the request.
#[derive(Debug)]
struct Stopped;

/// The worker's right to touch guest memory and the rings of activation `epoch`: it
/// holds `Shared::gate` and saw `epoch` still current after taking it.
struct Gate<'a> {
    shared: &'a Shared,
    epoch: u64,
    held: Option<MutexGuard<'a, ()>>,
}

impl<'a> Gate<'a> {
    fn enter(shared: &'a Shared, epoch: u64) -> Result<Self, Stopped> {
        let mut gate = Self {
            shared,
            epoch,
            held: None,
        };
        gate.reenter()?;
        Ok(gate)
    }

    fn current(&self) -> bool {
        self.shared.epoch.load(Ordering::Acquire) == self.epoch
    }

    fn reenter(&mut self) -> Result<(), Stopped> {
        // Not even contending with a reset that already bumped the epoch.
        if !self.current() {
            return Err(Stopped);
        }
        let held = lock(&self.shared.gate);
        if !self.current() {
            return Err(Stopped);
        }
        self.held = Some(held);
        Ok(())
    }

    /// Lets go of the gate (to wait; [`Self::reenter`] takes it back).
    fn release(&mut self) {
        self.held = None;
    }

    /// Lets a reset waiting for the gate in (between two requests).
    fn pause(&mut self) -> Result<(), Stopped> {
        self.held = None;
        self.reenter()
    }

    /// Runs `io`, a file system call, with the gate released; `Stopped` if the
    /// activation ended meanwhile (the result is then dropped unseen by the guest).
    fn unlocked<T>(&mut self, io: impl FnOnce() -> T) -> Result<T, Stopped> {
        self.held = None;
        #[cfg(test)]
        {
            let hook = lock(&self.shared.io_hook).clone();
            if let Some(hook) = hook {
                hook();
            }
        }
        let result = io();
        self.reenter()?;
        Ok(result)
    }
}

/// A descriptor as read from the table (the chain iterator checked nothing but the
/// index and the 2^32-byte chain limit).
#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    write: bool,
}

/// A checked piece of guest memory.
#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: GuestAddress,
    len: u64,
}

fn total(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// `segs` without their first `n` bytes.
fn skip(segs: &[Seg], mut n: u64) -> Vec<Seg> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        if n >= s.len {
            n -= s.len;
            continue;
        }
        // s.addr + n is inside the checked range, so it does not overflow.
        out.push(Seg {
            addr: GuestAddress(s.addr.0 + n),
            len: s.len - n,
        });
        n = 0;
    }
    out
}

/// Sequential access to a scatter-gather list in guest memory.
///
/// Hand-written rather than virtio-queue's `descriptor_utils::Reader`/`Writer`: the one
/// walk that checks a chain (length, readable-before-writable order, every range inside
/// guest memory, where the status byte is) must stay, because Reader/Writer check none
/// of that; on top of it they walk the chain again each (vm-memory translation per
/// descriptor). Measured with both under callgrind: +33-37% instructions per request
/// (3-16 descriptors) for 76 fewer lines. This cursor reuses the checked segments.
struct SgCursor<'a> {
    segs: &'a [Seg],
    idx: usize,
    off: u64,
}

impl<'a> SgCursor<'a> {
    fn new(segs: &'a [Seg]) -> Self {
        Self {
            segs,
            idx: 0,
            off: 0,
        }
    }

    /// Calls `f(address, start, end)` for consecutive pieces covering `len` bytes.
    fn walk(
        &mut self,
        len: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), vm_memory::GuestMemoryError>,
    ) -> Result<(), ()> {
        let mut done = 0usize;
        while done < len {
            let seg = self.segs.get(self.idx).ok_or(())?;
            let left = seg.len - self.off;
            if left == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(len - done);
            f(GuestAddress(seg.addr.0 + self.off), done, done + n).map_err(|_| ())?;
            done += n;
            self.off += n as u64;
        }
        Ok(())
    }

    fn read_into(&mut self, mem: &GuestMemory, buf: &mut [u8]) -> Result<(), ()> {
        let len = buf.len();
        self.walk(len, |addr, a, b| mem.read_slice(&mut buf[a..b], addr))
    }

    fn write_from(&mut self, mem: &GuestMemory, buf: &[u8]) -> Result<(), ()> {
        self.walk(buf.len(), |addr, a, b| mem.write_slice(&buf[a..b], addr))
    }
}

/// What became of a request: the status byte and the data bytes written to the guest.
struct Outcome {
    status: u8,
    written: u64,
}

impl Outcome {
    fn ok(written: u64) -> Self {
        Self {
            status: VIRTIO_BLK_S_OK as u8,
            written,
        }
    }
    fn ioerr(written: u64) -> Self {
        Self {
            status: VIRTIO_BLK_S_IOERR as u8,
            written,
        }
    }
    fn unsupp() -> Self {
        Self {
            status: VIRTIO_BLK_S_UNSUPP as u8,
            written: 0,
        }
    }
}

/// A rate-limited warning about the guest's requests.
macro_rules! guest_warn {
    ($w:expr, $($arg:tt)*) => {
        $w.log.log(Level::Warn, &$w.name, format_args!($($arg)*))
    };
}

/// A rate-limited error from the host side (the image file).
macro_rules! host_error {
    ($w:expr, $($arg:tt)*) => {
        $w.log.log(Level::Error, &$w.name, format_args!($($arg)*))
    };
}

/// Everything the worker thread owns.
struct WorkerState {
    name: String,
    /// The activation being served; the fields below belong to it.
    epoch: u64,
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
    shared: Arc<Shared>,
    bounce: Vec<u8>,
    descs: Vec<Desc>,
    log: RateLimit,
    /// The queue is unusable until the driver resets the device.
    broken: bool,
}

fn worker_main(mut w: WorkerState, shared: Arc<Shared>) {
    crate::seccomp::enter(crate::seccomp::ThreadKind::BlockWorker);
    let _running = RunningGuard(shared.clone());
    w.check_queue();
    loop {
        let job = {
            let mut st = lock(&shared.wake);
            while !st.quit && !st.pending && st.job.is_none() {
                st = shared.cond.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.quit {
                return;
            }
            st.pending = false;
            st.busy = true;
            st.job.take()
        };
        if let Some(job) = job {
            w.take_over(job);
        }
        if !w.broken {
            let served = catch_unwind(AssertUnwindSafe(|| w.serve_queue()));
            if served.is_err() {
                shared.panics.fetch_add(1, Ordering::AcqRel);
                log::error!("{}: the I/O thread panicked serving the queue", w.name);
                w.broken = true;
                if let Ok(_gate) = Gate::enter(&shared, w.epoch) {
                    w.interrupt.device_error();
                }
            }
        }
        lock(&shared.wake).busy = false;
        shared.cond.notify_all();
    }
}

impl WorkerState {
    /// Serves a new activation from now on (the old one's request, if any, was
    /// abandoned).
    fn take_over(&mut self, job: Job) {
        self.epoch = job.epoch;
        self.mem = job.mem;
        self.queue = job.queue;
        self.interrupt = job.interrupt;
        self.broken = false;
        self.check_queue();
    }

    fn check_queue(&mut self) {
        if self.queue.is_valid(&self.mem) {
            return;
        }
        let shared = self.shared.clone();
        let Ok(_gate) = Gate::enter(&shared, self.epoch) else {
            return;
        };
        self.queue_broken(format_args!(
            "the request queue is not usable (not ready, or its rings are not in guest memory)"
        ));
    }

    /// The queue cannot be served any more: tell the driver it must reset the device.
    /// Called inside the gate.
    fn queue_broken(&mut self, args: fmt::Arguments<'_>) {
        self.log.log(
            Level::Error,
            &self.name,
            format_args!("{args}; the device needs a reset"),
        );
        if !self.broken {
            self.broken = true;
            self.interrupt.device_error();
        }
    }

    /// Raises the interrupt if the driver wants one; false if the queue is broken.
    fn notify_if_needed(&mut self) -> bool {
        match self.queue.needs_notification(&self.mem) {
            Ok(true) => {
                self.interrupt.signal_used();
                true
            }
            Ok(false) => true,
            Err(e) => {
                self.queue_broken(format_args!("cannot read the used event index: {e}"));
                false
            }
        }
    }

    /// Serves every available chain of the current activation, inside the gate.
    fn serve_queue(&mut self) {
        let shared = self.shared.clone();
        let Ok(mut gate) = Gate::enter(&shared, self.epoch) else {
            return;
        };
        // Stopped: a reset ended the activation; nothing more is touched.
        let _ = self.serve_gated(&mut gate);
    }

    /// Serves every available chain, with notifications suppressed while doing so.
    fn serve_gated(&mut self, gate: &mut Gate<'_>) -> Result<(), Stopped> {
        let mut idle_rounds = 0u32;
        loop {
            if let Err(e) = self.queue.disable_notification(&self.mem) {
                self.queue_broken(format_args!("cannot suppress notifications: {e}"));
                return Ok(());
            }
            let mut handled = 0u32;
            loop {
                // Between two requests a reset waiting for the gate goes first.
                gate.pause()?;
                let mut descs = std::mem::take(&mut self.descs);
                let next = match self.queue.iter(&self.mem) {
                    Ok(mut avail) => avail.next().map(|chain| {
                        let head = chain.head_index();
                        let last = collect_chain(chain, &mut descs);
                        (head, last)
                    }),
                    Err(e) => {
                        self.descs = descs;
                        self.queue_broken(format_args!("cannot read the available ring: {e}"));
                        return Ok(());
                    }
                };
                let Some((head, last)) = next else {
                    self.descs = descs;
                    break;
                };
                let used = self.handle_chain(gate, &descs, last);
                self.descs = descs;
                // Stopped: a reset under way; the rings may already belong to a new
                // activation.
                let used = used?;
                if let Err(e) = self.queue.add_used(&self.mem, head, used) {
                    self.queue_broken(format_args!(
                        "cannot complete the chain at descriptor {head}: {e}"
                    ));
                    return Ok(());
                }
                handled += 1;
                if handled.is_multiple_of(NOTIFY_BATCH) && !self.notify_if_needed() {
                    return Ok(());
                }
            }
            if !handled.is_multiple_of(NOTIFY_BATCH) && !self.notify_if_needed() {
                return Ok(());
            }
            match self.queue.enable_notification(&self.mem) {
                Ok(false) => return Ok(()),
                Ok(true) if handled == 0 => {
                    // The index moved but no chain could be read. Once can be a race with
                    // the driver; twice in a row means the ring cannot be read.
                    idle_rounds += 1;
                    if idle_rounds >= 2 {
                        self.queue_broken(format_args!(
                            "the available ring has entries that cannot be read"
                        ));
                        return Ok(());
                    }
                }
                Ok(true) => idle_rounds = 0,
                Err(e) => {
                    self.queue_broken(format_args!("cannot re-enable notifications: {e}"));
                    return Ok(());
                }
            }
        }
    }

    /// Serves one request (`descs`, the first descriptors of a chain ending with `last`);
    /// returns the used length (bytes written to guest memory), or `Stopped` when the
    /// activation ended while its file I/O ran (nothing is written then).
    fn handle_chain(
        &mut self,
        gate: &mut Gate<'_>,
        descs: &[Desc],
        last: Option<(Desc, usize)>,
    ) -> Result<u32, Stopped> {
        let too_long = last.is_some_and(|(_, count)| count > descs.len());
        // The status byte: the last byte of the last descriptor, which must be writable.
        let status_addr = last.and_then(|(d, _)| {
            if !d.write || d.len == 0 {
                return None;
            }
            let addr = d.addr.0.checked_add(u64::from(d.len) - 1)?;
            GuestMemoryBackend::check_range(&self.mem, GuestAddress(addr), 1)
                .then_some(GuestAddress(addr))
        });
        let Some(status_addr) = status_addr else {
            guest_warn!(
                self,
                "request without a device-writable status byte; completed with nothing written"
            );
            return Ok(0);
        };
        let outcome = self.serve_request(gate, descs, too_long)?;
        if self.mem.write_obj(outcome.status, status_addr).is_err() {
            // Checked above; guest memory does not change while the VM runs.
            return Ok(0);
        }
        Ok(u32::try_from(outcome.written.saturating_add(1)).unwrap_or(u32::MAX))
    }

    fn serve_request(
        &mut self,
        gate: &mut Gate<'_>,
        descs: &[Desc],
        too_long: bool,
    ) -> Result<Outcome, Stopped> {
        if too_long {
            guest_warn!(
                self,
                "request chain longer than {MAX_CHAIN_DESCS} descriptors"
            );
            return Ok(Outcome::ioerr(0));
        }
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut seen_writable = false;
        for d in descs {
            seen_writable |= d.write;
            if !d.write && seen_writable {
                guest_warn!(
                    self,
                    "device-readable descriptor after a device-writable one"
                );
                return Ok(Outcome::ioerr(0));
            }
            if d.len == 0 {
                continue;
            }
            let len = u64::from(d.len);
            let in_memory = d.addr.0.checked_add(len).is_some()
                && usize::try_from(len)
                    .is_ok_and(|l| GuestMemoryBackend::check_range(&self.mem, d.addr, l));
            if !in_memory {
                guest_warn!(
                    self,
                    "descriptor {:#x}+{:#x} is not in guest memory",
                    d.addr.0,
                    d.len
                );
                return Ok(Outcome::ioerr(0));
            }
            let seg = Seg { addr: d.addr, len };
            if d.write {
                writable.push(seg);
            } else {
                readable.push(seg);
            }
        }
        // The last writable byte is the status byte.
        if let Some(last) = writable.last_mut() {
            last.len -= 1;
            if last.len == 0 {
                writable.pop();
            }
        }
        if total(&readable) < HEADER_SIZE {
            guest_warn!(
                self,
                "request without a {HEADER_SIZE}-byte device-readable header"
            );
            return Ok(Outcome::ioerr(0));
        }
        let mut header = [0u8; HEADER_SIZE as usize];
        if SgCursor::new(&readable)
            .read_into(&self.mem, &mut header)
            .is_err()
        {
            return Ok(Outcome::ioerr(0));
        }
        let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let data_out = skip(&readable, HEADER_SIZE);
        let out_len = total(&data_out);
        let in_len = total(&writable);
        // Firecracker's accounting: one operation per request, and the data bytes of a
        // read or a write.
        let bytes = match req_type {
            VIRTIO_BLK_T_IN => in_len,
            VIRTIO_BLK_T_OUT => out_len,
            _ => 0,
        };
        self.throttle(gate, bytes)?;
        // The image this request is served on, to its end, even if it is swapped
        // meanwhile; the next request takes the new one.
        let disk = self.shared.current_disk();
        let disk = &*disk;

        match req_type {
            VIRTIO_BLK_T_IN => {
                if out_len != 0 {
                    guest_warn!(self, "read request with device-readable data");
                    return Ok(Outcome::ioerr(0));
                }
                self.read(gate, disk, sector, &writable, in_len)
            }
            VIRTIO_BLK_T_OUT => {
                if in_len != 0 {
                    guest_warn!(self, "write request with device-writable data");
                    return Ok(Outcome::ioerr(0));
                }
                if disk.read_only {
                    guest_warn!(self, "write to a read-only disk refused");
                    return Ok(Outcome::ioerr(0));
                }
                self.write(gate, disk, sector, &data_out, out_len)
            }
            VIRTIO_BLK_T_FLUSH => {
                if out_len != 0 || in_len != 0 {
                    guest_warn!(self, "flush request with data");
                    return Ok(Outcome::ioerr(0));
                }
                if disk.read_only {
                    return Ok(Outcome::ok(0));
                }
                match gate.unlocked(|| disk.file.sync_data())? {
                    Ok(()) => Ok(Outcome::ok(0)),
                    Err(e) => {
                        host_error!(self, "fdatasync of {} failed: {e}", disk.path.display());
                        Ok(Outcome::ioerr(0))
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                if out_len != 0 {
                    guest_warn!(self, "get-id request with device-readable data");
                    return Ok(Outcome::ioerr(0));
                }
                let n = usize::try_from(in_len).unwrap_or(usize::MAX).min(ID_BYTES);
                let id = disk.id;
                Ok(
                    match SgCursor::new(&writable).write_from(&self.mem, &id[..n]) {
                        Ok(()) => Outcome::ok(n as u64),
                        Err(()) => Outcome::ioerr(0),
                    },
                )
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let discard = req_type == VIRTIO_BLK_T_DISCARD;
                let what = if discard { "discard" } else { "write-zeroes" };
                if in_len != 0 {
                    guest_warn!(self, "{what} request with device-writable data");
                    return Ok(Outcome::ioerr(0));
                }
                if disk.read_only {
                    guest_warn!(self, "{what} on a read-only disk refused");
                    return Ok(Outcome::ioerr(0));
                }
                self.discard_or_zero(gate, disk, discard, &data_out, out_len)
            }
            other => {
                guest_warn!(self, "unsupported request type {other}");
                Ok(Outcome::unsupp())
            }
        }
    }

    /// Waits until the rate limiter lets a request of `bytes` data bytes through (one
    /// operation and its bytes), with the gate let go: only this disk's worker waits,
    /// and a reset, the device going away or a new limit ends the wait at once
    /// (`Stopped` for the first two: the request is abandoned).
    fn throttle(&mut self, gate: &mut Gate<'_>, bytes: u64) -> Result<(), Stopped> {
        let shared = self.shared.clone();
        if lock(&shared.limiter).take(1, bytes, Instant::now()).is_ok() {
            return Ok(());
        }
        // The requests completed before this one are not held back with it.
        if !self.notify_if_needed() {
            return Err(Stopped);
        }
        gate.release();
        let mut st = lock(&shared.wake);
        loop {
            // Looked at under the wake lock, which a reset, a drop and a new limit
            // take before they notify: no wake-up is missed.
            if st.quit || !gate.current() {
                return Err(Stopped);
            }
            let wait = match lock(&shared.limiter).take(1, bytes, Instant::now()) {
                Ok(()) => break,
                Err(wait) => wait,
            };
            st = shared
                .cond
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(st);
        gate.reenter()
    }

    /// Checks an IN/OUT data length and sector; the file offset and length.
    fn data_range(&mut self, disk: &Disk, sector: u64, len: u64, what: &str) -> Option<(u64, u64)> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            guest_warn!(
                self,
                "{what} of {len} bytes, not a multiple of {SECTOR_SIZE}"
            );
            return None;
        }
        let range = disk.byte_range(sector, len >> SECTOR_SHIFT);
        if range.is_none() {
            guest_warn!(
                self,
                "{what} of {} sectors at sector {sector} is beyond the disk ({} sectors)",
                len >> SECTOR_SHIFT,
                disk.capacity
            );
        }
        range
    }

    fn read(
        &mut self,
        gate: &mut Gate<'_>,
        disk: &Disk,
        sector: u64,
        segs: &[Seg],
        len: u64,
    ) -> Result<Outcome, Stopped> {
        let Some((mut offset, mut left)) = self.data_range(disk, sector, len, "read") else {
            return Ok(Outcome::ioerr(0));
        };
        let mut cursor = SgCursor::new(segs);
        let mut written = 0u64;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(BOUNCE_SIZE);
            let bounce = &mut self.bounce[..n];
            if let Err(e) = gate.unlocked(|| disk.file.read_exact_at(bounce, offset))? {
                host_error!(
                    self,
                    "read of {n} bytes at offset {offset} of {} failed: {e}",
                    disk.path.display()
                );
                return Ok(Outcome::ioerr(written));
            }
            if cursor.write_from(&self.mem, &self.bounce[..n]).is_err() {
                return Ok(Outcome::ioerr(written));
            }
            written += n as u64;
            offset += n as u64;
            left -= n as u64;
        }
        Ok(Outcome::ok(written))
    }

    fn write(
        &mut self,
        gate: &mut Gate<'_>,
        disk: &Disk,
        sector: u64,
        segs: &[Seg],
        len: u64,
    ) -> Result<Outcome, Stopped> {
        let Some((mut offset, mut left)) = self.data_range(disk, sector, len, "write") else {
            return Ok(Outcome::ioerr(0));
        };
        let mut cursor = SgCursor::new(segs);
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(BOUNCE_SIZE);
            if cursor.read_into(&self.mem, &mut self.bounce[..n]).is_err() {
                return Ok(Outcome::ioerr(0));
            }
            let bounce = &self.bounce[..n];
            if let Err(e) = gate.unlocked(|| disk.file.write_all_at(bounce, offset))? {
                host_error!(
                    self,
                    "write of {n} bytes at offset {offset} of {} failed: {e}",
                    disk.path.display()
                );
                return Ok(Outcome::ioerr(0));
            }
            offset += n as u64;
            left -= n as u64;
        }
        Ok(Outcome::ok(0))
    }

    fn discard_or_zero(
        &mut self,
        gate: &mut Gate<'_>,
        disk: &Disk,
        discard: bool,
        segs: &[Seg],
        len: u64,
    ) -> Result<Outcome, Stopped> {
        let what = if discard { "discard" } else { "write-zeroes" };
        let (max_segs, max_sectors) = if discard {
            (MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
        } else {
            (MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SECTORS)
        };
        if len == 0 || !len.is_multiple_of(DWZ_SEG_SIZE) || len / DWZ_SEG_SIZE > u64::from(max_segs)
        {
            guest_warn!(
                self,
                "{what} request with {len} bytes of segments (1 to {max_segs} of {DWZ_SEG_SIZE} bytes expected)"
            );
            return Ok(Outcome::ioerr(0));
        }
        let mut cursor = SgCursor::new(segs);
        for _ in 0..len / DWZ_SEG_SIZE {
            let mut raw = [0u8; DWZ_SEG_SIZE as usize];
            if cursor.read_into(&self.mem, &mut raw).is_err() {
                return Ok(Outcome::ioerr(0));
            }
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&raw[0..8]);
            let sector = u64::from_le_bytes(sector);
            let sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
            let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
            let allowed = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                guest_warn!(self, "{what} segment with unsupported flags {flags:#x}");
                return Ok(Outcome::unsupp());
            }
            if sectors > max_sectors {
                guest_warn!(
                    self,
                    "{what} of {sectors} sectors, more than the {max_sectors} offered"
                );
                return Ok(Outcome::ioerr(0));
            }
            let Some((offset, bytes)) = disk.byte_range(sector, u64::from(sectors)) else {
                guest_warn!(
                self,
                    "{what} of {sectors} sectors at sector {sector} is beyond the disk ({} sectors)",
                    disk.capacity
                );
                return Ok(Outcome::ioerr(0));
            };
            if bytes == 0 {
                continue;
            }
            let ok = if discard {
                self.punch_hole(gate, disk, offset, bytes)?
            } else {
                self.write_zeroes(
                    gate,
                    disk,
                    offset,
                    bytes,
                    flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                )?
            };
            if !ok {
                return Ok(Outcome::ioerr(0));
            }
        }
        Ok(Outcome::ok(0))
    }

    fn punch_hole(
        &mut self,
        gate: &mut Gate<'_>,
        disk: &Disk,
        offset: u64,
        len: u64,
    ) -> Result<bool, Stopped> {
        Ok(
            match gate
                .unlocked(|| fallocate(&disk.file, FallocateMode::PunchHole, true, offset, len))?
            {
                Ok(()) => true,
                Err(e) => {
                    let why = if is_unsupported(e.errno()) {
                        "the file system does not support punching holes"
                    } else {
                        "fallocate failed"
                    };
                    host_error!(
                        self,
                        "discard of {len} bytes at offset {offset} of {}: {why} ({e})",
                        disk.path.display()
                    );
                    false
                }
            },
        )
    }

    fn write_zeroes(
        &mut self,
        gate: &mut Gate<'_>,
        disk: &Disk,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<bool, Stopped> {
        let mode = if unmap {
            FallocateMode::PunchHole
        } else {
            FallocateMode::ZeroRange
        };
        match gate.unlocked(|| fallocate(&disk.file, mode, true, offset, len))? {
            Ok(()) => return Ok(true),
            Err(e) if is_unsupported(e.errno()) => {}
            Err(e) => {
                host_error!(
                    self,
                    "write-zeroes of {len} bytes at offset {offset} of {}: fallocate failed ({e})",
                    disk.path.display()
                );
                return Ok(false);
            }
        }
        // The file system cannot do it in place: write the zeros.
        let chunk = usize::try_from(len).unwrap_or(usize::MAX).min(BOUNCE_SIZE);
        self.bounce[..chunk].fill(0);
        let (mut offset, mut left) = (offset, len);
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(chunk);
            let bounce = &self.bounce[..n];
            if let Err(e) = gate.unlocked(|| disk.file.write_all_at(bounce, offset))? {
                host_error!(
                    self,
                    "write-zeroes of {n} bytes at offset {offset} of {} failed: {e}",
                    disk.path.display()
                );
                return Ok(false);
            }
            offset += n as u64;
            left -= n as u64;
        }
        Ok(true)
    }
}

fn is_unsupported(errno: i32) -> bool {
    errno == libc::EOPNOTSUPP || errno == libc::ENOSYS || errno == libc::EINVAL
}

/// Reads the first [`MAX_CHAIN_DESCS`] descriptors of `chain` into `out`; returns the
/// chain's last descriptor and its length in descriptors (None for an empty chain).
///
/// The chain iterator ends a chain at an index outside the table, an unreadable
/// descriptor, a nested indirect table, more than 2^32 bytes in total, or after as many
/// descriptors as the table has (an indirect table resets that count once, so at most
/// 65535 more), so a loop ends and the walk is bounded.
fn collect_chain(
    chain: DescriptorChain<&GuestMemory>,
    out: &mut Vec<Desc>,
) -> Option<(Desc, usize)> {
    out.clear();
    let mut last = None;
    for (count, d) in chain.enumerate() {
        let desc = Desc {
            addr: d.addr(),
            len: d.len(),
            write: d.is_write_only(),
        };
        if out.len() < MAX_CHAIN_DESCS {
            out.push(desc);
        }
        last = Some((desc, count + 1));
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;
    use vmm_sys_util::eventfd::EventFd;
    use vmm_sys_util::tempfile::TempFile;

    use crate::bus::BusDevice;
    use crate::devices::virtio::mmio::{
        MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER,
        STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    };
    use crate::devices::virtio::{INT_CONFIG, INT_USED_RING};

    const MEM_SIZE: usize = 0x10_0000;
    const QADDR: GuestAddress = GuestAddress(0x1000);
    const QSIZE: u16 = 16;
    const HDR: u64 = 0x8000;
    const STATUS: u64 = 0x9000;
    const DATA: u64 = 0x1_0000;
    const DATA2: u64 = 0x4_0000;
    const SECTORS: u64 = 64;
    const WAIT: Duration = Duration::from_secs(10);
    const R: bool = false;
    const W: bool = true;

    fn guest_mem(size: usize) -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn pattern(i: usize) -> u8 {
        (i.wrapping_mul(7) ^ (i >> 9)) as u8 | 1
    }

    fn image(len: usize) -> TempFile {
        let t = TempFile::new_with_prefix(std::env::temp_dir().join("ferrite-blk-test-")).unwrap();
        let bytes: Vec<u8> = (0..len).map(pattern).collect();
        t.as_file().write_all_at(&bytes, 0).unwrap();
        t
    }

    fn file_bytes(t: &TempFile) -> Vec<u8> {
        std::fs::read(t.as_path()).unwrap()
    }

    fn config(t: &TempFile, read_only: bool, serial: Option<&str>) -> DiskConfig {
        DiskConfig {
            read_only,
            serial: serial.map(str::to_string),
            ..DiskConfig::new(t.as_path())
        }
    }

    fn new_interrupt() -> Arc<Interrupt> {
        Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
    }

    fn write_header(mem: &GuestMemory, addr: u64, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(addr)).unwrap();
    }

    fn write_dwz_seg(mem: &GuestMemory, addr: u64, sector: u64, sectors: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&s, GuestAddress(addr)).unwrap();
    }

    fn read_guest(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// The driver side: a mock split queue plus bookkeeping.
    struct Guest<'a> {
        mem: &'a GuestMemory,
        vq: MockSplitQueue<'a, GuestMemory>,
        next_desc: u16,
        used_seen: u16,
        interrupt: Arc<Interrupt>,
    }

    impl<'a> Guest<'a> {
        fn new(mem: &'a GuestMemory) -> Self {
            Self {
                mem,
                vq: MockSplitQueue::create(mem, QADDR, QSIZE),
                next_desc: 0,
                used_seen: 0,
                interrupt: new_interrupt(),
            }
        }

        /// Acknowledges every offered feature but `withheld`, activates, waits for the
        /// first pass.
        fn start(&self, dev: &mut Block, withheld: u64) {
            dev.set_acked_features(dev.device_features() & !withheld);
            let q: Queue = self.vq.create_queue().unwrap();
            dev.activate(self.mem.clone(), vec![q], self.interrupt.clone())
                .unwrap();
            assert!(dev.wait_idle(WAIT));
        }

        fn raw(&self, index: u16, addr: u64, len: u32, flags: u32, next: u16) {
            let d = SplitDescriptor::new(addr, len, flags as u16, next);
            self.vq
                .desc_table()
                .store(index, RawDescriptor::from(d))
                .unwrap();
        }

        fn push_avail(&self, head: u16) {
            let idx = self.vq.avail().idx().load();
            self.vq
                .avail()
                .ring()
                .ref_at(usize::from(idx % QSIZE))
                .unwrap()
                .store(u16::to_le(head));
            self.vq.avail().idx().store(idx.wrapping_add(1));
        }

        /// Writes `descs` (address, length, device-writable) as one chain.
        fn submit(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, write)) in descs.iter().enumerate() {
                let index = (self.next_desc + i as u16) % QSIZE;
                let last = i + 1 == descs.len();
                let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
                if !last {
                    flags |= VRING_DESC_F_NEXT;
                }
                self.raw(index, addr, len, flags, (index + 1) % QSIZE);
            }
            self.next_desc = (self.next_desc + descs.len() as u16) % QSIZE;
            self.push_avail(head);
            head
        }

        /// Notifies and returns the new used entries (id, len).
        fn run(&mut self, dev: &mut Block) -> Vec<(u32, u32)> {
            dev.queue_notify(0);
            assert!(dev.wait_idle(WAIT), "the worker did not finish");
            let used_idx = self.vq.used().idx().load();
            let mut out = Vec::new();
            while self.used_seen != used_idx {
                let e = self
                    .vq
                    .used()
                    .ring()
                    .ref_at(usize::from(self.used_seen % QSIZE))
                    .unwrap()
                    .load();
                out.push((e.id(), e.len()));
                self.used_seen = self.used_seen.wrapping_add(1);
            }
            out
        }

        /// One chain in, one used entry out: (used length, status byte at STATUS).
        fn request(&mut self, dev: &mut Block, descs: &[(u64, u32, bool)]) -> (u32, u8) {
            self.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
            let head = self.submit(descs);
            let used = self.run(dev);
            assert_eq!(used.len(), 1, "expected one used entry");
            assert_eq!(used[0].0, u32::from(head));
            (used[0].1, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
        }
    }

    fn sb(v: u32) -> u8 {
        v as u8
    }

    struct Setup {
        file: TempFile,
        mem: GuestMemory,
    }

    fn setup() -> Setup {
        Setup {
            file: image(SECTORS as usize * 512),
            mem: guest_mem(MEM_SIZE),
        }
    }

    // --- configuration -------------------------------------------------------------

    #[test]
    fn parses_disk_specs() {
        assert_eq!(
            DiskConfig::parse("/a/b.img").unwrap(),
            DiskConfig {
                path: "/a/b.img".into(),
                read_only: false,
                serial: None,
                cache: CacheType::Writeback,
                rate_limiter: RateLimiterConfig::default(),
            }
        );
        let c = DiskConfig::parse("d.img,ro,serial=ABC-123_x y").unwrap();
        assert!(c.read_only);
        assert_eq!(c.serial.as_deref(), Some("ABC-123_x y"));
        assert!(DiskConfig::parse("d.img,serial=12345678901234567890").is_ok());

        let err = |s: &str| DiskConfig::parse(s).unwrap_err();
        assert!(err("").contains("path is empty"));
        assert!(err(",ro").contains("path is empty"));
        assert!(err("d.img,rw").contains("unknown option 'rw'"));
        assert!(err("d.img,").contains("empty option"));
        assert!(err("d.img,serial=123456789012345678901").contains("at most 20"));
        assert!(err("d.img,serial=").contains("is empty"));
        assert!(err("d.img,serial=a\tb").contains("printable ASCII"));
        assert!(err("d.img,serial=é").contains("printable ASCII"));
        assert!(err("d.img,serial=a,serial=b").contains("more than once"));
        assert!(err("d.img,ro,ro").contains("ro given more than once"));
    }

    #[test]
    fn names_disks_like_linux() {
        assert_eq!(disk_name(0), "vda");
        assert_eq!(disk_name(1), "vdb");
        assert_eq!(disk_name(25), "vdz");
        assert_eq!(disk_name(26), "vdaa");
        assert_eq!(disk_name(27), "vdab");
        assert_eq!(disk_name(701), "vdzz");
        assert_eq!(disk_name(702), "vdaaa");
    }

    #[test]
    fn opens_locks_and_refuses() {
        let t = image(1000);
        let dev = Block::new(1, &config(&t, false, None)).unwrap();
        assert_eq!(dev.name(), "virtio-blk vdb");
        assert_eq!(dev.capacity(), 1, "1000 bytes round down to one sector");
        assert_eq!(dev.device_type(), 2);
        assert_eq!(dev.queue_max_sizes(), &[256]);

        // A second writer, or a reader, is refused while the writer holds the image.
        let e = Block::new(0, &config(&t, false, None)).err().unwrap();
        assert!(matches!(e, Error::Locked { .. }));
        let msg = e.to_string();
        assert!(msg.contains(&t.as_path().display().to_string()), "{msg}");
        assert!(msg.contains("in use by another process (locked)"), "{msg}");
        assert!(matches!(
            Block::new(0, &config(&t, true, None)),
            Err(Error::Locked { .. })
        ));
        drop(dev);

        // Readers share; a writer is refused while they hold it.
        let r1 = Block::new(0, &config(&t, true, None)).unwrap();
        let r2 = Block::new(1, &config(&t, true, None)).unwrap();
        assert!(matches!(
            Block::new(2, &config(&t, false, None)),
            Err(Error::Locked { .. })
        ));
        drop((r1, r2));
        assert!(Block::new(0, &config(&t, false, None)).is_ok());

        let missing = DiskConfig::parse("/nonexistent/ferrite-disk.img").unwrap();
        let e = Block::new(0, &missing).err().unwrap();
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent/ferrite-disk.img"), "{msg}");
        // Issue 13: the cause is the error's source, not also part of its message.
        assert!(!msg.contains("os error"), "{msg}");
        let chain = crate::errors::chain(&e);
        assert_eq!(chain.matches("(os error 2)").count(), 1, "{chain}");

        let dir = DiskConfig {
            read_only: true,
            ..DiskConfig::new(std::env::temp_dir())
        };
        assert!(matches!(Block::new(0, &dir), Err(Error::NotRegular { .. })));
        let null = DiskConfig::parse("/dev/null").unwrap();
        let e = Block::new(0, &null).err().unwrap();
        assert!(matches!(e, Error::NotRegular { .. }), "{e}");
        assert!(e.to_string().contains("/dev/null"));
    }

    /// Issue 13: `--disk a.img --disk a.img` read as "in use by another process".
    #[test]
    fn same_image_given_twice_is_named_not_locked() {
        let t = image(4096);
        let link = t.as_path().with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::fs::hard_link(t.as_path(), &link).unwrap();
        let other = image(512);
        let rw = config(&t, false, None);
        let ro = config(&t, true, None);
        let by_link = DiskConfig::new(&link);
        assert!(check_distinct(&[rw.clone(), config(&other, false, None)]).is_ok());
        let e = check_distinct(&[config(&other, true, None), rw.clone(), rw.clone()]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("is given twice (--disk 2 and --disk 3"),
            "{msg}"
        );
        assert!(msg.contains(&t.as_path().display().to_string()), "{msg}");
        assert!(!msg.contains("in use"), "{msg}");
        // Another name for the same file, or one writable and one read-only: refused.
        let msg = check_distinct(&[rw.clone(), by_link])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("under two names"), "{msg}");
        assert!(check_distinct(&[ro.clone(), rw]).is_err());
        // Two read-only views share the lock and are allowed; a missing path is left
        // for Block::new to report.
        assert!(check_distinct(&[ro.clone(), ro]).is_ok());
        let missing = DiskConfig::parse("/nonexistent/x.img").unwrap();
        assert!(check_distinct(&[missing.clone(), missing]).is_ok());
        std::fs::remove_file(&link).unwrap();
    }

    /// Orchestrators attach empty placeholder images and fill them later: a 0-byte
    /// image is a disk of capacity 0, not an error.
    #[test]
    fn zero_byte_image_is_accepted() {
        let t = image(0);
        let dev = Block::new(0, &config(&t, false, None)).unwrap();
        assert_eq!(dev.capacity(), 0);
        assert!(check_distinct(&[config(&t, false, None)]).is_ok());
    }

    #[test]
    fn features_and_config_space() {
        let t = image(SECTORS as usize * 512);
        let rw = Block::new(0, &config(&t, false, None)).unwrap();
        let f = rw.device_features();
        for bit in [
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_RING_F_EVENT_IDX,
        ] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        drop(rw);
        let ro = Block::new(0, &config(&t, true, None)).unwrap();
        let f = ro.device_features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);

        // Offsets from the virtio 1.2 spec, section 5.2.4.
        let mut c = vec![0u8; 64];
        ro.read_config(0, &mut c);
        let le32 = |o: usize| u32::from_le_bytes([c[o], c[o + 1], c[o + 2], c[o + 3]]);
        assert_eq!(&c[0..8], &SECTORS.to_le_bytes());
        assert_eq!(le32(8), 0, "size_max");
        assert_eq!(le32(12), 254, "seg_max");
        assert_eq!(le32(16), 0, "geometry");
        assert_eq!(le32(20), 512, "blk_size");
        assert_eq!(&c[24..33], &[0; 9], "topology, writeback");
        assert_eq!(le32(36), MAX_DISCARD_SECTORS);
        assert_eq!(le32(40), 1, "max_discard_seg");
        assert_eq!(le32(44), 8, "discard_sector_alignment");
        assert_eq!(le32(48), MAX_WRITE_ZEROES_SECTORS);
        assert_eq!(le32(52), 1, "max_write_zeroes_seg");
        assert_eq!(c[56], 1, "write_zeroes_may_unmap");

        // Any offset and length: no panic, bytes beyond the space read 0.
        let mut b = [0xffu8; 8];
        ro.read_config(4, &mut b);
        assert_eq!(b, [0, 0, 0, 0, 0, 0, 0, 0]);
        ro.read_config(2, &mut b);
        assert_eq!(b[0..2], [0, 0]);
        for off in [CONFIG_SIZE as u64 - 2, 4096, u64::MAX - 3, u64::MAX] {
            let mut b = [0xffu8; 8];
            ro.read_config(off, &mut b);
            assert!(b[2..].iter().all(|&x| x == 0), "offset {off:#x}: {b:?}");
        }
        let mut big = vec![0xffu8; 4096];
        ro.read_config(1, &mut big);
        assert!(big[CONFIG_SIZE..].iter().all(|&x| x == 0));
        let mut ro = ro;
        ro.write_config(0, &[1, 2, 3, 4]);
        ro.write_config(u64::MAX, &[1]);
        let mut cap = [0u8; 8];
        ro.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), SECTORS);
    }

    // --- requests ------------------------------------------------------------------

    #[test]
    fn write_then_read_round_trip() {
        let s = setup();
        let mut dev = Block::new(0, &config(&s.file, false, None)).unwrap();
        let mut g = Guest::new(&s.mem);
        g.start(&mut dev, 0);
        assert_eq!(dev.worker_health(), Some((true, 0)));

        // Write sectors 3..5 from three uneven segments.
        let data: Vec<u8> = (0..1024u32).map(|i| (i * 13 + 5) as u8).collect();
        s.mem.write_slice(&data[..100], GuestAddress(DATA)).unwrap();
        s.mem
            .write_slice(&data[100..700], GuestAddress(DATA2))
            .unwrap();
        s.mem
            .write_slice(&data[700..], GuestAddress(DATA + 0x1000))
            .unwrap();
        write_header(&s.mem, HDR, VIRTIO_BLK_T_OUT, 3);
        let (len, st) = g.request(
            &mut dev,
            &[
                (HDR, 16, R),
                (DATA, 100, R),
                (DATA2, 600, R),
                (DATA + 0x1000, 324, R),
                (STATUS, 1, W),
            ],
        );
        assert_eq!((len, st), (1, sb(VIRTIO_BLK_S_OK)));
        let file = file_bytes(&s.file);
        assert_eq!(&file[3 * 512..5 * 512], &data[..]);
        assert_eq!(file[3 * 512 - 1], pattern(3 * 512 - 1));
        assert_eq!(file[5 * 512], pattern(5 * 512));

        // Read them back, with the header split in two and the data in two pieces.
        write_header(&s.mem, HDR, VIRTIO_BLK_T_IN, 3);
        let (len, st) = g.request(
            &mut dev,
            &[
                (HDR, 8, R),
                (HDR + 8, 8, R),
                (DATA2 + 0x8000, 1000, W),
                (DATA2 + 0x9000, 24, W),
                (STATUS, 1, W),
            ],
        );
        assert_eq!((len, st), (1025, sb(VIRTIO_BLK_S_OK)));
        let mut back = read_guest(&s.mem, DATA2 + 0x8000, 1000);
        back.extend(read_guest(&s.mem, DATA2 + 0x9000, 24));
        assert_eq!(back, data);

        // Data and status in one descriptor: the last byte is the status.
        write_header(&s.mem, HDR, VIRTIO_BLK_T_IN, 0);
        let (len, st) = g.request(&mut dev, &[(HDR, 16, R), (STATUS - 512, 513, W)]);
        assert_eq!((len, st), (513, sb(VIRTIO_BLK_S_OK)));
        let expect: Vec<u8> = (0..512).map(pattern).collect();
        assert_eq!(read_guest(&s.mem, STATUS - 512, 512), expect);

        // A large read through several bounce-buffer rounds (the whole disk).
        write_header(&s.mem, HDR, VIRTIO_BLK_T_IN, 0);
        let whole = (SECTORS * 512) as u32;
        let (len, st) = g.request(&mut dev, &[(HDR, 16, R), (DATA, whole, W), (STATUS, 1, W)]);
        assert_eq!((len, st), (whole + 1, sb(VIRTIO_BLK_S_OK)));
        assert_eq!(
            read_guest(&s.mem, DATA, whole as usize),
            file_bytes(&s.file)
        );
    }

    #[test]
    fn flush_and_get_id() {
        let s = setup();
        let mut dev = Block::new(0, &config(&s.file, false, Some("serial-01"))).unwrap();
        let mut g = Guest::new(&s.mem);
        g.start(&mut dev, 0);

        write_header(&s.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            g.request(&mut dev, &[(HDR, 16, R), (STATUS, 1, W)]),
            (1, sb(VIRTIO_BLK_S_OK))
        );

        s.mem.write_slice(&[0xaa; 32], GuestAddress(DATA)).unwrap();
        write_header(&s.mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        let (len, st) = g.request(&mut dev, &[(HDR, 16, R), (DATA, 32, W), (STATUS, 1, W)]);
        assert_eq!((len, st), (21, sb(VIRTIO_BLK_S_OK)));
        let mut want = b"serial-01".to_vec();
        want.resize(20, 0);
        assert_eq!(read_guest(&s.mem, DATA, 20), want);
        assert_eq!(read_guest(&s.mem, DATA + 20, 12), vec![0xaa; 12]);

        // A short buffer gets a prefix.
        s.mem.write_slice(&[0xaa; 32], GuestAddress(DATA)).unwrap();
        let (len, st) = g.request(&mut dev, &[(HDR, 16, R), (DATA, 4, W), (STATUS, 1, W)]);
        assert_eq!((len, st), (5, sb(VIRTIO_BLK_S_OK)));
        assert_eq!(read_guest(&s.mem, DATA, 5), b"seri\xaa");

        // Unknown request types.
        for ty in [
            2,
            3,
            VIRTIO_BLK_T_SECURE_ERASE_FOR_TEST,
            0x8000_0000,
            u32::MAX,
        ] {
            write_header(&s.mem, HDR, ty, 0);
            assert_eq!(
                g.request(&mut dev, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
                (1, sb(VIRTIO_BLK_S_UNSUPP)),
                "type {ty}"
            );
        }
    }

    const VIRTIO_BLK_T_SECURE_ERASE_FOR_TEST: u32 = 14;

    #[test]
    fn discard_and_write_zeroes() {
        let s = setup();
        let mut dev = Block::new(0, &config(&s.file, false, None)).unwrap();
        let mut g = Guest::new(&s.mem);
        g.start(&mut dev, 0);
        let len_before = file_bytes(&s.file).len();

        let cases = [
            (VIRTIO_BLK_T_DISCARD, 8u64, 8u32, 0u32),
            (VIRTIO_BLK_T_WRITE_ZEROES, 20, 3, 0),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                30,
                9,
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            ),
            (VIRTIO_BLK_T_DISCARD, 41, 1, 0),
        ];
        for (ty, sector, n, flags) in cases {
            write_header(&s.mem, HDR, ty, 0);
            write_dwz_seg(&s.mem, DATA, sector, n, flags);
            let (len, st) = g.request(&mut dev, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]);
            assert_eq!((len, st), (1, sb(VIRTIO_BLK_S_OK)), "type {ty}");
            let file = file_bytes(&s.file);
            let (a, b) = (
                sector as usize * 512,
                (sector + u64::from(n)) as usize * 512,
            );
            assert!(file[a..b].iter().all(|&x| x == 0), "type {ty} at {sector}");
            assert_eq!(file[a - 1], pattern(a - 1));
            assert_eq!(file[b], pattern(b));
        }
        assert_eq!(file_bytes(&s.file).len(), len_before);

        // Discard with the unmap flag, unknown flags: UNSUPP. Too big, out of range,
        // no segment, two segments: IOERR.
        let bad = [
            (
                VIRTIO_BLK_T_DISCARD,
                0u64,
                1u32,
                1u32,
                16u32,
                VIRTIO_BLK_S_UNSUPP,
            ),
            (VIRTIO_BLK_T_WRITE_ZEROES, 0, 1, 2, 16, VIRTIO_BLK_S_UNSUPP),
            (
                VIRTIO_BLK_T_DISCARD,
                0,
                MAX_DISCARD_SECTORS + 1,
                0,
                16,
                VIRTIO_BLK_S_IOERR,
            ),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                SECTORS,
                1,
                0,
                16,
                VIRTIO_BLK_S_IOERR,
            ),
            (VIRTIO_BLK_T_DISCARD, u64::MAX, 2, 0, 16, VIRTIO_BLK_S_IOERR),
            (VIRTIO_BLK_T_DISCARD, 0, 1, 0, 32, VIRTIO_BLK_S_IOERR),
            (VIRTIO_BLK_T_DISCARD, 0, 1, 0, 8, VIRTIO_BLK_S_IOERR),
        ];
        let before = file_bytes(&s.file);
        for (ty, sector, n, flags, seg_len, want) in bad {
            write_header(&s.mem, HDR, ty, 0);
            write_dwz_seg(&s.mem, DATA, sector, n, flags);
            let (len, st) = g.request(
                &mut dev,
                &[(HDR, 16, R), (DATA, seg_len, R), (STATUS, 1, W)],
            );
            assert_eq!(
                (len, st),
                (1, sb(want)),
                "{ty} {sector} {n} {flags} {seg_len}"
            );
        }
        write_header(&s.mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(
            g.request(&mut dev, &[(HDR, 16, R), (STATUS, 1, W)]),
            (1, sb(VIRTIO_BLK_S_IOERR))
        );
        assert_eq!(file_bytes(&s.file), before);
    }

    /// tmpfs refuses FALLOC_FL_ZERO_RANGE: write-zeroes falls back to writing zeros.
    #[test]
    fn write_zeroes_falls_back_to_writing() {
        let dir = Path::new("/dev/shm");
        if !dir.is_dir() {
            eprintln!("no /dev/shm; skipped");
            return;
        }
        let file = TempFile::new_in(dir).unwrap();
        // 1024 sectors; zeroing 600 takes three rounds of the bounce buffer.
        let bytes: Vec<u8> = (0..1024 * 512).map(pattern).collect();
        file.as_file().write_all_at(&bytes, 0).unwrap();
        let zero_range = fallocate(file.as_file(), FallocateMode::ZeroRange, true, 0, 512);
        eprintln!("ZERO_RANGE on /dev/shm: {zero_range:?}");
        let mem = guest_mem(MEM_SIZE);
        let mut dev = Block::new(0, &config(&file, false, None)).unwrap();
        let mut g = Guest::new(&mem);
        g.start(&mut dev, 0);
        write_header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        write_dwz_seg(&mem, DATA, 5, 600, 0);
        assert_eq!(
            g.request(&mut dev, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]),
            (1, sb(VIRTIO_BLK_S_OK))
        );
        let after = file_bytes(&file);
        assert_eq!(after.len(), bytes.len());
        assert!(after[5 * 512..605 * 512].iter().all(|&b| b == 0));
        assert_eq!(after[..5 * 512], bytes[..5 * 512]);
        assert_eq!(after[605 * 512..], bytes[605 * 512..]);
    }

    #[test]
    fn read_only_disk_refuses_changes() {
        let s = setup();
        let before = file_bytes(&s.file);
        let mut dev = Block::new(0, &config(&s.file, true, None)).unwrap();
        let mut g = Guest::new(&s.mem);
        g.start(&mut dev, 0);

        s.mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
        write_header(&s.mem, HDR, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            g.request(&mut dev, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]),
            (1, sb(VIRTIO_BLK_S_IOERR))
        );
        for ty in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            write_header(&s.mem, HDR, ty, 0);
            write_dwz_seg(&s.mem, DATA, 0, 4, 0);
            assert_eq!(
                g.request(&mut dev, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]),
                (1, sb(VIRTIO_BLK_S_IOERR))
            );
        }
        write_header(&s.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            g.request(&mut dev, &[(HDR, 16, R), (STATUS, 1, W)]),
            (1, sb(VIRTIO_BLK_S_OK))
        );
        write_header(&s.mem, HDR, VIRTIO_BLK_T_IN, 1);
        assert_eq!(
            g.request(&mut dev, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
            (513, sb(VIRTIO_BLK_S_OK))
        );
        assert_eq!(read_guest(&s.mem, DATA, 512), &before[512..1024]);
        assert_eq!(file_bytes(&s.file), before);
    }

    #[test]
    fn out_of_range_sectors() {
        let s = setup();
        let mut dev = Block::new(0, &config(&s.file, false, None)).unwrap();
        let mut g = Guest::new(&s.mem);
        g.start(&mut dev, 0);
        let before = file_bytes(&s.file);
        for (ty, dir) in [(VIRTIO_BLK_T_IN, W), (VIRTIO_BLK_T_OUT, R)] {
            for (sector, len) in [
                (SECTORS, 512u32),
                (SECTORS - 1, 1024),
                (u64::MAX, 512),
                (u64::MAX >> 9, 512),
                (1 << 55, 512),
                (0, 511),
                (0, 513),
            ] {
                write_header(&s.mem, HDR, ty, sector);
                let (used, st) =
                    g.request(&mut dev, &[(HDR, 16, R), (DATA, len, dir), (STATUS, 1, W)]);
                assert_eq!(
                    (used, st),
                    (1, sb(VIRTIO_BLK_S_IOERR)),
                    "{ty} {sector} {len}"
                );
            }
        }
        // The last sector itself is fine.
        write_header(&s.mem, HDR, VIRTIO_BLK_T_IN, SECTORS - 1);
        assert_eq!(
            g.request(&mut dev, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
            (513, sb(VIRTIO_BLK_S_OK))
        );
        assert_eq!(file_bytes(&s.file), before);
    }

    // --- hostile chains ------------------------------------------------------------

    #[test]
    fn hostile_chains_get_ioerr_or_nothing() {
        let s = setup();
        let mut dev = Block::new(0, &config(&s.file, false, None)).unwrap();
        let mut g = Guest::new(&s.mem);
        g.start(&mut dev, 0);
        let before = file_bytes(&s.file);
        let end = MEM_SIZE as u64;
        let ioerr = (1, sb(VIRTIO_BLK_S_IOERR));

        // Data outside guest memory, straddling its end, wrapping around.
        write_header(&s.mem, HDR, VIRTIO_BLK_T_IN, 0);
        for (addr, len) in [
            (end, 512u32),
            (end - 256, 512),
            (u64::MAX - 255, 512),
            (u64::MAX, u32::MAX - 100),
            (DATA, u32::MAX - 1024),
        ] {
            let r = g.request(&mut dev, &[(HDR, 16, R), (addr, len, W), (STATUS, 1, W)]);
            assert_eq!(r, ioerr, "{addr:#x}+{len:#x}");
        }
        // The header outside memory.
        assert_eq!(
            g.request(&mut dev, &[(end + 16, 16, R), (STATUS, 1, W)]),
            ioerr
        );
        // A device-writable header.
        write_header(&s.mem, HDR, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            g.request(&mut dev, &[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)]),
            ioerr
        );
        // A short header.
        assert_eq!(g.request(&mut dev, &[(HDR, 15, R), (STATUS, 1, W)]), ioerr);
        // Data in the wrong direction.
        write_header(&s.mem, HDR, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            g.request(&mut dev, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]),
            ioerr
        );
        write_header(&s.mem, HDR, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            g.request(&mut dev, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
            ioerr
        );
        write_header(&s.mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(
            g.request(&mut dev, &[(HDR, 16, R), (DATA, 20, R), (STATUS, 1, W)]),
            ioerr
        );
        write_header(&s.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            g.request(&mut dev, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
            ioerr
        );
        // A readable descriptor after a writable one.
        write_header(&s.mem, HDR, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            g.request(
                &mut dev,
                &[
                    (HDR, 16, R),
                    (DATA, 512, W),
                    (DATA2, 512, R),
                    (STATUS, 1, W)
                ]
            ),
            ioerr
        );

        // No writable status byte: completed with length 0, nothing written.
        write_header(&s.mem, HDR, VIRTIO_BLK_T_IN, 0);
        for chain in [
            vec![(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)],
            vec![(HDR, 16, R)],
            vec![(HDR, 16, R), (DATA, 512, W), (STATUS, 0, W)],
            vec![(HDR, 16, R), (DATA, 512, W), (end, 1, W)],
            vec![(HDR, 16, R), (DATA, 512, W), (u64::MAX, 2, W)],
            // More than 2^32 bytes in all: the chain iterator stops before the status.
            vec![(HDR, 16, R), (DATA, u32::MAX, W), (STATUS, 1, W)],
        ] {
            s.mem.write_slice(&[0xcc; 512], GuestAddress(DATA)).unwrap();
            assert_eq!(g.request(&mut dev, &chain), (0, 0xee), "{chain:?}");
            assert_eq!(read_guest(&s.mem, DATA, 512), vec![0xcc; 512]);
        }
        assert_eq!(file_bytes(&s.file), before);
        assert_eq!(dev.worker_health(), Some((true, 0)));
        assert!(!g.interrupt.needs_reset());
    }

    #[test]
    fn looping_and_overlong_chains_end() {
        let s = setup();
        let mut dev = Block::new(0, &config(&s.file, false, None)).unwrap();
        let mut g = Guest::new(&s.mem);
        g.start(&mut dev, 0);
        write_header(&s.mem, HDR, VIRTIO_BLK_T_IN, 0);
        let (nx, wr) = (VRING_DESC_F_NEXT, VRING_DESC_F_WRITE);

        // 0 → 1 → 0 → …: header, then a status descriptor pointing back at the header.
        s.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        g.raw(0, HDR, 16, nx, 1);
        g.raw(1, STATUS, 1, nx | wr, 0);
        g.push_avail(0);
        assert_eq!(g.run(&mut dev), vec![(0, 1)]);
        assert_eq!(
            s.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            sb(VIRTIO_BLK_S_IOERR)
        );

        // A descriptor that points at itself, readable: no status byte.
        g.raw(2, HDR, 16, nx, 2);
        g.push_avail(2);
        assert_eq!(g.run(&mut dev), vec![(2, 0)]);

        // A next index beyond the table: the chain ends after the header.
        g.raw(3, HDR, 16, nx, 200);
        g.push_avail(3);
        assert_eq!(g.run(&mut dev), vec![(3, 0)]);

        // A chain through the whole table with writable descriptors, the last pointing
        // outside it: ends at the table's size, the status is the last one's last byte.
        for i in 0..QSIZE {
            g.raw(i, DATA + u64::from(i) * 0x1000, 512, nx | wr, i + 1);
        }
        g.raw(QSIZE - 1, STATUS, 1, nx | wr, QSIZE + 5);
        g.push_avail(0);
        s.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        assert_eq!(g.run(&mut dev), vec![(0, 1)]);
        assert_eq!(
            s.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            sb(VIRTIO_BLK_S_IOERR),
            "no readable header"
        );

        // An indirect descriptor (not offered) to a huge table outside memory.
        g.raw(4, 0xffff_ffff_0000, 0xffff_fff0, 4, 0);
        g.push_avail(4);
        assert_eq!(g.run(&mut dev), vec![(4, 0)]);
        // An indirect table with more than MAX_CHAIN_DESCS entries ending in a status
        // byte: IOERR.
        let table = DATA2;
        let n = MAX_CHAIN_DESCS as u64 + 8;
        for i in 0..n {
            let (flags, len, addr) = if i + 1 == n {
                (wr, 1, STATUS)
            } else {
                (nx | wr, 512, DATA)
            };
            let d = SplitDescriptor::new(addr, len, flags as u16, (i + 1) as u16);
            s.mem
                .write_obj(RawDescriptor::from(d), GuestAddress(table + 16 * i))
                .unwrap();
        }
        g.raw(5, table, (16 * n) as u32, 4, 0);
        g.push_avail(5);
        s.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        assert_eq!(g.run(&mut dev), vec![(5, 1)]);
        assert_eq!(
            s.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            sb(VIRTIO_BLK_S_IOERR)
        );
        assert_eq!(dev.worker_health(), Some((true, 0)));
        assert!(!g.interrupt.needs_reset());
    }

    #[test]
    fn broken_queues_ask_for_a_reset() {
        let s = setup();
        let mut dev = Block::new(0, &config(&s.file, false, None)).unwrap();

        // The available index runs ahead of the ring.
        let g = Guest::new(&s.mem);
        g.start(&mut dev, 0);
        g.vq.avail().idx().store(QSIZE + 1);
        dev.queue_notify(0);
        assert!(dev.wait_idle(WAIT));
        assert!(g.interrupt.needs_reset());
        assert_eq!(dev.worker_health(), Some((true, 0)));
        // Further notifications are ignored until a reset.
        dev.queue_notify(0);
        assert!(dev.wait_idle(WAIT));
        dev.reset();
        assert!(!dev.is_active());

        // A head index outside the table cannot be completed.
        let s2 = guest_mem(MEM_SIZE);
        let mut g = Guest::new(&s2);
        g.start(&mut dev, 0);
        g.push_avail(QSIZE + 3);
        assert_eq!(g.run(&mut dev), vec![]);
        assert!(g.interrupt.needs_reset());
        dev.reset();

        // Rings outside guest memory.
        let small = guest_mem(0x2000);
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x1100), Some(0));
        q.set_used_ring_address(Some(0x1ffc), Some(0));
        q.set_ready(true);
        let irq = new_interrupt();
        dev.activate(small.clone(), vec![q], irq.clone()).unwrap();
        dev.queue_notify(0);
        assert!(dev.wait_idle(WAIT));
        assert!(irq.needs_reset());
        dev.reset();

        // Wrong number of queues.
        let e = dev
            .activate(small.clone(), vec![], new_interrupt())
            .err()
            .unwrap();
        assert!(matches!(e, ActivateError::QueueCount { got: 0, .. }));
        assert!(!dev.is_active());

        // And after all that the device works again.
        let mut g = Guest::new(&s.mem);
        g.start(&mut dev, 0);
        write_header(&s.mem, HDR, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            g.request(&mut dev, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
            (513, sb(VIRTIO_BLK_S_OK))
        );
        assert!(!g.interrupt.needs_reset());
    }

    #[test]
    fn interrupts_follow_event_idx() {
        let s = setup();
        let mut dev = Block::new(0, &config(&s.file, false, None)).unwrap();
        let mut g = Guest::new(&s.mem);
        g.start(&mut dev, 0);
        let used_event = GuestAddress(g.vq.avail_addr().0 + 4 + 2 * u64::from(QSIZE));
        write_header(&s.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        let flush = [(HDR, 16, R), (STATUS, 1, W)];

        // The driver wants an interrupt only once the used index passes 5.
        s.mem.write_obj(5u16, used_event).unwrap();
        g.request(&mut dev, &flush);
        assert_eq!(g.interrupt.status() & INT_USED_RING, 0);
        s.mem.write_obj(1u16, used_event).unwrap();
        g.request(&mut dev, &flush);
        assert_ne!(g.interrupt.status() & INT_USED_RING, 0);
        g.interrupt.ack(INT_USED_RING);

        // Without EVENT_IDX every batch interrupts.
        dev.reset();
        let mut g = Guest::new(&s.mem);
        s.mem
            .write_slice(&[0u8; 0x1000], GuestAddress(QADDR.0))
            .unwrap();
        g.start(&mut dev, 1 << VIRTIO_RING_F_EVENT_IDX);
        s.mem.write_obj(5u16, used_event).unwrap();
        g.request(&mut dev, &flush);
        assert_ne!(g.interrupt.status() & INT_USED_RING, 0);
    }

    // --- reset while a request's file I/O is held -------------------------------------

    /// Holds the worker's first file system call until released.
    #[derive(Default)]
    struct HeldIo {
        /// (calls that entered the hook, calls that left it, released).
        state: Mutex<(u32, u32, bool)>,
        cond: Condvar,
    }

    impl HeldIo {
        fn hook(self: &Arc<Self>) -> Arc<dyn Fn() + Send + Sync> {
            let h = self.clone();
            Arc::new(move || {
                let mut st = h.state.lock().unwrap();
                st.0 += 1;
                h.cond.notify_all();
                while !st.2 {
                    st = h.cond.wait(st).unwrap();
                }
                st.1 += 1;
            })
        }

        /// Waits until a call is held in the hook.
        fn wait_held(&self) -> bool {
            let deadline = Instant::now() + WAIT;
            let mut st = self.state.lock().unwrap();
            while st.0 == 0 {
                let now = Instant::now();
                if now >= deadline {
                    return false;
                }
                st = self.cond.wait_timeout(st, deadline - now).unwrap().0;
            }
            true
        }

        /// A call is in the hook and has not returned.
        fn holding(&self) -> bool {
            let st = self.state.lock().unwrap();
            st.0 > st.1 && !st.2
        }

        fn release(&self) {
            self.state.lock().unwrap().2 = true;
            self.cond.notify_all();
        }
    }

    fn mmio_rd(t: &Mutex<MmioTransport>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.lock().unwrap().read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn mmio_wr(t: &Mutex<MmioTransport>, off: u64, v: u32) {
        t.lock().unwrap().write(off, &v.to_le_bytes());
    }

    /// Where [`driver_ok`] puts the used ring: the mock's own overlaps the end of its
    /// available ring (it sizes the ring in entries, not bytes), which the transport
    /// refuses.
    const USED: u64 = 0x3000;

    /// What a driver does through the registers up to DRIVER_OK, with the queue at
    /// `vq`'s descriptor table and available ring and [`USED`]; every feature offered
    /// is accepted.
    fn driver_ok(t: &Mutex<MmioTransport>, vq: &MockSplitQueue<'_, GuestMemory>) {
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        mmio_wr(t, 0x070, STATUS_ACKNOWLEDGE);
        mmio_wr(t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        for sel in 0..2 {
            mmio_wr(t, 0x014, sel);
            let f = mmio_rd(t, 0x010);
            mmio_wr(t, 0x024, sel);
            mmio_wr(t, 0x020, f);
        }
        mmio_wr(t, 0x070, ok);
        mmio_wr(t, 0x030, 0);
        mmio_wr(t, 0x038, u32::from(QSIZE));
        for (reg, addr) in [
            (0x080, vq.desc_table_addr().0),
            (0x090, vq.avail_addr().0),
            (0x0a0, USED),
        ] {
            mmio_wr(t, reg, addr as u32);
            mmio_wr(t, reg + 4, (addr >> 32) as u32);
        }
        mmio_wr(t, 0x044, 1);
        mmio_wr(t, 0x070, ok | STATUS_DRIVER_OK);
        assert!(t.lock().unwrap().is_active(), "the transport activated");
    }

    /// Issue 14: a reset joined the worker for up to 5 s on the vCPU thread, holding the
    /// bus entry's and the device's mutexes, while the worker sat in a slow `pread`; and
    /// a read that ended after the reset still wrote the guest's buffer and status.
    #[test]
    fn reset_during_a_slow_disk_read_returns_at_once_and_the_late_read_writes_nothing() {
        const STATUS2: u64 = 0x9100;
        const QUICK: Duration = Duration::from_millis(500);
        let s = setup();
        let dev = Arc::new(Mutex::new(
            Block::new(0, &config(&s.file, false, None)).unwrap(),
        ));
        let held = Arc::new(HeldIo::default());
        dev.lock().unwrap().set_io_hook(held.hook());
        let as_virtio: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            as_virtio,
            s.mem.clone(),
            new_interrupt(),
            vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            Box::new(|_| {}),
        )));
        let mut g = Guest::new(&s.mem);
        driver_ok(&transport, &g.vq);

        // A read of sector 0 into a buffer holding a sentinel; its pread is held.
        s.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        s.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        write_header(&s.mem, HDR, VIRTIO_BLK_T_IN, 0);
        g.submit(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        dev.lock().unwrap().queue_notify(0);
        assert!(held.wait_held(), "the read reached the disk");

        // The guest resets the device (a vCPU writing status 0 through the bus entry).
        let start = Instant::now();
        mmio_wr(&transport, 0x070, 0);
        let took = start.elapsed();
        assert!(
            took < QUICK,
            "the reset took {took:?} with a disk read held"
        );
        assert!(held.holding(), "the read is still held");
        // Meanwhile another vCPU reads the device's registers and the event loop
        // delivers a notification: neither waits for the held read.
        let (t2, d2) = (transport.clone(), dev.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let magic = mmio_rd(&t2, 0x000);
            d2.lock().unwrap().queue_notify(0);
            let _ = tx.send(magic);
        });
        assert_eq!(rx.recv_timeout(QUICK), Ok(0x7472_6976));

        // The driver probes again at once, with fresh rings at the same place.
        s.mem
            .write_slice(&[0u8; 0x3000], GuestAddress(QADDR.0))
            .unwrap();
        let mut g = Guest::new(&s.mem);
        let start = Instant::now();
        driver_ok(&transport, &g.vq);
        let took = start.elapsed();
        assert!(
            took < QUICK,
            "the activation took {took:?} with a disk read held"
        );
        assert!(held.holding(), "the read is still held");
        write_header(&s.mem, HDR, VIRTIO_BLK_T_IN, 1);
        s.mem.write_obj(0xeeu8, GuestAddress(STATUS2)).unwrap();
        let head = g.submit(&[(HDR, 16, R), (DATA2, 512, W), (STATUS2, 1, W)]);

        // The held read ends; then the new activation's request is served.
        held.release();
        dev.lock().unwrap().queue_notify(0);
        assert!(dev.lock().unwrap().wait_idle(WAIT));
        let used_idx: u16 = s.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, 1, "only the new request completes");
        let id: u32 = s.mem.read_obj(GuestAddress(USED + 4)).unwrap();
        let len: u32 = s.mem.read_obj(GuestAddress(USED + 8)).unwrap();
        assert_eq!((id, len), (u32::from(head), 513));
        assert_eq!(
            s.mem.read_obj::<u8>(GuestAddress(STATUS2)).unwrap(),
            sb(VIRTIO_BLK_S_OK)
        );
        assert_eq!(
            read_guest(&s.mem, DATA2, 512),
            file_bytes(&s.file)[512..1024]
        );
        // The abandoned read wrote neither its buffer nor its status byte.
        assert_eq!(read_guest(&s.mem, DATA, 512), vec![0x5a; 512]);
        assert_eq!(s.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xee);
        // One worker served both activations.
        assert_eq!(dev.lock().unwrap().worker_health(), Some((true, 0)));
    }

    /// Issue 17: a snapshot taken while the worker has a request in flight (its
    /// `pread` held) saves the queue position behind it, and a restore into a new
    /// device serves it: buffer, status and used entry 0 as if nothing had happened.
    #[test]
    fn request_in_flight_at_a_snapshot_is_served_after_the_restore() {
        let s = setup();
        let transport = |dev: &Arc<Mutex<Block>>| {
            let as_virtio: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
            Mutex::new(MmioTransport::new(
                as_virtio,
                s.mem.clone(),
                new_interrupt(),
                vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
                Box::new(|_| {}),
            ))
        };
        // Read-only: the restored device opens the image while the old one has it.
        let dev = Arc::new(Mutex::new(
            Block::new(0, &config(&s.file, true, None)).unwrap(),
        ));
        let held = Arc::new(HeldIo::default());
        dev.lock().unwrap().set_io_hook(held.hook());
        let t = transport(&dev);
        let mut g = Guest::new(&s.mem);
        driver_ok(&t, &g.vq);
        s.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        s.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        write_header(&s.mem, HDR, VIRTIO_BLK_T_IN, 1);
        let head = g.submit(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        dev.lock().unwrap().queue_notify(0);
        assert!(held.wait_held(), "the read reached the disk");

        let saved = t.lock().unwrap().save().unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let saved: crate::devices::virtio::mmio::TransportState =
            serde_json::from_str(&json).unwrap();
        assert_eq!(
            (saved.queues[0].next_avail, saved.queues[0].next_used),
            (0, 0)
        );
        // The old VM goes away with the read held: it is abandoned, nothing written.
        mmio_wr(&t, 0x070, 0);
        held.release();
        drop(t);
        drop(dev);
        assert_eq!(s.mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 0);
        assert_eq!(read_guest(&s.mem, DATA, 512), vec![0x5a; 512]);

        let dev2 = Arc::new(Mutex::new(
            Block::new(0, &config(&s.file, true, None)).unwrap(),
        ));
        let t2 = transport(&dev2);
        t2.lock().unwrap().restore(&saved).unwrap();
        t2.lock().unwrap().resignal();
        assert!(dev2.lock().unwrap().wait_idle(WAIT));
        assert_eq!(s.mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 1);
        let id: u32 = s.mem.read_obj(GuestAddress(USED + 4)).unwrap();
        let len: u32 = s.mem.read_obj(GuestAddress(USED + 8)).unwrap();
        assert_eq!((id, len), (u32::from(head), 513));
        assert_eq!(
            s.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            sb(VIRTIO_BLK_S_OK)
        );
        assert_eq!(
            read_guest(&s.mem, DATA, 512),
            file_bytes(&s.file)[512..1024]
        );
    }

    /// Issue 14: the same for a write of two bounce buffers whose first `pwrite` is
    /// held: resets (and an activation between them) return at once, and the
    /// abandoned write reads no more guest memory, writes no status and completes
    /// nothing.
    #[test]
    fn reset_during_a_slow_disk_write_returns_at_once_and_the_write_goes_no_further() {
        const QUICK: Duration = Duration::from_millis(500);
        let len = 2 * BOUNCE_SIZE;
        let file = image(len);
        let before = file_bytes(&file);
        let mem = guest_mem(MEM_SIZE);
        let mut dev = Block::new(0, &config(&file, false, None)).unwrap();
        let held = Arc::new(HeldIo::default());
        dev.set_io_hook(held.hook());
        let mut g = Guest::new(&mem);
        g.start(&mut dev, 0);
        mem.write_slice(&vec![0x11; len], GuestAddress(DATA))
            .unwrap();
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        write_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        g.submit(&[(HDR, 16, R), (DATA, len as u32, R), (STATUS, 1, W)]);
        dev.queue_notify(0);
        assert!(held.wait_held(), "the write reached the disk");

        let start = Instant::now();
        dev.reset();
        // The driver comes back and goes away again while the write is still held.
        mem.write_slice(&[0u8; 0x1000], GuestAddress(QADDR.0))
            .unwrap();
        let g2 = Guest::new(&mem);
        dev.set_acked_features(dev.device_features());
        dev.activate(
            mem.clone(),
            vec![g2.vq.create_queue().unwrap()],
            new_interrupt(),
        )
        .unwrap();
        dev.reset();
        let took = start.elapsed();
        assert!(
            took < QUICK,
            "reset, activate, reset took {took:?} with a write held"
        );
        assert!(held.holding());
        // The guest reuses the second half of the buffer.
        mem.write_slice(
            &vec![0x22; BOUNCE_SIZE],
            GuestAddress(DATA + BOUNCE_SIZE as u64),
        )
        .unwrap();

        held.release();
        assert!(dev.wait_idle(WAIT));
        let after = file_bytes(&file);
        assert_eq!(
            after[..BOUNCE_SIZE],
            vec![0x11; BOUNCE_SIZE],
            "the held pwrite lands"
        );
        assert_eq!(
            after[BOUNCE_SIZE..],
            before[BOUNCE_SIZE..],
            "nothing more is written"
        );
        assert_eq!(
            held.state.lock().unwrap().0,
            1,
            "no file I/O after the held call"
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xee);
        assert_eq!(g2.vq.used().idx().load(), 0);
        assert_eq!(dev.worker_health(), Some((true, 0)));
    }

    #[test]
    fn reset_stops_the_worker_and_allows_reactivation() {
        let s = setup();
        let mut dev = Block::new(0, &config(&s.file, false, None)).unwrap();
        dev.queue_notify(0); // not active: ignored
        dev.queue_notify(7);
        for _ in 0..3 {
            s.mem
                .write_slice(&[0u8; 0x1000], GuestAddress(QADDR.0))
                .unwrap();
            let mut g = Guest::new(&s.mem);
            g.start(&mut dev, 0);
            assert!(dev.is_active());
            write_header(&s.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
            assert_eq!(
                g.request(&mut dev, &[(HDR, 16, R), (STATUS, 1, W)]),
                (1, sb(VIRTIO_BLK_S_OK))
            );
            let start = Instant::now();
            dev.reset();
            assert!(start.elapsed() < Duration::from_secs(1));
            assert!(!dev.is_active());
            dev.queue_notify(0);
        }
        // Drop while active stops the worker too.
        let mut g = Guest::new(&s.mem);
        s.mem
            .write_slice(&[0u8; 0x1000], GuestAddress(QADDR.0))
            .unwrap();
        g.start(&mut dev, 0);
        drop(dev);
        // The image lock went with it.
        assert!(Block::new(0, &config(&s.file, false, None)).is_ok());
        let _ = &mut g;
    }

    // --- swapping the image (Firecracker's PATCH /drives) ---------------------------

    fn cap_via_mmio(t: &Mutex<MmioTransport>) -> u64 {
        u64::from(mmio_rd(t, 0x100)) | (u64::from(mmio_rd(t, 0x104)) << 32)
    }

    /// A bare transport around `dev` with its interrupt connected to the disk's handle,
    /// as the VM's build does.
    fn transport_for(
        dev: &Arc<Mutex<Block>>,
        mem: &GuestMemory,
    ) -> (Mutex<MmioTransport>, DiskHandle) {
        let handle = dev.lock().unwrap().handle();
        let irq = new_interrupt();
        handle.connect_interrupt(irq.clone());
        let as_virtio: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
        let t = MmioTransport::new(
            as_virtio,
            mem.clone(),
            irq,
            vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            Box::new(|_| {}),
        );
        (Mutex::new(t), handle)
    }

    /// Kata hot-plugs through `PATCH /drives/{id}`: the guest only sees the new size if
    /// the capacity, the configuration generation and a configuration interrupt all
    /// change, whether or not the driver has started the device.
    #[test]
    fn swap_changes_the_capacity_moves_the_generation_and_raises_the_config_interrupt() {
        let s = setup();
        let bigger = image(200 * 512);
        let dev = Arc::new(Mutex::new(
            Block::new(0, &config(&s.file, false, None)).unwrap(),
        ));
        let (t, handle) = transport_for(&dev, &s.mem);
        assert_eq!(cap_via_mmio(&t), SECTORS);
        assert_eq!(handle.capacity_bytes(), SECTORS * 512);
        assert_eq!(handle.path(), s.file.as_path());
        let gen0 = mmio_rd(&t, 0x0fc);

        // Before the driver is there.
        assert_eq!(handle.swap(bigger.as_path()).unwrap(), 200 * 512);
        assert_eq!(cap_via_mmio(&t), 200);
        assert_eq!(mmio_rd(&t, 0x0fc), gen0.wrapping_add(1));
        assert_ne!(mmio_rd(&t, 0x060) & INT_CONFIG, 0, "config interrupt");
        assert_eq!(handle.path(), bigger.as_path());
        assert_eq!(handle.capacity_bytes(), 200 * 512);
        assert_eq!(dev.lock().unwrap().capacity(), 200);
        mmio_wr(&t, 0x064, INT_CONFIG);
        assert_eq!(mmio_rd(&t, 0x060) & INT_CONFIG, 0);

        // With the device running: shrunk to an empty placeholder.
        let g = Guest::new(&s.mem);
        driver_ok(&t, &g.vq);
        let empty = image(0);
        assert_eq!(handle.swap(empty.as_path()).unwrap(), 0);
        assert_eq!(cap_via_mmio(&t), 0);
        assert_eq!(mmio_rd(&t, 0x0fc), gen0.wrapping_add(2));
        assert_ne!(mmio_rd(&t, 0x060) & INT_CONFIG, 0, "config interrupt");
        assert!(
            mmio_rd(&t, 0x070) & STATUS_DEVICE_NEEDS_RESET == 0,
            "a config change is not an error"
        );
        // The images given up are no longer locked.
        drop(Block::new(1, &config(&s.file, false, None)).unwrap());
        drop(Block::new(1, &config(&bigger, false, None)).unwrap());
    }

    /// A bad `path_on_host` in a PATCH must not cost the guest its disk.
    #[test]
    fn swap_to_a_bad_path_is_an_error_and_keeps_the_old_image() {
        let s = setup();
        let mut dev = Block::new(0, &config(&s.file, false, None)).unwrap();
        let handle = dev.handle();
        let mut g = Guest::new(&s.mem);
        g.start(&mut dev, 0);
        let gen0 = g.interrupt.config_generation();

        let missing = Path::new("/nonexistent/ferrite-swap.img");
        let e = handle.swap(missing).unwrap_err();
        assert!(matches!(e, Error::Open { .. }), "{e}");
        assert!(
            e.to_string().contains("/nonexistent/ferrite-swap.img"),
            "{e}"
        );
        let e = handle.swap(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(e, Error::NotRegular { .. }), "{e}");
        assert!(handle.swap(&std::env::temp_dir()).is_err());
        // An image another disk writes is refused as locked.
        let other = image(512);
        let holder = Block::new(1, &config(&other, false, None)).unwrap();
        let e = handle.swap(other.as_path()).unwrap_err();
        assert!(matches!(e, Error::Locked { .. }), "{e}");
        drop(holder);

        assert_eq!(handle.path(), s.file.as_path());
        assert_eq!(dev.capacity(), SECTORS);
        assert_eq!(g.interrupt.config_generation(), gen0);
        assert_eq!(g.interrupt.status() & INT_CONFIG, 0);
        write_header(&s.mem, HDR, VIRTIO_BLK_T_IN, 3);
        assert_eq!(
            g.request(&mut dev, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
            (513, sb(VIRTIO_BLK_S_OK))
        );
        assert_eq!(
            read_guest(&s.mem, DATA, 512),
            file_bytes(&s.file)[3 * 512..4 * 512]
        );
        // Still locked by this disk.
        assert!(matches!(
            Block::new(1, &config(&s.file, false, None)),
            Err(Error::Locked { .. })
        ));
    }

    /// A swap while a request's file I/O is under way: that request ends on the old
    /// image (which stays locked until then), the ones behind it go to the new one.
    #[test]
    fn swap_while_requests_are_queued_serves_the_one_in_flight_on_the_old_image_and_the_rest_on_the_new(
    ) {
        const QUICK: Duration = Duration::from_millis(500);
        const HDR2: u64 = HDR + 0x100;
        const STATUS2: u64 = STATUS + 0x100;
        let s = setup();
        let new = image(128 * 512);
        new.as_file().write_all_at(&[0x77; 128 * 512], 0).unwrap();
        let mut dev = Block::new(0, &config(&s.file, false, None)).unwrap();
        let handle = dev.handle();
        let held = Arc::new(HeldIo::default());
        dev.set_io_hook(held.hook());
        let mut g = Guest::new(&s.mem);
        g.start(&mut dev, 0);

        s.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        s.mem.write_obj(0xeeu8, GuestAddress(STATUS2)).unwrap();
        write_header(&s.mem, HDR, VIRTIO_BLK_T_IN, 0);
        let first = g.submit(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        dev.queue_notify(0);
        assert!(held.wait_held(), "the read reached the disk");

        let start = Instant::now();
        assert_eq!(handle.swap(new.as_path()).unwrap(), 128 * 512);
        assert!(start.elapsed() < QUICK, "the swap waited for the held read");
        // The old image is still open (and locked) for the read in flight.
        assert!(matches!(
            Block::new(1, &config(&s.file, false, None)),
            Err(Error::Locked { .. })
        ));
        write_header(&s.mem, HDR2, VIRTIO_BLK_T_IN, 100);
        let second = g.submit(&[(HDR2, 16, R), (DATA2, 512, W), (STATUS2, 1, W)]);

        held.release();
        let used = g.run(&mut dev);
        assert_eq!(
            used,
            vec![(u32::from(first), 513), (u32::from(second), 513)]
        );
        assert_eq!(
            s.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            sb(VIRTIO_BLK_S_OK)
        );
        assert_eq!(
            s.mem.read_obj::<u8>(GuestAddress(STATUS2)).unwrap(),
            sb(VIRTIO_BLK_S_OK)
        );
        assert_eq!(read_guest(&s.mem, DATA, 512), file_bytes(&s.file)[..512]);
        // Sector 100 lies beyond the old image: only the new one has it.
        assert_eq!(read_guest(&s.mem, DATA2, 512), vec![0x77; 512]);
        // The old image was closed after its last request.
        drop(Block::new(1, &config(&s.file, false, None)).unwrap());
        assert_eq!(dev.worker_health(), Some((true, 0)));
    }

    /// Kata starts with empty placeholder drives and plugs a disk by replacing the file
    /// behind the same path; it unplugs by putting an empty file back. A file resized in
    /// place (the same file this disk has locked) must not read as "in use".
    #[test]
    fn zero_byte_placeholder_is_plugged_resized_and_unplugged_through_the_same_path() {
        let placeholder = image(0);
        let path = placeholder.as_path().to_path_buf();
        let mem = guest_mem(MEM_SIZE);
        let mut dev = Block::new(0, &config(&placeholder, false, None)).unwrap();
        let handle = dev.handle();
        let mut g = Guest::new(&mem);
        g.start(&mut dev, 0);
        let read = |g: &mut Guest<'_>, dev: &mut Block, sector: u64| {
            write_header(&mem, HDR, VIRTIO_BLK_T_IN, sector);
            g.request(dev, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)])
        };
        assert_eq!(read(&mut g, &mut dev, 0), (1, sb(VIRTIO_BLK_S_IOERR)));

        // Plugged: a new file renamed over the placeholder's path.
        let staged = path.with_extension("staged");
        std::fs::write(&staged, (0..16 * 512).map(pattern).collect::<Vec<u8>>()).unwrap();
        std::fs::rename(&staged, &path).unwrap();
        assert_eq!(handle.swap(&path).unwrap(), 16 * 512);
        assert_eq!(g.interrupt.config_generation(), 1);
        assert_ne!(g.interrupt.status() & INT_CONFIG, 0);
        assert_eq!(read(&mut g, &mut dev, 15), (513, sb(VIRTIO_BLK_S_OK)));
        let bytes: Vec<u8> = (15 * 512..16 * 512).map(pattern).collect();
        assert_eq!(read_guest(&mem, DATA, 512), bytes);

        // Grown in place: the same file, which this disk holds locked.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(32 * 512)
            .unwrap();
        assert_eq!(handle.swap(&path).unwrap(), 32 * 512);
        assert_eq!(read(&mut g, &mut dev, 31), (513, sb(VIRTIO_BLK_S_OK)));
        // Still locked against others.
        assert!(matches!(
            Block::new(1, &config(&placeholder, true, None)),
            Err(Error::Locked { .. })
        ));

        // Unplugged: an empty file again.
        std::fs::write(&staged, b"").unwrap();
        std::fs::rename(&staged, &path).unwrap();
        assert_eq!(handle.swap(&path).unwrap(), 0);
        assert_eq!(dev.capacity(), 0);
        assert_eq!(read(&mut g, &mut dev, 0), (1, sb(VIRTIO_BLK_S_IOERR)));
        assert_eq!(g.interrupt.config_generation(), 3);
    }

    /// Firecracker offers VIRTIO_BLK_F_FLUSH only for `cache_type: Writeback`; `--disk`
    /// keeps offering it.
    #[test]
    fn writeback_offers_flush_and_unsafe_does_not() {
        let t = image(4096);
        let flush = 1u64 << VIRTIO_BLK_F_FLUSH;
        let unsafe_cfg = DiskConfig {
            cache: CacheType::Unsafe,
            ..config(&t, false, None)
        };
        assert_eq!(CacheType::default(), CacheType::Unsafe);
        let dev = Block::new(0, &unsafe_cfg).unwrap();
        assert_eq!(dev.device_features() & flush, 0);
        drop(dev);
        let writeback = DiskConfig {
            cache: CacheType::Writeback,
            ..config(&t, false, None)
        };
        let dev = Block::new(0, &writeback).unwrap();
        assert_ne!(dev.device_features() & flush, 0);
        drop(dev);
        let cli = DiskConfig::parse(t.as_path().to_str().unwrap()).unwrap();
        assert_eq!(cli.cache, CacheType::Writeback);
        assert_eq!(
            serde_json::from_str::<CacheType>(r#""Writeback""#).unwrap(),
            CacheType::Writeback
        );
    }

    // --- rate limiter ----------------------------------------------------------------

    fn bucket(size: u64, refill_ms: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time: refill_ms,
        }
    }

    const HOUR_MS: u64 = 3_600_000;

    /// Polls `used idx` of `g`'s queue until it reaches `n` (true) or `timeout` passes.
    fn used_reaches(g: &Guest<'_>, n: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if g.vq.used().idx().load() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        g.vq.used().idx().load() >= n
    }

    /// A request over the limit waits on the disk's worker only: the device keeps
    /// answering, a new limit lets it through at once, and a reset ends the wait
    /// without completing it.
    #[test]
    fn a_request_over_the_ops_limit_waits_until_the_limit_is_lifted_or_the_device_reset() {
        const QUICK: Duration = Duration::from_millis(500);
        let s = setup();
        let cfg = DiskConfig {
            rate_limiter: RateLimiterConfig {
                bandwidth: None,
                ops: Some(bucket(2, HOUR_MS)),
            },
            ..config(&s.file, false, None)
        };
        let mut dev = Block::new(0, &cfg).unwrap();
        let handle = dev.handle();
        assert_eq!(handle.rate_limiter().ops, Some(bucket(2, HOUR_MS)));
        let mut g = Guest::new(&s.mem);
        g.start(&mut dev, 0);
        write_header(&s.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        let flush = [(HDR, 16, R), (STATUS, 1, W)];
        for _ in 0..2 {
            assert_eq!(g.request(&mut dev, &flush), (1, sb(VIRTIO_BLK_S_OK)));
        }
        s.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        g.submit(&flush);
        dev.queue_notify(0);
        assert!(
            !used_reaches(&g, 3, Duration::from_millis(300)),
            "the third flush waits"
        );
        // The device is not blocked meanwhile.
        let start = Instant::now();
        dev.queue_notify(0);
        let mut c = [0u8; 8];
        dev.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), SECTORS);
        assert!(start.elapsed() < QUICK);

        // The limit is lifted: served at once.
        handle.set_rate_limiter(None, Some(&bucket(0, 0)));
        assert!(used_reaches(&g, 3, WAIT), "served once the limit went");
        assert_eq!(
            s.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            sb(VIRTIO_BLK_S_OK)
        );
        assert_eq!(handle.rate_limiter(), RateLimiterConfig::default());
        assert!(dev.wait_idle(WAIT));
        g.used_seen = 3;

        // A new bucket starts full: one passes, the next waits until the reset.
        handle.set_rate_limiter(None, Some(&bucket(1, HOUR_MS)));
        assert_eq!(g.request(&mut dev, &flush), (1, sb(VIRTIO_BLK_S_OK)));
        s.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        g.submit(&flush);
        dev.queue_notify(0);
        assert!(!used_reaches(&g, 5, Duration::from_millis(300)));
        let start = Instant::now();
        dev.reset();
        assert!(start.elapsed() < QUICK, "the reset waited for the limiter");
        assert!(dev.wait_idle(QUICK), "the worker gave the request up");
        assert_eq!(g.vq.used().idx().load(), 4);
        assert_eq!(s.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xee);
        assert_eq!(dev.worker_health(), Some((true, 0)));
    }

    /// The requests served before one that must wait for tokens are signalled to the
    /// driver before the wait, not after it.
    #[test]
    fn requests_served_before_a_throttled_one_are_signalled_at_once() {
        let s = setup();
        let cfg = DiskConfig {
            rate_limiter: RateLimiterConfig {
                bandwidth: None,
                ops: Some(bucket(1, HOUR_MS)),
            },
            ..config(&s.file, false, None)
        };
        let mut dev = Block::new(0, &cfg).unwrap();
        let mut g = Guest::new(&s.mem);
        g.start(&mut dev, 1 << VIRTIO_RING_F_EVENT_IDX);
        write_header(&s.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        let flush = [(HDR, 16, R), (STATUS, 1, W)];
        g.submit(&flush);
        g.submit(&flush);
        dev.queue_notify(0);
        assert!(used_reaches(&g, 1, WAIT));
        assert!(!used_reaches(&g, 2, Duration::from_millis(200)));
        assert_ne!(g.interrupt.status() & INT_USED_RING, 0);
    }

    /// Dropping the VM while a disk's worker waits for tokens does not wait for them.
    #[test]
    fn a_worker_waiting_for_tokens_stops_at_once_when_the_disk_goes() {
        let s = setup();
        let cfg = DiskConfig {
            rate_limiter: RateLimiterConfig {
                bandwidth: Some(bucket(512, HOUR_MS)),
                ops: None,
            },
            ..config(&s.file, false, None)
        };
        let mut dev = Block::new(0, &cfg).unwrap();
        let mut g = Guest::new(&s.mem);
        g.start(&mut dev, 0);
        write_header(&s.mem, HDR, VIRTIO_BLK_T_IN, 0);
        let read = [(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)];
        assert_eq!(g.request(&mut dev, &read), (513, sb(VIRTIO_BLK_S_OK)));
        g.submit(&read);
        dev.queue_notify(0);
        assert!(!used_reaches(&g, 2, Duration::from_millis(300)));
        let start = Instant::now();
        drop(dev);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        // Its image lock went with it.
        assert!(Block::new(0, &config(&s.file, false, None)).is_ok());
    }

    /// The bandwidth bucket spaces reads out: 64 KiB per 100 ms, bucket full at the
    /// start, so four 64 KiB reads take at least 300 ms.
    #[test]
    fn the_bandwidth_limit_spaces_reads_out() {
        const CHUNK: u32 = 64 << 10;
        let file = image(4 * CHUNK as usize);
        let mem = guest_mem(MEM_SIZE);
        let cfg = DiskConfig {
            rate_limiter: RateLimiterConfig {
                bandwidth: Some(bucket(u64::from(CHUNK), 100)),
                ops: None,
            },
            ..config(&file, true, None)
        };
        let mut dev = Block::new(0, &cfg).unwrap();
        let mut g = Guest::new(&mem);
        g.start(&mut dev, 0);
        let start = Instant::now();
        for i in 0..4u64 {
            write_header(&mem, HDR, VIRTIO_BLK_T_IN, i * u64::from(CHUNK) / 512);
            assert_eq!(
                g.request(&mut dev, &[(HDR, 16, R), (DATA, CHUNK, W), (STATUS, 1, W)]),
                (CHUNK + 1, sb(VIRTIO_BLK_S_OK))
            );
            assert_eq!(
                read_guest(&mem, DATA, CHUNK as usize),
                file_bytes(&file)[(i * u64::from(CHUNK)) as usize..][..CHUNK as usize]
            );
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < WAIT, "{took:?}");
    }

    // --- property test: random rings ---------------------------------------------

    mod random_rings {
        use super::*;
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};

        const PMEM: usize = 0x1_0000;
        const PQADDR: u64 = 0x1000;
        const PSECTORS: u64 = 128;
        /// Bytes past the last whole sector: never visible to the guest, never written.
        const TAIL: usize = 100;

        #[derive(Debug, Clone)]
        struct RandomDesc {
            addr: u64,
            len: u32,
            flags: u16,
            next: u16,
            header: Option<(u32, u64)>,
        }

        #[derive(Debug, Clone)]
        struct Case {
            size_log2: u8,
            descs: Vec<RandomDesc>,
            avail: Vec<u16>,
            avail_idx: u16,
            used_event: u16,
            event_idx: bool,
            read_only: bool,
            bad_used_ring: bool,
            fill_seed: u64,
            /// Lay plausible chains over the random descriptors, then mutate a few fields.
            shape: Option<Shape>,
        }

        #[derive(Debug, Clone)]
        struct Shape {
            chain_lens: Vec<u8>,
            /// (descriptor, field, value)
            mutations: Vec<(u8, u8, u64)>,
        }

        fn addr() -> impl Strategy<Value = u64> {
            prop_oneof![
                6 => 0u64..PMEM as u64,
                1 => (PMEM as u64 - 0x100)..(PMEM as u64 + 0x100),
                1 => any::<u64>(),
                1 => (u64::MAX - 0x2000)..=u64::MAX,
            ]
        }

        fn len() -> impl Strategy<Value = u32> {
            prop_oneof![
                3 => 0u32..32,
                2 => Just(16u32),
                2 => Just(1u32),
                2 => Just(512u32),
                2 => 500u32..1100,
                1 => any::<u32>(),
                1 => (u32::MAX - 16)..=u32::MAX,
            ]
        }

        fn req_type() -> impl Strategy<Value = u32> {
            prop_oneof![
                Just(VIRTIO_BLK_T_IN),
                Just(VIRTIO_BLK_T_OUT),
                Just(VIRTIO_BLK_T_FLUSH),
                Just(VIRTIO_BLK_T_GET_ID),
                Just(VIRTIO_BLK_T_DISCARD),
                Just(VIRTIO_BLK_T_WRITE_ZEROES),
                any::<u32>(),
            ]
        }

        fn desc() -> impl Strategy<Value = RandomDesc> {
            (
                addr(),
                len(),
                prop_oneof![4 => 0u16..4, 1 => 0u16..8, 1 => any::<u16>()],
                prop_oneof![4 => 0u16..16, 1 => any::<u16>()],
                proptest::option::weighted(
                    0.6,
                    (
                        req_type(),
                        prop_oneof![3 => 0u64..PSECTORS + 4, 1 => any::<u64>()],
                    ),
                ),
            )
                .prop_map(|(addr, len, flags, next, header)| RandomDesc {
                    addr,
                    len,
                    flags,
                    next,
                    header,
                })
        }

        fn case() -> impl Strategy<Value = Case> {
            (
                0u8..=4,
                proptest::collection::vec(desc(), 16),
                proptest::collection::vec(prop_oneof![4 => 0u16..16, 1 => any::<u16>()], 16),
                prop_oneof![4 => 0u16..=17, 1 => any::<u16>()],
                any::<u16>(),
                any::<bool>(),
                proptest::bool::weighted(0.2),
                proptest::bool::weighted(0.05),
                any::<u64>(),
                proptest::option::weighted(
                    0.6,
                    (
                        proptest::collection::vec(1u8..=5, 1..8),
                        proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u64>()), 0..3),
                    )
                        .prop_map(|(chain_lens, mutations)| Shape {
                            chain_lens,
                            mutations,
                        }),
                ),
            )
                .prop_map(
                    |(
                        size_log2,
                        descs,
                        avail,
                        avail_idx,
                        used_event,
                        event_idx,
                        read_only,
                        bad_used_ring,
                        fill_seed,
                        shape,
                    )| Case {
                        size_log2,
                        descs,
                        avail,
                        avail_idx,
                        used_event,
                        event_idx,
                        read_only,
                        bad_used_ring,
                        fill_seed,
                        shape,
                    },
                )
        }

        /// Discard / write-zeroes segments to write: (address, sector, sectors, flags).
        type Segs = Vec<(u64, u64, u32, u32)>;

        /// Plausible chains (header, data, status) built from the random descriptors,
        /// with a few fields then replaced by random values.
        fn shaped(c: &Case, shape: &Shape) -> (Vec<RandomDesc>, Vec<u16>, u16, Segs) {
            let size = 1usize << c.size_log2;
            let mut descs = c.descs.clone();
            let mut heads = Vec::new();
            let mut segs = Vec::new();
            let mut i = 0usize;
            for &n in &shape.chain_lens {
                let n = usize::from(n);
                if i + n > size {
                    break;
                }
                heads.push(i as u16);
                let ty = descs[i].header.map_or(VIRTIO_BLK_T_IN, |h| h.0);
                let dwz = ty == VIRTIO_BLK_T_DISCARD || ty == VIRTIO_BLK_T_WRITE_ZEROES;
                for k in 0..n {
                    let d = &mut descs[i + k];
                    d.addr = (0x2000 + d.addr % (PMEM as u64 - 0x3000)) & !0xf;
                    let last = k + 1 == n;
                    let (write, len) = if k == 0 {
                        (false, 16)
                    } else if last {
                        (true, 1)
                    } else if dwz {
                        segs.push((
                            d.addr,
                            u64::from(d.len) % (PSECTORS + 2),
                            u32::from(d.next % 64),
                            u32::from(d.flags & 1),
                        ));
                        (false, 16)
                    } else {
                        // The right direction for the type, seven times in eight.
                        let to_guest = ty == VIRTIO_BLK_T_IN || ty == VIRTIO_BLK_T_GET_ID;
                        (to_guest == (d.flags & 7 != 0), 512 * (1 + d.len % 4))
                    };
                    d.len = len;
                    d.flags = (if write { VRING_DESC_F_WRITE } else { 0 }
                        | if last { 0 } else { VRING_DESC_F_NEXT })
                        as u16;
                    d.next = (i + k + 1) as u16;
                    if k == 0 {
                        d.header = Some(d.header.unwrap_or((VIRTIO_BLK_T_IN, 0)));
                    } else {
                        d.header = None;
                    }
                }
                i += n;
            }
            for &(idx, field, v) in &shape.mutations {
                let d = &mut descs[usize::from(idx) % size];
                match field % 4 {
                    0 => d.addr = v,
                    1 => d.len = v as u32,
                    2 => d.flags = v as u16,
                    _ => d.next = v as u16,
                }
            }
            let n = heads.len() as u16;
            (descs, heads, n, segs)
        }

        /// Guest memory full of noise, then headers, then the rings.
        fn build(mem: &GuestMemory, c: &Case) -> Queue {
            let mut x = c.fill_seed | 1;
            let mut noise = vec![0u8; PMEM];
            for chunk in noise.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            mem.write_slice(&noise, GuestAddress(0)).unwrap();
            let size = 1u16 << c.size_log2;
            let (descs, avail, avail_idx, segs) = match &c.shape {
                Some(shape) => shaped(c, shape),
                None => (c.descs.clone(), c.avail.clone(), c.avail_idx, Vec::new()),
            };
            for d in &descs {
                if let Some((ty, sector)) = d.header {
                    if d.addr.checked_add(16).is_some_and(|e| e <= PMEM as u64) {
                        write_header(mem, d.addr, ty, sector);
                    }
                }
            }
            for (addr, sector, sectors, flags) in segs {
                write_dwz_seg(mem, addr, sector, sectors, flags);
            }
            let vq = MockSplitQueue::create(mem, GuestAddress(PQADDR), size);
            for (i, d) in descs.iter().take(usize::from(size)).enumerate() {
                let raw = SplitDescriptor::new(d.addr, d.len, d.flags, d.next);
                vq.desc_table()
                    .store(i as u16, RawDescriptor::from(raw))
                    .unwrap();
            }
            for (i, head) in avail.iter().take(usize::from(size)).enumerate() {
                vq.avail().ring().ref_at(i).unwrap().store(*head);
            }
            vq.avail().idx().store(avail_idx);
            let used_event = vq.avail_addr().0 + 4 + 2 * u64::from(size);
            mem.write_obj(c.used_event, GuestAddress(used_event))
                .unwrap();
            vq.used().idx().store(0);
            let mut q: Queue = vq.create_queue().unwrap();
            if c.bad_used_ring {
                q.set_used_ring_address(Some(PMEM as u32 - 4), Some(0));
            }
            q
        }

        /// After a random pass, the device must still serve a well-formed GET_ID.
        fn still_works(dev: &mut Block, mem: &GuestMemory) -> Result<(), TestCaseError> {
            dev.reset();
            mem.write_slice(&vec![0u8; 0x1000], GuestAddress(0x8000))
                .unwrap();
            let vq = MockSplitQueue::create(mem, GuestAddress(0x8000), 4);
            let (hdr, id, status) = (0xa000u64, 0xa100u64, 0xa200u64);
            write_header(mem, hdr, VIRTIO_BLK_T_GET_ID, 0);
            mem.write_obj(0xeeu8, GuestAddress(status)).unwrap();
            let descs = [
                (hdr, 16, 0),
                (id, 20, VRING_DESC_F_WRITE),
                (status, 1, VRING_DESC_F_WRITE),
            ];
            for (i, (a, l, f)) in descs.into_iter().enumerate() {
                let next = if i < 2 { VRING_DESC_F_NEXT } else { 0 };
                let d = SplitDescriptor::new(a, l, (f | next) as u16, i as u16 + 1);
                vq.desc_table()
                    .store(i as u16, RawDescriptor::from(d))
                    .unwrap();
            }
            vq.avail().ring().ref_at(0).unwrap().store(0);
            vq.avail().idx().store(1);
            let irq = new_interrupt();
            dev.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq.clone())
                .unwrap();
            dev.queue_notify(0);
            prop_assert!(dev.wait_idle(WAIT));
            prop_assert_eq!(mem.read_obj::<u8>(GuestAddress(status)).unwrap(), 0);
            prop_assert_eq!(
                read_guest(mem, id, 20),
                b"random-rings\0\0\0\0\0\0\0\0".to_vec()
            );
            prop_assert_eq!(vq.used().idx().load(), 1);
            prop_assert!(!irq.needs_reset());
            dev.reset();
            Ok(())
        }

        #[test]
        fn random_rings_never_hurt_the_device() {
            let cases = std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2000);
            let mut runner = TestRunner::new(Config {
                cases,
                failure_persistence: None,
                ..Config::default()
            });
            let file = image(PSECTORS as usize * 512 + TAIL);
            let tail = file_bytes(&file)[PSECTORS as usize * 512..].to_vec();
            let start = Instant::now();
            let result = runner.run(&case(), |c| {
                let mem = guest_mem(PMEM);
                let queue = build(&mem, &c);
                let cfg = DiskConfig {
                    read_only: c.read_only,
                    serial: Some("random-rings".into()),
                    ..DiskConfig::new(file.as_path())
                };
                let mut dev = Block::new(0, &cfg).unwrap();
                let mut acked = dev.device_features();
                if !c.event_idx {
                    acked &= !(1 << VIRTIO_RING_F_EVENT_IDX);
                }
                dev.set_acked_features(acked);
                let irq = new_interrupt();
                dev.activate(mem.clone(), vec![queue], irq.clone()).unwrap();
                prop_assert!(dev.wait_idle(WAIT), "first pass hung");
                dev.queue_notify(0);
                prop_assert!(dev.wait_idle(WAIT), "second pass hung");
                prop_assert_eq!(dev.worker_health(), Some((true, 0)));
                if c.bad_used_ring {
                    prop_assert!(irq.needs_reset());
                }
                still_works(&mut dev, &mem)?;
                drop(dev);
                let bytes = file_bytes(&file);
                prop_assert_eq!(bytes.len(), PSECTORS as usize * 512 + TAIL);
                prop_assert_eq!(&bytes[PSECTORS as usize * 512..], &tail[..]);
                Ok(())
            });
            eprintln!(
                "random_rings: {cases} cases in {:.2} s",
                start.elapsed().as_secs_f64()
            );
            if let Err(e) = result {
                panic!("{e}");
            }
        }
    }
}
