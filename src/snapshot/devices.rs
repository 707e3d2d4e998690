//! Every device's state in a snapshot: the legacy devices (UART, i8042, CMOS, ACPI PM)
//! and each virtio-mmio transport with its device ([`TransportState`]): registers,
//! queue configurations and positions, and the device's own state (disk identity, MAC,
//! balloon target, vsock CID). docs/DESIGN.md, "Snapshots: devices", says what is
//! saved, how work in flight is handled, and why every queue is re-signalled after a
//! restore.
//!
//! Order, for whoever takes and restores a snapshot: [`Vm::save_devices`] with the vCPUs
//! paused and BEFORE guest memory is written (a chain a device completes in between is
//! then served twice, never lost); [`Vm::restore_devices`] on a VM built from the same
//! configuration and not started, AFTER guest memory and the irqchip state are back
//! (the transports check the rings against memory, and the interrupts raised at the
//! end must reach the restored irqchip).
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

use crate::devices::acpi_pm::AcpiPmState;
use crate::devices::cmos::CmosState;
use crate::devices::i8042::I8042State;
use crate::devices::serial::SerialState;
use crate::devices::virtio::mmio::TransportState;
use crate::vm::Vm;

/// A virtio-mmio device in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// "virtio-blk vda", "virtio-net tap0", ...: matched by kind on restore.
    pub name: String,
    pub transport: TransportState,
}

/// Every device's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialState,
    pub i8042: I8042State,
    pub cmos: CmosState,
    /// The PC machine's ACPI PM registers (none on the bare machine).
    pub acpi_pm: Option<AcpiPmState>,
    /// One per virtio-mmio transport, in MMIO address order (disks, networks,
    /// console, rng, balloon, vsock).
    pub virtio: Vec<VirtioState>,
}

/// Why devices could not be saved or restored; each names the device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{device}: cannot save its state: {what}")]
    Save { device: String, what: String },
    /// A device refused the saved state ("virtio-blk vda: size of IMG changed from X
    /// to Y bytes").
    #[error("{device}: {what}")]
    Restore { device: String, what: String },
    #[error(
        "the snapshot has {} virtio devices ({}), this VM has {} ({})",
        saved.len(), saved.join(", "), here.len(), here.join(", ")
    )]
    VirtioDevices { saved: Vec<String>, here: Vec<String> },
    #[error("virtio device {index} is {saved} in the snapshot, {here} here")]
    VirtioKind {
        index: usize,
        saved: String,
        here: String,
    },
    #[error("the snapshot {} ACPI PM registers, this machine {}",
        if *saved { "has" } else { "has no" }, if *saved { "has none" } else { "has them" })]
    AcpiPm { saved: bool },
    #[error("devices are restored into a VM that has not started; this one runs")]
    Started,
}

/// "virtio-blk vda" → "virtio-blk": the kind, which a restore may not change (a TAP
/// name after it may change: Firecracker's `network_overrides`).
fn kind(name: &str) -> &str {
    name.split(' ').next().unwrap_or(name)
}

fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vm {
    /// Every device's state, with the vCPUs paused (see the module's note on order).
    /// Writable disks are flushed (`fdatasync`).
    pub fn save_devices(&self) -> Result<DevicesState, Error> {
        let (h, _) = self.device_handles();
        let mut virtio = Vec::with_capacity(h.virtio.len());
        for t in &h.virtio {
            let t = lock(t);
            let transport = t.save().map_err(|what| Error::Save {
                device: t.name().to_owned(),
                what,
            })?;
            virtio.push(VirtioState {
                name: t.name().to_owned(),
                transport,
            });
        }
        Ok(DevicesState {
            serial: lock(&h.serial).save(),
            i8042: lock(&h.i8042).save(),
            cmos: lock(&h.cmos).save(),
            acpi_pm: h.acpi_pm.as_ref().map(|p| lock(p).save()),
            virtio,
        })
    }

    /// Puts `state` back into this VM, built from the snapshot's configuration and not
    /// started (see the module's note on order): the legacy devices' registers, each
    /// virtio transport's registers and queues, its device re-activated where it was
    /// active, then every queue of an active device re-signalled. An error names the
    /// device and what differs; the VM is then half restored and must not be started.
    pub fn restore_devices(&mut self, state: &DevicesState) -> Result<(), Error> {
        let (h, started) = self.device_handles();
        if started {
            return Err(Error::Started);
        }
        // Everything that can be checked without changing anything, first.
        let here: Vec<String> = h.virtio.iter().map(|t| lock(t).name().to_owned()).collect();
        if here.len() != state.virtio.len() {
            return Err(Error::VirtioDevices {
                saved: state.virtio.iter().map(|v| v.name.clone()).collect(),
                here,
            });
        }
        for (index, (saved, here)) in state.virtio.iter().zip(&here).enumerate() {
            if kind(&saved.name) != kind(here) {
                return Err(Error::VirtioKind {
                    index,
                    saved: saved.name.clone(),
                    here: here.clone(),
                });
            }
        }
        if state.acpi_pm.is_some() != h.acpi_pm.is_some() {
            return Err(Error::AcpiPm {
                saved: state.acpi_pm.is_some(),
            });
        }
        let legacy = |device: &str| {
            let device = device.to_owned();
            move |what| Error::Restore { device, what }
        };
        lock(&h.serial)
            .restore(&state.serial)
            .map_err(legacy("serial"))?;
        lock(&h.i8042)
            .restore(&state.i8042)
            .map_err(legacy("i8042"))?;
        lock(&h.cmos).restore(&state.cmos).map_err(legacy("cmos"))?;
        if let (Some(pm), Some(saved)) = (&h.acpi_pm, &state.acpi_pm) {
            lock(pm).restore(saved);
        }
        for (t, saved) in h.virtio.iter().zip(&state.virtio) {
            let mut t = lock(t);
            t.restore(&saved.transport)
                .map_err(|what| Error::Restore {
                    device: t.name().to_owned(),
                    what,
                })?;
        }
        for t in &h.virtio {
            lock(t).resignal();
        }
        Ok(())
    }
}
