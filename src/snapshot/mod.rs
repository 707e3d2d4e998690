//! Snapshot and restore: a paused VM's state and memory to files and back (docs/DESIGN.md, "Snapshots").

pub mod cpu;
pub mod devices;
pub mod kvm_vm;

pub mod format;
pub mod memory;
pub mod uffd;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::console::ConsoleIo;
use crate::control::api::{SnapshotDone, SnapshotFailed, SnapshotJobs, SnapshotTaken};
use crate::devices::virtio::block::{CacheType, DiskConfig, DiskHandle};
use crate::outcome::VmOutcome;
use crate::vcpu::command::{Command, Reply};
use crate::vcpu::state as vcpu_state;
use crate::vm::{ConsoleKind, ControlConfig, Events, MainJobs, Vm, VmConfig};

pub use crate::vm::saved::{SavedBalloon, SavedConfig, SavedDisk, SavedMmds, SavedNet, SavedVsock};
pub use devices::DevicesState;
pub use kvm_vm::VmState;
pub use vcpu_state::VcpuState;

/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// How long the vCPUs get to answer (pause check, state save).
const VCPU_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("only Linux guests (the pc machine) can be snapshotted, not a bare image")]
    NotPc,
    #[error("the VM has not been started")]
    NotStarted,
    #[error("the VM is running (vCPU {vcpus:?} not paused): pause it first (ferrite pause NAME)")]
    NotPaused { vcpus: Vec<usize> },
    #[error("not every vCPU answered {what} within {timeout:?}")]
    VcpuTimeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error("vCPU {index}: {what} failed: {reason}")]
    Vcpu {
        index: usize,
        what: &'static str,
        reason: String,
    },
    #[error("snapshot directory {path} already holds a snapshot ({file}); choose another directory or remove it")]
    Exists { path: PathBuf, file: &'static str },
    #[error("snapshot directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot flush disk {path} before the snapshot")]
    DiskFlush {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {path} has {now} bytes; the snapshot was taken with {saved} bytes")]
    DiskSize { path: PathBuf, saved: u64, now: u64 },
    #[error("disk {path} of the snapshot")]
    Disk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the snapshot's configuration is unusable: {0}")]
    Config(String),
    #[error("--tap {iface}=...: the snapshot has no network device '{iface}' (its TAPs, by index: {taps:?})")]
    NoSuchNet { iface: String, taps: Vec<String> },
    #[error("--disk-path {disk}=...: the snapshot has no disk '{disk}' (its disks, by index: {disks:?})")]
    NoSuchDisk { disk: String, disks: Vec<PathBuf> },
    #[error("the snapshot has state for {saved} vCPUs, its configuration says {configured}")]
    VcpuCount { saved: usize, configured: usize },
    #[error(transparent)]
    Cpu(#[from] cpu::Error),
    #[error("--restore-clock realtime: the snapshot holds no host wall time to measure the time since it was taken")]
    NoRealtime,
    #[error(transparent)]
    Devices(#[from] devices::Error),
    #[error(transparent)]
    VcpuState(#[from] vcpu_state::Error),
    #[error(transparent)]
    VmState(#[from] kvm_vm::Error),
    #[error(transparent)]
    Format(#[from] format::Error),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error("cannot build the VM of the snapshot")]
    Build(#[source] crate::vm::Error),
    #[error("cannot start the restored VM")]
    Start(#[source] crate::vm::Error),
    #[error(
        "{path} exists: a snapshot file is never overwritten; choose another path or remove it"
    )]
    FileExists { path: PathBuf },
    #[error("the snapshot has no network interface '{0}' to override")]
    NoSuchNetId(String),
    #[error("the snapshot has no vsock device whose socket path could be overridden")]
    NoVsock,
    #[error(transparent)]
    Uffd(#[from] uffd::Error),
}

impl Error {
    /// The HTTP status `PUT /vm/snapshot` answers this with.
    pub fn http_status(&self) -> u16 {
        match self {
            Error::NotPaused { .. }
            | Error::Exists { .. }
            | Error::FileExists { .. }
            | Error::NotStarted => 409,
            Error::NotPc => 400,
            Error::Dir { source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotADirectory | std::io::ErrorKind::PermissionDenied
                ) =>
            {
                400
            }
            _ => 500,
        }
    }
}

/// The state file's payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub config: SavedConfig,
    /// Where guest RAM is in the memory file.
    pub memory: memory::Layout,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

/// What [`Vm::snapshot`] wrote.
#[derive(Debug, Clone, Copy)]
pub struct Taken {
    pub state_bytes: u64,
    pub memory: memory::Saved,
}

/// The control API's `PUT /vm/snapshot`: a job for the main thread, which holds the VM.
impl SnapshotJobs for MainJobs {
    fn snapshot(&self, dir: PathBuf, done: SnapshotDone) -> bool {
        self.send(Box::new(move |vm| {
            let started = Instant::now();
            let outcome = match vm.snapshot(&dir) {
                Ok(t) => Ok(SnapshotTaken {
                    state_bytes: t.state_bytes,
                    memory_bytes: t.memory.bytes,
                    memory_written_bytes: t.memory.written,
                    took: started.elapsed(),
                }),
                Err(e) => Err(SnapshotFailed {
                    status: e.http_status(),
                    message: crate::errors::chain(&e),
                }),
            };
            done(outcome);
        }))
    }
}

/// Removes what a failed snapshot created (the files, the directory if it made it).
struct Cleanup {
    dir: PathBuf,
    created_dir: bool,
    files: Vec<PathBuf>,
    armed: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        if self.created_dir {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// Makes `dir` (mode 0700, parents too) unless it exists; refuses one that holds a
/// snapshot. Returns whether it made it.
fn prepare_dir(dir: &Path) -> Result<bool, Error> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |source| Error::Dir {
        path: dir.to_path_buf(),
        source,
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            for file in [STATE_FILE, MEMORY_FILE] {
                if dir.join(file).symlink_metadata().is_ok() {
                    return Err(Error::Exists {
                        path: dir.to_path_buf(),
                        file,
                    });
                }
            }
            Ok(false)
        }
        Ok(_) => Err(err(std::io::Error::from(std::io::ErrorKind::NotADirectory))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(err)?;
            Ok(true)
        }
        Err(e) => Err(err(e)),
    }
}

/// The file size of each disk (what a restore compares) and their data synced.
fn flush_disks(disks: &[DiskHandle], saved: &mut [SavedDisk]) -> Result<(), Error> {
    for (h, s) in disks.iter().zip(saved.iter_mut()) {
        let path = h.path();
        let err = |source| Error::DiskFlush {
            path: path.clone(),
            source,
        };
        // fdatasync acts on the file, whichever descriptor names it.
        let f = std::fs::File::open(&path).map_err(err)?;
        if !h.read_only() {
            f.sync_data().map_err(err)?;
        }
        s.size = f.metadata().map_err(err)?.len();
        s.path = path;
    }
    Ok(())
}

impl Vm {
    /// Sends `cmd` to every vCPU and waits for all answers.
    fn ask_vcpus(&self, cmd: Command, what: &'static str) -> Result<Vec<Reply>, Error> {
        let (tx, rx) = mpsc::channel();
        crate::vcpu::broadcast(self.vcpus(), cmd, move |r| {
            let _ = tx.send(r);
        });
        rx.recv_timeout(VCPU_TIMEOUT)
            .map_err(|_| Error::VcpuTimeout {
                what,
                timeout: VCPU_TIMEOUT,
            })
    }

    /// Each vCPU's state, read on its own thread.
    fn save_vcpus(
        &self,
        plan: std::sync::Arc<vcpu_state::SavePlan>,
    ) -> Result<Vec<VcpuState>, Error> {
        let replies = self.ask_vcpus(Command::SaveState(plan), "the state save")?;
        replies
            .into_iter()
            .enumerate()
            .map(|(index, r)| match r {
                Reply::State(s) => Ok(*s),
                other => Err(Error::Vcpu {
                    index,
                    what: "the state save",
                    reason: match other {
                        Reply::Failed(why) => why,
                        other => format!("{other:?}"),
                    },
                }),
            })
            .collect()
    }

    /// Refuses unless every vCPU is paused.
    fn check_paused(&self) -> Result<(), Error> {
        let replies = self.ask_vcpus(Command::HaltProbe, "the pause check")?;
        let running: Vec<usize> = replies
            .iter()
            .enumerate()
            .filter(|(_, r)| !matches!(r, Reply::HaltProbe(p) if p.paused))
            .map(|(i, _)| i)
            .collect();
        if running.is_empty() {
            Ok(())
        } else {
            Err(Error::NotPaused { vcpus: running })
        }
    }

    /// Writes a snapshot of this paused VM into `dir` (created if missing, mode 0700;
    /// refused if it holds a snapshot already): disks synced, vCPU states read on
    /// their own threads, the VM's and the devices' state, guest memory to
    /// `dir/memory`, and last the state file `dir/state` (through a temporary file
    /// and a rename, so a crash leaves no half snapshot). A failure removes what it
    /// wrote.
    pub fn snapshot(&self, dir: &Path) -> Result<Taken, Error> {
        let config = self.snapshot_checks()?;
        let created_dir = prepare_dir(dir)?;
        let mut cleanup = Cleanup {
            dir: dir.to_path_buf(),
            created_dir,
            files: Vec::new(),
            armed: true,
        };
        self.write_snapshot(
            config,
            &dir.join(STATE_FILE),
            &dir.join(MEMORY_FILE),
            &mut cleanup,
        )
    }

    /// [`Self::snapshot`] into two files named by the caller (Firecracker's
    /// `snapshot_path` and `mem_file_path`): their directories must exist, and an
    /// existing file is refused (never overwritten). A failure removes what it wrote.
    pub fn snapshot_files(&self, state: &Path, memory: &Path) -> Result<Taken, Error> {
        let config = self.snapshot_checks()?;
        for p in [state, memory] {
            if p.symlink_metadata().is_ok() {
                return Err(Error::FileExists {
                    path: p.to_path_buf(),
                });
            }
        }
        let mut cleanup = Cleanup {
            dir: PathBuf::new(),
            created_dir: false,
            files: Vec::new(),
            armed: true,
        };
        self.write_snapshot(config, state, memory, &mut cleanup)
    }

    /// What every snapshot checks first: a PC machine, started, every vCPU paused.
    fn snapshot_checks(&self) -> Result<SavedConfig, Error> {
        let config = self.saved_config().ok_or(Error::NotPc)?.clone();
        if !self.is_started() {
            return Err(Error::NotStarted);
        }
        self.check_paused()?;
        Ok(config)
    }

    fn write_snapshot(
        &self,
        mut config: SavedConfig,
        state: &Path,
        mem_path: &Path,
        cleanup: &mut Cleanup,
    ) -> Result<Taken, Error> {
        flush_disks(self.disks(), &mut config.disks)?;
        let plan =
            std::sync::Arc::new(vcpu_state::SavePlan::probe(self.kvm(), self.vm_fd(), true)?);
        let vcpus = self.save_vcpus(plan)?;
        let vm = kvm_vm::save(
            self.vm_fd(),
            kvm_vm::Chips {
                irqchip: true,
                pit: true,
            },
        )?;
        let devices = self.save_devices()?;
        let saved = memory::save(self.memory(), mem_path);
        if !matches!(&saved, Err(memory::Error::Create { .. })) {
            cleanup.files.push(mem_path.to_path_buf());
        }
        let (layout, mem_saved) = saved?;
        let snap = Snapshot {
            config,
            memory: layout,
            vm,
            vcpus,
            devices,
        };
        let state_bytes = format::write(state, &snap)?;
        cleanup.armed = false;
        Ok(Taken {
            state_bytes,
            memory: mem_saved,
        })
    }
}

/// What `ferrite run --restore` may change.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub control: Option<ControlConfig>,
    pub kvm_device: Option<PathBuf>,
    /// How the guest's KVM clock is set (`--restore-clock`).
    pub clock: kvm_vm::ClockMode,
    /// `(interface id, TAP name)`: the interface of that id gets another TAP device
    /// (Firecracker's `network_overrides`).
    pub nets: Vec<(String, String)>,
    /// The vsock device's socket path instead of the saved one (`vsock_override`).
    pub vsock_uds: Option<PathBuf>,
    /// The vCPU thread names' prefix (the Firecracker front door's `fc_vcpu `).
    pub vcpu_thread_prefix: Option<String>,
    /// (IFACE, TAP): the network device IFACE (the snapshot's TAP name, or its index
    /// 0, 1, ...) is attached to TAP instead; its MAC stays the snapshot's.
    pub taps: Vec<(String, String)>,
    /// (DISK, PATH): the disk DISK (the snapshot's image path, or its index 0, 1, ...)
    /// is the image PATH instead, which must have the saved size: a writable image is
    /// locked by one VM, so each clone needs its own copy.
    pub disks: Vec<(String, PathBuf)>,
    /// The MMDS store the restored interfaces answer from (the Firecracker front door's,
    /// which its API fills); without it a snapshot with MMDS gets a new, empty store.
    pub mmds: Option<crate::mmds::SharedMmds>,
}

/// Where a restored VM's memory comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemSource {
    /// The memory file, mapped `MAP_PRIVATE`.
    File(PathBuf),
    /// Anonymous memory registered with userfaultfd, the descriptor and the region
    /// list handed to the page-fault handler listening on this UNIX socket
    /// (Firecracker's `Uffd` memory backend, [`uffd`]).
    UffdHandler(PathBuf),
    /// Anonymous memory registered with userfaultfd and filled from this memory file
    /// by Ferrite's own handler thread ([`uffd::Server`]).
    Uffd(PathBuf),
}

/// A restored VM and what must live as long as it.
pub struct Restored {
    pub vm: Vm,
    /// The userfaultfd guest memory is registered with (a [`MemSource::UffdHandler`]
    /// restore): kept open for the VM's life, as Firecracker keeps its own.
    pub uffd: Option<userfaultfd::Uffd>,
    /// Ferrite's own page-fault handler ([`MemSource::Uffd`]): stops when dropped,
    /// so it must outlive the VM.
    pub uffd_server: Option<uffd::Server>,
}

/// The configuration that rebuilds the snapshot's VM, its memory from `memory_file`;
/// each disk must still have the size it had.
pub fn restore_config(
    saved: &SavedConfig,
    memory_file: &Path,
    overrides: &Overrides,
) -> Result<VmConfig, Error> {
    restore_config_from(
        saved,
        &MemSource::File(memory_file.to_path_buf()),
        overrides,
    )
}

/// [`restore_config`] with guest memory from `mem`: the file mapped `MAP_PRIVATE`, or
/// anonymous memory that a userfaultfd handler fills.
pub fn restore_config_from(
    saved: &SavedConfig,
    mem: &MemSource,
    overrides: &Overrides,
) -> Result<VmConfig, Error> {
    let mut cfg = VmConfig::new(&saved.kernel);
    cfg.vcpus = saved.vcpus;
    cfg.memory = crate::memory::MemoryConfig::new(saved.memory_bytes);
    cfg.memory.backing = match mem {
        MemSource::File(f) => crate::memory::Backing::Snapshot(f.clone()),
        MemSource::UffdHandler(_) | MemSource::Uffd(_) => crate::memory::Backing::Anonymous,
    };
    if !saved.hidden_features.is_empty() {
        let spec: Vec<String> = saved
            .hidden_features
            .iter()
            .map(|n| format!("-{n}"))
            .collect();
        cfg.hidden_features = crate::arch::x86_64::cpuid::parse_hidden(&spec.join(","))
            .map_err(|e| Error::Config(e.to_string()))?;
    }
    cfg.debug_exit = saved.debug_exit;
    cfg.console = match saved.console.as_str() {
        "serial" => ConsoleKind::Serial,
        "virtio" => ConsoleKind::Virtio,
        other => return Err(Error::Config(format!("unknown console kind '{other}'"))),
    };
    let paths = disk_paths(saved, overrides)?;
    for (d, path) in saved.disks.iter().zip(paths) {
        let now = std::fs::metadata(&path)
            .map_err(|source| Error::Disk {
                path: path.clone(),
                source,
            })?
            .len();
        if now != d.size {
            return Err(Error::DiskSize {
                path: path.clone(),
                saved: d.size,
                now,
            });
        }
        let mut disk = DiskConfig::new(&path);
        disk.read_only = d.read_only;
        disk.serial = d.serial.clone();
        disk.cache = if d.flush {
            CacheType::Writeback
        } else {
            CacheType::Unsafe
        };
        cfg.disks.push(disk);
    }
    cfg.nets = saved
        .nets
        .iter()
        .map(|n| crate::devices::virtio::net::NetConfig {
            tap: n.tap.clone(),
            mac: n.mac,
        })
        .collect();
    for (id, tap) in &overrides.nets {
        let i = saved
            .nets
            .iter()
            .position(|n| n.id.as_deref() == Some(id.as_str()))
            .ok_or_else(|| Error::NoSuchNetId(id.clone()))?;
        cfg.nets[i].tap = tap.clone();
    }
    cfg.rng = saved.rng;
    cfg.balloon = saved
        .balloon
        .as_ref()
        .map(|b| crate::devices::virtio::balloon::BalloonConfig {
            deflate_on_oom: b.deflate_on_oom,
            stats_interval: Duration::from_millis(b.stats_interval_ms),
            free_page_reporting: b.free_page_reporting,
        });
    cfg.vsock = saved
        .vsock
        .as_ref()
        .map(|v| crate::devices::virtio::vsock::VsockConfig {
            cid: v.cid,
            uds: v.uds.clone(),
            max_connections: v.max_connections,
        });
    if let Some(m) = &saved.mmds {
        let version = match m.version.as_str() {
            "V1" => crate::mmds::Version::V1,
            "V2" => crate::mmds::Version::V2,
            other => return Err(Error::Config(format!("unknown MMDS version '{other}'"))),
        };
        if let Some(&i) = m.nets.iter().find(|&&i| i >= saved.nets.len()) {
            return Err(Error::Config(format!(
                "the MMDS names network interface {i}; the snapshot has {}",
                saved.nets.len()
            )));
        }
        let mmds = overrides.mmds.clone().unwrap_or_default();
        {
            let mut g = mmds.lock().unwrap_or_else(|p| p.into_inner());
            g.version = version;
            g.imds_compat = m.imds_compat;
        }
        cfg.extras.mmds = Some(crate::vm::MmdsAttach {
            mmds,
            ipv4: m.ipv4,
            nets: m.nets.clone(),
        });
    }
    apply_device_overrides(&mut cfg, overrides)?;
    if let Some(p) = &overrides.vcpu_thread_prefix {
        cfg.vcpu_thread_prefix = p.clone();
    }
    cfg.control = overrides.control.clone();
    if let Some(k) = &overrides.kvm_device {
        cfg.kvm_device = k.clone();
    }
    Ok(cfg)
}

/// Each saved disk's image path, or the one `overrides` gives it; an override naming
/// a disk the snapshot lacks is refused.
fn disk_paths(saved: &SavedConfig, overrides: &Overrides) -> Result<Vec<PathBuf>, Error> {
    let mut paths: Vec<PathBuf> = saved.disks.iter().map(|d| d.path.clone()).collect();
    for (disk, path) in &overrides.disks {
        let index = saved
            .disks
            .iter()
            .position(|d| d.path.as_os_str() == disk.as_str())
            .or_else(|| disk.parse::<usize>().ok().filter(|&i| i < paths.len()))
            .ok_or_else(|| Error::NoSuchDisk {
                disk: disk.clone(),
                disks: saved.disks.iter().map(|d| d.path.clone()).collect(),
            })?;
        paths[index] = path.clone();
    }
    Ok(paths)
}

/// A clone's own TAPs and vsock socket: every override must name a device the
/// snapshot has, else nothing is started.
fn apply_device_overrides(cfg: &mut VmConfig, overrides: &Overrides) -> Result<(), Error> {
    let saved_taps: Vec<String> = cfg.nets.iter().map(|n| n.tap.clone()).collect();
    for (iface, tap) in &overrides.taps {
        let index = saved_taps
            .iter()
            .position(|t| t == iface)
            .or_else(|| {
                iface
                    .parse::<usize>()
                    .ok()
                    .filter(|&i| i < saved_taps.len())
            })
            .ok_or_else(|| Error::NoSuchNet {
                iface: iface.clone(),
                taps: saved_taps.clone(),
            })?;
        cfg.nets[index].tap = tap.clone();
    }
    if let Some(uds) = &overrides.vsock_uds {
        cfg.vsock.as_mut().ok_or(Error::NoVsock)?.uds = uds.clone();
    }
    Ok(())
}

/// Reads and checks the snapshot in `dir` (state file, memory file, the host's CPU
/// features against the guest's CPUID, disks) before anything is created.
pub fn load(dir: &Path, overrides: &Overrides) -> Result<(Snapshot, VmConfig), Error> {
    load_files(
        &dir.join(STATE_FILE),
        &MemSource::File(dir.join(MEMORY_FILE)),
        overrides,
    )
}

/// [`load`] from a state file and a memory source named apart (Firecracker's
/// `snapshot_path` and `mem_backend`).
pub fn load_files(
    state: &Path,
    mem: &MemSource,
    overrides: &Overrides,
) -> Result<(Snapshot, VmConfig), Error> {
    let snap: Snapshot = format::read(state)?;
    match mem {
        MemSource::File(f) | MemSource::Uffd(f) => memory::check_file(f, &snap.memory)?,
        MemSource::UffdHandler(_) => snap.memory.check()?,
    }
    if snap.vcpus.len() != snap.config.vcpus {
        return Err(Error::VcpuCount {
            saved: snap.vcpus.len(),
            configured: snap.config.vcpus,
        });
    }
    if overrides.clock == kvm_vm::ClockMode::Realtime && !kvm_vm::has_realtime(&snap.vm) {
        return Err(Error::NoRealtime);
    }
    let cfg = restore_config_from(&snap.config, mem, overrides)?;
    if snap.vcpus.iter().any(|v| !v.cpuid.is_empty()) {
        let host = cpu::host_cpuid(&cfg.kvm_device)?;
        let saved: Vec<&[kvm_bindings::kvm_cpuid_entry2]> =
            snap.vcpus.iter().map(|v| v.cpuid.as_slice()).collect();
        cpu::check(&saved, &host)?;
    }
    Ok((snap, cfg))
}

/// Builds the VM of the snapshot in `dir` and restores its state, ready for
/// [`Vm::start`]: guest RAM mapped from the memory file, then the vCPUs' state
/// (before their threads exist), the VM's (PIC, IOAPIC, PIT, clock), the devices'.
pub fn restore(
    dir: &Path,
    overrides: &Overrides,
    io: ConsoleIo,
    events: Events,
) -> Result<Vm, Error> {
    restore_files(
        &dir.join(STATE_FILE),
        &MemSource::File(dir.join(MEMORY_FILE)),
        overrides,
        io,
        events,
    )
    .map(|r| r.vm)
}

/// [`restore`] from a state file and a memory source named apart. With
/// [`MemSource::UffdHandler`] guest RAM is anonymous, registered with a new
/// userfaultfd that goes to the handler (with the region list) before any state is
/// restored, so that every page anything touches from then on comes from the handler.
pub fn restore_files(
    state: &Path,
    mem: &MemSource,
    overrides: &Overrides,
    io: ConsoleIo,
    events: Events,
) -> Result<Restored, Error> {
    let (snap, cfg) = load_files(state, mem, overrides)?;
    let mut vm = Vm::for_restore(&cfg, io, events, &snap.memory.ranges()).map_err(Error::Build)?;
    vm.set_net_ids(snap.config.nets.iter().map(|n| n.id.clone()));
    let (uffd, uffd_server) = match mem {
        MemSource::File(_) => (None, None),
        MemSource::UffdHandler(socket) => {
            let (uffd, mappings) = uffd::register(vm.memory(), &snap.memory)?;
            uffd::hand_to_handler(socket, &mappings, &uffd)?;
            (Some(uffd), None)
        }
        MemSource::Uffd(file) => {
            let (uffd, mappings) = uffd::register(vm.memory(), &snap.memory)?;
            (None, Some(uffd::Server::start(uffd, mappings, file)?))
        }
    };
    // The VM's chips and clock, then the vCPUs (each ends with KVM_KVMCLOCK_CTRL),
    // then the devices: their re-signalled queues must reach the restored irqchip.
    kvm_vm::restore_with(vm.vm_fd(), &snap.vm, overrides.clock)?;
    let vcpus = vm
        .unstarted_vcpus_mut()
        .ok_or(Error::Build(crate::vm::Error::AlreadyStarted))?;
    for (v, state) in vcpus.iter_mut().zip(&snap.vcpus) {
        v.restore_state(state)?;
    }
    let devices = retarget_devices(snap.devices, &snap.config, &cfg);
    vm.restore_devices(&devices)?;
    Ok(Restored {
        vm,
        uffd,
        uffd_server,
    })
}

/// The saved device state with each disk image and vsock socket a restore override
/// replaced (`cfg` against the snapshot's `saved` configuration) named as replaced:
/// the devices refuse state of another image or socket, which guards a restore that
/// did not ask for one.
fn retarget_devices(
    mut devices: DevicesState,
    saved: &SavedConfig,
    cfg: &VmConfig,
) -> DevicesState {
    use crate::devices::virtio::BackendState;
    for v in &mut devices.virtio {
        match &mut v.transport.backend {
            BackendState::Block(b) => {
                if let Some(new) = saved
                    .disks
                    .iter()
                    .zip(&cfg.disks)
                    .find(|(old, _)| old.path == b.path)
                    .map(|(_, new)| new.path.clone())
                {
                    b.path = new;
                }
            }
            BackendState::Vsock(state) => {
                if let (Some(old), Some(new)) = (&saved.vsock, &cfg.vsock) {
                    if state.uds == old.uds {
                        state.uds = new.uds.clone();
                    }
                }
            }
            _ => {}
        }
    }
    devices
}

/// `ferrite run --restore DIR`: restores, starts and runs the VM to its end on
/// Ferrite's stdin/stdout.
pub fn run(dir: &Path, overrides: &Overrides) -> Result<VmOutcome, Error> {
    run_from(dir, false, overrides)
}

/// [`run`], guest memory served by Ferrite's own userfaultfd handler when `uffd`
/// (`--mem-backend uffd`).
pub fn run_from(dir: &Path, uffd: bool, overrides: &Overrides) -> Result<VmOutcome, Error> {
    let io = ConsoleIo::stdio().map_err(|source| {
        Error::Build(crate::vm::Error::Console {
            what: "output (stdout duplicate)",
            source,
        })
    })?;
    crate::memory::usage::use_one_heap();
    // As `vm::run`: a SIGTERM while the VM is built is held for the loop, which then
    // tears the VM down in order.
    crate::signals::SignalEvents::install()
        .map_err(|e| Error::Build(crate::vm::Error::Signals(e)))?;
    let t = std::time::Instant::now();
    let mem = if uffd {
        MemSource::Uffd(dir.join(MEMORY_FILE))
    } else {
        MemSource::File(dir.join(MEMORY_FILE))
    };
    let Restored {
        mut vm,
        uffd: _,
        uffd_server,
    } = restore_files(&dir.join(STATE_FILE), &mem, overrides, io, Events::Own)?;
    vm.start().map_err(Error::Start)?;
    log::info!(
        "restored from {} and running in {:.2} ms",
        dir.display(),
        t.elapsed().as_secs_f64() * 1000.0
    );
    crate::memory::usage::release_free_heap();
    crate::memory::usage::release_unused_stack();
    crate::seccomp::enter(crate::seccomp::ThreadKind::Main);
    let outcome = vm.wait();
    // The handler serves the VM's pages until the VM has ended.
    drop(uffd_server);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferrite-snapdir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn snapshot_dir_is_made_0700_and_one_holding_a_snapshot_is_refused() {
        let d = tmp("prep");
        let dir = d.join("a/b");
        assert!(prepare_dir(&dir).unwrap());
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // An existing empty directory is used as it is.
        assert!(!prepare_dir(&dir).unwrap());
        std::fs::write(dir.join(MEMORY_FILE), b"x").unwrap();
        let e = prepare_dir(&dir).unwrap_err();
        assert!(matches!(e, Error::Exists { file: "memory", .. }), "{e}");
        assert_eq!(e.http_status(), 409);
        let file = d.join("plain");
        std::fs::write(&file, b"x").unwrap();
        let e = prepare_dir(&file).unwrap_err();
        assert_eq!(e.http_status(), 400, "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_snapshot_removes_only_what_it_made() {
        let d = tmp("cleanup");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("other"), b"keep").unwrap();
        let made = d.join("made");
        {
            let _c = Cleanup {
                dir: d.clone(),
                created_dir: false,
                files: vec![made.clone()],
                armed: true,
            };
            std::fs::write(&made, b"x").unwrap();
        }
        assert!(!made.exists());
        assert!(d.join("other").exists(), "a file it did not make stays");
        assert!(d.exists(), "a directory it did not make stays");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn restore_config_refuses_a_disk_whose_size_changed() {
        let d = tmp("disk");
        std::fs::create_dir_all(&d).unwrap();
        let img = d.join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let mut saved = SavedConfig::of(&VmConfig::new("/k"), &[]);
        saved.disks.push(SavedDisk {
            path: img.clone(),
            read_only: false,
            serial: Some("s1".into()),
            flush: true,
            size: 1 << 20,
        });
        let cfg = restore_config(&saved, &d.join("memory"), &Overrides::default()).unwrap();
        assert_eq!(cfg.disks[0].serial.as_deref(), Some("s1"));
        assert!(matches!(
            cfg.memory.backing,
            crate::memory::Backing::Snapshot(_)
        ));
        std::fs::File::options()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(2 << 20)
            .unwrap();
        let e = restore_config(&saved, &d.join("memory"), &Overrides::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("has 2097152 bytes; the snapshot was taken with 1048576"),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn mmds_settings_are_saved_and_a_restore_answers_from_the_given_store() {
        let mut cfg = VmConfig::new("/k");
        cfg.nets.push(crate::devices::virtio::net::NetConfig {
            tap: "t0".into(),
            mac: None,
        });
        let store: crate::mmds::SharedMmds = Default::default();
        store.lock().unwrap().version = crate::mmds::Version::V2;
        cfg.extras.mmds = Some(crate::vm::MmdsAttach {
            mmds: store.clone(),
            ipv4: std::net::Ipv4Addr::new(169, 254, 170, 2),
            nets: vec![0],
        });
        let saved = SavedConfig::of(&cfg, &[]);
        let m = saved
            .mmds
            .clone()
            .expect("the MMDS settings were not saved");
        assert_eq!(
            (m.version.as_str(), m.nets.as_slice()),
            ("V2", &[0usize][..])
        );
        // JSON round trip, and a snapshot without the field (older) reads as none.
        let text = serde_json::to_string(&saved).unwrap();
        assert_eq!(serde_json::from_str::<SavedConfig>(&text).unwrap(), saved);
        let old = SavedConfig::of(&VmConfig::new("/k"), &[]);
        assert!(!serde_json::to_string(&old).unwrap().contains("mmds"));
        // The restore answers from the store it is given, with the saved settings.
        let other: crate::mmds::SharedMmds = Default::default();
        let o = Overrides {
            mmds: Some(other.clone()),
            ..Default::default()
        };
        let mem = MemSource::File(PathBuf::from("/nonexistent/memory"));
        let r = restore_config_from(&saved, &mem, &o).unwrap();
        let a = r.extras.mmds.expect("no MMDS on the restored interface");
        assert!(std::sync::Arc::ptr_eq(&a.mmds, &other));
        assert_eq!((a.ipv4, a.nets), (m.ipv4, vec![0]));
        assert_eq!(other.lock().unwrap().version, crate::mmds::Version::V2);
        // Without one (the native CLI), a new store.
        let r = restore_config_from(&saved, &mem, &Overrides::default()).unwrap();
        assert!(r.extras.mmds.is_some());
        // A bad file: an unknown version, an interface the snapshot does not have.
        let mut bad = saved.clone();
        bad.mmds.as_mut().unwrap().version = "V9".into();
        assert!(restore_config_from(&bad, &mem, &o).is_err());
        let mut bad = saved.clone();
        bad.mmds.as_mut().unwrap().nets = vec![3];
        assert!(restore_config_from(&bad, &mem, &o).is_err());
    }
}
