//! A log or metrics destination that never blocks the thread writing to it: a file or
//! FIFO written a whole line at a time (the logger and the metrics both write to one).
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// What a [`Sink::write_line`] did with a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Written, or started and kept to be finished before the next line.
    Line,
    /// Not written: the destination would have blocked.
    Dropped,
}

/// A file or FIFO opened so that writing to it never blocks; shared by the logger and
/// the metrics.
#[derive(Debug)]
pub struct Sink {
    file: File,
    /// The unwritten end of a line a full pipe took only part of.
    pending: Vec<u8>,
}

impl Sink {
    /// Opens `path` read-write, non-blocking, append-only, creating a regular file if
    /// nothing is there. A FIFO opens even with no reader.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        Ok(Self {
            file,
            pending: Vec::new(),
        })
    }

    /// Writes all of `buf` that the destination takes without blocking; returns what is
    /// left.
    fn push<'a>(&mut self, mut buf: &'a [u8]) -> io::Result<&'a [u8]> {
        while !buf.is_empty() {
            match self.file.write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(buf)
    }

    /// Writes one whole line (`line` includes its end), or nothing when the destination
    /// would block before its first byte or still holds the end of an earlier line.
    pub fn write_line(&mut self, line: &[u8]) -> io::Result<Written> {
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            let rest = self.push(&pending)?;
            if !rest.is_empty() {
                self.pending = rest.to_vec();
                return Ok(Written::Dropped);
            }
        }
        let rest = self.push(line)?;
        if rest.len() == line.len() {
            return Ok(Written::Dropped);
        }
        self.pending = rest.to_vec();
        Ok(Written::Line)
    }
}
