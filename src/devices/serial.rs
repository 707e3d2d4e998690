//! 16550A UART (COM1 at 0x3f8, IRQ 4): vm-superio's register state machine plus a bus
//! adapter. Output goes to any `Write` (the terminal in production, a buffer in tests);
//! input is pushed by the console input handler with [`Serial::enqueue_input`].

use std::io::Write;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::bus::BusDevice;

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// What the UART tells the rest of Ferrite about its input FIFO.
pub struct SerialActivity {
    /// Written when the guest has drained the input FIFO, so the event loop can push
    /// the input it held back.
    pub drained: EventFd,
}

impl SerialActivity {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            drained: EventFd::new(libc::EFD_NONBLOCK)?,
        }))
    }
}

impl vm_superio::serial::SerialEvents for SerialActivity {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    // The console output queue takes every byte (it counts what it drops itself), so
    // the UART never loses one to a failed write.
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.drained.write(1) {
            log::warn!("serial: cannot signal drained input FIFO: {e}");
        }
    }
}

/// The UART in a snapshot: vm-superio's `SerialState` (which has no serde of its own;
/// vm-superio-ser's is for versionize) mirrored field by field.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// The receive FIFO: bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

/// vm-superio's receive FIFO size (not exported).
const FIFO_SIZE: usize = 64;

type Uart = vm_superio::Serial<EventFdTrigger, Arc<SerialActivity>, Box<dyn Write + Send>>;

/// The UART with its bus adapter.
pub struct Serial {
    uart: Uart,
}

impl Serial {
    pub fn new(
        irq: EventFdTrigger,
        activity: Arc<SerialActivity>,
        out: Box<dyn Write + Send>,
    ) -> Self {
        Self {
            uart: vm_superio::Serial::with_events(irq, activity, out),
        }
    }

    /// Pushes as many of `input` as fit in the receive FIFO; returns how many did.
    /// Returns 0 with room left when the guest put the UART in loopback mode, where
    /// the receive line is disconnected.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(input.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&input[..room]) {
            Ok(n) => n,
            Err(e) => {
                // The bytes are in the FIFO; only the interrupt could not be raised.
                log::warn!("serial: raising the receive interrupt failed: {e}");
                room
            }
        }
    }

    /// The registers and the receive FIFO, for a snapshot.
    pub fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Puts `state` back (a restore, before the VM runs); the UART keeps its interrupt
    /// line, events and output. A pending interrupt the state implies is raised again.
    pub fn restore(&mut self, state: &SerialState) -> Result<(), String> {
        if state.in_buffer.len() > FIFO_SIZE {
            return Err(format!(
                "{} bytes in the receive FIFO, it holds {FIFO_SIZE}",
                state.in_buffer.len()
            ));
        }
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let dup = |t: &EventFdTrigger| {
            t.0.try_clone()
                .map(EventFdTrigger)
                .map_err(|e| format!("cannot duplicate the interrupt eventfd: {e}"))
        };
        let irq = dup(self.uart.interrupt_evt())?;
        let placeholder_irq = dup(self.uart.interrupt_evt())?;
        let events = self.uart.events().clone();
        // from_state needs the writer by value: a placeholder UART holds the place
        // while it moves (the length was checked above, so from_state only fails if
        // raising the interrupt does).
        let placeholder = vm_superio::Serial::with_events(
            placeholder_irq,
            events.clone(),
            Box::new(std::io::sink()) as Box<dyn Write + Send>,
        );
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        self.uart = vm_superio::Serial::from_state(&s, irq, events, out)
            .map_err(|e| format!("raising the restored interrupt failed: {e:?}"))?;
        Ok(())
    }

    /// True when the receive FIFO has no room; input must wait for the guest to drain it.
    pub fn input_fifo_full(&self) -> bool {
        self.uart.fifo_capacity() == 0
    }
}

