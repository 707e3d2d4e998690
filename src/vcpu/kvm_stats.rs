//! KVM's binary statistics (KVM_GET_STATS_FD, `KVM_CAP_BINARY_STATS_FD`, Linux 5.14+)
//! for a VM or a vCPU: the header, the descriptors (name, type, unit, size) and the
//! data, read from the stats file descriptor with `pread`.
//!
//! ```text
//! header (kvm_stats_header, 24 bytes) at 0
//! id string (name_size bytes) at id_offset
//! descriptors at desc_offset: num_desc * (kvm_stats_desc (16 bytes) + name_size)
//! data at data_offset: each stat's `size` u64s at data_offset + desc.offset
//! ```
//!
//! Open a [`StatsFd`] once (the layout is parsed then) and [`StatsFd::read`] it as often
//! as needed: each read is one `pread` of the data block. kvm-ioctls 0.25 has no
//! wrapper for the ioctl, so it is issued here.
//!
//! `unsafe` is allowed here for the ioctl and for taking ownership of the fd it returns.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::{
    kvm_stats_desc, kvm_stats_header, KVM_CAP_BINARY_STATS_FD, KVM_STATS_BASE_MASK,
    KVM_STATS_BASE_POW10, KVM_STATS_BASE_POW2, KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_INSTANT,
    KVM_STATS_TYPE_LINEAR_HIST, KVM_STATS_TYPE_LOG_HIST, KVM_STATS_TYPE_MASK, KVM_STATS_TYPE_PEAK,
    KVM_STATS_UNIT_BOOLEAN, KVM_STATS_UNIT_BYTES, KVM_STATS_UNIT_CYCLES, KVM_STATS_UNIT_MASK,
    KVM_STATS_UNIT_NONE, KVM_STATS_UNIT_SECONDS,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE};

/// `KVM_GET_STATS_FD = _IO(KVMIO, 0xce)`, on a VM or vCPU fd.
const KVM_GET_STATS_FD: libc::c_ulong = ioctl_expr(_IOC_NONE, 0xAE, 0xce, 0);

const HEADER_LEN: usize = std::mem::size_of::<kvm_stats_header>();
const DESC_LEN: usize = std::mem::size_of::<kvm_stats_desc>();
// Sanity bounds on what the kernel hands us (today: names < 64 bytes, < 200 stats).
const MAX_NAME_SIZE: u32 = 4096;
const MAX_DESCS: u32 = 65_536;
const MAX_VALUES: u16 = 4096;

/// Why statistics could not be had.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host does not offer binary statistics (capability absent, or the ioctl
    /// refused); the reason is meant to be shown as is.
    #[error("KVM binary statistics unavailable: {0}")]
    Unavailable(String),
    /// The cause is part of the message (callers show it with `to_string`), so it is
    /// not also a `source`: a chain would print it twice.
    #[error("reading KVM statistics: {0}")]
    Read(std::io::Error),
    #[error("malformed KVM statistics: {0}")]
    Malformed(String),
}

/// How a statistic's values behave (`KVM_STATS_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Cumulative,
    Instant,
    Peak,
    LinearHistogram,
    LogHistogram,
    Unknown(u32),
}

/// The unit of a statistic's values (`KVM_STATS_UNIT_*`), scaled by `base^exponent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    None,
    Bytes,
    Seconds,
    Cycles,
    Boolean,
    Unknown(u32),
}

/// One statistic: its descriptor and its current values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub name: String,
    pub kind: Kind,
    pub unit: Unit,
    /// 10 or 2: a value `v` means `v * base^exponent` units (`Seconds`, -9: ns).
    pub base: u32,
    pub exponent: i16,
    /// Bucket width of a linear histogram (0 otherwise).
    pub bucket_size: u32,
    /// One value, or one per histogram bucket.
    pub values: Vec<u64>,
}

/// The statistics of one VM or vCPU at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvmStats {
    /// KVM's id for the object (`kvm-1234`, `kvm-1234/vcpu-0`).
    pub id: String,
    pub stats: Vec<Stat>,
}

