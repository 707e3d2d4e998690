//! x86_64: guest physical layout and vCPU register setup.

pub mod layout;
pub mod regs;
