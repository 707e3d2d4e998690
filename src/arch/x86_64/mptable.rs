//! Intel MultiProcessor Specification 1.4 table, for kernels built without ACPI
//! (`CONFIG_X86_MPPARSE`): CPUs, the ISA bus, the in-kernel IOAPIC and ISA interrupt
//! routing. Kernels with ACPI use the MADT instead; both are always present.
#![forbid(unsafe_code)]

use vm_memory::{Bytes, GuestAddress};

use super::layout;
use crate::memory::GuestMemory;

const MPC_SPEC: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6 signature and FPU|APIC feature flags: what the table's CPU entries claim.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_IRQS: u8 = 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("MP table for {0} vCPUs does not fit below 1 MiB")]
    TooLarge(usize),
    #[error("MP table describes at most {max} vCPUs; {0} requested", max = layout::PC_MAX_VCPUS)]
    TooManyVcpus(usize),
    #[error("cannot write the MP table at {addr:#x}")]
    Write {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

/// The configuration table (header + entries) for `nr_vcpus`, placed at `addr`.
pub fn config_table(nr_vcpus: usize) -> Vec<u8> {
    let ioapic_id = nr_vcpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for i in 0..nr_vcpus {
        let flags = CPU_ENABLED | if i == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, i as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(layout::IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    // I/O interrupt assignments: ExtINT on pin 0, ISA IRQ n on pin n except the timer,
    // IRQ 0, which KVM's default routing delivers on pin 2.
    let mut intsrc = |kind: u8, irq: u8, pin: u8| {
        entries.extend_from_slice(&[3, kind, 0, 0, 0, irq, ioapic_id, pin]);
        count += 1;
    };
    intsrc(INT_TYPE_EXTINT, 0, 0);
    intsrc(INT_TYPE_INT, 0, 2);
    for irq in 1..ISA_IRQS {
        if irq != 2 {
            intsrc(INT_TYPE_INT, irq, irq);
        }
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1, all CPUs.
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let len = 44 + entries.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&(len as u16).to_le_bytes());
    t.push(MPC_SPEC);
    t.push(0); // checksum
    t.extend_from_slice(b"FERRITE ");
    t.extend_from_slice(b"MICROVM     ");
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    t.extend_from_slice(&0u16.to_le_bytes());
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&(layout::LAPIC_ADDR as u32).to_le_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);
    t
}

/// The 16-byte floating pointer that leads the kernel to the table at `table_addr`.
pub fn floating_pointer(table_addr: u32) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..4].copy_from_slice(b"_MP_");
    p[4..8].copy_from_slice(&table_addr.to_le_bytes());
    p[8] = 1; // length in 16-byte units
    p[9] = MPC_SPEC;
    p[10] = checksum(&p);
    p
}

/// Writes the floating pointer at [`layout::MPTABLE_START`] and the table after it.
pub fn write(mem: &GuestMemory, nr_vcpus: usize) -> Result<(), Error> {
    if nr_vcpus > layout::PC_MAX_VCPUS {
        return Err(Error::TooManyVcpus(nr_vcpus));
    }
    let table = config_table(nr_vcpus);
    let table_addr = layout::MPTABLE_START + 16;
    if table_addr + table.len() as u64 > layout::ACPI_END {
        return Err(Error::TooLarge(nr_vcpus));
    }
    let w = |bytes: &[u8], addr: u64| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| Error::Write { addr, source })
    };
    w(&floating_pointer(table_addr as u32), layout::MPTABLE_START)?;
    w(&table, table_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn checksums_and_counts() {
        let t = config_table(2);
        assert_eq!(sum(&t), 0);
        assert_eq!(u16::from_le_bytes([t[4], t[5]]) as usize, t.len());
        let count = u16::from_le_bytes([t[34], t[35]]);
        // 2 CPUs, bus, IOAPIC, ExtINT + IRQ0 + 14 ISA IRQs, 2 local.
        assert_eq!(count, 2 + 1 + 1 + 16 + 2);
        let fp = floating_pointer(0xf0010);
        assert_eq!(sum(&fp), 0);
        assert_eq!(&fp[..4], b"_MP_");
    }

    #[test]
    fn boot_processor_flag_only_on_cpu0() {
        let t = config_table(3);
        let cpus: Vec<u8> = (0..3).map(|i| t[44 + i * 20 + 3]).collect();
        assert_eq!(cpus, vec![3, 1, 1]);
    }

    #[test]
    fn writes_within_bios_area() {
        let mem = crate::memory::create(16 << 20).unwrap();
        write(&mem, layout::PC_MAX_VCPUS).unwrap();
        assert!(matches!(write(&mem, 255), Err(Error::TooManyVcpus(255))));
    }
}
