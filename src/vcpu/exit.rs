//! Exit dispatch: a plain function of (exit, buses) that unit tests drive without KVM.
#![forbid(unsafe_code)]

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};

use super::stats::ExitStats;
use crate::bus::Buses;
use crate::outcome::VmOutcome;

/// A VM exit, decoded from `kvm_run` (see [`super::Vcpu`]) or built by a test.
#[derive(Debug)]
pub enum Exit<'a> {
    /// `in`/`ins`: `data` holds `data.len() / size` items of `size` bytes.
    IoIn {
        port: u16,
        size: usize,
        data: &'a mut [u8],
    },
    /// `out`/`outs`: as `IoIn`.
    IoOut {
        port: u16,
        size: usize,
        data: &'a [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    Hlt,
    /// Triple fault.
    Shutdown,
    SystemEvent {
        kind: u32,
        data: &'a [u64],
    },
    /// KVM_EXIT_INTERNAL_ERROR; the vCPU gathers the details (it needs the fd).
    InternalError,
    FailEntry {
        reason: u64,
        cpu: u32,
    },
    /// KVM_RUN returned EINTR/EAGAIN: a kick or a signal.
    Interrupted,
    /// Any exit reason Ferrite does not handle.
    Unhandled(String),
}

/// What the vCPU loop does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    /// The vCPU executed HLT and the VMM owns the wake-up (no in-kernel irqchip).
    Halt,
    /// Re-check for stop requests and commands, then continue.
    CheckCommands,
    /// End the VM with this outcome.
    Stop(VmOutcome),
    /// Collect and report the internal-error details, then end the VM.
    ReportInternalError,
}

