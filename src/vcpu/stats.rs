//! Per-vCPU exit counters. One writer (the vCPU thread), any number of readers.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

/// A counter with a single writer: a relaxed load+store, no locked instruction on the
/// exit path.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0
            .store(self.0.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Exit counts by reason, including accesses nothing on the bus claimed.
#[derive(Debug, Default)]
pub struct ExitStats {
    pub pio_in: Counter,
    pub pio_out: Counter,
    pub mmio_read: Counter,
    pub mmio_write: Counter,
    pub unclaimed_pio_in: Counter,
    pub unclaimed_pio_out: Counter,
    pub unclaimed_mmio_read: Counter,
    pub unclaimed_mmio_write: Counter,
    pub hlt: Counter,
    pub interrupted: Counter,
    pub other: Counter,
}

impl ExitStats {
    /// `(name, value)` pairs for reporting.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("pio_in", self.pio_in.get()),
            ("pio_out", self.pio_out.get()),
            ("mmio_read", self.mmio_read.get()),
            ("mmio_write", self.mmio_write.get()),
            ("unclaimed_pio_in", self.unclaimed_pio_in.get()),
            ("unclaimed_pio_out", self.unclaimed_pio_out.get()),
            ("unclaimed_mmio_read", self.unclaimed_mmio_read.get()),
            ("unclaimed_mmio_write", self.unclaimed_mmio_write.get()),
            ("hlt", self.hlt.get()),
            ("interrupted", self.interrupted.get()),
            ("other", self.other.get()),
        ]
    }
}
