//! i8042 PS/2 controller (ports 0x60 data, 0x64 status/command) with a keyboard on
//! its first port and nothing on its second (aux, the mouse port).
//!
//! Hand-written: vm-superio 0.8's `I8042Device` implements only the CPU-reset
//! command. It has no configuration byte, no keyboard commands, no interrupt and no
//! way to deliver a scan code, so a guest keyboard driver cannot bind to it and
//! Ctrl-Alt-Del cannot be typed into it (which a graceful stop of a guest without ACPI
//! needs). No other maintained crate offers a bus-agnostic 8042.
//!
//! [`Controller`] is the pure state machine (every method returns the [`Effects`] it
//! caused: an interrupt edge on IRQ 1 or 12, a reset pulse); [`I8042`] is the thin bus
//! adapter that turns those into irqfd writes and a [`VmOutcome::Reset`] stop request.
//!
//! What the guest sees:
//! * status: OBF, SYS flag, command/data (last write went to 0x64), keyboard not
//!   inhibited, AUXDATA for bytes from the aux port; IBF is never set (every write
//!   is handled at once).
//! * configuration byte (command 0x20 reads it, 0x60 writes it; 0x21-0x3f/0x61-0x7f
//!   the rest of the 32-byte RAM): keyboard interrupt and system flag set,
//!   translation off — so Linux keeps it off and its atkbd reads raw set-2 codes.
//! * commands 0xA7/0xA8 (aux port off/on), 0xA9 aux test (0x00), 0xAA self-test
//!   (0x55), 0xAB keyboard port test (0x00), 0xAD/0xAE (keyboard port off/on),
//!   0xD0/0xD1 (output port; writing it with bit 0 clear resets), 0xD2/0xD3 (a byte
//!   comes back as keyboard / aux data: Linux's aux loop test), 0xD4 (a byte to the
//!   aux device: none is attached, so it answers 0xFE), 0xF0-0xFF (pulse output lines:
//!   bit 0 clear pulses reset, e.g. 0xFE). Unknown commands are ignored.
//! * keyboard commands (bytes written to 0x60 with no controller command pending):
//!   0xFF reset (FA AA), 0xF2 identify (FA AB 83), 0xED LEDs and 0xF3 typematic (FA,
//!   then FA for the argument), 0xF0 scan-code set (0 asks: FA then the set), 0xF4/0xF5
//!   scanning on/off, 0xEE echo (EE), anything else FA.
//! * interrupts: an edge on IRQ 1 (keyboard, configuration bit 0) or 12 (aux, bit 1)
//!   each time a byte moves into the output buffer — one per byte, as Linux reads one
//!   byte per interrupt — and when an interrupt is enabled with a byte waiting.
//!
//! Memory is bounded whatever the guest does: the keyboard holds at most
//! [`KBD_QUEUE`] bytes, the aux port [`AUX_QUEUE`], the controller one reply.

use std::collections::VecDeque;
use std::sync::Arc;

use super::EventFdTrigger;
use crate::bus::BusDevice;
use crate::outcome::{StopSignal, VmOutcome};

/// I/O base of the controller (data port 0x60, command/status port 0x64).
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
/// ISA interrupt of the keyboard port.
pub const KBD_IRQ: u32 = 1;
/// ISA interrupt of the aux (mouse) port.
pub const AUX_IRQ: u32 = 12;

const DATA: u64 = 0;
const CMD_STATUS: u64 = 4;

/// Bytes a keyboard buffers (a real one holds 16).
pub const KBD_QUEUE: usize = 16;
/// Bytes the aux port buffers.
pub const AUX_QUEUE: usize = 16;

// Status register.
const STS_OBF: u8 = 1 << 0;
const STS_SYS: u8 = 1 << 2;
const STS_CMD: u8 = 1 << 3;
const STS_NOT_INHIBITED: u8 = 1 << 4;
const STS_AUXDATA: u8 = 1 << 5;

