//! Graceful stop: ask the guest to shut itself down, and stop it hard if it has not
//! within a timeout.
//!
//! The guest is asked the way a person at the machine would: the ACPI power button
//! when the guest enabled its event (an ACPI OS with a button driver listens),
//! Ctrl-Alt-Del on the i8042 keyboard otherwise (Linux without ACPI, or before its
//! button driver loads; its VT keyboard handler reboots or signals init). The timeout
//! is a `timerfd` watched by the event loop ([`Deadline`]); when it fires with the VM
//! still running, the VM ends as a hard stop does ([`VmOutcome::Stopped`]). The guest's
//! own power-off or reboot ends it as always. [`GracefulStop::report`] logs which of
//! the two happened once the VM has stopped.
#![forbid(unsafe_code)]

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::devices::acpi_pm::AcpiPm;
use crate::devices::i8042::I8042;
use crate::event_loop::{self, EventHandler, LoopHandle, Ops};
use crate::outcome::{StopSignal, VmOutcome};

/// The default time a guest gets to shut down (a Linux distribution's shutdown takes
/// a few seconds on hardware; guest kernels here run far slower).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest timeout accepted.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the VM is already stopping")]
    Stopping,
    #[error("graceful stop timeout {0:?} is outside 1 ms ..= 24 h")]
    Timeout(Duration),
    #[error("cannot arm the graceful stop timer")]
    Timer(#[source] vmm_sys_util::errno::Error),
    #[error("cannot reach the event loop for the graceful stop timer")]
    Loop(#[source] event_loop::Error),
}

/// How the guest was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// The ACPI fixed power button (PM1 PWRBTN_STS, SCI).
    PowerButton,
    /// Ctrl-Alt-Del typed on the i8042 keyboard.
    CtrlAltDel,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::PowerButton => "acpi-power-button",
            Method::CtrlAltDel => "ctrl-alt-del",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a graceful stop request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requested {
    pub method: Method,
    pub timeout: Duration,
    /// Ctrl-Alt-Del only: false when the keyboard took no keys (its driver turned
    /// scanning off, or it is full); the timeout still applies.
    pub delivered: bool,
}

/// The devices a graceful stop presses.
#[derive(Clone)]
pub struct GuestButtons {
    pub i8042: Arc<Mutex<I8042>>,
    pub acpi_pm: Option<Arc<Mutex<AcpiPm>>>,
}

/// The VM's graceful-stop state (one per VM, shared by the API and the `Vm`).
pub struct GracefulStop {
    buttons: GuestButtons,
    stop: Arc<StopSignal>,
    /// The first request: when, and how.
    first: Mutex<Option<(Instant, Method)>>,
    timed_out: AtomicBool,
}

/// "30 s", "0.5 s", "3.1 s".
pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if d.subsec_millis() == 0 {
        format!("{s:.0} s")
    } else if s < 1.0 {
        format!("{}", (s * 1000.0).round() / 1000.0) + " s"
    } else {
        format!("{s:.1} s")
    }
}

impl GracefulStop {
    pub fn new(buttons: GuestButtons, stop: Arc<StopSignal>) -> Arc<Self> {
        Arc::new(Self {
            buttons,
            stop,
            first: Mutex::new(None),
            timed_out: AtomicBool::new(false),
        })
    }

    /// Types Ctrl-Alt-Del into the guest's keyboard and nothing else (Firecracker's
    /// `SendCtrlAltDel`: no deadline). False when the keyboard took no keys.
    pub fn ctrl_alt_del(&self) -> bool {
        self.buttons
            .i8042
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .inject_ctrl_alt_del()
    }

    /// Asks the guest to shut down and arms a hard stop `timeout` from now on the
    /// event loop behind `events`. A repeated request asks again; the earliest
    /// deadline wins. Call on a running (not paused) VM: a paused guest cannot react.
    pub fn request(
        self: &Arc<Self>,
        timeout: Duration,
        events: &LoopHandle,
    ) -> Result<Requested, Error> {
        if timeout.is_zero() || timeout > MAX_TIMEOUT {
            return Err(Error::Timeout(timeout));
        }
        if self.stop.is_stopping() {
            return Err(Error::Stopping);
        }
        let mut timer = TimerFd::new().map_err(Error::Timer)?;
        timer.reset(timeout, None).map_err(Error::Timer)?;
        let (method, delivered) = self.ask_guest();
        self.first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert((Instant::now(), method));
        let this = self.clone();
        events
            .call(move |ctx| {
                let deadline = Deadline {
                    timer,
                    graceful: this,
                    timeout,
                };
                if let Err(e) = ctx.add_handler(Box::new(deadline)) {
                    log::error!("graceful stop: cannot watch the timer: {e}");
                }
            })
            .map_err(Error::Loop)?;
        log::info!(
            "graceful stop requested: {method}{}; hard stop in {}",
            if delivered {
                ""
            } else {
                " (the keyboard took no keys)"
            },
            secs(timeout)
        );
        Ok(Requested {
            method,
            timeout,
            delivered,
        })
    }

