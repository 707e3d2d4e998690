//! Emulated devices. Each keeps its register logic as a plain state machine (mostly from
//! vm-superio) and adds a thin [`crate::bus::BusDevice`] adapter.
#![deny(unsafe_code)]

pub mod acpi_pm;
pub mod boot_timer;
pub mod cmos;
pub mod debug_exit;
pub mod i8042;
pub mod serial;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line backed by an eventfd. With the in-kernel irqchip the eventfd is
/// registered as an irqfd, so raising it never leaves the kernel; without one the
/// eventfd is simply never read.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self(EventFd::new(libc::EFD_NONBLOCK)?))
    }
}
