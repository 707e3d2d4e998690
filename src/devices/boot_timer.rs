//! Boot-timer port: the test init writes [`BOOT_MARKER`] to [`BOOT_TIMER_PORT`] when
//! userspace starts, and Ferrite logs how long the boot took from VM start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bus::BusDevice;

pub const BOOT_TIMER_PORT: u64 = 0xf5;
pub const BOOT_TIMER_LEN: u64 = 1;
pub const BOOT_MARKER: u8 = 0x7b;

pub struct BootTimer {
    start: Instant,
    reached: Option<Duration>,
    /// Called once, when the marker first arrives (a front end's own boot line).
    hook: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl BootTimer {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            reached: None,
            hook: None,
        }
    }

    /// Also calls `hook` when the marker first arrives.
    pub fn with_hook(mut self, hook: Option<Arc<dyn Fn() + Send + Sync>>) -> Self {
        self.hook = hook;
        self
    }

    /// When the guest first wrote the marker, measured from VM start.
    pub fn reached(&self) -> Option<Duration> {
        self.reached
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() != Some(&BOOT_MARKER) || self.reached.is_some() {
            return;
        }
        let t = self.start.elapsed();
        self.reached = Some(t);
        log::info!("guest userspace reached after {} ms", t.as_millis());
        if let Some(hook) = &self.hook {
            hook();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_marker_only() {
        let mut t = BootTimer::new(Instant::now());
        t.write(0, &[0]);
        assert!(t.reached().is_none());
        t.write(0, &[BOOT_MARKER]);
        let first = t.reached().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        t.write(0, &[BOOT_MARKER]);
        assert_eq!(t.reached().unwrap(), first);
    }
}
