//! A TAP network interface opened through `/dev/net/tun`, for virtio-net.
//!
//! Ferrite attaches to an existing TAP device (created beforehand, e.g. with
//! `ip tuntap add dev tap0 mode tap`); it never creates one. The device is opened
//! non-blocking, single-queue, without packet information, with a 12-byte virtio net
//! header (`struct virtio_net_hdr_v1`) in front of every frame in both directions, so a
//! guest's header passes through unchanged on transmit and the kernel's header can be
//! handed to the guest on receive.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// Size of the virtio 1.x net header (`struct virtio_net_hdr_v1`) in front of frames.
pub const VNET_HDR_LEN: usize = 12;

/// TUNSETOFFLOAD flags: the guest accepts partial checksums.
pub const TUN_F_CSUM: u32 = libc::TUN_F_CSUM;
/// TUNSETOFFLOAD flags: the guest accepts TCPv4 segmentation offload (needs CSUM).
pub const TUN_F_TSO4: u32 = libc::TUN_F_TSO4;
/// TUNSETOFFLOAD flags: the guest accepts TCPv6 segmentation offload (needs CSUM).
pub const TUN_F_TSO6: u32 = libc::TUN_F_TSO6;
/// TUNSETOFFLOAD flags: the guest accepts UDP fragmentation offload (needs CSUM).
pub const TUN_F_UFO: u32 = libc::TUN_F_UFO;

const TUN_PATH: &str = "/dev/net/tun";
/// IFNAMSIZ less the terminating NUL.
const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Why a TAP device could not be opened or set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid TAP device name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error(
        "cannot open TAP device {name}: no such network interface \
         (does it exist? Ferrite does not create it; e.g. `ip tuntap add dev {name} mode tap`)"
    )]
    NoSuchInterface { name: String },
    #[error("cannot open TAP device {name}: it is a network interface but not a TAP device")]
    NotTap { name: String },
    #[error("cannot open TAP device {name}: {TUN_PATH}")]
    OpenTun { name: String, source: io::Error },
    #[error(
        "cannot open TAP device {name}: TUNSETIFF (does it exist, as a single-queue TAP device \
         this user may open? Ferrite does not create it)"
    )]
    SetIff { name: String, source: io::Error },
    #[error("TAP device {name}: TUNSETVNETHDRSZ {VNET_HDR_LEN}")]
    VnetHdrSize { name: String, source: io::Error },
    #[error("TAP device {name}: TUNSETOFFLOAD {flags:#x}")]
    Offload {
        name: String,
        flags: u32,
        source: io::Error,
    },
}

/// Checks `name` the way the kernel does (`dev_valid_name`): not empty, at most 15
/// bytes, not `.` or `..`, no `/`, `:`, whitespace or NUL.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("not an interface name");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return Err("contains '/', ':', whitespace or NUL");
    }
    Ok(())
}

/// An open TAP device (non-blocking, one queue, 12-byte vnet header).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Whether this process's network namespace has an interface `name` (if_nametoindex,
/// which asks the kernel through a socket of the calling thread's namespace).
fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a NUL-terminated string that outlives the call; if_nametoindex only
    // reads it and returns 0 when there is no such interface.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

impl Tap {
    /// Attaches to the existing TAP device `name`.
    pub fn open(name: &str) -> Result<Tap, Error> {
        check_name(name).map_err(|why| Error::BadName {
            name: name.into(),
            why,
        })?;
        // TUNSETIFF would create a missing device (with CAP_NET_ADMIN), one that vanishes
        // when Ferrite exits: look first, in this process's network namespace (a caller
        // may have started Ferrite inside one with setns, as firecracker-go-sdk and
        // Kata do, where /sys still shows the namespace it was mounted in).
        if !interface_exists(name) {
            return Err(Error::NoSuchInterface { name: name.into() });
        }
        // `tun_flags` exists only for TUN/TAP devices; sysfs describes this namespace
        // only when it lists the device (otherwise TUNSETIFF refuses a non-TAP).
        let sys = std::path::Path::new("/sys/class/net").join(name);
        if sys.exists() {
            match std::fs::read_to_string(sys.join("tun_flags")) {
                Ok(s) => {
                    let flags =
                        u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).unwrap_or(0);
                    if flags & libc::IFF_TAP as u32 == 0 {
                        return Err(Error::NotTap { name: name.into() });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(Error::NotTap { name: name.into() })
                }
                // Unreadable sysfs: let TUNSETIFF decide.
                Err(_) => {}
            }
        }

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| Error::OpenTun {
                name: name.into(),
                source,
            })?;

