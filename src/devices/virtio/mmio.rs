//! The virtio-mmio transport (virtio 1.x, register layout version 2; legacy devices are
//! not offered): the register file, feature negotiation, the device status state
//! machine with reset, queue setup with validation, interrupt status and
//! acknowledgement, configuration generation.
//!
//! It runs on vCPU threads (MMIO exits for register accesses). Queue notifications do
//! not come here: each queue's QUEUE_NOTIFY write is a KVM ioeventfd (datamatch on the
//! queue index), watched by the event loop once the device is active. On DRIVER_OK the
//! transport validates the queues, activates the device and hands a [`QueueHandler`]
//! to the event loop through its [`Activator`]; on reset it asks for the handler back.
#![forbid(unsafe_code)]

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use serde::{Deserialize, Serialize};

use super::{BackendState, Interrupt, RateLimit, VirtioDevice};
use crate::bus::BusDevice;
use crate::event_loop::{self, EventHandler, Ops};
use crate::memory::GuestMemory;

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of the QUEUE_NOTIFY register (the ioeventfd address is base + this).
pub const QUEUE_NOTIFY: u64 = 0x050;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4554_5246; // "FRTE"
const CONFIG_SPACE: u64 = 0x100;

/// VIRTIO_F_VERSION_1: the device speaks virtio 1.x (not legacy).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;

pub const STATUS_ACKNOWLEDGE: u32 = virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
pub const STATUS_DRIVER: u32 = virtio_config::VIRTIO_CONFIG_S_DRIVER;
pub const STATUS_DRIVER_OK: u32 = virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
pub const STATUS_FEATURES_OK: u32 = virtio_config::VIRTIO_CONFIG_S_FEATURES_OK;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
pub const STATUS_FAILED: u32 = virtio_config::VIRTIO_CONFIG_S_FAILED;

/// What the transport asks of the event loop.
pub enum Activation {
    /// Start watching the device's notifications.
    Activated(QueueHandler),
    /// Stop watching them (the driver reset the device).
    Reset,
}

/// Hands activation and reset to the event loop (in tests: records them).
pub type Activator = Box<dyn FnMut(Activation) + Send>;

/// The driver's view of one queue before activation.
#[derive(Debug, Clone, Copy, Default)]
struct QueueConfig {
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

/// One queue in a snapshot: the driver's configuration and, for an active device,
/// where the device is in the rings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The next available entry the device takes. Saved equal to `next_used`: a chain
    /// the device had taken and not completed yet is taken again after the restore
    /// (see [`MmioTransport::save`]).
    pub next_avail: u16,
    /// The next used entry the device writes: the used ring's index in guest memory.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX is on for this queue (the driver accepted it).
    pub event_idx: bool,
}

/// A transport and its device in a snapshot (docs/DESIGN.md, "Snapshots: devices").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// What the device is and offers: checked against the device a restore goes into.
    pub device_type: u32,
    pub device_features: u64,
    pub device_features_sel: u32,
    pub driver_features: u64,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub status: u32,
    /// DRIVER_OK was accepted and the device runs on its queues.
    pub active: bool,
    pub interrupt_status: u32,
    pub needs_reset: bool,
    pub config_generation: u32,
    /// Every queue the device has (configured or not).
    pub queues: Vec<QueueState>,
    pub backend: BackendState,
}

/// A device behind its MMIO registers.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    name: String,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    max_sizes: Vec<u16>,
    queues: Vec<QueueConfig>,
    notifiers: Vec<EventFd>,
    activator: Activator,
    device_features: u64,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    active: bool,
    log: RateLimit,
}

