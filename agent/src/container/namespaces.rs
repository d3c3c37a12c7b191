//! The namespaces a container's init gets, from the OCI spec's
//! `linux.namespaces`: a new one for each entry without a path, the named
//! one for each entry with a path, the guest's own for every kind the spec
//! leaves out. The plan is checked with no effect ([`NamespacePlan`]);
//! then the agent opens its paths ([`NamespacePlan::open`]), so a bad one
//! fails create with its name before anything is forked.
//!
//! A path `<GUEST_NAMESPACE_DIR>/<container-id>/<kind>` names a namespace
//! of another container's init (the shim writes the pod sandbox's shared
//! PID, IPC and UTS namespaces so); any other path is opened as it is.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::sched::{setns, unshare, CloneFlags};
use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType};
use podvisor_protocol::GUEST_NAMESPACE_DIR;

use super::ChildError;
use crate::error::{invalid, precondition, Result};

/// How the init gets its namespaces, checked.
#[derive(Debug)]
pub struct NamespacePlan {
    /// The files to enter with setns, in this order.
    join: Vec<(&'static str, PathBuf)>,
    /// Made with unshare after joining.
    new: CloneFlags,
    /// The init gets a UTS namespace of its own (so it may set the
    /// hostname).
    pub own_uts: bool,
    /// The init is PID 1 of a namespace of its own, so its exit ends every
    /// process of the container; otherwise the agent has to.
    pub own_pid: bool,
}

/// The `/proc/<pid>/ns/` name and clone flag of an OCI namespace kind.
fn kind(t: LinuxNamespaceType) -> (&'static str, CloneFlags) {
    match t {
        LinuxNamespaceType::Mount => ("mnt", CloneFlags::CLONE_NEWNS),
        LinuxNamespaceType::Cgroup => ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        LinuxNamespaceType::Uts => ("uts", CloneFlags::CLONE_NEWUTS),
        LinuxNamespaceType::Ipc => ("ipc", CloneFlags::CLONE_NEWIPC),
        LinuxNamespaceType::User => ("user", CloneFlags::CLONE_NEWUSER),
        LinuxNamespaceType::Pid => ("pid", CloneFlags::CLONE_NEWPID),
        LinuxNamespaceType::Network => ("net", CloneFlags::CLONE_NEWNET),
        LinuxNamespaceType::Time => ("time", CloneFlags::from_bits_retain(libc::CLONE_NEWTIME)),
    }
}

impl NamespacePlan {
    /// The plan for `namespaces`; `init_pid_of` gives the init pid of a
    /// running container of this guest, by id.
    pub fn from_spec(
        namespaces: &[LinuxNamespace],
        init_pid_of: &dyn Fn(&str) -> Option<i32>,
    ) -> Result<NamespacePlan> {
        // The init always builds its own mount table (pivot_root), and
        // sees its own cgroup as the root of a cgroup namespace unless the
        // spec names one to join (the guest is cgroup v2 only).
        let mut plan = NamespacePlan {
            join: Vec::new(),
            new: CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWCGROUP,
            own_uts: false,
            own_pid: false,
        };
        let mut seen = Vec::new();
        for ns in namespaces {
            let (name, flag) = kind(ns.typ());
            if seen.contains(&name) {
                return Err(invalid!("linux.namespaces lists {:?} twice", ns.typ()));
            }
            seen.push(name);
            if ns.typ() == LinuxNamespaceType::User {
                return Err(invalid!(
                    "user namespaces are not supported in podvisor guests (linux.namespaces \
                     has a user entry)"
                ));
            }
            match ns.path() {
                None => plan.new |= flag,
                Some(p) if p.as_os_str().is_empty() => plan.new |= flag,
                Some(_) if ns.typ() == LinuxNamespaceType::Mount => {
                    return Err(invalid!(
                        "joining a mount namespace is not supported: a container builds its own"
                    ))
                }
                Some(path) => {
                    plan.new.remove(flag);
                    plan.join.push((name, resolve(path, name, init_pid_of)?));
                }
            }
        }
        plan.own_uts = plan.new.contains(CloneFlags::CLONE_NEWUTS);
        plan.own_pid = plan.new.contains(CloneFlags::CLONE_NEWPID);
        Ok(plan)
    }

