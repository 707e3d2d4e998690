//! Watches the guest's console output for a kernel panic, so that the reset that
//! `panic=-1` causes is reported as a panic (with the panic line) rather than a
//! normal reboot. Output passes through unchanged.

use std::io::Write;
use std::sync::{Arc, Mutex};

const PANIC_MARK: &[u8] = b"Kernel panic - not syncing";
const MAX_LINE: usize = 240;

/// The panic line once seen.
pub type PanicLine = Arc<Mutex<Option<String>>>;

pub struct ConsoleWatch<W: Write> {
    inner: W,
    matched: usize,
    capturing: Option<Vec<u8>>,
    panic: PanicLine,
}

impl<W: Write> ConsoleWatch<W> {
    pub fn new(inner: W, panic: PanicLine) -> Self {
        Self {
            inner,
            matched: 0,
            capturing: None,
            panic,
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            if let Some(line) = self.capturing.as_mut() {
                if b == b'\n' || b == b'\r' || line.len() >= MAX_LINE {
                    let text = String::from_utf8_lossy(line).into_owned();
                    *self.panic.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
                    self.capturing = None;
                } else {
                    line.push(b);
                }
                continue;
            }
            if b == PANIC_MARK[self.matched] {
                self.matched += 1;
                if self.matched == PANIC_MARK.len() {
                    self.matched = 0;
                    self.capturing = Some(PANIC_MARK.to_vec());
                }
            } else {
                self.matched = usize::from(b == PANIC_MARK[0]);
            }
        }
    }
}

impl<W: Write> Write for ConsoleWatch<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.scan(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_panic_line_across_writes() {
        let p = PanicLine::default();
        let mut w = ConsoleWatch::new(Vec::new(), p.clone());
        for chunk in [
            &b"[ 1.0] KKernel pan"[..],
            b"ic - not syncing: Attempted to kill init!",
            b" exitcode=0x1\r\n",
        ] {
            w.write_all(chunk).unwrap();
        }
        assert_eq!(
            p.lock().unwrap().as_deref(),
            Some("Kernel panic - not syncing: Attempted to kill init! exitcode=0x1")
        );
        assert!(String::from_utf8_lossy(&w.inner).contains("exitcode=0x1"));
    }

    #[test]
    fn ordinary_output_is_not_a_panic() {
        let p = PanicLine::default();
        let mut w = ConsoleWatch::new(Vec::new(), p.clone());
        w.write_all(b"Kernel panic? no. Kernel: all fine\n")
            .unwrap();
        assert!(p.lock().unwrap().is_none());
    }
}
