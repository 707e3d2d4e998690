//! Commands to a running vCPU: a mailbox the vCPU thread empties between KVM_RUN
//! calls (and while paused), with a reply callback per command.
//!
//! Protocol: the sender pushes `(command, reply)` into the mailbox and kicks the vCPU
//! ([`super::VcpuHandle::send`]). The vCPU thread looks at the mailbox before every
//! KVM_RUN (one atomic load) and after every kick, runs each command on its own thread
//! and calls `reply` exactly once. A reply callback must not block: the event loop's
//! callbacks hand the reply back to the loop through its remote queue, synchronous
//! callers use a channel.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_regs, kvm_sregs};

use super::state::{SavePlan, VcpuState};

/// What a vCPU can be asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Stop running guest code until `Resume` (idempotent).
    Pause,
    /// Run guest code again (idempotent).
    Resume,
    /// Read the general, segment and control registers and the listed MSRs.
    ReadRegisters { msrs: Vec<u32> },
    /// Inject a non-maskable interrupt (KVM_NMI), delivered when the vCPU next runs.
    Nmi,
    /// Say whether the vCPU could ever run again on its own: its KVM run state, its
    /// interrupt flag and pending events (see [`super::halt`]). Changes nothing.
    HaltProbe,
    /// Save the vCPU's KVM state for a snapshot (`Reply::State`). Only while paused: a
    /// running vCPU answers `Reply::Failed`.
    SaveState(Arc<SavePlan>),
    /// Leave the vCPU loop for good.
    Stop,
}

/// Register state read on the vCPU's own thread.
#[derive(Debug, Clone)]
pub struct Registers {
    pub regs: kvm_regs,
    /// Segment and control registers (CR0, CR2, CR3, CR4, CR8, EFER, APIC base).
    pub sregs: kvm_sregs,
    /// `(index, value)` for each requested MSR KVM could read, in request order.
    pub msrs: Vec<(u32, u64)>,
    /// Requested MSRs KVM did not return.
    pub unreadable_msrs: Vec<u32>,
}

/// The answer to one command.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Paused; `already` when it was paused before this command.
    Paused {
        already: bool,
    },
    /// Running again; `already` when it was not paused.
    Resumed {
        already: bool,
    },
    Registers(Box<Registers>),
    /// The NMI is queued.
    NmiQueued,
    HaltProbe(super::halt::HaltProbe),
    /// The vCPU's saved state.
    State(Box<VcpuState>),
    /// The vCPU left its loop.
    Stopped,
    /// The command could not be carried out.
    Failed(String),
}

/// Called once with the vCPU index and the reply, on the vCPU thread (or on the sender's
/// thread when the vCPU is already gone).
pub type ReplyFn = Box<dyn FnOnce(usize, Reply) + Send>;

/// The vCPU's inbox.
#[derive(Default)]
pub struct Mailbox {
    pending: AtomicBool,
    queue: Mutex<VecDeque<(Command, ReplyFn)>>,
    /// Set when the vCPU thread has left its loop: later commands get `Stopped` at once.
    closed: AtomicBool,
}

impl Mailbox {
    /// Queues a command. Returns it with its reply when the vCPU has gone.
    pub fn push(&self, cmd: Command, reply: ReplyFn) -> Result<(), (Command, ReplyFn)> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if self.closed.load(Ordering::Acquire) {
            return Err((cmd, reply));
        }
        q.push_back((cmd, reply));
        self.pending.store(true, Ordering::Release);
        Ok(())
    }

    /// Cheap check for the vCPU loop.
    #[inline]
    pub fn has_mail(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Takes the oldest command.
    pub fn pop(&self) -> Option<(Command, ReplyFn)> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let item = q.pop_front();
        if q.is_empty() {
            self.pending.store(false, Ordering::Release);
        }
        item
    }

    /// Marks the vCPU gone and answers whatever is still queued with `Stopped`.
    pub fn close(&self, index: usize) {
        let drained: Vec<_> = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            self.closed.store(true, Ordering::Release);
            self.pending.store(false, Ordering::Release);
            q.drain(..).collect()
        };
        for (_, reply) in drained {
            reply(index, Reply::Stopped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn chan() -> (ReplyFn, mpsc::Receiver<(usize, Reply)>) {
        let (tx, rx) = mpsc::channel();
        (
            Box::new(move |i, r| {
                let _ = tx.send((i, r));
            }),
            rx,
        )
    }

    #[test]
    fn fifo_and_pending_flag() {
        let m = Mailbox::default();
        assert!(!m.has_mail());
        let (r1, _) = chan();
        let (r2, _) = chan();
        assert!(m.push(Command::Pause, r1).is_ok());
        assert!(m.push(Command::Resume, r2).is_ok());
        assert!(m.has_mail());
        assert_eq!(m.pop().map(|(c, _)| c), Some(Command::Pause));
        assert!(m.has_mail());
        assert_eq!(m.pop().map(|(c, _)| c), Some(Command::Resume));
        assert!(!m.has_mail());
        assert!(m.pop().is_none());
    }

    #[test]
    fn close_answers_queued_and_refuses_new() {
        let m = Mailbox::default();
        let (r, rx) = chan();
        assert!(m.push(Command::Pause, r).is_ok());
        m.close(3);
        assert!(matches!(rx.try_recv(), Ok((3, Reply::Stopped))));
        let (r, _) = chan();
        assert!(m.push(Command::Resume, r).is_err());
        assert!(!m.has_mail());
    }
}
