//! vCPU threads: one per vCPU, each a small state machine around KVM_RUN.
//!
//! ```text
//! Running --HLT (no in-kernel irqchip)--> Halted --stop--> Stopped
//! Running --stop request / terminal exit / error-----------> Stopped
//! ```

pub mod exit;
pub mod kick;
pub mod stats;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_run, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::bus::Buses;
use crate::memory::GuestMemory;
use crate::outcome::{StopSignal, VmOutcome};
use exit::{handle_exit, Action, Exit};
use kick::KickTarget;
use stats::ExitStats;

/// Everything a vCPU thread shares with the rest of the VM.
#[derive(Clone)]
pub struct VmShared {
    pub buses: Buses,
    pub stop: Arc<StopSignal>,
    pub mem: GuestMemory,
    /// vCPUs parked in HLT with nothing able to wake them.
    pub halted: Arc<AtomicUsize>,
    pub nr_vcpus: usize,
}

/// One vCPU, moved onto its own thread.
pub struct Vcpu {
    index: usize,
    fd: VcpuFd,
    shared: VmShared,
    stats: Arc<ExitStats>,
    kick: Arc<KickTarget>,
}

/// What the owner of a vCPU thread keeps: how to kick it and what it counted.
#[derive(Clone)]
pub struct VcpuHandle {
    pub index: usize,
    pub stats: Arc<ExitStats>,
    kick: Arc<KickTarget>,
}

impl VcpuHandle {
    /// Forces the vCPU back to its loop, where it sees any stop request.
    pub fn kick(&self) {
        self.kick.kick();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Halted,
    Stopped,
}

impl Vcpu {
    pub fn new(index: usize, fd: VcpuFd, shared: VmShared) -> (Self, VcpuHandle) {
        let stats = Arc::new(ExitStats::default());
        let kick = Arc::new(KickTarget::new());
        let handle = VcpuHandle {
            index,
            stats: stats.clone(),
            kick: kick.clone(),
        };
        (
            Self {
                index,
                fd,
                shared,
                stats,
                kick,
            },
            handle,
        )
    }

    /// The thread body: runs until the VM stops.
    pub fn run(mut self) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        let kick = self.kick.clone();
        let _registered = kick.register(run_ptr);
        let mut state = State::Running;
        while state != State::Stopped {
            state = match state {
                State::Running => self.run_until_interrupted(run_ptr),
                State::Halted => self.wait_while_halted(),
                State::Stopped => State::Stopped,
            };
        }
        log::debug!("vCPU {} exits: {:?}", self.index, self.stats.snapshot());
    }

    fn wait_while_halted(&self) -> State {
        let halted = self.shared.halted.fetch_add(1, Ordering::AcqRel) + 1;
        if halted == self.shared.nr_vcpus {
            self.shared.stop.request(VmOutcome::AllHalted);
        }
        while !self.shared.stop.is_stopping() {
            std::thread::park();
        }
        State::Stopped
    }

    fn run_until_interrupted(&mut self, run_ptr: *mut kvm_run) -> State {
        loop {
            if self.shared.stop.is_stopping() {
                return State::Stopped;
            }
            let action = match self.fd.run() {
                Ok(kvm_exit) => {
                    let exit = decode(kvm_exit, run_ptr);
                    handle_exit(exit, &self.shared.buses, &self.stats, self.index)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // SAFETY: run_ptr is this thread's own live kvm_run mapping.
                    unsafe { kick::immediate_exit(run_ptr) }.store(0, Ordering::Release);
                    handle_exit(
                        Exit::Interrupted,
                        &self.shared.buses,
                        &self.stats,
                        self.index,
                    )
                }
                Err(e) => Action::Stop(VmOutcome::Error(format!(
                    "vCPU {}: KVM_RUN failed: {e}",
                    self.index
                ))),
            };
            match action {
                Action::Continue | Action::CheckCommands => {}
                Action::Halt => return State::Halted,
                Action::Stop(outcome) => {
                    self.shared.stop.request(outcome);
                    return State::Stopped;
                }
                Action::ReportInternalError => {
                    let report = self.internal_error_report();
                    self.shared.stop.request(VmOutcome::Error(report));
                    return State::Stopped;
                }
            }
        }
    }