impl KvmStats {
    pub fn get(&self, name: &str) -> Option<&Stat> {
        self.stats.iter().find(|s| s.name == name)
    }

    /// The first value of `name` (the value, for anything but a histogram).
    pub fn value(&self, name: &str) -> Option<u64> {
        self.get(name).and_then(|s| s.values.first().copied())
    }

    /// `(name, values)` pairs, in KVM's order.
    pub fn pairs(&self) -> Vec<(String, Vec<u64>)> {
        self.stats
            .iter()
            .map(|s| (s.name.clone(), s.values.clone()))
            .collect()
    }
}

/// What the descriptors say, once per fd.
#[derive(Debug, Clone)]
struct Desc {
    name: String,
    flags: u32,
    exponent: i16,
    /// Number of u64 values.
    size: u16,
    /// Byte offset of the values in the data block.
    offset: u32,
    bucket_size: u32,
}

#[derive(Debug, Clone)]
struct Layout {
    id: String,
    data_offset: u64,
    data_len: usize,
    descs: Vec<Desc>,
}

impl Layout {
    fn locate(&self, name: &str) -> Option<StatAt> {
        self.descs
            .iter()
            .find(|d| d.name == name && d.size >= 1)
            .map(|d| StatAt(self.data_offset + u64::from(d.offset)))
    }
}

/// Where the bytes come from: the stats fd, or a buffer in tests.
trait Source {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error>;
}

impl Source for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.read_exact_at(buf, offset).map_err(Error::Read)
    }
}

impl Source for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let bytes = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or_else(|| Error::Read(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)))?;
        buf.copy_from_slice(bytes);
        Ok(())
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn parse_layout(src: &(impl Source + ?Sized)) -> Result<Layout, Error> {
    let mut h = [0u8; HEADER_LEN];
    src.read_at(&mut h, 0)?;
    let name_size = u32_at(&h, 4);
    let num_desc = u32_at(&h, 8);
    let (id_offset, desc_offset, data_offset) = (u32_at(&h, 12), u32_at(&h, 16), u32_at(&h, 20));
    if name_size == 0 || name_size > MAX_NAME_SIZE {
        return Err(Error::Malformed(format!("name size {name_size}")));
    }
    if num_desc > MAX_DESCS {
        return Err(Error::Malformed(format!("{num_desc} descriptors")));
    }
    let name_size = name_size as usize;
    let mut id = vec![0u8; name_size];
    src.read_at(&mut id, u64::from(id_offset))?;
    let stride = DESC_LEN + name_size;
    let mut block = vec![0u8; stride * num_desc as usize];
    src.read_at(&mut block, u64::from(desc_offset))?;
    let mut descs = Vec::with_capacity(num_desc as usize);
    let mut data_len = 0usize;
    for d in block.chunks_exact(stride) {
        let desc = Desc {
            flags: u32_at(d, 0),
            exponent: i16::from_ne_bytes([d[4], d[5]]),
            size: u16::from_ne_bytes([d[6], d[7]]),
            offset: u32_at(d, 8),
            bucket_size: u32_at(d, 12),
            name: c_string(&d[DESC_LEN..]),
        };
        if desc.size > MAX_VALUES {
            return Err(Error::Malformed(format!(
                "{}: {} values",
                desc.name, desc.size
            )));
        }
        data_len = data_len.max(desc.offset as usize + 8 * usize::from(desc.size));
        descs.push(desc);
    }
    Ok(Layout {
        id: c_string(&id),
        data_offset: u64::from(data_offset),
        data_len,
        descs,
    })
}

