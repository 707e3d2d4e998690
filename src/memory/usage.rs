//! How much host memory guest RAM and Ferrite itself use: the resident pages of the
//! guest RAM mappings (from /proc/self/smaps) apart from the rest of the process.

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
    let ranges: Vec<(u64, u64)> = mem
        .iter()
        .map(|r| {
            let start = r.as_ptr() as u64;
            (start, start + r.len())
        })
        .collect();
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let guest_ram = super::ram_size(mem);
    let guest_rss = rss_within(&smaps, &ranges);
    let process_rss = status_field(&status, "VmRSS").unwrap_or(0);
    Ok(MemoryUsage {
        guest_ram,
        guest_rss,
        process_rss,
        vmm_rss: process_rss.saturating_sub(guest_rss),
        kvm_metadata_estimate: host::kvm_metadata_estimate(guest_ram),
    })
}

/// Sum of the `Rss:` of every smaps entry that lies inside one of `ranges`
/// (`[start, end)` host addresses).
pub fn rss_within(smaps: &str, ranges: &[(u64, u64)]) -> u64 {
    let mut total = 0;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((span, _)) = line.split_once(' ') {
            if let Some((a, b)) = span.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    inside = ranges.iter().any(|&(s, e)| a >= s && b <= e);
                    continue;
                }
            }
        }
        if inside {
            if let Some(rest) = line.strip_prefix("Rss:") {
                total += kib_field(rest).unwrap_or(0);
            }
        }
    }
    total
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

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
7f0000000000-7f0000200000 rw-p 00000000 00:00 0 
Size:               2048 kB
Rss:                1024 kB
7f0000200000-7f0000400000 rw-p 00000000 00:00 0 
Rss:                 512 kB
55aa00000000-55aa00100000 r-xp 00000000 08:01 1234                       /usr/bin/ferrite
Rss:                 700 kB
";

    #[test]
    fn sums_rss_inside_guest_ranges_only() {
        let r = [(0x7f00_0000_0000, 0x7f00_0040_0000)];
        assert_eq!(rss_within(SMAPS, &r), 1536 << 10);
        assert_eq!(
            rss_within(SMAPS, &[(0x7f00_0000_0000, 0x7f00_0020_0000)]),
            1024 << 10
        );
        assert_eq!(rss_within(SMAPS, &[]), 0);
    }

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