/// Dispatches one exit to the buses.
pub fn handle_exit(exit: Exit<'_>, buses: &Buses, stats: &ExitStats, vcpu: usize) -> Action {
    match exit {
        Exit::IoIn { port, size, data } => {
            stats.pio_in.inc();
            let size = size.max(1);
            // `rep ins` items all hit the same port: the exit counts once, for the
            // device that claimed it.
            let mut claimed = None;
            for item in data.chunks_mut(size) {
                claimed = buses.pio.read_claimed(u64::from(port), item);
            }
            stats.pio_in_by_device.record(claimed);
            Action::Continue
        }
        Exit::IoOut { port, size, data } => {
            stats.pio_out.inc();
            let size = size.max(1);
            let mut claimed = None;
            for item in data.chunks(size) {
                claimed = buses.pio.write_claimed(u64::from(port), item);
            }
            stats.pio_out_by_device.record(claimed);
            Action::Continue
        }
        Exit::MmioRead { addr, data } => {
            stats.mmio_read.inc();
            stats
                .mmio_read_by_device
                .record(buses.mmio.read_claimed(addr, data));
            Action::Continue
        }
        Exit::MmioWrite { addr, data } => {
            stats.mmio_write.inc();
            stats
                .mmio_write_by_device
                .record(buses.mmio.write_claimed(addr, data));
            Action::Continue
        }
        Exit::Hlt => {
            stats.hlt.inc();
            Action::Halt
        }
        Exit::Interrupted => {
            stats.interrupted.inc();
            Action::CheckCommands
        }
        Exit::Shutdown => {
            stats.shutdown.inc();
            Action::Stop(VmOutcome::TripleFault { vcpu })
        }
        Exit::SystemEvent { kind, data } => {
            stats.system_event.inc();
            match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Action::Stop(VmOutcome::PowerOff),
                KVM_SYSTEM_EVENT_RESET => Action::Stop(VmOutcome::Reset),
                KVM_SYSTEM_EVENT_CRASH => Action::Stop(VmOutcome::GuestPanic),
                other => {
                    log::warn!("vCPU {vcpu}: ignoring system event {other} (data {data:x?})");
                    Action::Continue
                }
            }
        }
        Exit::InternalError => {
            stats.internal_error.inc();
            Action::ReportInternalError
        }
        Exit::FailEntry { reason, cpu } => {
            stats.fail_entry.inc();
            Action::Stop(VmOutcome::Error(format!(
                "vCPU {vcpu}: KVM_EXIT_FAIL_ENTRY, hardware entry failure reason {reason:#x} on host CPU {cpu}"
            )))
        }
        Exit::Unhandled(what) => {
            stats.unhandled.inc();
            Action::Stop(VmOutcome::Error(format!(
                "vCPU {vcpu}: unhandled exit {what}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::tests::Recorder;
    use std::sync::{Arc, Mutex};

    fn stats(b: &Buses) -> ExitStats {
        ExitStats::new(b)
    }

    fn buses() -> (Buses, Arc<Mutex<Recorder>>) {
        let rec = Arc::new(Mutex::new(Recorder::default()));
        let mut b = Buses::default();
        b.pio.insert("rec", 0x3f8, 8, rec.clone()).unwrap();
        b.mmio
            .insert("rec", 0xd000_0000, 0x1000, rec.clone())
            .unwrap();
        (b, rec)
    }

    #[test]
    fn pio_out_reaches_device() {
        let (b, rec) = buses();
        let s = stats(&b);
        let a = handle_exit(
            Exit::IoOut {
                port: 0x3f9,
                size: 1,
                data: &[7],
            },
            &b,
            &s,
            0,
        );
        assert_eq!(a, Action::Continue);
        assert_eq!(rec.lock().unwrap().writes, vec![(1, vec![7])]);
        assert_eq!(s.pio_out.get(), 1);
        assert_eq!(s.pio_out_by_device.device(0), 1);
        assert_eq!(s.unclaimed_pio_out(), 0);
    }

    #[test]
    fn rep_outs_is_split_into_items() {
        let (b, rec) = buses();
        let s = stats(&b);
        handle_exit(
            Exit::IoOut {
                port: 0x3f8,
                size: 2,
                data: &[1, 2, 3, 4, 5, 6],
            },
            &b,
            &s,
            0,
        );
        let w = &rec.lock().unwrap().writes;
        assert_eq!(w, &vec![(0, vec![1, 2]), (0, vec![3, 4]), (0, vec![5, 6])]);
        // One exit, one count for the device, however many items.
        assert_eq!((s.pio_out.get(), s.pio_out_by_device.device(0)), (1, 1));
    }

    #[test]
    fn rep_ins_fills_every_item() {
        let (b, rec) = buses();
        let s = stats(&b);
        let mut data = [0u8; 8];
        handle_exit(
            Exit::IoIn {
                port: 0x3fb,
                size: 4,
                data: &mut data,
            },
            &b,
            &s,
            0,
        );
        assert_eq!(data, [3; 8]);
        assert_eq!(rec.lock().unwrap().reads, vec![3, 3]);
    }

    #[test]
    fn unclaimed_accesses_read_ones_and_are_counted() {
        let (b, _) = buses();
        let s = stats(&b);
        let mut d = [0u8; 4];
        handle_exit(
            Exit::IoIn {
                port: 0x80,
                size: 4,
                data: &mut d,
            },
            &b,
            &s,
            0,
        );
        assert_eq!(d, [0xff; 4]);
        handle_exit(
            Exit::IoOut {
                port: 0x80,
                size: 1,
                data: &[0],
            },
            &b,
            &s,
            0,
        );
        let mut m = [0u8; 8];
        handle_exit(
            Exit::MmioRead {
                addr: 0x1000,
                data: &mut m,
            },
            &b,
            &s,
            0,
        );
        assert_eq!(m, [0xff; 8]);
        handle_exit(
            Exit::MmioWrite {
                addr: 0x1000,
                data: &[1],
            },
            &b,
            &s,
            0,
        );
        assert_eq!(
            (
                s.unclaimed_pio_in(),
                s.unclaimed_pio_out(),
                s.unclaimed_mmio_read(),
                s.unclaimed_mmio_write()
            ),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn mmio_routes_with_offset() {
        let (b, rec) = buses();
        let s = stats(&b);
        handle_exit(
            Exit::MmioWrite {
                addr: 0xd000_0010,
                data: &[1, 2, 3, 4],
            },
            &b,
            &s,
            0,
        );
        assert_eq!(rec.lock().unwrap().writes, vec![(0x10, vec![1, 2, 3, 4])]);
        let mut d = [0u8; 4];
        handle_exit(
            Exit::MmioRead {
                addr: 0xd000_0ffc,
                data: &mut d,
            },
            &b,
            &s,
            0,
        );
        let snap = s.snapshot();
        assert_eq!(snap.mmio[0].device, "rec");
        assert_eq!((snap.mmio[0].reads, snap.mmio[0].writes), (1, 1));
    }

    #[test]
    fn terminal_exits_stop_the_vm() {
        let (b, _) = buses();
        let s = stats(&b);
        assert_eq!(
            handle_exit(Exit::Shutdown, &b, &s, 1),
            Action::Stop(VmOutcome::TripleFault { vcpu: 1 })
        );
        let ev = |kind| handle_exit(Exit::SystemEvent { kind, data: &[] }, &b, &s, 0);
        assert_eq!(ev(KVM_SYSTEM_EVENT_RESET), Action::Stop(VmOutcome::Reset));
        assert_eq!(
            ev(KVM_SYSTEM_EVENT_SHUTDOWN),
            Action::Stop(VmOutcome::PowerOff)
        );
        assert_eq!(
            ev(KVM_SYSTEM_EVENT_CRASH),
            Action::Stop(VmOutcome::GuestPanic)
        );
        assert_eq!(ev(99), Action::Continue);
        assert_eq!(handle_exit(Exit::Hlt, &b, &s, 0), Action::Halt);
        assert_eq!(
            handle_exit(Exit::InternalError, &b, &s, 0),
            Action::ReportInternalError
        );
        assert_eq!(
            handle_exit(Exit::Interrupted, &b, &s, 0),
            Action::CheckCommands
        );
        match handle_exit(
            Exit::FailEntry {
                reason: 0x21,
                cpu: 3,
            },
            &b,
            &s,
            0,
        ) {
            Action::Stop(VmOutcome::Error(m)) => assert!(m.contains("0x21"), "{m}"),
            a => panic!("{a:?}"),
        }
        match handle_exit(Exit::Unhandled("KVM_EXIT_DEBUG".into()), &b, &s, 0) {
            Action::Stop(VmOutcome::Error(m)) => assert!(m.contains("KVM_EXIT_DEBUG")),
            a => panic!("{a:?}"),
        }
        let snap = s.snapshot();
        let count = |n| snap.exit(n).unwrap();
        assert_eq!(
            [
                "shutdown",
                "system_event",
                "hlt",
                "internal_error",
                "interrupted",
                "fail_entry",
                "unhandled"
            ]
            .map(count),
            [1, 4, 1, 1, 1, 1, 1]
        );
    }
}
