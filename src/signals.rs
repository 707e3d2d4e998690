//! Terminating signals (SIGINT, SIGTERM, SIGHUP, SIGQUIT) become an orderly VM stop:
//! the handler only writes to an eventfd that the event loop watches, so the normal
//! teardown runs (threads joined, terminal restored) instead of dying mid-way.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::eventfd::EventFd;

static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

pub const TERMINATING: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the signal eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot install a handler for signal {signal}")]
    Install {
        signal: i32,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
}

extern "C" fn on_terminate(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    LAST_SIGNAL.store(num, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `fd` is an eventfd kept open by the
        // `SignalEvents` that published it, and `one` is a valid 8-byte buffer.
        // A failed write cannot be reported from a signal handler; the counter only
        // fails when it is about to overflow, and then a wake-up is already pending.
        let _ = unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// Owns the eventfd the terminating-signal handlers write to.
pub struct SignalEvents {
    evt: EventFd,
}

impl SignalEvents {
    /// Installs the handlers and returns the eventfd to watch.
    pub fn install() -> Result<Self, Error> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        SIGNAL_FD.store(evt.as_raw_fd(), Ordering::SeqCst);
        for signal in TERMINATING {
            vmm_sys_util::signal::register_signal_handler(signal, on_terminate)
                .map_err(|source| Error::Install { signal, source })?;
        }
        Ok(Self { evt })
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Consumes the pending wake-up and names the signal that caused it.
    pub fn take(&self) -> Option<i32> {
        match self.evt.read() {
            Ok(_) => Some(LAST_SIGNAL.load(Ordering::SeqCst)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => {
                log::warn!("reading the signal eventfd failed: {e}");
                None
            }
        }
    }
}

impl Drop for SignalEvents {
    fn drop(&mut self) {
        // Handlers stay installed but no longer write to a closed (or reused) fd.
        SIGNAL_FD.store(-1, Ordering::SeqCst);
    }
}
