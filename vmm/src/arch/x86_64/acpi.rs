//! ACPI tables: RSDP -> XSDT -> FADT (hardware-reduced, with a sleep
//! control register for power-off and a reset register), MADT (LAPICs,
//! IOAPIC, IRQ0 override, LAPIC NMI on LINT1) and a DSDT that declares COM1, the i8042 and
//! every virtio-mmio device. Stock kernels such as Debian's find virtio-mmio
//! devices only through ACPI (`LNRO0005`); they lack
//! `VIRTIO_MMIO_CMDLINE_DEVICES`.

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    low32, ACPI, ACPI_END, ACPI_PM, COM1, COM1_GSI, I8042, I8042_GSI, IOAPIC, LAPIC,
    VIRTIO_MMIO_SIZE,
};
use crate::memory::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"PODVSR";
const OEM_TABLE: [u8; 8] = *b"PODVISOR";

/// Value the guest writes to [`ACPI_PM`] to enter S5 (power off):
/// SLP_TYP 5 in bits 2..5, SLP_EN (bit 5).
pub const S5_SLEEP_VALUE: u8 = (5 << 2) | (1 << 5);
/// Value the guest writes to [`ACPI_PM`] to reset.
pub const RESET_VALUE: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need {0} bytes, more than the {ACPI_END:#x} boundary allows")]
    TooLarge(u64),
    #[error("writing ACPI tables: {0}")]
    Memory(vm_memory::GuestMemoryError),
    #[error("{0} virtio devices; the DSDT numbers at most 256")]
    TooManyDevices(usize),
    #[error("virtio-mmio window {0:#x} is above 4 GiB")]
    Above4G(u64),
}

/// A virtio-mmio device as the DSDT declares it.
#[derive(Debug, Clone, Copy)]
pub struct MmioDevice {
    pub addr: u64,
    pub gsi: u32,
}

