//! ACPI tables for Linux guests: RSDP -> XSDT -> {FADT -> DSDT, MADT}.
//!
//! * MADT: one local APIC per vCPU (how the guest learns of its CPUs), the in-kernel
//!   IOAPIC, ISA overrides (IRQ0 -> GSI2) and LINT1 as NMI.
//! * FADT: a classic (not hardware-reduced) PC with PM1a event/control registers at
//!   [`PM1A_EVT_PORT`]/[`PM1A_CNT_PORT`], so `poweroff` works through ACPI S5 with no
//!   kernel flags and the legacy PIC/PIT stay usable; the reset register is the i8042
//!   command port, so `reboot=acpi` works too; a fixed power button (PM1 bit 8, no
//!   PWR_BUTTON flag), which the graceful stop presses.
//! * DSDT: just the `\_S5` package naming the S5 sleep type.
#![forbid(unsafe_code)]

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use super::layout;
use crate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"FERRIT";
const OEM_REVISION: u32 = 1;
/// PM1a event block (status + enable, 2 bytes each) and control block.
pub const PM1A_EVT_PORT: u16 = 0x600;
pub const PM1A_CNT_PORT: u16 = 0x604;
pub const PM_PORTS_LEN: u64 = 6;
/// The value the DSDT gives for SLP_TYP in S5.
pub const S5_SLP_TYP: u8 = 5;
pub const SCI_IRQ: u16 = 9;
const CMOS_CENTURY_REG: u8 = 0x32;
/// IA-PC boot flags: 8042 present, VGA not present.
const IAPC_BOOT_ARCH: u16 = (1 << 1) | (1 << 2);
const MADT_PCAT_COMPAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ACPI tables ({size} bytes) do not fit between {start:#x} and {end:#x}")]
    TooLarge { size: u64, start: u64, end: u64 },
    #[error("cannot write ACPI table {table} at {addr:#x}")]
    Write {
        table: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("ACPI tables describe at most {max} vCPUs (xAPIC IDs); {0} requested", max = layout::PC_MAX_VCPUS)]
    TooManyVcpus(usize),
}

fn table_id(s: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"FRT     ";
    id[3..7].copy_from_slice(s);
    id
}

/// The virtio-mmio devices as ACPI devices (`LNRO0005`, which Linux's virtio_mmio driver
/// matches), for kernels built without `virtio_mmio.device=` command-line support.
fn virtio_devices(virtio: &[(u64, u32)], body: &mut Vec<u8>) {
    let mut devices = Vec::new();
    for (i, &(base, gsi)) in virtio.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, base as u32, VIRTIO_MMIO_SIZE);
        let irq = aml::Interrupt::new(true, true, false, false, gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid: aml::AmlStr = "LNRO0005";
        let uid = i as u32;
        let name = format!("VR{i:02X}");
        let hid_name = aml::Name::new("_HID".into(), &hid);
        let uid_name = aml::Name::new("_UID".into(), &uid);
        let crs_name = aml::Name::new("_CRS".into(), &crs);
        let mut dev = Vec::new();
        aml::Device::new(name.as_str().into(), vec![&hid_name, &uid_name, &crs_name])
            .to_aml_bytes(&mut dev);
        devices.push(dev);
    }
    if devices.is_empty() {
        return;
    }
    struct Raw(Vec<u8>);
    impl Aml for Raw {
        fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
            sink.vec(&self.0);
        }
    }
    let raw: Vec<Raw> = devices.into_iter().map(Raw).collect();
    let children: Vec<&dyn Aml> = raw.iter().map(|r| r as &dyn Aml).collect();
    aml::Scope::new("\\_SB_".into(), children).to_aml_bytes(body);
}

/// Size of one virtio-mmio register window.
const VIRTIO_MMIO_SIZE: u32 = 0x1000;

