//! Building a VM from a configuration, running it, and tearing it down in order.
//!
//! Boot steps (docs/DESIGN.md has the full list and why the order matters):
//! 1. the image's header checked: bad input fails before KVM is touched;
//! 2. /dev/kvm opened, VM created, vCPU count checked against KVM's limit;
//! 3. guest RAM mapped, image and initrd loaded, RAM registered as memory slots, *then*
//!    (Linux) the in-kernel irqchip, PIT, TSS and identity-map addresses: registering
//!    RAM after the irqchip exists, or RAM populated before the VM was created, was
//!    measured 30-100x slower;
//! 4. boot data: page tables and GDT; for Linux also ACPI tables, zero page, cmdline;
//! 5. devices on the PIO bus, the UART's interrupt as an irqfd;
//! 6. vCPUs: CPUID, MSRs, FPU, LAPIC, registers;
//! 7. console (raw mode), signals and the event loop started;
//! 8. vCPU threads spawned; main waits for the first stop request, then kicks and
//!    joins every vCPU, stops and joins the event loop, restores the terminal.

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm};
use std::time::Instant;

use crate::arch::x86_64::regs::{self, EntryMode};
use crate::arch::x86_64::{acpi, cpu, cpuid, layout, linux, mptable, pvh};
use crate::bus::{self, Buses};
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::boot_timer::{BootTimer, BOOT_TIMER_LEN, BOOT_TIMER_PORT};
use crate::devices::cmos::{Cmos, CMOS_BASE, CMOS_LEN};
use crate::devices::console_watch::{ConsoleWatch, PanicLine};
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_LEN, DEBUG_EXIT_PORT};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{Serial, SerialActivity, StdoutWriter, COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::devices::EventFdTrigger;
use crate::event_loop::{self, ConsoleInput, EventLoop};
use crate::outcome::{StopSignal, VmOutcome};
use crate::vcpu::{kick, Vcpu, VcpuHandle, VmShared};
use crate::{loader, memory, signals, terminal};

/// Default kernel command line for Linux images.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// What to run.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `None` means [`DEFAULT_CMDLINE`].
    pub cmdline: Option<String>,
    pub mem_size: u64,
    pub vcpus: usize,
    pub kvm_device: PathBuf,
    /// CPUID features hidden from the guest.
    pub hidden_features: Vec<cpuid::Feature>,
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
    #[error(transparent)]
    Bus(#[from] bus::Error),
    #[error(transparent)]
    Kick(#[from] kick::Error),
    #[error(transparent)]
    Signals(#[from] signals::Error),
    #[error(transparent)]
    EventLoop(#[from] event_loop::Error),
    #[error(transparent)]
    Terminal(#[from] terminal::Error),
}

fn open_kvm(path: &std::path::Path) -> Result<Kvm, Error> {
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

/// Boots `cfg` and runs it to completion. `Ok` carries how the guest ended (which may
/// itself be a vCPU error); `Err` means the VM could not be set up.
pub fn run(cfg: &VmConfig) -> Result<VmOutcome, Error> {
    let start = Instant::now();
    // Step 1: check the image's header (bad input fails before KVM is touched).
    loader::probe(&cfg.kernel)?;

    // Step 2: KVM and limits. The VM exists before guest RAM is mapped and written:
    // measured here, registering RAM that was populated before KVM_CREATE_VM took
    // ~1 ms instead of ~0.03 ms.
    let kvm = open_kvm(&cfg.kvm_device)?;
    let max = kvm.get_max_vcpus();
    if cfg.vcpus == 0 || cfg.vcpus > max {
        return Err(Error::TooManyVcpus {
            requested: cfg.vcpus,
            max,
        });
    }
    let vm = kvm.create_vm().map_err(Error::CreateVm)?;

    // Step 3: memory, image, initrd; memory slots, then the irqchip (registration is
    // much slower after it exists).
    let mem = memory::create(cfg.mem_size)?;
    let image = loader::load(&cfg.kernel, &mem)?;
    log::debug!(
        "loaded {:?} image, entry {:?}, end {:#x}",
        image.format,
        image.entry,
        image.end
    );
    let linux_header = match &image.linux {
        Some(h) => Some(h.as_ref()),
        None if cfg.initrd.is_some() || cfg.cmdline.is_some() => {
            return Err(Error::NotLinux(cfg.kernel.clone()))
        }
        None => None,
    };
    let initrd = match (&cfg.initrd, linux_header) {
        (Some(path), Some(hdr)) => Some(linux::load_initrd(path, &mem, image.end, hdr)?),
        _ => None,
    };
    memory::register(&vm, &mem)?;
    let irqchip = image.is_linux();
    if irqchip {
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
    }

    // Step 4: boot data.
    if let EntryMode::Long { .. } | EntryMode::Pvh { .. } = image.entry {
        regs::write_long_mode_tables(&mem)?;
    }
    if let Some(header) = linux_header {
        let rsdp = acpi::write_tables(&mem, cfg.vcpus)?;
        mptable::write(&mem, cfg.vcpus)?;
        let cmdline = cfg.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE);
        let setup = linux::BootSetup {
            header,
            cmdline,
            initrd,
            mem_size: cfg.mem_size,
            rsdp: Some(rsdp),
        };
        let pvh = matches!(image.entry, EntryMode::Pvh { .. });
        linux::write_boot_params(&mem, &setup, !pvh)?;
        if pvh {
            pvh::write(&mem, initrd, cfg.mem_size, rsdp)?;
        }
    }

    // Step 5: devices.
    let stop = Arc::new(StopSignal::new());
    let panic_line = PanicLine::default();
    let activity = SerialActivity::new().map_err(|source| Error::Device {
        what: "serial",
        source,
    })?;
    let irq = EventFdTrigger::new().map_err(|source| Error::Device {
        what: "serial irq",
        source,
    })?;
    if irqchip {
        vm.register_irqfd(&irq.0, COM1_IRQ)
            .map_err(|source| Error::Irqchip {
                what: "serial irqfd",
                source,
            })?;
    }
    let out = ConsoleWatch::new(StdoutWriter, panic_line.clone());
    let serial = Arc::new(Mutex::new(Serial::new(
        irq,
        activity.clone(),
        Box::new(out),
    )));
    let mut buses = Buses::default();
    buses
        .pio
        .insert("serial", COM1_BASE, COM1_LEN, serial.clone())?;
    buses.pio.insert(
        "i8042",
        I8042_BASE,
        I8042_LEN,
        Arc::new(Mutex::new(I8042::new(stop.clone()))),
    )?;
    buses.pio.insert(
        "cmos",
        CMOS_BASE,
        CMOS_LEN,
        Arc::new(Mutex::new(Cmos::new())),
    )?;
    buses.pio.insert(
        "debug-exit",
        DEBUG_EXIT_PORT,
        DEBUG_EXIT_LEN,
        Arc::new(Mutex::new(DebugExit::new(stop.clone()))),
    )?;
    buses.pio.insert(
        "boot-timer",
        BOOT_TIMER_PORT,
        BOOT_TIMER_LEN,
        Arc::new(Mutex::new(BootTimer::new(start))),
    )?;
    if image.is_linux() {
        let pm = AcpiPm::new(stop.clone(), acpi::S5_SLP_TYP);
        buses.pio.insert(
            "acpi-pm",
            u64::from(acpi::PM1A_EVT_PORT),
            acpi::PM_PORTS_LEN,
            Arc::new(Mutex::new(pm)),
        )?;
    }

    // Step 6: vCPUs.
    // Bare images run on the minimal machine: KVM's default CPUID and MSRs. Reading
    // KVM's supported CPUID alone costs ~0.35 ms here, a fifth of an empty run.
    let supported = if image.is_linux() {
        Some(
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .map_err(|e| Error::Cpuid(cpuid::Error::Supported(e)))?,
        )
    } else {
        None
    };
    let caps = cpuid::VmCaps {
        tsc_deadline: irqchip && kvm.check_extension(Cap::TscDeadlineTimer),
    };
    let shared = VmShared {
        buses,
        stop: stop.clone(),
        mem: mem.clone(),
        halted: Arc::new(AtomicUsize::new(0)),
        nr_vcpus: cfg.vcpus,
    };
    let mut vcpus = Vec::with_capacity(cfg.vcpus);
    for index in 0..cfg.vcpus {
        let fd = vm
            .create_vcpu(index as u64)
            .map_err(|source| Error::CreateVcpu { index, source })?;
        if let Some(supported) = &supported {
            cpuid::apply(&fd, supported, index, cfg.vcpus, caps, &cfg.hidden_features)?;
            cpu::setup(&fd, index, irqchip)?;
        }
        // Linux application processors wait for INIT/SIPI from the boot CPU; every vCPU
        // of a bare image starts at the entry point.
        if index == 0 || !image.is_linux() {
            regs::apply(&fd, index, image.entry)?;
        }
        vcpus.push(Vcpu::new(index, fd, shared.clone()));
    }
    // Step 7: console, signals, event loop.
    kick::install_handler()?;
    let raw_guard = terminal::enter_raw_mode()?;
    let mut event_loop = EventLoop::new(stop.clone())?;
    event_loop.set_signals(signals::SignalEvents::install()?)?;
    let drained = activity
        .drained
        .try_clone()
        .map_err(|source| Error::Device {
            what: "serial drain eventfd",
            source,
        })?;
    event_loop.set_console(ConsoleInput::new(serial, drained)?)?;
    let events = event_loop.spawn()?;

    // Step 8: vCPU threads.
    let mut running: Vec<(VcpuHandle, JoinHandle<()>)> = Vec::with_capacity(cfg.vcpus);
    for (vcpu, handle) in vcpus {
        let vcpu_stop = stop.clone();
        let index = handle.index;
        let spawned = std::thread::Builder::new()
            .name(format!("ferrite-vcpu-{index}"))
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vcpu.run()));
                if result.is_err() {
                    vcpu_stop.request(VmOutcome::Error(format!("vCPU {index} thread panicked")));
                }
            });
        match spawned {
            Ok(join) => running.push((handle, join)),
            Err(e) => {
                stop.request(VmOutcome::Error(format!(
                    "cannot spawn vCPU {index} thread: {e}"
                )));
                break;
            }
        }
    }

    let outcome = stop.wait();

    // Teardown: every vCPU out of KVM_RUN and joined, then the event loop, then the tty.
    for (handle, _) in &running {
        handle.kick();
    }
    for (handle, join) in running {
        if join.join().is_err() {
            log::error!("vCPU {} thread panicked during teardown", handle.index);
        }
        let counts: Vec<String> = handle
            .stats
            .snapshot()
            .into_iter()
            .filter(|(_, v)| *v != 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        log::info!("vCPU {} exits: {}", handle.index, counts.join(", "));
    }
    if let Err(e) = events.stop_and_join() {
        log::error!("event loop teardown: {e}");
    }
    drop(raw_guard);
    let lost = activity.lost_out.load(std::sync::atomic::Ordering::Relaxed);
    if lost > 0 {
        log::warn!("serial: {lost} output bytes could not be written to stdout");
    }
    Ok(report_panic(outcome, &panic_line))
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