// Configuration byte (controller RAM byte 0).
const CTR_KBDINT: u8 = 1 << 0;
const CTR_AUXINT: u8 = 1 << 1;
const CTR_SYS: u8 = 1 << 2;
const CTR_KBDDIS: u8 = 1 << 4;
const CTR_AUXDIS: u8 = 1 << 5;
const CTR_XLATE: u8 = 1 << 6;
/// What firmware would have left: keyboard interrupt on, POST passed, translation off.
const CTR_INITIAL: u8 = CTR_KBDINT | CTR_SYS;

/// Output port: bit 0 is the CPU reset line (active low), bit 1 the A20 gate.
const OUT_RESET_N: u8 = 1 << 0;
const OUT_INITIAL: u8 = OUT_RESET_N | (1 << 1);

const ACK: u8 = 0xfa;
const RESEND: u8 = 0xfe;

/// Where a byte in the output buffer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Source {
    Kbd,
    Aux,
}

/// What a register access (or an injection) caused.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Effects {
    /// An edge on IRQ 1.
    pub irq1: bool,
    /// An edge on IRQ 12.
    pub irq12: bool,
    /// The guest pulsed the CPU reset line.
    pub reset: bool,
}

impl Effects {
    fn or(self, o: Effects) -> Effects {
        Effects {
            irq1: self.irq1 || o.irq1,
            irq12: self.irq12 || o.irq12,
            reset: self.reset || o.reset,
        }
    }
}

/// The keyboard on the first port.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Keyboard {
    queue: VecDeque<u8>,
    scanning: bool,
    set: u8,
    /// A command waiting for its argument byte (0xED, 0xF3, 0xF0).
    awaiting: Option<u8>,
    /// Bytes dropped because the queue was full.
    dropped: u64,
}

impl Keyboard {
    fn new() -> Self {
        Self {
            queue: VecDeque::with_capacity(KBD_QUEUE),
            scanning: true,
            set: 2,
            awaiting: None,
            dropped: 0,
        }
    }

    fn push(&mut self, b: u8) {
        if self.queue.len() < KBD_QUEUE {
            self.queue.push_back(b);
        } else {
            self.dropped += 1;
        }
    }

    /// A byte from the host (the guest's write to port 0x60).
    fn write(&mut self, b: u8) {
        if let Some(cmd) = self.awaiting.take() {
            // An argument is below 0x80; a command byte instead starts a new command.
            if b < 0x80 {
                match cmd {
                    0xf0 => match b {
                        0 => {
                            self.push(ACK);
                            self.push(self.set);
                        }
                        1..=3 => {
                            self.set = b;
                            self.push(ACK);
                        }
                        _ => self.push(RESEND),
                    },
                    // LEDs, typematic rate: nothing to show or repeat.
                    _ => self.push(ACK),
                }
                return;
            }
        }
        match b {
            0xff => {
                *self = Self {
                    dropped: self.dropped,
                    ..Self::new()
                };
                self.push(ACK);
                self.push(0xaa); // basic assurance test passed
            }
            0xf2 => {
                self.push(ACK);
                self.push(0xab);
                self.push(0x83);
            }
            0xed | 0xf3 | 0xf0 => {
                self.awaiting = Some(b);
                self.push(ACK);
            }
            0xf4 => {
                self.queue.clear();
                self.scanning = true;
                self.push(ACK);
            }
            0xf5 => {
                self.queue.clear();
                self.scanning = false;
                self.push(ACK);
            }
            0xee => self.push(0xee),
            _ => self.push(ACK),
        }
    }
}

/// Ctrl-Alt-Del: make codes of left Ctrl, left Alt, Delete, then their break codes in
/// reverse order, in scan-code set 1, 2 and 3.
const CAD_SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
const CAD_SET2: &[u8] = &[
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];
const CAD_SET3: &[u8] = &[0x11, 0x19, 0x64, 0xf0, 0x64, 0xf0, 0x19, 0xf0, 0x11];

