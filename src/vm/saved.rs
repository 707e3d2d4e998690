//! What a snapshot records of a VM's configuration to rebuild the same machine
//! ([`SavedConfig`]), taken from the [`VmConfig`] it was built from. It lives beside
//! the configuration so that the VM keeps it without knowing about snapshots; the
//! snapshot module writes it into the state file and restores from it.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConsoleKind, VmConfig};
use crate::devices::virtio::block::{CacheType, DiskHandle};

/// A disk as the snapshot saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    pub path: PathBuf,
    pub read_only: bool,
    pub serial: Option<String>,
    /// VIRTIO_BLK_F_FLUSH offered (writeback cache).
    pub flush: bool,
    /// The image's size in bytes when the snapshot was taken: a restore refuses an
    /// image of another size.
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedNet {
    /// The interface's id where the front door that built the VM names interfaces
    /// (Firecracker's `iface_id`, which `network_overrides` refers to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub tap: String,
    pub mac: Option<[u8; 6]>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBalloon {
    pub deflate_on_oom: bool,
    pub stats_interval_ms: u64,
    pub free_page_reporting: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedVsock {
    pub cid: u64,
    pub uds: PathBuf,
    pub max_connections: usize,
}

/// The metadata service's settings (Firecracker keeps them in its snapshots too; the
/// document itself is not kept: a restored VM's store starts empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMmds {
    /// `"V1"` or `"V2"`.
    pub version: String,
    pub imds_compat: bool,
    pub ipv4: std::net::Ipv4Addr,
    /// The interfaces (indices into `nets`) that answer for it.
    pub nets: Vec<usize>,
}

/// What is needed to rebuild the same machine: the same vCPUs and CPUID, the same RAM
/// size and layout, the same devices at the same addresses in the same order. The
/// kernel, initrd and command line are not: nothing is loaded on restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConfig {
    /// The image the VM booted (reported by `ferrite list`; not read on restore).
    pub kernel: PathBuf,
    pub vcpus: usize,
    pub memory_bytes: u64,
    /// CPUID features hidden from the guest (`--cpu-features` names).
    pub hidden_features: Vec<String>,
    pub debug_exit: bool,
    /// `"serial"` or `"virtio"`.
    pub console: String,
    pub disks: Vec<SavedDisk>,
    pub nets: Vec<SavedNet>,
    pub rng: bool,
    pub balloon: Option<SavedBalloon>,
    pub vsock: Option<SavedVsock>,
    /// Absent in snapshots of VMs without MMDS (and in those of older Ferrites).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmds: Option<SavedMmds>,
}

impl SavedConfig {
    /// The configuration of a VM built from `cfg` with `disks`.
    pub fn of(cfg: &VmConfig, disks: &[DiskHandle]) -> Self {
        Self {
            kernel: cfg.kernel.clone(),
            vcpus: cfg.vcpus,
            memory_bytes: cfg.memory.size,
            hidden_features: cfg
                .hidden_features
                .iter()
                .map(|f| f.name.to_owned())
                .collect(),
            debug_exit: cfg.debug_exit,
            console: match cfg.console {
                ConsoleKind::Serial => "serial",
                ConsoleKind::Virtio => "virtio",
            }
            .to_owned(),
            disks: cfg
                .disks
                .iter()
                .zip(disks)
                .map(|(d, h)| SavedDisk {
                    path: d.path.clone(),
                    read_only: d.read_only,
                    serial: d.serial.clone(),
                    flush: d.cache == CacheType::Writeback,
                    size: h.capacity_bytes(),
                })
                .collect(),
            nets: cfg
                .nets
                .iter()
                .map(|n| SavedNet {
                    id: None,
                    tap: n.tap.clone(),
                    mac: n.mac,
                })
                .collect(),
            rng: cfg.rng,
            balloon: cfg.balloon.as_ref().map(|b| SavedBalloon {
                deflate_on_oom: b.deflate_on_oom,
                stats_interval_ms: b.stats_interval.as_millis() as u64,
                free_page_reporting: b.free_page_reporting,
            }),
            vsock: cfg.vsock.as_ref().map(|v| SavedVsock {
                cid: v.cid,
                uds: v.uds.clone(),
                max_connections: v.max_connections,
            }),
            mmds: cfg.extras.mmds.as_ref().map(|m| {
                let g = m.mmds.lock().unwrap_or_else(|p| p.into_inner());
                SavedMmds {
                    version: match g.version {
                        crate::mmds::Version::V1 => "V1",
                        crate::mmds::Version::V2 => "V2",
                    }
                    .to_owned(),
                    imds_compat: g.imds_compat,
                    ipv4: m.ipv4,
                    nets: m.nets.clone(),
                }
            }),
        }
    }
}
