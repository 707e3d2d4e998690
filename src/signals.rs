//! What Ferrite does with signals that would otherwise kill it mid-way.
//!
//! * Signals whose default action ends the process (SIGINT, SIGTERM, SIGHUP, SIGQUIT,
//!   SIGUSR1, SIGUSR2, SIGALRM, ..., and the real-time signals above the vCPU kick
//!   signal) become an orderly VM stop: the handler only records the signal and writes
//!   to an eventfd that the event loop watches, so the normal teardown runs (threads
//!   joined, terminal restored) and the exit status is 128 + the signal number.
//! * Fault signals (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTRAP, SIGSYS) cannot be
//!   turned into an orderly stop: their handler runs the hook its installer gave (the
//!   console's async-signal-safe terminal restore), restores the default action and re-raises, so the
//!   process still dies of the same signal (and dumps core where it would have).
//!
//! The eventfd is created once and never closed: a handler may run at any moment,
//! including while (or after) the event loop is torn down, and must never write to a
//! closed descriptor or one the process has since reused for something else.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SignalHandler, SIGRTMAX, SIGRTMIN};

/// The process-wide eventfd the routed-signal handlers write to; never closed.
static EVENT: OnceLock<EventFd> = OnceLock::new();
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The signals Ferrite has always routed into an orderly stop.
pub const TERMINATING: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Standard (non-real-time) signals whose default action ends the process and that are
/// routed into an orderly stop. SIGPOLL is SIGIO on Linux; SIGPIPE is not here because
/// the Rust runtime ignores it (writes fail with EPIPE instead).
pub const ROUTED_STANDARD: [i32; 14] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGIO,
    libc::SIGPWR,
    libc::SIGSTKFLT,
    libc::SIGXCPU,
    libc::SIGXFSZ,
];

/// Fault signals: the terminal is restored, then the process dies of the signal.
pub const FAULT: [i32; 7] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
    libc::SIGTRAP,
    libc::SIGSYS,
];

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

/// Every signal routed into an orderly stop: [`ROUTED_STANDARD`] and the real-time
/// signals SIGRTMIN+1..=SIGRTMAX. SIGRTMIN itself is the vCPU kick signal
/// (`vcpu::kick`) and is left alone.
pub fn routed_signals() -> Vec<i32> {
    let mut all = ROUTED_STANDARD.to_vec();
    all.extend(SIGRTMIN() + 1..=SIGRTMAX());
    all
}

/// Runs `f` with the calling thread's errno saved and put back afterwards, so a handler
/// never changes the errno seen by the code it interrupted.
fn preserving_errno(f: impl FnOnce()) {
    // SAFETY: __errno_location is async-signal-safe and returns a valid pointer to the
    // calling thread's errno, which only this thread accesses.
    let errno = unsafe { libc::__errno_location() };
    // SAFETY: `errno` points to this thread's errno (see above).
    let saved = unsafe { *errno };
    f();
    // SAFETY: as above.
    unsafe { *errno = saved };
}

extern "C" fn on_routed(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    preserving_errno(|| {
        LAST_SIGNAL.store(num, Ordering::SeqCst);
        // OnceLock::get is a single atomic load: lock-free and async-signal-safe.
        if let Some(evt) = EVENT.get() {
            let one: u64 = 1;
            // SAFETY: write(2) is async-signal-safe; the eventfd lives in a static and is
            // never closed, so the descriptor is valid for the whole process; `one` is a
            // valid 8-byte buffer. A failed write cannot be reported from a handler; the
            // counter only fails when about to overflow, and then a wake-up is pending.
            let _ = unsafe { libc::write(evt.as_raw_fd(), std::ptr::addr_of!(one).cast(), 8) };
        }
    });
}

/// The handlers that were installed for SIGSEGV and SIGBUS before ours (the Rust
/// runtime's stack-overflow reporter), as `sa_sigaction` addresses; 0 for none.
static PREVIOUS_SEGV: AtomicUsize = AtomicUsize::new(0);
static PREVIOUS_BUS: AtomicUsize = AtomicUsize::new(0);

fn previous_slot(signal: i32) -> Option<&'static AtomicUsize> {
    match signal {
        libc::SIGSEGV => Some(&PREVIOUS_SEGV),
        libc::SIGBUS => Some(&PREVIOUS_BUS),
        _ => None,
    }
}

/// What a fault handler runs before the process dies (the terminal's restore), as a
/// `fn()` address; 0 for nothing. Set by [`install_fault_handlers`]' caller, so this
/// module needs nothing from the modules above it.
static FAULT_HOOK: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_fault(num: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let hook = FAULT_HOOK.load(Ordering::SeqCst);
    if hook != 0 {
        // SAFETY: a non-zero FAULT_HOOK was stored from a `fn()` by
        // `install_fault_handlers`, whose contract makes it async-signal-safe.
        let hook: fn() = unsafe { std::mem::transmute::<usize, fn()>(hook) };
        hook();
    }
    if let Some(prev) = previous_slot(num).map(|s| s.load(Ordering::SeqCst)) {
        if prev != 0 {
            // SAFETY: `prev` is the non-null, non-SIG_DFL/SIG_IGN `sa_sigaction` of an
            // SA_SIGINFO handler that sigaction(2) reported for this signal (see
            // `install_fault_handlers`), so it is a function with this signature.
            let previous: SignalHandler = unsafe { std::mem::transmute::<usize, _>(prev) };
            // The Rust runtime's handler reports a stack overflow and aborts; for any
            // other fault it resets the default action and returns.
            previous(num, info, ctx);
        }
    }
    // SAFETY: sigaction(2) and raise(3) are async-signal-safe. A zeroed sigaction is
    // SIG_DFL with an empty mask and no flags. The signal is blocked while this handler
    // runs, so the raised one stays pending and is delivered, with the default action,
    // as soon as the handler returns; a hardware fault would also simply recur.
    unsafe {
        let dfl: libc::sigaction = std::mem::zeroed();
        libc::sigaction(num, &dfl, std::ptr::null_mut());
        libc::raise(num);
    }
}

