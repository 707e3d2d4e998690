//! Facts about the host's memory that decide whether a guest of a given size and kind
//! can start: /proc/meminfo, the transparent-huge-page mode, and an estimate of the
//! host kernel memory KVM allocates for every memory slot.
#![allow(unsafe_code)]

use std::path::Path;

/// The /proc/meminfo figures Ferrite uses, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostMemory {
    pub total: u64,
    pub available: u64,
    pub hugepages_free: u64,
    pub hugepage_size: u64,
}

impl HostMemory {
    /// The figures needed to judge a guest of `size` bytes (`huge`: hugetlb pages).
    /// sysinfo(2) answers the common case; /proc/meminfo (MemAvailable, which counts
    /// reclaimable page cache, and the huge page pool) is read only when that is not
    /// enough: measured here, reading and parsing it cost ~128 KiB of Ferrite's RSS.
    pub fn for_guest(size: u64, huge: bool) -> Self {
        let quick = sysinfo();
        if let Some(q) = quick {
            if !huge && kvm_metadata_estimate(size) <= q.available / METADATA_SHARE_OF_AVAILABLE {
                return q;
            }
        }
        Self::read().ok().or(quick).unwrap_or_default()
    }

    /// Reads /proc/meminfo.
    pub fn read() -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string("/proc/meminfo")?))
    }

    /// Parses /proc/meminfo text; missing fields stay 0.
    pub fn parse(text: &str) -> Self {
        let mut m = Self::default();
        for line in text.lines() {
            let Some((key, rest)) = line.split_once(':') else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let Some(Ok(n)) = words.next().map(str::parse::<u64>) else {
                continue;
            };
            let n = if words.next() == Some("kB") {
                n << 10
            } else {
                n
            };
            match key {
                "MemTotal" => m.total = n,
                "MemAvailable" => m.available = n,
                "HugePages_Free" => m.hugepages_free = n,
                "Hugepagesize" => m.hugepage_size = n,
                _ => {}
            }
        }
        m
    }
}

/// Total RAM and free RAM (as `available`: a lower bound of MemAvailable, which also
/// counts reclaimable caches) from sysinfo(2).
fn sysinfo() -> Option<HostMemory> {
    let mut si = std::mem::MaybeUninit::<libc::sysinfo>::zeroed();
    // SAFETY: `si` points to writable memory of the size sysinfo(2) fills.
    if unsafe { libc::sysinfo(si.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: sysinfo returned 0, so it initialised the struct.
    let si = unsafe { si.assume_init() };
    let unit = u64::from(si.mem_unit.max(1));
    Some(HostMemory {
        total: si.totalram * unit,
        available: si.freeram * unit,
        ..Default::default()
    })
}

/// Upper bound of the host kernel memory KVM allocates for `size` bytes of memory
/// slots on x86: a reverse-map entry (8 bytes) and a write-tracking counter (2 bytes)
/// per 4 KiB page, plus the large-page tables (small). It does not show in Ferrite's
/// RSS. Measured on this project's hosts: ~142 MiB for a 64 GiB guest, ~2.5 GiB for
/// 1 TiB (the estimate gives 160 MiB and 2.5 GiB). With hardware two-dimensional
/// paging and the TDP MMU, KVM allocates the reverse map only when a nested guest
/// needs it, so the real cost there can be far lower.
pub fn kvm_metadata_estimate(size: u64) -> u64 {
    let pages = size.div_ceil(4096);
    let large = size.div_ceil(2 << 20) + size.div_ceil(1 << 30);
    pages * 10 + large * 12
}

/// Fraction of the host's available memory one VM's fixed KVM cost may take.
const METADATA_SHARE_OF_AVAILABLE: u64 = 2;

/// What the host says about a guest of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fit {
    Fits,
    /// It starts, but guest RAM exceeds host RAM: it can only run overcommitted.
    Overcommitted {
        guest: u64,
        host_total: u64,
    },
    /// KVM's fixed cost for the slots alone would take more than half of the host's
    /// available memory.
    TooCostly {
        cost: u64,
        available: u64,
    },
}

/// Judges whether a guest of `size` bytes fits on a host with `host` memory.
pub fn fit(size: u64, host: &HostMemory) -> Fit {
    let cost = kvm_metadata_estimate(size);
    if host.available > 0 && cost > host.available / METADATA_SHARE_OF_AVAILABLE {
        return Fit::TooCostly {
            cost,
            available: host.available,
        };
    }
    if host.total > 0 && size > host.total {
        return Fit::Overcommitted {
            guest: size,
            host_total: host.total,
        };
    }
    Fit::Fits
}

/// The transparent-huge-page mode: the bracketed word of
/// /sys/kernel/mm/transparent_hugepage/enabled ("always", "madvise" or "never"), or
/// `None` when the kernel has no THP.
pub fn thp_mode() -> Option<String> {
    let text = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    parse_thp_mode(&text)
}

fn parse_thp_mode(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_string())
}