    /// Opens each namespace to join. A path that is not a namespace is
    /// refused by name (opened without blocking: a FIFO cannot hang the
    /// agent).
    pub fn open(self) -> Result<Namespaces> {
        let mut join = Vec::new();
        for (name, path) in self.join {
            let cannot = |e: &dyn std::fmt::Display| {
                invalid!("{name} namespace {} cannot be joined: {e}", path.display())
            };
            let file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(&path)
                .map_err(|e| cannot(&e))?;
            let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| cannot(&e))?;
            if fs.filesystem_type() != NSFS_MAGIC {
                return Err(cannot(&"not a namespace file"));
            }
            join.push((name, OwnedFd::from(file)));
        }
        Ok(Namespaces {
            join,
            new: self.new,
            own_uts: self.own_uts,
            own_pid: self.own_pid,
        })
    }
}

/// nsfs, the filesystem of `/proc/<pid>/ns/*`.
const NSFS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0x6e73_6673);

/// A [`NamespacePlan`] with its namespaces to join open.
#[derive(Debug)]
pub struct Namespaces {
    join: Vec<(&'static str, OwnedFd)>,
    new: CloneFlags,
    pub own_uts: bool,
    pub own_pid: bool,
}

impl Namespaces {
    /// Enters the namespaces but a new cgroup namespace. Runs in the
    /// forked intermediate: a new or joined PID namespace takes effect for
    /// its children.
    pub fn enter(&self) -> Result<(), ChildError> {
        for (name, fd) in &self.join {
            setns(fd.as_fd(), CloneFlags::empty())
                .map_err(|e| ChildError(format!("entering the {name} namespace: {e}")))?;
        }
        let new = self.new - CloneFlags::CLONE_NEWCGROUP;
        unshare(new).map_err(|e| ChildError(format!("unshare {new:?}: {e}")))
    }

    /// Makes the new cgroup namespace, if there is one: its root is the
    /// cgroup the caller is in, so the container process calls it once it
    /// has joined its container's cgroup.
    pub fn enter_cgroup(&self) -> Result<(), ChildError> {
        if self.new.contains(CloneFlags::CLONE_NEWCGROUP) {
            unshare(CloneFlags::CLONE_NEWCGROUP)
                .map_err(|e| ChildError(format!("unshare the cgroup namespace: {e}")))?;
        }
        Ok(())
    }
}

/// The file behind a namespace path: a container's init for a path under
/// [`GUEST_NAMESPACE_DIR`], the path itself otherwise.
fn resolve(path: &Path, name: &str, init_pid_of: &dyn Fn(&str) -> Option<i32>) -> Result<PathBuf> {
    let Ok(rest) = path.strip_prefix(GUEST_NAMESPACE_DIR) else {
        return Ok(path.to_owned());
    };
    let parts: Vec<_> = rest.iter().filter_map(|p| p.to_str()).collect();
    let [id, kind] = parts[..] else {
        return Err(invalid!(
            "namespace path {} is not {GUEST_NAMESPACE_DIR}/<container>/<kind>",
            path.display()
        ));
    };
    if kind != name {
        return Err(invalid!(
            "namespace path {} names a {kind} namespace for a {name} entry",
            path.display()
        ));
    }
    let pid = init_pid_of(id).ok_or_else(|| {
        precondition!(
            "cannot join the {name} namespace of container {id}: it is not running in this guest"
        )
    })?;
    Ok(PathBuf::from(format!("/proc/{pid}/ns/{name}")))
}

/// The namespaces an exec joins: every one of its container's init
/// (joining one the agent is in already changes nothing). Mount last:
/// after it, /proc is the container's.
pub const EXEC_NAMESPACES: [&str; 7] = ["cgroup", "ipc", "uts", "net", "time", "pid", "mnt"];

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_ns(json: &str) -> Vec<LinuxNamespace> {
        serde_json::from_str(json).unwrap()
    }