    fn ask_guest(&self) -> (Method, bool) {
        if let Some(pm) = &self.buttons.acpi_pm {
            let mut pm = pm.lock().unwrap_or_else(|p| p.into_inner());
            if pm.power_button_armed() {
                pm.press_power_button();
                return (Method::PowerButton, true);
            }
        }
        let delivered = self
            .buttons
            .i8042
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .inject_ctrl_alt_del();
        (Method::CtrlAltDel, delivered)
    }

    /// Logs how a VM that was asked to stop gracefully ended (nothing if it was not
    /// asked). Call once the VM has stopped.
    pub fn report(&self, outcome: &VmOutcome) {
        let Some((at, method)) = *self.first.lock().unwrap_or_else(|p| p.into_inner()) else {
            return;
        };
        if self.timed_out.load(Ordering::Acquire) {
            return; // the deadline said so when it fired
        }
        match outcome {
            VmOutcome::Reset
            | VmOutcome::PowerOff
            | VmOutcome::AllHalted
            | VmOutcome::GuestHalted => log::info!(
                "guest shut down {} after a graceful stop request ({method})",
                secs(at.elapsed())
            ),
            other => log::info!(
                "graceful stop request ({method}) overtaken after {}: {other}",
                secs(at.elapsed())
            ),
        }
    }
}

/// The hard stop after the timeout: a one-shot timerfd on the event loop.
struct Deadline {
    timer: TimerFd,
    graceful: Arc<GracefulStop>,
    timeout: Duration,
}

impl EventHandler for Deadline {
    fn name(&self) -> &str {
        "graceful-stop-timer"
    }

    fn init(&mut self, ops: &mut Ops<'_>) -> Result<(), event_loop::Error> {
        ops.add(&self.timer, 0, EventSet::IN)
    }

    fn handle(&mut self, _: u32, _: EventSet, ops: &mut Ops<'_>) {
        // Readable: the timer expired, so this read does not block.
        let _ = self.timer.wait();
        if !self.graceful.stop.is_stopping() {
            self.graceful.timed_out.store(true, Ordering::Release);
            log::warn!(
                "guest did not stop within {}; hard stop",
                secs(self.timeout)
            );
            ops.stop_vm(VmOutcome::Stopped);
        }
        ops.remove_self();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(secs(Duration::from_secs(30)), "30 s");
        assert_eq!(secs(Duration::from_millis(3140)), "3.1 s");
        assert_eq!(secs(Duration::from_millis(500)), "0.5 s");
        assert_eq!(secs(Duration::from_millis(1)), "0.001 s");
    }

    fn buttons(stop: &Arc<StopSignal>, pm: bool) -> GuestButtons {
        use crate::devices::EventFdTrigger;
        GuestButtons {
            i8042: Arc::new(Mutex::new(I8042::new(
                EventFdTrigger::new().unwrap(),
                EventFdTrigger::new().unwrap(),
                stop.clone(),
            ))),
            acpi_pm: pm.then(|| Arc::new(Mutex::new(AcpiPm::new(stop.clone(), 5, None)))),
        }
    }

    #[test]
    fn power_button_only_when_armed() {
        use crate::bus::BusDevice;
        let stop = Arc::new(StopSignal::new());
        let b = buttons(&stop, true);
        let g = GracefulStop::new(b.clone(), stop.clone());
        assert_eq!(g.ask_guest(), (Method::CtrlAltDel, true));
        let pm = b.acpi_pm.unwrap();
        pm.lock()
            .unwrap()
            .write(2, &crate::devices::acpi_pm::PWRBTN.to_le_bytes());
        assert_eq!(g.ask_guest(), (Method::PowerButton, true));
        let mut sts = [0u8; 2];
        pm.lock().unwrap().read(0, &mut sts);
        assert_eq!(u16::from_le_bytes(sts), crate::devices::acpi_pm::PWRBTN);
        // Without ACPI (tier-A kernels, bare images): the keyboard.
        let g = GracefulStop::new(buttons(&stop, false), stop.clone());
        assert_eq!(g.ask_guest(), (Method::CtrlAltDel, true));
        assert!(!stop.is_stopping());
    }
}
