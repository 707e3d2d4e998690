//! Firecracker's boot timer (`--boot-timer`): an MMIO page at [`MMIO_BASE`] where the
//! guest writes [`MAGIC`] (123) once its userspace is up, and the VMM logs, at info
//! level, `Guest-boot-time = <wall> us <wall/1000> ms, <cpu> CPU us <cpu/1000> CPU ms`
//! (the µs figures right-aligned in six columns, as Firecracker prints them; its test
//! tooling parses this line).
//!
//! What Firecracker measures from: the moment it starts building the microVM
//! (`InstanceStart`, or the start of a `--no-api` boot), not process start — wall time
//! on `CLOCK_MONOTONIC` and this process's CPU time on `CLOCK_PROCESS_CPUTIME_ID`, both
//! in µs. `--start-time-us`/`--start-time-cpu-us` feed only the `api_server` metrics
//! there (see [`super::metrics::Metrics::record_process_startup`]);
//! [`Timestamp::or_flags`] lets a caller measure from them anyway.
//!
//! Firecracker handles only one-byte writes at offset 0, logs on every such write of
//! 123 (rate-limited), and reads nothing back. This device logs the first one only, so
//! a guest cannot fill the log through it; reads return zeros.
#![allow(unsafe_code)]

use std::time::Duration;

use crate::bus::BusDevice;

/// Where Firecracker puts the boot timer: the first page of its 32-bit MMIO window.
pub const MMIO_BASE: u64 = 0xc000_0000;
/// Its length (one MMIO slot).
pub const MMIO_LEN: u64 = 0x1000;
/// The byte the guest writes when it has booted.
pub const MAGIC: u8 = 123;

fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given, a live local.
    let r = unsafe { libc::clock_gettime(clock, &mut ts) };
    if r != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nsecs = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(nsecs / 1000)
}

/// `CLOCK_MONOTONIC` in µs (the clock of Firecracker's `--start-time-us`).
pub fn monotonic_us() -> u64 {
    clock_us(libc::CLOCK_MONOTONIC)
}

/// This process's CPU time (all threads) in µs.
pub fn process_cpu_us() -> u64 {
    clock_us(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// A point to measure the boot from: wall (monotonic) and process CPU time, in µs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    pub wall_us: u64,
    pub cpu_us: u64,
}

impl Timestamp {
    /// Now. Firecracker takes this when it starts building the microVM.
    pub fn now() -> Self {
        Self {
            wall_us: monotonic_us(),
            cpu_us: process_cpu_us(),
        }
    }

    /// This timestamp with each figure replaced by the flag's value when it is given
    /// (`--start-time-us`, `--start-time-cpu-us`: a launcher's readings of the same
    /// clocks when it started the process).
    pub fn or_flags(self, start_time_us: Option<u64>, start_time_cpu_us: Option<u64>) -> Self {
        Self {
            wall_us: start_time_us.unwrap_or(self.wall_us),
            cpu_us: start_time_cpu_us.unwrap_or(self.cpu_us),
        }
    }

    /// Wall and CPU time from this timestamp to `later` (0 if `later` is earlier).
    pub fn until(self, later: Timestamp) -> (Duration, Duration) {
        (
            Duration::from_micros(later.wall_us.saturating_sub(self.wall_us)),
            Duration::from_micros(later.cpu_us.saturating_sub(self.cpu_us)),
        )
    }
}

/// Firecracker's boot-time line (without the log prefix), for this device and for
/// Ferrite's port-0xf5 boot timer in Firecracker mode.
pub fn boot_time_line(wall: Duration, cpu: Duration) -> String {
    let wall_us = wall.as_micros();
    let cpu_us = cpu.as_micros();
    format!(
        "Guest-boot-time = {:>6} us {} ms, {:>6} CPU us {} CPU ms",
        wall_us,
        wall_us / 1000,
        cpu_us,
        cpu_us / 1000
    )
}

/// The boot-timer MMIO device.
pub struct FcBootTimer {
    start: Timestamp,
    reached: Option<(Duration, Duration)>,
}

impl FcBootTimer {
    /// A timer measuring from `start` (see the module documentation for what
    /// Firecracker passes).
    pub fn new(start: Timestamp) -> Self {
        Self {
            start,
            reached: None,
        }
    }

    /// The wall and CPU time from start to the guest's first [`MAGIC`] write.
    pub fn reached(&self) -> Option<(Duration, Duration)> {
        self.reached
    }
}

impl BusDevice for FcBootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data != [MAGIC] || self.reached.is_some() {
            return;
        }
        let (wall, cpu) = self.start.until(Timestamp::now());
        self.reached = Some((wall, cpu));
        log::info!("{}", boot_time_line(wall, cpu));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_has_firecrackers_format() {
        assert_eq!(
            boot_time_line(
                Duration::from_micros(10_946_919),
                Duration::from_micros(10_909_395)
            ),
            "Guest-boot-time = 10946919 us 10946 ms, 10909395 CPU us 10909 CPU ms"
        );
        // Under six digits the µs figures are padded to six columns.
        assert_eq!(
            boot_time_line(Duration::from_micros(1_500), Duration::from_micros(999)),
            "Guest-boot-time =   1500 us 1 ms,    999 CPU us 0 CPU ms"
        );
    }

    #[test]
    fn only_the_first_one_byte_magic_write_at_offset_zero_counts() {
        let start = Timestamp::now();
        let mut t = FcBootTimer::new(start);
        t.write(0, &[MAGIC - 1]);
        t.write(1, &[MAGIC]);
        t.write(0, &[MAGIC, 0]);
        t.write(0, &[MAGIC, 0, 0, 0]);
        assert_eq!(t.reached(), None);
        t.write(0, &[MAGIC]);
        let first = t.reached().unwrap();
        let later = Timestamp::now();
        assert!(first.0 <= start.until(later).0);
        // Spin until the clock has moved, then write again: nothing changes.
        while Timestamp::now().wall_us == later.wall_us {}
        t.write(0, &[MAGIC]);
        assert_eq!(t.reached(), Some(first));
    }

    #[test]
    fn measured_from_the_start_given_not_from_device_creation() {
        let now = Timestamp::now();
        let start = Timestamp {
            wall_us: now.wall_us.saturating_sub(2_000_000),
            cpu_us: 0,
        };
        let mut t = FcBootTimer::new(start);
        t.write(0, &[MAGIC]);
        let (wall, cpu) = t.reached().unwrap();
        assert!(wall >= Duration::from_secs(2), "{wall:?}");
        assert!(wall < Duration::from_secs(60), "{wall:?}");
        assert!(cpu <= Duration::from_micros(process_cpu_us()));
    }

    #[test]
    fn flags_replace_the_start_they_give() {
        let ts = Timestamp {
            wall_us: 10,
            cpu_us: 20,
        };
        assert_eq!(ts.or_flags(None, None), ts);
        assert_eq!(
            ts.or_flags(Some(1), None),
            Timestamp {
                wall_us: 1,
                cpu_us: 20
            }
        );
        assert_eq!(
            ts.or_flags(None, Some(2)),
            Timestamp {
                wall_us: 10,
                cpu_us: 2
            }
        );
        // A start in the future measures 0, not a wrapped-around figure.
        let future = Timestamp {
            wall_us: u64::MAX,
            cpu_us: u64::MAX,
        };
        assert_eq!(
            future.until(Timestamp::now()),
            (Duration::ZERO, Duration::ZERO)
        );
    }

    #[test]
    fn reads_return_zeros() {
        let mut t = FcBootTimer::new(Timestamp::now());
        let mut b = [0xffu8; 4];
        t.read(0, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
