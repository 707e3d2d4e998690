//! Console input: source fd -> escape filter -> bounded pending queue -> the guest's
//! console device (the UART's FIFO, or a virtio-console's receive queue), an
//! event-loop handler.
//!
//! The source is read whenever it is readable, whether or not the guest reads its
//! UART, so `Ctrl-A x` is always seen. What the UART's 64-byte FIFO cannot take waits
//! in a queue of at most [`PENDING_MAX`] bytes until the guest drains the FIFO (the
//! UART signals an eventfd); beyond that, typed input is dropped and counted.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::event_loop::{self, EventHandler, Ops};
use crate::outcome::VmOutcome;

/// A duplicate of Ferrite's stdin (left blocking: its file description is shared
/// with the parent shell).
pub fn stdin_file() -> std::io::Result<File> {
    use std::os::fd::AsFd;
    Ok(File::from(std::io::stdin().as_fd().try_clone_to_owned()?))
}

/// Input held back for a guest that is not reading its UART.
pub const PENDING_MAX: usize = 4096;

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

pub const CTRL_A: u8 = 0x01;

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

/// A bounded FIFO of input bytes waiting for room in the UART.
#[derive(Debug, Default)]
pub struct Pending {
    queue: VecDeque<u8>,
    dropped: u64,
}

impl Pending {
    /// Appends what fits; returns how many bytes were dropped.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let room = PENDING_MAX - self.queue.len();
        let take = bytes.len().min(room);
        self.queue.extend(&bytes[..take]);
        let dropped = bytes.len() - take;
        self.dropped += dropped as u64;
        dropped
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Moves bytes into `sink` (which returns how many it took) until it takes none.
    pub fn drain_into(&mut self, mut sink: impl FnMut(&[u8]) -> usize) {
        while !self.queue.is_empty() {
            let (front, _) = self.queue.as_slices();
            let n = sink(front);
            if n == 0 {
                break;
            }
            self.queue.drain(..n);
        }
    }

    pub fn clear(&mut self) {
        self.queue.clear();
    }
}

/// Where console input goes in the guest.
pub trait ConsoleSink: Send {
    /// Takes as many of `input` as fit now; returns how many.
    fn enqueue_input(&mut self, input: &[u8]) -> usize;
    /// False when nothing will ever take input (e.g. a UART in loopback mode), so
    /// held-back input is dropped instead of kept.
    fn accepts_input(&self) -> bool;
}

#[repr(u32)]
enum InputToken {
    Source = 0,
    Drained = 1,
}

/// The console input handler.
pub struct ConsoleInput {
    source: File,
    sink: Arc<Mutex<dyn ConsoleSink>>,
    drained: EventFd,
    filter: EscapeFilter,
    pending: Pending,
    reading: bool,
}

impl ConsoleInput {
    /// `drained` is written by the sink when it has room again.
    pub fn new(source: File, sink: Arc<Mutex<dyn ConsoleSink>>, drained: EventFd) -> Self {
        Self {
            source,
            sink,
            drained,
            filter: EscapeFilter::default(),
            pending: Pending::default(),
            reading: false,
        }
    }

    fn on_source(&mut self, ops: &mut Ops<'_>) {
        let mut buf = [0u8; 1024];
        // One read per readiness event: it cannot block, because epoll just said the
        // fd is readable and nothing else reads it (stdin stays blocking: its file
        // description is shared with the parent shell).
        let n = match self.source.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return,
            Err(e) => {
                log::warn!("console: reading input failed: {e}; input disabled");
                0
            }
        };
        if n == 0 {
            // EOF: harmless, the guest simply gets no more input.
            self.reading = false;
            if let Err(e) = ops.remove(&self.source) {
                log::debug!("console: {e}");
            }
            return;
        }
        let filtered = self.filter.feed(&buf[..n]);
        if filtered.quit {
            ops.stop_vm(VmOutcome::UserQuit);
            return;
        }
        let before = self.pending.dropped();
        self.pending.push(&filtered.to_guest);
        if before == 0 && self.pending.dropped() > 0 {
            log::warn!(
                "console: the guest is not reading its UART; typed input beyond {PENDING_MAX} bytes is dropped (Ctrl-A x still quits)"
            );
        }
        self.push_pending();
    }

    fn on_drained(&mut self) {
        if let Err(e) = self.drained.read() {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                log::warn!("console: reading the drain eventfd failed: {e}");
            }
        }
        self.push_pending();
    }

    fn push_pending(&mut self) {
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        self.pending.drain_into(|b| sink.enqueue_input(b));
        if !self.pending.is_empty() && !sink.accepts_input() {
            self.pending.clear();
        }
    }
}

impl EventHandler for ConsoleInput {
    fn name(&self) -> &str {
        "console-input"
    }

    /// Input that epoll cannot watch (/dev/null, a regular file, a closed fd) gives
    /// the guest no input; that is logged, not an error.
    fn init(&mut self, ops: &mut Ops<'_>) -> Result<(), event_loop::Error> {
        ops.add(&self.drained, InputToken::Drained as u32, EventSet::IN)?;
        match ops.add(&self.source, InputToken::Source as u32, EventSet::IN) {
            Ok(()) => self.reading = true,
            Err(e) => log::debug!("console input disabled: {e}"),
        }
        Ok(())
    }

    fn handle(&mut self, data: u32, _: EventSet, ops: &mut Ops<'_>) {
        if data == InputToken::Source as u32 {
            if self.reading {
                self.on_source(ops);
            }
        } else if data == InputToken::Drained as u32 {
            self.on_drained();
        }
    }
}

impl Drop for ConsoleInput {
    fn drop(&mut self) {
        if self.pending.dropped() > 0 {
            log::warn!(
                "console: {} typed bytes were dropped (the guest was not reading its UART)",
                self.pending.dropped()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn pending_is_bounded_and_counts_drops() {
        let mut p = Pending::default();
        assert_eq!(p.push(&vec![b'a'; PENDING_MAX - 10]), 0);
        assert_eq!(p.push(&[b'b'; 30]), 20);
        assert_eq!(p.len(), PENDING_MAX);
        assert_eq!(p.dropped(), 20);
        // A sink that takes 64 bytes at a time, then nothing.
        let mut taken = 0;
        p.drain_into(|b| {
            let n = b.len().min(64).min(128 - taken);
            taken += n;
            n
        });
        assert_eq!(taken, 128);
        assert_eq!(p.len(), PENDING_MAX - 128);
    }
}
