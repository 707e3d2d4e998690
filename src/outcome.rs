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
    /// The guest halted for good with the HLT handled inside KVM (`Pc` machine): every
    /// vCPU halted with interrupts disabled and nothing pending, as Linux leaves them
    /// after "System halted" (see `vcpu::halt`).
    GuestHalted,
    /// The guest wrote `code` to the debug-exit port (`--debug-exit`).
    DebugExit(u8),
    /// Stopped from outside the guest (an API call, or the embedding program).
    Stopped,
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
    /// Exit status of the `ferrite` process for this outcome. The ranges never overlap:
    ///
    /// | status | meaning |
    /// |---|---|
    /// | 0 | orderly stop: reset, power-off, all vCPUs halted (guest halted), Ctrl-A x, stop request |
    /// | 1 | Ferrite could not set the VM up, or a vCPU failed (KVM error, internal error) |
    /// | 2 | bad command line (clap) |
    /// | 3 | the guest kernel panicked |
    /// | 4 | a vCPU triple-faulted |
    /// | 32 + v | the guest wrote v (0..=95) to the debug-exit port (`--debug-exit` only) |
    /// | 128 + n | Ferrite was stopped by signal n |
    ///
    /// A debug-exit value above [`DEBUG_EXIT_MAX`] is reported as an error (status 1).
    pub fn exit_status(&self) -> i32 {
        match self {
            VmOutcome::Reset
            | VmOutcome::PowerOff
            | VmOutcome::AllHalted
            | VmOutcome::GuestHalted
            | VmOutcome::UserQuit
            | VmOutcome::Stopped => 0,
            VmOutcome::DebugExit(v) if *v <= DEBUG_EXIT_MAX => DEBUG_EXIT_BASE + i32::from(*v),
            VmOutcome::DebugExit(_) | VmOutcome::Error(_) => 1,
            VmOutcome::GuestPanic => 3,
            VmOutcome::TripleFault { .. } => 4,
            VmOutcome::Signal(n) => 128 + n,
        }
    }
}

/// Exit status of a debug-exit write of 0.
pub const DEBUG_EXIT_BASE: i32 = 32;
/// Largest debug-exit value with a status of its own (32 + 95 = 127, below the signal range).
pub const DEBUG_EXIT_MAX: u8 = 95;

impl fmt::Display for VmOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmOutcome::Reset => write!(f, "guest requested reset"),
            VmOutcome::PowerOff => write!(f, "guest powered off"),
            VmOutcome::AllHalted => write!(f, "all vCPUs halted"),
            VmOutcome::GuestHalted => write!(
                f,
                "guest halted (every vCPU stopped with interrupts disabled)"
            ),
            VmOutcome::DebugExit(v) if *v <= DEBUG_EXIT_MAX => {
                write!(f, "guest wrote {v:#x} to the debug-exit port")
            }
            VmOutcome::DebugExit(v) => write!(
                f,
                "guest wrote {v:#x} to the debug-exit port, above the largest value with an exit status of its own ({DEBUG_EXIT_MAX:#x})"
            ),
            VmOutcome::Stopped => write!(f, "stop requested"),
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
    /// Set by [`StopSignal::poke`]: the waiter has work besides stopping.
    poked: AtomicBool,
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

    /// Wakes [`Self::wait_or_poked`] without a stop (the main thread has a job).
    pub fn poke(&self) {
        let _slot = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        self.poked.store(true, Ordering::Release);
        self.cond.notify_all();
    }

    /// Blocks until a stop was requested (`Some`) or [`Self::poke`] was called since
    /// the last return of `None`.
    pub fn wait_or_poked(&self) -> Option<VmOutcome> {
        let mut slot = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(o) = slot.as_ref() {
                return Some(o.clone());
            }
            if self.poked.swap(false, Ordering::AcqRel) {
                return None;
            }
            slot = self.cond.wait(slot).unwrap_or_else(|p| p.into_inner());
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
    fn poke_wakes_the_waiter_without_a_stop() {
        let s = std::sync::Arc::new(StopSignal::new());
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait_or_poked());
        s.poke();
        assert_eq!(t.join().unwrap(), None);
        assert!(!s.is_stopping());
        s.request(VmOutcome::Reset);
        assert_eq!(s.wait_or_poked(), Some(VmOutcome::Reset));
    }

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
        assert_eq!(VmOutcome::DebugExit(0x21).exit_status(), 32 + 0x21);
        assert_eq!(VmOutcome::DebugExit(0).exit_status(), 32);
        assert_eq!(VmOutcome::DebugExit(95).exit_status(), 127);
        assert_eq!(VmOutcome::DebugExit(96).exit_status(), 1);
        assert_eq!(VmOutcome::DebugExit(0xff).exit_status(), 1);
        assert_eq!(VmOutcome::Reset.exit_status(), 0);
        assert_eq!(VmOutcome::Stopped.exit_status(), 0);
        assert_eq!(VmOutcome::GuestHalted.exit_status(), 0);
        assert_eq!(VmOutcome::GuestPanic.exit_status(), 3);
        assert_eq!(VmOutcome::TripleFault { vcpu: 0 }.exit_status(), 4);
        assert_eq!(VmOutcome::Error("x".into()).exit_status(), 1);
        assert_eq!(VmOutcome::Signal(15).exit_status(), 143);
        // No debug-exit value lands on one of Ferrite's own statuses.
        for v in 0..=u8::MAX {
            let s = VmOutcome::DebugExit(v).exit_status();
            assert!(s == 1 || (32..128).contains(&s), "{v}: {s}");
        }
    }
}
