//! The build stages of a [`super::Vm`], in the order they must run (docs/DESIGN.md,
//! "Boot steps", says why): create the VM, load images, irqchip, devices (legacy, then
//! virtio), boot data (the command line names the virtio devices), vCPUs. Each stage is a function of what the earlier ones produced.
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::machine::Machine;
use super::{ConsoleKind, Error, VmConfig, DEFAULT_CMDLINE, DEFAULT_CMDLINE_VIRTIO_CONSOLE};
use crate::arch::x86_64::regs::{self, EntryMode};
use crate::arch::x86_64::{acpi, cpu, cpuid, layout, linux, mptable, pvh};
use crate::bus::Buses;
use crate::console::input::ConsoleSink;
use crate::console::output::OutputQueue;
use crate::console::watch::{ConsoleWatch, PanicLine};
use crate::devices::acpi_pm::{AcpiPm, SciResample};
use crate::devices::boot_timer::{BootTimer, BOOT_TIMER_LEN, BOOT_TIMER_PORT};
use crate::devices::cmos::{Cmos, CMOS_BASE, CMOS_LEN};
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_LEN, DEBUG_EXIT_PORT};
use crate::devices::i8042::{AUX_IRQ, I8042, I8042_BASE, I8042_LEN, KBD_IRQ};
use crate::devices::serial::{Serial, SerialActivity, COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::devices::virtio::balloon::{Balloon, BalloonConfig, BalloonHandle};
use crate::devices::virtio::block::{Block, DiskConfig, DiskHandle};
use crate::devices::virtio::console::VirtioConsole;
use crate::devices::virtio::mmio::{self, Activation, MmioTransport, MMIO_WINDOW};
use crate::devices::virtio::net::{Net, NetConfig};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockConfig};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::devices::EventFdTrigger;
use crate::event_loop::{HandlerId, LoopHandle};
use crate::loader::{self, LoadedImage};
use crate::memory::{self, GuestMemory};
use crate::outcome::StopSignal;
use crate::vcpu::{Vcpu, VcpuHandle, VmShared};

/// Stage 1: the disks checked for one given twice, /dev/kvm opened (API version
/// checked), vCPU count checked, VM created —
/// before guest RAM is mapped: registering RAM populated before KVM_CREATE_VM was
/// measured ~1 ms instead of ~0.03 ms.
pub fn create_vm(cfg: &VmConfig) -> Result<(Kvm, VmFd), Error> {
    // Bad input that needs no KVM fails before anything is created.
    crate::devices::virtio::block::check_distinct(&cfg.disks)?;
    let kvm = open_kvm(&cfg.kvm_device)?;
    let max = kvm.get_max_vcpus();
    if cfg.vcpus == 0 || cfg.vcpus > max {
        return Err(Error::TooManyVcpus {
            requested: cfg.vcpus,
            max,
        });
    }
    let vm = kvm.create_vm().map_err(Error::CreateVm)?;
    Ok((kvm, vm))
}

fn open_kvm(path: &Path) -> Result<Kvm, Error> {
    let err = |source| Error::OpenKvm {
        path: path.into(),
        source,
    };
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| err(kvm_ioctls::Error::new(libc::EINVAL)))?;
    let kvm = Kvm::new_with_path(&cpath).map_err(err)?;
    match kvm.get_api_version() {
        12 => Ok(kvm),
        v => Err(Error::NotKvm {
            path: path.into(),
            api: v,
        }),
    }
}

/// What stage 2 loaded.
pub struct Loaded {
    pub mem: GuestMemory,
    /// Keeps a memfd or backing file (and its lock) for the VM's life; a backing file
    /// this run created is removed if the start fails (see [`memory::RamFile`]).
    pub mem_file: Option<memory::RamFile>,
    pub image: LoadedImage,
    pub machine: Machine,
    pub initrd: Option<linux::Initrd>,
    /// Guest RAM came from a snapshot: no image was loaded and the vCPUs' entry
    /// registers are not set (the snapshot's vCPU state replaces them).
    pub restored: bool,
}