/// The controller's register state machine. No fds, no locks: unit-testable. Also
/// the i8042's state in a snapshot ([`I8042State`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Controller {
    /// 32 bytes of controller RAM; byte 0 is the configuration byte.
    ram: [u8; 32],
    out_port: u8,
    /// The last write went to the command port (status bit 3).
    last_was_cmd: bool,
    /// A controller command waiting for its data byte.
    pending: Option<u8>,
    /// The controller's own reply, delivered before keyboard and aux bytes.
    reply: Option<(u8, Source)>,
    kbd: Keyboard,
    aux: VecDeque<u8>,
    /// The output buffer.
    obf: Option<(u8, Source)>,
    /// What a read of port 0x60 returns when the output buffer is empty.
    last_read: u8,
}

impl Default for Controller {
    fn default() -> Self {
        Self::new()
    }
}

impl Controller {
    pub fn new() -> Self {
        let mut ram = [0u8; 32];
        ram[0] = CTR_INITIAL;
        Self {
            ram,
            out_port: OUT_INITIAL,
            last_was_cmd: false,
            pending: None,
            reply: None,
            kbd: Keyboard::new(),
            aux: VecDeque::with_capacity(AUX_QUEUE),
            obf: None,
            last_read: 0,
        }
    }

    fn ctr(&self) -> u8 {
        self.ram[0]
    }

    pub fn status(&self) -> u8 {
        let mut s = STS_NOT_INHIBITED;
        if self.ctr() & CTR_SYS != 0 {
            s |= STS_SYS;
        }
        if self.last_was_cmd {
            s |= STS_CMD;
        }
        match self.obf {
            Some((_, Source::Kbd)) => s |= STS_OBF,
            Some((_, Source::Aux)) => s |= STS_OBF | STS_AUXDATA,
            None => {}
        }
        s
    }

    /// The interrupt edge for a byte from `src` entering the output buffer.
    fn edge(&self, src: Source) -> Effects {
        match src {
            Source::Kbd if self.ctr() & CTR_KBDINT != 0 => Effects {
                irq1: true,
                ..Effects::default()
            },
            Source::Aux if self.ctr() & CTR_AUXINT != 0 => Effects {
                irq12: true,
                ..Effects::default()
            },
            _ => Effects::default(),
        }
    }

    /// Moves the next byte into an empty output buffer: the controller's reply first,
    /// then the keyboard's, then the aux port's (each port only while enabled).
    fn refill(&mut self) -> Effects {
        if self.obf.is_some() {
            return Effects::default();
        }
        let next = if let Some(r) = self.reply.take() {
            Some(r)
        } else if self.ctr() & CTR_KBDDIS == 0 && !self.kbd.queue.is_empty() {
            self.kbd.queue.pop_front().map(|b| (b, Source::Kbd))
        } else if self.ctr() & CTR_AUXDIS == 0 {
            self.aux.pop_front().map(|b| (b, Source::Aux))
        } else {
            None
        };
        match next {
            Some((b, src)) => {
                self.obf = Some((b, src));
                self.edge(src)
            }
            None => Effects::default(),
        }
    }

    fn reply(&mut self, b: u8, src: Source) -> Effects {
        self.reply = Some((b, src));
        self.refill()
    }

    fn set_ctr(&mut self, v: u8) -> Effects {
        let before = self.ctr();
        self.ram[0] = v;
        // An interrupt enabled while a byte waits: the line rises now.
        let mut fx = match self.obf {
            Some((_, Source::Kbd)) if before & CTR_KBDINT == 0 => self.edge(Source::Kbd),
            Some((_, Source::Aux)) if before & CTR_AUXINT == 0 => self.edge(Source::Aux),
            _ => Effects::default(),
        };
        fx = fx.or(self.refill());
        fx
    }

    /// A guest read at `offset` (0 = port 0x60, 4 = port 0x64).
    pub fn read(&mut self, offset: u64) -> (u8, Effects) {
        match offset {
            DATA => match self.obf.take() {
                Some((b, _)) => {
                    self.last_read = b;
                    (b, self.refill())
                }
                None => (self.last_read, Effects::default()),
            },
            CMD_STATUS => (self.status(), Effects::default()),
            _ => (0, Effects::default()),
        }
    }

