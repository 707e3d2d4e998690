//! A VM as an object: [`Vm::new`] runs the build stages ([`build`]), [`Vm::start`]
//! starts the console, the event loop and the vCPU threads, and [`Vm::wait`] waits for
//! the first stop request and tears everything down in order. While it runs, the
//! vCPUs take commands (pause, resume, register reads) through their handles.
//!
//! Teardown, in order, each wait bounded and named when it runs out:
//! 1. every vCPU kicked and joined (5 s in all);
//! 2. the event loop stopped and joined (2 s);
//! 3. console output drained (1 s, or 100 ms without progress: a stdout nobody reads
//!    is abandoned and the loss counted);
//! 4. the terminal restored; a reset right after a console "Kernel panic" line becomes
//!    a panic outcome.
#![forbid(unsafe_code)]

pub mod build;
pub mod machine;
pub mod saved;

use std::fs::File;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::regs;
use crate::arch::x86_64::{acpi, cpu, cpuid, linux, mptable, pvh};
use crate::console::input::{ConsoleInput, ConsoleSink};
use crate::console::output::ConsoleOutput;
use crate::console::terminal;
use crate::console::watch::PanicLine;
use crate::console::{ConsoleIo, InputSource};
use crate::control::api::{Api, VmInfo};
use crate::control::paths;
use crate::control::server::ControlServer;
use crate::devices::virtio::block::DiskConfig;
use crate::event_loop::{self, EventHandler, EventLoop, EventLoopHandle, LoopHandle, Ops};
use crate::graceful;
use crate::memory::GuestMemory;
use crate::outcome::{StopSignal, VmOutcome};
use crate::signals::SignalEvents;
use crate::threads::{Joinable, Joined};
use crate::vcpu::command::{Command, Registers, Reply};
use crate::vcpu::halt_watch::{self, HaltWatch};
use crate::vcpu::{kick, Vcpu, VcpuHandle};
use crate::{bus, loader, memory};
pub use machine::Machine;

/// Default kernel command line for Linux images.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// Default with `--console virtio`: early messages on the UART (earlycon, until hvc0
/// registers), then hvc0 is the console.
pub const DEFAULT_CMDLINE_VIRTIO_CONSOLE: &str =
    "earlycon=uart8250,io,0x3f8 console=hvc0 reboot=k panic=-1";

/// Which device is the guest's console (input and `/dev/console`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConsoleKind {
    /// The 16550 UART (ttyS0).
    #[default]
    Serial,
    /// A virtio-console (hvc0); the UART still prints early boot output.
    Virtio,
}

const VCPU_JOIN_TIMEOUT: Duration = Duration::from_secs(5);
const EVENT_LOOP_JOIN_TIMEOUT: Duration = Duration::from_secs(2);
const CONSOLE_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// What to run.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `None` means [`DEFAULT_CMDLINE`].
    pub cmdline: Option<String>,
    /// Guest RAM: size, backing, huge pages, preallocation.
    pub memory: memory::MemoryConfig,
    pub vcpus: usize,
    pub kvm_device: PathBuf,
    /// CPUID features hidden from the guest.
    pub hidden_features: Vec<cpuid::Feature>,
    /// Port 0xf4 ends the VM with an exit status the guest chooses.
    pub debug_exit: bool,
    /// virtio-blk disks, in order (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices on TAPs, in order (eth0, eth1, ...).
    pub nets: Vec<crate::devices::virtio::net::NetConfig>,
    /// A virtio-rng device.
    pub rng: bool,
    /// The guest's console device.
    pub console: ConsoleKind,
    /// A virtio-balloon device.
    pub balloon: Option<crate::devices::virtio::balloon::BalloonConfig>,
    /// A virtio-vsock device (its UNIX socket is bound when the VM is built).
    pub vsock: Option<crate::devices::virtio::vsock::VsockConfig>,
    /// Serve a control socket (the `ferrite` CLI and `curl --unix-socket` talk to it).
    pub control: Option<ControlConfig>,
    /// vCPU thread names are this and the index (`ferrite-vcpu-0`; Firecracker's
    /// `fc_vcpu 0`, which Kata finds them by).
    pub vcpu_thread_prefix: String,
    /// What a front end adds (the Firecracker boot timer).
    pub extras: Extras,
}

/// A device a front end puts on the MMIO bus: name, base, length, device.
pub type ExtraMmio = (
    &'static str,
    u64,
    u64,
    Arc<Mutex<dyn crate::bus::BusDevice>>,
);