    fn none(_: &str) -> Option<i32> {
        None
    }

    #[test]
    fn entries_without_path_are_new_and_mount_always_is() {
        let p = NamespacePlan::from_spec(&spec_ns(r#"[{"type":"pid"},{"type":"uts"}]"#), &none)
            .unwrap();
        assert_eq!(
            p.new,
            CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWCGROUP
                | CloneFlags::CLONE_NEWPID
                | CloneFlags::CLONE_NEWUTS
        );
        assert!(p.join.is_empty());
        assert!(p.own_uts && p.own_pid);
    }

    #[test]
    fn sandbox_paths_resolve_to_the_init() {
        let me = i32::try_from(std::process::id()).unwrap();
        let pid_of = move |id: &str| (id == "sb").then_some(me);
        let p = NamespacePlan::from_spec(
            &spec_ns(&format!(
                r#"[{{"type":"pid","path":"{GUEST_NAMESPACE_DIR}/sb/pid"}},{{"type":"ipc","path":"{GUEST_NAMESPACE_DIR}/sb/ipc"}},{{"type":"uts","path":"{GUEST_NAMESPACE_DIR}/sb/uts"}}]"#
            )),
            &pid_of,
        )
        .unwrap();
        assert_eq!(p.join.len(), 3);
        assert_eq!(p.new, CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWCGROUP);
        assert!(!p.own_uts && !p.own_pid);
    }

    #[test]
    fn every_kind_the_shim_announces_can_be_made() {
        for kind in podvisor_protocol::guest_features::NAMESPACES {
            let json = format!(r#"[{{"type":"{kind}"}}]"#);
            NamespacePlan::from_spec(&spec_ns(&json), &none).unwrap();
        }
    }

    #[test]
    fn bad_entries_are_named() {
        let cases = [
            (r#"[{"type":"user"}]"#.to_string(), "user namespaces"),
            (r#"[{"type":"pid"},{"type":"pid"}]"#.to_string(), "twice"),
            (
                format!(r#"[{{"type":"pid","path":"{GUEST_NAMESPACE_DIR}/gone/pid"}}]"#),
                "container gone",
            ),
            (
                format!(r#"[{{"type":"pid","path":"{GUEST_NAMESPACE_DIR}/sb/ipc"}}]"#),
                "names a ipc namespace",
            ),
            (
                r#"[{"type":"mount","path":"/proc/1/ns/mnt"}]"#.to_string(),
                "mount namespace",
            ),
        ];
        for (json, want) in cases {
            let e = NamespacePlan::from_spec(&spec_ns(&json), &none).unwrap_err();
            assert!(e.to_string().contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn paths_open_only_as_namespaces() {
        let me = std::process::id();
        let ok = spec_ns(&format!(r#"[{{"type":"ipc","path":"/proc/{me}/ns/ipc"}}]"#));
        let plan = NamespacePlan::from_spec(&ok, &none).unwrap();
        assert_eq!(plan.open().unwrap().join.len(), 1);
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        for (path, want) in [
            ("/nonexistent/ns".to_string(), "/nonexistent/ns"),
            (fifo.display().to_string(), "not a namespace file"),
            ("/proc/self/status".to_string(), "not a namespace file"),
        ] {
            let spec = spec_ns(&format!(r#"[{{"type":"ipc","path":"{path}"}}]"#));
            let e = NamespacePlan::from_spec(&spec, &none)
                .unwrap()
                .open()
                .unwrap_err();
            assert!(e.to_string().contains(want), "{path}: {e}");
        }
    }
}
