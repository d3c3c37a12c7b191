//! The shim<->agent protocol of podvisor.
//!
//! - [`api`]: the ttrpc service and protobuf messages generated from
//!   `proto/agent.proto` (the agent serves them; the shim calls them).
//! - [`hybrid_vsock`]: the host-side dialer for a VM's hybrid-vsock UDS
//!   (Firecracker's `CONNECT <port>` handshake), which both VM backends
//!   expose, and [`AgentClient`] built on it.
//! - [`AGENT_PORT`] and friends: the constants both sides agree on.

pub mod hybrid_vsock;

#[allow(clippy::all, dead_code, unused_imports, unused_mut, unused_results)]
#[allow(non_camel_case_types, non_snake_case, non_upper_case_globals)]
mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(clippy::all, dead_code, unused_imports, unused_results)]
#[allow(non_camel_case_types, non_snake_case, non_upper_case_globals)]
mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// Generated messages and the ttrpc service (`Agent` server trait,
/// `AgentClient` client, `create_agent` to register a server).
pub mod api {
    pub use crate::agent::*;
    pub use crate::agent_ttrpc::*;
}

pub use hybrid_vsock::{connect_agent, DialError, ReadyListener};

/// The guest vsock port the agent serves its API on.
pub const AGENT_PORT: u32 = 1024;

/// The host vsock port the agent connects to once it serves: the host
/// dials only after that, so no request reaches a guest whose vsock driver
/// is not up yet (such a request may never be answered).
pub const READY_PORT: u32 = 1025;

/// Bumped on incompatible changes to `agent.proto`.
pub const API_VERSION: u32 = 1;

/// virtio-fs tag of the sandbox's shared directory.
pub const SHARED_FS_TAG: &str = "podvisor";

/// Where the agent mounts the shared directory in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/podvisor/shared";
