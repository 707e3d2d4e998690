//! The two system calls the balloon needs and no rust-vmm crate wraps: `madvise` to
//! give guest RAM back to the host, and `fcntl(O_NONBLOCK)` on the statistics timer
//! (vmm-sys-util's `TimerFd` is blocking; a read after a reset disarmed it would stall
//! the event loop).
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{GuestMemory, HUGE_PAGE_SIZE};

/// The guest's page size for balloon PFNs and the unit of every discard.
pub const PAGE: u64 = 4096;

/// Why a range could not be given back.
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
    if !gpa.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        return Err(DiscardError::Unaligned { gpa, len });
    }
    let not_ram = || DiscardError::NotRam { gpa, len };
    let end = gpa.checked_add(len).ok_or_else(not_ram)?;
    // Collect the pieces first: nothing is discarded unless all of the range is RAM.
    let mut pieces = Vec::new();
    let mut at = gpa;
    while at < end {
        let region = mem
            .find_region(vm_memory::GuestAddress(at))
            .ok_or_else(not_ram)?;
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
        let shared = region.flags() & libc::MAP_SHARED != 0;
        let (advice, name) = if shared {
            (libc::MADV_REMOVE, "MADV_REMOVE")
        } else {
            (libc::MADV_DONTNEED, "MADV_DONTNEED")
        };
        let host = region.as_ptr().wrapping_add(offset as usize);
        // SAFETY: `host..host+n` lies inside the region's live mapping (`offset + n <=
        // region.len()`, checked above), which `mem` keeps mapped. madvise changes no
        // Rust-visible memory: the guest RAM is only ever accessed through vm-memory's
        // volatile accessors, which may observe zero (or file) contents afterwards — the
        // guest gave these pages up.
        let rc = unsafe { libc::madvise(host.cast(), n as usize, advice) };
        if rc != 0 {
            return Err(DiscardError::Madvise {
                advice: name,
                gpa: piece_gpa,
                len: n,
                source: std::io::Error::last_os_error(),
            });
        }
        done += n;
    }
    Ok(done)
}

/// Makes `fd` non-blocking.
pub fn set_nonblocking(fd: &impl AsRawFd) -> std::io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an fd the caller owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
