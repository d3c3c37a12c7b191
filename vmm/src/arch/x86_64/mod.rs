//! x86_64: how a guest starts. [`boot`] loads the kernel and writes the
//! zero page; [`regs`] puts a vCPU in 64-bit mode; [`cpuid`] and [`regs`]
//! set what the guest sees of the CPU; [`mptable`] and [`acpi`] describe
//! the machine; [`dump`] describes a vCPU when the guest fails; [`state`]
//! saves and restores a paused VM's KVM state for snapshots.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod dump;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod state;
