//! Boot-timer port: the test init writes [`BOOT_MARKER`] to [`BOOT_TIMER_PORT`] when
//! userspace starts, and Ferrite logs how long the boot took from VM start.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bus::BusDevice;

pub const BOOT_TIMER_PORT: u64 = 0xf5;
pub const BOOT_TIMER_LEN: u64 = 1;
pub const BOOT_MARKER: u8 = 0x7b;

/// When the guest reached userspace, shared with whoever wants to report it.
pub type BootTime = Arc<Mutex<Option<Duration>>>;

pub struct BootTimer {
    start: Instant,
    reached: BootTime,
}

impl BootTimer {
    pub fn new(start: Instant, reached: BootTime) -> Self {
        Self { start, reached }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() != Some(&BOOT_MARKER) {
            return;
        }
        let mut reached = self.reached.lock().unwrap_or_else(|p| p.into_inner());
        if reached.is_none() {
            let t = self.start.elapsed();
            *reached = Some(t);
            log::info!("guest userspace reached after {} ms", t.as_millis());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_marker_only() {
        let reached = BootTime::default();
        let mut t = BootTimer::new(Instant::now(), reached.clone());
        t.write(0, &[0]);
        assert!(reached.lock().unwrap().is_none());
        t.write(0, &[BOOT_MARKER]);
        let first = reached.lock().unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        t.write(0, &[BOOT_MARKER]);
        assert_eq!(reached.lock().unwrap().unwrap(), first);
    }
}
