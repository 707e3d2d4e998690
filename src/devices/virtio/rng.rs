//! virtio-rng (device type 4): one queue; every device-writable buffer the driver
//! offers is filled from the host's getrandom(2).
#![forbid(unsafe_code)]

use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use super::RateLimit;
use super::{ActivateError, Interrupt, VirtioDevice};
use crate::memory::GuestMemory;

const QUEUE_SIZE: u16 = 256;
/// Bytes given per request at most: a hostile length costs no more than this.
const MAX_PER_REQUEST: usize = 64 * 1024;

struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// The entropy device.
pub struct Rng {
    active: Option<Active>,
    acked: u64,
    log: RateLimit,
    /// Bytes handed to the guest (for statistics and tests).
    pub bytes_served: u64,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    pub fn new() -> Self {
        Self {
            active: None,
            acked: 0,
            log: RateLimit::default(),
            bytes_served: 0,
        }
    }

    /// Serves every available request; returns how many were completed.
    fn serve(&mut self) -> usize {
        let Some(a) = self.active.as_mut() else {
            return 0;
        };
        let mut done = 0;
        let mut buf = vec![0u8; 4096];
        let mut recheck = false;
        loop {
            let Some(chain) = a.queue.pop_descriptor_chain(&a.mem) else {
                if recheck {
                    // Notifications said more was available, yet nothing pops: the
                    // available index is broken (e.g. more than a queue's worth ahead).
                    log::warn!("virtio-rng: available ring index is out of range");
                    a.interrupt.device_error();
                    return done;
                }
                // With EVENT_IDX the driver only notifies past the index published
                // here: publish it, and look again if more arrived meanwhile.
                match a.queue.enable_notification(&a.mem) {
                    Ok(true) => {
                        recheck = true;
                        continue;
                    }
                    Ok(false) => break,
                    Err(e) => {
                        log::warn!("virtio-rng: available ring: {e:?}");
                        a.interrupt.device_error();
                        return done;
                    }
                }
            };
            recheck = false;
            let head = chain.head_index();
            let mut written: usize = 0;
            let mut bad = None;
            for desc in chain {
                if !desc.is_write_only() {
                    bad = Some(format!("device-readable buffer at {:#x}", desc.addr().0));
                    break;
                }
                let mut left = (desc.len() as usize).min(MAX_PER_REQUEST - written);
                let mut addr = desc.addr();
                while left > 0 {
                    let n = left.min(buf.len());
                    if let Err(e) = getrandom::fill(&mut buf[..n]) {
                        bad = Some(format!("getrandom failed: {e}"));
                        break;
                    }
                    if let Err(e) = a.mem.write_slice(&buf[..n], addr) {
                        bad = Some(format!("buffer {:#x}+{n}: {e}", addr.0));
                        break;
                    }
                    written += n;
                    left -= n;
                    addr = match addr.0.checked_add(n as u64) {
                        Some(x) => vm_memory::GuestAddress(x),
                        None => break,
                    };
                }
                if bad.is_some() || written >= MAX_PER_REQUEST {
                    break;
                }
            }
            if let Some(what) = bad {
                self.log
                    .warn("virtio-rng", format_args!("bad request: {what}"));
            }
            // A request with a bad buffer completes with what was written before it.
            if let Err(e) = a.queue.add_used(&a.mem, head, written as u32) {
                log::warn!("virtio-rng: cannot complete request {head}: {e:?}");
                a.interrupt.device_error();
                return done;
            }
            self.bytes_served += written as u64;
            done += 1;
        }
        match a.queue.needs_notification(&a.mem) {
            Ok(true) => a.interrupt.signal_used(),
            Ok(false) => {}
            Err(e) => {
                log::warn!("virtio-rng: used ring: {e:?}");
                a.interrupt.device_error();
            }
        }
        done
    }
}