impl MmioTransport {
    /// `notifiers[i]` is queue `i`'s eventfd (registered by the caller as an
    /// ioeventfd at base + [`QUEUE_NOTIFY`] with datamatch `i`).
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        notifiers: Vec<EventFd>,
        activator: Activator,
    ) -> Self {
        let (name, max_sizes, features) = {
            let d = device.lock().unwrap_or_else(|p| p.into_inner());
            (
                d.name().to_owned(),
                d.queue_max_sizes().to_vec(),
                d.device_features() | VIRTIO_F_VERSION_1,
            )
        };
        Self {
            device,
            name,
            mem,
            interrupt,
            queues: vec![QueueConfig::default(); max_sizes.len()],
            max_sizes,
            notifiers,
            activator,
            device_features: features,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            active: false,
            log: RateLimit::default(),
        }
    }

    fn device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device().device_type(),
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            0x034 => self
                .max_sizes
                .get(self.queue_sel as usize)
                .copied()
                .map_or(0, u32::from),
            0x044 => q.map_or(0, |q| u32::from(q.ready)),
            0x060 => self.interrupt.status(),
            0x070 => {
                let mut s = self.status;
                if self.interrupt.needs_reset() {
                    s |= STATUS_DEVICE_NEEDS_RESET;
                }
                s
            }
            // No shared memory regions: length -1.
            0x0b0 | 0x0b4 => u32::MAX,
            0x0fc => self.interrupt.config_generation(),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        let configurable = self.status & STATUS_DRIVER_OK == 0 && self.status & STATUS_FAILED == 0;
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) != STATUS_DRIVER {
                    self.warn(format!(
                        "driver features written in status {:#x}",
                        self.status
                    ));
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 | 0x044 | 0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => {
                if !configurable {
                    self.warn(format!(
                        "queue register {offset:#x} written after DRIVER_OK"
                    ));
                    return;
                }
                let sel = self.queue_sel;
                let Some(q) = self.selected_queue() else {
                    self.warn(format!("queue register {offset:#x} for absent queue {sel}"));
                    return;
                };
                if q.ready && offset != 0x044 {
                    self.warn(format!("queue {sel} reconfigured while ready"));
                    return;
                }
                let lo = |a: u64| (a & !0xffff_ffff) | u64::from(v);
                let hi = |a: u64| (a & 0xffff_ffff) | (u64::from(v) << 32);
                match offset {
                    0x038 => q.size = u16::try_from(v).unwrap_or(0),
                    0x044 => q.ready = v & 1 == 1,
                    0x080 => q.desc = lo(q.desc),
                    0x084 => q.desc = hi(q.desc),
                    0x090 => q.avail = lo(q.avail),
                    0x094 => q.avail = hi(q.avail),
                    0x0a0 => q.used = lo(q.used),
                    _ => q.used = hi(q.used),
                }
            }
            QUEUE_NOTIFY => self.fallback_notify(v),
            0x064 => self.interrupt.ack(v),
            0x070 => self.write_status(v),
            _ => self.warn(format!("write of {v:#x} to register {offset:#x}")),
        }
    }

    /// A QUEUE_NOTIFY that reached userspace (no ioeventfd): pass it to the event loop
    /// through the same eventfd.
    fn fallback_notify(&mut self, index: u32) {
        if !self.active {
            self.warn(format!("queue {index} notified before DRIVER_OK"));
            return;
        }
        match self.notifiers.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    self.warn(format!("queue {index} notify: {e}"));
                }
            }
            None => self.warn(format!("notify for absent queue {index}")),
        }
    }

    fn write_status(&mut self, v: u32) {
        log::debug!("{}: status {:#x} -> {v:#x}", self.name, self.status);
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // Bits are only ever added (the spec: the driver never clears a bit but by reset).
        if v & old != old {
            self.warn(format!("status {v:#x} clears bits of {old:#x}"));
            return;
        }
        let new = v & !old;
        if new & STATUS_FEATURES_OK != 0 && !self.features_ok() {
            // Not setting FEATURES_OK tells the driver the features were refused.
            self.status = v & !STATUS_FEATURES_OK;
            return;
        }
        if new & STATUS_DRIVER_OK != 0 {
            if v & STATUS_FEATURES_OK == 0 {
                self.warn("DRIVER_OK without FEATURES_OK".into());
                self.status = v & !STATUS_DRIVER_OK;
                self.interrupt.device_error();
                return;
            }
            self.status = v;
            self.activate();
            return;
        }
        self.status = v;
    }

    /// The driver's features are acceptable: VERSION_1 and nothing not offered.
    fn features_ok(&mut self) -> bool {
        let f = self.driver_features;
        if f & VIRTIO_F_VERSION_1 == 0 {
            self.warn("driver did not accept VIRTIO_F_VERSION_1 (legacy is not offered)".into());
            return false;
        }
        if f & !self.device_features != 0 {
            self.warn(format!(
                "driver accepted features {:#x} that were not offered",
                f & !self.device_features
            ));
            return false;
        }
        self.device().set_acked_features(f);
        true
    }

    fn activate(&mut self) {
        if let Err(what) = self.build_queues().and_then(|q| self.start(q)) {
            self.warn(what);
            self.interrupt.device_error();
        }
    }

    /// Activates the device on `queues` and hands its notifications to the event loop.
    fn start(&mut self, queues: Vec<Queue>) -> Result<(), String> {
        let result = {
            let mem = self.mem.clone();
            let interrupt = self.interrupt.clone();
            self.device().activate(mem, queues, interrupt)
        };
        result.map_err(|e| format!("activation failed: {e}"))?;
        let mut notifiers = Vec::with_capacity(self.notifiers.len());
        for evt in &self.notifiers {
            notifiers.push(
                evt.try_clone()
                    .map_err(|e| format!("cannot clone a queue eventfd: {e}"))?,
            );
        }
        let extra = self.device().watched_fds();
        self.active = true;
        (self.activator)(Activation::Activated(QueueHandler {
            name: self.name.clone(),
            device: self.device.clone(),
            notifiers,
            extra,
        }));
        Ok(())
    }

    /// Queues from the driver's configuration, checked: every queue ready, a valid
    /// size, aligned rings inside guest memory that do not overlap.
    /// Only the first [`VirtioDevice::active_queues`] count (for the accepted features).
    fn build_queues(&self) -> Result<Vec<Queue>, String> {
        let n = self.device().active_queues().min(self.queues.len());
        let mut out = Vec::with_capacity(n);
        for (i, (cfg, &max)) in self.queues.iter().zip(&self.max_sizes).take(n).enumerate() {
            if !cfg.ready {
                return Err(format!("queue {i} is not ready"));
            }
            let mut q = Queue::new(max).map_err(|e| format!("queue {i}: {e:?}"))?;
            q.try_set_size(cfg.size)
                .map_err(|_| format!("queue {i}: size {} (max {max}, power of two)", cfg.size))?;
            q.try_set_desc_table_address(GuestAddress(cfg.desc))
                .map_err(|_| format!("queue {i}: descriptor table {:#x} unaligned", cfg.desc))?;
            q.try_set_avail_ring_address(GuestAddress(cfg.avail))
                .map_err(|_| format!("queue {i}: available ring {:#x} unaligned", cfg.avail))?;
            q.try_set_used_ring_address(GuestAddress(cfg.used))
                .map_err(|_| format!("queue {i}: used ring {:#x} unaligned", cfg.used))?;
            q.set_ready(true);
            let n = u64::from(cfg.size);
            let areas = [
                ("descriptor table", cfg.desc, 16 * n),
                ("available ring", cfg.avail, 6 + 2 * n),
                ("used ring", cfg.used, 6 + 8 * n),
            ];
            for (a, &(na, sa, la)) in areas.iter().enumerate() {
                for &(nb, sb, lb) in &areas[a + 1..] {
                    let overlap = sa < sb.saturating_add(lb) && sb < sa.saturating_add(la);
                    if overlap {
                        return Err(format!("queue {i}: {na} {sa:#x} overlaps {nb} {sb:#x}"));
                    }
                }
            }
            if !q.is_valid(&self.mem) {
                return Err(format!("queue {i}: rings outside guest memory"));
            }
            out.push(q);
        }
        Ok(out)
    }

    /// The transport and its device for a snapshot, with the VM paused.
    ///
    /// In-flight work: a device may have taken chains from a ring and not completed them
    /// (a disk request in its worker, receive buffers a network or vsock device holds,
    /// the balloon's statistics buffer). Rather than waiting for them, the device's
    /// position is saved as the used ring's index in guest memory, for both
    /// `next_used` and `next_avail`: every chain taken and not completed is taken again
    /// after the restore and served then (a disk request is done again: it reads and
    /// writes the same sectors from the same guest buffers, which the guest cannot have
    /// touched before it saw the completion). This holds because every Ferrite device
    /// completes a queue's chains in the order it took them. Save the devices BEFORE
    /// guest memory: a chain completed in between is then only served twice, never
    /// lost.
    pub fn save(&self) -> Result<TransportState, String> {
        let backend = self.device().save_state()?;
        let event_idx = self.driver_features
            & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
            != 0;
        let mut queues: Vec<QueueState> = self
            .queues
            .iter()
            .map(|q| QueueState {
                size: q.size,
                ready: q.ready,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                next_avail: 0,
                next_used: 0,
                event_idx,
            })
            .collect();
        if self.active {
            let built = self.build_queues()?;
            for (i, (q, st)) in built.iter().zip(queues.iter_mut()).enumerate() {
                let idx = q
                    .used_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                    .map_err(|e| format!("queue {i}: used ring: {e:?}"))?;
                st.next_used = idx.0;
                st.next_avail = idx.0;
            }
        }
        let (interrupt_status, needs_reset, config_generation) = self.interrupt.save();
        Ok(TransportState {
            device_type: self.device().device_type(),
            device_features: self.device_features,
            device_features_sel: self.device_features_sel,
            driver_features: self.driver_features,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            active: self.active,
            interrupt_status,
            needs_reset,
            config_generation,
            queues,
            backend,
        })
    }

    /// Puts `s` back into this transport of a freshly built VM (the same
    /// configuration, guest memory already restored, the VM not started): the device
    /// checks and takes its own state, the registers and queue configurations are set,
    /// and an active device is activated again, as at DRIVER_OK, on queues that go on
    /// from the saved positions. Then call [`Self::resignal`]. `Err` says what differs.
    pub fn restore(&mut self, s: &TransportState) -> Result<(), String> {
        if self.active || self.status != 0 {
            return Err(
                "a driver already set the device up (a restore needs a freshly built VM)".into(),
            );
        }
        let device_type = self.device().device_type();
        if s.device_type != device_type {
            return Err(format!(
                "the snapshot holds a device of type {}; this one is of type {device_type}",
                s.device_type
            ));
        }
        if s.device_features != self.device_features {
            return Err(format!(
                "offered features changed from {:#x} to {:#x} (another configuration)",
                s.device_features, self.device_features
            ));
        }
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "{} queues in the snapshot, {} here",
                s.queues.len(),
                self.queues.len()
            ));
        }
        if s.driver_features & !self.device_features != 0 {
            return Err(format!(
                "the driver's features {:#x} were not offered",
                s.driver_features & !self.device_features
            ));
        }
        if s.active
            && s.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK)
                != STATUS_FEATURES_OK | STATUS_DRIVER_OK
        {
            return Err(format!("active in status {:#x}", s.status));
        }
        self.device().restore_state(&s.backend)?;
        for (cfg, q) in self.queues.iter_mut().zip(&s.queues) {
            *cfg = QueueConfig {
                size: q.size,
                ready: q.ready,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
            };
        }
        self.device_features_sel = s.device_features_sel;
        self.driver_features = s.driver_features;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.interrupt
            .restore(s.interrupt_status, s.needs_reset, s.config_generation);
        if s.status & STATUS_FEATURES_OK != 0 {
            self.device().set_acked_features(s.driver_features);
        }
        if !s.active {
            return Ok(());
        }
        let mut queues = self.build_queues()?;
        for (q, st) in queues.iter_mut().zip(&s.queues) {
            q.set_next_avail(st.next_avail);
            q.set_next_used(st.next_used);
            q.set_event_idx(st.event_idx);
        }
        self.start(queues)?;
        self.device().restored();
        Ok(())
    }

    /// After a restore (with the irqchip state in place): every queue of an active
    /// device is treated as notified and its interrupt raised, so neither side waits
    /// for a notification that was lost with the old process. The device's pass over
    /// each queue re-arms notification suppression (`enable_notification` writes the
    /// avail event or clears NO_NOTIFY again); the driver, interrupted, looks at every
    /// used ring (Firecracker's vsock hang after a restore with EVENT_IDX).
    pub fn resignal(&self) {
        if !self.active {
            return;
        }
        let n = self.device().active_queues().min(self.notifiers.len());
        for (i, evt) in self.notifiers.iter().take(n).enumerate() {
            if let Err(e) = evt.write(1) {
                log::warn!("{}: cannot re-signal queue {i}: {e}", self.name);
            }
        }
        self.interrupt.signal_used();
    }

    fn reset(&mut self) {
        if self.active {
            (self.activator)(Activation::Reset);
            self.active = false;
        }
        self.device().reset();
        self.interrupt.reset();
        self.queues = vec![QueueConfig::default(); self.max_sizes.len()];
        self.status = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.device_features_sel = 0;
        self.queue_sel = 0;
    }

    fn warn(&mut self, what: String) {
        self.log.warn(&self.name, format_args!("{what}"));
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The device's name ("virtio-blk vda").
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn status(&self) -> u32 {
        self.status
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device().read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.warn(format!("{}-byte read of register {offset:#x}", data.len()));
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.status & STATUS_FAILED != 0 {
                return;
            }
            self.device().write_config(offset - CONFIG_SPACE, data);
            self.interrupt.bump_config_generation();
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.warn(format!("{}-byte write to register {offset:#x}", data.len()));
            return;
        };
        if !offset.is_multiple_of(4) {
            self.warn(format!("unaligned write to register {offset:#x}"));
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

/// The event-loop side of an active device: its queue notifiers and extra fds.
pub struct QueueHandler {
    name: String,
    device: Arc<Mutex<dyn VirtioDevice>>,
    notifiers: Vec<EventFd>,
    extra: Vec<(RawFd, u32)>,
}

/// Payloads at or above this are the device's own fds, not queues.
const EXTRA: u32 = 1 << 31;

struct Fd(RawFd);
impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl EventHandler for QueueHandler {
    fn name(&self) -> &str {
        &self.name
    }

    fn init(&mut self, ops: &mut Ops<'_>) -> Result<(), event_loop::Error> {
        for (i, evt) in self.notifiers.iter().enumerate() {
            ops.add(evt, i as u32, EventSet::IN)?;
        }
        for &(fd, data) in &self.extra {
            ops.add(
                &Fd(fd),
                EXTRA | data,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            )?;
        }
        Ok(())
    }

    fn handle(&mut self, data: u32, _: EventSet, _: &mut Ops<'_>) {
        if data & EXTRA != 0 {
            self.device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .event(data & !EXTRA);
            return;
        }
        let index = data as usize;
        log::trace!("{}: queue {index} notified", self.name);
        if let Some(evt) = self.notifiers.get(index) {
            // Consume the notification count; one pass over the queue serves all.
            let _ = evt.read();
            self.device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .queue_notify(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::ActivateError;
    use proptest::prelude::*;
    use vm_memory::GuestMemoryMmap;

    #[derive(Default)]
    struct Seen {
        acked: u64,
        activated: usize,
        resets: usize,
        queue_sizes: Vec<u16>,
        /// Queues the device needs for its features (None: all).
        active_queues: Option<usize>,
    }

    struct TestDevice(Arc<Mutex<Seen>>);

    impl VirtioDevice for TestDevice {
        fn name(&self) -> &str {
            "test-device"
        }
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn device_features(&self) -> u64 {
            1 << 3
        }
        fn active_queues(&self) -> usize {
            self.0.lock().unwrap().active_queues.unwrap_or(2)
        }
        fn set_acked_features(&mut self, acked: u64) {
            self.0.lock().unwrap().acked = acked;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: GuestMemory,
            queues: Vec<Queue>,
            _: Arc<Interrupt>,
        ) -> Result<(), ActivateError> {
            let mut s = self.0.lock().unwrap();
            s.activated += 1;
            s.queue_sizes = queues.iter().map(|q| q.size()).collect();
            Ok(())
        }
        fn queue_notify(&mut self, _: usize) {}
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    struct Rig {
        t: MmioTransport,
        seen: Arc<Mutex<Seen>>,
        events: Arc<Mutex<Vec<&'static str>>>,
    }

    fn rig() -> Rig {
        let mem: GuestMemory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        let notifiers = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let t = MmioTransport::new(
            Arc::new(Mutex::new(TestDevice(seen.clone()))),
            mem,
            Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            notifiers,
            Box::new(move |a| {
                ev.lock().unwrap().push(match a {
                    Activation::Activated(_) => "activated",
                    Activation::Reset => "reset",
                })
            }),
        );
        Rig { t, seen, events }
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) -> bool {
        wr(t, 0x070, STATUS_ACKNOWLEDGE);
        wr(t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(t, 0x024, 0);
        wr(t, 0x020, features as u32);
        wr(t, 0x024, 1);
        wr(t, 0x020, (features >> 32) as u32);
        wr(
            t,
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        rd(t, 0x070) & STATUS_FEATURES_OK != 0
    }

    /// Queue `i` at 0x10000 + i * 0x4000: descriptors, then avail, then used.
    fn setup_queue(t: &mut MmioTransport, i: u32, size: u32) {
        let base = 0x1_0000 + u64::from(i) * 0x4000;
        wr(t, 0x030, i);
        wr(t, 0x038, size);
        wr(t, 0x080, base as u32);
        wr(t, 0x090, (base + 0x1000) as u32);
        wr(t, 0x0a0, (base + 0x2000) as u32);
        wr(t, 0x044, 1);
    }

    const OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;

    #[test]
    fn identity_registers() {
        let mut r = rig();
        assert_eq!(rd(&mut r.t, 0x000), MAGIC);
        assert_eq!(rd(&mut r.t, 0x004), 2);
        assert_eq!(rd(&mut r.t, 0x008), 42);
        wr(&mut r.t, 0x014, 1);
        assert_eq!(rd(&mut r.t, 0x010), 1, "VERSION_1 in the high word");
        wr(&mut r.t, 0x014, 0);
        assert_eq!(rd(&mut r.t, 0x010), 1 << 3);
        wr(&mut r.t, 0x030, 1);
        assert_eq!(rd(&mut r.t, 0x034), 8);
        wr(&mut r.t, 0x030, 7);
        assert_eq!(rd(&mut r.t, 0x034), 0, "absent queue");
        let mut b = [0u8; 2];
        r.t.read(0x100 + 3, &mut b);
        assert_eq!(b, [3, 4], "config space passes through at any width");
    }

    #[test]
    fn features_need_version_1_and_nothing_unoffered() {
        let mut r = rig();
        assert!(!negotiate(&mut r.t, 1 << 3), "legacy driver refused");
        let mut r = rig();
        assert!(!negotiate(&mut r.t, VIRTIO_F_VERSION_1 | (1 << 5)));
        let mut r = rig();
        assert!(negotiate(&mut r.t, VIRTIO_F_VERSION_1 | (1 << 3)));
        assert_eq!(r.seen.lock().unwrap().acked, VIRTIO_F_VERSION_1 | (1 << 3));
    }

    #[test]
    fn driver_ok_activates_and_reset_deactivates() {
        let mut r = rig();
        assert!(negotiate(&mut r.t, VIRTIO_F_VERSION_1));
        setup_queue(&mut r.t, 0, 16);
        setup_queue(&mut r.t, 1, 4);
        wr(&mut r.t, 0x070, OK | STATUS_DRIVER_OK);
        assert!(r.t.is_active());
        assert_eq!(rd(&mut r.t, 0x070), OK | STATUS_DRIVER_OK);
        assert_eq!(r.seen.lock().unwrap().queue_sizes, vec![16, 4]);
        assert_eq!(*r.events.lock().unwrap(), vec!["activated"]);
        // Queue registers are frozen while the driver is running.
        wr(&mut r.t, 0x030, 0);
        wr(&mut r.t, 0x038, 2);
        wr(&mut r.t, 0x070, 0);
        assert!(!r.t.is_active());
        assert_eq!(rd(&mut r.t, 0x070), 0);
        assert_eq!(*r.events.lock().unwrap(), vec!["activated", "reset"]);
        assert_eq!(r.seen.lock().unwrap().resets, 1);
        // Activatable again after the reset.
        assert!(negotiate(&mut r.t, VIRTIO_F_VERSION_1));
        setup_queue(&mut r.t, 0, 8);
        setup_queue(&mut r.t, 1, 8);
        wr(&mut r.t, 0x070, OK | STATUS_DRIVER_OK);
        assert_eq!(r.seen.lock().unwrap().activated, 2);
    }

    #[test]
    fn only_the_queues_the_features_need_must_be_ready() {
        let mut r = rig();
        r.seen.lock().unwrap().active_queues = Some(1);
        assert!(negotiate(&mut r.t, VIRTIO_F_VERSION_1));
        setup_queue(&mut r.t, 0, 16);
        wr(&mut r.t, 0x070, OK | STATUS_DRIVER_OK);
        assert!(r.t.is_active());
        assert_eq!(r.seen.lock().unwrap().queue_sizes, vec![16]);
    }

    fn refused(configure: impl Fn(&mut MmioTransport)) {
        let mut r = rig();
        assert!(negotiate(&mut r.t, VIRTIO_F_VERSION_1));
        configure(&mut r.t);
        wr(&mut r.t, 0x070, OK | STATUS_DRIVER_OK);
        assert!(!r.t.is_active());
        assert_ne!(rd(&mut r.t, 0x070) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_ne!(rd(&mut r.t, 0x060) & 2, 0, "config interrupt");
        assert_eq!(r.seen.lock().unwrap().activated, 0);
        assert!(r.events.lock().unwrap().is_empty());
        // A reset clears the error.
        wr(&mut r.t, 0x070, 0);
        assert_eq!(rd(&mut r.t, 0x070), 0);
    }

    #[test]
    fn bad_queues_are_refused_with_needs_reset() {
        // Queue 1 never made ready.
        refused(|t| setup_queue(t, 0, 16));
        // Size not a power of two, zero, above the maximum.
        for size in [3, 0, 32] {
            refused(move |t| {
                setup_queue(t, 0, size);
                setup_queue(t, 1, 8);
            });
        }
        // Unaligned descriptor table.
        refused(|t| {
            setup_queue(t, 1, 8);
            wr(t, 0x030, 0);
            wr(t, 0x044, 0);
            wr(t, 0x080, 0x1_0008);
            wr(t, 0x044, 1);
        });
        // Rings outside guest memory (above 1 MiB), and overlapping rings.
        refused(|t| {
            setup_queue(t, 1, 8);
            wr(t, 0x030, 0);
            wr(t, 0x044, 0);
            wr(t, 0x0a4, 1);
            wr(t, 0x044, 1);
        });
        refused(|t| {
            setup_queue(t, 1, 8);
            wr(t, 0x030, 0);
            wr(t, 0x044, 0);
            wr(t, 0x090, 0x1_0000);
            wr(t, 0x044, 1);
        });
    }

    #[test]
    fn notify_before_driver_ok_is_ignored_and_interrupts_ack() {
        let mut r = rig();
        wr(&mut r.t, QUEUE_NOTIFY, 0);
        assert!(r.t.notifiers[0].read().is_err(), "nothing forwarded");
        r.t.interrupt.signal_used();
        assert_eq!(rd(&mut r.t, 0x060), 1);
        wr(&mut r.t, 0x064, 1);
        assert_eq!(rd(&mut r.t, 0x060), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::test_util::cases(2000)))]
        #[test]
        fn any_register_traffic_is_harmless(
            ops in proptest::collection::vec((any::<bool>(), 0u64..0x200, 1usize..9, any::<u64>()), 1..200)
        ) {
            let mut r = rig();
            for (write, offset, len, value) in ops {
                let bytes = value.to_le_bytes();
                if write {
                    r.t.write(offset, &bytes[..len]);
                } else {
                    let mut b = vec![0u8; len];
                    r.t.read(offset, &mut b);
                }
            }
            // Whatever happened, a reset brings the transport back to its initial state.
            wr(&mut r.t, 0x070, 0);
            prop_assert_eq!(rd(&mut r.t, 0x070), 0);
            prop_assert!(!r.t.is_active());
        }
    }
}
