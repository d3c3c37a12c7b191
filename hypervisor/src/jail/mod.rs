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
//! Both run as an unprivileged id of their own ([`ids`]), one per VM:
//! they write only in the VM's own subdirectory ([`crate::VM_DIR`],
//! theirs), open `/dev/kvm` and `/dev/net/tun` through nodes of their
//! root that the id owns, reach virtiofsd's socket given to the id, and
//! attach to taps the shim made with the id as owner (`TUNSETOWNER`).

pub mod ids;
pub mod pid;
pub mod root;
pub mod seccomp;

use std::os::unix::fs::PermissionsExt;
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
    /// The ids VMs run as: `ids` of them from `first_id`, each a uid and
    /// a gid no one else on the node uses.
    pub first_id: u32,
    pub ids: u32,
}

/// The default range: 65536 ids from 0x70000000, above the ranges
/// systemd gives containers (to 0x6FFFFFFF) and below its own at the top.
const FIRST_ID: u32 = 0x7000_0000;
const IDS: u32 = 0x1_0000;
/// Ids below are the host's users' and services'.
const MIN_FIRST_ID: u32 = 0x1_0000;

impl Default for Jail {
    fn default() -> Self {
        Jail {
            enabled: true,
            first_id: FIRST_ID,
            ids: IDS,
        }
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
    /// Whether the id range is usable: above the ids a host's users and
    /// services get (a VM must share its id with none), not past the last.
    pub fn check(&self) -> Result<(), String> {
        if self.first_id < MIN_FIRST_ID || self.ids == 0 {
            return Err(format!(
                "[jail] first_id must be at least {MIN_FIRST_ID} (above the host's users) and ids above 0"
            ));
        }
        if u64::from(self.first_id) + u64::from(self.ids) > u64::from(u32::MAX) {
            return Err(format!(
                "[jail] first_id {} + ids {} is past the last id {}",
                self.first_id,
                self.ids,
                u32::MAX - 1
            ));
        }
        Ok(())
    }

    /// Whether a VM running as `id` (a pool VM) runs as this jail would
    /// run it: an id of its range, or root's with the jail off.
    pub fn runs_as(&self, id: u32) -> bool {
        if self.enabled {
            id >= self.first_id && u64::from(id) < u64::from(self.first_id) + u64::from(self.ids)
        } else {
            id == 0
        }
    }

    /// `spec` ready to start: with the id its processes run as (leased
    /// unless it has one), its own directory ([`VmSpec::vm_dir`]) made,
    /// owned by that id, private to it, with what is in it (a pool VM's
    /// console, when another VM takes over its directory), and its taps the
    /// id's. Call before anything is put in that directory (listeners on
    /// the vsock's ports).
    pub fn prepare(&self, spec: &VmSpec) -> Result<VmSpec, HypervisorError> {
        let mut spec = spec.clone();
        if self.enabled && spec.owner.is_none() {
            self.check().map_err(HypervisorError::Unavailable)?;
            spec.owner = Some(ids::lease(self.first_id, self.ids)?);
        }
        let dir = spec.vm_dir();
        let io = |what: &str| {
            let what = format!("{what} {}", dir.display());
            move |source| HypervisorError::Io { what, source }
        };
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(io("creating")(e));
            }
            _ => {}
        }
        let meta = std::fs::symlink_metadata(&dir).map_err(io("reading"))?;
        if !meta.is_dir() {
            return Err(HypervisorError::Unavailable(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        let id = spec.owner.as_ref().map(|o| o.id);
        std::os::unix::fs::lchown(&dir, id, id).map_err(io("giving to the VM's id"))?;
        for entry in std::fs::read_dir(&dir).map_err(io("reading"))? {
            let path = entry.map_err(io("reading"))?.path();
            std::os::unix::fs::lchown(&path, id, id).map_err(io("giving to the VM's id"))?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("making private"))?;
        crate::tap::give(&spec)?;
        Ok(spec)
    }

    /// Gives `path` (a socket a root process made in the VM's directory
    /// for the VM to connect to) to the VM's id.
    pub fn give(spec: &VmSpec, path: &Path) -> Result<(), HypervisorError> {
        let id = spec.owner.as_ref().map(|o| o.id);
        std::os::unix::fs::lchown(path, id, id).map_err(|source| HypervisorError::Io {
            what: format!("giving {} to the VM's id", path.display()),
            source,
        })
    }

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
        let owner = spec.owner.clone().ok_or_else(|| {
            HypervisorError::Unavailable(format!(
                "{}: no id to run as (Jail::prepare leases one)",
                program.display()
            ))
        })?;
        let jail_root = root::plan(&program, spec, owner.id).map_err(io)?;
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
            Some(owner),
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
        self.apply(cmd, vec![(libc::RLIMIT_CORE, 0)], None);
    }

    /// Registers the last steps before exec: `limits`; and with an
    /// `owner` (the VM process, its vsock helper), the switch to its id
    /// with no capabilities, the id's lease inherited.
    fn apply(
        &self,
        cmd: &mut Command,
        limits: Vec<(libc::__rlimit_resource_t, u64)>,
        owner: Option<ids::Owner>,
    ) {
        if !self.enabled {
            return;
        }
        // SAFETY: prctl(2), setrlimit(2), fcntl(2), the set*id(2) calls and
        // signal(2) are async-signal-safe; the closure owns plain values
        // (the lease's descriptor kept open by its Arc) and allocates
        // nothing.
        unsafe {
            cmd.pre_exec(move || {
                // Before the capabilities go: lowering is free, raising
                // is not.
                for &(resource, n) in &limits {
                    let l = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(resource, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(owner) = &owner {
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
                    // The lease lives as long as any process holding it.
                    if let Some(fd) = owner.lease_fd() {
                        if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    // No supplementary groups, then the id (which empties
                    // the permitted and effective sets: no KEEP_CAPS).
                    let id = owner.id;
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setresgid(id, id, id) != 0
                        || libc::setresuid(id, id, id) != 0
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
                // Ignored survives exec: writes past RLIMIT_FSIZE fail instead.
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_range_is_checked_and_known() {
        let jail = Jail::default();
        assert!(jail.check().is_ok());
        assert!(jail.runs_as(FIRST_ID) && jail.runs_as(FIRST_ID + IDS - 1));
        assert!(!jail.runs_as(0) && !jail.runs_as(FIRST_ID + IDS));
        let off = Jail {
            enabled: false,
            ..jail
        };
        assert!(off.runs_as(0) && !off.runs_as(FIRST_ID));
        for (first_id, ids) in [(0, 10), (1000, 10), (FIRST_ID, 0), (u32::MAX - 5, 10)] {
            let bad = Jail {
                first_id,
                ids,
                ..jail
            };
            assert!(bad.check().is_err(), "{first_id} + {ids}");
        }
    }
}
