//! What kind of machine an image gets.
#![forbid(unsafe_code)]

use linux_loader::loader::bootparam::setup_header;

use crate::loader::LoadedImage;

/// The machine model, decided by the image.
#[derive(Debug, Clone, Copy)]
pub enum Machine {
    /// A PC for Linux: in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, ACPI and MP
    /// tables, a CPUID model, ACPI power management; only vCPU 0 starts, the others
    /// wait for INIT/SIPI.
    Pc(LinuxBoot),
    /// For test programs: no interrupt controller, KVM's default CPUID and MSRs, every
    /// vCPU starts at the entry point, HLT parks a vCPU.
    Bare,
}

/// How a Linux kernel is booted.
#[derive(Debug, Clone, Copy)]
pub enum LinuxBoot {
    /// A bzImage: its setup header goes into the zero page.
    BzImage(setup_header),
    /// An ELF vmlinux (64-bit boot protocol, or PVH when it carries the note).
    Vmlinux,
}

impl Machine {
    pub fn of(image: &LoadedImage) -> Self {
        match image.linux {
            Some(Some(header)) => Machine::Pc(LinuxBoot::BzImage(header)),
            Some(None) => Machine::Pc(LinuxBoot::Vmlinux),
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

impl LinuxBoot {
    pub fn setup_header(&self) -> Option<&setup_header> {
        match self {
            LinuxBoot::BzImage(h) => Some(h),
            LinuxBoot::Vmlinux => None,
        }
    }
}
