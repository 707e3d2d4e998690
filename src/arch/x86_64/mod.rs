//! x86_64: guest physical layout and vCPU register setup.

pub mod acpi;
pub mod cpu;
pub mod cpuid;
pub mod layout;
pub mod linux;
pub mod mptable;
pub mod pvh;
pub mod regs;
