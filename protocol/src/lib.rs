//! The shim<->agent protocol of podvisor.
//!
//! - [`api`]: the ttrpc service and protobuf messages generated from
//!   `proto/agent.proto` (the agent serves them; the shim calls them).
//! - [`hybrid_vsock`]: the host-side dialer for a VM's hybrid-vsock UDS
//!   (Firecracker's `CONNECT <port>` handshake), which both VM backends
//!   expose, and [`AgentClient`] built on it.
//! - [`AGENT_PORT`] and friends: the constants both sides agree on.

pub mod hybrid_vsock;

#[allow(clippy::all, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
#[allow(dead_code, unused_imports, unused_mut, unused_results)]
#[allow(non_camel_case_types, non_snake_case, non_upper_case_globals)]
mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(clippy::all, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
#[allow(
    dead_code,
    unused_imports,
    unused_results,
    missing_debug_implementations
)]
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

/// Where the agent mounts the shared directory in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/podvisor/shared";

/// Where the agent mounts the pod's in-memory volumes (`PodTmpfs`): a bind
/// mount's source `<GUEST_TMPFS_DIR>/<name>` in a spec names one.
pub const GUEST_TMPFS_DIR: &str = "/run/podvisor/tmpfs";

/// In an OCI spec the shim sends, `linux.namespaces[].path` of the form
/// `<GUEST_NAMESPACE_DIR>/<container-id>/<kind>` (kind as in `/proc/<pid>/ns/`:
/// pid, ipc, uts, net, cgroup, time) names that namespace of the init of
/// another container in the same guest, the way `/proc/<pid>/ns/<kind>`
/// names a process's. A pod's containers join the sandbox's so.
pub const GUEST_NAMESPACE_DIR: &str = "/run/podvisor/ns";

/// What the guest runs of an OCI spec, which the shim announces to
/// containerd as the runtime's features (`containerd-shim-podvisor-v2
/// -info`, in runtime-spec `features.json` terms). The agent's tests check
/// that it implements each.
pub mod guest_features {
    /// Mount options beyond filesystem data.
    pub const MOUNT_OPTIONS: [&str; 29] = [
        "async",
        "atime",
        "bind",
        "defaults",
        "dev",
        "diratime",
        "dirsync",
        "exec",
        "noatime",
        "nodev",
        "nodiratime",
        "noexec",
        "norelatime",
        "nosuid",
        "private",
        "rbind",
        "relatime",
        "ro",
        "rprivate",
        "rshared",
        "rslave",
        "runbindable",
        "rw",
        "shared",
        "slave",
        "strictatime",
        "suid",
        "sync",
        "unbindable",
    ];

    /// Recursive mount options (runc's names, applied with mount_setattr
    /// to a mount and every mount below it); `rro` lets the CRI offer
    /// recursive read-only volumes.
    pub const RECURSIVE_MOUNT_OPTIONS: [&str; 15] = [
        "rro",
        "rrw",
        "rnosuid",
        "rsuid",
        "rnodev",
        "rdev",
        "rnoexec",
        "rexec",
        "rnodiratime",
        "rdiratime",
        "rrelatime",
        "rnorelatime",
        "rnoatime",
        "ratime",
        "rstrictatime",
    ];

    /// `linux.namespaces` kinds a container may make or join (no user
    /// namespaces).
    pub const NAMESPACES: [&str; 7] = ["cgroup", "ipc", "mount", "network", "pid", "uts", "time"];

    /// Seccomp: every action but SCMP_ACT_NOTIFY (its listener would be on
    /// the host), every operator, the x86 ABIs, the filter flags.
    pub const SECCOMP_ACTIONS: [&str; 8] = [
        "SCMP_ACT_ALLOW",
        "SCMP_ACT_ERRNO",
        "SCMP_ACT_KILL",
        "SCMP_ACT_KILL_PROCESS",
        "SCMP_ACT_KILL_THREAD",
        "SCMP_ACT_LOG",
        "SCMP_ACT_TRACE",
        "SCMP_ACT_TRAP",
    ];
    pub const SECCOMP_OPERATORS: [&str; 7] = [
        "SCMP_CMP_EQ",
        "SCMP_CMP_GE",
        "SCMP_CMP_GT",
        "SCMP_CMP_LE",
        "SCMP_CMP_LT",
        "SCMP_CMP_MASKED_EQ",
        "SCMP_CMP_NE",
    ];
    pub const SECCOMP_ARCHES: [&str; 3] = ["SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32"];
    pub const SECCOMP_FLAGS: [&str; 4] = [
        "SECCOMP_FILTER_FLAG_LOG",
        "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
        "SECCOMP_FILTER_FLAG_TSYNC",
        "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
    ];
}

/// The guest vsock port of port forwarding (`kubectl port-forward`). The
/// host connects, writes the TCP port as decimal and `\n`; the agent
/// connects to it on the guest's loopback (127.0.0.1, then ::1) and
/// answers `OK\n`, after which the stream is that connection, or
/// `ERR <reason>\n` and closes.
pub const FORWARD_PORT: u32 = 1026;
