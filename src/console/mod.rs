//! The serial console on the host side: where guest output goes (without ever
//! blocking a vCPU), where guest input comes from (with the Ctrl-A escape always seen),
//! and the terminal they share.

pub mod input;
pub mod output;
pub mod terminal;
pub mod watch;

use std::io::Write;
use std::os::fd::OwnedFd;

/// Where console input comes from.
pub enum InputSource {
    /// Ferrite's own stdin (raw mode when it is a terminal).
    Stdin,
    /// Any readable fd (a pipe, a socket) — for programs embedding Ferrite, and tests.
    Fd(OwnedFd),
    /// No input.
    None,
}

/// The console's two ends.
pub struct ConsoleIo {
    pub input: InputSource,
    /// Receives guest output, on a thread of its own.
    pub output: Box<dyn Write + Send>,
}

impl ConsoleIo {
    /// Ferrite's stdin and stdout.
    pub fn stdio() -> std::io::Result<Self> {
        Ok(Self {
            input: InputSource::Stdin,
            output: Box::new(output::stdout_file()?),
        })
    }
}