    /// A guest write of `v` at `offset`.
    pub fn write(&mut self, offset: u64, v: u8) -> Effects {
        match offset {
            CMD_STATUS => {
                self.last_was_cmd = true;
                self.pending = None;
                self.command(v)
            }
            DATA => {
                self.last_was_cmd = false;
                match self.pending.take() {
                    Some(cmd) => self.command_data(cmd, v),
                    None => {
                        // Sending to the keyboard enables its port (as on hardware and
                        // QEMU).
                        self.ram[0] &= !CTR_KBDDIS;
                        self.kbd.write(v);
                        self.refill()
                    }
                }
            }
            _ => Effects::default(),
        }
    }

    fn command(&mut self, cmd: u8) -> Effects {
        match cmd {
            0x20..=0x3f => self.reply(self.ram[usize::from(cmd & 0x1f)], Source::Kbd),
            0x60..=0x7f | 0xd1..=0xd4 => {
                self.pending = Some(cmd);
                Effects::default()
            }
            0xa7 => self.set_ctr(self.ctr() | CTR_AUXDIS),
            0xa8 => self.set_ctr(self.ctr() & !CTR_AUXDIS),
            0xa9 | 0xab => self.reply(0x00, Source::Kbd),
            0xaa => {
                self.ram[0] |= CTR_SYS;
                self.reply(0x55, Source::Kbd)
            }
            0xad => self.set_ctr(self.ctr() | CTR_KBDDIS),
            0xae => self.set_ctr(self.ctr() & !CTR_KBDDIS),
            0xd0 => self.reply(self.out_port, Source::Kbd),
            0xf0..=0xff if cmd & 1 == 0 => Effects {
                reset: true,
                ..Effects::default()
            },
            _ => Effects::default(),
        }
    }

    fn command_data(&mut self, cmd: u8, v: u8) -> Effects {
        match cmd {
            0x60 => self.set_ctr(v),
            0x61..=0x7f => {
                self.ram[usize::from(cmd & 0x1f)] = v;
                Effects::default()
            }
            0xd1 => {
                self.out_port = v;
                Effects {
                    reset: v & OUT_RESET_N == 0,
                    ..Effects::default()
                }
            }
            0xd2 => self.reply(v, Source::Kbd),
            0xd3 => self.reply(v, Source::Aux),
            0xd4 => {
                // No aux device: nobody acknowledges.
                if self.aux.len() < AUX_QUEUE {
                    self.aux.push_back(RESEND);
                }
                self.refill()
            }
            _ => Effects::default(),
        }
    }

    /// Types Ctrl-Alt-Del (press and release) in the keyboard's current scan-code set
    /// (set 1 when the controller translates set 2). All or nothing: false when the
    /// keyboard is not scanning (its driver turned it off, or never on) or has no room.
    pub fn inject_ctrl_alt_del(&mut self) -> (bool, Effects) {
        let codes = match (self.kbd.set, self.ctr() & CTR_XLATE != 0) {
            (1, _) | (2, true) => CAD_SET1,
            (3, _) => CAD_SET3,
            _ => CAD_SET2,
        };
        if !self.kbd.scanning || KBD_QUEUE - self.kbd.queue.len() < codes.len() {
            return (false, Effects::default());
        }
        for &b in codes {
            self.kbd.push(b);
        }
        (true, self.refill())
    }

    /// Bytes waiting in the controller (output buffer, reply, keyboard and aux queues).
    pub fn queued(&self) -> usize {
        usize::from(self.obf.is_some())
            + usize::from(self.reply.is_some())
            + self.kbd.queue.len()
            + self.aux.len()
    }
}

/// The controller on the PIO bus, with its interrupt lines and the reset line.
/// The i8042 in a snapshot: the whole controller (configuration byte and RAM, output
/// port, pending command, output buffer, keyboard and aux queues).
pub type I8042State = Controller;

pub struct I8042 {
    ctl: Controller,
    irq1: EventFdTrigger,
    irq12: EventFdTrigger,
    stop: Arc<StopSignal>,
}

