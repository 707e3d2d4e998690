//! Debug-exit port for test guests (opt-in, `--debug-exit`, as QEMU's isa-debug-exit is
//! a device one adds): a write of byte `v` ends the VM; Ferrite exits with status
//! `32 + v` for v up to 95 (see `VmOutcome::exit_status` for why not QEMU's
//! `(v << 1) | 1`: that collides with Ferrite's own statuses and wraps above 0x7f).

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
        assert_eq!(stop.wait().exit_status(), 32 + 0x2a);
    }
}
