//! The Firecracker-compatible API as a [`Service`]: the instance's configuration before
//! `InstanceStart`, the VM after it, and Firecracker's protocol around both — 204 for a
//! PUT/PATCH that worked, 200 with JSON for a GET, 400 with `{"fault_message"}` for
//! every refusal (an unknown path too), and a refused request never changes anything.
//!
//! Everything here runs on the event-loop thread (the server calls it there), so the
//! state's mutex is never contended; requests that need the vCPUs answer through
//! [`Done`] once they have replied. `InstanceStart` builds the VM on this thread and
//! hands the [`Vm`] to the process's main thread through [`VmSlot`], which waits for it
//! to end.
//!
//! Worst caller: any client of the socket, in any order, with any body. Pre-boot
//! calls after the start, runtime calls before it, unknown fields and values, ids that
//! differ between path and body, and missing files are all answered 400 with the VM
//! unharmed.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::boot_timer::{self, FcBootTimer, Timestamp};
use super::logger::{self, LoggerConfig};
use super::metrics::{MetricsConfig, MetricsFlusher, METRICS};
use super::model::*;
use crate::console::{ConsoleIo, InputSource};
use crate::control::http::{Method, Request, Response};
use crate::control::service::{Done, Pending, Service};
use crate::devices::virtio::balloon::{BalloonConfig, BalloonHandle};
use crate::devices::virtio::block::{DiskConfig, DiskHandle};
use crate::devices::virtio::net::NetConfig;
use crate::devices::virtio::vsock::VsockConfig;
use crate::event_loop::LoopHandle;
use crate::graceful::GracefulStop;
use crate::mmds::{Mmds, SharedMmds};
use crate::outcome::StopSignal;
use crate::snapshot;
use crate::vcpu::command::{Command, Reply};
use crate::vcpu::VcpuHandle;
use crate::vm::{ControlConfig, Events, PrebuiltVsock, Vm, VmConfig};

/// The Firecracker release whose API Ferrite implements (`GET /version`, `--version`).
pub const FIRECRACKER_VERSION: &str = "1.16.1";
/// Firecracker's boot arguments when `boot_args` is not given.
pub const DEFAULT_BOOT_ARGS: &str = "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux \
                                     i8042.nomux i8042.dumbkbd swiotlb=noforce";
/// Firecracker's largest vCPU count.
const MAX_VCPUS: u8 = 32;

const POST_BOOT: &str = "The requested operation is not supported after starting the microVM.";
const PRE_BOOT: &str = "The requested operation is not supported before starting the microVM.";

/// Where `InstanceStart` leaves the VM for the main thread.
pub type VmSlot = Arc<Mutex<Option<Vm>>>;

/// A 400 answer with Firecracker's error body.
pub fn fault(msg: impl std::fmt::Display) -> Response {
    Response::json(
        400,
        &Fault {
            fault_message: msg.to_string(),
        },
    )
}

/// How the process was started (the flags the API needs).
#[derive(Debug, Clone)]
pub struct Options {
    pub id: String,
    /// `--boot-timer`.
    pub boot_timer: bool,
    /// `--http-api-max-payload-size`: larger bodies are refused (the HTTP reader's own
    /// bound, [`crate::control::http::MAX_BODY`], caps it).
    pub max_payload: usize,
}

/// The configuration collected before the start.
#[derive(Debug, Default, Clone)]
pub struct Config {
    pub machine: MachineConfig,
    pub boot: Option<BootSource>,
    /// In the order they were first put (the root drive goes first at the start).
    pub drives: Vec<Drive>,
    pub nets: Vec<NetworkInterface>,
    pub entropy: Option<Entropy>,
    pub balloon: Option<Balloon>,
    pub serial: Option<Serial>,
    pub logger: Option<LoggerConfig>,
    pub metrics: Option<MetricsConfig>,
    pub vsock: Option<BoundVsock>,
    /// `PUT /mmds/config` (its address filled in): the interfaces that answer for the
    /// MMDS once started.
    pub mmds: Option<MmdsConfig>,
}

/// The vsock device of `PUT /vsock`: bound at once, as Firecracker binds it (its
/// socket exists from the answer on), and handed to the VM at the start.
#[derive(Clone)]
pub struct BoundVsock {
    /// What `GET /vm/config` shows (`vsock_id` left out, as Firecracker does).
    pub body: Vsock,
    pub cfg: VsockConfig,
    /// The device; the VM's build takes it out (and binds `cfg` again if it is gone:
    /// a start that failed dropped it).
    pub device: PrebuiltVsock,
}

impl std::fmt::Debug for BoundVsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundVsock")
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// Firecracker's refusal of a vsock socket it cannot bind.
fn vsock_bind_refused(why: impl std::fmt::Display) -> Error {
    refused(format!(
        "Vsock config error: Cannot create backend for vsock device: Error binding to the \
         host-side Unix socket: {why}"
    ))
}

/// What the API holds of a started VM.
struct Live {
    handles: Vec<VcpuHandle>,
    paused: Arc<AtomicBool>,
    graceful: Arc<GracefulStop>,
    balloon: Option<BalloonHandle>,
    /// Each drive's id and handle, in the guest's order.
    disks: Vec<(String, DiskHandle)>,
    /// The main thread's jobs (a snapshot is taken there, where the VM is held).
    jobs: crate::vm::MainJobs,
    /// The userfaultfd of a VM loaded with the `Uffd` memory backend, open for its life.
    _uffd: Option<userfaultfd::Uffd>,
    /// Some interface answers for the MMDS (without one, Firecracker has no data store
    /// after the start and `/mmds` is refused).
    mmds: bool,
}

struct State {
    config: Config,
    live: Option<Live>,
}

/// The Firecracker-compatible API of one process.
pub struct FcApi {
    opts: Options,
    events: LoopHandle,
    stop: Arc<StopSignal>,
    slot: VmSlot,
    state: Mutex<State>,
    /// The metadata store: `/mmds` changes it, and the started VM's interfaces named in
    /// the MMDS config answer the guest from this same store (its lock is taken under
    /// `state`'s, never the other way round).
    mmds: SharedMmds,
}

/// Firecracker's fault for the MMDS with no data store (after a start without MMDS
/// config) or a PATCH before any document.
const MMDS_NOT_INITIALIZED: &str = "MMDS error: The MMDS data store is not initialized.";

/// Why a configuration step was refused (the fault message).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Refused(String),
    #[error("Start microvm error: {0}")]
    Start(String),
}

fn refused(msg: impl Into<String>) -> Error {
    Error::Refused(msg.into())
}

/// Firecracker's resource ids: letters, digits and `_`.
fn checked_id(id: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(refused("The ID cannot be empty."));
    }
    if !id.chars().all(|c| c == '_' || c.is_alphanumeric()) {
        return Err(refused(
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        ));
    }
    Ok(())
}

