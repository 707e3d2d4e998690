//! virtio-console (device type 3), one port: the guest's hvc0 on Ferrite's console.
//!
//! Transmit queue (1): the guest's output, copied into the console output queue (the
//! same never-blocking queue the UART writes to). Receive queue (0): console input,
//! pushed by the console input handler through [`ConsoleSink`] into the buffers the
//! guest has offered; when it offers more, the device writes its `drained` eventfd so
//! held-back input moves on.
#![forbid(unsafe_code)]

use std::io::Write;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::RateLimit;
use super::{ActivateError, Interrupt, VirtioDevice};
use crate::console::input::ConsoleSink;
use crate::memory::GuestMemory;

const VIRTIO_ID_CONSOLE: u32 = 3;
const QUEUE_SIZES: [u16; 2] = [256, 256];
const RX: usize = 0;
const TX: usize = 1;
/// Output copied per transmit request at most (the rest of a huge buffer is skipped).
const MAX_TX: usize = 64 * 1024;

struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// The console device.
pub struct VirtioConsole {
    out: Box<dyn Write + Send>,
    drained: EventFd,
    active: Option<Active>,
    acked: u64,
    log: RateLimit,
}

impl VirtioConsole {
    /// `out` receives the guest's output; `drained` is written when the guest offers
    /// receive buffers (the console input handler watches it).
    pub fn new(out: Box<dyn Write + Send>, drained: EventFd) -> Self {
        Self {
            out,
            drained,
            active: None,
            acked: 0,
            log: RateLimit::default(),
        }
    }

    fn bad(&mut self, what: String) {
        if let Some(n) = self.log.allow() {
            log::warn!("virtio-console: {what} ({n} similar suppressed)");
        }
    }

    fn notify_guest(a: &mut Active, q: usize) {
        match a.queues[q].needs_notification(&a.mem) {
            Ok(true) => a.interrupt.signal_used(),
            Ok(false) => {}
            Err(_) => a.interrupt.device_error(),
        }
    }

    fn transmit(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut errors = Vec::new();
        let mut buf = vec![0u8; 4096];
        while let Some(chain) = a.queues[TX].pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            let mut copied = 0usize;
            for desc in chain {
                if desc.is_write_only() {
                    errors.push(format!(
                        "transmit buffer {:#x} is device-writable",
                        desc.addr().0
                    ));
                    break;
                }
                let mut left = (desc.len() as usize).min(MAX_TX - copied);
                let mut addr = desc.addr().0;
                while left > 0 {
                    let n = left.min(buf.len());
                    if let Err(e) = a.mem.read_slice(&mut buf[..n], GuestAddress(addr)) {
                        errors.push(format!("transmit buffer {addr:#x}+{n}: {e}"));
                        left = 0;
                        continue;
                    }
                    // The output queue never blocks; it counts what it drops.
                    let _ = self.out.write_all(&buf[..n]);
                    copied += n;
                    left -= n;
                    addr = addr.saturating_add(n as u64);
                }
                if copied >= MAX_TX {
                    break;
                }
            }
            if a.queues[TX].add_used(&a.mem, head, 0).is_err() {
                a.interrupt.device_error();
                break;
            }
        }
        Self::notify_guest(a, TX);
        for e in errors {
            self.bad(e);
        }
    }
}

impl ConsoleSink for VirtioConsole {
    fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let Some(a) = self.active.as_mut() else {
            return 0;
        };
        let mut taken = 0;
        let mut errors = Vec::new();
        while taken < input.len() {
            let Some(chain) = a.queues[RX].pop_descriptor_chain(&a.mem) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0usize;
            for desc in chain {
                if !desc.is_write_only() {
                    errors.push(format!(
                        "receive buffer {:#x} is device-readable",
                        desc.addr().0
                    ));
                    break;
                }
                let n = (desc.len() as usize).min(input.len() - taken - written);
                if n == 0 {
                    break;
                }
                let from = taken + written;
                if let Err(e) = a.mem.write_slice(&input[from..from + n], desc.addr()) {
                    errors.push(format!("receive buffer {:#x}+{n}: {e}", desc.addr().0));
                    break;
                }
                written += n;
            }
            if a.queues[RX].add_used(&a.mem, head, written as u32).is_err() {
                a.interrupt.device_error();
                break;
            }
            taken += written;
            if written == 0 {
                // A buffer that took nothing: do not loop on a broken ring.
                break;
            }
        }
        Self::notify_guest(a, RX);
        for e in errors {
            self.bad(e);
        }
        taken
    }

    /// Input waits (does not get dropped) until the guest offers buffers.
    fn accepts_input(&self) -> bool {
        true
    }
}

impl VirtioDevice for VirtioConsole {
    fn name(&self) -> &str {
        "virtio-console"
    }
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn device_features(&self) -> u64 {
        1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX
    }
    fn set_acked_features(&mut self, acked: u64) {
        self.acked = acked;
    }
    /// cols, rows, max_nr_ports, emerg_wr: no size or multiport features are offered,
    /// so the space reads as zeros.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        mem: GuestMemory,
        mut queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                device: self.name().into(),
                expected: QUEUE_SIZES.len(),
                got: queues.len(),
            });
        }
        let event_idx =
            self.acked & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in &mut queues {
            q.set_event_idx(event_idx);
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        // Input that waited for the device can go in once the guest offers buffers.
        let _ = self.drained.write(1);
        Ok(())
    }
    fn queue_notify(&mut self, index: usize) {
        match index {
            RX => {
                if let Err(e) = self.drained.write(1) {
                    self.bad(format!("cannot signal receive buffers: {e}"));
                }
            }
            TX => self.transmit(),
            _ => {}
        }
    }
    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
    }
}
