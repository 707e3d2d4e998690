//! Raw mode for an interactive console, restored on every exit path: normal return
//! (the guard's `Drop`), panics (a panic hook) and terminating signals (they become an
//! orderly stop, see `signals`, so the guard still drops).
//!
//! Written on libc's termios rather than vmm-sys-util's `Terminal`: that trait switches
//! to "canonical mode" on the way out, where a user's terminal must get back exactly
//! the settings it had, which needs the saved `termios`.
#![allow(unsafe_code)]

use std::sync::Mutex;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read terminal attributes of stdin")]
    Get(#[source] std::io::Error),
    #[error("cannot put stdin into raw mode")]
    Set(#[source] std::io::Error),
}

/// True when stdin is a terminal.
pub fn stdin_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor number.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
}

fn restore_saved() {
    let saved = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(t) = saved {
        // SAFETY: `t` is a termios read from this same fd by tcgetattr.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
    }
}

/// Puts the terminal back when dropped.
pub struct RawModeGuard(());

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        restore_saved();
    }
}

/// Switches stdin to raw mode if it is a terminal; `None` when it is not.
pub fn enter_raw_mode() -> Result<Option<RawModeGuard>, Error> {
    if !stdin_is_tty() {
        return Ok(None);
    }
    // SAFETY: termios is plain data; tcgetattr fills it and we check the result.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and a valid pointer to a termios.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
        return Err(Error::Get(std::io::Error::last_os_error()));
    }
    *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
    install_panic_hook();
    let mut raw = t;
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut raw) };
    // SAFETY: valid fd and a termios derived from the current one.
    if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
        let e = std::io::Error::last_os_error();
        restore_saved();
        return Err(Error::Set(e));
    }
    Ok(Some(RawModeGuard(())))
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_saved();
            previous(info);
        }));
    });
}