fn parse_body<T: DeserializeOwned>(req: &Request) -> Result<T, Error> {
    serde_json::from_slice(&req.body).map_err(|e| {
        refused(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

/// A file the VM will open must exist and be readable now (Firecracker refuses a
/// missing kernel at `PUT /boot-source`, not at the start).
fn check_readable(what: &str, path: &str) -> Result<(), Error> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| refused(format!("The {what} file cannot be opened: {path}: {e}")))
}

fn parse_mac(mac: &str) -> Result<[u8; 6], Error> {
    let parts: Vec<&str> = mac.split(':').collect();
    let mut out = [0u8; 6];
    if parts.len() != 6 {
        return Err(refused(format!("Invalid guest MAC address: {mac}")));
    }
    for (o, p) in out.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .ok_or_else(|| refused(format!("Invalid guest MAC address: {mac}")))?;
    }
    Ok(out)
}

fn unsupported_rate_limiter(what: &str, r: &Option<RateLimiter>) -> Result<(), Error> {
    match r {
        Some(r) if !r.is_unlimited() => Err(refused(format!(
            "Ferrite does not support rate limiters on {what} yet (only an empty or \
             zero-sized one is accepted)"
        ))),
        _ => Ok(()),
    }
}

impl Config {
    /// `PUT /machine-config` (a whole configuration).
    pub fn put_machine(&mut self, m: MachineConfig) -> Result<(), Error> {
        check_machine(&m)?;
        if let Some(b) = &self.balloon {
            if u64::from(b.amount_mib) > m.mem_size_mib as u64 {
                return Err(refused(
                    "The memory size (MiB) is smaller than the previously set balloon device \
                     target size.",
                ));
            }
        }
        self.machine = m;
        Ok(())
    }

    /// `PATCH /machine-config`.
    pub fn patch_machine(&mut self, u: MachineConfigUpdate) -> Result<(), Error> {
        let mut m = self.machine.clone();
        if let Some(v) = u.vcpu_count {
            m.vcpu_count = v;
        }
        if let Some(v) = u.mem_size_mib {
            m.mem_size_mib = v;
        }
        if let Some(v) = u.smt {
            m.smt = v;
        }
        if let Some(v) = u.cpu_template {
            m.cpu_template = Some(v);
        }
        if let Some(v) = u.track_dirty_pages {
            m.track_dirty_pages = v;
        }
        if let Some(v) = u.huge_pages {
            m.huge_pages = v;
        }
        self.put_machine(m)
    }

    pub fn put_boot(&mut self, b: BootSource) -> Result<(), Error> {
        check_readable("kernel", &b.kernel_image_path)?;
        if let Some(i) = &b.initrd_path {
            check_readable("initrd", i)?;
        }
        self.boot = Some(b);
        Ok(())
    }

    pub fn put_drive(&mut self, d: Drive) -> Result<(), Error> {
        checked_id(&d.drive_id)?;
        if d.socket.is_some() {
            return Err(refused(
                "Ferrite does not support vhost-user drives (`socket`); give `path_on_host`",
            ));
        }
        let Some(path) = &d.path_on_host else {
            return Err(refused(format!(
                "Drive {} needs a path_on_host",
                d.drive_id
            )));
        };
        check_readable("drive", path)?;
        if d.is_root_device
            && self
                .drives
                .iter()
                .any(|o| o.is_root_device && o.drive_id != d.drive_id)
        {
            return Err(refused("A root block device already exists!"));
        }
        match self.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
            Some(o) => *o = d,
            None => self.drives.push(d),
        }
        Ok(())
    }

    pub fn put_net(&mut self, n: NetworkInterface) -> Result<(), Error> {
        checked_id(&n.iface_id)?;
        if let Some(mac) = &n.guest_mac {
            parse_mac(mac)?;
        }
        if n.mtu.is_some() {
            return Err(refused(
                "Ferrite does not support setting the guest MTU (`mtu`)",
            ));
        }
        if n.allow_mmds_requests == Some(true) {
            return Err(refused(
                "`allow_mmds_requests` is the API before Firecracker 1.0 (which refuses the \
                 field): name the interface in PUT /mmds/config instead",
            ));
        }
        unsupported_rate_limiter("network interfaces", &n.rx_rate_limiter)?;
        unsupported_rate_limiter("network interfaces", &n.tx_rate_limiter)?;
        crate::devices::virtio::tap::check_name(&n.host_dev_name).map_err(|why| {
            refused(format!(
                "Invalid host_dev_name {:?}: {why}",
                n.host_dev_name
            ))
        })?;
        if self
            .nets
            .iter()
            .any(|o| o.iface_id != n.iface_id && o.host_dev_name == n.host_dev_name)
        {
            return Err(refused(format!(
                "The host device {} is already used by another interface",
                n.host_dev_name
            )));
        }
        match self.nets.iter_mut().find(|o| o.iface_id == n.iface_id) {
            Some(o) => {
                // Firecracker builds a new device for the interface, without the MMDS
                // the old one had: it no longer answers, and the MMDS config lists it
                // no more (none at all when it was the last).
                if let Some(m) = &mut self.mmds {
                    m.network_interfaces.retain(|i| *i != n.iface_id);
                    if m.network_interfaces.is_empty() {
                        self.mmds = None;
                    }
                }
                *o = n
            }
            None => self.nets.push(n),
        }
        Ok(())
    }

    /// `PUT /mmds/config` (and `mmds-config`): checked as Firecracker checks it — the
    /// address (link-local, not in 169.254.0.0/24 or 169.254.255.0/24), then a
    /// non-empty interface list, then each interface configured — and kept with its
    /// address filled in. A refusal keeps the previous configuration.
    pub fn put_mmds_config(&mut self, m: MmdsConfig) -> Result<(), Error> {
        let ipv4 = match m.ipv4_address {
            None => crate::mmds::DEFAULT_IPV4,
            Some(a) if crate::mmds::address_ok(a) => a,
            Some(_) => {
                return Err(refused(
                    "MMMDS config error: The MMDS IPv4 address is not link local.",
                ))
            }
        };
        if m.network_interfaces.is_empty() {
            return Err(refused(
                "MMMDS config error: The list of network interface IDs that allow \
                 forwarding MMDS requests is empty.",
            ));
        }
        if !m
            .network_interfaces
            .iter()
            .all(|i| self.nets.iter().any(|n| n.iface_id == *i))
        {
            return Err(refused(
                "MMMDS config error: The list of network interface IDs provided contains \
                 at least one ID that does not correspond to any existing network \
                 interface.",
            ));
        }
        self.mmds = Some(MmdsConfig {
            ipv4_address: Some(ipv4),
            ..m
        });
        Ok(())
    }

    /// The MMDS config as `GET /vm/config` shows it: the interfaces in the order they
    /// were put (as Firecracker lists its devices; a VM loaded from a snapshot has no
    /// `nets` here, and its list stays in the snapshot's order).
    fn mmds_shown(&self) -> Option<MmdsConfig> {
        let mut m = self.mmds.clone()?;
        m.network_interfaces.sort_by_key(|i| {
            self.nets
                .iter()
                .position(|n| n.iface_id == *i)
                .unwrap_or(usize::MAX)
        });
        Some(m)
    }

    pub fn put_entropy(&mut self, e: Entropy) -> Result<(), Error> {
        unsupported_rate_limiter("the entropy device", &e.rate_limiter)?;
        self.entropy = Some(e);
        Ok(())
    }

    pub fn put_balloon(&mut self, b: Balloon) -> Result<(), Error> {
        if b.free_page_hinting {
            return Err(refused(
                "Ferrite does not support free page hinting (`free_page_hinting`); \
                 free_page_reporting does the same job",
            ));
        }
        if (b.amount_mib as usize) > self.machine.mem_size_mib {
            return Err(refused(
                "Amount of pages requested cannot be greater than the guest memory",
            ));
        }
        self.balloon = Some(b);
        Ok(())
    }

    /// `PUT /vsock`, as Firecracker does it: the device put before goes first (its
    /// socket removed) whether or not the new one can be made; the new socket is bound
    /// now, and a path where anything exists is refused ("Address already in use": a
    /// stale socket is not replaced here, unlike `--vsock`). Ferrite also refuses a CID
    /// below 3 or `u32::MAX` (reserved; Firecracker takes any `u32`) and a path over
    /// 96 bytes (room for the `_PORT` of guest-initiated connections).
    pub fn put_vsock(&mut self, v: Vsock) -> Result<(), Error> {
        self.vsock = None;
        if !(3..u32::MAX).contains(&v.guest_cid) {
            return Err(refused(format!(
                "Vsock config error: Cannot create vsock device: invalid guest_cid {}: a \
                 guest's context id is 3 to {} (0, 1 and 2 are reserved, {} means any)",
                v.guest_cid,
                u32::MAX - 1,
                u32::MAX
            )));
        }
        let path = PathBuf::from(&v.uds_path);
        // Firecracker's own refusal for a path sockaddr_un cannot hold.
        if v.uds_path.len() >= 108 {
            return Err(vsock_bind_refused("path must be shorter than SUN_LEN"));
        }
        let cfg =
            VsockConfig::new(u64::from(v.guest_cid), path.clone()).map_err(vsock_bind_refused)?;
        if std::fs::symlink_metadata(&path).is_ok() {
            return Err(vsock_bind_refused(std::io::Error::from_raw_os_error(
                libc::EADDRINUSE,
            )));
        }
        let device = crate::devices::virtio::vsock::Vsock::new(&cfg)
            .map_err(|e| vsock_bind_refused(crate::errors::chain(&e)))?;
        self.vsock = Some(BoundVsock {
            body: Vsock {
                vsock_id: None,
                ..v
            },
            cfg,
            device: Arc::new(Mutex::new(Some(device))),
        });
        Ok(())
    }

    /// `PUT /logger`: applied at once (a path that cannot be opened is refused and
    /// changes nothing).
    pub fn put_logger(&mut self, l: LoggerConfig) -> Result<(), Error> {
        logger::apply(&l).map_err(|e| refused(crate::errors::chain(&e)))?;
        self.logger = Some(l);
        Ok(())
    }

    /// `PUT /metrics`: once per process, as in Firecracker.
    pub fn put_metrics(&mut self, m: MetricsConfig) -> Result<(), Error> {
        METRICS
            .configure(&m)
            .map_err(|e| refused(format!("Metrics error: {}", crate::errors::chain(&e))))?;
        self.metrics = Some(m);
        Ok(())
    }

    pub fn put_serial(&mut self, s: Serial) -> Result<(), Error> {
        if s.rate_limiter.is_some_and(|b| !b.is_unlimited()) {
            return Err(refused(
                "Ferrite does not support a rate limiter on the serial console yet",
            ));
        }
        self.serial = Some(s);
        Ok(())
    }

    /// The whole configuration as `GET /vm/config` shows it.
    pub fn full(&self) -> FullConfig {
        FullConfig {
            balloon: self.balloon.clone(),
            drives: self.drives.clone(),
            boot_source: self.boot.clone().unwrap_or_default(),
            machine_config: Some(self.machine.clone()),
            logger: self.logger.clone(),
            metrics: self.metrics.clone(),
            network_interfaces: self.nets.clone(),
            entropy: self.entropy.clone(),
            vsock: self.vsock.as_ref().map(|v| v.body.clone()),
            mmds_config: self.mmds_shown().and_then(|m| serde_json::to_value(m).ok()),
            ..FullConfig::default()
        }
    }

    /// The drives in the guest's order: the root drive first (`vda`), the rest as put.
    fn ordered_drives(&self) -> Vec<&Drive> {
        let mut d: Vec<&Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        d.extend(self.drives.iter().filter(|d| !d.is_root_device));
        d
    }

    /// The kernel command line: the boot arguments, then the root drive as Firecracker
    /// names it.
    fn cmdline(&self, boot: &BootSource) -> String {
        let mut c = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_owned());
        if let Some(root) = self.drives.iter().find(|d| d.is_root_device) {
            match &root.partuuid {
                Some(u) => c.push_str(&format!(" root=PARTUUID={u}")),
                None => c.push_str(" root=/dev/vda"),
            }
            c.push_str(if root.is_read_only == Some(true) {
                " ro"
            } else {
                " rw"
            });
        }
        c
    }

    /// The VM configuration this amounts to.
    pub fn vm_config(&self, opts: &Options) -> Result<VmConfig, Error> {
        let Some(boot) = &self.boot else {
            return Err(refused(
                "Cannot start microvm without kernel configuration.",
            ));
        };
        let mut cfg = VmConfig::new(&boot.kernel_image_path);
        cfg.initrd = boot.initrd_path.as_ref().map(PathBuf::from);
        cfg.cmdline = Some(self.cmdline(boot));
        cfg.vcpus = self.machine.vcpu_count as usize;
        cfg.memory = crate::memory::MemoryConfig::new((self.machine.mem_size_mib as u64) << 20);
        if self.machine.huge_pages == HugePages::Huge2M {
            cfg.memory.hugepages = crate::memory::HugePages::Hugetlbfs;
        }
        for d in self.ordered_drives() {
            let path = d.path_on_host.clone().unwrap_or_default();
            if d.io_engine == IoEngine::Async {
                log::info!(
                    "drive {}: io_engine Async is served by Ferrite's disk worker thread \
                     (the same results; no io_uring)",
                    d.drive_id
                );
            }
            cfg.disks.push(DiskConfig {
                path: path.into(),
                read_only: d.is_read_only == Some(true),
                serial: Some(d.drive_id.clone()),
                cache: d.cache_type,
                rate_limiter: d.rate_limiter.unwrap_or_default(),
            });
        }
        for n in &self.nets {
            cfg.nets.push(NetConfig {
                tap: n.host_dev_name.clone(),
                mac: n.guest_mac.as_deref().map(parse_mac).transpose()?,
            });
        }
        cfg.rng = self.entropy.is_some();
        cfg.vsock = self.vsock.as_ref().map(|v| v.cfg.clone());
        cfg.extras.vsock = self.vsock.as_ref().map(|v| v.device.clone());
        cfg.balloon = self.balloon.as_ref().map(|b| BalloonConfig {
            deflate_on_oom: b.deflate_on_oom,
            stats_interval: Duration::from_secs(b.stats_polling_interval_s.into()),
            free_page_reporting: b.free_page_reporting,
        });
        cfg.control = Some(ControlConfig {
            name: opts.id.clone(),
            announce: false,
            socket: None,
            optional: true,
        });
        cfg.vcpu_thread_prefix = "fc_vcpu ".to_owned();
        Ok(cfg)
    }
}