fn dsdt(virtio: &[(u64, u32)]) -> Vec<u8> {
    let mut body = Vec::new();
    let s5 = aml::Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP, &0u8, &0u8]);
    aml::Name::new(aml::Path::new("_S5_"), &s5).to_aml_bytes(&mut body);
    virtio_devices(virtio, &mut body);
    let mut sdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, table_id(b"DSDT"), OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io = |width: u8, port: u16| {
        let size = if width == 32 {
            AccessSize::DwordAccess
        } else {
            AccessSize::WordAccess
        };
        GAS::new(AddressSpace::SystemIo, width, 0, size, u64::from(port))
    };
    let mut b = FADTBuilder::new(OEM_ID, table_id(b"FACP"), OEM_REVISION)
        .dsdt_32(dsdt_addr as u32)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        // No PWR_BUTTON flag: it would say "no fixed power button", and the graceful
        // stop presses the fixed one (PM1 bit 8). SLP_BUTTON: no sleep button.
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    b.x_dsdt = dsdt_addr.into();
    b.sci_int = SCI_IRQ.into();
    b.pm1a_evt_blk = u32::from(PM1A_EVT_PORT).into();
    b.pm1a_cnt_blk = u32::from(PM1A_CNT_PORT).into();
    b.pm1_evt_len = 4;
    b.pm1_cnt_len = 2;
    b.x_pm1a_evt_blk = io(32, PM1A_EVT_PORT);
    b.x_pm1a_cnt_blk = io(16, PM1A_CNT_PORT);
    b.century = CMOS_CENTURY_REG;
    b.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    b.reset_reg = GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, 0x64);
    b.reset_value = 0xfe;
    let mut out = Vec::new();
    b.finalize().to_aml_bytes(&mut out);
    out
}