/// Devices and hooks a front end adds to the machine (the Firecracker front door's
/// boot timer at its address, and its boot-time log line).
#[derive(Clone, Default)]
pub struct Extras {
    pub mmio: Vec<ExtraMmio>,
    /// Called once when the guest first writes the boot-timer marker to port 0xf5.
    pub on_userspace: Option<Arc<dyn Fn() + Send + Sync>>,
    /// The vsock device, already bound (see [`PrebuiltVsock`]).
    pub vsock: Option<PrebuiltVsock>,
    /// The metadata service and the network interfaces that answer for it (none: no
    /// interface has a responder, and the TX path is as without MMDS).
    pub mmds: Option<MmdsAttach>,
}

/// Which network interfaces answer the guest for the MMDS, at which address, from
/// which store (the API that holds the same store changes what the guest reads).
#[derive(Clone, Debug)]
pub struct MmdsAttach {
    pub mmds: crate::mmds::SharedMmds,
    pub ipv4: std::net::Ipv4Addr,
    /// Indices into [`VmConfig::nets`].
    pub nets: Vec<usize>,
}

/// A vsock device whose socket was bound before the VM is built (the Firecracker front
/// door binds it at `PUT /vsock`, as Firecracker does): the build takes it out instead
/// of binding [`VmConfig::vsock`] (which it does when the slot is empty).
pub type PrebuiltVsock = Arc<Mutex<Option<crate::devices::virtio::vsock::Vsock>>>;

impl std::fmt::Debug for Extras {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .mmio
            .iter()
            .map(|(n, b, l, _)| format!("{n} @{b:#x}+{l:#x}"))
            .collect();
        f.debug_struct("Extras")
            .field("mmio", &names)
            .field("on_userspace", &self.on_userspace.is_some())
            .field("vsock", &self.vsock.is_some())
            .field(
                "mmds",
                &self.mmds.as_ref().map(|m| (m.ipv4, m.nets.clone())),
            )
            .finish()
    }
}

/// The control socket of a VM.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub name: String,
    /// Say the name and socket on stderr at start (for a generated name).
    pub announce: bool,
    /// Where the socket goes; `None` is `<run dir>/<name>.sock` (see `control::paths`).
    pub socket: Option<PathBuf>,
    /// A socket that cannot be bound is logged and the VM runs without it (the
    /// Firecracker front door's second socket, which only `ferrite list` and the native
    /// CLI use), instead of failing the start.
    pub optional: bool,
}