/// A `/mmds` store refusal as Firecracker answers it: 413 for a document over the
/// limit, 400 for the rest.
fn store_refusal(e: &crate::mmds::Error) -> Response {
    if matches!(e, crate::mmds::Error::LimitExceeded { .. }) {
        Response::json(
            413,
            &Fault {
                fault_message: format!("MMDS limit exceeded error: {e}"),
            },
        )
    } else {
        fault(format!("MMDS error: {e}"))
    }
}

fn check_machine(m: &MachineConfig) -> Result<(), Error> {
    if m.vcpu_count == 0 || m.vcpu_count > MAX_VCPUS {
        return Err(refused(format!(
            "The vCPU number is invalid! The vCPU number can only be 1 or an even number \
             when SMT is enabled, and at most {MAX_VCPUS}."
        )));
    }
    if m.smt && m.vcpu_count > 1 && !m.vcpu_count.is_multiple_of(2) {
        return Err(refused(
            "The vCPU number is invalid! The vCPU number can only be 1 or an even number \
             when SMT is enabled.",
        ));
    }
    if m.mem_size_mib == 0 {
        return Err(refused(
            "The memory size (MiB) is either 0, or not a multiple of the configured page size.",
        ));
    }
    let max_mib = crate::memory::MAX_MEM_SIZE >> 20;
    if m.mem_size_mib as u64 > max_mib {
        return Err(refused(format!(
            "The memory size (MiB) {} is more than Ferrite can give a guest ({max_mib} MiB).",
            m.mem_size_mib
        )));
    }
    if m.huge_pages == HugePages::Huge2M && !m.mem_size_mib.is_multiple_of(2) {
        return Err(refused(
            "The memory size (MiB) is either 0, or not a multiple of the configured page size.",
        ));
    }
    match m.cpu_template.as_deref() {
        None | Some("None") | Some("") => Ok(()),
        Some(t) => Err(refused(format!(
            "Ferrite does not support CPU templates (cpu_template {t:?}); use \"None\""
        ))),
    }
}

impl FcApi {
    pub fn new(opts: Options, events: LoopHandle, stop: Arc<StopSignal>, slot: VmSlot) -> Self {
        let opts_max_payload = opts.max_payload;
        Self {
            opts,
            events,
            stop,
            slot,
            state: Mutex::new(State {
                config: Config::default(),
                live: None,
            }),
            // Firecracker's MMDS limit is the API's payload limit unless
            // `--mmds-size-limit` says otherwise.
            mmds: Arc::new(Mutex::new(Mmds {
                store: crate::mmds::store::Store::new(opts_max_payload),
                ..Mmds::default()
            })),
        }
    }

    /// The largest MMDS document, in bytes of compact JSON (`--mmds-size-limit`).
    pub fn set_mmds_size_limit(&self, limit: usize) {
        self.lock_mmds().store.set_limit(limit);
    }

    /// The metadata store the API and the VM's MMDS interfaces share.
    pub fn mmds(&self) -> SharedMmds {
        self.mmds.clone()
    }

    fn lock_mmds(&self) -> std::sync::MutexGuard<'_, Mmds> {
        self.mmds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The document of `--metadata` (before the API serves): Firecracker's refusal when
    /// it is over the size limit.
    pub fn put_metadata(&self, v: serde_json::Value) -> Result<(), crate::mmds::Error> {
        self.lock_mmds().store.put(v)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The instance state.
    pub fn state(&self) -> InstanceState {
        match &self.lock().live {
            None => InstanceState::NotStarted,
            Some(l) if l.paused.load(Ordering::Acquire) => InstanceState::Paused,
            Some(_) => InstanceState::Running,
        }
    }

    /// Applies a configuration step before the start; refused after it.
    pub fn configure(&self, f: impl FnOnce(&mut Config) -> Result<(), Error>) -> Result<(), Error> {
        let mut s = self.lock();
        if s.live.is_some() {
            return Err(refused(POST_BOOT));
        }
        f(&mut s.config)
    }

    /// Builds and starts the VM (`InstanceStart`, or the config file).
    pub fn start(&self) -> Result<(), Error> {
        let mut s = self.lock();
        if s.live.is_some() {
            return Err(refused(POST_BOOT));
        }
        let mut cfg = s.config.vm_config(&self.opts)?;
        if self.opts.boot_timer {
            // Firecracker times the boot from the start of the microVM's build.
            let t0 = Timestamp::now();
            cfg.extras.mmio.push((
                "fc-boot-timer",
                boot_timer::MMIO_BASE,
                boot_timer::MMIO_LEN,
                Arc::new(Mutex::new(FcBootTimer::new(t0))),
            ));
            cfg.extras.on_userspace = Some(Arc::new(move || {
                let (wall, cpu) = t0.until(Timestamp::now());
                log::info!("{}", boot_timer::boot_time_line(wall, cpu));
            }));
        }
        if let Some(m) = &s.config.mmds {
            {
                let mut g = self.lock_mmds();
                g.version = m.version.into();
                g.imds_compat = m.imds_compat;
            }
            cfg.extras.mmds = Some(crate::vm::MmdsAttach {
                mmds: self.mmds.clone(),
                ipv4: m.ipv4_address.unwrap_or(crate::mmds::DEFAULT_IPV4),
                nets: s
                    .config
                    .nets
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| m.network_interfaces.contains(&n.iface_id))
                    .map(|(i, _)| i)
                    .collect(),
            });
        }
        let mmds = cfg.extras.mmds.is_some();
        let io = console_io(s.config.serial.as_ref())?;
        let mut vm = Vm::with_events(
            &cfg,
            io,
            Events::Shared {
                handle: self.events.clone(),
                stop: self.stop.clone(),
            },
        )
        .map_err(|e| Error::Start(crate::errors::chain(&e)))?;
        // A snapshot records the interfaces' ids (`network_overrides` names them).
        vm.set_net_ids(s.config.nets.iter().map(|n| Some(n.iface_id.clone())));
        vm.start()
            .map_err(|e| Error::Start(crate::errors::chain(&e)))?;
        let balloon = vm.balloon();
        let disks = s
            .config
            .ordered_drives()
            .iter()
            .map(|d| d.drive_id.clone())
            .zip(vm.disks().iter().cloned())
            .collect();
        if let (Some(b), Some(h)) = (&s.config.balloon, &balloon) {
            if b.amount_mib > 0 {
                if let Err(e) = h.set_target((b.amount_mib as u64) << 20) {
                    log::warn!("balloon: cannot set the initial target: {e}");
                }
            }
        }
        self.go_live(&mut s, vm, balloon, disks, false, None);
        if let Some(l) = &mut s.live {
            l.mmds = mmds;
        }
        log::info!("Successfully started microvm {}", self.opts.id);
        Ok(())
    }

    /// Records the started `vm` as the live one and hands it to the main thread; the
    /// metrics timer and the event loop's filter follow.
    fn go_live(
        &self,
        s: &mut State,
        vm: Vm,
        balloon: Option<BalloonHandle>,
        disks: Vec<(String, DiskHandle)>,
        paused: bool,
        uffd: Option<userfaultfd::Uffd>,
    ) {
        s.live = Some(Live {
            handles: vm.vcpus().to_vec(),
            paused: Arc::new(AtomicBool::new(paused)),
            graceful: vm.graceful(),
            balloon,
            disks,
            jobs: vm.main_jobs(),
            _uffd: uffd,
            // Set by the caller (under the same lock) when an interface answers.
            mmds: false,
        });
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(vm);
        // The main thread waits for the stop; a poke makes it look at the slot.
        self.stop.poke();
        if METRICS.is_configured() {
            // A line now, then one a minute.
            match MetricsFlusher::new(&METRICS) {
                Ok(f) => {
                    let _ = self.events.call(move |ctx| {
                        if let Err(e) = ctx.add_handler(Box::new(f)) {
                            log::error!("metrics: cannot add the flush timer: {e}");
                        }
                    });
                }
                Err(e) => log::error!("metrics: {}", crate::errors::chain(&e)),
            }
        }
        // The loop built the VM with every syscall it needed; from here it serves the API
        // and the devices under its filter (queued: this may run on the main thread).
        let _ = self
            .events
            .call(|_| crate::seccomp::enter(crate::seccomp::ThreadKind::EventLoop));
    }

