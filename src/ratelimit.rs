//! Log lines that a guest or a peer can provoke at will, at most one per interval, the
//! next one saying how many were left out: one limiter for the virtio transport, every
//! device and the control server. A leaf module.
#![forbid(unsafe_code)]

use std::fmt;
use std::time::{Duration, Instant};

use log::Level;

/// The interval of [`RateLimit::default`] (devices' logs about guest behaviour).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new(DEFAULT_INTERVAL)
    }
}

impl RateLimit {
    pub fn new(interval: Duration) -> RateLimit {
        RateLimit {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` if a line may be logged at `now` (`n`: how many were left out since the
    /// last one), `None` if this one is left out.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// Logs `name: args` at `level` unless a line was logged less than an interval ago.
    pub fn log(&mut self, level: Level, name: &str, args: fmt::Arguments<'_>) {
        match self.allow(Instant::now()) {
            None => {}
            Some(0) => log::log!(level, "{name}: {args}"),
            Some(n) => log::log!(level, "{name}: {args} ({n} similar messages suppressed)"),
        }
    }

    /// [`Self::log`] at warning level.
    pub fn warn(&mut self, name: &str, args: fmt::Arguments<'_>) {
        self.log(Level::Warn, name, args);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_one_per_interval_counting_what_it_left_out() {
        let mut r = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(r.allow(t0), Some(0));
        for i in 0..10_000u32 {
            assert_eq!(r.allow(t0 + Duration::from_micros(u64::from(i))), None);
        }
        assert_eq!(r.allow(t0 + Duration::from_secs(9)), None);
        assert_eq!(r.allow(t0 + Duration::from_secs(10)), Some(10_001));
        assert_eq!(r.allow(t0 + Duration::from_secs(25)), Some(0));
    }

    #[test]
    fn log_counts_suppressed_lines() {
        let mut l = RateLimit::default();
        for _ in 0..100 {
            l.log(Level::Debug, "t", format_args!("x"));
        }
        assert_eq!(l.suppressed, 99);
        l.last = Instant::now().checked_sub(DEFAULT_INTERVAL * 2);
        l.warn("t", format_args!("x"));
        assert_eq!(l.suppressed, 0);
    }
}