    /// Describes a KVM_EXIT_INTERNAL_ERROR: suberror, RIP and instruction bytes.
    fn internal_error_report(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: exit_reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
        // union member; it is plain data.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let data = &internal.data[..ndata];
        let what = match internal.suberror {
            KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
            2 => "exception while delivering an exception",
            3 => "exit during event delivery",
            4 => "unexpected exit reason",
            _ => "unknown suberror",
        };
        let mut msg = format!(
            "vCPU {}: KVM_EXIT_INTERNAL_ERROR suberror {} ({what})",
            self.index, internal.suberror
        );
        let regs = self.fd.get_regs().ok();
        let sregs = self.fd.get_sregs().ok();
        if let (Some(r), Some(s)) = (regs, sregs) {
            msg += &format!(
                " at rip {:#x} (cs {:#x} base {:#x})",
                r.rip, s.cs.selector, s.cs.base
            );
        }
        let mut bytes: Vec<u8> = Vec::new();
        if internal.suberror == KVM_INTERNAL_ERROR_EMULATION
            && data.len() >= 2
            && data[0] & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
        {
            // struct emulation_failure: data[0] = flags, then a byte of insn_size
            // followed by 15 instruction bytes.
            let raw: Vec<u8> = data[1..].iter().flat_map(|w| w.to_le_bytes()).collect();
            let len = usize::from(raw[0]).min(15).min(raw.len() - 1);
            bytes = raw[1..=len].to_vec();
        } else if let (Some(r), Some(s)) = (regs, sregs) {
            // Older kernels give no bytes: translate the linear RIP and read guest memory.
            let linear = s.cs.base.wrapping_add(r.rip);
            if let Ok(t) = self.fd.translate_gva(linear) {
                if t.valid != 0 {
                    let mut buf = [0u8; 15];
                    if self
                        .shared
                        .mem
                        .read_slice(&mut buf, GuestAddress(t.physical_address))
                        .is_ok()
                    {
                        bytes = buf.to_vec();
                    }
                }
            }
        }
        if bytes.is_empty() {
            msg += ", instruction bytes unavailable";
        } else {
            let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
            msg += &format!(", instruction bytes: {}", hex.join(" "));
        }
        if !data.is_empty() {
            msg += &format!(", data {data:x?}");
        }
        msg
    }
}

/// Turns kvm-ioctls' view of an exit into Ferrite's [`Exit`].
fn decode(exit: VcpuExit<'_>, run_ptr: *mut kvm_run) -> Exit<'_> {
    // kvm-ioctls hands port I/O data as one slice of size*count bytes; the item size
    // that splits `rep ins/outs` lives in kvm_run.io.
    let io_size = || {
        // SAFETY: called only for KVM_EXIT_IO, when `io` is the active union member of
        // this thread's live kvm_run; the read does not overlap the data slice.
        usize::from(unsafe { (*run_ptr).__bindgen_anon_1.io.size })
    };
    match exit {
        VcpuExit::IoIn(port, data) => Exit::IoIn {
            port,
            size: io_size(),
            data,
        },
        VcpuExit::IoOut(port, data) => Exit::IoOut {
            port,
            size: io_size(),
            data,
        },
        VcpuExit::MmioRead(addr, data) => Exit::MmioRead { addr, data },
        VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite { addr, data },
        VcpuExit::Hlt => Exit::Hlt,
        VcpuExit::Shutdown => Exit::Shutdown,
        VcpuExit::SystemEvent(kind, data) => Exit::SystemEvent { kind, data },
        VcpuExit::InternalError => Exit::InternalError,
        VcpuExit::FailEntry(reason, cpu) => Exit::FailEntry { reason, cpu },
        VcpuExit::Intr => Exit::Interrupted,
        other => Exit::Unhandled(format!("{other:?}")),
    }
}
