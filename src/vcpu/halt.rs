//! A guest that has halted for good ends the VM.
//!
//! On a bare machine every HLT comes back to Ferrite (no in-kernel irqchip), and the
//! vCPU loop ends the VM when all vCPUs are parked ([`VmOutcome::AllHalted`]). On a
//! `Pc` machine KVM handles HLT itself (in-kernel LAPIC): a guest that stops every CPU
//! with interrupts disabled (`cli; hlt`, which is what Linux's "System halted" and
//! `poweroff` without a power-off driver do) blocks inside KVM_RUN for ever, and
//! Ferrite would never hear of it. `halt_watch::HaltWatch` finds it (this module holds
//! the pure part: what a vCPU answers and the verdict):
//!
//! 1. Every [`PERIOD`] a timerfd on the event loop fires. If KVM's per-vCPU binary
//!    statistics are at hand, the watch reads two values per vCPU (8-byte `pread`s):
//!    `blocking` and `exits`. If any vCPU is not blocked in KVM (running guest code, or
//!    parked in Ferrite: paused), that is the end of it: no kick, no ioctl.
//! 2. When every vCPU is blocked, each is asked ([`Command::HaltProbe`], through its
//!    mailbox and kick) for its KVM run state (KVM_GET_MP_STATE), RFLAGS.IF and its
//!    pending events (KVM_GET_VCPU_EVENTS). The kick makes KVM_RUN return; the vCPU
//!    answers and goes back into KVM_RUN, still halted. The guest does not see it.
//! 3. [`judge`] (pure, unit-tested) decides: the guest has halted for good when every
//!    vCPU is halted with interrupts disabled and nothing pending that can wake a CPU
//!    whose interrupts are off (NMI, SMI, INIT, an exception or an interrupt already
//!    being delivered), or waits for an INIT/SIPI only another CPU could send, and no
//!    vCPU entered the guest while the answers were gathered (its `exits` count did not
//!    move: the answers are then one consistent picture). A paused vCPU, a halt with
//!    interrupts enabled (an idle guest: a timer will wake it) or a runnable vCPU means
//!    the guest is alive. Without statistics every period probes, and two rounds in a
//!    row must agree.
//! 4. Then the VM ends with [`VmOutcome::GuestHalted`] (exit status 0).
#![forbid(unsafe_code)]

use std::fmt;

use kvm_bindings::{
    kvm_mp_state, kvm_vcpu_events, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_UNINITIALIZED,
};

/// An event that makes a halted vCPU run even with its interrupts disabled, or that
/// is already on its way into the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    Nmi,
    Smi,
    /// An INIT latched while in SMM.
    Init,
    Exception,
    /// An external interrupt being injected.
    Interrupt,
    TripleFault,
}

/// What one vCPU says about itself (its answer to [`Command::HaltProbe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HaltProbe {
    /// Paused by a command: not looked at further.
    pub paused: bool,
    /// KVM's run state (`KVM_MP_STATE_*`).
    pub mp_state: u32,
    /// RFLAGS.IF.
    pub interrupts_enabled: bool,
    pub pending: Option<Pending>,
}

const RFLAGS_IF: u64 = 1 << 9;

impl HaltProbe {
    /// The answer of a paused vCPU (nothing is read).
    pub fn paused() -> Self {
        Self {
            paused: true,
            mp_state: 0,
            interrupts_enabled: false,
            pending: None,
        }
    }

    /// Builds the answer from what KVM returned.
    pub fn from_kvm(mp: &kvm_mp_state, rflags: u64, ev: &kvm_vcpu_events) -> Self {
        let pending = if ev.nmi.pending != 0 || ev.nmi.injected != 0 {
            Some(Pending::Nmi)
        } else if ev.smi.pending != 0 {
            Some(Pending::Smi)
        } else if ev.smi.latched_init != 0 {
            Some(Pending::Init)
        } else if ev.exception.pending != 0 || ev.exception.injected != 0 {
            Some(Pending::Exception)
        } else if ev.interrupt.injected != 0 {
            Some(Pending::Interrupt)
        } else if ev.triple_fault.pending != 0 {
            Some(Pending::TripleFault)
        } else {
            None
        };
        Self {
            paused: false,
            mp_state: mp.mp_state,
            interrupts_enabled: rflags & RFLAGS_IF != 0,
            pending,
        }
    }
}