/// Stage 2: guest RAM mapped, the image and initrd loaded, RAM registered as memory
/// slots (before the irqchip exists: registration after it was measured 30-100x
/// slower).
pub fn load_images(cfg: &VmConfig, vm: &VmFd) -> Result<Loaded, Error> {
    let memory::Ram {
        mem,
        file: mem_file,
        ..
    } = memory::create_ram(&cfg.memory, &layout::ram_ranges(cfg.memory.size))?;
    let image = loader::load(&cfg.kernel, &mem)?;
    log::debug!(
        "loaded {:?} image, entry {:?}, end {:#x}",
        image.format,
        image.entry,
        image.end
    );
    let machine = Machine::of(&image);
    let initrd = match (&machine, &cfg.initrd) {
        (Machine::Pc(boot), Some(path)) => Some(linux::load_initrd(
            path,
            &mem,
            image.end,
            boot.setup_header(),
        )?),
        (Machine::Bare, _) if cfg.initrd.is_some() || cfg.cmdline.is_some() => {
            return Err(Error::NotLinux(cfg.kernel.clone()))
        }
        _ => None,
    };
    let (max, machine_name) = match machine {
        Machine::Bare => (
            layout::BARE_MAX_VCPUS,
            "bare images (test programs; one stack each below 0x80000)",
        ),
        Machine::Pc(_) => (
            layout::PC_MAX_VCPUS,
            "Linux guests (xAPIC IDs in the ACPI and MP tables)",
        ),
    };
    if cfg.vcpus > max {
        return Err(Error::TooManyVcpusForMachine {
            requested: cfg.vcpus,
            max,
            machine: machine_name,
        });
    }
    memory::register(vm, &mem)?;
    Ok(Loaded {
        mem,
        mem_file,
        image,
        machine,
        initrd,
        restored: false,
    })
}

/// Stage 2 of a restore: guest RAM mapped from the snapshot's memory file (`cfg.memory`
/// says [`memory::Backing::Snapshot`]) at the snapshot's `ranges`, registered as
/// memory slots. Nothing is loaded; the machine is a PC (only those are snapshotted).
pub fn restore_memory(cfg: &VmConfig, vm: &VmFd, ranges: &[(u64, u64)]) -> Result<Loaded, Error> {
    let memory::Ram {
        mem,
        file: mem_file,
        ..
    } = memory::create_ram(&cfg.memory, ranges)?;
    memory::register(vm, &mem)?;
    let kernel = crate::loader::LinuxKernel::Vmlinux;
    Ok(Loaded {
        mem,
        mem_file,
        image: LoadedImage {
            format: crate::loader::ImageFormat::Elf64,
            entry: EntryMode::Long { rip: 0 },
            end: 0,
            linux: Some(kernel),
        },
        machine: Machine::Pc(kernel),
        initrd: None,
        restored: true,
    })
}

