//! Port-I/O and MMIO buses: ordered maps from address ranges to devices.
//!
//! Lock order: a bus lookup takes no lock (the map is immutable once the VM runs);
//! a device access takes exactly that device's mutex and nothing else. The event loop
//! also takes a device mutex (serial input) but never two at once, so there is no
//! ordering between device locks to get wrong.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device as seen from a bus: register reads and writes at an offset into its range.
pub trait BusDevice: Send {
    /// Fills `data` with the register contents at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bus range {base:#x}+{len:#x} for {name} overlaps an existing device")]
    Overlap { name: String, base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} for {name} is empty or wraps around")]
    BadRange { name: String, base: u64, len: u64 },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    /// Position in insertion order: the device's index on this bus (for statistics).
    index: usize,
    name: &'static str,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// An address space (PIO or MMIO) populated with devices.
#[derive(Clone, Default)]
pub struct Bus {
    map: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        name: &'static str,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), Error> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(Error::BadRange {
                name: name.into(),
                base,
                len,
            });
        };
        let overlaps_prev = self
            .map
            .range(..end)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        if overlaps_prev {
            return Err(Error::Overlap {
                name: name.into(),
                base,
                len,
            });
        }
        let index = self.map.len();
        self.map.insert(
            base,
            Entry {
                len,
                index,
                name,
                device,
            },
        );
        Ok(())
    }

    /// Number of devices on the bus; their indices are `0..len()`, in insertion order.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// A label per device, by index: its name, or `name@base` when several devices
    /// share the name (`virtio-mmio@0xd0000000`).
    pub fn device_labels(&self) -> Vec<String> {
        let mut labels = vec![String::new(); self.map.len()];
        for (base, e) in &self.map {
            let shared = self.map.values().filter(|o| o.name == e.name).count() > 1;
            labels[e.index] = if shared {
                format!("{}@{base:#x}", e.name)
            } else {
                e.name.to_string()
            };
        }
        labels
    }

    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (base, entry) = self.map.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((*base, entry))
    }

    /// Name of the device covering `addr`, if any.
    pub fn device_name(&self, addr: u64) -> Option<&'static str> {
        self.find(addr).map(|(_, e)| e.name)
    }

    /// Reads from the device covering `addr`. Returns false when nothing claims the
    /// address; `data` is then filled with all ones, as an open bus reads on a PC.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.read_claimed(addr, data).is_some()
    }

    /// Writes to the device covering `addr`. Returns false (and drops the write)
    /// when nothing claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.write_claimed(addr, data).is_some()
    }

    /// As [`Self::read`], returning the index of the device that claimed the access.
    #[inline]
    pub fn read_claimed(&self, addr: u64, data: &mut [u8]) -> Option<usize> {
        match self.find(addr) {
            Some((base, e)) => {
                let mut dev = e.device.lock().unwrap_or_else(|p| p.into_inner());
                dev.read(addr - base, data);
                Some(e.index)
            }
            None => {
                data.fill(0xff);
                None
            }
        }
    }

    /// As [`Self::write`], returning the index of the device that claimed the access.
    #[inline]
    pub fn write_claimed(&self, addr: u64, data: &[u8]) -> Option<usize> {
        let (base, e) = self.find(addr)?;
        let mut dev = e.device.lock().unwrap_or_else(|p| p.into_inner());
        dev.write(addr - base, data);
        Some(e.index)
    }
}

/// The two buses a vCPU dispatches exits to.
#[derive(Clone, Default)]
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Records every access; reads return the low byte of the offset.
    #[derive(Default)]
    pub struct Recorder {
        pub writes: Vec<(u64, Vec<u8>)>,
        pub reads: Vec<u64>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.reads.push(offset);
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_offset() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert("rec", 0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [2]);
        assert!(bus.write(0x3ff, &[9]));
        assert!(!bus.write(0x400, &[9]));
        assert!(!bus.read(0x3f7, &mut b));
        assert_eq!(b, [0xff]);
        assert_eq!(dev.lock().unwrap().writes, vec![(7, vec![9])]);
        assert_eq!(bus.device_name(0x3f8), Some("rec"));
    }

    #[test]
    fn rejects_overlap_and_bad_ranges() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert("a", 0x10, 0x10, dev.clone()).unwrap();
        assert!(bus.insert("b", 0x1f, 1, dev.clone()).is_err());
        assert!(bus.insert("c", 0x8, 0x9, dev.clone()).is_err());
        assert!(bus.insert("d", 0x8, 0x8, dev.clone()).is_ok());
        assert!(bus.insert("e", 0x20, 0, dev.clone()).is_err());
        assert!(bus.insert("f", u64::MAX, 2, dev).is_err());
    }

    #[test]
    fn indices_follow_insertion_and_labels_disambiguate() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert("virtio-mmio", 0xd000_1000, 0x1000, dev.clone())
            .unwrap();
        assert!(bus.insert("bad", 0xd000_1800, 1, dev.clone()).is_err());
        bus.insert("serial", 0x3f8, 8, dev.clone()).unwrap();
        bus.insert("virtio-mmio", 0xd000_0000, 0x1000, dev).unwrap();
        assert_eq!(bus.len(), 3);
        assert_eq!(
            bus.device_labels(),
            vec!["virtio-mmio@0xd0001000", "serial", "virtio-mmio@0xd0000000"]
        );
        let mut b = [0u8; 1];
        assert_eq!(bus.read_claimed(0x3f9, &mut b), Some(1));
        assert_eq!(bus.write_claimed(0xd000_0004, &[1]), Some(2));
        assert_eq!(bus.write_claimed(0xd000_1ffc, &[1]), Some(0));
        assert_eq!(bus.write_claimed(0x80, &[1]), None);
    }
}
