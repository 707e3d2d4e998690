//! What kind of machine an image gets.
#![forbid(unsafe_code)]

use crate::loader::{LinuxKernel, LoadedImage};

/// The machine model, decided by the image.
#[derive(Debug, Clone, Copy)]
pub enum Machine {
    /// A PC for Linux: in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, ACPI and MP
    /// tables, a CPUID model, ACPI power management; only vCPU 0 starts, the others
    /// wait for INIT/SIPI.
    Pc(LinuxKernel),
    /// For test programs: no interrupt controller, KVM's default CPUID and MSRs, every
    /// vCPU starts at the entry point, HLT parks a vCPU.
    Bare,
}

impl Machine {
    pub fn of(image: &LoadedImage) -> Self {
        match image.linux {
            Some(kernel) => Machine::Pc(kernel),
            None => Machine::Bare,
        }
    }

    pub fn is_pc(&self) -> bool {
        matches!(self, Machine::Pc(_))
    }

    /// The in-kernel irqchip is created (and with it the LAPIC timer and irqfds).
    pub fn has_irqchip(&self) -> bool {
        self.is_pc()
    }
}
