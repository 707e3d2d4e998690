//! The Firecracker API's bodies as serde types: field names, defaults and the refusal
//! of unknown fields as Firecracker's API (v1.16.1 swagger) defines them, plus the
//! field names older clients still send (`ht_enabled` for `smt`, `allow_mmds_requests`).
//! Shared by the server ([`super::api`]), the config file ([`super::config`]) and the
//! tests. Values are checked where they are used, not here: a body that parses may still
//! be refused with a message naming the field.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    pub state: InstanceState,
    pub vmm_version: String,
    pub app_name: String,
}

/// The instance's state as Firecracker names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

/// `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    pub firecracker_version: String,
}

/// An error answer: `{"fault_message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub fault_message: String,
}

/// Guest memory backing by huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum HugePages {
    #[default]
    None,
    #[serde(rename = "2M")]
    Huge2M,
}

/// `PUT /machine-config` and `machine-config` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: usize,
    #[serde(default, alias = "ht_enabled")]
    pub smt: bool,
    /// A static CPU template name; only "None" (or absent) is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub huge_pages: HugePages,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        }
    }
}

/// `PATCH /machine-config`: only the fields given change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    #[serde(default)]
    pub vcpu_count: Option<u8>,
    #[serde(default)]
    pub mem_size_mib: Option<usize>,
    #[serde(default, alias = "ht_enabled")]
    pub smt: Option<bool>,
    #[serde(default)]
    pub cpu_template: Option<String>,
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    #[serde(default)]
    pub huge_pages: Option<HugePages>,
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

pub use crate::devices::virtio::block::CacheType;
/// A rate limiter and its buckets: the device layer's types carry Firecracker's names.
pub use crate::devices::virtio::token_bucket::{
    RateLimiterConfig as RateLimiter, TokenBucketConfig as TokenBucket,
};

/// How the drive does its I/O.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    #[default]
    Sync,
    Async,
}

/// `PUT /drives/{id}` and an entry of `drives` in the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    pub is_root_device: bool,
    #[serde(default)]
    pub cache_type: CacheType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub io_engine: IoEngine,
    /// A vhost-user socket instead of a file (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PATCH /drives/{id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: Option<String>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
    /// Before Firecracker 1.0 an interface opted into MMDS here.
    #[serde(default, skip_serializing)]
    pub allow_mmds_requests: Option<bool>,
}

/// `PATCH /network-interfaces/{id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    pub iface_id: String,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /entropy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /serial`: where the guest's serial output goes instead of stdout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serial {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucket>,
}

/// `PUT /balloon`, `GET /balloon`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    pub amount_mib: u32,
    pub deflate_on_oom: bool,
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    #[serde(default)]
    pub free_page_hinting: bool,
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// `PATCH /balloon`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    pub stats_polling_interval_s: u16,
}

/// `GET /balloon/statistics`: the balloon's size and the guest's latest figures (bytes
/// for memory amounts, counts for events; absent when the guest has not sent them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub target_mib: u32,
    pub actual_mib: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kill: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_stall: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_scan: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_scan: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_reclaim: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_reclaim: Option<u64>,
}

/// `PUT /vsock` (and `vsock` in the config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// Older API versions named the device (deprecated; first, as in Firecracker's
    /// list of fields).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    pub guest_cid: u32,
    pub uds_path: String,
}

/// The MMDS version (`PUT /mmds/config`'s `version`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    #[default]
    V1,
    V2,
}

impl From<MmdsVersion> for crate::mmds::Version {
    fn from(v: MmdsVersion) -> Self {
        match v {
            MmdsVersion::V1 => crate::mmds::Version::V1,
            MmdsVersion::V2 => crate::mmds::Version::V2,
        }
    }
}

impl From<crate::mmds::Version> for MmdsVersion {
    fn from(v: crate::mmds::Version) -> Self {
        match v {
            crate::mmds::Version::V1 => MmdsVersion::V1,
            crate::mmds::Version::V2 => MmdsVersion::V2,
        }
    }
}

