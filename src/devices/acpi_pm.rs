//! ACPI PM1a event and control registers (fixed hardware).
//!
//! * PM1a_CNT: the guest's `poweroff` writes SLP_TYP=S5 with SLP_EN, which ends the
//!   VM with [`VmOutcome::PowerOff`]. SCI_EN always reads 1 (there is no SMI_CMD: the
//!   platform is always in ACPI mode).
//! * The fixed power button: PM1_STS bit 8 (PWRBTN_STS, write 1 to clear), PM1_EN bit
//!   8 (PWRBTN_EN). [`AcpiPm::press_power_button`] sets the status bit; the SCI (IRQ 9,
//!   level-triggered, active high in the MADT) is asserted while
//!   `PM1_STS & PM1_EN != 0` and drops once the guest clears the status.
//!
//! The SCI is a KVM irqfd with a resample eventfd, not `KVM_IRQ_LINE`: writing the
//! irqfd asserts the line and KVM holds it until the guest acknowledges the interrupt
//! (EOI), then lowers it and signals the resample eventfd; [`SciResample`] (an
//! event-loop handler) then asserts it again if the condition still holds. That is a
//! level interrupt as the guest sees it, raised from any thread without the VM fd —
//! which `KVM_IRQ_LINE` would need on the vCPU threads and the event loop, outliving
//! the `Vm` that owns it (the VM fd must close before guest memory is unmapped). A
//! status the guest clears with the interrupt masked leaves one spurious SCI, which
//! ACPI handlers ignore (nothing pending).

use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::bus::BusDevice;
use crate::event_loop::{self, EventHandler, Ops};
use crate::outcome::{StopSignal, VmOutcome};

const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
/// PM1_STS / PM1_EN bit 8: the fixed power button.
pub const PWRBTN: u16 = 1 << 8;

/// Offsets within the 6-byte block: PM1a_STS, PM1a_EN, PM1a_CNT.
const STS: u64 = 0;
const EN: u64 = 2;
const CNT: u64 = 4;
const LEN: u64 = 6;

/// The ACPI PM registers in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AcpiPmState {
    pub status: u16,
    pub enable: u16,
    pub control: u16,
}

pub struct AcpiPm {
    status: u16,
    enable: u16,
    control: u16,
    s5_slp_typ: u8,
    stop: Arc<StopSignal>,
    /// The SCI line (None: no interrupt wired, as in unit tests of the registers).
    sci: Option<EventFdTrigger>,
}

impl AcpiPm {
    pub fn new(stop: Arc<StopSignal>, s5_slp_typ: u8, sci: Option<EventFdTrigger>) -> Self {
        Self {
            status: 0,
            enable: 0,
            control: SCI_EN,
            s5_slp_typ,
            stop,
            sci,
        }
    }

    pub fn save(&self) -> AcpiPmState {
        AcpiPmState {
            status: self.status,
            enable: self.enable,
            control: self.control,
        }
    }

    /// Puts the registers back (a restore); a pending enabled event asserts the SCI
    /// again (the line is level-triggered, KVM's resample lowers it at the EOI).
    pub fn restore(&mut self, state: &AcpiPmState) {
        self.status = state.status & PWRBTN;
        self.enable = state.enable;
        self.control = (state.control & !SLP_EN) | SCI_EN;
        self.update_sci();
    }

    fn reg(&self, offset: u64) -> u16 {
        match offset {
            STS => self.status,
            EN => self.enable,
            CNT => self.control,
            _ => 0xffff,
        }
    }

    /// The SCI's level: an enabled event is pending.
    pub fn sci_pending(&self) -> bool {
        self.status & self.enable != 0
    }

    /// The guest enabled the power button event: an ACPI OS with a button driver
    /// listens.
    pub fn power_button_armed(&self) -> bool {
        self.enable & PWRBTN != 0
    }

    /// Presses (and releases) the power button: PWRBTN_STS is set, and the SCI raised
    /// if the guest enabled the event.
    pub fn press_power_button(&mut self) {
        self.status |= PWRBTN;
        self.update_sci();
    }