fn dsdt(devices: &[MmioDevice]) -> Result<Sdt, AcpiError> {
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    let uid0 = 0u8;
    let com1_io = IO::new(COM1, COM1, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, COM1_GSI);
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = EISAName::new("PNP0501");
    Device::new(
        "_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &com1_hid),
            &Name::new("_UID".into(), &uid0),
            &Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut t);

    let kbd_data = IO::new(I8042, I8042, 1, 1);
    let kbd_cmd = IO::new(I8042 + 4, I8042 + 4, 1, 1);
    let kbd_irq = Interrupt::new(true, true, false, false, I8042_GSI);
    let kbd_crs = ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    let kbd_hid = EISAName::new("PNP0303");
    Device::new(
        "_SB_.PS2_".into(),
        vec![
            &Name::new("_HID".into(), &kbd_hid),
            &Name::new("_CRS".into(), &kbd_crs),
        ],
    )
    .to_aml_bytes(&mut t);

    for (i, d) in devices.iter().enumerate() {
        let uid = u8::try_from(i).map_err(|_| AcpiError::TooManyDevices(devices.len()))?;
        let addr = u32::try_from(d.addr).map_err(|_| AcpiError::Above4G(d.addr))?;
        let mem = Memory32Fixed::new(true, addr, const { low32(VIRTIO_MMIO_SIZE) });
        let irq = Interrupt::new(true, true, false, false, d.gsi);
        let crs = ResourceTemplate::new(vec![&mem, &irq]);
        let path = format!("_SB_.V{i:03}");
        Device::new(
            Path::new(&path),
            vec![
                &Name::new("_HID".into(), &"LNRO0005"),
                &Name::new("_UID".into(), &uid),
                &Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut t);
    }
    let s5_type = 5u8;
    Name::new("_S5_".into(), &Package::new(vec![&s5_type])).to_aml_bytes(&mut t);
    Ok(t)
}

fn madt(cpus: u8) -> Sdt {
    let mut t = Sdt::new(*b"APIC", 36, 6, OEM_ID, OEM_TABLE, 1);
    let mut body = Vec::new();
    body.extend_from_slice(&const { low32(LAPIC) }.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // no dual 8259 to mask
    for id in 0..cpus {
        body.extend_from_slice(&[0, 8, id, id]);
        body.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    body.extend_from_slice(&[1, 12, cpus, 0]);
    body.extend_from_slice(&const { low32(IOAPIC) }.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // ISA IRQ 0 (the PIT) arrives on GSI 2, as KVM routes it.
    body.extend_from_slice(&[2, 10, 0, 0]);
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    // Local APIC NMI: every processor (UID 0xff) takes NMIs on LINT1, edge
    // triggered, active high (flags 0b0101), as firmware declares it.
    body.extend_from_slice(&[4, 6, 0xff]);
    body.extend_from_slice(&0x0005u16.to_le_bytes());
    body.push(1);
    t.append_slice(&body);
    t
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let pm = |addr: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            addr.into(),
        )
    };
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.reset_reg = pm(ACPI_PM);
    f.reset_value = RESET_VALUE;
    f.sleep_control_reg = pm(ACPI_PM);
    f.sleep_status_reg = pm(ACPI_PM + 1);
    // IA-PC boot architecture: no VGA, no MSI, no CMOS RTC.
    f.iapc_boot_arch = ((1u16 << 2) | (1 << 3) | (1 << 5)).into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"PODVISOR").into();
    let mut out = Vec::new();
    f.finalize().to_aml_bytes(&mut out);
    out
}

fn align8(x: u64) -> u64 {
    (x + 7) & !7
}

/// Writes every table; returns the RSDP's address (for the zero page).
pub fn write(mem: &GuestMemoryMmap, cpus: u8, devices: &[MmioDevice]) -> Result<u64, AcpiError> {
    let rsdp_addr = ACPI;
    let dsdt = dsdt(devices)?;
    let dsdt_addr = align8(rsdp_addr + Rsdp::len() as u64);
    let fadt_addr = align8(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align8(fadt_addr + fadt.len() as u64);
    let madt = madt(cpus);
    let xsdt_addr = align8(madt_addr + madt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let end = xsdt_addr + xsdt_bytes.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge(end - ACPI));
    }
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    for (bytes, at) in [
        (rsdp.as_slice(), rsdp_addr),
        (dsdt.as_slice(), dsdt_addr),
        (fadt.as_slice(), fadt_addr),
        (madt.as_slice(), madt_addr),
        (xsdt_bytes.as_slice(), xsdt_addr),
    ] {
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(AcpiError::Memory)?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table(mem: &GuestMemoryMmap, at: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        let mut b = vec![0; len as usize];
        mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        b
    }

    #[test]
    fn tables_chain_from_rsdp_and_checksum() {
        let mem = crate::memory::create(32).unwrap();
        let devs = [
            MmioDevice {
                addr: 0xd000_0000,
                gsi: 5,
            },
            MmioDevice {
                addr: 0xd000_1000,
                gsi: 6,
            },
        ];
        let rsdp_at = write(&mem, 2, &devs).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(rsdp_at)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let xsdt_at = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = table(&mem, xsdt_at);
        assert_eq!((&xsdt[..4], sum(&xsdt)), (&b"XSDT"[..], 0));
        let fadt_at = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        let madt_at = u64::from_le_bytes(xsdt[44..52].try_into().unwrap());
        let fadt = table(&mem, fadt_at);
        assert_eq!((&fadt[..4], sum(&fadt)), (&b"FACP"[..], 0));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        let dsdt_at = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table(&mem, dsdt_at);
        assert_eq!((&dsdt[..4], sum(&dsdt)), (&b"DSDT"[..], 0));
        assert_eq!(dsdt.windows(8).filter(|w| w == b"LNRO0005").count(), 2);
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        let madt = table(&mem, madt_at);
        assert_eq!((&madt[..4], sum(&madt)), (&b"APIC"[..], 0));
        // Two LAPIC entries, one IOAPIC, one override, one LAPIC NMI.
        assert_eq!(madt.len(), 44 + 2 * 8 + 12 + 10 + 6);
        let nmi = &madt[madt.len() - 6..];
        assert_eq!(nmi, &[4, 6, 0xff, 5, 0, 1], "all CPUs, LINT1, edge, high");
    }
}
