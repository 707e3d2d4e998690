//! The memory cgroup limits that apply to Ferrite: its own cgroup's and every
//! ancestor's, on cgroup v2 (`memory.max`, `memory.current`) or on a v1 memory
//! hierarchy (`memory.limit_in_bytes`, `memory.usage_in_bytes`). `--mem-prealloc`
//! checks them before and while it populates guest RAM: a cgroup that cannot hold the
//! memory would otherwise summon the OOM killer (SIGKILL, no message).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

/// A limit at or above this is "no limit" (v1 reports unlimited as ~2^63).
const UNLIMITED: u64 = 1 << 60;

/// Which cgroup interface a limit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// One cgroup with a memory limit, as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// The cgroup's directory (e.g. /sys/fs/cgroup/system.slice/x.service).
    pub dir: PathBuf,
    pub version: Version,
    pub limit: u64,
    pub usage: u64,
    /// Page cache in the cgroup (active and inactive file pages), which the kernel
    /// reclaims before it runs out.
    pub reclaimable: u64,
}

impl Limit {
    /// Bytes the cgroup can still be charged before it hits its limit.
    pub fn headroom(&self) -> u64 {
        let pinned = self.usage.saturating_sub(self.reclaimable);
        self.limit.saturating_sub(pinned)
    }

    /// The file that holds the limit.
    pub fn limit_file(&self) -> &'static str {
        match self.version {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        }
    }

    /// Reads the usage again (the limit is kept); `None` when it cannot be read.
    pub fn refresh(&self) -> Option<Limit> {
        read_dir_limit(&self.dir, self.version).map(|mut l| {
            l.limit = l.limit.min(self.limit);
            l
        })
    }
}

/// The limited cgroups this process is charged to, innermost first (empty when none
/// has a limit or the cgroup files cannot be read).
pub fn limits() -> Vec<Limit> {
    let (Ok(cgroup), Ok(mountinfo)) = (
        std::fs::read_to_string("/proc/self/cgroup"),
        std::fs::read_to_string("/proc/self/mountinfo"),
    ) else {
        return Vec::new();
    };
    let Some((dir, top, version)) = memory_cgroup_dir(&cgroup, &mountinfo) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut cur = Some(dir.as_path());
    while let Some(d) = cur {
        if let Some(l) = read_dir_limit(d, version) {
            out.push(l);
        }
        if d == top {
            break;
        }
        cur = d.parent().filter(|p| p.starts_with(&top));
    }
    out
}

/// The limit of the cgroup at `dir`, or `None` when it has none or it cannot be read.
fn read_dir_limit(dir: &Path, version: Version) -> Option<Limit> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let (limit_file, usage_file) = match version {
        Version::V1 => ("memory.limit_in_bytes", "memory.usage_in_bytes"),
        Version::V2 => ("memory.max", "memory.current"),
    };
    let limit = read(limit_file)?.trim().parse::<u64>().ok()?; // "max" is no limit
    if limit >= UNLIMITED {
        return None;
    }
    let usage = read(usage_file)?.trim().parse::<u64>().ok()?;
    let reclaimable = read("memory.stat")
        .map(|s| file_pages(&s, version))
        .unwrap_or(0);
    Some(Limit {
        dir: dir.to_path_buf(),
        version,
        limit,
        usage,
        reclaimable,
    })
}

/// Active plus inactive file pages from `memory.stat` (v1: the hierarchical totals).
fn file_pages(stat: &str, version: Version) -> u64 {
    let keys: [&str; 2] = match version {
        Version::V1 => ["total_active_file", "total_inactive_file"],
        Version::V2 => ["active_file", "inactive_file"],
    };
    stat.lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| keys.contains(k))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}

/// The directory of this process's memory cgroup, the mount point of its hierarchy
/// (the walk stops there), and which interface it is. A v1 memory hierarchy wins over
/// v2 (on a hybrid host the memory controller is on v1).
fn memory_cgroup_dir(cgroup: &str, mountinfo: &str) -> Option<(PathBuf, PathBuf, Version)> {
    let mut v1 = None;
    let mut v2 = None;
    for line in cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path);
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path);
        }
    }
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.is_empty() {
            continue;
        }
        let (root, mount) = (unescape(l[3]), PathBuf::from(unescape(l[4])));
        let (version, path) = match (r[0], v1, v2) {
            ("cgroup", Some(p), _)
                if r.get(2)
                    .is_some_and(|o| o.split(',').any(|c| c == "memory")) =>
            {
                (Version::V1, p)
            }
            ("cgroup2", None, Some(p)) => (Version::V2, p),
            _ => continue,
        };
        // The path is relative to the hierarchy's root; the mount shows `root` of it.
        let rel = Path::new(path)
            .strip_prefix(&root)
            .unwrap_or(Path::new(path));
        let rel = rel.strip_prefix("/").unwrap_or(rel);
        return Some((mount.join(rel), mount, version));
    }
    None
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let n = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |n, c| n * 8 + u32::from(c - b'0'));
            out.push(n as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
36 31 0:31 / /sys/fs/cgroup/memory rw shared:9 - cgroup cgroup rw,memory
37 31 0:32 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";

    #[test]
    fn finds_the_v1_memory_hierarchy_on_a_hybrid_host() {
        let cgroup = "9:name=systemd:/\n4:memory:/a/b\n1:cpu:/\n0::/\n";
        let (dir, top, v) = memory_cgroup_dir(cgroup, MOUNTINFO_HYBRID).unwrap();
        assert_eq!(v, Version::V1);
        assert_eq!(dir, PathBuf::from("/sys/fs/cgroup/memory/a/b"));
        assert_eq!(top, PathBuf::from("/sys/fs/cgroup/memory"));
    }

    #[test]
    fn finds_the_v2_cgroup_and_strips_the_mount_root() {
        let mi = "40 1 0:30 /outer /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let (dir, top, v) = memory_cgroup_dir("0::/outer/x.slice/y.scope\n", mi).unwrap();
        assert_eq!(v, Version::V2);
        assert_eq!(dir, PathBuf::from("/sys/fs/cgroup/x.slice/y.scope"));
        assert_eq!(top, PathBuf::from("/sys/fs/cgroup"));
        let mi = "40 1 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let (dir, _, _) = memory_cgroup_dir("0::/\n", mi).unwrap();
        assert_eq!(dir, PathBuf::from("/sys/fs/cgroup"));
        assert!(memory_cgroup_dir("0::/\n", "").is_none());
        assert!(memory_cgroup_dir("", mi).is_none());
    }

    #[test]
    fn headroom_counts_page_cache_as_reclaimable() {
        let l = Limit {
            dir: "/x".into(),
            version: Version::V2,
            limit: 256 << 20,
            usage: 200 << 20,
            reclaimable: 150 << 20,
        };
        assert_eq!(l.headroom(), 206 << 20);
        let full = Limit {
            usage: 300 << 20,
            reclaimable: 0,
            ..l
        };
        assert_eq!(full.headroom(), 0);
        let stat = "anon 100\nactive_file 4096\ninactive_file 8192\nshmem 5\n";
        assert_eq!(file_pages(stat, Version::V2), 12288);
        let stat = "cache 1\ntotal_active_file 10\ntotal_inactive_file 20\nactive_file 99\n";
        assert_eq!(file_pages(stat, Version::V1), 30);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/a\0"), r"/a\0");
    }
}
