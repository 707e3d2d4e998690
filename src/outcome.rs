//! How a VM ends, and the one place that records it.
//!
//! Any thread (a vCPU, a device, the event loop) may ask the VM to stop by calling
//! [`StopSignal::request`]; the first request wins and later ones are ignored. The main
//! thread waits on it and then tears everything down in order.
#![forbid(unsafe_code)]

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest asked for a reset (i8042 0xFE, or KVM_SYSTEM_EVENT_RESET).
    Reset,
    /// The guest powered off (KVM_SYSTEM_EVENT_SHUTDOWN, ACPI sleep).
    PowerOff,
    /// Every vCPU executed HLT with nobody left to wake it.
    AllHalted,
    /// The guest wrote `code` to the debug-exit port.
    DebugExit(u8),
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: usize },
    /// The guest reported a crash (KVM_SYSTEM_EVENT_CRASH, or a kernel panic message).
    GuestPanic,
    /// The person at the console typed the quit sequence.
    UserQuit,
    /// Ferrite received a terminating signal.
    Signal(i32),
    /// A vCPU or Ferrite itself failed; the string says what and where.
    Error(String),
}

impl VmOutcome {
    /// Exit status of the `ferrite` process for this outcome.
    ///
    /// 0: orderly guest stop (reset, power-off, all halted, user quit);
    /// `(v << 1) | 1`: the guest wrote `v` to the debug-exit port (as QEMU's isa-debug-exit);
    /// 1: Ferrite or vCPU error; 2: triple fault; 3: guest panic; 128+n: signal n.
    pub fn exit_status(&self) -> i32 {
        match self {
            VmOutcome::Reset | VmOutcome::PowerOff | VmOutcome::AllHalted | VmOutcome::UserQuit => {
                0
            }
            VmOutcome::DebugExit(v) => (i32::from(*v) << 1) | 1,
            VmOutcome::Error(_) => 1,
            VmOutcome::TripleFault { .. } => 2,
            VmOutcome::GuestPanic => 3,
            VmOutcome::Signal(n) => 128 + n,
        }
    }
}

impl fmt::Display for VmOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmOutcome::Reset => write!(f, "guest requested reset"),
            VmOutcome::PowerOff => write!(f, "guest powered off"),
            VmOutcome::AllHalted => write!(f, "all vCPUs halted"),
            VmOutcome::DebugExit(v) => write!(f, "guest wrote {v:#x} to the debug-exit port"),
            VmOutcome::TripleFault { vcpu } => {
                write!(f, "vCPU {vcpu} triple-faulted (KVM_EXIT_SHUTDOWN)")
            }
            VmOutcome::GuestPanic => write!(f, "guest kernel panicked"),
            VmOutcome::UserQuit => write!(f, "quit requested from the console (Ctrl-A x)"),
            VmOutcome::Signal(n) => write!(f, "terminated by signal {n}"),
            VmOutcome::Error(e) => write!(f, "{e}"),
        }
    }
}

/// The VM-wide stop request: first writer wins, the main thread waits for it.
#[derive(Debug, Default)]
pub struct StopSignal {
    stopping: AtomicBool,
    outcome: Mutex<Option<VmOutcome>>,
    cond: Condvar,
}

impl StopSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `outcome` unless an earlier request already did; wakes the waiter.
    pub fn request(&self, outcome: VmOutcome) {
        let mut slot = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            log::debug!("stop requested: {outcome}");
            *slot = Some(outcome);
            self.stopping.store(true, Ordering::Release);
            self.cond.notify_all();
        }
    }

    /// Cheap check for the vCPU exit path.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Blocks until some thread requested a stop and returns why.
    pub fn wait(&self) -> VmOutcome {
        let mut slot = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(o) = slot.as_ref() {
                return o.clone();
            }
            slot = self.cond.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The outcome if a stop was requested.
    pub fn outcome(&self) -> Option<VmOutcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins() {
        let s = StopSignal::new();
        assert!(!s.is_stopping());
        s.request(VmOutcome::DebugExit(3));
        s.request(VmOutcome::Reset);
        assert!(s.is_stopping());
        assert_eq!(s.wait(), VmOutcome::DebugExit(3));
    }

    #[test]
    fn exit_status_mapping() {
        assert_eq!(VmOutcome::DebugExit(0x21).exit_status(), 0x43);
        assert_eq!(VmOutcome::DebugExit(0).exit_status(), 1);
        assert_eq!(VmOutcome::DebugExit(0xff).exit_status(), 511);
        assert_eq!(VmOutcome::Reset.exit_status(), 0);
        assert_eq!(VmOutcome::TripleFault { vcpu: 0 }.exit_status(), 2);
        assert_eq!(VmOutcome::Error("x".into()).exit_status(), 1);
    }
}
