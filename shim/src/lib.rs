//! `containerd-shim-podvisor-v2`: containerd's shim v2 for podvisor. One
//! shim process and one VM per pod.
//!
//! - [`shim`]: the process lifecycle containerd drives (start, delete);
//! - `task`: the Task API, mapped onto the guest agent;
//! - [`sandbox`]: one pod's VM and its agent client;
//! - [`hypervisor`]: the backends that run a VM (QEMU today);
//! - [`bundle`]: a container's OCI bundle, shared into the guest;
//! - [`stdio`]: containerd's FIFOs bridged to the agent's streams;
//! - [`state`]: `/run/podvisor/<sandbox-id>/` and crash cleanup;
//! - [`config`]: `/etc/podvisor/config.toml` and VM sizing.

pub mod bundle;
pub mod config;
pub mod hypervisor;
pub mod network;
mod process;
pub mod sandbox;
pub mod shim;
pub mod state;
pub mod stdio;
mod task;

pub use shim::{shim_config, Shim, RUNTIME_ID};
