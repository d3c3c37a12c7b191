//! podvisor's test, demo and benchmark harness.
//!
//! - [`vm`]: one guest VM (through the shim's QEMU or VMM backend) and its
//!   agent;
//! - [`io`]: running containers through the agent as the shim will;
//! - [`rootfs`]: busybox root filesystems for test containers;
//! - [`spec`]: containerd-like OCI specs;
//! - [`image`], [`registry`]: busybox-based images, a registry on loopback;
//! - [`critest`]: the CRI validation suite, podvisor beside runc;
//! - [`vmm_bench`]: start time and memory of the in-tree VMM beside QEMU;
//! - [`net_bench`]: pod network throughput and latency beside runc.
//!
//! Tests: `tests/agent.rs` (the agent in a real guest), `tests/vmm.rs`
//! (the guest on the in-tree VMM, where KVM is fast),
//! `tests/containerd.rs` (the shim under containerd), `tests/cri.rs`
//! (critest). The binary
//! `podvisor-testkit demo|bench` backs `make demo` and `make bench`. The
//! guest image itself is built by `guest/build-image.sh`.

pub mod containerd;
pub mod critest;
pub mod image;
pub mod io;
pub mod net_bench;
pub mod registry;
pub mod rootfs;
pub mod spec;
pub mod vm;
pub mod vmm_bench;

pub use io::{Output, StdioReq, Streams};
pub use podvisor_hypervisor::Accel;
pub use vm::{ctx, detect_accel, TestVm, VmConfig};
