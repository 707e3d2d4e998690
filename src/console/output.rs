//! Console output that never blocks a vCPU or teardown.
//!
//! The UART (on a vCPU thread) writes into a bounded in-memory queue and returns at
//! once; a thread of its own (`ferrite-console`, started with the first byte, so a
//! guest that prints nothing costs no thread) moves the queue to the real output with
//! ordinary blocking writes. When the reader is slow the queue fills and further
//! output is dropped and counted; when the reader has gone (EPIPE and the like) all
//! further output is dropped and counted. Each condition is logged once, and the
//! total once at teardown — never a line per byte.
//!
//! Teardown waits a bounded time for the queue to drain; a writer stuck in write(2)
//! on a stdout nobody reads is left behind (the process is about to exit).
//!
//! The writer is woken per line, not per byte: a UART delivers one byte per exit, and
//! a wake-up (a futex syscall on the vCPU thread, often an IPI, and the writer's own
//! `write(2)`) for each of them cost a booting guest ~8,000 wake-ups and measurable
//! vCPU time. Bytes are written when a line ends, when [`FLUSH_AT`] bytes are queued,
//! at teardown, or [`LINGER`] after the first byte of a partial line (a shell prompt,
//! an echoed keystroke).
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Guest output held for a slow reader before it is dropped.
pub const QUEUE_MAX: usize = 256 * 1024;
const CHUNK: usize = 16 * 1024;
/// Teardown stops waiting for output after this long without a chunk written.
pub const STALL: Duration = Duration::from_millis(100);
/// Queued bytes that are written at once even without a line end.
pub const FLUSH_AT: usize = 4096;
/// How long the first byte of a partial line waits for the rest of its line.
pub const LINGER: Duration = Duration::from_millis(10);

/// A duplicate of Ferrite's stdout, written unbuffered.
pub fn stdout_file() -> std::io::Result<File> {
    Ok(File::from(std::io::stdout().as_fd().try_clone_to_owned()?))
}

#[derive(Default)]
struct State {
    /// The output, until the writer thread takes it.
    sink: Option<Box<dyn Write + Send>>,
    queue: VecDeque<u8>,
    /// The writer thread holds a chunk it is writing.
    writing: bool,
    /// No more output will come; the writer exits once the queue is empty.
    closed: bool,
    /// Why the output stopped accepting bytes, once it has.
    broken: Option<String>,
    dropped: u64,
    /// Chunks written so far (progress, for teardown's wait).
    chunks_written: u64,
    warned_full: bool,
    /// The queue holds a line end or [`FLUSH_AT`] bytes: write without lingering.
    flush_now: bool,
    /// The writer is waiting on `cond` (only then does a producer wake it).
    writer_waiting: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when bytes arrive (for the writer) and when a chunk is done (for
    /// teardown).
    cond: Condvar,
}

/// The producer side, given to the UART as its `Write`.
#[derive(Clone)]
pub struct OutputQueue {
    shared: Arc<Shared>,
}

/// Owns the writer thread.
pub struct ConsoleOutput {
    shared: Arc<Shared>,
}

/// What teardown found.
#[derive(Debug, PartialEq, Eq)]
pub struct OutputReport {
    /// Bytes of guest output never written.
    pub dropped: u64,
    /// Why the output stopped accepting bytes, if it did.
    pub broken: Option<String>,
    /// The queue was not empty when the wait ended.
    pub timed_out: bool,
}

impl ConsoleOutput {
    /// A queue in front of `out`; the writer thread starts with the first byte.
    pub fn new(out: Box<dyn Write + Send>) -> (Self, OutputQueue) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                sink: Some(out),
                ..State::default()
            }),
            cond: Condvar::new(),
        });
        (
            Self {
                shared: shared.clone(),
            },
            OutputQueue { shared },
        )
    }

    /// Says no more output will come and waits for what is queued to be written: up to
    /// `timeout` in all, and no longer than [`STALL`] without progress (a reader that has
    /// stopped reading is not waited for).
    pub fn finish(self, timeout: Duration) -> OutputReport {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.closed = true;
        // Never started: nothing was ever written.
        st.sink = None;
        self.shared.cond.notify_all();
        let mut progress = (st.chunks_written, start);
        while (!st.queue.is_empty() || st.writing) && st.broken.is_none() {
            let now = Instant::now();
            if st.chunks_written != progress.0 {
                progress = (st.chunks_written, now);
            }
            let stall_end = progress.1 + STALL;
            if now >= deadline || now >= stall_end {
                break;
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, deadline.min(stall_end) - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let timed_out = !st.queue.is_empty() && st.broken.is_none();
        let unwritten = st.queue.len() as u64;
        st.queue.clear();
        OutputReport {
            dropped: st.dropped + unwritten,
            broken: st.broken.clone(),
            timed_out,
        }
    }
}

impl Drop for ConsoleOutput {
    /// Lets the writer thread end once the queue is empty (also when `finish` was never
    /// called, e.g. a VM that failed to build).
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.closed = true;
        self.shared.cond.notify_all();
    }
}

