//! podvisor's in-tree KVM VMM: one process per microVM.
//!
//! The layout follows the life of a VM:
//!
//! - the JSON description of a VM ([`VmConfig`]) and the VMM's limits
//!   live in `podvisor-vmm-config`, which the hypervisor layer shares.
//! - [`memory`]: guest RAM, one memfd shared with vhost-user backends, and
//!   its snapshot file.
//! - [`arch`]: x86_64 boot: kernel loading, zero page and E820, page
//!   tables, GDT, CPUID, MSRs, MP table and ACPI tables.
//! - [`devices`]: the port-I/O and MMIO buses and every device on them
//!   (serial, i8042, ACPI power, virtio-mmio with vsock, block, net, fs,
//!   rng).
//! - [`vcpu`]: one thread per vCPU running `KVM_RUN` and dispatching exits,
//!   and their pause for a snapshot.
//! - [`vm`]: the builder that puts it all together (or restores a
//!   snapshot), and the event loop that runs device I/O until the guest
//!   powers off, reboots or fails.
//! - [`exit`]: how a VM ends (power-off, reboot, failure) and how the
//!   parts that notice it tell the rest.
//! - [`control`]: the control socket (status, orderly shutdown, pause,
//!   snapshot, resume).
//! - [`snapshot`]: a saved VM's state file and its check against the
//!   config that restores it (the KVM part is `arch::state`).
//! - [`seccomp`]: the system-call filter each kind of thread installs.
//! - [`probe`]: whether `/dev/kvm` runs guest code at hardware speed.

pub mod arch;
pub mod control;
pub mod devices;
pub mod exit;
pub mod memory;
pub mod probe;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

pub use exit::ExitReason;
pub use podvisor_vmm_config::VmConfig;
pub use vm::Vm;