fn madt(nr_vcpus: usize) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"APIC", 44, 3, OEM_ID, table_id(b"APIC"), OEM_REVISION);
    sdt.write_u32(36, layout::LAPIC_ADDR as u32);
    sdt.write_u32(40, MADT_PCAT_COMPAT);
    for i in 0..nr_vcpus {
        // Processor local APIC: type 0, length 8, UID, APIC ID, flags (enabled).
        sdt.append_slice(&[0, 8, i as u8, i as u8, 1, 0, 0, 0]);
    }
    // I/O APIC: type 1, length 12, id 0, reserved, address, GSI base 0.
    let mut ioapic = vec![1, 12, 0, 0];
    ioapic.extend_from_slice(&(layout::IOAPIC_ADDR as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    sdt.append_slice(&ioapic);
    // Interrupt source overrides: type 2, length 10, bus 0, source, GSI, flags.
    let iso = |source: u8, gsi: u32, flags: u16| {
        let mut v = vec![2, 10, 0, source];
        v.extend_from_slice(&gsi.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v
    };
    sdt.append_slice(&iso(0, 2, 0));
    // SCI: level-triggered, active high.
    sdt.append_slice(&iso(SCI_IRQ as u8, u32::from(SCI_IRQ), 0xd));
    // Local APIC NMI: type 4, length 6, all processors, flags 0, LINT1.
    sdt.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    sdt.as_slice().to_vec()
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut x = XSDT::new(OEM_ID, table_id(b"XSDT"), OEM_REVISION);
    for &e in entries {
        x.add_entry(e);
    }
    let mut out = Vec::new();
    x.to_aml_bytes(&mut out);
    out
}

/// Writes all tables; returns the RSDP address. `virtio` lists the virtio-mmio devices
/// as (register window base, GSI).
pub fn write_tables(
    mem: &GuestMemory,
    nr_vcpus: usize,
    virtio: &[(u64, u32)],
) -> Result<u64, Error> {
    if nr_vcpus > layout::PC_MAX_VCPUS {
        return Err(Error::TooManyVcpus(nr_vcpus));
    }
    let align = |a: u64| a.next_multiple_of(16);
    let rsdp_addr = layout::ACPI_START;
    let dsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let dsdt = dsdt(virtio);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(nr_vcpus);
    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let xsdt = xsdt(&[fadt_addr, madt_addr]);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > layout::MPTABLE_START {
        return Err(Error::TooLarge {
            size: end - rsdp_addr,
            start: rsdp_addr,
            end: layout::MPTABLE_START,
        });
    }
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    for (table, addr, bytes) in [
        ("RSDP", rsdp_addr, &rsdp),
        ("DSDT", dsdt_addr, &dsdt),
        ("FACP", fadt_addr, &fadt),
        ("APIC", madt_addr, &madt),
        ("XSDT", xsdt_addr, &xsdt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| Error::Write {
                table,
                addr,
                source,
            })?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        for (sig, t) in [
            (b"DSDT", dsdt(&[(0xd000_0000, 5)])),
            (b"FACP", fadt(0xe0040)),
            (b"APIC", madt(4)),
            (b"XSDT", xsdt(&[1, 2])),
        ] {
            assert_eq!(&t[..4], sig);
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                t.len()
            );
            assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
        }
    }

    #[test]
    fn fadt_offers_the_fixed_power_button_and_an_8042() {
        let f = fadt(0xe0040);
        // FADT flags at byte 112: bit 4 PWR_BUTTON ("no fixed power button") clear,
        // bit 5 SLP_BUTTON set. IAPC_BOOT_ARCH at byte 109: bit 1, 8042 present.
        let flags = u32::from_le_bytes(f[112..116].try_into().unwrap());
        assert_eq!(flags & (1 << 4), 0, "flags {flags:#x}");
        assert_ne!(flags & (1 << 5), 0, "flags {flags:#x}");
        assert_ne!(f[109] & (1 << 1), 0);
        // SCI_INT (byte 46) is IRQ 9.
        assert_eq!(u16::from_le_bytes([f[46], f[47]]), SCI_IRQ);
    }

    #[test]
    fn madt_lists_every_vcpu() {
        let m = madt(3);
        let mut off = 44;
        let mut lapics = Vec::new();
        while off < m.len() {
            let (ty, len) = (m[off], m[off + 1] as usize);
            if ty == 0 {
                lapics.push(m[off + 3]);
            }
            off += len;
        }
        assert_eq!(off, m.len());
        assert_eq!(lapics, vec![0, 1, 2]);
    }

    #[test]
    fn dsdt_names_s5() {
        let d = dsdt(&[]);
        assert!(d.windows(4).any(|w| w == b"_S5_"));
        assert!(!d.windows(8).any(|w| w == b"LNRO0005"));
    }

    #[test]
    fn dsdt_describes_virtio_devices() {
        let d = dsdt(&[(0xd000_0000, 5), (0xd000_1000, 6)]);
        let count = |pat: &[u8]| d.windows(pat.len()).filter(|w| *w == pat).count();
        assert_eq!(count(b"LNRO0005"), 2);
        assert_eq!(count(b"VR00"), 1);
        assert_eq!(count(b"VR01"), 1);
        // Memory32Fixed: descriptor 0x86, length 9, read-write, base, size.
        let mut mem = vec![0x86, 9, 0, 1];
        mem.extend_from_slice(&0xd000_1000u32.to_le_bytes());
        mem.extend_from_slice(&0x1000u32.to_le_bytes());
        assert_eq!(count(&mem), 1);
        assert_eq!(
            u32::from_le_bytes(d[4..8].try_into().unwrap()) as usize,
            d.len()
        );
        assert_eq!(d.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
    }

    #[test]
    fn tables_fit_and_rsdp_is_found() {
        let mem = crate::memory::create(16 << 20).unwrap();
        let rsdp = write_tables(&mem, layout::PC_MAX_VCPUS, &[]).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        assert!(matches!(
            write_tables(&mem, 255, &[]),
            Err(Error::TooManyVcpus(255))
        ));
    }
}
