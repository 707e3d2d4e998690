//! The VM-wide KVM state of a snapshot: the in-kernel PICs and IOAPIC, the PIT and the
//! KVM clock.
//!
//! The KVM clock (KVM_GET_CLOCK) is the guest's kvm-clock base in nanoseconds. KVM
//! returns flags with it: `KVM_CLOCK_TSC_STABLE` (the guest sees one master clock for
//! all vCPUs: output only), and on newer kernels `KVM_CLOCK_REALTIME` and
//! `KVM_CLOCK_HOST_TSC` (the host's wall time and TSC at the moment of reading). Passed
//! back to KVM_SET_CLOCK, `KVM_CLOCK_REALTIME` makes KVM advance the clock by the wall
//! time elapsed since the save, so the guest's monotonic clock would jump by however
//! long the snapshot sat on disk (and older kernels refuse any flag with EINVAL).
//! [`restore`] therefore sets the clock with no flags by default
//! ([`ClockMode::Continue`]): the guest's clock continues from the value it had when
//! saved. [`ClockMode::Realtime`] (`ferrite run --restore DIR --restore-clock realtime`)
//! is that jump on purpose: the clock is set to the saved value plus the host wall
//! time elapsed since the save, so the guest's wall clock (and its monotonic clock,
//! which kvm-clock also drives) is ahead by the time the snapshot sat on disk. Ferrite
//! does the addition itself (what KVM_SET_CLOCK does with `KVM_CLOCK_REALTIME`), so it
//! works on kernels that refuse the flag too; where KVM_GET_CLOCK gave no wall time,
//! [`save`] records the host's CLOCK_REALTIME right after it (and marks it with
//! `KVM_CLOCK_REALTIME`).
#![forbid(unsafe_code)]

use std::fmt;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// Saving or restoring the VM's KVM state failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{ioctl} ({what}) failed")]
    Ioctl {
        ioctl: &'static str,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Which in-kernel devices the VM has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chips {
    /// KVM_CREATE_IRQCHIP: PIC master, PIC slave, IOAPIC.
    pub irqchip: bool,
    /// KVM_CREATE_PIT2.
    pub pit: bool,
}

/// One in-kernel interrupt controller's state (KVM_GET_IRQCHIP).
#[derive(Clone, Copy, Serialize, Deserialize)]
pub struct Chip(pub kvm_irqchip);

impl fmt::Debug for Chip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0.chip_id {
            KVM_IRQCHIP_PIC_MASTER => "PIC master",
            KVM_IRQCHIP_PIC_SLAVE => "PIC slave",
            KVM_IRQCHIP_IOAPIC => "IOAPIC",
            _ => "unknown chip",
        };
        write!(f, "Chip({name})")
    }
}

/// The in-kernel PICs and IOAPIC.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Irqchip {
    pub pic_master: Chip,
    pub pic_slave: Chip,
    pub ioapic: Chip,
}

/// How [`restore_with`] sets the KVM clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClockMode {
    /// The saved value: the guest's clocks go on from where they were.
    #[default]
    Continue,
    /// The saved value plus the host wall time since the save.
    Realtime,
}

impl std::str::FromStr for ClockMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "continue" => Ok(Self::Continue),
            "realtime" => Ok(Self::Realtime),
            other => Err(format!(
                "'{other}' is not a clock mode: continue or realtime"
            )),
        }
    }
}

/// Whether the saved clock carries the host's wall time at the save.
pub fn has_realtime(state: &VmState) -> bool {
    state.clock.flags & kvm_bindings::KVM_CLOCK_REALTIME != 0 && state.clock.realtime != 0
}

/// The host's CLOCK_REALTIME in nanoseconds.
fn realtime_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The VM's KVM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// `None` without the in-kernel irqchip (bare machine).
    pub irqchip: Option<Irqchip>,
    /// `None` without the in-kernel PIT.
    pub pit: Option<kvm_pit_state2>,
    pub clock: kvm_clock_data,
}

fn err(ioctl: &'static str, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Ioctl {
        ioctl,
        what,
        source,
    }
}

fn get_chip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<Chip, Error> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(err("KVM_GET_IRQCHIP", what))?;
    Ok(Chip(chip))
}

/// Saves the VM's KVM state. Call while every vCPU is paused.
pub fn save(vm: &VmFd, chips: Chips) -> Result<VmState, Error> {
    let irqchip = if chips.irqchip {
        Some(Irqchip {
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "PIC master")?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "PIC slave")?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC, "IOAPIC")?,
        })
    } else {
        None
    };
    let pit = if chips.pit {
        Some(vm.get_pit2().map_err(err("KVM_GET_PIT2", "PIT"))?)
    } else {
        None
    };
    let mut clock = vm.get_clock().map_err(err("KVM_GET_CLOCK", "KVM clock"))?;
    if clock.flags & kvm_bindings::KVM_CLOCK_REALTIME == 0 {
        clock.realtime = realtime_now_ns();
        clock.flags |= kvm_bindings::KVM_CLOCK_REALTIME;
    }
    Ok(VmState {
        irqchip,
        pit,
        clock,
    })
}