/// Whether `path`'s file system is hugetlbfs.
pub fn is_hugetlbfs(path: &Path) -> std::io::Result<bool> {
    let st = statfs_type(path)?;
    Ok(st == HUGETLBFS_MAGIC)
}

const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Whether `path`'s file system is tmpfs (its pages are memory, like a memfd's).
pub fn is_tmpfs(path: &Path) -> std::io::Result<bool> {
    Ok(statfs_type(path)? == TMPFS_MAGIC)
}

const TMPFS_MAGIC: i64 = 0x0102_1994;

fn statfs_type(path: &Path) -> std::io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` points to writable memory of the
    // size statfs(2) fills.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statfs returned 0, so it initialised the struct.
    let st = unsafe { st.assume_init() };
    Ok(st.f_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24608112 kB\nMemFree:        1000 kB\n\
        MemAvailable:   20000000 kB\nHugePages_Total:       0\nHugePages_Free:        3\n\
        Hugepagesize:       2048 kB\n";

    #[test]
    fn meminfo_parses() {
        let m = HostMemory::parse(MEMINFO);
        assert_eq!(m.total, 24_608_112 << 10);
        assert_eq!(m.available, 20_000_000 << 10);
        assert_eq!(m.hugepages_free, 3);
        assert_eq!(m.hugepage_size, 2 << 20);
        assert_eq!(
            HostMemory::parse("garbage\n:\nMemTotal: x kB"),
            HostMemory::default()
        );
    }

    #[test]
    fn metadata_estimate_matches_measurements() {
        let mib = |b: u64| b >> 20;
        // Measured ~142 MiB for 64 GiB and ~2.5 GiB for 1 TiB on this project's hosts.
        assert!((140..=170).contains(&mib(kvm_metadata_estimate(64 << 30))));
        assert!((2500..=2600).contains(&mib(kvm_metadata_estimate(1 << 40))));
    }

    #[test]
    fn fit_refuses_costly_and_warns_overcommit() {
        let host = HostMemory {
            total: 24 << 30,
            available: 4 << 30,
            ..Default::default()
        };
        assert_eq!(fit(128 << 20, &host), Fit::Fits);
        assert!(matches!(fit(64 << 30, &host), Fit::Overcommitted { .. }));
        // 1 TiB costs ~2.5 GiB of KVM metadata: more than half of 4 GiB available.
        assert!(matches!(fit(1 << 40, &host), Fit::TooCostly { .. }));
        // Unknown host figures never refuse.
        assert_eq!(fit(1 << 40, &HostMemory::default()), Fit::Fits);
    }

    #[test]
    fn thp_mode_parses() {
        assert_eq!(
            parse_thp_mode("always [madvise] never\n").as_deref(),
            Some("madvise")
        );
        assert_eq!(parse_thp_mode("always madvise never"), None);
    }
}
