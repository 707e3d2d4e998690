//! Debug-exit port for test guests: a write of byte `v` ends the VM and Ferrite exits
//! with status `(v << 1) | 1`, as QEMU's isa-debug-exit device does.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::outcome::{StopSignal, VmOutcome};

pub const DEBUG_EXIT_PORT: u64 = 0xf4;
pub const DEBUG_EXIT_LEN: u64 = 1;

pub struct DebugExit(Arc<StopSignal>);

impl DebugExit {
    pub fn new(stop: Arc<StopSignal>) -> Self {
        Self(stop)
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.0.request(VmOutcome::DebugExit(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_requests_exit_with_value() {
        let stop = Arc::new(StopSignal::new());
        let mut dev = DebugExit::new(stop.clone());
        dev.write(0, &[0x2a, 0, 0, 0]);
        assert_eq!(stop.outcome(), Some(VmOutcome::DebugExit(0x2a)));
        assert_eq!(stop.wait().exit_status(), 0x55);
    }
}