/// Installs the fault handlers, which call `hook` before the process dies with the
/// signal's default action. `hook` must be async-signal-safe (the console's terminal
/// restore is). Idempotent for the handlers; the latest hook wins. Called when the
/// terminal enters raw mode.
pub fn install_fault_handlers(hook: fn()) -> Result<(), Error> {
    FAULT_HOOK.store(hook as usize, Ordering::SeqCst);
    install_fault_handlers_only()
}

/// The fault handlers without changing the hook (for [`SignalEvents::install`]).
fn install_fault_handlers_only() -> Result<(), Error> {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|p| p.into_inner());
    if *done {
        return Ok(());
    }
    for signal in FAULT {
        // vmm-sys-util's register_signal_handler does not set SA_ONSTACK, which a
        // SIGSEGV from a stack overflow needs (the handler must run on the alternate
        // stack the Rust runtime sets up), so sigaction is called directly here.
        // SAFETY: sigaction is plain data; all-zero is a valid starting value.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_fault as SignalHandler as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: sigfillset only writes the set it is given.
        unsafe { libc::sigfillset(&mut act.sa_mask) };
        // SAFETY: sigaction is plain data; sigaction(2) fills it in.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: valid signal number and pointers to initialised sigaction structs;
        // `on_fault` only makes async-signal-safe calls.
        if unsafe { libc::sigaction(signal, &act, &mut old) } != 0 {
            return Err(Error::Install {
                signal,
                source: vmm_sys_util::errno::Error::last(),
            });
        }
        if let Some(slot) = previous_slot(signal) {
            let chained = old.sa_flags & libc::SA_SIGINFO != 0
                && old.sa_sigaction != libc::SIG_DFL
                && old.sa_sigaction != libc::SIG_IGN
                && old.sa_sigaction != act.sa_sigaction;
            slot.store(if chained { old.sa_sigaction } else { 0 }, Ordering::SeqCst);
        }
    }
    *done = true;
    Ok(())
}

/// A handle on the process-wide eventfd the routed-signal handlers write to.
pub struct SignalEvents {
    evt: &'static EventFd,
}

impl SignalEvents {
    /// Installs the handlers (routed and fault signals) and returns a handle on the
    /// eventfd to watch. Idempotent: every call returns a handle on the same eventfd,
    /// which is created on the first call and lives until the process exits.
    pub fn install() -> Result<Self, Error> {
        static ROUTED: Mutex<bool> = Mutex::new(false);
        let evt = event_fd()?;
        let mut routed = ROUTED.lock().unwrap_or_else(|p| p.into_inner());
        if !*routed {
            for signal in routed_signals() {
                register_signal_handler(signal, on_routed)
                    .map_err(|source| Error::Install { signal, source })?;
            }
            *routed = true;
        }
        drop(routed);
        install_fault_handlers_only()?;
        Ok(Self { evt })
    }

    pub fn eventfd(&self) -> &EventFd {
        self.evt
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

/// The process-wide eventfd, created on first use.
fn event_fd() -> Result<&'static EventFd, Error> {
    if let Some(evt) = EVENT.get() {
        return Ok(evt);
    }
    let fresh = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::EventFd)?;
    // If another thread won the race, `fresh` (never published) is simply dropped.
    Ok(EVENT.get_or_init(|| fresh))
}

/// Ends the process by `sig` with its default action, after an orderly teardown (the
/// Firecracker front door: Firecracker has no SIGTERM or SIGINT handler, so its callers
/// see it die by the signal). Falls back to `exit(128 + sig)` if the signal does not
/// end the process.
pub fn die_by(sig: i32) -> ! {
    // SAFETY: signal(2) with SIG_DFL installs no handler code; raise(2) sends a signal
    // to this thread. Neither touches memory we own; results are not needed (the exit
    // below covers a signal that did not end the process).
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(sig);
    }
    std::process::exit(128 + sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routed_set_covers_realtime_but_not_the_kick_signal() {
        let all = routed_signals();
        assert!(!all.contains(&SIGRTMIN()));
        assert!(all.contains(&(SIGRTMIN() + 1)));
        assert!(all.contains(&SIGRTMAX()));
        for s in TERMINATING {
            assert!(all.contains(&s));
        }
        for s in FAULT {
            assert!(!all.contains(&s));
        }
    }

    #[test]
    fn install_is_idempotent_and_routes_to_one_eventfd() {
        let first = SignalEvents::install().unwrap().eventfd().as_raw_fd();
        let b = SignalEvents::install().unwrap();
        assert_eq!(b.eventfd().as_raw_fd(), first);
        // The first handle is gone; the eventfd is still open and still the target.
        // SAFETY: raise only sends a signal to this thread; its handler is `on_routed`.
        assert_eq!(unsafe { libc::raise(libc::SIGUSR2) }, 0);
        assert_eq!(b.take(), Some(libc::SIGUSR2));
        assert_eq!(b.take(), None);
    }
}