    /// `PUT /snapshot/create`: a Full snapshot of the paused VM into the two files,
    /// taken on the main thread (which holds the VM); the answer waits for it.
    fn snapshot_create(&self, req: &Request, done: Done) -> Pending {
        let p: SnapshotCreateParams = match parse_body(req) {
            Ok(p) => p,
            Err(e) => return Pending::Done(fault(e)),
        };
        if p.snapshot_type == SnapshotType::Diff {
            return Pending::Done(fault(
                "Ferrite does not support Diff snapshots (no dirty page tracking): take a \
                 Full snapshot (snapshot_type \"Full\")",
            ));
        }
        let s = self.lock();
        let Some(live) = &s.live else {
            return Pending::Done(fault(PRE_BOOT));
        };
        if !live.paused.load(Ordering::Acquire) {
            return Pending::Done(fault(
                "Cannot create a snapshot of a running microVM: pause it first \
                 (PATCH /vm {\"state\": \"Paused\"})",
            ));
        }
        let jobs = live.jobs.clone();
        drop(s);
        let job: crate::vm::MainJob = Box::new(move |vm| {
            let started = std::time::Instant::now();
            let r = vm.snapshot_files(Path::new(&p.snapshot_path), Path::new(&p.mem_file_path));
            done(match r {
                Ok(t) => {
                    let us = started.elapsed().as_micros() as u64;
                    METRICS.latencies_us.full_create_snapshot.store(us);
                    log::info!(
                        "'create full snapshot' VMM action took {us} us (state {} bytes, \
                         memory {} bytes of which {} written).",
                        t.state_bytes,
                        t.memory.bytes,
                        t.memory.written
                    );
                    Response::no_content()
                }
                Err(e) => fault(format!(
                    "Create snapshot error: {}",
                    crate::errors::chain(&e)
                )),
            });
        });
        if !jobs.send(job) {
            return Pending::Done(fault("Create snapshot error: the microVM is stopping"));
        }
        Pending::Later
    }

    /// `PUT /snapshot/load`: only in a fresh process (nothing but the logger, metrics
    /// and serial configured); builds the VM from the snapshot with the overrides,
    /// starts it, and leaves it paused unless `resume_vm`.
    fn snapshot_load(&self, p: SnapshotLoadParams) -> Result<(), Error> {
        let mut s = self.lock();
        if s.live.is_some() {
            return Err(refused(POST_BOOT));
        }
        let c = &s.config;
        if c.boot.is_some()
            || !c.drives.is_empty()
            || !c.nets.is_empty()
            || c.vsock.is_some()
            || c.balloon.is_some()
            || c.entropy.is_some()
            || c.mmds.is_some()
            || c.machine != MachineConfig::default()
        {
            return Err(refused(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            ));
        }
        let mem = match (&p.mem_backend, &p.mem_file_path) {
            (None, None) => {
                return Err(refused(
                    "missing field: either `mem_backend` or `mem_file_path` is required",
                ))
            }
            (Some(_), Some(_)) => return Err(refused(
                "too many fields: either `mem_backend` or `mem_file_path` exclusively is required",
            )),
            (None, Some(f)) => {
                METRICS.deprecated_api.deprecated_http_api_calls.inc();
                log::warn!("PUT /snapshot/load: mem_file_path field is deprecated.");
                snapshot::MemSource::File(PathBuf::from(f))
            }
            (Some(b), None) => match b.backend_type {
                MemBackendType::File => snapshot::MemSource::File(PathBuf::from(&b.backend_path)),
                MemBackendType::Uffd => {
                    snapshot::MemSource::UffdHandler(PathBuf::from(&b.backend_path))
                }
            },
        };
        if p.track_dirty_pages || p.enable_diff_snapshots {
            log::warn!(
                "PUT /snapshot/load: dirty page tracking is not supported: the VM's snapshots \
                 can only be Full"
            );
        }
        let state = Path::new(&p.snapshot_path);
        let overrides = snapshot::Overrides {
            control: Some(ControlConfig {
                name: self.opts.id.clone(),
                announce: false,
                socket: None,
                optional: true,
            }),
            kvm_device: None,
            nets: p
                .network_overrides
                .iter()
                .map(|o| (o.iface_id.clone(), o.host_dev_name.clone()))
                .collect(),
            vsock_uds: p
                .vsock_override
                .as_ref()
                .map(|v| PathBuf::from(&v.uds_path)),
            vcpu_thread_prefix: Some("fc_vcpu ".to_owned()),
            taps: Vec::new(),
            disks: Vec::new(),
            // The interfaces that answered for the MMDS answer again, from this API's
            // store (the document is not in the snapshot, as in Firecracker).
            mmds: Some(self.mmds.clone()),
            // Firecracker's `clock_realtime`: the guest's clock advanced by the time the
            // snapshot waited (`--restore-clock realtime`).
            clock: if p.clock_realtime {
                snapshot::kvm_vm::ClockMode::Realtime
            } else {
                snapshot::kvm_vm::ClockMode::Continue
            },
        };
        let load_err = |e: &dyn std::error::Error| {
            refused(format!("Load snapshot error: {}", crate::errors::chain(e)))
        };
        let started = std::time::Instant::now();
        let io = console_io(s.config.serial.as_ref())?;
        let restored = snapshot::restore_files(
            state,
            &mem,
            &overrides,
            io,
            Events::Shared {
                handle: self.events.clone(),
                stop: self.stop.clone(),
            },
        )
        .map_err(|e| load_err(&e))?;
        let mut vm = restored.vm;
        // Not resumed: each vCPU finds the pause in its mailbox before its first
        // KVM_RUN, so the guest runs no instruction until `PATCH /vm` Resumed.
        let paused = (!p.resume_vm).then(|| pause_before_start(vm.vcpus()));
        vm.start().map_err(|e| load_err(&e))?;
        if let Some(rx) = paused {
            all_paused(&rx).map_err(|why| refused(format!("Load snapshot error: {why}")))?;
        }
        let us = started.elapsed().as_micros() as u64;
        METRICS.latencies_us.load_snapshot.store(us);
        log::info!("'load snapshot' VMM action took {us} us.");
        let mmds = vm.saved_config().and_then(|c| {
            let m = c.mmds.as_ref()?;
            Some(MmdsConfig {
                version: if m.version == "V2" {
                    MmdsVersion::V2
                } else {
                    MmdsVersion::V1
                },
                network_interfaces: m
                    .nets
                    .iter()
                    .filter_map(|&i| c.nets.get(i)?.id.clone())
                    .collect(),
                ipv4_address: Some(m.ipv4),
                imds_compat: m.imds_compat,
            })
        });
        let (ids, machine) = match vm.saved_config() {
            Some(c) => (
                c.disks
                    .iter()
                    .map(|d| d.serial.clone().unwrap_or_default())
                    .collect::<Vec<_>>(),
                MachineConfig {
                    vcpu_count: c.vcpus as u8,
                    mem_size_mib: (c.memory_bytes >> 20) as usize,
                    ..MachineConfig::default()
                },
            ),
            None => (Vec::new(), MachineConfig::default()),
        };
        s.config.machine = machine;
        let has_mmds = mmds.is_some();
        s.config.mmds = mmds;
        let disks = ids.into_iter().zip(vm.disks().iter().cloned()).collect();
        let balloon = vm.balloon();
        self.go_live(&mut s, vm, balloon, disks, !p.resume_vm, restored.uffd);
        if let Some(l) = &mut s.live {
            l.mmds = has_mmds;
        }
        log::info!("Loaded microvm {} from {}", self.opts.id, state.display());
        Ok(())
    }

    fn info(&self) -> InstanceInfo {
        InstanceInfo {
            id: self.opts.id.clone(),
            state: self.state(),
            vmm_version: FIRECRACKER_VERSION.to_owned(),
            app_name: "Firecracker".to_owned(),
        }
    }

    fn done(r: Result<(), Error>) -> Pending {
        Pending::Done(match r {
            Ok(()) => Response::no_content(),
            Err(e) => fault(e),
        })
    }

    fn put<T: DeserializeOwned>(
        &self,
        req: &Request,
        f: impl FnOnce(&mut Config, T) -> Result<(), Error>,
    ) -> Pending {
        Self::done(parse_body::<T>(req).and_then(|v| self.configure(|c| f(c, v))))
    }

    /// `PUT /vsock`; the deprecated `vsock_id` is counted, logged and marked on the
    /// answer (`Deprecation: true`), as Firecracker does.
    fn put_vsock(&self, req: &Request) -> Pending {
        let v: Vsock = match parse_body(req) {
            Ok(v) => v,
            Err(e) => return Pending::Done(fault(e)),
        };
        let deprecated = v.vsock_id.is_some();
        if deprecated {
            METRICS.deprecated_api.deprecated_http_api_calls.inc();
            log::warn!("PUT /vsock: vsock_id field is deprecated.");
        }
        let mut r = match self.configure(|c| c.put_vsock(v)) {
            Ok(()) => Response::no_content(),
            Err(e) => fault(e),
        };
        r.deprecation = deprecated;
        Pending::Done(r)
    }

