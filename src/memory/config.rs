//! What guest RAM is made of: size, backing, page size and whether it is populated at
//! start. Parsed from `--mem`, `--mem-backing`, `--hugepages` and `--mem-prealloc`.

use std::fmt;
use std::path::PathBuf;

/// Where guest RAM lives on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory (the default).
    Anonymous,
    /// A shared memfd: the host can page it out to swap like tmpfs, and a later
    /// snapshot can hand the fd to another process.
    Memfd,
    /// A shared mapping of a regular file (created if missing, locked while the VM
    /// runs); on hugetlbfs with `--hugepages`.
    File(PathBuf),
    /// A snapshot's memory file, mapped `MAP_PRIVATE` (restore): pages load on first
    /// touch, writes are copy-on-write, the file is never written. Not a `--mem-backing`
    /// choice: `ferrite run --restore` sets it.
    Snapshot(PathBuf),
}

impl Backing {
    /// Parses `--mem-backing`: `anon`, `memfd` or `file=PATH`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "anon" | "anonymous" => Ok(Self::Anonymous),
            "memfd" => Ok(Self::Memfd),
            _ => match s.strip_prefix("file=") {
                Some("") => Err("file= needs a path (file=PATH)".into()),
                Some(path) => Ok(Self::File(PathBuf::from(path))),
                None => Err(format!(
                    "unknown memory backing '{s}' (use anon, memfd or file=PATH)"
                )),
            },
        }
    }

    /// A shared mapping: pages are given back with MADV_REMOVE, not MADV_DONTNEED.
    pub fn is_shared(&self) -> bool {
        !matches!(self, Self::Anonymous | Self::Snapshot(_))
    }
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Anonymous => f.write_str("anonymous"),
            Self::Memfd => f.write_str("memfd"),
            Self::File(p) => write!(f, "file {}", p.display()),
            Self::Snapshot(p) => write!(f, "snapshot {} (private)", p.display()),
        }
    }
}

/// Huge pages for guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePages {
    Off,
    /// Reserved 2 MiB hugetlb pages (a hugetlb memfd, or a file on hugetlbfs). All of
    /// guest RAM is reserved at start: there must be enough free huge pages.
    Hugetlbfs,
    /// Transparent huge pages requested with madvise(MADV_HUGEPAGE).
    Thp,
}

impl HugePages {
    /// Parses `--hugepages[=hugetlbfs|thp]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "hugetlbfs" | "hugetlb" | "2M" | "2m" => Ok(Self::Hugetlbfs),
            "thp" | "transparent" => Ok(Self::Thp),
            "off" | "none" => Ok(Self::Off),
            _ => Err(format!(
                "unknown huge page kind '{s}' (use hugetlbfs, thp or off)"
            )),
        }
    }
}

impl fmt::Display for HugePages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Hugetlbfs => "hugetlbfs",
            Self::Thp => "thp",
        })
    }
}

/// Size of a hugetlb page used for guest RAM.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Guest RAM as the user asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Bytes of guest RAM.
    pub size: u64,
    pub backing: Backing,
    pub hugepages: HugePages,
    /// Populate every page at start (no page faults later; the start-up cost is paid
    /// at once and a host short of memory fails at start, not mid-run).
    pub prealloc: bool,
}

impl MemoryConfig {
    /// `size` bytes of private anonymous memory, populated on demand.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            backing: Backing::Anonymous,
            hugepages: HugePages::Off,
            prealloc: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backings_parse() {
        assert_eq!(Backing::parse("anon"), Ok(Backing::Anonymous));
        assert_eq!(Backing::parse("memfd"), Ok(Backing::Memfd));
        assert_eq!(
            Backing::parse("file=/tmp/x"),
            Ok(Backing::File("/tmp/x".into()))
        );
        for bad in ["", "file=", "file", "shm", "memfd=1"] {
            assert!(Backing::parse(bad).is_err(), "{bad}");
        }
        assert!(Backing::Memfd.is_shared());
        assert!(!Backing::Anonymous.is_shared());
    }

    #[test]
    fn hugepages_parse() {
        assert_eq!(HugePages::parse("hugetlbfs"), Ok(HugePages::Hugetlbfs));
        assert_eq!(HugePages::parse("thp"), Ok(HugePages::Thp));
        assert!(HugePages::parse("1G").is_err());
    }
}
