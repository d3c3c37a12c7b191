//! Where things live in guest-physical memory and I/O space. Every
//! address the boot path and the devices agree on is here.

/// GDT and IDT the vCPUs start with.
pub const BOOT_GDT: u64 = 0x500;
pub const BOOT_IDT: u64 = 0x520;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity page tables: PML4, one PDPT, four PDs (4 GiB in 2 MiB pages).
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0xb000;
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// Kernel command line and its largest size.
pub const CMDLINE: u64 = 0x20000;
pub use podvisor_vmm_config::limits::CMDLINE_MAX;
/// Extended BIOS data area: the MP table lives here; RAM below it.
pub const EBDA: u64 = 0x9fc00;
/// ACPI tables, starting with the RSDP (in the BIOS area Linux scans).
pub const ACPI: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// Kernels load at 1 MiB and above.
pub const HIMEM: u64 = 0x100000;

/// No RAM between these: device MMIO, IOAPIC, LAPIC.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
/// virtio-mmio devices, one 4 KiB window each.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC: u64 = 0xfec0_0000;
pub const LAPIC: u64 = 0xfee0_0000;

/// I/O ports.
pub const COM1: u16 = 0x3f8;
pub const COM1_GSI: u32 = 4;
pub const I8042: u16 = 0x60;
pub const I8042_GSI: u32 = 1;
/// ACPI sleep control (write) / status (read) and reset register.
pub const ACPI_PM: u16 = 0x600;

/// IOAPIC pins for virtio devices: 5 up to the last of KVM's 24.
pub const VIRTIO_GSI_FIRST: u32 = 5;
pub const VIRTIO_GSI_LAST: u32 = 23;
pub use podvisor_vmm_config::limits::MAX_VIRTIO_DEVICES;
const _: () = assert!((VIRTIO_GSI_LAST - VIRTIO_GSI_FIRST + 1) as usize == MAX_VIRTIO_DEVICES);

/// The 32-bit form of an address below 4 GiB, as the zero page and the
/// firmware tables hold it. Used in `const { }` blocks, so an address that
/// does not fit is a compile error, never a runtime truncation.
pub const fn low32(addr: u64) -> u32 {
    assert!(
        addr <= u32::MAX as u64,
        "address above 4 GiB in a 32-bit field"
    );
    #[allow(clippy::cast_possible_truncation)] // checked just above
    let low = addr as u32;
    low
}

/// Guest address and GSI of the `i`th virtio-mmio device.
pub fn virtio_slot(i: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE,
        // Callers number at most MAX_VIRTIO_DEVICES (the config checks).
        VIRTIO_GSI_FIRST.saturating_add(u32::try_from(i).unwrap_or(u32::MAX)),
    )
}

/// Where KVM keeps its TSS and identity map (3 pages below the IOAPIC-free top).
pub const KVM_TSS: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP: u64 = 0xfffb_c000;
