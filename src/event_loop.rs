//! The event loop: one thread (`ferrite-events`) owning one epoll fd. Every fd user
//! registers a typed [`Token`]; the reserved stop token is checked before anything
//! else in each batch. vCPU threads never touch it.
//!
//! Stop protocol: [`EventLoopHandle::stop_and_join`] writes the stop eventfd; the loop
//! returns as soon as it sees it and the handle joins the thread.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::serial::Serial;
use crate::outcome::{StopSignal, VmOutcome};
use crate::signals::SignalEvents;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the event loop's {what}")]
    Create {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot register {token:?} (fd {fd}) with epoll")]
    Register {
        token: Token,
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot spawn the ferrite-events thread")]
    Spawn(#[source] std::io::Error),
    #[error("cannot signal the event loop to stop")]
    SignalStop(#[source] std::io::Error),
    #[error("the ferrite-events thread panicked")]
    Panicked,
}

/// What an epoll event is about. Encoded in the event's 64-bit data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// Reserved: stop the loop.
    Stop,
    /// Terminating signal arrived (SIGINT/SIGTERM/...).
    Signal,
    /// Bytes on Ferrite's stdin for the serial console.
    Stdin,
    /// The guest drained the UART receive FIFO; held-back input can go in.
    SerialDrained,
}

impl Token {
    fn to_data(self) -> u64 {
        match self {
            Token::Stop => 0,
            Token::Signal => 1,
            Token::Stdin => 2,
            Token::SerialDrained => 3,
        }
    }

    fn from_data(d: u64) -> Option<Self> {
        Some(match d {
            0 => Token::Stop,
            1 => Token::Signal,
            2 => Token::Stdin,
            3 => Token::SerialDrained,
            _ => return None,
        })
    }
}

/// Result of feeding console bytes through the escape filter.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Filtered {
    pub to_guest: Vec<u8>,
    pub quit: bool,
}

/// `Ctrl-A x` quits; `Ctrl-A Ctrl-A` sends one Ctrl-A; `Ctrl-A` then anything else
/// sends both bytes. State carries across reads.
#[derive(Debug, Default)]
pub struct EscapeFilter {
    after_ctrl_a: bool,
}

const CTRL_A: u8 = 0x01;

impl EscapeFilter {
    pub fn feed(&mut self, input: &[u8]) -> Filtered {
        let mut out = Filtered::default();
        for &b in input {
            if self.after_ctrl_a {
                self.after_ctrl_a = false;
                match b {
                    b'x' | b'X' => {
                        out.quit = true;
                        return out;
                    }
                    CTRL_A => out.to_guest.push(CTRL_A),
                    _ => out.to_guest.extend_from_slice(&[CTRL_A, b]),
                }
            } else if b == CTRL_A {
                self.after_ctrl_a = true;
            } else {
                out.to_guest.push(b);
            }
        }
        out
    }
}

/// Console input: stdin -> escape filter -> pending queue -> UART FIFO.
pub struct ConsoleInput {
    stdin: File,
    serial: Arc<Mutex<Serial>>,
    drained: EventFd,
    filter: EscapeFilter,
    pending: VecDeque<u8>,
    /// epoll accepted stdin (false for /dev/null, regular files, closed fds).
    stdin_pollable: bool,
    watching_stdin: bool,
}

impl ConsoleInput {
    /// `drained` must be (a clone of) the serial's drain eventfd.
    pub fn new(serial: Arc<Mutex<Serial>>, drained: EventFd) -> Result<Self, Error> {
        let stdin = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| Error::Create {
                what: "stdin duplicate",
                source,
            })?;
        Ok(Self {
            stdin: File::from(stdin),
            serial,
            drained,
            filter: EscapeFilter::default(),
            pending: VecDeque::new(),
            stdin_pollable: false,
            watching_stdin: false,
        })
    }
}

pub struct EventLoop {
    epoll: Epoll,
    stop_evt: EventFd,
    stop: Arc<StopSignal>,
    console: Option<ConsoleInput>,
    signals: Option<SignalEvents>,
}

pub struct EventLoopHandle {
    stop_evt: EventFd,
    thread: JoinHandle<()>,
}

