//! Boots the podvisor guest image under QEMU for the guest's tests
//! (`tests/agent.rs`) and benchmark (`podvisor-guest-bench`).
//!
//! - [`vm`]: one VM with its vsock and virtio-fs helpers;
//! - [`io`]: running containers through the agent as the shim will;
//! - [`rootfs`]: busybox root filesystems for test containers;
//! - [`spec`]: containerd-like OCI specs.
//!
//! The image itself is built by `guest/build-image.sh` (`make guest-image`).

pub mod io;
pub mod rootfs;
pub mod spec;
pub mod vm;

pub use io::{Output, StdioReq, Streams};
pub use vm::{ctx, Accel, TestVm, VmConfig};
