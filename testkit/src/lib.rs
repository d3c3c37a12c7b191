//! podvisor's test harness (the demo, bench and image tools built on it
//! are `tools/`, `podvisor-tools`).
//!
//! - [`vm`]: one guest VM (through the hypervisor layer's QEMU or VMM
//!   backend) and its agent;
//! - [`io`]: running containers through the agent as the shim will;
//! - [`rootfs`]: busybox root filesystems for test containers;
//! - [`spec`]: containerd-like OCI specs;
//! - [`image`], [`registry`]: busybox-based images, a registry on loopback;
//! - [`critest`]: the CRI validation suite, podvisor beside runc;
//! - [`console_boot`]: podvisor's kernel on the in-tree VMM, read from its
//!   console (where KVM emulates guest code and runs no user space);
//! - [`harness`]: what the async test binaries share.
//!
//! Tests: `tests/agent.rs` (the agent in a real guest), `tests/vmm.rs`
//! (the guest on the in-tree VMM, where KVM is fast),
//! `tests/vmm_linux.rs` (Linux's view of the VMM's platform, and the same
//! kernel under QEMU), `tests/security.rs` (the VM's processes confined
//! on the host), `tests/containerd.rs` (the shim under containerd),
//! `tests/cri.rs` (critest). The guest image itself is built by `guest/build-image.sh`.

pub mod console_boot;
pub mod containerd;
pub mod critest;
pub mod harness;
pub mod image;
pub mod io;
pub mod registry;
pub mod rootfs;
pub mod spec;
pub mod vm;

pub use io::{Output, StdioReq, Streams};
pub use podvisor_hypervisor::Accel;
pub use vm::{ctx, detect_accel, TestVm, VmConfig};
