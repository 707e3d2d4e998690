//! How much host memory guest RAM and Ferrite itself use: the resident pages of the
//! guest RAM mappings (mincore(2)) apart from the rest of the process (VmRSS).
//!
//! Not /proc/self/smaps: the kernel merges a guest RAM mapping with an adjacent
//! anonymous mapping of the same kind into one entry, whose Rss cannot be split.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{host, GuestMemory};

/// Host memory figures for one VM, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryUsage {
    /// Guest RAM size.
    pub guest_ram: u64,
    /// Resident host pages of guest RAM.
    pub guest_rss: u64,
    /// The whole process's resident set (VmRSS).
    pub process_rss: u64,
    /// Ferrite's own memory: the process RSS minus guest RAM's.
    pub vmm_rss: u64,
    /// Estimated host kernel memory KVM holds for the memory slots (not in any RSS).
    pub kvm_metadata_estimate: u64,
}

/// Reads the current figures for `mem` in this process.
pub fn read(mem: &GuestMemory) -> std::io::Result<MemoryUsage> {
    let mut guest_rss = 0;
    for r in mem.iter() {
        guest_rss += resident_bytes(r.as_ptr() as u64, r.len())?;
    }
    let status = std::fs::read_to_string("/proc/self/status")?;
    let guest_ram = super::ram_size(mem);
    let process_rss = status_field(&status, "VmRSS").unwrap_or(0);
    Ok(MemoryUsage {
        guest_ram,
        guest_rss,
        process_rss,
        vmm_rss: process_rss.saturating_sub(guest_rss),
        kvm_metadata_estimate: host::kvm_metadata_estimate(guest_ram),
    })
}

/// Bytes of the mapping `host..host+len` (page-aligned, inside guest RAM) that are
/// resident, counted with mincore(2) a chunk at a time (a 64 KiB vector per 256 MiB).
fn resident_bytes(host: u64, len: u64) -> std::io::Result<u64> {
    const PAGE: u64 = super::PAGE_SIZE;
    const CHUNK: u64 = 256 << 20;
    let mut vec = vec![0u8; (CHUNK / PAGE) as usize];
    let mut total = 0;
    let mut off = 0;
    while off < len {
        let n = (len - off).min(CHUNK);
        let pages = n.div_ceil(PAGE) as usize;
        // SAFETY: `host+off..host+off+n` lies inside a live guest RAM mapping that the
        // caller's GuestMemory keeps mapped, and is page-aligned; `vec` has room for the
        // `pages` bytes mincore writes. No memory is changed.
        let rc = unsafe {
            libc::mincore(
                (host + off) as *mut libc::c_void,
                n as usize,
                vec.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        total += vec[..pages].iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE;
        off += n;
    }
    Ok(total)
}

/// A `Key:   N kB` field of /proc/PID/status, in bytes.
pub fn status_field(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        kib_field(rest)
    })
}

fn kib_field(rest: &str) -> Option<u64> {
    let mut w = rest.split_whitespace();
    let n: u64 = w.next()?.parse().ok()?;
    Some(if w.next() == Some("kB") { n << 10 } else { n })
}

/// Gives the heap's free pages back to the kernel (glibc's `malloc_trim(0)`, which also
/// releases whole free pages inside the heap, not only at its top). Start-up frees
/// most of what it allocates (argument parsing alone builds and drops ~70 KiB), and
/// without this those pages stay resident and private for the VM's whole life.
pub fn release_free_heap() {
    // SAFETY: malloc_trim only returns free memory the allocator owns to the kernel;
    // it touches no live allocation. std's allocator on Linux/glibc is malloc.
    unsafe { libc::malloc_trim(0) };
}

/// Makes every thread allocate from the main heap (glibc's `M_ARENA_MAX` = 1) instead
/// of an arena of its own: each arena costs a few private pages per thread for the
/// VM's whole life, and Ferrite's threads allocate little and rarely (the vCPU exit
/// path not at all), so they do not contend for the one lock. Call before the first
/// thread is spawned.
pub fn use_one_heap() {
    // SAFETY: mallopt only changes the allocator's tuning; M_ARENA_MAX takes any
    // positive count.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// Hands the main thread's stack pages below the current frame back to the kernel.
/// Setting up a VM runs deep (argument parsing, image loading) and leaves tens of KiB
/// of stack resident that the main thread, which then only waits, never uses again.
/// Pages below the stack pointer hold nothing live (the System V x86-64 ABI keeps no
/// data below the 128-byte red zone, which lies in the page kept below the frame);
/// later use faults in fresh zero pages. Only the main thread's `[stack]` mapping is
/// touched, located from `/proc/self/maps`.
pub fn release_unused_stack() {
    let here = 0u8;
    let sp = std::ptr::addr_of!(here) as u64;
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    let Some((lo, hi)) = maps
        .lines()
        .filter(|l| l.ends_with("[stack]"))
        .filter_map(|l| {
            let (range, _) = l.split_once(' ')?;
            let (lo, hi) = range.split_once('-')?;
            Some((
                u64::from_str_radix(lo, 16).ok()?,
                u64::from_str_radix(hi, 16).ok()?,
            ))
        })
        .next()
    else {
        return;
    };
    if !(lo..hi).contains(&sp) {
        return; // not on the main thread
    }
    const PAGE: u64 = 4096;
    // Keep the page holding the frame and one below it (red zone, this call's callees).
    let end = (sp & !(PAGE - 1)).saturating_sub(PAGE);
    if end <= lo {
        return;
    }
    // SAFETY: `lo..end` lies inside this thread's own stack mapping, entirely below the
    // current stack pointer minus a page, where no live data exists (see above); no
    // other thread uses the main thread's stack. MADV_DONTNEED there only makes the
    // next touch fault in a zero page.
    unsafe {
        libc::madvise(
            lo as *mut libc::c_void,
            (end - lo) as usize,
            libc::MADV_DONTNEED,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let s = "Name:\tferrite\nVmRSS:\t    1700 kB\nVmHWM:\t2000 kB\n";
        assert_eq!(status_field(s, "VmRSS"), Some(1700 << 10));
        assert_eq!(status_field(s, "VmSwap"), None);
    }

    #[test]
    fn reads_this_process() {
        let mem = super::super::create(8 << 20).unwrap();
        let before = read(&mem).unwrap();
        assert_eq!(before.guest_ram, 8 << 20);
        use vm_memory::{Bytes, GuestAddress};
        for page in 0..256u64 {
            mem.write_obj(1u8, GuestAddress(page * 4096)).unwrap();
        }
        let after = read(&mem).unwrap();
        assert!(
            after.guest_rss >= before.guest_rss + (1 << 20),
            "{before:?} -> {after:?}"
        );
        assert!(after.process_rss >= after.guest_rss);
    }
}