impl I8042 {
    pub fn new(irq1: EventFdTrigger, irq12: EventFdTrigger, stop: Arc<StopSignal>) -> Self {
        Self {
            ctl: Controller::new(),
            irq1,
            irq12,
            stop,
        }
    }

    fn apply(&self, fx: Effects) {
        use vm_superio::Trigger;
        for (raise, line, n) in [(fx.irq1, &self.irq1, 1), (fx.irq12, &self.irq12, 12)] {
            if raise {
                if let Err(e) = line.trigger() {
                    log::warn!("i8042: cannot raise IRQ {n}: {e}");
                }
            }
        }
        if fx.reset {
            self.stop.request(VmOutcome::Reset);
        }
    }

    /// Types Ctrl-Alt-Del into the guest (see [`Controller::inject_ctrl_alt_del`]).
    /// Called from the event-loop thread with the device's mutex held.
    pub fn save(&self) -> I8042State {
        self.ctl.clone()
    }

    /// Puts `state` back (a restore); queues longer than the device holds are refused.
    pub fn restore(&mut self, state: &I8042State) -> Result<(), String> {
        if state.kbd.queue.len() > KBD_QUEUE || state.aux.len() > AUX_QUEUE {
            return Err(format!(
                "{} keyboard and {} aux bytes queued, at most {KBD_QUEUE} and {AUX_QUEUE}",
                state.kbd.queue.len(),
                state.aux.len()
            ));
        }
        self.ctl = state.clone();
        Ok(())
    }

