//! MC146818 CMOS RTC at ports 0x70/0x71: the wall-clock time in BCD, 24-hour mode, and
//! 128 bytes of NVRAM. Without it Linux spends seconds probing for a clock. No
//! alarms or periodic interrupts: the guest's timekeeping uses kvm-clock or the TSC.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

pub const CMOS_BASE: u64 = 0x70;
pub const CMOS_LEN: u64 = 2;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

/// Civil date and time from seconds since the Unix epoch (UTC).
pub fn civil_from_unix(secs: u64) -> (u64, u8, u8, u8, u8, u8, u8) {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (
        (rem / 3600) as u8,
        ((rem % 3600) / 60) as u8,
        (rem % 60) as u8,
    );
    // 1970-01-01 was a Thursday; CMOS weekday 1 = Sunday.
    let weekday = ((days + 4) % 7 + 1) as u8;
    // Days-to-date conversion on the proleptic Gregorian calendar (era of 400 years).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = (yoe + era * 400 + i64::from(mo <= 2)) as u64;
    (y, mo, d, h, m, s, weekday)
}

fn bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

/// The CMOS in a snapshot: the index register and the NVRAM. The clock is not saved:
/// it reads the host's time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CmosState {
    pub index: u8,
    /// 128 bytes.
    pub nvram: Vec<u8>,
}

pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    now: fn() -> u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl Cmos {
    pub fn new() -> Self {
        Self::with_clock(unix_now)
    }

    pub fn with_clock(now: fn() -> u64) -> Self {
        let mut nvram = [0u8; 128];
        nvram[STATUS_A as usize] = 0x26; // 32.768 kHz base, 1024 Hz rate, no update in progress
        nvram[STATUS_B as usize] = 0x02; // 24-hour, BCD
        nvram[STATUS_D as usize] = 0x80; // battery good
        Self {
            index: 0,
            nvram,
            now,
        }
    }

    pub fn save(&self) -> CmosState {
        CmosState {
            index: self.index,
            nvram: self.nvram.to_vec(),
        }
    }

    pub fn restore(&mut self, state: &CmosState) -> Result<(), String> {
        self.nvram = <[u8; 128]>::try_from(state.nvram.as_slice())
            .map_err(|_| format!("NVRAM of {} bytes, expected 128", state.nvram.len()))?;
        self.index = state.index;
        Ok(())
    }

    fn read_reg(&self, reg: u8) -> u8 {
        let (y, mo, d, h, mi, s, wd) = civil_from_unix((self.now)());
        match reg {
            SECONDS => bcd(s),
            MINUTES => bcd(mi),
            HOURS => bcd(h),
            WEEKDAY => bcd(wd),
            DAY => bcd(d),
            MONTH => bcd(mo),
            YEAR => bcd((y % 100) as u8),
            CENTURY => bcd((y / 100 % 100) as u8),
            STATUS_C => 0,
            r => self.nvram[usize::from(r & 0x7f)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let Some(b) = data.first_mut() {
            *b = if offset == 1 {
                self.read_reg(self.index)
            } else {
                self.index
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port masks NMIs on real hardware; keep the index only.
            0 => self.index = v & 0x7f,
            1 => match self.index {
                // The clock follows the host; writes to it and to status C/D are dropped.
                SECONDS..=YEAR | STATUS_C | STATUS_D | CENTURY => {}
                STATUS_A => self.nvram[STATUS_A as usize] = v & 0x7f,
                r => self.nvram[usize::from(r)] = v,
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_unix(0), (1970, 1, 1, 0, 0, 0, 5));
        // 2026-11-29 10:30:15 UTC, a Sunday.
        assert_eq!(
            civil_from_unix(1_795_948_215),
            (2026, 11, 29, 10, 30, 15, 1)
        );
        // Leap day 2024-02-29.
        let (y, m, d, ..) = civil_from_unix(1_709_164_800);
        assert_eq!((y, m, d), (2024, 2, 29));
    }

    #[test]
    fn reads_time_in_bcd() {
        let mut c = Cmos::with_clock(|| 1_795_948_215);
        let mut rd = |reg: u8| {
            c.write(0, &[reg | 0x80]);
            let mut b = [0u8];
            c.read(1, &mut b);
            b[0]
        };
        assert_eq!(rd(SECONDS), 0x15);
        assert_eq!(rd(MINUTES), 0x30);
        assert_eq!(rd(HOURS), 0x10);
        assert_eq!(rd(DAY), 0x29);
        assert_eq!(rd(MONTH), 0x11);
        assert_eq!(rd(YEAR), 0x26);
        assert_eq!(rd(CENTURY), 0x20);
        assert_eq!(rd(STATUS_A) & 0x80, 0, "never update-in-progress");
        assert_eq!(rd(STATUS_D), 0x80);
    }

    #[test]
    fn nvram_round_trip_and_clock_is_read_only() {
        let mut c = Cmos::with_clock(|| 0);
        c.write(0, &[0x40]);
        c.write(1, &[0xab]);
        let mut b = [0u8];
        c.read(1, &mut b);
        assert_eq!(b[0], 0xab);
        c.write(0, &[SECONDS]);
        c.write(1, &[0x59]);
        c.read(1, &mut b);
        assert_eq!(b[0], 0x00);
    }

    #[test]
    fn restored_cmos_has_the_index_and_nvram() {
        let mut a = Cmos::with_clock(|| 0);
        a.write(0, &[0x40]);
        a.write(1, &[0xa5]);
        a.write(0, &[0x41]);
        let json = serde_json::to_string(&a.save()).unwrap();
        let back: CmosState = serde_json::from_str(&json).unwrap();
        let mut b = Cmos::with_clock(|| 0);
        b.restore(&back).unwrap();
        let mut idx = [0u8];
        b.read(0, &mut idx);
        let mut ia = [0u8];
        a.read(0, &mut ia);
        assert_eq!(idx, ia);
        b.write(0, &[0x40]);
        let mut v = [0u8];
        b.read(1, &mut v);
        assert_eq!(v[0], 0xa5);
        let short = CmosState {
            index: 0,
            nvram: vec![0; 12],
        };
        assert!(b.restore(&short).unwrap_err().contains("12 bytes"));
    }
}
