//! i8042 keyboard controller: only its CPU-reset command matters to a VMM. Writing
//! 0xFE to port 0x64 ends the VM with [`VmOutcome::Reset`].

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::outcome::{StopSignal, VmOutcome};

/// I/O base of the controller (data port 0x60, command/status port 0x64).
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

/// Turns the controller's reset pulse into a VM stop request.
#[derive(Debug)]
pub struct ResetLine(pub Arc<StopSignal>);

impl vm_superio::Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(VmOutcome::Reset);
        Ok(())
    }
}

/// Bus adapter around vm-superio's `I8042Device`.
pub struct I8042(vm_superio::I8042Device<ResetLine>);

impl I8042 {
    pub fn new(stop: Arc<StopSignal>) -> Self {
        Self(vm_superio::I8042Device::new(ResetLine(stop)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            // The trigger is infallible.
            let _ = self.0.write(offset as u8, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops_vm() {
        let stop = Arc::new(StopSignal::new());
        let mut dev = I8042::new(stop.clone());
        dev.write(4, &[0xaa]);
        dev.write(0, &[0xfe]);
        assert!(!stop.is_stopping());
        dev.write(4, &[0xfe]);
        assert_eq!(stop.outcome(), Some(VmOutcome::Reset));
    }
}
