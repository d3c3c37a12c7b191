//! The VMM's limits: what a [`VmConfig`](crate::VmConfig) may ask for. The
//! VMM's layout and devices are built to these (and assert it at compile
//! time); the hypervisor layer sizes VMs within them.

/// vCPUs the MP table in the EBDA's 1 KiB holds entries for.
pub const MAX_CPUS: u8 = 32;
/// Smallest guest the boot layout fits in, MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest guest the VMM builds, MiB.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// The kernel command line's largest size, with its NUL.
pub const CMDLINE_MAX: usize = 4096;
/// virtio-mmio devices: one IOAPIC pin each, 5 up to the last of KVM's 24.
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// Longest virtio-fs tag the config space holds.
pub const FS_TAG_MAX: usize = 36;
/// Entries in a VM's CPUID filter.
pub const MAX_CPUID_HIDE: usize = 64;
/// Linux's interface-name buffer, NUL included.
pub const IFNAMSIZ: usize = 16;
