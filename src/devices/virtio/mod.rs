//! virtio devices (virtio 1.x over MMIO, version 2).
//!
//! A device is a [`VirtioDevice`]: its features, its configuration space, and what it
//! does with its queues once the driver has set them up. The [`mmio`] transport owns
//! the register file and the queue setup on the vCPU side; on DRIVER_OK it hands the
//! validated queues to the device ([`VirtioDevice::activate`]) and the device's queue
//! notifications (KVM ioeventfds, so a notify never exits to userspace) to the event
//! loop, which calls [`VirtioDevice::queue_notify`]. The device raises its interrupt
//! through [`Interrupt`] (a KVM irqfd plus the interrupt status register).
//!
//! Lock order: the transport's mutex (the bus entry) → the device's mutex → guest
//! memory (no lock) → the interrupt's eventfd (no lock). The event loop takes the
//! device's mutex alone. Nothing holding either waits for I/O: a reset returns at once,
//! and a device's worker checks that its activation is still current before it touches
//! guest memory (docs/DESIGN.md, "Lock order").
#![deny(unsafe_code)]

pub mod balloon;
pub mod block;
pub mod console;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod tap;
#[cfg(test)]
pub mod test_util;
pub mod token_bucket;
pub mod vsock;

use std::borrow::Cow;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

/// Interrupt status bit: a queue has used buffers.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line and status register, shared by the transport (which the
/// driver reads and acknowledges) and the device (which raises it).
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    /// The ConfigGeneration register: bumped by every change of the configuration space
    /// (a driver's write, or the device's own change such as a disk's new capacity), so
    /// that a driver reading a field in several accesses can tell it read a mix.
    config_generation: AtomicU32,
    irq: EventFd,
}

impl Interrupt {
    /// `irq` is registered with KVM as an irqfd for the device's GSI.
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            config_generation: AtomicU32::new(0),
            irq,
        }
    }

    /// The device put buffers in a used ring.
    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    /// The device's configuration space changed.
    pub fn signal_config(&self) {
        self.raise(INT_CONFIG);
    }

    /// The configuration space changed: a new generation. A device changing fields a
    /// driver may be reading calls this while it holds the lock its configuration
    /// reads take, so no read sees the new fields under the old generation; then it
    /// raises [`Self::signal_config`].
    pub fn bump_config_generation(&self) {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The ConfigGeneration register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// The device hit an error it cannot recover from without a reset: the transport
    /// shows DEVICE_NEEDS_RESET in the status register and the driver is told through
    /// a configuration interrupt.
    pub fn device_error(&self) {
        self.needs_reset.store(true, Ordering::Release);
        self.raise(INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        if let Err(e) = self.irq.write(1) {
            log::warn!("virtio: raising an interrupt failed: {e}");
        }
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// The driver acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// Back to the power-on state (device reset); the configuration generation goes on
    /// counting.
    pub fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }

    pub fn irq_eventfd(&self) -> &EventFd {
        &self.irq
    }

    /// (interrupt status, needs reset, configuration generation), for a snapshot.
    pub fn save(&self) -> (u32, bool, u32) {
        (self.status(), self.needs_reset(), self.config_generation())
    }

    /// Puts back what [`Self::save`] returned (a restore, before the VM runs); raises
    /// nothing.
    pub fn restore(&self, status: u32, needs_reset: bool, config_generation: u32) {
        self.status
            .store(status & (INT_USED_RING | INT_CONFIG), Ordering::Release);
        self.needs_reset.store(needs_reset, Ordering::Release);
        self.config_generation
            .store(config_generation, Ordering::Release);
    }
}

/// A device's own state in a snapshot (docs/DESIGN.md, "Snapshots: devices"): what the
/// transport's registers and rings do not hold. A restore goes into a device built
/// from the same configuration, so most of it is identity, checked, not copied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// Nothing of its own (virtio-rng, virtio-console).
    None,
    Block(block::BlockState),
    Net(net::NetState),
    Balloon(balloon::BalloonState),
    Vsock(vsock::device::VsockState),
}

impl BackendState {
    /// For errors: which kind of device the state is of.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendState::None => "a device without state",
            BackendState::Block(_) => "virtio-blk",
            BackendState::Net(_) => "virtio-net",
            BackendState::Balloon(_) => "virtio-balloon",
            BackendState::Vsock(_) => "virtio-vsock",
        }
    }
}

/// A device's log about guest behaviour and host errors: at most one line per second,
/// the next line saying how many were left out (every device and the transport).
pub use crate::ratelimit::RateLimit;

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("{device}: expected {expected} queues, the driver set up {got}")]
    QueueCount {
        device: String,
        expected: usize,
        got: usize,
    },
    #[error("{device}: {what}")]
    Failed { device: String, what: String },
}

/// The first step of every device's `activate`: the driver set up exactly `expected`
/// queues; EVENT_IDX is turned on in them when the driver accepted it.
pub fn take_queue_vec(
    device: &str,
    mut queues: Vec<Queue>,
    expected: usize,
    acked: u64,
) -> Result<Vec<Queue>, ActivateError> {
    if queues.len() != expected {
        return Err(ActivateError::QueueCount {
            device: device.to_owned(),
            expected,
            got: queues.len(),
        });
    }
    let event_idx = acked & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
    for q in &mut queues {
        virtio_queue::QueueT::set_event_idx(q, event_idx);
    }
    Ok(queues)
}