/// Why the guest is not halted for good (the first reason found).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Live {
    /// A vCPU did not answer with a probe (it stopped, or the probe failed).
    NoAnswer {
        vcpu: usize,
    },
    Paused {
        vcpu: usize,
    },
    /// Runnable (or in a state other than halted / waiting for INIT-SIPI).
    Runnable {
        vcpu: usize,
        mp_state: u32,
    },
    /// Halted with interrupts enabled: an idle guest, woken by its next interrupt.
    Idle {
        vcpu: usize,
    },
    Pending {
        vcpu: usize,
        what: Pending,
    },
    /// Every vCPU waits for an INIT/SIPI and none is halted (not a state a guest
    /// reaches by itself; left alone).
    NoneHalted,
    /// The vCPU entered the guest while the answers were gathered.
    Ran {
        vcpu: usize,
    },
}

impl fmt::Display for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Live::NoAnswer { vcpu } => write!(f, "vCPU {vcpu} gave no state"),
            Live::Paused { vcpu } => write!(f, "vCPU {vcpu} is paused"),
            Live::Runnable { vcpu, mp_state } => {
                write!(f, "vCPU {vcpu} is runnable (mp_state {mp_state})")
            }
            Live::Idle { vcpu } => write!(f, "vCPU {vcpu} is halted with interrupts on"),
            Live::Pending { vcpu, what } => write!(f, "vCPU {vcpu} has a pending {what:?}"),
            Live::NoneHalted => write!(f, "no vCPU is halted"),
            Live::Ran { vcpu } => write!(f, "vCPU {vcpu} ran meanwhile"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing can ever make any vCPU run again.
    HaltedForGood,
    Live(Live),
}