impl EventLoop {
    pub fn new(stop: Arc<StopSignal>) -> Result<Self, Error> {
        let epoll = Epoll::new().map_err(|source| Error::Create {
            what: "epoll fd",
            source,
        })?;
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Create {
            what: "stop eventfd",
            source,
        })?;
        let el = Self {
            epoll,
            stop_evt,
            stop,
            console: None,
            signals: None,
        };
        el.add(el.stop_evt.as_raw_fd(), Token::Stop)?;
        Ok(el)
    }

    fn add(&self, fd: RawFd, token: Token) -> Result<(), Error> {
        self.epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token.to_data()),
            )
            .map_err(|source| Error::Register { token, fd, source })
    }

    fn remove(&self, fd: RawFd) {
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        {
            log::warn!("event loop: removing fd {fd} failed: {e}");
        }
    }

    /// Routes terminating signals into an orderly stop.
    pub fn set_signals(&mut self, signals: SignalEvents) -> Result<(), Error> {
        self.add(signals.eventfd().as_raw_fd(), Token::Signal)?;
        self.signals = Some(signals);
        Ok(())
    }

    /// Feeds stdin to the UART. Stdin that epoll cannot watch (a regular file,
    /// /dev/null, a closed fd) gives the guest no input; that is logged, not an error.
    pub fn set_console(&mut self, mut console: ConsoleInput) -> Result<(), Error> {
        self.add(console.drained.as_raw_fd(), Token::SerialDrained)?;
        match self.add(console.stdin.as_raw_fd(), Token::Stdin) {
            Ok(()) => {
                console.stdin_pollable = true;
                console.watching_stdin = true;
            }
            Err(e) => log::debug!("console input disabled: {e}"),
        }
        self.console = Some(console);
        Ok(())
    }

    /// Starts the `ferrite-events` thread.
    pub fn spawn(self) -> Result<EventLoopHandle, Error> {
        let stop_evt = self.stop_evt.try_clone().map_err(|source| Error::Create {
            what: "stop eventfd clone",
            source,
        })?;
        let thread = std::thread::Builder::new()
            .name("ferrite-events".into())
            .spawn(move || self.run())
            .map_err(Error::Spawn)?;
        Ok(EventLoopHandle { stop_evt, thread })
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.stop.request(VmOutcome::Error(format!(
                        "event loop: epoll_wait failed: {e}"
                    )));
                    return;
                }
            };
            let batch = &events[..n];
            if batch
                .iter()
                .any(|e| Token::from_data(e.data()) == Some(Token::Stop))
            {
                match self.stop_evt.read() {
                    Ok(_) => log::debug!("event loop: stop received"),
                    Err(e) => log::warn!("event loop: reading the stop eventfd failed: {e}"),
                }
                return;
            }
            for ev in batch {
                match Token::from_data(ev.data()) {
                    Some(Token::Stop) => unreachable!("handled above"),
                    Some(Token::Signal) => {
                        if let Some(sig) = self.signals.as_ref().and_then(|s| s.take()) {
                            self.stop.request(VmOutcome::Signal(sig));
                        }
                    }
                    Some(Token::Stdin) => self.on_stdin(),
                    Some(Token::SerialDrained) => self.on_serial_drained(),
                    None => log::warn!("event loop: unknown token {:#x}", ev.data()),
                }
            }
        }
    }

    fn on_stdin(&mut self) {
        let Some(c) = self.console.as_mut() else {
            return;
        };
        let mut buf = [0u8; 256];
        // One read per readiness event: it cannot block, because epoll just said the
        // fd is readable and nothing else reads it.
        let n = match c.stdin.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return,
            Err(e) => {
                log::warn!("console: reading stdin failed: {e}; input disabled");
                0
            }
        };
        if n == 0 {
            // EOF: harmless, the guest simply gets no more input.
            let fd = c.stdin.as_raw_fd();
            c.watching_stdin = false;
            c.stdin_pollable = false;
            self.remove(fd);
            return;
        }
        let filtered = c.filter.feed(&buf[..n]);
        c.pending.extend(filtered.to_guest);
        if filtered.quit {
            self.stop.request(VmOutcome::UserQuit);
        }
        self.push_pending();
    }

    fn on_serial_drained(&mut self) {
        let Some(c) = self.console.as_mut() else {
            return;
        };
        if let Err(e) = c.drained.read() {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                log::warn!("console: reading the drain eventfd failed: {e}");
            }
        }
        self.push_pending();
    }

    /// Moves pending input into the UART. While input is held back, stdin is not
    /// watched (so a level-triggered epoll does not spin); it is watched again once
    /// the queue is empty.
    fn push_pending(&mut self) {
        let Some(c) = self.console.as_mut() else {
            return;
        };
        {
            let mut serial = c.serial.lock().unwrap_or_else(|p| p.into_inner());
            while !c.pending.is_empty() {
                let (front, _) = c.pending.as_slices();
                let n = serial.enqueue_input(front);
                if n == 0 {
                    if !serial.input_fifo_full() {
                        // Loopback mode: the receive line is disconnected; drop it.
                        c.pending.clear();
                    }
                    break;
                }
                c.pending.drain(..n);
            }
        }
        let fd = c.stdin.as_raw_fd();
        let want = c.pending.is_empty() && c.stdin_pollable;
        let has_stdin = c.watching_stdin;
        if want == has_stdin {
            return;
        }
        if want {
            if let Err(e) = self.add(fd, Token::Stdin) {
                log::warn!("console: re-watching stdin failed: {e}");
                return;
            }
        } else {
            self.remove(fd);
        }
        if let Some(c) = self.console.as_mut() {
            c.watching_stdin = want;
        }
    }
}

impl EventLoopHandle {
    /// Writes the stop event and joins the thread.
    pub fn stop_and_join(self) -> Result<(), Error> {
        self.stop_evt.write(1).map_err(Error::SignalStop)?;
        self.thread.join().map_err(|_| Error::Panicked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for t in [
            Token::Stop,
            Token::Signal,
            Token::Stdin,
            Token::SerialDrained,
        ] {
            assert_eq!(Token::from_data(t.to_data()), Some(t));
        }
        assert_eq!(Token::from_data(77), None);
    }

    #[test]
    fn escape_filter() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.feed(b"ls\r").to_guest, b"ls\r");
        assert_eq!(
            f.feed(&[3, 0x1b, b'[', b'A']).to_guest,
            vec![3, 0x1b, b'[', b'A']
        );
        let r = f.feed(&[b'a', CTRL_A]);
        assert_eq!((r.to_guest, r.quit), (b"a".to_vec(), false));
        // Escape state survives across reads.
        let r = f.feed(b"x");
        assert!(r.quit);
        assert_eq!(f.feed(&[CTRL_A, CTRL_A]).to_guest, vec![CTRL_A]);
        assert_eq!(f.feed(&[CTRL_A, b'b']).to_guest, vec![CTRL_A, b'b']);
    }

    #[test]
    fn stop_event_ends_the_loop() {
        let stop = Arc::new(StopSignal::new());
        let el = EventLoop::new(stop.clone()).unwrap();
        let h = el.spawn().unwrap();
        h.stop_and_join().unwrap();
        assert!(!stop.is_stopping());
    }
}