    fn pause_resume(self: &Arc<Self>, req: &Request, done: Done) -> Pending {
        let v: VmState = match parse_body(req) {
            Ok(v) => v,
            Err(e) => return Pending::Done(fault(e)),
        };
        let s = self.lock();
        let Some(live) = &s.live else {
            return Pending::Done(fault(PRE_BOOT));
        };
        let pause = v.state == VmStateValue::Paused;
        let cmd = if pause {
            Command::Pause
        } else {
            Command::Resume
        };
        let paused = live.paused.clone();
        crate::vcpu::broadcast(&live.handles, cmd, move |replies| {
            let ok = replies.iter().all(|r| {
                matches!(
                    (pause, r),
                    (true, Reply::Paused { .. }) | (false, Reply::Resumed { .. })
                )
            });
            if ok {
                paused.store(pause, Ordering::Release);
                done(Response::no_content());
            } else {
                done(fault(format!(
                    "Failed to {} the microVM: not every vCPU answered: {replies:?}",
                    if pause { "pause" } else { "resume" }
                )));
            }
        });
        Pending::Later
    }

    fn action(&self, req: &Request) -> Pending {
        let a: InstanceAction = match parse_body(req) {
            Ok(a) => a,
            Err(e) => return Pending::Done(fault(e)),
        };
        match a.action_type {
            ActionType::InstanceStart => Self::done(self.start()),
            ActionType::SendCtrlAltDel => {
                let s = self.lock();
                let Some(live) = &s.live else {
                    return Pending::Done(fault(PRE_BOOT));
                };
                if !live.graceful.ctrl_alt_del() {
                    log::warn!("SendCtrlAltDel: the guest's keyboard took no keys");
                }
                Pending::Done(Response::no_content())
            }
            ActionType::FlushMetrics => {
                if self.lock().live.is_none() {
                    return Pending::Done(fault(PRE_BOOT));
                }
                match METRICS.flush() {
                    Ok(_) => Pending::Done(Response::no_content()),
                    Err(e) => Pending::Done(fault(format!(
                        "Metrics error: {}",
                        crate::errors::chain(&e)
                    ))),
                }
            }
        }
    }

    fn patch_drive(&self, id: &str, req: &Request) -> Pending {
        let d: PartialDrive = match parse_body(req) {
            Ok(d) => d,
            Err(e) => return Pending::Done(fault(e)),
        };
        if d.drive_id != id {
            return Pending::Done(fault(
                "The id from the path does not match the id from the body!",
            ));
        }
        let mut s = self.lock();
        let Some(live) = &s.live else {
            return Pending::Done(fault(PRE_BOOT));
        };
        let Some(handle) = live
            .disks
            .iter()
            .find(|(d, _)| *d == id)
            .map(|(_, h)| h.clone())
        else {
            return Pending::Done(fault(format!("Invalid block device ID: {id}")));
        };
        if let Some(path) = &d.path_on_host {
            // Kata swaps media by putting another file behind the same path: the path
            // is reopened and the guest told the new capacity (a config interrupt).
            match handle.swap(Path::new(path)) {
                Ok(bytes) => log::info!("drive {id}: {path}, {bytes} bytes"),
                Err(e) => {
                    return Pending::Done(fault(format!(
                        "Unable to patch the block device {id}: {}",
                        crate::errors::chain(&e)
                    )))
                }
            }
            if let Some(c) = s.config.drives.iter_mut().find(|o| o.drive_id == id) {
                c.path_on_host = Some(path.clone());
            }
        }
        if let Some(r) = &d.rate_limiter {
            handle.set_rate_limiter(r.bandwidth.as_ref(), r.ops.as_ref());
            if let Some(c) = s.config.drives.iter_mut().find(|o| o.drive_id == id) {
                c.rate_limiter = Some(handle.rate_limiter());
            }
        }
        Pending::Done(Response::no_content())
    }

    /// Whether `/mmds` has a store: always before the start; after it, only when
    /// some interface answers for the MMDS (Firecracker's store then lives with the
    /// net devices, and a VM started without MMDS config has none).
    fn mmds_available(&self) -> bool {
        self.lock().live.as_ref().is_none_or(|l| l.mmds)
    }

    /// `GET /mmds`: the document (`{}` before any).
    fn mmds_get(&self) -> Pending {
        if !self.mmds_available() {
            return Pending::Done(fault(MMDS_NOT_INITIALIZED));
        }
        let v = match self.lock_mmds().store.get() {
            serde_json::Value::Null => serde_json::json!({}),
            v => v.clone(),
        };
        Pending::Done(Response::json(200, &v))
    }

    /// `PUT /mmds`: the whole document (any JSON value), at most the size limit.
    fn mmds_put(&self, req: &Request) -> Pending {
        let v: serde_json::Value = match parse_body(req) {
            Ok(v) => v,
            Err(e) => return Pending::Done(fault(e)),
        };
        if !self.mmds_available() {
            return Pending::Done(fault(MMDS_NOT_INITIALIZED));
        }
        let r = self.lock_mmds().store.put(v);
        Pending::Done(match r {
            Ok(()) => Response::no_content(),
            Err(e) => store_refusal(&e),
        })
    }

    /// `PATCH /mmds`: a JSON merge patch (RFC 7396) of the document; refused before
    /// any `PUT` (or `--metadata`) and when the result would be over the limit.
    fn mmds_patch(&self, req: &Request) -> Pending {
        let v: serde_json::Value = match parse_body(req) {
            Ok(v) => v,
            Err(e) => return Pending::Done(fault(e)),
        };
        if !self.mmds_available() {
            return Pending::Done(fault(MMDS_NOT_INITIALIZED));
        }
        let r = self.lock_mmds().store.patch(v);
        Pending::Done(match r {
            Ok(()) => Response::no_content(),
            Err(e) => store_refusal(&e),
        })
    }

    /// `PUT /mmds/config` (before the start). Version V1 (also the default) is marked
    /// deprecated as Firecracker marks it.
    fn mmds_config_put(&self, req: &Request) -> Pending {
        let m: MmdsConfig = match parse_body(req) {
            Ok(m) => m,
            Err(e) => return Pending::Done(fault(e)),
        };
        let deprecated = m.version == MmdsVersion::V1;
        if deprecated {
            METRICS.deprecated_api.deprecated_http_api_calls.inc();
            log::warn!("PUT /mmds/config: V1 is deprecated. Use V2 instead.");
        }
        let mut r = match self.configure(|c| c.put_mmds_config(m)) {
            Ok(()) => Response::no_content(),
            Err(e) => fault(e),
        };
        r.deprecation = deprecated;
        Pending::Done(r)
    }

    fn balloon_get(&self) -> Pending {
        let s = self.lock();
        match &s.config.balloon {
            None => Pending::Done(fault("The balloon device is not configured.")),
            Some(b) => {
                let mut b = b.clone();
                if let Some(h) = s.live.as_ref().and_then(|l| l.balloon.as_ref()) {
                    b.amount_mib = pages_mib(h.status().target_pages);
                }
                Pending::Done(Response::json(200, &b))
            }
        }
    }

    fn balloon_stats(&self) -> Pending {
        let s = self.lock();
        let h = match live_balloon(&s) {
            Ok(h) => h,
            Err(r) => return Pending::Done(r),
        };
        let st = h.status();
        if !st.stats_enabled {
            return Pending::Done(fault("Statistics for the balloon device are not enabled"));
        }
        Pending::Done(Response::json(200, &balloon_stats(&st)))
    }

    fn balloon_stats_patch(&self, req: &Request) -> Pending {
        let u: BalloonStatsUpdate = match parse_body(req) {
            Ok(u) => u,
            Err(e) => return Pending::Done(fault(e)),
        };
        let mut s = self.lock();
        let h = match live_balloon(&s) {
            Ok(h) => h,
            Err(r) => return Pending::Done(r),
        };
        match h.set_stats_interval(Duration::from_secs(u.stats_polling_interval_s.into())) {
            Ok(()) => {
                if let Some(b) = &mut s.config.balloon {
                    b.stats_polling_interval_s = u.stats_polling_interval_s;
                }
                Pending::Done(Response::no_content())
            }
            Err(e) => Pending::Done(fault(e)),
        }
    }

    fn balloon_patch(&self, req: &Request) -> Pending {
        let u: BalloonUpdate = match parse_body(req) {
            Ok(u) => u,
            Err(e) => return Pending::Done(fault(e)),
        };
        let mut s = self.lock();
        let h = match live_balloon(&s) {
            Ok(h) => h,
            Err(r) => return Pending::Done(r),
        };
        if (u.amount_mib as usize) > s.config.machine.mem_size_mib {
            return Pending::Done(fault(
                "Amount of pages requested cannot be greater than the guest memory",
            ));
        }
        match h.set_target((u.amount_mib as u64) << 20) {
            Ok(()) => {
                if let Some(b) = &mut s.config.balloon {
                    b.amount_mib = u.amount_mib;
                }
                Pending::Done(Response::no_content())
            }
            Err(e) => Pending::Done(fault(e)),
        }
    }
}

/// Queues a pause for every vCPU of a VM not started yet (a snapshot loaded without
/// `resume_vm`); [`all_paused`] waits for the answers once the threads run.
fn pause_before_start(handles: &[VcpuHandle]) -> std::sync::mpsc::Receiver<Vec<Reply>> {
    let (tx, rx) = std::sync::mpsc::channel();
    crate::vcpu::broadcast(handles, Command::Pause, move |r| {
        let _ = tx.send(r);
    });
    rx
}

