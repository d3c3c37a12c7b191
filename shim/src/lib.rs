//! `containerd-shim-podvisor-v2`: containerd's shim v2 for podvisor. One
//! shim process and one VM per pod; the VM runs through the hypervisor
//! layer (`podvisor-hypervisor`), never KVM directly.
//!
//! - `shim`: the process lifecycle containerd drives (start, delete);
//! - `task`: the Task API, thin over the two below;
//! - `container`: one container's life (create with rollback, start and
//!   exit watching, exec, signal, delete), against the `Guest` trait;
//! - `pod`: one pod's VM, its agent and network: the real `Guest`; and the
//!   one teardown of what a pod leaves on the host;
//! - `error`: `ShimError`, mapped to ttrpc codes in one place;
//! - `convert`: containerd's runtime options and metrics;
//! - `bundle`: a container's OCI bundle, shared into the guest;
//! - `stdio`, `process`: containerd's FIFOs bridged to the agent's
//!   streams, and a process's state;
//! - `network`, `port_forward`: the pod network carried into the VM, and
//!   `kubectl port-forward` from the pod's namespace into the guest;
//! - `sandbox_dir`: `/run/podvisor/<sandbox-id>/` and crash cleanup;
//! - `cgroup`: the pod's cgroup on the host, where the shim, the VM and
//!   its helpers run;
//! - [`config`]: `/etc/podvisor/config.toml` and VM sizing (public for
//!   the fuzz targets, `fuzz/`);
//! - [`warm`]: a VM restored from its shape's template, or why it boots
//!   cold; the `template` subcommand;
//! - [`pool`]: the warm pool, clones restored ahead and handed to pods;
//!   the `pool` subcommand;
//! - [`info`]: `-info`, the runtime features containerd 2.x asks for.

mod bundle;
mod cgroup;
pub mod config;
mod container;
mod convert;
mod error;
pub mod info;
mod network;
mod pod;
pub mod pool;
mod port_forward;
mod process;
mod sandbox_dir;
mod shim;
mod stdio;
mod task;
pub mod warm;

pub use shim::{shim_config, Shim};