/// Restores the VM's KVM state into a freshly built VM with the same chips, before its
/// vCPUs run (a VM without a saved chip makes its KVM_SET_* fail, ENXIO). The clock is
/// set with no flags to its saved value (see the module doc).
pub fn restore(vm: &VmFd, state: &VmState) -> Result<(), Error> {
    restore_with(vm, state, ClockMode::Continue)
}

/// [`restore`] with the clock set as `mode` says (see the module doc).
pub fn restore_with(vm: &VmFd, state: &VmState, mode: ClockMode) -> Result<(), Error> {
    if let Some(irq) = &state.irqchip {
        for (chip, what) in [
            (&irq.pic_master, "PIC master"),
            (&irq.pic_slave, "PIC slave"),
            (&irq.ioapic, "IOAPIC"),
        ] {
            vm.set_irqchip(&chip.0)
                .map_err(err("KVM_SET_IRQCHIP", what))?;
        }
    }
    if let Some(pit) = &state.pit {
        vm.set_pit2(pit).map_err(err("KVM_SET_PIT2", "PIT"))?;
    }
    let clock = kvm_clock_data {
        clock: clock_value(state, mode, realtime_now_ns()),
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(err("KVM_SET_CLOCK", "KVM clock"))?;
    Ok(())
}

/// The clock value to restore at host wall time `now_ns`.
fn clock_value(state: &VmState, mode: ClockMode, now_ns: u64) -> u64 {
    match mode {
        ClockMode::Continue => state.clock.clock,
        ClockMode::Realtime if has_realtime(state) => state
            .clock
            .clock
            .saturating_add(now_ns.saturating_sub(state.clock.realtime)),
        // No wall time saved (refused before the restore starts): as saved.
        ClockMode::Realtime => state.clock.clock,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realtime_mode_adds_the_wall_time_since_the_save_and_continue_does_not() {
        let mut s = VmState {
            irqchip: None,
            pit: None,
            clock: kvm_clock_data {
                clock: 1_000,
                flags: kvm_bindings::KVM_CLOCK_REALTIME,
                realtime: 5_000,
                ..Default::default()
            },
        };
        assert_eq!(clock_value(&s, ClockMode::Continue, 9_000), 1_000);
        assert_eq!(clock_value(&s, ClockMode::Realtime, 9_000), 5_000);
        // A host clock behind the saved one never moves the guest's clock back.
        assert_eq!(clock_value(&s, ClockMode::Realtime, 4_000), 1_000);
        s.clock.flags = 0;
        assert!(!has_realtime(&s));
        assert_eq!(clock_value(&s, ClockMode::Realtime, 9_000), 1_000);
        assert_eq!("realtime".parse(), Ok(ClockMode::Realtime));
        assert_eq!("continue".parse(), Ok(ClockMode::Continue));
        assert!("wall"
            .parse::<ClockMode>()
            .unwrap_err()
            .contains("continue or realtime"));
    }

    #[test]
    fn errors_name_the_ioctl_and_chip() {
        let e = err("KVM_SET_IRQCHIP", "IOAPIC")(kvm_ioctls::Error::new(libc::EINVAL));
        assert_eq!(e.to_string(), "KVM_SET_IRQCHIP (IOAPIC) failed");
        let chain = crate::errors::chain(&e);
        assert_eq!(chain.matches("Invalid argument").count(), 1, "{chain}");
    }

    #[test]
    fn state_survives_json() {
        let mut clock = kvm_clock_data {
            clock: 123_456_789,
            flags: kvm_bindings::KVM_CLOCK_TSC_STABLE,
            ..Default::default()
        };
        clock.realtime = 5;
        let mut ioapic = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        let mut state = kvm_bindings::kvm_ioapic_state::default();
        state.redirtbl[3] = kvm_bindings::kvm_ioapic_state__bindgen_ty_1 {
            bits: 0x1_0000_00ec,
        };
        ioapic.chip.ioapic = state;
        let s = VmState {
            irqchip: Some(Irqchip {
                pic_master: Chip(kvm_irqchip::default()),
                pic_slave: Chip(kvm_irqchip::default()),
                ioapic: Chip(ioapic),
            }),
            pit: None,
            clock,
        };
        let json = serde_json::to_string(&s).unwrap();
        let back: VmState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.clock, clock);
        let again = serde_json::to_string(&back).unwrap();
        assert_eq!(json, again);
        assert_eq!(
            format!("{:?}", back.irqchip.unwrap().ioapic),
            "Chip(IOAPIC)"
        );
    }
}
