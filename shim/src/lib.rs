//! `containerd-shim-podvisor-v2`: containerd's shim v2 for podvisor. One
//! shim process and one VM per pod.
//!
//! - [`shim`]: the process lifecycle containerd drives (start, delete);
//! - `task`: the Task API, mapped onto the guest agent;
//! - [`sandbox`]: one pod's VM and its agent client;
//! - [`bundle`]: a container's OCI bundle, shared into the guest;
//! - [`stdio`]: containerd's FIFOs bridged to the agent's streams;
//! - [`port_forward`]: `kubectl port-forward` from the pod's namespace
//!   into the guest;
//! - [`state`]: `/run/podvisor/<sandbox-id>/` and crash cleanup;
//! - [`config`]: `/etc/podvisor/config.toml` and VM sizing;
//! - [`info`]: `-info`, the runtime features containerd 2.x asks for.

mod bundle;
mod config;
pub mod info;
mod network;
mod port_forward;
mod process;
mod sandbox;
mod shim;
mod state;
mod stdio;
mod task;

pub use shim::{shim_config, Shim};
