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
use crate::devices::virtio::mmio::{MmioTransport, TransportState};
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
    VirtioDevices {
        saved: Vec<String>,
        here: Vec<String>,
    },
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
    #[error(transparent)]
    Flush(#[from] crate::devices::virtio::block::Error),
}

/// "virtio-blk vda" → "virtio-blk": the kind, which a restore may not change (a TAP
/// name after it may change: Firecracker's `network_overrides`).
fn kind(name: &str) -> &str {
    name.split(' ').next().unwrap_or(name)
}

fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One transport's restore, its error naming the device.
fn restore_transport(t: &mut MmioTransport, saved: &VirtioState) -> Result<(), Error> {
    t.restore(&saved.transport).map_err(|what| Error::Restore {
        device: t.name().to_owned(),
        what,
    })
}

impl Vm {
    /// Every device's state, with the vCPUs paused (see the module's note on order).
    /// Writable disks are flushed (`fdatasync`) first, holding no device's lock.
    pub fn save_devices(&self) -> Result<DevicesState, Error> {
        for disk in self.disks() {
            disk.flush()?;
        }
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
            restore_transport(&mut lock(t), saved)?;
        }
        for t in &h.virtio {
            lock(t).resignal();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::sync::{Arc, Mutex};

    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;
    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::bus::BusDevice;
    use crate::devices::virtio::block::{Block, DiskConfig};
    use crate::devices::virtio::mmio::{
        Activation, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
        VIRTIO_F_VERSION_1,
    };
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::test_util::{mem, BUF, F_WRITE};
    use crate::devices::virtio::vsock::{Vsock, VsockConfig};
    use crate::devices::virtio::{Interrupt, VirtioDevice, INT_USED_RING};
    use crate::memory::GuestMemory;

    const EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

    /// A transport over `dev` as the VM's build makes it, with what a test looks at.
    struct Rig {
        t: MmioTransport,
        /// Duplicates of the queue notifiers and of the interrupt eventfd.
        notifiers: Vec<EventFd>,
        irq: EventFd,
        activations: Arc<Mutex<usize>>,
    }

    fn rig<D: VirtioDevice + 'static>(dev: Arc<Mutex<D>>, mem: &GuestMemory) -> Rig {
        let n = dev.lock().unwrap().queue_max_sizes().len();
        let notifiers: Vec<EventFd> = (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let dups = notifiers.iter().map(|e| e.try_clone().unwrap()).collect();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq_dup = irq.try_clone().unwrap();
        let activations = Arc::new(Mutex::new(0));
        let a = activations.clone();
        let t = MmioTransport::new(
            dev,
            mem.clone(),
            Arc::new(Interrupt::new(irq)),
            notifiers,
            Box::new(move |act| {
                if let Activation::Activated(_) = act {
                    *a.lock().unwrap() += 1;
                }
            }),
        );
        Rig {
            t,
            notifiers: dups,
            irq: irq_dup,
            activations,
        }
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    const OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;

    /// A driver's split ring of 16 entries at `base`: descriptors, then the available
    /// ring at +0x100, the used ring at +0x200.
    struct Ring<'m> {
        mem: &'m GuestMemory,
        base: u64,
        next: u16,
    }

    impl<'m> Ring<'m> {
        fn new(mem: &'m GuestMemory, base: u64) -> Self {
            Ring { mem, base, next: 0 }
        }
        fn addrs(&self) -> (u64, u64, u64) {
            (self.base, self.base + 0x100, self.base + 0x200)
        }
        /// Makes a one-buffer chain available; returns its head.
        fn add(&mut self, addr: u64, len: u32, flags: u16) -> u16 {
            let head = self.next % 16;
            let d = self.base + 16 * u64::from(head);
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem.write_obj(0u16, GuestAddress(d + 14)).unwrap();
            let avail = self.base + 0x100;
            self.mem
                .write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(head)))
                .unwrap();
            self.next = self.next.wrapping_add(1);
            self.mem
                .write_obj(self.next, GuestAddress(avail + 2))
                .unwrap();
            head
        }
        /// (used index, id and length of used entry `i`).
        fn used(&self, i: u16) -> (u16, u32, u32) {
            let u = self.base + 0x200;
            let e = u + 4 + 8 * u64::from(i % 16);
            (
                self.mem.read_obj(GuestAddress(u + 2)).unwrap(),
                self.mem.read_obj(GuestAddress(e)).unwrap(),
                self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
            )
        }
    }

    /// What a driver does: features, then each queue, then DRIVER_OK.
    fn driver_init(t: &mut MmioTransport, features: u64, queues: &[&Ring<'_>]) {
        wr(t, 0x070, STATUS_ACKNOWLEDGE);
        wr(t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(t, 0x024, 0);
        wr(t, 0x020, features as u32);
        wr(t, 0x024, 1);
        wr(t, 0x020, (features >> 32) as u32);
        wr(t, 0x070, OK);
        for (i, q) in queues.iter().enumerate() {
            let (d, a, u) = q.addrs();
            wr(t, 0x030, i as u32);
            wr(t, 0x038, 16);
            wr(t, 0x080, d as u32);
            wr(t, 0x084, (d >> 32) as u32);
            wr(t, 0x090, a as u32);
            wr(t, 0x094, (a >> 32) as u32);
            wr(t, 0x0a0, u as u32);
            wr(t, 0x0a4, (u >> 32) as u32);
            wr(t, 0x044, 1);
        }
        wr(t, 0x070, OK | STATUS_DRIVER_OK);
        assert!(
            t.is_active(),
            "the device took DRIVER_OK: status {:#x}",
            rd(t, 0x070)
        );
    }

    /// Through JSON and back, as a snapshot file carries it.
    fn roundtrip(t: &MmioTransport) -> VirtioState {
        let s = VirtioState {
            name: t.name().to_owned(),
            transport: t.save().unwrap(),
        };
        let json = serde_json::to_string(&s).unwrap();
        let back: VirtioState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        back
    }

    /// Registers a driver reads, for comparing two transports.
    fn registers(t: &mut MmioTransport) -> Vec<u32> {
        let mut out = Vec::new();
        for sel in 0..2 {
            wr(t, 0x014, sel);
            out.push(rd(t, 0x010));
        }
        wr(t, 0x030, 0);
        out.extend([0x034, 0x044, 0x060, 0x070, 0x0fc].map(|o| rd(t, o)));
        out
    }

    #[test]
    fn restored_queue_goes_on_from_the_saved_used_index_and_is_resignalled() {
        let mem = mem();
        let mut q = Ring::new(&mem, 0);
        let dev = Arc::new(Mutex::new(Rng::new()));
        let mut a = rig(dev.clone(), &mem);
        driver_init(&mut a.t, VIRTIO_F_VERSION_1 | EVENT_IDX, &[&q]);
        for i in 0..3u64 {
            q.add(BUF + i * 0x100, 16, F_WRITE);
        }
        dev.lock().unwrap().queue_notify(0);
        assert_eq!(q.used(2), (3, 2, 16));
        // A config write moves the generation; the driver acknowledged nothing yet.
        a.t.write(0x100, &[1]);
        let saved = roundtrip(&a.t);
        assert_eq!(saved.transport.queues[0].next_used, 3);
        assert_eq!(saved.transport.queues[0].next_avail, 3);
        assert!(saved.transport.queues[0].event_idx);
        let before = registers(&mut a.t);
        drop(a);

        // A new device and transport over the same (restored) memory.
        let dev2 = Arc::new(Mutex::new(Rng::new()));
        let mut b = rig(dev2.clone(), &mem);
        let _ = b.irq.read();
        restore_transport(&mut b.t, &saved).unwrap();
        b.t.resignal();
        assert!(b.t.is_active());
        assert_eq!(
            *b.activations.lock().unwrap(),
            1,
            "handed to the event loop"
        );
        assert_eq!(registers(&mut b.t), before);
        // Re-signalled: the queue reads as notified, the interrupt was raised.
        assert_eq!(b.notifiers[0].read().unwrap(), 1);
        assert!(b.irq.read().is_ok());
        assert_ne!(rd(&mut b.t, 0x060) & INT_USED_RING, 0);
        // The re-signalled pass finds nothing new: the old chains are not served again.
        dev2.lock().unwrap().queue_notify(0);
        assert_eq!(q.used(2).0, 3);
        // A chain added after the restore lands at used index 3.
        assert_eq!(q.add(BUF + 0x300, 32, F_WRITE), 3);
        dev2.lock().unwrap().queue_notify(0);
        assert_eq!(q.used(3), (4, 3, 32));
    }

    #[test]
    fn chain_taken_but_not_completed_is_taken_again_after_restore() {
        // What a disk worker with a request in flight leaves: the used index behind
        // the chains the device took. The saved position is the used index.
        let mem = mem();
        let mut q = Ring::new(&mem, 0);
        let dev = Arc::new(Mutex::new(Rng::new()));
        let mut a = rig(dev.clone(), &mem);
        driver_init(&mut a.t, VIRTIO_F_VERSION_1, &[&q]);
        q.add(BUF, 16, F_WRITE);
        dev.lock().unwrap().queue_notify(0);
        // Chain 1 made available and (as if taken by a worker) not completed.
        q.add(BUF + 0x100, 8, F_WRITE);
        let saved = roundtrip(&a.t);
        assert_eq!(saved.transport.queues[0].next_avail, 1);
        drop(a);
        let dev2 = Arc::new(Mutex::new(Rng::new()));
        let mut b = rig(dev2.clone(), &mem);
        restore_transport(&mut b.t, &saved).unwrap();
        b.t.resignal();
        dev2.lock().unwrap().queue_notify(0);
        assert_eq!(q.used(1), (2, 1, 8), "chain 1 served after the restore");
    }

    #[test]
    fn disk_of_another_size_is_refused_naming_the_disk() {
        let img =
            TempFile::new_with_prefix(std::env::temp_dir().join("ferrite-snap-blk-")).unwrap();
        img.as_file().write_all_at(&[7u8; 4096], 0).unwrap();
        let cfg = DiskConfig::new(img.as_path());
        let mem = mem();
        let a = rig(Arc::new(Mutex::new(Block::new(0, &cfg).unwrap())), &mem);
        let saved = roundtrip(&a.t);
        drop(a);
        // The same image restores.
        let mut b = rig(Arc::new(Mutex::new(Block::new(0, &cfg).unwrap())), &mem);
        restore_transport(&mut b.t, &saved).unwrap();
        drop(b);
        img.as_file().set_len(8192).unwrap();
        let mut c = rig(Arc::new(Mutex::new(Block::new(0, &cfg).unwrap())), &mem);
        let e = restore_transport(&mut c.t, &saved).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "virtio-blk vda: size of {} changed from 4096 to 8192 bytes",
                img.as_path().display()
            )
        );
        assert!(!c.t.is_active());
        assert_eq!(rd(&mut c.t, 0x070), 0, "nothing restored");
    }

    #[test]
    fn restored_vsock_queues_a_transport_reset_event() {
        const EV_BUF: u64 = 0x20_0000;
        let uds = std::env::temp_dir().join(format!("ferrite-snap-vsock-{}", std::process::id()));
        let cfg = VsockConfig::new(52, uds.clone()).unwrap();
        let mem = mem();
        let (rxq, txq, mut evq) = (
            Ring::new(&mem, 0),
            Ring::new(&mem, 0x4000),
            Ring::new(&mem, 0x8000),
        );
        let mut a = rig(Arc::new(Mutex::new(Vsock::new(&cfg).unwrap())), &mem);
        driver_init(
            &mut a.t,
            VIRTIO_F_VERSION_1 | EVENT_IDX,
            &[&rxq, &txq, &evq],
        );
        // The driver keeps event buffers offered.
        mem.write_slice(&[0xffu8; 8], GuestAddress(EV_BUF)).unwrap();
        evq.add(EV_BUF, 8, F_WRITE);
        let saved = roundtrip(&a.t);
        drop(a);
        let mut b = rig(Arc::new(Mutex::new(Vsock::new(&cfg).unwrap())), &mem);
        restore_transport(&mut b.t, &saved).unwrap();
        assert_eq!(evq.used(0), (1, 0, 4), "the event buffer was used");
        let id: u32 = mem.read_obj(GuestAddress(EV_BUF)).unwrap();
        assert_eq!(
            id,
            crate::devices::virtio::vsock::device::VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
        );
        drop(b);
        // Another CID is refused.
        let other = VsockConfig::new(53, uds).unwrap();
        let mut c = rig(Arc::new(Mutex::new(Vsock::new(&other).unwrap())), &mem);
        let e = restore_transport(&mut c.t, &saved).unwrap_err();
        assert_eq!(
            e.to_string(),
            "virtio-vsock cid 53: CID changed from 52 to 53"
        );
    }

    #[test]
    fn restored_balloon_keeps_target_and_actual_and_takes_its_statistics_buffer_again() {
        use crate::devices::virtio::balloon::{Balloon, BalloonConfig, F_STATS_VQ};
        let mem = mem();
        let rings = [0u64, 0x1000, 0x2000].map(|b| Ring::new(&mem, b));
        let [infl, defl, mut stats] = rings;
        let cfg = BalloonConfig::parse("stats-interval=1").unwrap();
        let ram = crate::devices::virtio::test_util::MEM_SIZE;
        let dev = Arc::new(Mutex::new(Balloon::new(&cfg, ram).unwrap()));
        let mut a = rig(dev.clone(), &mem);
        driver_init(
            &mut a.t,
            VIRTIO_F_VERSION_1 | F_STATS_VQ,
            &[&infl, &defl, &stats],
        );
        dev.lock().unwrap().set_target(1 << 20).unwrap();
        a.t.write(0x104, &64u32.to_le_bytes());
        // The driver's statistics buffer: one entry (tag 4, free memory), held.
        mem.write_slice(&4u16.to_le_bytes(), GuestAddress(BUF))
            .unwrap();
        mem.write_slice(&777u64.to_le_bytes(), GuestAddress(BUF + 2))
            .unwrap();
        stats.add(BUF, 10, 0);
        dev.lock().unwrap().queue_notify(2);
        assert_eq!(stats.used(0).0, 0, "held");
        let saved = roundtrip(&a.t);
        assert_eq!(
            saved.transport.queues[2].next_avail, 0,
            "taken again after restore"
        );
        let mut config = [0u8; 8];
        a.t.read(0x100, &mut config);
        drop(a);

        let dev2 = Arc::new(Mutex::new(Balloon::new(&cfg, ram).unwrap()));
        let mut b = rig(dev2.clone(), &mem);
        restore_transport(&mut b.t, &saved).unwrap();
        b.t.resignal();
        let mut config2 = [0u8; 8];
        b.t.read(0x100, &mut config2);
        assert_eq!(config2, config, "target and actual");
        assert_eq!(u32::from_le_bytes(config2[..4].try_into().unwrap()), 256);
        // The event loop serves the re-signalled queue: the buffer is taken and held.
        dev2.lock().unwrap().queue_notify(2);
        let st = dev2.lock().unwrap().status();
        assert_eq!(st.stats.unwrap().values.get(&4), Some(&777));
        assert_eq!(stats.used(0).0, 0);
        // The statistics tick returns it at used index 0.
        dev2.lock().unwrap().event(0);
        assert_eq!(stats.used(0), (1, 0, 0));
    }
}
