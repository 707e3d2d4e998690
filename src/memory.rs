//! Guest RAM: creation with vm-memory (anonymous, MAP_NORESERVE, so it can be
//! overcommitted) and registration of each region as a KVM memory slot.
#![allow(unsafe_code)]

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout;

pub type GuestMemory = GuestMemoryMmap<()>;

/// Smallest guest Ferrite accepts: room for its boot structures and a tiny image.
pub const MIN_MEM_SIZE: u64 = 1 << 20;
/// Largest guest Ferrite accepts (1 TiB): beyond it a typo is likelier than intent.
pub const MAX_MEM_SIZE: u64 = 1 << 40;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest memory size {0} bytes is below the minimum of 1 MiB")]
    TooSmall(u64),
    #[error("guest memory size {0} bytes is above the maximum of 1 TiB")]
    TooLarge(u64),
    #[error("cannot map {size} bytes of guest memory")]
    Map {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM refused memory slot {slot} (guest {guest:#x}, {size} bytes)")]
    Register {
        slot: u32,
        guest: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Maps `size` bytes of guest RAM laid out around the 32-bit MMIO hole.
pub fn create(size: u64) -> Result<GuestMemory, Error> {
    if size < MIN_MEM_SIZE {
        return Err(Error::TooSmall(size));
    }
    if size > MAX_MEM_SIZE {
        return Err(Error::TooLarge(size));
    }
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| Error::Map { size, source })
}

/// Total bytes of guest RAM.
pub fn ram_size(mem: &GuestMemory) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// End of the RAM below the 32-bit MMIO hole.
pub fn low_ram_end(mem: &GuestMemory) -> u64 {
    layout::low_ram_end(ram_size(mem))
}

/// Registers every region of `mem` with KVM, one slot per region.
pub fn register(vm: &VmFd, mem: &GuestMemory) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let guest = region.start_addr().0;
        let size = region.len();
        let host = region.as_ptr() as u64;
        let desc = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: guest,
            memory_size: size,
            userspace_addr: host,
            flags: 0,
        };
        // SAFETY: `host..host+size` is a live mapping owned by `mem`'s region, which the
        // caller keeps alive for as long as the VM (the Vmm struct owns both and drops
        // the VM fd first). Slots never overlap: regions of a GuestMemoryMmap are disjoint.
        unsafe { vm.set_user_memory_region(desc) }.map_err(|source| Error::Register {
            slot,
            guest,
            size,
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(create(0), Err(Error::TooSmall(0))));
        assert!(matches!(create(MAX_MEM_SIZE + 1), Err(Error::TooLarge(_))));
    }

    #[test]
    fn large_layout_maps_both_sides_of_the_hole() {
        let mem = create(4 << 30).unwrap();
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0xabu8, GuestAddress(layout::MMIO_HOLE_END))
            .unwrap();
        assert!(mem
            .read_obj::<u8>(GuestAddress(layout::MMIO_HOLE_START))
            .is_err());
    }
}
