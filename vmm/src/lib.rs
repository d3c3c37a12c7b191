//! podvisor's in-tree KVM VMM.
//!
//! So far it holds [`probe`]: whether this host's `/dev/kvm` runs guest
//! code at hardware speed, which decides between this VMM and QEMU, and
//! between KVM and TCG for QEMU.

pub mod probe;