/// Decides from one round of answers (`None`: no probe came back from that vCPU) and,
/// when KVM's statistics are at hand, each vCPU's `exits` count read before the probes
/// were sent and after the last answer came back.
pub fn judge(answers: &[Option<HaltProbe>], exits: Option<(&[u64], &[u64])>) -> Verdict {
    let mut halted = 0;
    for (vcpu, a) in answers.iter().enumerate() {
        let Some(p) = a else {
            return Verdict::Live(Live::NoAnswer { vcpu });
        };
        if p.paused {
            return Verdict::Live(Live::Paused { vcpu });
        }
        match p.mp_state {
            KVM_MP_STATE_HALTED if p.interrupts_enabled => {
                return Verdict::Live(Live::Idle { vcpu })
            }
            KVM_MP_STATE_HALTED => halted += 1,
            // An AP that was never started, or was sent back to wait for a SIPI.
            KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED => {}
            mp_state => return Verdict::Live(Live::Runnable { vcpu, mp_state }),
        }
        if let Some(what) = p.pending {
            return Verdict::Live(Live::Pending { vcpu, what });
        }
    }
    if halted == 0 {
        return Verdict::Live(Live::NoneHalted);
    }
    if let Some((before, after)) = exits {
        for vcpu in 0..answers.len() {
            if before.get(vcpu) != after.get(vcpu) || before.get(vcpu).is_none() {
                return Verdict::Live(Live::Ran { vcpu });
            }
        }
    }
    Verdict::HaltedForGood
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_MP_STATE_RUNNABLE;

    fn halted(interrupts_enabled: bool) -> Option<HaltProbe> {
        Some(HaltProbe {
            paused: false,
            mp_state: KVM_MP_STATE_HALTED,
            interrupts_enabled,
            pending: None,
        })
    }

    fn in_state(mp_state: u32) -> Option<HaltProbe> {
        Some(HaltProbe {
            paused: false,
            mp_state,
            interrupts_enabled: false,
            pending: None,
        })
    }

    #[test]
    fn every_vcpu_halted_with_interrupts_off_is_halted_for_good() {
        assert_eq!(judge(&[halted(false)], None), Verdict::HaltedForGood);
        assert_eq!(
            judge(&[halted(false), halted(false)], Some((&[5, 9], &[5, 9]))),
            Verdict::HaltedForGood
        );
        // APs never started (or back waiting for a SIPI) cannot run by themselves.
        assert_eq!(
            judge(
                &[
                    halted(false),
                    in_state(KVM_MP_STATE_UNINITIALIZED),
                    in_state(KVM_MP_STATE_INIT_RECEIVED)
                ],
                None
            ),
            Verdict::HaltedForGood
        );
    }

    #[test]
    fn an_idle_guest_is_not_halted() {
        // Linux idles with `sti; hlt`: IF is set while the vCPU is halted.
        assert_eq!(
            judge(&[halted(false), halted(true)], None),
            Verdict::Live(Live::Idle { vcpu: 1 })
        );
    }

    #[test]
    fn a_paused_vm_is_not_halted() {
        let paused = Some(HaltProbe::paused());
        assert_eq!(
            judge(&[paused, paused], None),
            Verdict::Live(Live::Paused { vcpu: 0 })
        );
        assert_eq!(
            judge(&[halted(false), paused], None),
            Verdict::Live(Live::Paused { vcpu: 1 })
        );
    }

    #[test]
    fn a_spinning_or_running_vcpu_is_not_halted() {
        assert_eq!(
            judge(&[halted(false), in_state(KVM_MP_STATE_RUNNABLE)], None),
            Verdict::Live(Live::Runnable {
                vcpu: 1,
                mp_state: KVM_MP_STATE_RUNNABLE
            })
        );
    }

    #[test]
    fn a_pending_event_that_wakes_a_cli_hlt_is_not_halted() {
        for what in [
            Pending::Nmi,
            Pending::Smi,
            Pending::Init,
            Pending::Exception,
            Pending::Interrupt,
            Pending::TripleFault,
        ] {
            let mut p = halted(false);
            if let Some(p) = p.as_mut() {
                p.pending = Some(what);
            }
            assert_eq!(
                judge(&[p], None),
                Verdict::Live(Live::Pending { vcpu: 0, what })
            );
        }
    }

    #[test]
    fn a_vcpu_that_ran_while_answers_were_gathered_is_not_halted() {
        assert_eq!(
            judge(&[halted(false), halted(false)], Some((&[5, 9], &[5, 10]))),
            Verdict::Live(Live::Ran { vcpu: 1 })
        );
        // Counts missing for a vCPU: not a consistent picture.
        assert_eq!(
            judge(&[halted(false), halted(false)], Some((&[5], &[5]))),
            Verdict::Live(Live::Ran { vcpu: 1 })
        );
    }

    #[test]
    fn missing_answers_and_all_waiting_for_sipi_are_not_halted() {
        assert_eq!(
            judge(&[halted(false), None], None),
            Verdict::Live(Live::NoAnswer { vcpu: 1 })
        );
        assert_eq!(
            judge(&[in_state(KVM_MP_STATE_INIT_RECEIVED)], None),
            Verdict::Live(Live::NoneHalted)
        );
    }

    #[test]
    fn probe_reads_if_and_pending_events_from_kvm() {
        let mp = kvm_mp_state {
            mp_state: KVM_MP_STATE_HALTED,
        };
        let mut ev = kvm_vcpu_events::default();
        let p = HaltProbe::from_kvm(&mp, 0x2, &ev);
        assert_eq!(p, halted(false).unwrap());
        assert!(HaltProbe::from_kvm(&mp, 0x202, &ev).interrupts_enabled);
        ev.nmi.pending = 1;
        assert_eq!(
            HaltProbe::from_kvm(&mp, 0x2, &ev).pending,
            Some(Pending::Nmi)
        );
        let mut ev = kvm_vcpu_events::default();
        ev.interrupt.injected = 1;
        assert_eq!(
            HaltProbe::from_kvm(&mp, 0x2, &ev).pending,
            Some(Pending::Interrupt)
        );
    }
}