/// Starts the writer thread over the sink, if it has not started yet.
fn start_writer(shared: &Arc<Shared>, st: &mut State) {
    let Some(mut out) = st.sink.take() else {
        return;
    };
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("ferrite-console".into())
        .spawn(move || writer(&s, &mut *out));
    if let Err(e) = spawned {
        log::warn!("console: cannot start the output thread ({e}); guest output is dropped");
        st.dropped += st.queue.len() as u64;
        st.queue.clear();
        st.broken = Some(format!("cannot start the output thread: {e}"));
    }
}

fn writer(shared: &Shared, out: &mut dyn Write) {
    crate::seccomp::enter(crate::seccomp::ThreadKind::ConsoleWriter);
    let mut chunk = Vec::with_capacity(CHUNK);
    loop {
        {
            let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.writing {
                st.writing = false;
                st.chunks_written += 1;
            }
            shared.cond.notify_all();
            // A partial line waits up to LINGER for its end (once per chunk).
            let mut lingered = false;
            loop {
                if st.closed || st.flush_now || (lingered && !st.queue.is_empty()) {
                    break;
                }
                st.writer_waiting = true;
                st = if st.queue.is_empty() {
                    shared.cond.wait(st).unwrap_or_else(|p| p.into_inner())
                } else {
                    lingered = true;
                    shared
                        .cond
                        .wait_timeout(st, LINGER)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                };
                st.writer_waiting = false;
            }
            if st.queue.is_empty() {
                if st.closed {
                    return;
                }
                st.flush_now = false;
                continue;
            }
            let n = st.queue.len().min(CHUNK);
            chunk.clear();
            chunk.extend(st.queue.drain(..n));
            // What is left (more than a chunk) arrived before: write it next.
            st.flush_now = !st.queue.is_empty();
            st.writing = true;
        }
        if let Err(e) = out.write_all(&chunk).and_then(|()| out.flush()) {
            let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            log::warn!("console: cannot write guest output ({e}); dropping it from now on");
            st.dropped += (chunk.len() + st.queue.len()) as u64;
            st.queue.clear();
            st.broken = Some(e.to_string());
            st.writing = false;
            shared.cond.notify_all();
            return;
        }
    }
}

