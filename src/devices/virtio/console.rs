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

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::RateLimit;
use super::{ActivateError, Interrupt, VirtioDevice};
use crate::console::input::ConsoleSink;
use crate::memory::GuestMemory;

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
        self.log.warn("virtio-console", format_args!("{what}"));
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
        while let Some(chain) = next_chain(&mut a.queues[TX], &a.mem, &a.interrupt) {
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

/// The next available chain of queue `q`; when there is none, re-enables
/// notifications (with EVENT_IDX the driver only notifies past the index published
/// then) and looks once more.
fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
    interrupt: &Interrupt,
) -> Option<virtio_queue::DescriptorChain<&'m GuestMemory>> {
    if let Some(c) = queue.pop_descriptor_chain(mem) {
        return Some(c);
    }
    match queue.enable_notification(mem) {
        Ok(false) => None,
        // More arrived meanwhile. If there is still nothing to pop, the available index
        // is broken (e.g. more than a queue's worth ahead): looping would spin forever.
        Ok(true) => match queue.pop_descriptor_chain(mem) {
            Some(c) => Some(c),
            None => {
                interrupt.device_error();
                None
            }
        },
        Err(_) => {
            interrupt.device_error();
            None
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
            let Some(chain) = next_chain(&mut a.queues[RX], &a.mem, &a.interrupt) else {
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
    // The configuration space (cols, rows, max_nr_ports, emerg_wr) reads as zeros by
    // default: no size or multiport features are offered.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let queues: [Queue; 2] = super::take_queues(self.name(), queues, self.acked)?;
        self.active = Some(Active {
            mem,
            queues: queues.into(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_util::*;
    use crate::test_util::SharedBuf as Out;
    use proptest::prelude::*;

    /// rx queue at 0, tx queue at 0x8000.
    fn setup() -> (VirtioConsole, Out, EventFd) {
        let out = Out::default();
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = VirtioConsole::new(Box::new(out.clone()), drained.try_clone().unwrap());
        (dev, out, drained)
    }

    #[test]
    fn output_and_input_pass_through() {
        let mem = mem();
        let rxq = driver(&mem, 0, 16);
        let txq = driver(&mem, 0x8000, 16);
        let (mut dev, out, drained) = setup();
        mem.write_slice(b"hello hvc", GuestAddress(BUF)).unwrap();
        txq.add_desc_chains(&[desc(BUF, 9, 0, 0)], 0).unwrap();
        rxq.add_desc_chains(&[desc(BUF + 0x1000, 4, F_WRITE, 0)], 0)
            .unwrap();
        rxq.add_desc_chains(&[desc(BUF + 0x2000, 4, F_WRITE, 0)], 1)
            .unwrap();
        // Input before activation waits.
        assert_eq!(dev.enqueue_input(b"early"), 0);
        dev.activate(
            mem.clone(),
            vec![device_queue(&rxq), device_queue(&txq)],
            interrupt(),
        )
        .unwrap();
        assert_eq!(drained.read().unwrap(), 1, "waiting input may move on");
        dev.queue_notify(TX);
        assert_eq!(&*out.0.lock().unwrap(), b"hello hvc");
        assert_eq!(used(&mem, &txq, 0), (1, 0, 0));
        // 10 bytes, 8 bytes of buffers: 8 taken, the rest waits for more buffers.
        assert_eq!(dev.enqueue_input(b"0123456789"), 8);
        assert_eq!(used(&mem, &rxq, 0), (2, 0, 4));
        assert_eq!(used(&mem, &rxq, 1).2, 4);
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(BUF + 0x2000))
            .unwrap();
        assert_eq!(&got, b"4567");
        assert_eq!(dev.enqueue_input(b"89"), 0);
        // New receive buffers: the device says so.
        dev.queue_notify(RX);
        assert_eq!(drained.read().unwrap(), 1);
    }

    #[test]
    fn hostile_chains_are_refused_quietly() {
        let mem = mem();
        let rxq = driver(&mem, 0, 16);
        let txq = driver(&mem, 0x8000, 16);
        let (mut dev, out, _) = setup();
        // tx: device-writable buffer, buffer beyond memory, huge length.
        txq.add_desc_chains(&[desc(BUF, 8, F_WRITE, 0)], 0).unwrap();
        txq.add_desc_chains(&[desc(MEM_SIZE - 4, 64, 0, 0)], 1)
            .unwrap();
        txq.add_desc_chains(&[desc(BUF, u32::MAX, 0, 0)], 2)
            .unwrap();
        // rx: device-readable buffer.
        rxq.add_desc_chains(&[desc(BUF, 8, 0, 0)], 0).unwrap();
        dev.activate(
            mem.clone(),
            vec![device_queue(&rxq), device_queue(&txq)],
            interrupt(),
        )
        .unwrap();
        dev.queue_notify(TX);
        assert_eq!(used(&mem, &txq, 0).0, 3);
        assert!(out.0.lock().unwrap().len() <= MAX_TX);
        assert_eq!(dev.enqueue_input(b"abc"), 0);
        assert_eq!(used(&mem, &rxq, 0), (1, 0, 0));
    }

    #[test]
    fn an_available_index_far_ahead_is_a_device_error_not_a_spin() {
        let mem = mem();
        let rxq = driver(&mem, 0, 16);
        let txq = driver(&mem, 0x8000, 16);
        random_ring(&mem, &txq, &[], &[], Some(1000));
        random_ring(&mem, &rxq, &[], &[], Some(999));
        let (mut dev, _, _) = setup();
        let irq = interrupt();
        dev.set_acked_features(1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
        dev.activate(
            mem.clone(),
            vec![device_queue(&rxq), device_queue(&txq)],
            irq.clone(),
        )
        .unwrap();
        dev.queue_notify(TX);
        assert!(irq.needs_reset());
        assert_eq!(dev.enqueue_input(b"x"), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases(3000)))]
        #[test]
        fn random_rings_never_panic(
            rx in proptest::collection::vec(any_desc(), 16),
            rx_heads in proptest::collection::vec(0u16..20, 0..16),
            tx in proptest::collection::vec(any_desc(), 16),
            tx_heads in proptest::collection::vec(0u16..20, 0..16),
            input in proptest::collection::vec(any::<u8>(), 0..300),
            bogus in proptest::option::of(any::<u16>()),
        ) {
            let mem = mem();
            let rxq = driver(&mem, 0, 16);
            let txq = driver(&mem, 0x8000, 16);
            random_ring(&mem, &rxq, &rx, &rx_heads, bogus);
            random_ring(&mem, &txq, &tx, &tx_heads, bogus);
            let (mut dev, out, _) = setup();
            dev.activate(mem.clone(), vec![device_queue(&rxq), device_queue(&txq)], interrupt())
                .unwrap();
            dev.queue_notify(TX);
            let taken = dev.enqueue_input(&input);
            prop_assert!(taken <= input.len());
            prop_assert!(out.0.lock().unwrap().len() <= tx_heads.len() * MAX_TX);
        }
    }
}