fn read_data(src: &(impl Source + ?Sized), layout: &Layout) -> Result<KvmStats, Error> {
    // One read for the whole block: the values are from (nearly) the same moment.
    let mut data = vec![0u8; layout.data_len];
    src.read_at(&mut data, layout.data_offset)?;
    let stats = layout
        .descs
        .iter()
        .map(|d| {
            let start = d.offset as usize;
            let values = data[start..start + 8 * usize::from(d.size)]
                .chunks_exact(8)
                .map(|v| u64::from_ne_bytes(v.try_into().expect("8 bytes")))
                .collect();
            let kind = match d.flags & KVM_STATS_TYPE_MASK {
                KVM_STATS_TYPE_CUMULATIVE => Kind::Cumulative,
                KVM_STATS_TYPE_INSTANT => Kind::Instant,
                KVM_STATS_TYPE_PEAK => Kind::Peak,
                KVM_STATS_TYPE_LINEAR_HIST => Kind::LinearHistogram,
                KVM_STATS_TYPE_LOG_HIST => Kind::LogHistogram,
                other => Kind::Unknown(other),
            };
            let unit = match d.flags & KVM_STATS_UNIT_MASK {
                KVM_STATS_UNIT_NONE => Unit::None,
                KVM_STATS_UNIT_BYTES => Unit::Bytes,
                KVM_STATS_UNIT_SECONDS => Unit::Seconds,
                KVM_STATS_UNIT_CYCLES => Unit::Cycles,
                KVM_STATS_UNIT_BOOLEAN => Unit::Boolean,
                other => Unit::Unknown(other),
            };
            let base = match d.flags & KVM_STATS_BASE_MASK {
                KVM_STATS_BASE_POW10 => 10,
                KVM_STATS_BASE_POW2 => 2,
                _ => 0,
            };
            Stat {
                name: d.name.clone(),
                kind,
                unit,
                base,
                exponent: d.exponent,
                bucket_size: d.bucket_size,
                values,
            }
        })
        .collect();
    Ok(KvmStats {
        id: layout.id.clone(),
        stats,
    })
}

/// An open statistics fd of one VM or vCPU, with its parsed layout. Reading takes
/// `&self` and no lock: any thread may read a vCPU's statistics while it runs.
#[derive(Debug)]
pub struct StatsFd {
    file: File,
    layout: Layout,
}

impl StatsFd {
    /// The VM's statistics fd. `Unavailable` when the host lacks
    /// `KVM_CAP_BINARY_STATS_FD` or refuses the ioctl.
    pub fn for_vm(vm: &VmFd) -> Result<Self, Error> {
        if vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_BINARY_STATS_FD)) <= 0 {
            return Err(Error::Unavailable(
                "the host kernel lacks KVM_CAP_BINARY_STATS_FD (Linux 5.14+)".into(),
            ));
        }
        Self::open(vm, "VM")
    }

    /// The vCPU's statistics fd (the fd stays valid after the vCPU moves to its
    /// thread). `Unavailable` when the ioctl is refused (no binary statistics).
    pub fn for_vcpu(vcpu: &VcpuFd) -> Result<Self, Error> {
        Self::open(vcpu, "vCPU")
    }

    fn open(fd: &impl AsRawFd, what: &str) -> Result<Self, Error> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and only returns a new fd (or
        // -1); `fd` is an open KVM VM or vCPU fd borrowed for the call.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
        if ret < 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::Unavailable(format!(
                "KVM_GET_STATS_FD on the {what} fd: {e}"
            )));
        }
        // SAFETY: `ret` is a new fd the kernel just returned to us; nothing else owns it.
        let file = unsafe { File::from_raw_fd(ret) };
        let layout = parse_layout(&file)?;
        Ok(Self { file, layout })
    }

    /// The current values.
    pub fn read(&self) -> Result<KvmStats, Error> {
        read_data(&self.file, &self.layout)
    }

    /// Where the first value of statistic `name` lives, for [`Self::read_value`]
    /// (`None` when this host's KVM has no such statistic).
    pub fn locate(&self, name: &str) -> Option<StatAt> {
        self.layout.locate(name)
    }

    /// One value, with one 8-byte `pread` (for a poll that reads a statistic or two
    /// every second: no allocation).
    pub fn read_value(&self, at: StatAt) -> Result<u64, Error> {
        read_u64(&self.file, at)
    }
}

/// The position of one statistic's value in a [`StatsFd`] (from [`StatsFd::locate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatAt(u64);

fn read_u64(src: &(impl Source + ?Sized), at: StatAt) -> Result<u64, Error> {
    let mut b = [0u8; 8];
    src.read_at(&mut b, at.0)?;
    Ok(u64::from_ne_bytes(b))
}