impl Write for OutputQueue {
    /// Takes every byte: queued when there is room, else dropped and counted.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.broken.is_some() || st.closed {
            st.dropped += buf.len() as u64;
            return Ok(buf.len());
        }
        let room = QUEUE_MAX - st.queue.len();
        let take = buf.len().min(room);
        if take < buf.len() {
            st.dropped += (buf.len() - take) as u64;
            if !st.warned_full {
                st.warned_full = true;
                log::warn!(
                    "console: output is not being read fast enough; dropping guest output (total reported at exit)"
                );
            }
        }
        let was_empty = st.queue.is_empty();
        st.queue.extend(&buf[..take]);
        if take > 0 && (buf[..take].contains(&b'\n') || st.queue.len() >= FLUSH_AT) {
            st.flush_now = true;
        }
        if st.sink.is_some() {
            start_writer(&self.shared, &mut st);
        }
        // Wake a waiting writer when there is something to write now, or when a partial
        // line starts (it then waits LINGER for the rest).
        if st.writer_waiting && take > 0 && (st.flush_now || was_empty) {
            self.shared.cond.notify_all();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::SharedBuf as Sink;

    /// Blocks every write until released, like a pipe nobody reads.
    struct Stuck(Arc<(Mutex<bool>, Condvar)>);
    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (m, c) = &*self.0;
            let mut released = m.lock().unwrap();
            while !*released {
                released = c.wait(released).unwrap();
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_arrives_in_order() {
        let sink = Sink::default();
        let (out, mut q) = ConsoleOutput::new(Box::new(sink.clone()));
        for i in 0..1000u32 {
            q.write_all(format!("{i},").as_bytes()).unwrap();
        }
        let r = out.finish(Duration::from_secs(5));
        assert_eq!(r.dropped, 0);
        let expect: String = (0..1000u32).map(|i| format!("{i},")).collect();
        assert_eq!(
            String::from_utf8(sink.0.lock().unwrap().clone()).unwrap(),
            expect
        );
    }

    #[test]
    fn a_stuck_reader_never_blocks_the_producer_or_teardown() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (out, mut q) = ConsoleOutput::new(Box::new(Stuck(gate.clone())));
        let start = Instant::now();
        let total = 4 * QUEUE_MAX;
        for _ in 0..total / 1024 {
            q.write_all(&[b'x'; 1024]).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(2), "producer blocked");
        let r = out.finish(Duration::from_millis(100));
        assert!(start.elapsed() < Duration::from_secs(3), "teardown blocked");
        assert!(r.timed_out);
        // Everything but the one chunk the writer holds is accounted as dropped.
        assert!(r.dropped as usize >= total - CHUNK, "{r:?}");
        let (m, c) = &*gate;
        *m.lock().unwrap() = true;
        c.notify_all();
    }

    /// Counts write calls (each one a writer wake-up and a write(2) on a real output).
    #[derive(Clone, Default)]
    struct Counting(Arc<Mutex<(usize, Vec<u8>)>>);
    impl Write for Counting {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut g = self.0.lock().unwrap();
            g.0 += 1;
            g.1.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Issue 14 item 8: a byte-at-a-time producer (a UART, one byte per exit) woke the
    /// writer for every byte. It is now woken per line (or after LINGER for a partial
    /// line); everything still arrives, in order.
    #[test]
    fn a_byte_at_a_time_producer_wakes_the_writer_per_line_not_per_byte() {
        let sink = Counting::default();
        let (out, mut q) = ConsoleOutput::new(Box::new(sink.clone()));
        let mut expect = Vec::new();
        for line in 0..4 {
            for i in 0..60u8 {
                let b = b'a' + (i + line) % 26;
                q.write_all(&[b]).unwrap();
                expect.push(b);
                // A byte every ~100 µs, as a UART under emulation delivers them.
                std::thread::sleep(Duration::from_micros(100));
            }
            q.write_all(b"\r\n").unwrap();
            expect.extend_from_slice(b"\r\n");
        }
        let r = out.finish(Duration::from_secs(5));
        assert_eq!(r.dropped, 0);
        let (writes, bytes) = sink.0.lock().unwrap().clone();
        assert_eq!(bytes, expect);
        assert!(
            writes <= 24,
            "{writes} writes for 4 lines of 62 bytes: the writer is woken per byte"
        );
    }

    /// A partial line (a prompt) is written after LINGER, without waiting for a line end
    /// or teardown.
    #[test]
    fn a_partial_line_is_written_without_a_line_end() {
        let sink = Counting::default();
        let (out, mut q) = ConsoleOutput::new(Box::new(sink.clone()));
        q.write_all(b"/ # ").unwrap();
        let start = Instant::now();
        while sink.0.lock().unwrap().1 != b"/ # " {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "prompt never written"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(out.finish(Duration::from_secs(1)).dropped, 0);
    }

    #[test]
    fn a_broken_output_counts_instead_of_failing() {
        let (out, mut q) = ConsoleOutput::new(Box::new(Broken));
        q.write_all(b"first").unwrap();
        // Wait until the writer has seen the error.
        let start = Instant::now();
        loop {
            if out.shared.state.lock().unwrap().broken.is_some() {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..1000 {
            q.write_all(b"0123456789").unwrap();
        }
        let r = out.finish(Duration::from_secs(1));
        assert_eq!(r.dropped, 5 + 10_000);
        assert!(r.broken.is_some());
        assert!(!r.timed_out);
    }
}
