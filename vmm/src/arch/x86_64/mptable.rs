//! The Intel MultiProcessor table (MP spec 1.4) in the EBDA: CPUs, the
//! ISA bus, the IOAPIC and its interrupt routing. Linux prefers ACPI's
//! MADT when it is present; the MP table serves kernels booted with
//! `acpi=off` and tools that still read it.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{low32, EBDA, IOAPIC, LAPIC};
use crate::memory::GuestMemoryMmap;

pub use podvisor_vmm_config::limits::MAX_CPUS;
const IOAPIC_PINS: u8 = 24;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("the MP table holds at most {MAX_CPUS} vCPUs, not {0}")]
    TooManyCpus(u8),
    #[error("writing the MP table: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The MP configuration table (header and entries) for `cpus` vCPUs.
fn config_table(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    let mut count = 0u16;
    for id in 0..cpus {
        let flags = 1 | if id == 0 { 2 } else { 0 }; // enabled, BSP
        entries.extend_from_slice(&[0, id, 0x14, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&const { low32(IOAPIC) }.to_le_bytes());
    count += 2;
    for pin in 0..IOAPIC_PINS {
        // Type 3 (I/O interrupt): INT, default polarity and trigger, ISA irq -> pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // Type 4 (local interrupt): ExtINT on LINT0, NMI on LINT1, every LAPIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut t = Vec::with_capacity(44 + entries.len());
    t.extend_from_slice(b"PCMP");
    // At most MAX_CPUS + 28 entries of 20 bytes or less: far below 64 KiB.
    let len = u16::try_from(44 + entries.len()).unwrap_or(u16::MAX);
    t.extend_from_slice(&len.to_le_bytes());
    t.extend_from_slice(&[4, 0]); // spec 1.4, checksum
    t.extend_from_slice(b"PODVISOR");
    t.extend_from_slice(b"microVM     ");
    t.extend_from_slice(&[0; 6]); // OEM table pointer and size
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&const { low32(LAPIC) }.to_le_bytes());
    t.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);
    t
}

/// Writes the floating pointer and the table at the EBDA.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let table_addr = EBDA + 16;
    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&const { low32(EBDA + 16) }.to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    mem.write_slice(&fp, GuestAddress(EBDA))
        .map_err(MpTableError::Memory)?;
    mem.write_slice(&config_table(cpus), GuestAddress(table_addr))
        .map_err(MpTableError::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_checksum_and_fit_the_ebda() {
        let mem = crate::memory::create(16).unwrap();
        write(&mem, MAX_CPUS).unwrap();
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(EBDA)).unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(fp.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let t = config_table(MAX_CPUS);
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert!(16 + t.len() <= 1024, "{} bytes", t.len());
        let count = u16::from_le_bytes([t[34], t[35]]);
        assert_eq!(count, u16::from(MAX_CPUS) + 2 + 24 + 2);
    }

    #[test]
    fn refuses_more_cpus_than_fit() {
        let mem = crate::memory::create(16).unwrap();
        assert!(matches!(
            write(&mem, MAX_CPUS + 1),
            Err(MpTableError::TooManyCpus(_))
        ));
    }
}