impl crate::console::input::ConsoleSink for Serial {
    fn enqueue_input(&mut self, input: &[u8]) -> usize {
        Serial::enqueue_input(self, input)
    }
    /// In loopback mode the receive line is disconnected: the FIFO has room but takes
    /// nothing.
    fn accepts_input(&self) -> bool {
        self.input_fifo_full()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let reg = offset + i as u64;
            *b = if reg < COM1_LEN {
                self.uart.read(reg as u8)
            } else {
                0xff
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let reg = offset + i as u64;
            if reg >= COM1_LEN {
                break;
            }
            if let Err(e) = self.uart.write(reg as u8, b) {
                log::warn!("serial: write of {b:#x} to register {reg} failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::SharedBuf as Shared;

    fn serial() -> (Serial, Shared, Arc<SerialActivity>) {
        let out = Shared::default();
        let act = SerialActivity::new().unwrap();
        let s = Serial::new(
            EventFdTrigger::new().unwrap(),
            act.clone(),
            Box::new(out.clone()),
        );
        (s, out, act)
    }

    #[test]
    fn transmit_reaches_writer() {
        let (mut s, out, _) = serial();
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_is_read_back_and_drain_is_signalled() {
        let (mut s, _, act) = serial();
        assert_eq!(s.enqueue_input(b"ab"), 2);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'a');
        s.read(0, &mut b);
        assert_eq!(b[0], b'b');
        assert_eq!(act.drained.read().unwrap(), 1);
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 0, "no data");
    }

    #[test]
    fn full_fifo_takes_only_what_fits() {
        let (mut s, _, _) = serial();
        let big = vec![b'x'; 200];
        let n = s.enqueue_input(&big);
        assert!(n > 0 && n < 200);
        assert_eq!(s.enqueue_input(&big), 0);
    }

    #[test]
    fn garbage_writes_do_not_panic() {
        let (mut s, _, _) = serial();
        for off in 0..16u64 {
            for v in [0u8, 0x80, 0xff] {
                s.write(off, &[v, v, v, v]);
                let mut d = [0u8; 4];
                s.read(off, &mut d);
            }
        }
    }

    /// Register reads a guest would make, in a fixed order (reading IIR and the data
    /// register changes state, so both UARTs are read the same way).
    fn registers(s: &mut Serial) -> Vec<u8> {
        let mut out = Vec::new();
        for reg in [1u64, 3, 4, 5, 6, 7, 2, 0, 0, 0, 5] {
            let mut b = [0u8];
            s.read(reg, &mut b);
            out.push(b[0]);
        }
        out
    }

    #[test]
    fn restored_uart_has_the_same_registers_fifo_and_output() {
        let (mut a, out, _) = serial();
        // Divisor 3 (38400 baud), then 7 data bits, even parity; receive interrupts
        // on; a scratch byte; three bytes the guest has not read.
        a.write(3, &[0x80]);
        a.write(0, &[3]);
        a.write(1, &[0]);
        a.write(3, &[0x1a]);
        a.write(1, &[0x01]);
        a.write(4, &[0x0b]);
        a.write(7, &[0x5a]);
        assert_eq!(a.enqueue_input(b"xyz"), 3);
        let saved = a.save();
        let json = serde_json::to_string(&saved).unwrap();
        let back: SerialState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);

        let irq = EventFdTrigger::new().unwrap();
        let irq_read = irq.0.try_clone().unwrap();
        let out2 = Shared::default();
        let mut b = Serial::new(irq, SerialActivity::new().unwrap(), Box::new(out2.clone()));
        b.restore(&back).unwrap();
        assert_eq!(
            irq_read.read().unwrap(),
            1,
            "pending receive interrupt raised"
        );
        let ra = registers(&mut a);
        assert_eq!(&ra[7..10], b"xyz");
        assert_eq!(registers(&mut b), ra);
        // The divisor too (DLAB on).
        b.write(3, &[0x9a]);
        let mut d = [0u8];
        b.read(0, &mut d);
        assert_eq!(d[0], 3);
        b.write(3, &[0x1a]);
        // Output still goes to the restored UART's own writer.
        b.write(0, b"!");
        assert_eq!(&*out2.0.lock().unwrap(), b"!");
        assert!(out.0.lock().unwrap().is_empty());
    }

    #[test]
    fn restore_refuses_more_input_than_the_fifo_holds() {
        let (mut s, _, _) = serial();
        let mut state = s.save();
        state.in_buffer = vec![0; 65];
        assert!(s.restore(&state).unwrap_err().contains("65 bytes"));
        // Nothing changed.
        assert_eq!(s.enqueue_input(b"a"), 1);
    }
}