/// [`take_queue_vec`] for a device with a fixed number of queues.
pub fn take_queues<const N: usize>(
    device: &str,
    queues: Vec<Queue>,
    acked: u64,
) -> Result<[Queue; N], ActivateError> {
    let got = queues.len();
    take_queue_vec(device, queues, N, acked)?
        .try_into()
        .map_err(|_: Vec<Queue>| ActivateError::QueueCount {
            device: device.to_owned(),
            expected: N,
            got,
        })
}

/// A config-space read: the bytes of `space` from `offset` on; bytes beyond it read 0.
pub fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| space.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// A virtio device model, independent of the transport.
///
/// Every method runs with the device's mutex held: on a vCPU thread under the
/// transport's mutex too (register access, activation, reset), or on the event loop
/// (notifications, events). None may block on I/O that a guest or the host can stall,
/// nor wait for a thread that does: devices with slow back-ends hand work to a thread
/// of their own.
pub trait VirtioDevice: Send {
    /// For logs and errors, e.g. "virtio-blk vda".
    fn name(&self) -> &str;
    /// virtio device type (VIRTIO_ID_*).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of queues is the slice's length.
    fn queue_max_sizes(&self) -> &[u16];
    /// How many of the queues the driver must set up, asked after
    /// [`Self::set_acked_features`]: a device whose queues depend on the features
    /// (virtio-balloon numbers them compactly over the accepted ones) says fewer; the
    /// rest stay unused.
    fn active_queues(&self) -> usize {
        self.queue_max_sizes().len()
    }
    /// Feature bits offered (VIRTIO_F_VERSION_1 is added by the transport).
    fn device_features(&self) -> u64;
    /// The features the driver accepted (a subset of what was offered), before
    /// activation.
    fn set_acked_features(&mut self, acked: u64);
    /// The device's configuration space as the driver sees it now (default: none, so
    /// every byte reads as zero).
    fn config_space(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&[])
    }
    /// Reads the configuration space at `offset`; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space(), offset, data);
    }
    /// Writes the configuration space. By default every field is read-only and the
    /// write is ignored (logged at debug level); a device with writable fields
    /// overrides this.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "{}: ignored a {}-byte config write at {offset:#x}",
            self.name(),
            data.len()
        );
    }
    /// Starts the device on validated queues (queue `i` of `queues` is the driver's
    /// queue `i`). Returns at once, like [`Self::reset`]: it does not wait for a worker
    /// still busy with an earlier activation.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Queue `index` was notified by the driver (event loop thread).
    fn queue_notify(&mut self, index: usize);
    /// Fds besides the queue notifiers to watch while the device is active, each with
    /// a payload passed back to [`Self::event`] (e.g. a network device's TAP fd).
    /// They are watched edge-triggered (`EPOLLIN | EPOLLET`): on each event the device
    /// reads until EAGAIN, or remembers that data is left (e.g. no receive buffers)
    /// and reads again when the driver offers buffers — so a full ring never makes the
    /// loop spin.
    fn watched_fds(&self) -> Vec<(RawFd, u32)> {
        Vec::new()
    }
    /// One of [`Self::watched_fds`] is readable (event loop thread).
    fn event(&mut self, data: u32) {
        let _ = data;
    }
    /// The driver reset the device: drop the queues, stop any worker from touching
    /// guest memory, forget the acknowledged features. Returns at once (never waits for
    /// a worker's I/O); once it has returned, nothing of the old activation reaches
    /// guest memory or the interrupt. The device can be activated again afterwards.
    fn reset(&mut self);
    /// The device's own state for a snapshot, taken with the VM paused (a disk flushes
    /// its image here). `Err` says what failed.
    fn save_state(&self) -> Result<BackendState, String> {
        Ok(BackendState::None)
    }
    /// Checks `state` against this device (built from the same configuration) and
    /// takes what it carries, before the transport re-activates the device. `Err`
    /// says what differs ("size changed from X to Y bytes").
    fn restore_state(&mut self, state: &BackendState) -> Result<(), String> {
        match state {
            BackendState::None => Ok(()),
            other => Err(format!("the snapshot holds the state of {}", other.kind())),
        }
    }
    /// The device was restored and re-activated from a snapshot: the host side of
    /// whatever it had open is gone (a vsock device tells the guest with
    /// TRANSPORT_RESET).
    fn restored(&mut self) {}
}

/// The next available chain of `q`, `None` when there is none, or why the ring is broken.
///
/// virtio-queue answers "nothing" both for an empty ring and for a broken one (an
/// available index more than the queue size ahead, an unreadable ring); told apart
/// here so that "buffers were added meanwhile" (`enable_notification`) cannot make a
/// loop spin on a ring that never yields them.
pub fn pop_chain<'m>(
    q: &mut Queue,
    mem: &'m GuestMemory,
) -> Result<Option<virtio_queue::DescriptorChain<&'m GuestMemory>>, String> {
    use virtio_queue::QueueT;
    if let Some(c) = q.pop_descriptor_chain(mem) {
        return Ok(Some(c));
    }
    match q.avail_idx(mem, Ordering::Acquire) {
        Err(e) => Err(format!("available ring: {e:?}")),
        Ok(idx) if idx.0 == q.next_avail() => Ok(None),
        // Made available just after the first look, or broken: a second look tells
        // (a driver only moves the index forward, and publishes entries before it).
        Ok(idx) => match q.pop_descriptor_chain(mem) {
            Some(c) => Ok(Some(c)),
            None => Err(format!(
                "available index {} is not within {} of the device's {}",
                idx.0,
                q.size(),
                q.next_avail()
            )),
        },
    }
}