/// Opens the VM's statistics and reads them once.
pub fn vm_stats(vm: &VmFd) -> Result<KvmStats, Error> {
    StatsFd::for_vm(vm)?.read()
}

/// Opens a vCPU's statistics and reads them once.
pub fn vcpu_stats(vcpu: &VcpuFd) -> Result<KvmStats, Error> {
    StatsFd::for_vcpu(vcpu)?.read()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stats "file" as KVM lays it out: header, id, descriptors, data.
    fn synthetic(name_size: usize, stats: &[(&str, u32, i16, &[u64])]) -> Vec<u8> {
        let id_offset = HEADER_LEN;
        let desc_offset = id_offset + name_size;
        let data_offset = desc_offset + stats.len() * (DESC_LEN + name_size);
        let mut b = Vec::new();
        for v in [
            0u32,
            name_size as u32,
            stats.len() as u32,
            id_offset as u32,
            desc_offset as u32,
            data_offset as u32,
        ] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        let mut id = b"kvm-42/vcpu-0".to_vec();
        id.resize(name_size, 0);
        b.extend_from_slice(&id);
        let mut data = Vec::new();
        for (name, flags, exponent, values) in stats {
            b.extend_from_slice(&flags.to_ne_bytes());
            b.extend_from_slice(&exponent.to_ne_bytes());
            b.extend_from_slice(&(values.len() as u16).to_ne_bytes());
            b.extend_from_slice(&(data.len() as u32).to_ne_bytes());
            b.extend_from_slice(&7u32.to_ne_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size, 0);
            b.extend_from_slice(&n);
            for v in *values {
                data.extend_from_slice(&v.to_ne_bytes());
            }
        }
        b.extend_from_slice(&data);
        b
    }

    #[test]
    fn parses_a_synthetic_stats_file() {
        let buf = synthetic(
            48,
            &[
                ("exits", KVM_STATS_TYPE_CUMULATIVE, 0, &[123_456]),
                (
                    "halt_poll_success_ns",
                    KVM_STATS_TYPE_CUMULATIVE | KVM_STATS_UNIT_SECONDS,
                    -9,
                    &[99],
                ),
                (
                    "halt_wait_hist",
                    KVM_STATS_TYPE_LOG_HIST | KVM_STATS_UNIT_SECONDS | KVM_STATS_BASE_POW2,
                    -9,
                    &[1, 2, 3, 4],
                ),
                (
                    "guest_mode",
                    KVM_STATS_TYPE_INSTANT | KVM_STATS_UNIT_BOOLEAN,
                    0,
                    &[1],
                ),
                ("odd", 0xf | 0xf0, 0, &[5]),
            ],
        );
        let layout = parse_layout(buf.as_slice()).unwrap();
        let s = read_data(buf.as_slice(), &layout).unwrap();
        assert_eq!(s.id, "kvm-42/vcpu-0");
        assert_eq!(s.value("exits"), Some(123_456));
        let ns = s.get("halt_poll_success_ns").unwrap();
        assert_eq!(
            (ns.kind, ns.unit, ns.base, ns.exponent, ns.bucket_size),
            (Kind::Cumulative, Unit::Seconds, 10, -9, 7)
        );
        let hist = s.get("halt_wait_hist").unwrap();
        assert_eq!(hist.values, vec![1, 2, 3, 4]);
        assert_eq!((hist.kind, hist.base), (Kind::LogHistogram, 2));
        assert_eq!(s.get("guest_mode").unwrap().unit, Unit::Boolean);
        let odd = s.get("odd").unwrap();
        assert_eq!(
            (odd.kind, odd.unit),
            (Kind::Unknown(0xf), Unit::Unknown(0xf0))
        );
        let names: Vec<String> = s.pairs().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "exits",
                "halt_poll_success_ns",
                "halt_wait_hist",
                "guest_mode",
                "odd"
            ]
        );
    }

    #[test]
    fn one_value_is_read_where_the_descriptor_says() {
        let buf = synthetic(
            32,
            &[
                ("exits", KVM_STATS_TYPE_CUMULATIVE, 0, &[77]),
                ("hist", KVM_STATS_TYPE_LOG_HIST, 0, &[1, 2]),
                (
                    "blocking",
                    KVM_STATS_TYPE_INSTANT | KVM_STATS_UNIT_BOOLEAN,
                    0,
                    &[1],
                ),
            ],
        );
        let layout = parse_layout(buf.as_slice()).unwrap();
        let at = |name: &str| layout.locate(name).unwrap();
        assert_eq!(layout.locate("absent"), None);
        assert_eq!(read_u64(buf.as_slice(), at("exits")).unwrap(), 77);
        assert_eq!(read_u64(buf.as_slice(), at("blocking")).unwrap(), 1);
        // Past the end: an error, not a panic.
        assert!(read_u64(buf.as_slice(), StatAt(buf.len() as u64 - 4)).is_err());
    }

    #[test]
    fn rejects_truncated_and_absurd_files() {
        let buf = synthetic(16, &[("exits", 0, 0, &[1]), ("b", 0, 0, &[2, 3])]);
        let layout = parse_layout(buf.as_slice()).unwrap();
        // Data cut short.
        assert!(matches!(
            read_data(&buf[..buf.len() - 1], &layout),
            Err(Error::Read(_))
        ));
        // Descriptors cut short.
        assert!(parse_layout(&buf[..HEADER_LEN + 16 + 10]).is_err());
        assert!(parse_layout(&buf[..10]).is_err());
        let mut bad = buf.clone();
        bad[4..8].copy_from_slice(&0u32.to_ne_bytes());
        assert!(matches!(
            parse_layout(bad.as_slice()),
            Err(Error::Malformed(_))
        ));
        let mut bad = buf;
        bad[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(
            parse_layout(bad.as_slice()),
            Err(Error::Malformed(_))
        ));
    }

    /// Issue 13: a cause was printed twice by `errors::chain`.
    #[test]
    fn read_error_cause_is_printed_once() {
        let e = Error::Read(std::io::Error::from_raw_os_error(libc::EBADF));
        let chain = crate::errors::chain(&e);
        assert_eq!(chain.matches("os error 9").count(), 1, "{chain}");
        assert_eq!(e.to_string(), chain);
    }

    #[test]
    fn unavailable_reads_plainly() {
        let e = Error::Unavailable("the host kernel lacks KVM_CAP_BINARY_STATS_FD".into());
        assert_eq!(
            e.to_string(),
            "KVM binary statistics unavailable: the host kernel lacks KVM_CAP_BINARY_STATS_FD"
        );
    }

    #[test]
    fn reads_real_stats_from_dev_kvm() {
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(k) => k,
            Err(e) => {
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!("/dev/kvm is required under CI but cannot be opened: {e}");
                }
                println!("NOT RUN: reads_real_stats_from_dev_kvm: /dev/kvm: {e}");
                return;
            }
        };
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let vm_stats = match vm_stats(&vm) {
            Ok(s) => s,
            Err(Error::Unavailable(why)) if std::env::var("CI").as_deref() != Ok("true") => {
                println!("NOT RUN: reads_real_stats_from_dev_kvm: {why}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert!(vm_stats.id.starts_with("kvm-"), "{}", vm_stats.id);
        for name in ["remote_tlb_flush", "max_mmu_page_hash_collisions"] {
            assert!(vm_stats.get(name).is_some(), "VM stat {name} missing");
        }
        let fd = StatsFd::for_vcpu(&vcpu).expect("vCPU stats fd");
        let s = fd.read().unwrap();
        assert!(s.id.contains("vcpu-0"), "{}", s.id);
        for name in [
            "exits",
            "halt_exits",
            "io_exits",
            "mmio_exits",
            "halt_wait_ns",
        ] {
            assert!(s.get(name).is_some(), "vCPU stat {name} missing");
        }
        assert_eq!(s.get("exits").unwrap().kind, Kind::Cumulative);
        assert_eq!(s.get("halt_wait_ns").unwrap().unit, Unit::Seconds);
        // A second read of the same fd works (the layout is kept).
        assert!(fd.read().unwrap().value("exits").is_some());
    }
}