    /// Asserts the SCI if an enabled event is pending (a no-op while it is asserted).
    fn update_sci(&self) {
        if !self.sci_pending() {
            return;
        }
        if let Some(sci) = &self.sci {
            use vm_superio::Trigger;
            if let Err(e) = sci.trigger() {
                log::warn!("acpi: cannot raise the SCI: {e}");
            }
        }
    }

    /// KVM lowered the SCI at the guest's EOI: raise it again while still pending.
    pub fn resample(&self) {
        self.update_sci();
    }

    fn write_reg(&mut self, reg: u64, value: u16, mask: u16) {
        match reg {
            // Write 1 to clear; only the power button's bit exists.
            STS => self.status &= !(value & mask),
            EN => self.enable = (self.enable & !mask) | (value & mask),
            CNT => {
                // SLP_EN is write-only; SCI_EN stays set.
                let v = (self.control & !mask) | (value & mask);
                self.control = (v & !SLP_EN) | SCI_EN;
                if value & mask & SLP_EN != 0 {
                    let typ = ((v >> SLP_TYP_SHIFT) & 7) as u8;
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

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset.saturating_add(i as u64);
            *b = if off < LEN {
                self.reg(off & !1).to_le_bytes()[(off & 1) as usize]
            } else {
                0xff
            };
        }
    }

    /// Any width at any offset: each byte lands in its register (so a 32-bit write at
    /// PM1a_STS also writes PM1a_EN, as the hardware's register layout implies).
    fn write(&mut self, offset: u64, data: &[u8]) {
        for reg in [STS, EN, CNT] {
            let mut value = 0u16;
            let mut mask = 0u16;
            for (i, &b) in data.iter().enumerate() {
                let off = offset.saturating_add(i as u64);
                if off & !1 == reg {
                    let shift = 8 * (off & 1);
                    value |= u16::from(b) << shift;
                    mask |= 0xff << shift;
                }
            }
            if mask != 0 {
                self.write_reg(reg, value, mask);
            }
        }
        self.update_sci();
    }
}

/// Watches the SCI's resample eventfd on the event loop.
pub struct SciResample {
    resample: EventFd,
    pm: Arc<Mutex<AcpiPm>>,
}

impl SciResample {
    pub fn new(resample: EventFd, pm: Arc<Mutex<AcpiPm>>) -> Self {
        Self { resample, pm }
    }
}

impl EventHandler for SciResample {
    fn name(&self) -> &str {
        "acpi-sci"
    }

    fn init(&mut self, ops: &mut Ops<'_>) -> Result<(), event_loop::Error> {
        ops.add(&self.resample, 0, EventSet::IN)
    }

    fn handle(&mut self, _: u32, _: EventSet, _: &mut Ops<'_>) {
        // Non-blocking: a spurious wake-up reads nothing and changes nothing.
        let _ = self.resample.read();
        self.pm.lock().unwrap_or_else(|p| p.into_inner()).resample();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read16(pm: &mut AcpiPm, off: u64) -> u16 {
        let mut d = [0u8; 2];
        pm.read(off, &mut d);
        u16::from_le_bytes(d)
    }

    /// A PM block whose SCI is an eventfd the test reads: Some(n) raises since last.
    fn with_sci() -> (AcpiPm, EventFd, Arc<StopSignal>) {
        let stop = Arc::new(StopSignal::new());
        let sci = EventFdTrigger::new().unwrap();
        let probe = sci.0.try_clone().unwrap();
        (AcpiPm::new(stop.clone(), 5, Some(sci)), probe, stop)
    }

    fn raised(probe: &EventFd) -> bool {
        probe.read().is_ok()
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let stop = Arc::new(StopSignal::new());
        let mut pm = AcpiPm::new(stop.clone(), 5, None);
        assert_eq!(read16(&mut pm, CNT) & SCI_EN, 1);
        pm.write(CNT, &(5u16 << 10).to_le_bytes());
        assert!(!stop.is_stopping(), "SLP_TYP alone does nothing");
        assert_eq!(read16(&mut pm, CNT), (5 << 10) | SCI_EN);
        pm.write(CNT, &((3u16 << 10) | SLP_EN).to_le_bytes());
        assert!(!stop.is_stopping(), "S3 is not supported");
        assert_eq!(read16(&mut pm, CNT) & SLP_EN, 0, "SLP_EN is write-only");
        pm.write(CNT, &((5u16 << 10) | SLP_EN).to_le_bytes());
        assert_eq!(stop.outcome(), Some(VmOutcome::PowerOff));
    }

    #[test]
    fn power_button_status_enable_and_sci_level() {
        let (mut pm, probe, stop) = with_sci();
        assert!(!pm.power_button_armed());
        // Pressed before the OS enabled the event: status set, no SCI.
        pm.press_power_button();
        assert_eq!(read16(&mut pm, STS), PWRBTN);
        assert!(!raised(&probe));
        // Enabling it with the status pending raises the SCI (level semantics).
        pm.write(EN, &PWRBTN.to_le_bytes());
        assert!(pm.power_button_armed());
        assert_eq!(read16(&mut pm, EN), PWRBTN);
        assert!(raised(&probe));
        // Still pending at the EOI: raised again.
        pm.resample();
        assert!(raised(&probe));
        // Writing 0 clears nothing; writing 1 to other bits clears nothing.
        pm.write(STS, &0u16.to_le_bytes());
        pm.write(STS, &0xfeffu16.to_le_bytes());
        assert_eq!(read16(&mut pm, STS), PWRBTN);
        let _ = raised(&probe);
        // Write 1 to clear: the line stays low at the next resample.
        pm.write(STS, &PWRBTN.to_le_bytes());
        assert_eq!(read16(&mut pm, STS), 0);
        assert!(!pm.sci_pending());
        pm.resample();
        assert!(!raised(&probe));
        // Armed: a press raises at once.
        pm.press_power_button();
        assert!(raised(&probe));
        // Byte access to the high half clears it too.
        pm.write(STS + 1, &[1]);
        assert_eq!(read16(&mut pm, STS), 0);
        // Disarmed: no SCI.
        pm.write(EN, &0u16.to_le_bytes());
        pm.press_power_button();
        assert!(!raised(&probe));
        assert!(!pm.power_button_armed());
        assert!(!stop.is_stopping(), "the button itself never stops the VM");
    }

    #[test]
    fn dword_write_covers_status_and_enable() {
        let (mut pm, probe, _) = with_sci();
        pm.press_power_button();
        // STS (clear the button) and EN (arm it) in one 32-bit write.
        let v = u32::from(PWRBTN) | (u32::from(PWRBTN) << 16);
        pm.write(STS, &v.to_le_bytes());
        assert_eq!(read16(&mut pm, STS), 0);
        assert!(pm.power_button_armed());
        assert!(!raised(&probe));
        let mut d = [0u8; 4];
        pm.read(STS, &mut d);
        assert_eq!(u32::from_le_bytes(d), u32::from(PWRBTN) << 16);
    }

    #[test]
    fn garbage_is_harmless() {
        let (mut pm, _probe, stop) = with_sci();
        for off in 0..10 {
            pm.write(off, &[0xff]);
            pm.write(off, &[]);
            pm.write(off, &[0xff; 7]);
            let mut d = [0u8; 9];
            pm.read(off, &mut d);
        }
        pm.write(u64::MAX, &[0xff; 4]);
        let mut d = [0u8; 4];
        pm.read(u64::MAX, &mut d);
        // 0xff bytes at CNT's high half set SLP_EN with SLP_TYP 7: not S5.
        assert!(!stop.is_stopping());
    }

    #[test]
    fn restored_pm_has_the_registers_and_raises_a_pending_sci() {
        let (mut a, _, _) = with_sci();
        a.write(EN, &PWRBTN.to_le_bytes());
        a.press_power_button();
        let json = serde_json::to_string(&a.save()).unwrap();
        let back: AcpiPmState = serde_json::from_str(&json).unwrap();
        let (mut b, probe, _) = with_sci();
        b.restore(&back);
        assert!(raised(&probe), "the pending power button asserts the SCI");
        for off in [STS, EN, CNT] {
            assert_eq!(read16(&mut b, off), read16(&mut a, off));
        }
    }
}