    pub fn inject_ctrl_alt_del(&mut self) -> bool {
        let (queued, fx) = self.ctl.inject_ctrl_alt_del();
        self.apply(fx);
        queued
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            let (v, fx) = self.ctl.read(offset);
            *b = v;
            self.apply(fx);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            let fx = self.ctl.write(offset, v);
            self.apply(fx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cmd(c: &mut Controller, v: u8) -> Effects {
        c.write(CMD_STATUS, v)
    }

    fn data(c: &mut Controller) -> Option<u8> {
        if c.status() & STS_OBF == 0 {
            return None;
        }
        Some(c.read(DATA).0)
    }

    fn drain(c: &mut Controller) -> Vec<u8> {
        let mut v = Vec::new();
        while let Some(b) = data(c) {
            v.push(b);
            assert!(v.len() < 64, "output never ends");
        }
        v
    }

    #[test]
    fn self_tests_and_configuration_byte() {
        let mut c = Controller::new();
        let st = c.status();
        assert_eq!(st & STS_OBF, 0);
        assert_ne!(st & STS_NOT_INHIBITED, 0, "keylock must read as unlocked");
        assert_ne!(st & STS_SYS, 0);
        cmd(&mut c, 0xaa);
        assert_ne!(c.status() & STS_CMD, 0);
        assert_eq!(drain(&mut c), [0x55]);
        cmd(&mut c, 0xab);
        assert_eq!(drain(&mut c), [0x00]);
        cmd(&mut c, 0xa9);
        assert_eq!(drain(&mut c), [0x00]);
        cmd(&mut c, 0x20);
        let ctr = drain(&mut c);
        assert_eq!(ctr, [CTR_INITIAL]);
        assert_eq!(ctr[0] & CTR_XLATE, 0, "translation off");
        cmd(&mut c, 0x60);
        c.write(DATA, 0x47);
        assert_eq!(c.status() & STS_CMD, 0);
        cmd(&mut c, 0x20);
        assert_eq!(drain(&mut c), [0x47]);
        // Port enable/disable commands flip their configuration bits.
        cmd(&mut c, 0xa7);
        cmd(&mut c, 0xad);
        cmd(&mut c, 0x20);
        assert_eq!(drain(&mut c), [0x47 | CTR_AUXDIS | CTR_KBDDIS]);
        cmd(&mut c, 0xa8);
        cmd(&mut c, 0xae);
        cmd(&mut c, 0x20);
        assert_eq!(drain(&mut c), [0x47 & !(CTR_AUXDIS | CTR_KBDDIS)]);
        // Other RAM bytes.
        cmd(&mut c, 0x65);
        c.write(DATA, 0x99);
        cmd(&mut c, 0x25);
        assert_eq!(drain(&mut c), [0x99]);
    }

    #[test]
    fn aux_loop_comes_back_as_aux_data_with_irq12() {
        let mut c = Controller::new();
        cmd(&mut c, 0x60);
        c.write(DATA, CTR_KBDINT | CTR_AUXINT | CTR_SYS);
        cmd(&mut c, 0xd3);
        let fx = c.write(DATA, 0x5a);
        assert!(fx.irq12 && !fx.irq1);
        assert_eq!(c.status() & (STS_OBF | STS_AUXDATA), STS_OBF | STS_AUXDATA);
        assert_eq!(c.read(DATA).0, 0x5a);
        cmd(&mut c, 0xd2);
        let fx = c.write(DATA, 0x33);
        assert!(fx.irq1 && !fx.irq12);
        assert_eq!(c.status() & STS_AUXDATA, 0);
        assert_eq!(drain(&mut c), [0x33]);
        // Nothing on the aux port answers.
        cmd(&mut c, 0xd4);
        c.write(DATA, 0xf2);
        assert_eq!(drain(&mut c), [RESEND]);
    }

    #[test]
    fn keyboard_commands() {
        let mut c = Controller::new();
        c.write(DATA, 0xff);
        assert_eq!(drain(&mut c), [ACK, 0xaa]);
        c.write(DATA, 0xf2);
        assert_eq!(drain(&mut c), [ACK, 0xab, 0x83]);
        c.write(DATA, 0xed);
        assert_eq!(drain(&mut c), [ACK]);
        c.write(DATA, 0x07);
        assert_eq!(drain(&mut c), [ACK]);
        c.write(DATA, 0xf3);
        c.write(DATA, 0x20);
        assert_eq!(drain(&mut c), [ACK, ACK]);
        c.write(DATA, 0xf0);
        c.write(DATA, 0x00);
        assert_eq!(drain(&mut c), [ACK, ACK, 2]);
        c.write(DATA, 0xf0);
        c.write(DATA, 0x09);
        assert_eq!(drain(&mut c), [ACK, RESEND]);
        c.write(DATA, 0xee);
        assert_eq!(drain(&mut c), [0xee]);
        c.write(DATA, 0xf5);
        c.write(DATA, 0xf4);
        c.write(DATA, 0x42);
        assert_eq!(drain(&mut c), [ACK, ACK, ACK]);
    }

    #[test]
    fn one_irq1_edge_per_byte_only_while_enabled() {
        let mut c = Controller::new();
        let fx = c.write(DATA, 0xf2);
        assert!(fx.irq1, "first byte enters the output buffer");
        let (b, fx) = c.read(DATA);
        assert_eq!(b, ACK);
        assert!(fx.irq1, "next byte, next edge");
        let (_, fx) = c.read(DATA);
        assert!(fx.irq1);
        let (_, fx) = c.read(DATA);
        assert!(!fx.irq1, "queue empty");
        // Interrupt off: bytes arrive without edges; turning it on raises one.
        cmd(&mut c, 0x60);
        c.write(DATA, CTR_SYS);
        let fx = c.write(DATA, 0xee);
        assert!(!fx.irq1);
        cmd(&mut c, 0x60);
        let fx = c.write(DATA, CTR_SYS | CTR_KBDINT);
        assert!(fx.irq1);
        assert_eq!(drain(&mut c), [0xee]);
    }

    #[test]
    fn disabled_keyboard_port_holds_its_bytes() {
        let mut c = Controller::new();
        let (ok, _) = c.inject_ctrl_alt_del();
        assert!(ok);
        cmd(&mut c, 0xad);
        // The first byte had already moved into the output buffer.
        assert_eq!(drain(&mut c), [0x14]);
        cmd(&mut c, 0xae);
        assert_eq!(drain(&mut c), CAD_SET2[1..]);
    }

    #[test]
    fn ctrl_alt_del_in_each_scan_code_set() {
        let mut c = Controller::new();
        assert!(c.inject_ctrl_alt_del().0);
        assert_eq!(drain(&mut c), CAD_SET2);
        c.write(DATA, 0xf0);
        c.write(DATA, 1);
        drain(&mut c);
        assert!(c.inject_ctrl_alt_del().0);
        assert_eq!(drain(&mut c), CAD_SET1);
        c.write(DATA, 0xf0);
        c.write(DATA, 3);
        drain(&mut c);
        assert!(c.inject_ctrl_alt_del().0);
        assert_eq!(drain(&mut c), CAD_SET3);
        // Set 2 behind the controller's translation arrives as set 1.
        c.write(DATA, 0xf0);
        c.write(DATA, 2);
        cmd(&mut c, 0x60);
        c.write(DATA, CTR_INITIAL | CTR_XLATE);
        drain(&mut c);
        assert!(c.inject_ctrl_alt_del().0);
        assert_eq!(drain(&mut c), CAD_SET1);
    }

    #[test]
    fn ctrl_alt_del_needs_a_scanning_keyboard_with_room() {
        let mut c = Controller::new();
        c.write(DATA, 0xf5);
        drain(&mut c);
        assert_eq!(c.inject_ctrl_alt_del(), (false, Effects::default()));
        assert_eq!(c.queued(), 0);
        c.write(DATA, 0xf4);
        drain(&mut c);
        assert!(c.inject_ctrl_alt_del().0);
        // A guest that never reads: the second injection does not fit and is refused
        // whole, the third too; memory stays bounded.
        assert!(!c.inject_ctrl_alt_del().0);
        assert!(!c.inject_ctrl_alt_del().0);
        assert!(c.queued() <= KBD_QUEUE + 1);
        assert_eq!(drain(&mut c), CAD_SET2);
    }

    #[test]
    fn reset_pulses() {
        let mut c = Controller::new();
        assert!(cmd(&mut c, 0xfe).reset);
        assert!(cmd(&mut c, 0xf0).reset);
        assert!(!cmd(&mut c, 0xff).reset, "0xff pulses no line");
        cmd(&mut c, 0xd0);
        assert_eq!(drain(&mut c), [OUT_INITIAL]);
        cmd(&mut c, 0xd1);
        assert!(!c.write(DATA, 0xdf).reset, "A20 on, reset line high");
        cmd(&mut c, 0xd1);
        assert!(c.write(DATA, 0xde).reset);
        // A byte for the keyboard never resets.
        assert!(!c.write(DATA, 0xfe).reset);
    }

    #[test]
    fn bus_adapter_raises_irq_and_stops_on_reset() {
        let stop = Arc::new(StopSignal::new());
        let irq1 = EventFdTrigger::new().unwrap();
        let irq1_read = irq1.0.try_clone().unwrap();
        let mut dev = I8042::new(irq1, EventFdTrigger::new().unwrap(), stop.clone());
        dev.write(0, &[0xf2]);
        assert_eq!(irq1_read.read().unwrap(), 1);
        let mut b = [0u8; 4];
        dev.read(4, &mut b);
        assert_eq!(b[0] & STS_OBF, STS_OBF);
        assert_eq!(b[1..], [0, 0, 0]);
        dev.read(0, &mut b);
        assert_eq!(b, [ACK, 0, 0, 0]);
        assert!(dev.inject_ctrl_alt_del());
        dev.write(4, &[0xaa]);
        dev.write(0, &[]);
        assert!(!stop.is_stopping());
        dev.write(4, &[0xfe]);
        assert_eq!(stop.outcome(), Some(VmOutcome::Reset));
    }

    #[test]
    fn any_width_at_any_offset() {
        let stop = Arc::new(StopSignal::new());
        let mut dev = I8042::new(
            EventFdTrigger::new().unwrap(),
            EventFdTrigger::new().unwrap(),
            stop.clone(),
        );
        for off in 0..8u64 {
            for width in 0..=8usize {
                let mut buf = vec![0xeeu8; width];
                dev.read(off, &mut buf);
                if width > 1 {
                    assert!(buf[1..].iter().all(|&b| b == 0), "{off} {width}: {buf:?}");
                }
                // 0xff: no reset pulse, a keyboard reset at the data port.
                dev.write(off, &vec![0xff; width]);
            }
        }
        assert!(!stop.is_stopping());
        assert!(dev.ctl.queued() <= KBD_QUEUE + AUX_QUEUE + 2);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Read(u64),
        Write(u64, u8),
        Inject,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..8).prop_map(Op::Read),
            // Commands and data drawn from the interesting ranges and everything.
            6 => (prop_oneof![Just(0u64), Just(4u64), 0u64..8], any::<u8>())
                .prop_map(|(o, v)| Op::Write(o, v)),
            1 => Just(Op::Inject),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::test_util::cases(256)))]

        /// Any byte sequence at any offset: no panic, bounded memory, a status register
        /// that agrees with the output buffer, and a reset only from a reset command.
        #[test]
        fn hostile_guest(ops in proptest::collection::vec(op(), 0..400)) {
            let mut c = Controller::new();
            let mut prev_cmd: Option<u8> = None;
            for op in ops {
                match op {
                    Op::Read(o) => {
                        let (_, fx) = c.read(o);
                        prop_assert!(!fx.reset);
                        if o != DATA {
                            prop_assert_eq!(fx, Effects::default());
                        }
                    }
                    Op::Write(o, v) => {
                        let fx = c.write(o, v);
                        if fx.reset {
                            let pulse = o == CMD_STATUS && v >= 0xf0 && v & 1 == 0;
                            let outport = o == DATA && prev_cmd == Some(0xd1) && v & 1 == 0;
                            prop_assert!(pulse || outport, "reset from {o} {v:#x}");
                        }
                        if o == CMD_STATUS {
                            prev_cmd = Some(v);
                        } else if o == DATA {
                            prev_cmd = None;
                        }
                    }
                    Op::Inject => {
                        let before = c.queued();
                        let (ok, _) = c.inject_ctrl_alt_del();
                        if !ok {
                            prop_assert_eq!(c.queued(), before);
                        }
                    }
                }
                prop_assert!(c.kbd.queue.len() <= KBD_QUEUE);
                prop_assert!(c.aux.len() <= AUX_QUEUE);
                prop_assert!(c.queued() <= KBD_QUEUE + AUX_QUEUE + 2);
                prop_assert_eq!(c.status() & STS_OBF != 0, c.obf.is_some());
            }
        }
    }

    #[test]
    fn restored_i8042_has_the_command_byte_and_queued_bytes() {
        let dev = || {
            I8042::new(
                EventFdTrigger::new().unwrap(),
                EventFdTrigger::new().unwrap(),
                Arc::new(StopSignal::new()),
            )
        };
        let mut a = dev();
        // Command byte: both interrupts on, translation on.
        a.write(4, &[0x60]);
        a.write(0, &[CTR_KBDINT | CTR_AUXINT | CTR_SYS | CTR_XLATE]);
        // Identify: FA AB 83 queued, FA in the output buffer.
        a.write(0, &[0xf2]);
        let json = serde_json::to_string(&a.save()).unwrap();
        let back: I8042State = serde_json::from_str(&json).unwrap();
        let mut b = dev();
        b.restore(&back).unwrap();
        let read = |d: &mut I8042| {
            let mut out = Vec::new();
            for _ in 0..3 {
                let mut s = [0u8];
                d.read(4, &mut s);
                let mut v = [0u8];
                d.read(0, &mut v);
                out.extend([s[0], v[0]]);
            }
            d.write(4, &[0x20]);
            let mut v = [0u8];
            d.read(0, &mut v);
            out.push(v[0]);
            out
        };
        let ra = read(&mut a);
        assert_eq!(ra[1], ACK);
        assert_eq!(ra[6], CTR_KBDINT | CTR_AUXINT | CTR_SYS | CTR_XLATE);
        assert_eq!(read(&mut b), ra);
        let mut over = back.clone();
        over.aux.extend([0u8; AUX_QUEUE + 1]);
        assert!(b.restore(&over).is_err());
    }
}