        let mut ifr = ifreq_for(name);
        // IFF_MULTI_QUEUE is deliberately absent: one queue pair.
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: `file` is an open /dev/net/tun fd and `ifr` a properly initialised
        // `struct ifreq` that outlives the call; TUNSETIFF reads and writes only within it.
        let ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            return Err(Error::SetIff {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }

        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: `file` is an attached TAP fd; TUNSETVNETHDRSZ reads one `int` from the
        // referenced local, which lives across the call.
        let ret = unsafe { ioctl_with_ref(&file, libc::TUNSETVNETHDRSZ, &size) };
        if ret < 0 {
            return Err(Error::VnetHdrSize {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }

        let tap = Tap {
            file,
            name: name.into(),
        };
        // No offloads towards the guest until it has accepted some.
        tap.set_offloads(0)?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the kernel which offloads the reader (the guest) accepts: a combination of
    /// [`TUN_F_CSUM`], [`TUN_F_TSO4`], [`TUN_F_TSO6`], [`TUN_F_UFO`]. Without
    /// `TUN_F_CSUM` every frame arrives fully checksummed and unsegmented.
    pub fn set_offloads(&self, flags: u32) -> Result<(), Error> {
        // SAFETY: `file` is an attached TAP fd; TUNSETOFFLOAD takes its argument by value
        // and touches no memory of ours.
        let ret =
            unsafe { ioctl_with_val(&self.file, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        if ret < 0 {
            return Err(Error::Offload {
                name: self.name.clone(),
                flags,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame (vnet header first) into `buf`; `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one whole frame (vnet header first); `WouldBlock` when the device's
    /// send buffer is full.
    pub fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is a plain C struct (a name array and a union of integers, arrays
    // and a pointer) for which all-zero bytes are a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // check_name keeps the name within IFNAMSIZ - 1 bytes, so a NUL remains.
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    ifr
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn names_are_checked_like_the_kernel() {
        assert!(check_name("tap0").is_ok());
        assert!(check_name("a23456789012345").is_ok());
        assert!(check_name("a234567890123456").is_err());
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "a\0"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let e = Tap::open("../etc").unwrap_err();
        assert!(e.to_string().contains("invalid TAP device name"), "{e}");
    }

    #[test]
    fn missing_device_is_named_and_not_created() {
        let name = format!("fnx{}", std::process::id() % 100_000_000);
        let e = Tap::open(&name).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&name) && msg.contains("does not create"),
            "{msg}"
        );
        assert!(!std::path::Path::new("/sys/class/net").join(&name).exists());
    }

    #[test]
    fn loopback_is_not_a_tap() {
        if !std::path::Path::new("/sys/class/net/lo").exists() {
            println!("NOT RUN: no /sys/class/net/lo");
            return;
        }
        let e = Tap::open("lo").unwrap_err();
        assert!(matches!(e, Error::NotTap { .. }), "{e}");
    }

    /// Deletes the interface when dropped, whatever happened in the test.
    struct TapGuard(String);
    impl Drop for TapGuard {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["tuntap", "del", "dev", &self.0, "mode", "tap"])
                .status();
        }
    }

    /// Needs root, /dev/net/tun and iproute2; under CI=true it must run.
    #[test]
    fn real_tap_open_offloads_and_io() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let tun = std::path::Path::new(TUN_PATH).exists();
        if !ci && (!root || !tun) {
            println!("NOT RUN: real_tap_open_offloads_and_io needs root and {TUN_PATH}");
            return;
        }
        let name = format!("fnt{}", std::process::id() % 100_000_000);
        let guard = TapGuard(name.clone());
        let ok = Command::new("ip")
            .args(["tuntap", "add", "dev", &name, "mode", "tap"])
            .status();
        match ok {
            Ok(s) if s.success() => {}
            other if !ci => {
                println!("NOT RUN: `ip tuntap add` failed: {other:?}");
                return;
            }
            other => panic!("`ip tuntap add dev {name}` failed: {other:?}"),
        }

        let tap = Tap::open(&name).expect("open the tap");
        assert_eq!(tap.name(), name);
        // SAFETY: F_GETFL on an fd the Tap owns; no memory is passed.
        let fl = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(fl & libc::O_NONBLOCK, 0, "non-blocking");
        let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/tun_flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        assert_ne!(
            flags & libc::IFF_VNET_HDR as u32,
            0,
            "vnet header on: {flags:#x}"
        );
        assert_eq!(flags & libc::IFF_MULTI_QUEUE as u32, 0, "single queue");
        assert_ne!(flags & libc::IFF_NO_PI as u32, 0, "no packet info");

        for f in [
            0,
            TUN_F_CSUM,
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO,
        ] {
            tap.set_offloads(f).unwrap_or_else(|e| panic!("{e}"));
        }
        // The offloads show up as the interface's features (NETIF_F_HW_CSUM, TSO).
        let feats = Command::new("ethtool").args(["-k", &name]).output();
        if let Ok(out) = feats {
            let text = String::from_utf8_lossy(&out.stdout);
            if out.status.success() {
                assert!(
                    text.contains("tcp-segmentation-offload: on"),
                    "ethtool -k {name}:\n{text}"
                );
            }
        }
        tap.set_offloads(0).unwrap();

        // Nothing to read: EAGAIN, not a block.
        let mut buf = [0u8; 128];
        let e = tap.read_frame(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        // A broadcast ARP-typed frame behind a zero vnet header reaches the host side
        // of the (up) interface as one received packet.
        let up = Command::new("ip")
            .args(["link", "set", "dev", &name, "up"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(up, "ip link set dev {name} up");
        let rx_packets = || -> u64 {
            std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/rx_packets"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let before = rx_packets();
        let mut frame = vec![0u8; VNET_HDR_LEN + 60];
        frame[VNET_HDR_LEN..VNET_HDR_LEN + 6].fill(0xff);
        frame[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        frame[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(tap.write_frame(&frame).unwrap(), frame.len());
        assert_eq!(rx_packets(), before + 1);
        // A header asking for a segmentation type that does not exist is refused.
        frame[1] = 0x77;
        assert!(tap.write_frame(&frame).is_err());

        // Opened twice (single-queue): the second attach is refused, with the name.
        let e = Tap::open(&name).unwrap_err();
        assert!(e.to_string().contains(&name), "{e}");
        drop(tap);
        drop(guard);
        assert!(!std::path::Path::new("/sys/class/net").join(&name).exists());
    }
}