fn all_paused(rx: &std::sync::mpsc::Receiver<Vec<Reply>>) -> Result<(), String> {
    let replies = rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "the vCPUs did not pause within 5 s".to_owned())?;
    if replies.iter().all(|r| matches!(r, Reply::Paused { .. })) {
        Ok(())
    } else {
        Err(format!("not every vCPU paused: {replies:?}"))
    }
}

/// The started VM's balloon, or the refusal: before the start, or without a balloon.
fn live_balloon(s: &State) -> Result<BalloonHandle, Response> {
    let live = s.live.as_ref().ok_or_else(|| fault(PRE_BOOT))?;
    live.balloon
        .clone()
        .ok_or_else(|| fault("The balloon device is not configured."))
}

/// Balloon pages (4 KiB) in MiB.
fn pages_mib(pages: u32) -> u32 {
    ((u64::from(pages) * 4096) >> 20) as u32
}

/// The balloon's figures in Firecracker's form.
fn balloon_stats(st: &crate::devices::virtio::balloon::BalloonStatus) -> BalloonStats {
    let mut out = BalloonStats {
        target_pages: st.target_pages,
        actual_pages: st.actual_pages,
        target_mib: pages_mib(st.target_pages),
        actual_mib: pages_mib(st.actual_pages),
        ..BalloonStats::default()
    };
    if let Some(g) = &st.stats {
        for (&tag, &v) in &g.values {
            let v = Some(v);
            match tag {
                0 => out.swap_in = v,
                1 => out.swap_out = v,
                2 => out.major_faults = v,
                3 => out.minor_faults = v,
                4 => out.free_memory = v,
                5 => out.total_memory = v,
                6 => out.available_memory = v,
                7 => out.disk_caches = v,
                8 => out.hugetlb_allocations = v,
                9 => out.hugetlb_failures = v,
                10 => out.oom_kill = v,
                11 => out.alloc_stall = v,
                12 => out.async_scan = v,
                13 => out.direct_scan = v,
                14 => out.async_reclaim = v,
                15 => out.direct_reclaim = v,
                _ => {}
            }
        }
    }
    out
}

/// The console: stdin and stdout as Firecracker's serial, or the serial output in a
/// file (`PUT /serial`).
fn console_io(serial: Option<&Serial>) -> Result<ConsoleIo, Error> {
    match serial.and_then(|s| s.serial_out_path.as_deref()) {
        None => ConsoleIo::stdio()
            .map_err(|e| Error::Start(format!("cannot duplicate stdout for the console: {e}"))),
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(Path::new(p))
                .map_err(|e| Error::Start(format!("cannot open serial_out_path {p}: {e}")))?;
            Ok(ConsoleIo {
                input: InputSource::Stdin,
                output: Box::new(f),
            })
        }
    }
}

impl FcApi {
    /// Routes one request (Firecracker's table of methods and paths).
    fn route(self: &Arc<Self>, req: &Request, done: Done) -> Pending {
        let path = req.path.trim_start_matches('/');
        let mut tokens = path.split_terminator('/');
        let first = tokens.next().unwrap_or("");
        let second = tokens.next();
        let has_body = !req.body.trim_ascii().is_empty();
        if req.body.len() > self.opts.max_payload {
            return Pending::Done(fault(format!(
                "Request payload with size {} is larger than the limit of {} allowed by server.",
                req.body.len(),
                self.opts.max_payload
            )));
        }
        let unknown = || {
            Pending::Done(fault(format!(
                "Invalid request method and/or path: {} {first}.",
                req.method
            )))
        };
        match (&req.method, first, has_body) {
            (Method::Get, "", false) => Pending::Done(Response::json(200, &self.info())),
            (Method::Get, "version", false) => Pending::Done(Response::json(
                200,
                &FirecrackerVersion {
                    firecracker_version: FIRECRACKER_VERSION.to_owned(),
                },
            )),
            (Method::Get, "machine-config", false) => {
                Pending::Done(Response::json(200, &self.lock().config.machine))
            }
            (Method::Get, "vm", false) if second == Some("config") => {
                Pending::Done(Response::json(200, &self.lock().config.full()))
            }
            (Method::Get, "balloon", false) => match second {
                None => self.balloon_get(),
                Some("statistics") => self.balloon_stats(),
                Some(_) => unknown(),
            },
            // Firecracker ignores what follows `/mmds` in the path.
            (Method::Get, "mmds", false) => self.mmds_get(),
            (Method::Get, _, true) => Pending::Done(fault("GET request cannot have a body.")),
            (Method::Put, "actions", true) => self.action(req),
            (Method::Put, "machine-config", true) => self.put(req, Config::put_machine),
            (Method::Patch, "machine-config", true) => self.put(req, Config::patch_machine),
            (Method::Put, "boot-source", true) => self.put(req, Config::put_boot),
            (Method::Put, "drives", true) => {
                let id = second.unwrap_or("");
                self.put(req, |c, d: Drive| {
                    checked_id(id)?;
                    if d.drive_id != id {
                        return Err(refused(
                            "The id from the path does not match the id from the body!",
                        ));
                    }
                    c.put_drive(d)
                })
            }
            (Method::Patch, "drives", true) => self.patch_drive(second.unwrap_or(""), req),
            (Method::Put, "network-interfaces", true) => {
                let id = second.unwrap_or("");
                self.put(req, |c, n: NetworkInterface| {
                    checked_id(id)?;
                    if n.iface_id != id {
                        return Err(refused(
                            "The id from the path does not match the id from the body!",
                        ));
                    }
                    c.put_net(n)
                })
            }
            (Method::Patch, "network-interfaces", true) => {
                let id = second.unwrap_or("");
                let n: PartialNetworkInterface = match parse_body(req) {
                    Ok(n) => n,
                    Err(e) => return Pending::Done(fault(e)),
                };
                if n.iface_id != id {
                    return Pending::Done(fault(
                        "The id from the path does not match the id from the body!",
                    ));
                }
                let s = self.lock();
                if s.live.is_none() {
                    return Pending::Done(fault(PRE_BOOT));
                }
                if !s.config.nets.iter().any(|o| o.iface_id == id) {
                    return Pending::Done(fault(format!("Invalid network interface ID: {id}")));
                }
                Self::done(
                    unsupported_rate_limiter("network interfaces", &n.rx_rate_limiter).and(
                        unsupported_rate_limiter("network interfaces", &n.tx_rate_limiter),
                    ),
                )
            }
            (Method::Put, "entropy", true) => self.put(req, Config::put_entropy),
            (Method::Put, "serial", true) => self.put(req, Config::put_serial),
            (Method::Put, "balloon", true) => self.put(req, Config::put_balloon),
            (Method::Patch, "balloon", true) => match second {
                None => self.balloon_patch(req),
                Some("statistics") => self.balloon_stats_patch(req),
                Some(_) => unknown(),
            },
            (Method::Put, "logger", true) => self.put(req, Config::put_logger),
            (Method::Put, "metrics", true) => self.put(req, Config::put_metrics),
            (Method::Patch, "vm", true) => self.pause_resume(req, done),
            (Method::Put, "vsock", true) => self.put_vsock(req),
            (Method::Put, "mmds", true) => match second {
                None => self.mmds_put(req),
                Some("config") => self.mmds_config_put(req),
                Some(other) => {
                    Pending::Done(fault(format!("Unrecognized PUT request path `{other}`.")))
                }
            },
            (Method::Patch, "mmds", true) => self.mmds_patch(req),
            (Method::Put, "snapshot", true) => match second {
                Some("create") => self.snapshot_create(req, done),
                Some("load") => Self::done(
                    parse_body::<SnapshotLoadParams>(req).and_then(|p| self.snapshot_load(p)),
                ),
                _ => unknown(),
            },
            (Method::Put | Method::Patch, "pmem", true) => {
                Pending::Done(fault("Ferrite does not support virtio-pmem devices"))
            }
            (Method::Put, "cpu-config", true) => {
                Pending::Done(fault("Ferrite does not support CPU templates (cpu-config)"))
            }
            (Method::Put | Method::Patch | Method::Get, "hotplug", _)
                if second == Some("memory") =>
            {
                Pending::Done(fault("Ferrite does not support memory hotplug"))
            }
            (Method::Put, _, false) => Pending::Done(fault("Empty PUT request.")),
            (Method::Patch, _, false) => Pending::Done(fault("Empty PATCH request.")),
            _ => unknown(),
        }
    }
}

