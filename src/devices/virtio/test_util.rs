//! Helpers for device unit tests: guest memory, a driver-side queue built with
//! virtio-queue's mock, and random rings for property tests.
#![forbid(unsafe_code)]

pub use crate::test_util::cases;
use std::sync::Arc;

use proptest::prelude::*;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::Interrupt;
use crate::memory::GuestMemory;

pub const MEM_SIZE: u64 = 0x40_0000;
/// Where test buffers live (the mock puts rings from 0).
pub const BUF: u64 = 0x10_0000;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

pub fn mem() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

pub fn interrupt() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
}

pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// A driver-side queue of `len` entries at `start`.
pub fn driver(mem: &GuestMemory, start: u64, len: u16) -> MockSplitQueue<'_, GuestMemory> {
    MockSplitQueue::create(mem, GuestAddress(start), len)
}

pub fn device_queue(q: &MockSplitQueue<'_, GuestMemory>) -> Queue {
    q.create_queue::<Queue>().unwrap()
}

/// (used ring index, (id, len) of entry `i`).
pub fn used(mem: &GuestMemory, q: &MockSplitQueue<'_, GuestMemory>, i: u16) -> (u16, u32, u32) {
    let base = q.used_addr().0;
    let idx: u16 = mem.read_obj(GuestAddress(base + 2)).unwrap();
    let e = base + 4 + 8 * u64::from(i);
    let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
    let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
    (idx, id, len)
}

/// A random descriptor: addresses inside, at the edge of and beyond guest memory,
/// any length, any flags (indirect included), any next index.
pub fn any_desc() -> impl Strategy<Value = (u64, u32, u16, u16)> {
    (
        prop_oneof![
            Just(BUF),
            BUF..MEM_SIZE,
            Just(MEM_SIZE - 1),
            MEM_SIZE..u64::MAX,
            Just(u64::MAX - 3),
        ],
        prop_oneof![Just(0u32), 1u32..4096, any::<u32>()],
        0u16..8,
        0u16..20,
    )
}

/// Writes a random descriptor table of `descs` and makes `heads` available; a
/// `bogus_idx` replaces the available index (e.g. far beyond the queue size).
pub fn random_ring(
    mem: &GuestMemory,
    q: &MockSplitQueue<'_, GuestMemory>,
    descs: &[(u64, u32, u16, u16)],
    heads: &[u16],
    bogus_idx: Option<u16>,
) {
    for (i, &(a, l, f, n)) in descs.iter().enumerate() {
        q.desc_table().store(i as u16, desc(a, l, f, n)).unwrap();
    }
    let avail = q.avail_addr().0;
    for (i, &h) in heads.iter().enumerate() {
        mem.write_obj(h, GuestAddress(avail + 4 + 2 * i as u64))
            .unwrap();
    }
    let idx = bogus_idx.unwrap_or(heads.len() as u16);
    mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
}