/// Stage 3 (PC machine): identity-map and TSS addresses, in-kernel irqchip and PIT.
pub fn create_irqchip(vm: &VmFd, machine: &Machine) -> Result<(), Error> {
    if !machine.has_irqchip() {
        return Ok(());
    }
    let e = |what| move |source| Error::Irqchip { what, source };
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(e("identity map"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(e("TSS"))?;
    vm.create_irq_chip().map_err(e("irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(e("PIT"))?;
    Ok(())
}

/// Stage 6: GDT and page tables for long-mode entries; for Linux also ACPI tables, MP
/// table, command line (with the virtio devices announced) and zero page (or PVH
/// start info).
pub fn write_boot_data(
    cfg: &VmConfig,
    loaded: &Loaded,
    virtio: &VirtioAnnouncements,
) -> Result<(), Error> {
    let mem = &loaded.mem;
    if let EntryMode::Long { .. } | EntryMode::Pvh { .. } = loaded.image.entry {
        regs::write_long_mode_tables(mem)?;
    }
    let Machine::Pc(boot) = loaded.machine else {
        return Ok(());
    };
    let rsdp = acpi::write_tables(mem, cfg.vcpus, virtio)?;
    mptable::write(mem, cfg.vcpus)?;
    let default = match cfg.console {
        ConsoleKind::Serial => DEFAULT_CMDLINE,
        ConsoleKind::Virtio => DEFAULT_CMDLINE_VIRTIO_CONSOLE,
    };
    let cmdline = kernel_cmdline(cfg.cmdline.as_deref().unwrap_or(default), virtio)?;
    let setup = linux::BootSetup {
        header: boot.setup_header(),
        cmdline: &cmdline,
        initrd: loaded.initrd,
        mem_size: cfg.memory.size,
        rsdp: Some(rsdp),
    };
    let pvh = matches!(loaded.image.entry, EntryMode::Pvh { .. });
    linux::write_boot_params(mem, &setup, !pvh)?;
    if pvh {
        pvh::write(mem, loaded.initrd, cfg.memory.size, rsdp)?;
    }
    Ok(())
}

/// The command line with `virtio_mmio.device=` entries for the virtio devices.
fn kernel_cmdline(base: &str, virtio: &VirtioAnnouncements) -> Result<String, Error> {
    if virtio.is_empty() {
        return Ok(base.to_owned());
    }
    let err = |e: linux_loader::cmdline::Error| Error::Cmdline(e.to_string());
    let mut cl = Cmdline::new(layout::CMDLINE_MAX).map_err(err)?;
    cl.insert_str(base).map_err(err)?;
    for &(addr, gsi) in virtio {
        cl.add_virtio_mmio_device(MMIO_WINDOW, GuestAddress(addr), gsi, None)
            .map_err(err)?;
    }
    let c = cl.as_cstring().map_err(err)?;
    c.into_string()
        .map_err(|e| Error::Cmdline(format!("not UTF-8: {e}")))
}

/// What stage 5 built.
pub struct Devices {
    pub buses: Buses,
    pub serial: Arc<Mutex<Serial>>,
    pub serial_activity: Arc<SerialActivity>,
    pub panic_line: PanicLine,
    /// The console output queue (the UART writes to it; so does a virtio console).
    pub console_out: OutputQueue,
    /// The keyboard controller (the graceful stop types Ctrl-Alt-Del into it).
    pub i8042: Arc<Mutex<I8042>>,
    /// ACPI PM registers (`Pc`): the graceful stop presses their power button.
    pub acpi_pm: Option<Arc<Mutex<AcpiPm>>>,
    /// Re-asserts the SCI at the guest's EOI (an event-loop handler, `Pc`).
    pub sci_resample: Option<SciResample>,
    /// The CMOS (its state goes into a snapshot).
    pub cmos: Arc<Mutex<Cmos>>,
}

/// The devices whose state a snapshot holds (`snapshot::devices`), kept by the VM.
#[derive(Clone)]
pub struct DeviceHandles {
    pub serial: Arc<Mutex<Serial>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub cmos: Arc<Mutex<Cmos>>,
    pub acpi_pm: Option<Arc<Mutex<AcpiPm>>>,
    /// Every virtio-mmio transport, in MMIO address order.
    pub virtio: Vec<Arc<Mutex<MmioTransport>>>,
}

impl DeviceHandles {
    pub fn of(devices: &Devices, virtio: &VirtioDevices) -> Self {
        Self {
            serial: devices.serial.clone(),
            i8042: devices.i8042.clone(),
            cmos: devices.cmos.clone(),
            acpi_pm: devices.acpi_pm.clone(),
            virtio: virtio.transports.clone(),
        }
    }
}

/// Stage 5: devices on the PIO bus; the UART's interrupt as an irqfd on the PC.
pub fn add_devices(
    cfg: &VmConfig,
    vm: &VmFd,
    machine: &Machine,
    stop: &Arc<StopSignal>,
    console_out: OutputQueue,
    started: Instant,
) -> Result<Devices, Error> {
    let dev_err = |what| move |source| Error::Device { what, source };
    let panic_line = PanicLine::default();
    let activity = SerialActivity::new().map_err(dev_err("serial"))?;
    let irq = EventFdTrigger::new().map_err(dev_err("serial irq"))?;
    if machine.has_irqchip() {
        vm.register_irqfd(&irq.0, COM1_IRQ)
            .map_err(|source| Error::Irqchip {
                what: "serial irqfd",
                source,
            })?;
    }
    let out = ConsoleWatch::new(console_out.clone(), panic_line.clone());
    let serial = Arc::new(Mutex::new(Serial::new(
        irq,
        activity.clone(),
        Box::new(out),
    )));
    let mut buses = Buses::default();
    buses
        .pio
        .insert("serial", COM1_BASE, COM1_LEN, serial.clone())?;
    let irqfd = |what: &'static str, gsi: u32| -> Result<EventFdTrigger, Error> {
        let t = EventFdTrigger::new().map_err(dev_err(what))?;
        if machine.has_irqchip() {
            vm.register_irqfd(&t.0, gsi)
                .map_err(|source| Error::Irqchip { what, source })?;
        }
        Ok(t)
    };
    let i8042 = Arc::new(Mutex::new(I8042::new(
        irqfd("i8042 keyboard irqfd", KBD_IRQ)?,
        irqfd("i8042 aux irqfd", AUX_IRQ)?,
        stop.clone(),
    )));
    buses
        .pio
        .insert("i8042", I8042_BASE, I8042_LEN, i8042.clone())?;
    let cmos = Arc::new(Mutex::new(Cmos::new()));
    buses
        .pio
        .insert("cmos", CMOS_BASE, CMOS_LEN, cmos.clone())?;
    if cfg.debug_exit {
        buses.pio.insert(
            "debug-exit",
            DEBUG_EXIT_PORT,
            DEBUG_EXIT_LEN,
            Arc::new(Mutex::new(DebugExit::new(stop.clone()))),
        )?;
    }
    buses.pio.insert(
        "boot-timer",
        BOOT_TIMER_PORT,
        BOOT_TIMER_LEN,
        Arc::new(Mutex::new(
            BootTimer::new(started).with_hook(cfg.extras.on_userspace.clone()),
        )),
    )?;
    for (name, base, len, dev) in &cfg.extras.mmio {
        buses.mmio.insert(name, *base, *len, dev.clone())?;
    }
    let (mut acpi_pm, mut sci_resample) = (None, None);
    if machine.is_pc() {
        // The SCI is level-triggered: an irqfd with a resample eventfd (see
        // devices::acpi_pm for why not KVM_IRQ_LINE).
        let sci = EventFdTrigger::new().map_err(dev_err("SCI irqfd"))?;
        let resample = EventFd::new(libc::EFD_NONBLOCK).map_err(dev_err("SCI resample"))?;
        vm.register_irqfd_with_resample(&sci.0, &resample, u32::from(acpi::SCI_IRQ))
            .map_err(|source| Error::Irqchip {
                what: "SCI irqfd (with resample)",
                source,
            })?;
        let pm = Arc::new(Mutex::new(AcpiPm::new(
            stop.clone(),
            acpi::S5_SLP_TYP,
            Some(sci),
        )));
        buses.pio.insert(
            "acpi-pm",
            u64::from(acpi::PM1A_EVT_PORT),
            acpi::PM_PORTS_LEN,
            pm.clone(),
        )?;
        sci_resample = Some(SciResample::new(resample, pm.clone()));
        acpi_pm = Some(pm);
    }
    Ok(Devices {
        buses,
        serial,
        serial_activity: activity,
        panic_line,
        console_out,
        i8042,
        acpi_pm,
        sci_resample,
        cmos,
    })
}

/// A virtio device to create, with what it is.
pub enum VirtioSpec<'a> {
    Block(usize, &'a DiskConfig),
    Net(usize, &'a NetConfig),
    Rng,
    Console,
    Balloon(&'a BalloonConfig),
    Vsock(&'a VsockConfig),
}

/// What the virtio stage adds to the command line: `(MMIO base, GSI)` per device.
pub type VirtioAnnouncements = Vec<(u64, u32)>;

/// What the virtio stage built.
#[derive(Default)]
pub struct VirtioDevices {
    pub announced: VirtioAnnouncements,
    /// The virtio console's input side and its "room again" eventfd.
    pub console: Option<(Arc<Mutex<dyn ConsoleSink>>, EventFd)>,
    /// "virtio-blk vda @0xd0000000" and so on, for the control API.
    pub names: Vec<String>,
    /// The balloon, for the control API.
    pub balloon: Option<BalloonHandle>,
    /// The disks in `--disk` order (vda, vdb, ...), for the control API (swap the
    /// image, change the rate limit).
    pub disks: Vec<DiskHandle>,
    /// The vsock device's socket file, which the VM removes at teardown.
    pub vsock_socket: Option<crate::control::paths::SocketFile>,
    /// The transports, in MMIO address order (for snapshots).
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
}

/// Stage 5b (PC machine): virtio-mmio devices, each with its register window on the
/// MMIO bus, an irqfd for its GSI and an ioeventfd per queue (datamatch = queue index).
pub fn add_virtio_devices(
    cfg: &VmConfig,
    vm: &VmFd,
    machine: &Machine,
    mem: &GuestMemory,
    devices: &mut Devices,
    loop_handle: &LoopHandle,
) -> Result<VirtioDevices, Error> {
    let mut specs = Vec::new();
    // Disks first: the guest names them vda, vdb, ... in this order.
    for (i, disk) in cfg.disks.iter().enumerate() {
        specs.push(VirtioSpec::Block(i, disk));
    }
    for (i, net) in cfg.nets.iter().enumerate() {
        specs.push(VirtioSpec::Net(i, net));
    }
    if cfg.console == ConsoleKind::Virtio {
        specs.push(VirtioSpec::Console);
    }
    if cfg.rng {
        specs.push(VirtioSpec::Rng);
    }
    if let Some(b) = &cfg.balloon {
        specs.push(VirtioSpec::Balloon(b));
    }
    if let Some(v) = &cfg.vsock {
        specs.push(VirtioSpec::Vsock(v));
    }
    let mut built = VirtioDevices::default();
    if specs.is_empty() {
        return Ok(built);
    }
    if !machine.is_pc() {
        return Err(Error::VirtioNeedsLinux(cfg.kernel.clone()));
    }
    if specs.len() > layout::VIRTIO_MAX_DEVICES {
        return Err(Error::TooManyVirtioDevices {
            requested: specs.len(),
            max: layout::VIRTIO_MAX_DEVICES,
        });
    }
    for (i, spec) in specs.into_iter().enumerate() {
        let base = layout::VIRTIO_MMIO_BASE + i as u64 * MMIO_WINDOW;
        let gsi = layout::VIRTIO_IRQS[i % layout::VIRTIO_IRQS.len()];
        let dev_err = |what: &'static str| move |source| Error::Device { what, source };
        let mut disk = None;
        let mut detail = String::new();
        let device: Arc<Mutex<dyn VirtioDevice>> = match spec {
            VirtioSpec::Rng => Arc::new(Mutex::new(Rng::new())),
            VirtioSpec::Balloon(b) => {
                let dev = Arc::new(Mutex::new(Balloon::new(b, memory::ram_size(mem))?));
                built.balloon = Some(BalloonHandle(dev.clone()));
                dev
            }
            VirtioSpec::Block(index, cfg) => {
                let block = Block::new(index, cfg)?;
                disk = Some(block.handle());
                Arc::new(Mutex::new(block))
            }
            VirtioSpec::Net(index, net) => {
                let mut dev = Net::new(index, net)?;
                // Only the interfaces named for the MMDS get a responder: the others'
                // TX path has nothing to look at.
                if let Some(m) = cfg.extras.mmds.as_ref().filter(|m| m.nets.contains(&index)) {
                    dev.set_mmds(crate::mmds::stack::Responder::new(m.mmds.clone(), m.ipv4));
                    detail = format!(" mmds {}", m.ipv4);
                }
                Arc::new(Mutex::new(dev))
            }
            VirtioSpec::Vsock(v) => {
                let prebuilt = cfg
                    .extras
                    .vsock
                    .as_ref()
                    .and_then(|p| p.lock().unwrap_or_else(|p| p.into_inner()).take());
                let dev = match prebuilt {
                    Some(dev) => dev,
                    None => Vsock::new(v)?,
                };
                built.vsock_socket = crate::control::paths::SocketFile::hold_bound(&v.uds);
                detail = format!(" uds {}", v.uds.display());
                Arc::new(Mutex::new(dev))
            }
            VirtioSpec::Console => {
                let drained =
                    EventFd::new(libc::EFD_NONBLOCK).map_err(dev_err("virtio-console eventfd"))?;
                let watcher = drained
                    .try_clone()
                    .map_err(dev_err("virtio-console eventfd"))?;
                let out =
                    ConsoleWatch::new(devices.console_out.clone(), devices.panic_line.clone());
                let dev = Arc::new(Mutex::new(VirtioConsole::new(Box::new(out), drained)));
                built.console = Some((dev.clone(), watcher));
                dev
            }
        };
        let (name, queues) = {
            let d = device.lock().unwrap_or_else(|p| p.into_inner());
            (d.name().to_owned(), d.queue_max_sizes().len())
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(dev_err("virtio irq eventfd"))?;
        vm.register_irqfd(&irq, gsi)
            .map_err(|source| Error::Irqchip {
                what: "virtio irqfd",
                source,
            })?;
        let mut notifiers = Vec::with_capacity(queues);
        for q in 0..queues {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(dev_err("virtio queue eventfd"))?;
            vm.register_ioevent(
                &evt,
                &IoEventAddress::Mmio(base + mmio::QUEUE_NOTIFY),
                q as u32,
            )
            .map_err(|source| Error::Irqchip {
                what: "virtio queue ioeventfd",
                source,
            })?;
            notifiers.push(evt);
        }
        let interrupt = Arc::new(Interrupt::new(irq));
        if let Some(disk) = disk {
            // A swap before the driver is there still moves the config generation.
            disk.connect_interrupt(interrupt.clone());
            built.disks.push(disk);
        }
        let transport = MmioTransport::new(
            device,
            mem.clone(),
            interrupt,
            notifiers,
            activator(loop_handle.clone(), name.clone()),
        );
        let transport = Arc::new(Mutex::new(transport));
        devices
            .buses
            .mmio
            .insert("virtio-mmio", base, MMIO_WINDOW, transport.clone())?;
        built.transports.push(transport);
        log::debug!("{name}: MMIO {base:#x}, GSI {gsi}");
        built
            .names
            .push(format!("{name}{detail} @{base:#x} irq {gsi}"));
        built.announced.push((base, gsi));
    }
    Ok(built)
}

/// Hands a device's activation and reset to the event loop, from the vCPU thread that
/// saw the status write.
fn activator(loop_handle: LoopHandle, name: String) -> mmio::Activator {
    let id: Arc<Mutex<Option<HandlerId>>> = Arc::new(Mutex::new(None));
    Box::new(move |activation| {
        let id = id.clone();
        let name = name.clone();
        let sent = match activation {
            Activation::Activated(handler) => {
                loop_handle.call(move |ctx| match ctx.add_handler(Box::new(handler)) {
                    Ok(h) => {
                        log::debug!("{name}: active, its queues watched by the event loop");
                        *id.lock().unwrap_or_else(|p| p.into_inner()) = Some(h)
                    }
                    Err(e) => log::error!("{name}: cannot watch its queues: {e}"),
                })
            }
            Activation::Reset => loop_handle.call(move |ctx| {
                if let Some(h) = id.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    ctx.remove_handler(h);
                }
            }),
        };
        if let Err(e) = sent {
            log::error!("virtio: cannot reach the event loop: {e}");
        }
    })
}

/// Stage 6: vCPUs with CPUID, MSRs, FPU, LAPIC and entry registers.
///
/// The bare machine keeps KVM's default CPUID unless `--cpu-features` hides something:
/// reading KVM's supported CPUID alone costs ~0.35 ms here, a fifth of an empty run.
pub fn create_vcpus(
    cfg: &VmConfig,
    kvm: &Kvm,
    vm: &VmFd,
    loaded: &Loaded,
    shared: &VmShared,
) -> Result<(Vec<Vcpu>, Vec<VcpuHandle>), Error> {
    let machine = loaded.machine;
    let supported = if machine.is_pc() || !cfg.hidden_features.is_empty() {
        Some(
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .map_err(|e| Error::Cpuid(cpuid::Error::Supported(e)))?,
        )
    } else {
        None
    };
    let has_cap = |cap: u32| kvm.check_extension_raw(libc::c_ulong::from(cap)) > 0;
    let caps = cpuid::VmCaps {
        tsc_deadline: machine.has_irqchip() && kvm.check_extension(Cap::TscDeadlineTimer),
        // kvm-ioctls' `Cap` has no entry for these two.
        async_pf: machine.has_irqchip() && has_cap(kvm_bindings::KVM_CAP_ASYNC_PF_INT),
    };
    let enforce_pv = has_cap(kvm_bindings::KVM_CAP_ENFORCE_PV_FEATURE_CPUID);
    log::debug!(
        "async page faults offered: {}; PV features enforced: {enforce_pv}",
        caps.async_pf && !cfg.hidden_features.iter().any(|f| f.name == "async-pf")
    );
    let run_len = kvm.get_vcpu_mmap_size().map_err(Error::MmapSize)?;
    let mut vcpus = Vec::with_capacity(cfg.vcpus);
    let mut handles = Vec::with_capacity(cfg.vcpus);
    for index in 0..cfg.vcpus {
        let fd = vm
            .create_vcpu(index as u64)
            .map_err(|source| Error::CreateVcpu { index, source })?;
        let given = match &supported {
            Some(supported) => {
                cpuid::apply(&fd, supported, index, cfg.vcpus, caps, &cfg.hidden_features)?
            }
            None => Vec::new(),
        };
        // Also for a bare image on KVM's default CPUID (no PV leaves): it is offered no
        // PV feature, so it may use none.
        if enforce_pv {
            cpuid::enforce_pv_features(&fd, index)?;
        }
        if machine.is_pc() {
            cpu::setup(&fd, index, machine.has_irqchip())?;
        }
        // Linux application processors wait for INIT/SIPI from the boot CPU; every vCPU
        // of a bare image starts at the entry point.
        if (index == 0 || !machine.is_pc()) && !loaded.restored {
            regs::apply(&fd, index, loaded.image.entry)?;
        }
        let (mut vcpu, handle) = Vcpu::new(index, fd, shared.clone(), run_len)?;
        vcpu.set_given_cpuid(given);
        vcpus.push(vcpu);
        handles.push(handle);
    }
    Ok((vcpus, handles))
}

/// What the vCPU threads share.
pub fn vcpu_shared(
    cfg: &VmConfig,
    loaded: &Loaded,
    buses: Buses,
    stop: &Arc<StopSignal>,
) -> VmShared {
    VmShared {
        buses,
        stop: stop.clone(),
        mem: loaded.mem.clone(),
        halted: Arc::new(AtomicUsize::new(0)),
        nr_vcpus: cfg.vcpus,
        kvmclock_ctrl: loaded.machine.is_pc(),
        // The halt watch of a `Pc` machine reads two of them each second.
        kvm_stats: cfg.control.is_some() || loaded.machine.is_pc(),
    }
}
