//! How the processes a VM is made of are confined on the host (`[jail]`
//! of the node config), so that a guest that escapes its kernel lands in a
//! process that can do little: a seccomp filter on the VM process (the
//! in-tree VMM's own per-thread filters; QEMU's `-sandbox`, which also
//! keeps it from spawning programs or raising privileges), no_new_privs on
//! the VM process and every helper, no core dumps (they would hold guest
//! memory), and for the VM process and its vsock helper no capabilities
//! at all (none effective, an empty bounding set, root gaining none at
//! exec) and bounds on open files and on the size of any file they write
//! (a guest flooding its console cannot fill the host's `/run`).
//!
//! The VM process and its vsock helper also start in a PID namespace of
//! their own ([`pid`]) and a mount namespace whose root holds only what
//! they need ([`root`]); the vsock helper, which has no seccomp filter of
//! its own, under ours ([`seccomp`]).
//!
//! The VM process still runs as root: it reaches root-owned files (its
//! directory, the kernel, `/dev/kvm`) as their owner, and taps the shim
//! made with owner 0 (`TUNSETOWNER`), which a process without
//! CAP_NET_ADMIN may attach to.

pub mod pid;
pub mod root;
pub mod seccomp;

use std::path::Path;

use serde::Deserialize;
use tokio::process::Command;

use crate::process::Supervised;
use crate::{HypervisorError, VmSpec};
use pid::PidNamespace;

/// Open files a VM-side process may hold.
pub const MAX_OPEN_FILES: u64 = 8192;
/// How much larger than guest memory a file a VM-side process writes may
/// grow (a template's memory file is as large as guest memory; a console
/// log stops growing there).
const FILE_SIZE_BEYOND_MEMORY: u64 = 1 << 30;

/// Capability numbers tried when emptying the bounding set (the kernel's
/// last one is below; the rest fail with EINVAL, ignored).
const MAX_CAPS: libc::c_int = 64;
/// securebits (linux/securebits.h): root gains no capabilities at exec
/// (NOROOT), nothing raises ambient ones, both locked.
const SECUREBITS: libc::c_ulong = 0b1100_0011;

/// capset(2)'s header and data (linux/capability.h, version 3: two data
/// words for 64 capabilities).
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// QEMU's seccomp sandbox: its default deny list, and the optional
/// groups, every one denied.
pub const QEMU_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Jail {
    /// Off only to measure what the confinement costs (`make bench`).
    pub enabled: bool,
}

impl Default for Jail {
    fn default() -> Self {
        Jail { enabled: true }
    }
}

/// How a command [`Jail::confine`] prepared is started: jailed, in a PID
/// namespace of its own ([`pid`]).
#[derive(Debug)]
#[must_use = "start the confined command with Confined::spawn"]
pub struct Confined(Option<PidNamespace>);

impl Confined {
    /// Starts `cmd` with its output in `log`, supervised.
    pub async fn spawn(
        self,
        name: &'static str,
        cmd: &mut Command,
        log: &Path,
    ) -> Result<Supervised, HypervisorError> {
        match self.0 {
            Some(ns) => ns.spawn(name, cmd, log).await,
            None => Supervised::spawn(name, cmd, log),
        }
    }
}

impl Jail {
    /// Makes `cmd`, the VM process of `spec` or its vsock helper, start
    /// confined: in its own PID namespace ([`pid`]) and root ([`root`]), no capabilities,
    /// no_new_privs, no core dumps, at most [`MAX_OPEN_FILES`], no file
    /// beyond guest memory plus 1 GiB (a write past it fails with EFBIG,
    /// SIGXFSZ being ignored, instead of killing the VM).
    ///
    /// Register it after anything else `cmd` does before exec that needs
    /// privileges (entering the pod's network namespace): it drops them.
    pub fn confine(&self, cmd: &mut Command, spec: &VmSpec) -> Result<Confined, HypervisorError> {
        if !self.enabled {
            return Ok(Confined(None));
        }
        let program = std::path::PathBuf::from(cmd.as_std().get_program());
        let io = |source| HypervisorError::Io {
            what: format!("preparing the jail of {}", program.display()),
            source,
        };
        let jail_root = root::plan(&program, spec).map_err(io)?;
        // First: the jail's proc is mounted inside the namespace.
        let pid_namespace = PidNamespace::enter_on_spawn(cmd).map_err(io)?;
        // SAFETY: in the child between fork and exec, as `enter` requires.
        unsafe {
            cmd.pre_exec(move || jail_root.enter());
        }
        let file_size = (u64::from(spec.memory_mib) << 20) + FILE_SIZE_BEYOND_MEMORY;
        self.apply(
            cmd,
            vec![
                (libc::RLIMIT_CORE, 0),
                (libc::RLIMIT_NOFILE, MAX_OPEN_FILES),
                (libc::RLIMIT_FSIZE, file_size),
            ],
            true,
        );
        Ok(Confined(Some(pid_namespace)))
    }

    /// Makes `cmd`, the vsock helper of `spec` (vhost-device-vsock),
    /// start confined as [`Jail::confine`] says and under the seccomp
    /// filter of its own ([`seccomp`]), installed last, right before exec.
    pub fn confine_vsock_helper(
        &self,
        cmd: &mut Command,
        spec: &VmSpec,
    ) -> Result<Confined, HypervisorError> {
        if !self.enabled {
            return Ok(Confined(None));
        }
        let filter = seccomp::vsock_helper()?;
        let confined = self.confine(cmd, spec)?;
        // SAFETY: `install` only issues system calls.
        unsafe {
            cmd.pre_exec(move || seccomp::install(filter));
        }
        Ok(confined)
    }

    /// Makes `cmd`, virtiofsd, start with no_new_privs and no core dumps;
    /// its files and descriptors stay unbounded here (it holds one per
    /// guest inode in use, raises its own descriptor limit, and writes
    /// the containers' files), and it sandboxes itself.
    pub fn confine_file_server(&self, cmd: &mut Command) {
        self.apply(cmd, vec![(libc::RLIMIT_CORE, 0)], false);
    }

    fn apply(
        &self,
        cmd: &mut Command,
        limits: Vec<(libc::__rlimit_resource_t, u64)>,
        drop_capabilities: bool,
    ) {
        if !self.enabled {
            return;
        }
        // SAFETY: prctl(2), setrlimit(2) and signal(2) are async-signal-safe;
        // the closure owns plain values and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if drop_capabilities {
                    // Needs CAP_SETPCAP, so before the bounding set goes.
                    if libc::prctl(libc::PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    for cap in 0..MAX_CAPS {
                        if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                            && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    if libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_CLEAR_ALL,
                        0,
                        0,
                        0,
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    // Effective, permitted and inheritable: all empty.
                    let header = CapHeader {
                        version: CAPABILITY_VERSION_3,
                        pid: 0,
                    };
                    let data = [CapData::default(); 2];
                    if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for &(resource, n) in &limits {
                    let l = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(resource, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Ignored survives exec: writes past RLIMIT_FSIZE fail instead.
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
    }
}
