//! ACPI PM1a event and control registers: the guest's `poweroff` writes SLP_TYP=S5 with
//! SLP_EN to PM1a_CNT, which ends the VM with [`VmOutcome::PowerOff`].

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::outcome::{StopSignal, VmOutcome};

const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;

/// Offsets within the 6-byte block: PM1a_STS, PM1a_EN, PM1a_CNT.
const STS: u64 = 0;
const EN: u64 = 2;
const CNT: u64 = 4;

pub struct AcpiPm {
    enable: u16,
    control: u16,
    s5_slp_typ: u8,
    stop: Arc<StopSignal>,
}

impl AcpiPm {
    pub fn new(stop: Arc<StopSignal>, s5_slp_typ: u8) -> Self {
        // SCI_EN set: the platform is always in ACPI mode (there is no SMI_CMD).
        Self {
            enable: 0,
            control: SCI_EN,
            s5_slp_typ,
            stop,
        }
    }

    fn reg(&self, offset: u64) -> u16 {
        match offset {
            EN => self.enable,
            CNT => self.control,
            _ => 0, // PM1a_STS: no events pending.
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i as u64;
            let word = self.reg(off & !1).to_le_bytes();
            *b = if off < 6 {
                word[(off & 1) as usize]
            } else {
                0xff
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let value = match data {
            [lo] => u16::from(*lo),
            [lo, hi, ..] => u16::from_le_bytes([*lo, *hi]),
            [] => return,
        };
        match offset {
            STS => {} // write-1-to-clear; nothing is ever set
            EN => self.enable = value,
            CNT => {
                self.control = value | SCI_EN;
                if value & SLP_EN != 0 {
                    let typ = ((value >> SLP_TYP_SHIFT) & 7) as u8;
                    if typ == self.s5_slp_typ {
                        self.stop.request(VmOutcome::PowerOff);
                    } else {
                        log::warn!(
                            "acpi: guest asked for sleep type {typ}; only S5 (off) is supported"
                        );
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off() {
        let stop = Arc::new(StopSignal::new());
        let mut pm = AcpiPm::new(stop.clone(), 5);
        let mut d = [0u8; 2];
        pm.read(CNT, &mut d);
        assert_eq!(u16::from_le_bytes(d) & SCI_EN, 1);
        pm.write(CNT, &(5u16 << 10).to_le_bytes());
        assert!(!stop.is_stopping(), "SLP_TYP alone does nothing");
        pm.write(CNT, &((3u16 << 10) | SLP_EN).to_le_bytes());
        assert!(!stop.is_stopping(), "S3 is not supported");
        pm.write(CNT, &((5u16 << 10) | SLP_EN).to_le_bytes());
        assert_eq!(stop.outcome(), Some(VmOutcome::PowerOff));
    }

    #[test]
    fn garbage_is_harmless() {
        let stop = Arc::new(StopSignal::new());
        let mut pm = AcpiPm::new(stop.clone(), 5);
        for off in 0..8 {
            pm.write(off, &[0xff]);
            pm.write(off, &[]);
            let mut d = [0u8; 4];
            pm.read(off, &mut d);
        }
        assert!(!stop.is_stopping());
    }
}