/// `PUT /mmds/config`, `mmds-config` in the config file and in `GET /vm/config`
/// (which shows the address even when it was left to its default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    #[serde(default)]
    pub version: MmdsVersion,
    /// The interfaces (`iface_id`s) whose guest traffic to the address is answered.
    pub network_interfaces: Vec<String>,
    #[serde(default)]
    pub ipv4_address: Option<std::net::Ipv4Addr>,
    #[serde(default)]
    pub imds_compat: bool,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceAction {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    pub state: VmStateValue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStateValue {
    Paused,
    Resumed,
}

/// The config file (`--config-file`) and `GET /vm/config`: the whole configuration.
/// `boot-source` and `drives` are required in a config file, as in Firecracker.
/// Sections Ferrite does not support (`cpu-config`, `pmem`, `memory-hotplug`) parse
/// as free JSON so that the refusal can name them; `mmds-config` too, read as an
/// [`MmdsConfig`] where it is applied (its refusal names the section).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FullConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Balloon>,
    pub drives: Vec<Drive>,
    pub boot_source: BootSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_config: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<super::logger::LoggerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_config: Option<MachineConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<super::metrics::MetricsConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmds_config: Option<serde_json::Value>,
    #[serde(default)]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<Entropy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pmem: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_hotplug: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_config_takes_the_old_ht_enabled_name_and_refuses_unknown_fields() {
        let m: MachineConfig =
            serde_json::from_str(r#"{"vcpu_count":2,"mem_size_mib":256,"ht_enabled":false}"#)
                .unwrap();
        assert_eq!((m.vcpu_count, m.mem_size_mib, m.smt), (2, 256, false));
        let e = serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count":2,"mem_size_mib":256,"vcpus":3}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("unknown field `vcpus`") && e.contains("vcpu_count"),
            "{e}"
        );
        // What GET /machine-config answers before any PUT.
        assert_eq!(
            serde_json::to_string(&MachineConfig::default()).unwrap(),
            r#"{"vcpu_count":1,"mem_size_mib":128,"smt":false,"track_dirty_pages":false,"huge_pages":"None"}"#
        );
    }

    #[test]
    fn zero_value_rate_limiters_limit_nothing() {
        let d: Drive = serde_json::from_str(
            r#"{"drive_id":"rootfs","is_root_device":true,"path_on_host":"/x","rate_limiter":{},"cache_type":"Writeback"}"#,
        )
        .unwrap();
        assert!(d.rate_limiter.unwrap().is_unlimited());
        assert_eq!(d.cache_type, CacheType::Writeback);
        let r: RateLimiter = serde_json::from_str(
            r#"{"bandwidth":{"size":0,"refill_time":0},"ops":{"size":100,"refill_time":1000}}"#,
        )
        .unwrap();
        assert!(!r.is_unlimited());
        assert!(serde_json::from_str::<Drive>(
            r#"{"drive_id":"x","is_root_device":false,"cache_type":"Sometimes"}"#
        )
        .is_err());
    }

    #[test]
    fn instance_state_names_are_firecrackers() {
        let i = InstanceInfo {
            id: "anonymous-instance".into(),
            state: InstanceState::NotStarted,
            vmm_version: "1.16.1".into(),
            app_name: "Firecracker".into(),
        };
        assert_eq!(
            serde_json::to_string(&i).unwrap(),
            r#"{"id":"anonymous-instance","state":"Not started","vmm_version":"1.16.1","app_name":"Firecracker"}"#
        );
    }

    #[test]
    fn a_config_file_needs_boot_source_and_drives() {
        let ok: FullConfig = serde_json::from_str(
            r#"{"boot-source":{"kernel_image_path":"/k"},"drives":[],"machine-config":{"vcpu_count":1,"mem_size_mib":64}}"#,
        )
        .unwrap();
        assert_eq!(ok.boot_source.kernel_image_path, "/k");
        let e = serde_json::from_str::<FullConfig>(r#"{"boot-source":{"kernel_image_path":"/k"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `drives`"), "{e}");
    }
}

/// `PUT /snapshot/create`'s `snapshot_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SnapshotType {
    #[default]
    Full,
    Diff,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    pub snapshot_path: String,
    pub mem_file_path: String,
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// Older clients send a format version; Ferrite writes its own format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// `PUT /snapshot/load`'s `mem_backend.backend_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    File,
    Uffd,
}

/// `PUT /snapshot/load`'s `mem_backend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    pub backend_path: String,
}

/// `PUT /snapshot/load`'s `network_overrides` items.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `PUT /snapshot/load`'s `vsock_override`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: String,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    pub snapshot_path: String,
    /// Deprecated: the memory file (`mem_backend` `File` instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackend>,
    /// Deprecated name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// Advance the guest's wall clock by the time the snapshot was away (refused:
    /// not supported yet).
    #[serde(default)]
    pub clock_realtime: bool,
}