impl VmConfig {
    /// A configuration with Ferrite's defaults for `kernel`.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            memory: memory::MemoryConfig::new(128 << 20),
            vcpus: 1,
            kvm_device: "/dev/kvm".into(),
            hidden_features: Vec::new(),
            debug_exit: false,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            console: ConsoleKind::Serial,
            balloon: None,
            vsock: None,
            control: None,
            vcpu_thread_prefix: "ferrite-vcpu-".to_owned(),
            extras: Extras::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Loader(#[from] loader::Error),
    #[error("cannot open {path}")]
    OpenKvm {
        path: PathBuf,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{path} is not a usable KVM device (KVM_GET_API_VERSION returned {api}, expected 12)")]
    NotKvm { path: PathBuf, api: i32 },
    #[error("cannot create a KVM VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("--cpus {requested} is out of range: this host's KVM allows 1 to {max} vCPUs")]
    TooManyVcpus { requested: usize, max: usize },
    #[error("--cpus {requested} is out of range: {machine} run at most {max} vCPUs")]
    TooManyVcpusForMachine {
        requested: usize,
        max: usize,
        machine: &'static str,
    },
    #[error("cannot read KVM's vCPU mmap size")]
    MmapSize(#[source] kvm_ioctls::Error),
    #[error("cannot create vCPU {index}")]
    CreateVcpu {
        index: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Regs(#[from] regs::Error),
    #[error(transparent)]
    Cpu(#[from] cpu::Error),
    #[error(transparent)]
    Cpuid(#[from] cpuid::Error),
    #[error(transparent)]
    Linux(#[from] linux::Error),
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    #[error(transparent)]
    Pvh(#[from] pvh::Error),
    #[error("--initrd and --cmdline need a Linux kernel; {0} is not one (bzImage or vmlinux)")]
    NotLinux(PathBuf),
    #[error("virtio devices need a Linux kernel; {0} is not one (bzImage or vmlinux)")]
    VirtioNeedsLinux(PathBuf),
    #[error("{requested} virtio devices requested; at most {max} are supported")]
    TooManyVirtioDevices { requested: usize, max: usize },
    #[error(transparent)]
    Disk(#[from] crate::devices::virtio::block::Error),
    #[error(transparent)]
    Control(#[from] crate::control::paths::Error),
    #[error(transparent)]
    Net(#[from] crate::devices::virtio::net::Error),
    #[error(transparent)]
    Balloon(#[from] crate::devices::virtio::balloon::Error),
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::device::Error),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot set up the in-kernel {what}")]
    Irqchip {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot create device {what}")]
    Device {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the console {what}")]
    Console {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Bus(#[from] bus::Error),
    #[error(transparent)]
    Kick(#[from] kick::Error),
    #[error(transparent)]
    Halt(#[from] halt_watch::Error),
    #[error(transparent)]
    Signals(#[from] crate::signals::Error),
    #[error(transparent)]
    EventLoop(#[from] event_loop::Error),
    #[error(transparent)]
    Terminal(#[from] terminal::Error),
    #[error("the VM is not running")]
    NotRunning,
    #[error("graceful stop")]
    Graceful(#[from] graceful::Error),
    #[error("the VM has already been started")]
    AlreadyStarted,
    #[error("vCPU {index} does not exist (the VM has {count})")]
    NoSuchVcpu { index: usize, count: usize },
    #[error("not every vCPU answered {what} within {timeout:?}")]
    BroadcastTimeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error("vCPU {index} did not answer {what} within {timeout:?}")]
    CommandTimeout {
        index: usize,
        what: &'static str,
        timeout: Duration,
    },
    #[error("vCPU {index}: {what} failed: {reason}")]
    CommandFailed {
        index: usize,
        what: &'static str,
        reason: String,
    },
}

/// Where a VM's event loop comes from.
pub enum Events {
    /// The VM makes its own, starts it in [`Vm::start`] and stops it in teardown (the
    /// native `ferrite run`).
    Own,
    /// A loop that already runs, with its stop signal: the Firecracker front door
    /// serves its API on it from process start. The VM adds its handlers to it; its
    /// owner stops it once the VM is gone. Terminating signals are the owner's too.
    Shared {
        handle: LoopHandle,
        stop: Arc<StopSignal>,
    },
}

/// The VM's event loop before `start`.
enum LoopPlace {
    Own(EventLoop),
    Shared(LoopHandle),
}

impl LoopPlace {
    fn handle(&self) -> LoopHandle {
        match self {
            LoopPlace::Own(l) => l.handle(),
            LoopPlace::Shared(h) => h.clone(),
        }
    }

    /// Adds `handler`: at once to a loop not yet started, through the loop's own thread
    /// to a running one (a failure there is logged: the loop thread has no caller).
    fn add(&mut self, handler: Box<dyn EventHandler>) -> Result<(), Error> {
        match self {
            LoopPlace::Own(l) => {
                l.add_handler(handler)?;
            }
            LoopPlace::Shared(h) => h.call(move |ctx| {
                let name = handler.name().to_owned();
                if let Err(e) = ctx.add_handler(handler) {
                    log::error!("cannot add {name} to the event loop: {e}");
                }
            })?,
        }
        Ok(())
    }
}

/// The VM's event loop while it runs.
enum RunningLoop {
    Own(EventLoopHandle),
    Shared(LoopHandle),
}

/// Pieces that exist between `new` and `start`.
struct Unstarted {
    vcpus: Vec<Vcpu>,
    control: Option<(ControlConfig, VmInfo)>,
    event_loop: LoopPlace,
    console_input: InputSource,
    /// Where console input goes (the UART or a virtio console) and its "room again"
    /// eventfd.
    console_sink: (Arc<Mutex<dyn ConsoleSink>>, EventFd),
}

/// Pieces that exist while the VM runs.
struct Running {
    threads: Vec<(usize, Joinable)>,
    events: RunningLoop,
    raw_mode: Option<terminal::RawModeGuard>,
}

/// A virtual machine.
///
/// Field order is drop order: the VM fd is dropped before guest memory (KVM must stop
/// using the memory slots before their mapping goes), as `memory::register` requires.
pub struct Vm {
    vm_fd: VmFd,
    mem: GuestMemory,
    /// The memfd or backing file of guest RAM (locked, for a file), open while the VM
    /// lives; a backing file this run created is removed unless the VM started.
    mem_file: Option<crate::memory::RamFile>,
    _kvm: Kvm,
    machine: Machine,
    stop: Arc<StopSignal>,
    handles: Vec<VcpuHandle>,
    panic_line: PanicLine,
    console_out: Option<ConsoleOutput>,
    unstarted: Option<Unstarted>,
    running: Option<Running>,
    /// The control socket's file, removed when the VM is dropped.
    socket: Option<paths::SocketFile>,
    /// The vsock device's socket file: removed at teardown even when a thread that
    /// holds the device was left behind (the device removes it too when dropped).
    vsock_socket: Option<paths::SocketFile>,
    /// Graceful stop requests (the API's and [`Vm::stop_gracefully`]).
    graceful: Arc<graceful::GracefulStop>,
    /// vCPU thread names: this and the index.
    vcpu_thread_prefix: String,
    balloon: Option<crate::devices::virtio::balloon::BalloonHandle>,
    /// The virtio-blk disks in guest order (vda, vdb, ...).
    disks: Vec<crate::devices::virtio::block::DiskHandle>,
    /// What a snapshot records to rebuild this VM (`None` for a bare machine, which
    /// cannot be snapshotted).
    saved_config: Option<saved::SavedConfig>,
    /// Jobs for the main thread ([`MainJobs`]), served while [`Vm::wait`] waits.
    jobs: Mutex<mpsc::Receiver<MainJob>>,
    jobs_tx: MainJobs,
    /// [`Vm::wait`] serves main-thread jobs (the VM has its own event loop: the native
    /// `ferrite run`; the Firecracker front door waits elsewhere).
    serves_jobs: bool,
    /// The devices a snapshot saves and restores (`snapshot::devices`).
    device_handles: build::DeviceHandles,
}

/// Work for the main thread, which holds the [`Vm`] while it waits for the stop (a
/// snapshot the control API asked for).
pub type MainJob = Box<dyn FnOnce(&Vm) + Send>;

/// Hands [`MainJob`]s to the main thread.
#[derive(Clone)]
pub struct MainJobs {
    tx: mpsc::Sender<MainJob>,
    stop: Arc<StopSignal>,
}

impl MainJobs {
    /// Queues `job` and wakes the main thread; `false` when the VM is gone.
    pub fn send(&self, job: MainJob) -> bool {
        let sent = self.tx.send(job).is_ok();
        self.stop.poke();
        sent
    }
}

impl Vm {
    /// The control socket, when the VM serves one.
    pub fn control_socket(&self) -> Option<&std::path::Path> {
        self.socket.as_ref().map(|s| s.path())
    }
}

impl Vm {
    /// Builds the VM (every stage up to and including the vCPUs) without running it.
    pub fn new(cfg: &VmConfig, io: ConsoleIo) -> Result<Self, Error> {
        Self::with_events(cfg, io, Events::Own)
    }

    /// [`Self::new`] with the event loop given by `events`.
    pub fn with_events(cfg: &VmConfig, io: ConsoleIo, events: Events) -> Result<Self, Error> {
        Self::build(cfg, io, events, None)
    }

    /// Builds the VM of a snapshot: `cfg` is the snapshot's configuration (see
    /// `snapshot::restore_config`) with its memory backed by the snapshot's
    /// memory file, RAM at `ranges`. Nothing is loaded and no boot data is written;
    /// the caller restores the saved state (`snapshot::restore`) before
    /// [`Self::start`].
    pub fn for_restore(
        cfg: &VmConfig,
        io: ConsoleIo,
        events: Events,
        ranges: &[(u64, u64)],
    ) -> Result<Self, Error> {
        Self::build(cfg, io, events, Some(ranges))
    }

    fn build(
        cfg: &VmConfig,
        io: ConsoleIo,
        events: Events,
        restore: Option<&[(u64, u64)]>,
    ) -> Result<Self, Error> {
        let started = Instant::now();
        // Bad input fails before KVM is touched.
        if restore.is_none() {
            loader::probe(&cfg.kernel)?;
            if let Some(initrd) = &cfg.initrd {
                linux::probe_initrd(initrd)?;
            }
        }
        let serves_jobs = matches!(events, Events::Own);
        let (kvm, vm_fd) = build::create_vm(cfg)?;
        let loaded = match restore {
            None => build::load_images(cfg, &vm_fd)?,
            Some(ranges) => build::restore_memory(cfg, &vm_fd, ranges)?,
        };
        build::create_irqchip(&vm_fd, &loaded.machine)?;
        let (stop, mut event_loop) = match events {
            Events::Own => {
                let stop = Arc::new(StopSignal::new());
                let l = EventLoop::new(stop.clone())?;
                (stop, LoopPlace::Own(l))
            }
            Events::Shared { handle, stop } => (stop, LoopPlace::Shared(handle)),
        };
        let (console_out, queue) = ConsoleOutput::new(io.output);
        let mut devices = build::add_devices(cfg, &vm_fd, &loaded.machine, &stop, queue, started)?;
        if let Some(sci) = devices.sci_resample.take() {
            event_loop.add(Box::new(sci))?;
        }
        let graceful = graceful::GracefulStop::new(
            graceful::GuestButtons {
                i8042: devices.i8042.clone(),
                acpi_pm: devices.acpi_pm.clone(),
            },
            stop.clone(),
        );
        let virtio = build::add_virtio_devices(
            cfg,
            &vm_fd,
            &loaded.machine,
            &loaded.mem,
            &mut devices,
            &event_loop.handle(),
        )?;
        if !loaded.restored {
            build::write_boot_data(cfg, &loaded, &virtio.announced)?;
        }
        let device_handles = build::DeviceHandles::of(&devices, &virtio);
        let shared = build::vcpu_shared(cfg, &loaded, devices.buses, &stop);
        let (vcpus, handles) = build::create_vcpus(cfg, &kvm, &vm_fd, &loaded, &shared)?;
        let saved_config = loaded
            .machine
            .is_pc()
            .then(|| saved::SavedConfig::of(cfg, &virtio.disks));
        let (jobs_tx, jobs) = mpsc::channel();
        Ok(Self {
            saved_config,
            jobs: Mutex::new(jobs),
            jobs_tx: MainJobs {
                tx: jobs_tx,
                stop: stop.clone(),
            },
            serves_jobs,
            vm_fd,
            mem: loaded.mem,
            mem_file: loaded.mem_file,
            _kvm: kvm,
            machine: loaded.machine,
            stop,
            handles,
            panic_line: devices.panic_line,
            console_out: Some(console_out),
            unstarted: Some(Unstarted {
                control: cfg.control.clone().map(|c| {
                    let info = VmInfo {
                        name: c.name.clone(),
                        kernel: cfg.kernel.display().to_string(),
                        vcpus: cfg.vcpus,
                        mem_bytes: cfg.memory.size,
                        mem_backing: cfg.memory.backing.to_string(),
                        hugepages: cfg.memory.hugepages.to_string(),
                        mem_prealloc: cfg.memory.prealloc,
                        machine: if loaded.machine.is_pc() { "pc" } else { "bare" },
                        devices: virtio.names.clone(),
                        balloon: virtio.balloon.clone(),
                        mmds: cfg.extras.mmds.as_ref().map(|m| m.mmds.clone()),
                    };
                    (c, info)
                }),
                vcpus,
                event_loop,
                console_input: io.input,
                console_sink: match virtio.console {
                    Some(c) => c,
                    None => {
                        let drained =
                            devices
                                .serial_activity
                                .drained
                                .try_clone()
                                .map_err(|source| Error::Console {
                                    what: "drain eventfd",
                                    source,
                                })?;
                        (devices.serial as Arc<Mutex<dyn ConsoleSink>>, drained)
                    }
                },
            }),
            running: None,
            socket: None,
            vsock_socket: virtio.vsock_socket,
            graceful,
            vcpu_thread_prefix: cfg.vcpu_thread_prefix.clone(),
            balloon: virtio.balloon.clone(),
            disks: virtio.disks.clone(),
            device_handles,
        })
    }

    /// The devices a snapshot holds, and whether the VM has started (`snapshot::devices`).
    pub(crate) fn device_handles(&self) -> (&build::DeviceHandles, bool) {
        (&self.device_handles, self.unstarted.is_none())
    }

    /// Starts the console, the signal handlers, the event loop and the vCPU threads.
    pub fn start(&mut self) -> Result<(), Error> {
        let parts = self.unstarted.take().ok_or(Error::AlreadyStarted)?;
        kick::install_handler()?;
        let mut event_loop = parts.event_loop;
        if let LoopPlace::Own(l) = &mut event_loop {
            l.add_handler(Box::new(SignalWatch(SignalEvents::install()?)))?;
        }
        let mut raw_mode = None;
        let source = match parts.console_input {
            InputSource::Stdin => {
                raw_mode = terminal::enter_raw_mode()?;
                Some(
                    crate::console::input::stdin_file().map_err(|source| Error::Console {
                        what: "input (stdin duplicate)",
                        source,
                    })?,
                )
            }
            InputSource::Fd(fd) => Some(File::from(fd)),
            InputSource::None => None,
        };
        if let Some(source) = source {
            let (sink, drained) = parts.console_sink;
            event_loop.add(Box::new(ConsoleInput::new(source, sink, drained)))?;
        }
        if let Some((control, info)) = parts.control {
            let path = match &control.socket {
                Some(p) => p.clone(),
                None => paths::socket_path(&paths::prepare_run_dir()?, &control.name),
            };
            let (listener, file) = match paths::bind(&path, &control.name) {
                Ok(b) => b,
                Err(e) if control.optional => {
                    log::warn!(
                        "no native control socket for '{}': {}",
                        control.name,
                        crate::errors::chain(&e)
                    );
                    return self.start_threads(parts.vcpus, event_loop, raw_mode);
                }
                Err(e) => return Err(e.into()),
            };
            let kvm_stats =
                crate::vcpu::kvm_stats::StatsFd::for_vm(&self.vm_fd).map_err(|e| e.to_string());
            let mut api = Api::new(info, self.handles.clone(), self.stop.clone(), kvm_stats)
                .with_graceful(self.graceful.clone(), event_loop.handle())
                .with_memory(self.mem.clone());
            if self.serves_jobs {
                api = api.with_snapshots(Box::new(self.jobs_tx.clone()));
            }
            let api = Arc::new(api);
            let server = ControlServer::new(listener, api, event_loop.handle());
            event_loop.add(Box::new(server))?;
            if control.announce {
                let line = format!("VM '{}', control socket {}", control.name, path.display());
                if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    eprintln!("ferrite: {line}\r");
                } else {
                    log::info!("{line}");
                }
            }
            self.socket = Some(file);
        }
        self.start_threads(parts.vcpus, event_loop, raw_mode)
    }

    /// The last part of [`Self::start`]: the halt watch, the loop and the vCPU threads.
    fn start_threads(
        &mut self,
        vcpus: Vec<Vcpu>,
        mut event_loop: LoopPlace,
        raw_mode: Option<terminal::RawModeGuard>,
    ) -> Result<(), Error> {
        if self.machine.is_pc() {
            // KVM handles HLT on this machine: a guest that halts for good is found by
            // watching (the bare machine's vCPU loop sees every HLT itself).
            let watch =
                HaltWatch::new(self.handles.clone(), event_loop.handle(), self.stop.clone())?;
            event_loop.add(Box::new(watch))?;
        }
        let events = match event_loop {
            LoopPlace::Own(l) => RunningLoop::Own(l.spawn()?),
            LoopPlace::Shared(h) => RunningLoop::Shared(h),
        };
        let mut threads = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let index = vcpu.index();
            let stop = self.stop.clone();
            let spawned =
                Joinable::spawn(format!("{}{index}", self.vcpu_thread_prefix), move || {
                    crate::seccomp::enter(crate::seccomp::ThreadKind::Vcpu);
                    let result =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vcpu.run()));
                    if result.is_err() {
                        stop.request(VmOutcome::Error(format!("vCPU {index} thread panicked")));
                    }
                });
            match spawned {
                Ok(join) => threads.push((index, join)),
                Err(e) => {
                    self.stop.request(VmOutcome::Error(format!(
                        "cannot spawn vCPU {index} thread: {e}"
                    )));
                    break;
                }
            }
        }
        self.running = Some(Running {
            threads,
            events,
            raw_mode,
        });
        if let Some(f) = &mut self.mem_file {
            f.keep();
        }
        Ok(())
    }

    /// Waits for the first stop request, tears the VM down and says how it ended.
    pub fn wait(&mut self) -> VmOutcome {
        let outcome = loop {
            if let Some(o) = self.stop.wait_or_poked() {
                break o;
            }
            self.run_jobs();
        };
        self.teardown();
        let outcome = report_panic(outcome, &self.panic_line);
        self.graceful.report(&outcome);
        outcome
    }

    /// Where main-thread jobs go ([`Self::run_jobs`] runs them).
    pub fn main_jobs(&self) -> MainJobs {
        self.jobs_tx.clone()
    }

    /// Names the network interfaces in what a snapshot records (the Firecracker front
    /// door's `iface_id`s, in the guest's order).
    pub fn set_net_ids(&mut self, ids: impl IntoIterator<Item = Option<String>>) {
        if let Some(c) = &mut self.saved_config {
            for (n, id) in c.nets.iter_mut().zip(ids) {
                n.id = id;
            }
        }
    }

    /// Runs the queued main-thread jobs (done by [`Self::wait`]; a caller that waits
    /// elsewhere, as the Firecracker front door's main thread, calls this itself).
    pub fn run_jobs(&self) {
        loop {
            let job = self
                .jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .try_recv();
            match job {
                Ok(job) => job(self),
                Err(_) => return,
            }
        }
    }

    /// What a snapshot records to rebuild this VM (`None`: a bare machine).
    pub fn saved_config(&self) -> Option<&saved::SavedConfig> {
        self.saved_config.as_ref()
    }

    /// The vCPUs before [`Self::start`] (a restore sets their state), `None` after.
    pub fn unstarted_vcpus_mut(&mut self) -> Option<&mut [Vcpu]> {
        self.unstarted.as_mut().map(|u| u.vcpus.as_mut_slice())
    }

    /// Whether [`Self::start`] has run.
    pub fn is_started(&self) -> bool {
        self.running.is_some()
    }

    /// Asks the guest to shut down (ACPI power button if armed, else Ctrl-Alt-Del) and
    /// stops it hard if it has not within `timeout`. The VM must run (not paused).
    pub fn stop_gracefully(&self, timeout: Duration) -> Result<graceful::Requested, Error> {
        let events = self.event_loop().ok_or(Error::NotRunning)?;
        Ok(self.graceful.request(timeout, &events)?)
    }

    /// Asks the VM to stop with `outcome` (the first request wins); [`Self::wait`]
    /// returns soon after.
    pub fn stop(&self, outcome: VmOutcome) {
        self.stop.request(outcome);
    }

    /// The stop request, for code that ends the VM from elsewhere.
    pub fn stop_signal(&self) -> Arc<StopSignal> {
        self.stop.clone()
    }

    pub fn vcpus(&self) -> &[VcpuHandle] {
        &self.handles
    }

    /// The graceful-stop state (and the guest's keyboard and power button).
    pub fn graceful(&self) -> Arc<graceful::GracefulStop> {
        self.graceful.clone()
    }

    /// The virtio-blk disks in guest order (vda, vdb, ...): swap an image, change a
    /// rate limit.
    pub fn disks(&self) -> &[crate::devices::virtio::block::DiskHandle] {
        &self.disks
    }

    /// The virtio-balloon, when the VM has one.
    pub fn balloon(&self) -> Option<crate::devices::virtio::balloon::BalloonHandle> {
        self.balloon.clone()
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// The /dev/kvm handle the VM was created from.
    pub fn kvm(&self) -> &Kvm {
        &self._kvm
    }

    /// Reaches the running event loop (handlers can be added to it from any thread).
    pub fn event_loop(&self) -> Option<LoopHandle> {
        self.running.as_ref().map(|r| match &r.events {
            RunningLoop::Own(l) => l.handle(),
            RunningLoop::Shared(h) => h.clone(),
        })
    }

    /// Sends `cmd` to every vCPU and waits until all have answered (or `timeout`).
    fn broadcast(
        &self,
        cmd: Command,
        what: &'static str,
        timeout: Duration,
    ) -> Result<Vec<Reply>, Error> {
        if self.running.is_none() {
            return Err(Error::NotRunning);
        }
        let (tx, rx) = mpsc::channel();
        crate::vcpu::broadcast(&self.handles, cmd, move |replies| {
            let _ = tx.send(replies);
        });
        rx.recv_timeout(timeout)
            .map_err(|_| Error::BroadcastTimeout { what, timeout })
    }

    /// Pauses every vCPU; returns when all are parked. Pausing a paused VM is a no-op.
    pub fn pause(&self, timeout: Duration) -> Result<(), Error> {
        self.expect_all(Command::Pause, "pause", timeout, |r| {
            matches!(r, Reply::Paused { .. })
        })
    }

    /// Resumes every vCPU. Resuming a running VM is a no-op.
    pub fn resume(&self, timeout: Duration) -> Result<(), Error> {
        self.expect_all(Command::Resume, "resume", timeout, |r| {
            matches!(r, Reply::Resumed { .. })
        })
    }

    fn expect_all(
        &self,
        cmd: Command,
        what: &'static str,
        timeout: Duration,
        ok: impl Fn(&Reply) -> bool,
    ) -> Result<(), Error> {
        let replies = self.broadcast(cmd, what, timeout)?;
        match replies.iter().enumerate().find(|(_, r)| !ok(r)) {
            None => Ok(()),
            Some((index, r)) => Err(Error::CommandFailed {
                index,
                what,
                reason: format!("{r:?}"),
            }),
        }
    }

    /// Reads vCPU `index`'s registers and the listed MSRs, on its own thread.
    pub fn read_registers(
        &self,
        index: usize,
        msrs: &[u32],
        timeout: Duration,
    ) -> Result<Registers, Error> {
        if self.running.is_none() {
            return Err(Error::NotRunning);
        }
        let h = self.handles.get(index).ok_or(Error::NoSuchVcpu {
            index,
            count: self.handles.len(),
        })?;
        let what = "register read";
        let cmd = Command::ReadRegisters {
            msrs: msrs.to_vec(),
        };
        match h.request(cmd, timeout) {
            Some(Reply::Registers(r)) => Ok(*r),
            Some(other) => Err(Error::CommandFailed {
                index,
                what,
                reason: format!("{other:?}"),
            }),
            None => Err(Error::CommandTimeout {
                index,
                what,
                timeout,
            }),
        }
    }

    fn teardown(&mut self) {
        if let Some(running) = self.running.take() {
            for h in &self.handles {
                h.kick();
            }
            let deadline = Instant::now() + VCPU_JOIN_TIMEOUT;
            for (index, thread) in running.threads {
                match thread.join_until(deadline) {
                    Joined::Finished => {}
                    Joined::Panicked => log::error!("teardown: vCPU {index} thread panicked"),
                    Joined::TimedOut => log::error!(
                        "teardown: vCPU {index} did not leave its loop within {VCPU_JOIN_TIMEOUT:?}; left behind"
                    ),
                }
            }
            for h in &self.handles {
                let counts: Vec<String> = h
                    .stats
                    .snapshot()
                    .into_iter()
                    .filter(|(_, v)| *v != 0)
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect();
                log::info!("vCPU {} exits: {}", h.index, counts.join(", "));
            }
            if let RunningLoop::Own(events) = running.events {
                if let Err(e) = events.stop_and_join(EVENT_LOOP_JOIN_TIMEOUT) {
                    log::error!("teardown: {e}");
                }
            }
            // No one can reach the VM any more: its control and vsock sockets go.
            self.socket = None;
            self.vsock_socket = None;
            self.finish_console();
            drop(running.raw_mode);
        } else {
            self.finish_console();
        }
    }

    fn finish_console(&mut self) {
        let Some(out) = self.console_out.take() else {
            return;
        };
        let r = out.finish(CONSOLE_DRAIN_TIMEOUT);
        if r.dropped > 0 {
            let why = match (&r.broken, r.timed_out) {
                (Some(e), _) => format!("output failed: {e}"),
                (None, true) => {
                    format!("output not read within {CONSOLE_DRAIN_TIMEOUT:?} of the stop")
                }
                (None, false) => "output not read fast enough".to_owned(),
            };
            log::warn!(
                "console: {} bytes of guest output were dropped ({why})",
                r.dropped
            );
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.running.is_some() {
            self.stop.request(VmOutcome::Stopped);
        }
        self.teardown();
    }
}

/// Terminating signals become an orderly stop.
pub struct SignalWatch(SignalEvents);

impl SignalWatch {
    /// Installs the handlers of the terminating signals.
    pub fn install() -> Result<Self, crate::signals::Error> {
        Ok(Self(SignalEvents::install()?))
    }
}

impl EventHandler for SignalWatch {
    fn name(&self) -> &str {
        "signals"
    }
    fn init(&mut self, ops: &mut Ops<'_>) -> Result<(), event_loop::Error> {
        ops.add(self.0.eventfd(), 0, EventSet::IN)
    }
    fn handle(&mut self, _: u32, _: EventSet, ops: &mut Ops<'_>) {
        if let Some(sig) = self.0.take() {
            ops.stop_vm(VmOutcome::Signal(sig));
        }
    }
}

/// Boots `cfg` on Ferrite's stdin/stdout and runs it to completion. `Ok` carries how
/// the guest ended (which may itself be a vCPU error); `Err` means the VM could not
/// be set up.
pub fn run(cfg: &VmConfig) -> Result<VmOutcome, Error> {
    let io = ConsoleIo::stdio().map_err(|source| Error::Console {
        what: "output (stdout duplicate)",
        source,
    })?;
    crate::memory::usage::use_one_heap();
    // Routed before anything that needs tearing down exists (the vsock socket is bound
    // while the devices are built): a SIGTERM during the build is held in the signal
    // eventfd, which the loop reads once it runs, and the VM is torn down in order
    // instead of the process dying by the default action with the socket left behind.
    SignalEvents::install()?;
    let mut vm = Vm::new(cfg, io)?;
    vm.start()?;
    // What setting up used and freed stays resident unless handed back: most of a tiny
    // VM's private memory (see bench/uss.py).
    crate::memory::usage::release_free_heap();
    crate::memory::usage::release_unused_stack();
    crate::seccomp::enter(crate::seccomp::ThreadKind::Main);
    Ok(vm.wait())
}

/// A reset or triple fault right after the console showed a kernel panic is the
/// panic's doing (`panic=-1` reboots): report the panic instead.
fn report_panic(outcome: VmOutcome, panic_line: &PanicLine) -> VmOutcome {
    let line = panic_line.lock().unwrap_or_else(|p| p.into_inner()).take();
    match (outcome, line) {
        (VmOutcome::Reset | VmOutcome::TripleFault { .. } | VmOutcome::GuestPanic, Some(line)) => {
            log::error!("guest: {line}");
            VmOutcome::GuestPanic
        }
        (o, _) => o,
    }
}