/// Counts a request in Firecracker's `get_api_requests`, `put_api_requests` and
/// `patch_api_requests` metrics (`ok` false: also its `_fails`).
fn count_request(method: &Method, resource: &str, ok: bool) {
    let m = &METRICS;
    let (count, fails) = match (method, resource) {
        (Method::Get, "") => (Some(&m.get_api_requests.instance_info_count), None),
        (Method::Get, "machine-config") => (Some(&m.get_api_requests.machine_cfg_count), None),
        (Method::Get, "version") => (Some(&m.get_api_requests.vmm_version_count), None),
        (Method::Get, "mmds") => (Some(&m.get_api_requests.mmds_count), None),
        (Method::Put, "actions") => (
            Some(&m.put_api_requests.actions_count),
            Some(&m.put_api_requests.actions_fails),
        ),
        (Method::Put, "boot-source") => (
            Some(&m.put_api_requests.boot_source_count),
            Some(&m.put_api_requests.boot_source_fails),
        ),
        (Method::Put, "drives") => (
            Some(&m.put_api_requests.drive_count),
            Some(&m.put_api_requests.drive_fails),
        ),
        (Method::Put, "logger") => (
            Some(&m.put_api_requests.logger_count),
            Some(&m.put_api_requests.logger_fails),
        ),
        (Method::Put, "machine-config") => (
            Some(&m.put_api_requests.machine_cfg_count),
            Some(&m.put_api_requests.machine_cfg_fails),
        ),
        (Method::Put, "cpu-config") => (
            Some(&m.put_api_requests.cpu_cfg_count),
            Some(&m.put_api_requests.cpu_cfg_fails),
        ),
        (Method::Put, "metrics") => (
            Some(&m.put_api_requests.metrics_count),
            Some(&m.put_api_requests.metrics_fails),
        ),
        (Method::Put, "network-interfaces") => (
            Some(&m.put_api_requests.network_count),
            Some(&m.put_api_requests.network_fails),
        ),
        (Method::Put, "mmds") => (
            Some(&m.put_api_requests.mmds_count),
            Some(&m.put_api_requests.mmds_fails),
        ),
        (Method::Put, "vsock") => (
            Some(&m.put_api_requests.vsock_count),
            Some(&m.put_api_requests.vsock_fails),
        ),
        (Method::Put, "serial") => (
            Some(&m.put_api_requests.serial_count),
            Some(&m.put_api_requests.serial_fails),
        ),
        (Method::Patch, "drives") => (
            Some(&m.patch_api_requests.drive_count),
            Some(&m.patch_api_requests.drive_fails),
        ),
        (Method::Patch, "network-interfaces") => (
            Some(&m.patch_api_requests.network_count),
            Some(&m.patch_api_requests.network_fails),
        ),
        (Method::Patch, "machine-config") => (
            Some(&m.patch_api_requests.machine_cfg_count),
            Some(&m.patch_api_requests.machine_cfg_fails),
        ),
        (Method::Patch, "mmds") => (
            Some(&m.patch_api_requests.mmds_count),
            Some(&m.patch_api_requests.mmds_fails),
        ),
        _ => (None, None),
    };
    if let Some(c) = count {
        c.inc();
    }
    if let (false, Some(f)) = (ok, fails) {
        f.inc();
    }
}

impl Service for FcApi {
    fn handle(self: Arc<Self>, req: &Request, done: Done) -> Pending {
        let resource = req
            .path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("");
        log::info!(
            "The API server received a {} request on {:?}.",
            req.method,
            req.path
        );
        let answer = self.route(req, done);
        let ok = match &answer {
            Pending::Done(r) => r.status < 300,
            Pending::Later => true,
        };
        count_request(&req.method, resource, ok);
        answer
    }
    /// `GET /` and `PUT /actions` (SendCtrlAltDel is how the owner stops it).
    fn is_essential(&self, req: &Request) -> bool {
        let p = req.path.trim_matches('/');
        matches!(
            (&req.method, p),
            (Method::Get, "") | (Method::Put, "actions")
        )
    }

