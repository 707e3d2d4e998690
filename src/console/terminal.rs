//! Raw mode for an interactive console, restored on every exit path: normal return
//! (the guard's `Drop`), panics (a panic hook), signals that would end the process
//! (they become an orderly stop, see `signals`, so the guard still drops) and fault
//! signals (their handler calls [`restore`] before the process dies).
//!
//! Written on libc's termios rather than vmm-sys-util's `Terminal`: that trait switches
//! to "canonical mode" on the way out, where a user's terminal must get back exactly
//! the settings it had, which needs the saved `termios`.
//!
//! The saved settings are kept where a signal handler can read them without a lock: a
//! pointer to a termios that is never freed (one small allocation per distinct saved
//! setting, in practice one per process), published before raw mode is entered, and a
//! state word that says whether raw mode is active. Whoever flips the state from active
//! to idle restores the terminal, so it happens exactly once.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicPtr, AtomicU8, Ordering};

/// Not in raw mode.
const IDLE: u8 = 0;
/// `enter_raw_mode` is saving the settings; nothing to restore yet.
const ENTERING: u8 = 1;
/// Raw mode may be in effect; `SAVED` holds the settings to restore.
const ACTIVE: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(IDLE);
/// The settings stdin had before raw mode; points to a leaked (never freed) termios.
static SAVED: AtomicPtr<libc::termios> = AtomicPtr::new(std::ptr::null_mut());

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read terminal attributes of stdin")]
    Get(#[source] std::io::Error),
    #[error("cannot put stdin into raw mode")]
    Set(#[source] std::io::Error),
    #[error("cannot install the handlers that restore the terminal on a fatal signal")]
    FaultHandlers(#[source] crate::signals::Error),
}

/// True when stdin is a terminal.
pub fn stdin_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor number.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
}

/// Puts back the settings stdin had before raw mode, if raw mode is active; later
/// calls do nothing. Async-signal-safe (atomics and tcsetattr only), so fault-signal
/// handlers call it.
pub fn restore() {
    if STATE
        .compare_exchange(ACTIVE, IDLE, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return;
    }
    let saved = SAVED.load(Ordering::SeqCst);
    if !saved.is_null() {
        // SAFETY: tcsetattr is async-signal-safe. `saved` was published (before the
        // state became ACTIVE) from a leaked Box that is never freed or written again,
        // and holds a termios read from this same fd by tcgetattr.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
    }
}

fn same_settings(a: &libc::termios, b: &libc::termios) -> bool {
    a.c_iflag == b.c_iflag
        && a.c_oflag == b.c_oflag
        && a.c_cflag == b.c_cflag
        && a.c_lflag == b.c_lflag
        && a.c_line == b.c_line
        && a.c_cc == b.c_cc
        && a.c_ispeed == b.c_ispeed
        && a.c_ospeed == b.c_ospeed
}

/// Makes `t` the published saved settings. A published termios is never freed or
/// modified (a handler may be reading it), so a new one is leaked unless the current
/// one already holds the same settings.
fn publish(t: libc::termios) {
    let current = SAVED.load(Ordering::SeqCst);
    // SAFETY: a non-null `current` points to a leaked, never-modified termios.
    if !current.is_null() && same_settings(unsafe { &*current }, &t) {
        return;
    }
    SAVED.store(Box::into_raw(Box::new(t)), Ordering::SeqCst);
}

/// Puts the terminal back when dropped.
pub struct RawModeGuard(());

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Switches stdin to raw mode if it is a terminal; `None` when it is not, or when raw
/// mode is already active (the existing guard restores the terminal).
pub fn enter_raw_mode() -> Result<Option<RawModeGuard>, Error> {
    if !stdin_is_tty() {
        return Ok(None);
    }
    if STATE
        .compare_exchange(IDLE, ENTERING, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return Ok(None);
    }
    let result = save_and_enter();
    if result.is_err() && STATE.load(Ordering::SeqCst) == ENTERING {
        STATE.store(IDLE, Ordering::SeqCst);
    }
    result.map(|()| Some(RawModeGuard(())))
}

/// The body of `enter_raw_mode`, run with the state at ENTERING.
fn save_and_enter() -> Result<(), Error> {
    crate::signals::install_fault_handlers(restore).map_err(Error::FaultHandlers)?;
    install_panic_hook();
    // SAFETY: termios is plain data; tcgetattr fills it and we check the result.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and a valid pointer to a termios.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
        return Err(Error::Get(std::io::Error::last_os_error()));
    }
    publish(t);
    // From here on every restore path puts `t` back.
    STATE.store(ACTIVE, Ordering::SeqCst);
    let mut raw = t;
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut raw) };
    // SAFETY: valid fd and a termios derived from the current one.
    if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
        let e = std::io::Error::last_os_error();
        restore();
        return Err(Error::Set(e));
    }
    Ok(())
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}