impl VirtioDevice for Rng {
    fn name(&self) -> &str {
        "virtio-rng"
    }
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn device_features(&self) -> u64 {
        1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX
    }
    fn set_acked_features(&mut self, acked: u64) {
        self.acked = acked;
    }
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let [queue] = super::take_queues(self.name(), queues, self.acked)?;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }
    fn queue_notify(&mut self, _index: usize) {
        let n = self.serve();
        log::trace!("virtio-rng: {n} requests served");
    }
    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::{Rng, MAX_PER_REQUEST};
    use crate::devices::virtio::test_util::*;
    use crate::devices::virtio::VirtioDevice;
    use crate::memory::GuestMemory;
    use proptest::prelude::{any, prop_assert, proptest, ProptestConfig};
    use vm_memory::{Bytes, GuestAddress};

    fn active(mem: &GuestMemory, q: &virtio_queue::mock::MockSplitQueue<'_, GuestMemory>) -> Rng {
        let mut rng = Rng::new();
        rng.activate(mem.clone(), vec![device_queue(q)], interrupt())
            .unwrap();
        rng
    }

    #[test]
    fn fills_writable_buffers() {
        let mem = mem();
        let q = driver(&mem, 0, 16);
        q.add_desc_chains(
            &[
                desc(BUF, 32, F_WRITE | F_NEXT, 1),
                desc(BUF + 0x100, 32, F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let mut rng = active(&mem, &q);
        rng.queue_notify(0);
        assert_eq!(used(&mem, &q, 0), (1, 0, 64));
        let mut a = [0u8; 32];
        mem.read_slice(&mut a, GuestAddress(BUF)).unwrap();
        assert_ne!(a, [0u8; 32]);
        assert_eq!(rng.bytes_served, 64);
    }

    #[test]
    fn with_event_idx_the_driver_is_asked_to_notify_again() {
        let mem = mem();
        let q = driver(&mem, 0, 16);
        q.add_desc_chains(&[desc(BUF, 16, F_WRITE, 0)], 0).unwrap();
        let mut rng = Rng::new();
        rng.set_acked_features(1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
        rng.activate(mem.clone(), vec![device_queue(&q)], interrupt())
            .unwrap();
        rng.queue_notify(0);
        // avail_event (after the used ring's 16 entries) names the next request: the
        // driver kicks when it makes request 1 available.
        let avail_event: u16 = mem
            .read_obj(GuestAddress(q.used_addr().0 + 4 + 8 * 16))
            .unwrap();
        assert_eq!(avail_event, 1);
    }

    #[test]
    fn an_available_index_far_ahead_is_a_device_error_not_a_spin() {
        let mem = mem();
        let q = driver(&mem, 0, 16);
        random_ring(&mem, &q, &[], &[], Some(1000));
        let irq = interrupt();
        let mut rng = Rng::new();
        rng.set_acked_features(1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
        rng.activate(mem.clone(), vec![device_queue(&q)], irq.clone())
            .unwrap();
        rng.queue_notify(0);
        assert!(irq.needs_reset());
    }

    #[test]
    fn hostile_buffers_complete_without_harm() {
        let mem = mem();
        let q = driver(&mem, 0, 16);
        // Device-readable buffer; buffer beyond guest memory; a huge length.
        q.add_desc_chains(&[desc(BUF, 32, 0, 0)], 0).unwrap();
        q.add_desc_chains(&[desc(MEM_SIZE + 0x1000, 32, F_WRITE, 0)], 1)
            .unwrap();
        q.add_desc_chains(&[desc(BUF, u32::MAX, F_WRITE, 0)], 2)
            .unwrap();
        let mut rng = active(&mem, &q);
        rng.queue_notify(0);
        assert_eq!(used(&mem, &q, 0), (3, 0, 0));
        assert_eq!(used(&mem, &q, 1).2, 0);
        // The huge request is capped.
        assert_eq!(used(&mem, &q, 2).2 as usize, MAX_PER_REQUEST);
    }

    #[test]
    fn notify_before_activation_and_after_reset_is_harmless() {
        let mut rng = Rng::new();
        rng.queue_notify(0);
        let mem = mem();
        let q = driver(&mem, 0, 16);
        let mut rng = active(&mem, &q);
        rng.reset();
        rng.queue_notify(0);
        assert_eq!(rng.bytes_served, 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases(3000)))]
        #[test]
        fn random_rings_never_panic(
            descs in proptest::collection::vec(any_desc(), 16),
            heads in proptest::collection::vec(0u16..20, 0..16),
            bogus in proptest::option::of(any::<u16>()),
        ) {
            let mem = mem();
            let q = driver(&mem, 0, 16);
            random_ring(&mem, &q, &descs, &heads, bogus);
            let mut rng = active(&mem, &q);
            rng.queue_notify(0);
            rng.queue_notify(0);
            prop_assert!(rng.bytes_served <= (heads.len() * MAX_PER_REQUEST) as u64);
        }
    }
}