    fn essential_names(&self) -> &'static str {
        "GET / and PUT /actions"
    }

    fn error(&self, status: u16, msg: &str) -> Response {
        Response::json(
            status,
            &Fault {
                fault_message: msg.to_owned(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_loop::EventLoop;

    fn api() -> (Arc<FcApi>, EventLoop) {
        let stop = Arc::new(StopSignal::new());
        let l = EventLoop::new(stop.clone()).unwrap();
        let api = FcApi::new(
            Options {
                id: "t".into(),
                boot_timer: false,
                max_payload: 100,
            },
            l.handle(),
            stop,
            Arc::new(Mutex::new(None)),
        );
        (Arc::new(api), l)
    }

    fn call(api: &Arc<FcApi>, method: Method, path: &str, body: &str) -> Response {
        let req = Request {
            method,
            path: path.into(),
            query: None,
            body: body.as_bytes().to_vec(),
            keep_alive: true,
        };
        match api
            .clone()
            .handle(&req, Box::new(|_| panic!("answered later")))
        {
            Pending::Done(r) => r,
            Pending::Later => panic!("{path}: answered later"),
        }
    }

    fn fault_of(r: &Response) -> String {
        assert_eq!(r.status, 400, "{:?}", r.body);
        r.body["fault_message"].as_str().unwrap().to_owned()
    }

    #[test]
    fn refusals_are_400_with_firecrackers_messages_and_change_nothing() {
        let (api, _l) = api();
        let r = call(&api, Method::Get, "/foo", "");
        assert_eq!(fault_of(&r), "Invalid request method and/or path: GET foo.");
        assert_eq!(
            fault_of(&call(&api, Method::Put, "/machine-config", "")),
            "Empty PUT request."
        );
        let f = fault_of(&call(
            &api,
            Method::Put,
            "/machine-config",
            r#"{"vcpu_count":2,"mem_size_mib":64,"bogus":1}"#,
        ));
        assert!(f.starts_with("An error occurred when deserializing the json body of a request: unknown field `bogus`"), "{f}");
        assert_eq!(api.lock().config.machine, MachineConfig::default());
        let f = fault_of(&call(
            &api,
            Method::Put,
            "/drives/a",
            r#"{"drive_id":"b","is_root_device":false,"path_on_host":"/dev/null"}"#,
        ));
        assert_eq!(
            f,
            "The id from the path does not match the id from the body!"
        );
        let f = fault_of(&call(&api, Method::Patch, "/vm", r#"{"state":"Paused"}"#));
        assert_eq!(f, PRE_BOOT);
        let f = fault_of(&call(&api, Method::Patch, "/vm", r#"{"state":"Sleeping"}"#));
        assert!(f.contains("unknown variant `Sleeping`"), "{f}");
        let f = fault_of(&call(
            &api,
            Method::Put,
            "/actions",
            r#"{"action_type":"InstanceStart"}"#,
        ));
        assert_eq!(f, "Cannot start microvm without kernel configuration.");
        let f = fault_of(&call(
            &api,
            Method::Put,
            "/boot-source",
            r#"{"kernel_image_path":"/nonexistent/vmlinux"}"#,
        ));
        assert!(f.contains("/nonexistent/vmlinux"), "{f}");
        for (m, p, b, what) in [
            (
                Method::Put,
                "/pmem/p",
                r#"{"id":"p","path_on_host":"/x"}"#,
                "pmem",
            ),
            (
                Method::Put,
                "/hotplug/memory",
                r#"{"total_size_mib":1024}"#,
                "memory hotplug",
            ),
            (Method::Put, "/cpu-config", r#"{}"#, "CPU templates"),
        ] {
            let f = fault_of(&call(&api, m, p, b));
            assert!(f.contains(what), "{p}: {f}");
        }
        let f = fault_of(&call(
            &api,
            Method::Put,
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":64,"cpu_template":"C3"}"#,
        ));
        assert!(f.contains("CPU templates"), "{f}");
        let big = format!(r#"{{"kernel_image_path":"{}"}}"#, "x".repeat(100));
        let f = fault_of(&call(&api, Method::Put, "/boot-source", &big));
        assert!(f.contains("larger than the limit of 100"), "{f}");
        assert_eq!(api.state(), InstanceState::NotStarted);
    }

    #[test]
    fn configuration_is_kept_and_shown() {
        let (api, _l) = api();
        let ok = |r: Response| assert_eq!(r.status, 204, "{:?}", r.body);
        ok(call(
            &api,
            Method::Put,
            "/machine-config",
            r#"{"vcpu_count":2,"mem_size_mib":256,"ht_enabled":false}"#,
        ));
        ok(call(
            &api,
            Method::Patch,
            "/machine-config",
            r#"{"mem_size_mib":192}"#,
        ));
        ok(call(
            &api,
            Method::Put,
            "/drives/data",
            r#"{"drive_id":"data","is_root_device":false,"path_on_host":"/dev/null","rate_limiter":{}}"#,
        ));
        ok(call(
            &api,
            Method::Put,
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","is_root_device":true,"path_on_host":"/dev/null","is_read_only":true}"#,
        ));
        let f = fault_of(&call(
            &api,
            Method::Put,
            "/drives/other",
            r#"{"drive_id":"other","is_root_device":true,"path_on_host":"/dev/null"}"#,
        ));
        assert_eq!(f, "A root block device already exists!");
        let m = call(&api, Method::Get, "/machine-config", "");
        assert_eq!(
            (m.status, m.body["mem_size_mib"].as_u64()),
            (200, Some(192))
        );
        let s = api.lock();
        let order: Vec<&str> = s
            .config
            .ordered_drives()
            .iter()
            .map(|d| d.drive_id.as_str())
            .collect();
        assert_eq!(order, ["rootfs", "data"]);
        let boot = BootSource {
            kernel_image_path: "/k".into(),
            initrd_path: None,
            boot_args: Some("console=ttyS0".into()),
        };
        assert_eq!(s.config.cmdline(&boot), "console=ttyS0 root=/dev/vda ro");
        let no_args = BootSource {
            boot_args: None,
            ..boot
        };
        assert!(s.config.cmdline(&no_args).starts_with(DEFAULT_BOOT_ARGS));
    }

    #[test]
    fn put_vsock_binds_at_once_and_the_vm_config_takes_that_device() {
        use std::os::unix::fs::FileTypeExt;
        let (api, _l) = api();
        let dir = std::env::temp_dir().join(format!("ferrite-fcapi-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let body = |cid: u32, id: &str| {
            format!(
                r#"{{{id}"guest_cid":{cid},"uds_path":"{}"}}"#,
                uds.display()
            )
        };
        let f = fault_of(&call(&api, Method::Put, "/vsock", &body(2, "")));
        assert!(f.contains("invalid guest_cid 2"), "{f}");
        assert!(!uds.exists(), "a refused PUT /vsock left a socket");
        let r = call(
            &api,
            Method::Put,
            "/vsock",
            &body(7, r#""vsock_id":"root","#),
        );
        assert_eq!((r.status, r.deprecation), (204, true), "{r:?}");
        let is_socket = || std::fs::symlink_metadata(&uds).is_ok_and(|m| m.file_type().is_socket());
        assert!(is_socket(), "PUT /vsock did not bind {}", uds.display());
        let r = call(&api, Method::Put, "/vsock", &body(8, ""));
        assert_eq!((r.status, r.deprecation), (204, false), "{r:?}");
        assert!(is_socket(), "the same path again: no socket");
        assert_eq!(api.lock().config.full().vsock.map(|v| v.guest_cid), Some(8));
        call(
            &api,
            Method::Put,
            "/boot-source",
            r#"{"kernel_image_path":"/dev/null"}"#,
        );
        let cfg = api.lock().config.vm_config(&api.opts).unwrap();
        assert_eq!(
            cfg.vsock.as_ref().map(|v| (v.cid, v.uds.clone())),
            Some((8, uds.clone()))
        );
        let slot = cfg
            .extras
            .vsock
            .clone()
            .expect("no bound device handed over");
        assert!(slot.lock().unwrap().is_some());
        // The device goes with the API that holds it, and its socket with it.
        drop((cfg, slot, api));
        assert!(!uds.exists(), "the bound socket outlived its device");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn net(api: &Arc<FcApi>, id: &str, tap: &str) {
        let r = call(
            api,
            Method::Put,
            &format!("/network-interfaces/{id}"),
            &format!(r#"{{"iface_id":"{id}","host_dev_name":"{tap}"}}"#),
        );
        assert_eq!(r.status, 204, "{r:?}");
    }

    #[test]
    fn mmds_put_patch_get_follow_firecracker_and_a_refused_document_changes_nothing() {
        let (api, _l) = api();
        api.set_mmds_size_limit(40);
        let get = |api: &Arc<FcApi>| {
            let r = call(api, Method::Get, "/mmds", "");
            assert_eq!(r.status, 200, "{r:?}");
            r.body
        };
        // Before any document: GET shows {}, PATCH is refused.
        assert_eq!(get(&api), serde_json::json!({}));
        assert_eq!(
            fault_of(&call(&api, Method::Patch, "/mmds", r#"{"a":1}"#)),
            "MMDS error: The MMDS data store is not initialized."
        );
        let r = call(&api, Method::Put, "/mmds", r#"{"a":{"b":1,"c":2},"d":"x"}"#);
        assert_eq!(r.status, 204, "{r:?}");
        let r = call(&api, Method::Patch, "/mmds", r#"{"a":{"b":null},"e":true}"#);
        assert_eq!(r.status, 204, "{r:?}");
        let want = serde_json::json!({"a":{"c":2},"d":"x","e":true});
        assert_eq!(get(&api), want);
        // Over the limit (40 bytes of compact JSON): 413, the document as it was.
        let big = format!(r#"{{"k":"{}"}}"#, "x".repeat(40));
        let r = call(&api, Method::Put, "/mmds", &big);
        assert_eq!(r.status, 413, "{r:?}");
        assert_eq!(
            r.body["fault_message"],
            "MMDS limit exceeded error: The MMDS patch request doesn't fit."
        );
        let r = call(&api, Method::Patch, "/mmds", r#"{"f":"0123456789012"}"#);
        assert_eq!(r.status, 413, "{r:?}");
        assert_eq!(get(&api), want);
        // Empty and malformed bodies, a path below /mmds.
        assert_eq!(
            fault_of(&call(&api, Method::Put, "/mmds", "")),
            "Empty PUT request."
        );
        assert_eq!(
            fault_of(&call(&api, Method::Patch, "/mmds", "")),
            "Empty PATCH request."
        );
        let f = fault_of(&call(&api, Method::Put, "/mmds", "{bad"));
        assert!(
            f.starts_with("An error occurred when deserializing the json body of a request:"),
            "{f}"
        );
        assert_eq!(
            fault_of(&call(&api, Method::Put, "/mmds/foo", "{}")),
            "Unrecognized PUT request path `foo`."
        );
        assert_eq!(get(&api), want);
        // Any JSON value is a document; null reads back as {}.
        assert_eq!(call(&api, Method::Put, "/mmds", "null").status, 204);
        assert_eq!(get(&api), serde_json::json!({}));
    }

    #[test]
    fn mmds_requests_are_counted_in_firecrackers_api_metrics() {
        let (api, _l) = api();
        let m = &METRICS;
        // The counters are the process's: other tests may add to them meanwhile.
        let before = [
            m.get_api_requests.mmds_count.count(),
            m.put_api_requests.mmds_count.count(),
            m.put_api_requests.mmds_fails.count(),
            m.patch_api_requests.mmds_count.count(),
            m.patch_api_requests.mmds_fails.count(),
        ];
        call(&api, Method::Get, "/mmds", "");
        call(&api, Method::Put, "/mmds", r#"{"a":1}"#);
        call(
            &api,
            Method::Put,
            "/mmds/config",
            r#"{"network_interfaces":[]}"#,
        );
        call(&api, Method::Patch, "/mmds", r#"{"b":2}"#);
        call(&api, Method::Patch, "/mmds", "{bad");
        let after = [
            m.get_api_requests.mmds_count.count(),
            m.put_api_requests.mmds_count.count(),
            m.put_api_requests.mmds_fails.count(),
            m.patch_api_requests.mmds_count.count(),
            m.patch_api_requests.mmds_fails.count(),
        ];
        let grew: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
        for (i, least) in [1, 2, 1, 2, 1].into_iter().enumerate() {
            assert!(grew[i] >= least, "counter {i}: {grew:?}");
        }
    }

    #[test]
    fn mmds_config_is_checked_as_firecracker_checks_it_and_shown_in_vm_config() {
        let (api, _l) = api();
        let put = |body: &str| call(&api, Method::Put, "/mmds/config", body);
        assert_eq!(
            fault_of(&put(r#"{"network_interfaces":["e0"]}"#)),
            "MMMDS config error: The list of network interface IDs provided contains at \
             least one ID that does not correspond to any existing network interface."
        );
        net(&api, "e0", "tap0");
        net(&api, "e1", "tap1");
        assert_eq!(
            fault_of(&put(r#"{"network_interfaces":[]}"#)),
            "MMMDS config error: The list of network interface IDs that allow forwarding \
             MMDS requests is empty."
        );
        for bad in ["10.0.0.1", "169.254.255.255", "169.254.0.5", "169.253.1.1"] {
            let f = fault_of(&put(&format!(
                r#"{{"network_interfaces":["e0"],"ipv4_address":"{bad}"}}"#
            )));
            assert_eq!(
                f, "MMMDS config error: The MMDS IPv4 address is not link local.",
                "{bad}"
            );
        }
        let f = fault_of(&put(r#"{"version":"V3","network_interfaces":["e0"]}"#));
        assert!(
            f.contains("unknown variant `V3`, expected `V1` or `V2`"),
            "{f}"
        );
        let f = fault_of(&put(r#"{"version":"V2"}"#));
        assert!(f.contains("missing field `network_interfaces`"), "{f}");
        let f = fault_of(&put(r#"{"network_interfaces":["e0"],"bogus":1}"#));
        assert!(
            f.contains(
                "expected one of `version`, `network_interfaces`, `ipv4_address`, `imds_compat`"
            ),
            "{f}"
        );
        assert!(api.lock().config.mmds.is_none(), "a refusal set a config");
        assert!(api.lock().config.full().mmds_config.is_none());
        // V1 (the default) is deprecated.
        let r = put(r#"{"network_interfaces":["e1"]}"#);
        assert_eq!((r.status, r.deprecation), (204, true), "{r:?}");
        let r = put(
            r#"{"version":"V2","network_interfaces":["e1","e0"],"ipv4_address":"169.254.170.2","imds_compat":true}"#,
        );
        assert_eq!((r.status, r.deprecation), (204, false), "{r:?}");
        assert_eq!(
            api.lock().config.full().mmds_config,
            Some(serde_json::json!({
                "version": "V2",
                "network_interfaces": ["e0", "e1"],
                "ipv4_address": "169.254.170.2",
                "imds_compat": true
            }))
        );
        // A refused config keeps the one before.
        fault_of(&put(r#"{"network_interfaces":["e9"]}"#));
        assert_eq!(
            api.lock().config.mmds.as_ref().map(|m| m.version),
            Some(MmdsVersion::V2)
        );
        // Putting an interface again gives it a new device without the MMDS, as in
        // Firecracker; the last one gone, no MMDS config is left.
        net(&api, "e0", "tap2");
        assert_eq!(
            api.lock().config.full().mmds_config.unwrap()["network_interfaces"],
            serde_json::json!(["e1"])
        );
        net(&api, "e1", "tap3");
        assert!(api.lock().config.full().mmds_config.is_none());
    }

    #[test]
    fn mmds_address_check_is_firecrackers_link_local_range() {
        use std::net::Ipv4Addr;
        for (a, ok) in [
            (Ipv4Addr::new(169, 254, 169, 254), true),
            (Ipv4Addr::new(169, 254, 1, 0), true),
            (Ipv4Addr::new(169, 254, 254, 255), true),
            (Ipv4Addr::new(169, 254, 0, 1), false),
            (Ipv4Addr::new(169, 254, 255, 1), false),
            (Ipv4Addr::new(10, 0, 0, 1), false),
            (Ipv4Addr::new(127, 0, 0, 1), false),
        ] {
            assert_eq!(crate::mmds::address_ok(a), ok, "{a}");
        }
    }
}
