//! The unprivileged user and group a VM's processes run as: one id per
//! VM, from the node's range (`[jail] first_id`, `ids`), used as both uid
//! and gid, so that one VM's processes cannot signal, trace or open the
//! files of another's, nor any host file that is not world-readable.
//!
//! An id is leased by an exclusive `flock` on `<JAIL_IDS>/<id>`, taken
//! without waiting; the lease's descriptor is inherited
//! by the VM process and its vsock helper, so the id stays leased while
//! any of them lives (even past the shim that leased it: a pool VM
//! outlives its filler). An id that some live process runs as (a lease
//! file removed by hand, a process that closed the descriptor) is
//! skipped too.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use podvisor_names::paths::JAIL_IDS;

use crate::HypervisorError;

/// The id a VM's processes run as, and the lease that keeps it theirs.
#[derive(Debug, Clone)]
pub struct Owner {
    pub id: u32,
    /// Held here until the VM's processes have inherited it; none when
    /// they hold it already (a pool VM taken over).
    lease: Option<Arc<File>>,
}

impl Owner {
    /// The id a running VM process (a pool VM) runs as; its processes
    /// hold the lease. See [`crate::Jail::runs_as`] for whether it is one
    /// the node's jail gives.
    pub fn of_process(pid: u32) -> Result<Owner, HypervisorError> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|source| {
            HypervisorError::Io {
                what: format!("reading the user of process {pid}"),
                source,
            }
        })?;
        let id = real_uid(&status).ok_or_else(|| {
            HypervisorError::Unavailable(format!("process {pid}: no Uid line in its status"))
        })?;
        Ok(Owner { id, lease: None })
    }

    /// The lease's descriptor, for the VM's processes to inherit.
    pub(crate) fn lease_fd(&self) -> Option<RawFd> {
        self.lease.as_ref().map(|f| f.as_raw_fd())
    }
}

/// The real uid on a `/proc/<pid>/status` text's `Uid:` line.
fn real_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|u| u.parse().ok())
}

/// The uids live processes run as (real or effective).
fn ids_in_use() -> std::collections::BTreeSet<u32> {
    let mut used = std::collections::BTreeSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return used;
    };
    for p in procs.flatten() {
        let name = p.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(status) = std::fs::read_to_string(p.path().join("status")) {
            if let Some(ids) = status.lines().find_map(|l| l.strip_prefix("Uid:")) {
                used.extend(ids.split_whitespace().filter_map(|u| u.parse::<u32>().ok()));
            }
        }
    }
    used
}

/// Tries to lease `id` in `dir`: its lease file locked without waiting,
/// through a read-only descriptor (the VM's processes inherit it: they
/// may not write the file).
fn try_lease(dir: &Path, id: u32) -> Result<Option<File>, HypervisorError> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let path = dir.join(id.to_string());
    let opening = |source| HypervisorError::Io {
        what: format!("opening the id lease {}", path.display()),
        source,
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| opening(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: open(2) of a NUL-terminated path; the descriptor is owned
    // by the File from here.
    let file = unsafe {
        let fd = libc::open(
            c_path.as_ptr(),
            libc::O_RDONLY | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600,
        );
        if fd < 0 {
            return Err(opening(std::io::Error::last_os_error()));
        }
        File::from_raw_fd(fd)
    };
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(HypervisorError::Io {
            what: format!("locking the id lease {}", path.display()),
            source: e,
        });
    }
    Ok(Some(file))
}

fn lease_dir() -> Result<&'static Path, HypervisorError> {
    let dir = Path::new(JAIL_IDS);
    std::fs::create_dir_all(dir).map_err(|source| HypervisorError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    Ok(dir)
}

/// Leases a free id of `first..first + count`.
pub fn lease(first: u32, count: u32) -> Result<Owner, HypervisorError> {
    let dir = lease_dir()?;
    let used = ids_in_use();
    // The lowest free: as many lease files as VMs ever ran at once.
    for id in (0..count).map(|i| first + i) {
        if used.contains(&id) {
            continue;
        }
        if let Some(file) = try_lease(dir, id)? {
            // Taken between the scan and the lock by a process that
            // holds no lease: not ours either.
            if ids_in_use().contains(&id) {
                continue;
            }
            return Ok(Owner {
                id,
                lease: Some(Arc::new(file)),
            });
        }
    }
    Err(HypervisorError::Unavailable(format!(
        "every jail id of {first}..{} is in use ([jail] first_id, ids)",
        u64::from(first) + u64::from(count)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_real_uid_is_read_from_status() {
        assert_eq!(
            real_uid("Name:\tqemu\nUid:\t1879048193\t1879048193\t1879048193\t1879048193\n"),
            Some(1_879_048_193)
        );
        assert_eq!(real_uid("Name:\tx\n"), None);
    }

    #[test]
    fn a_held_lease_is_not_given_twice_and_comes_back_when_closed() {
        let d = tempfile::tempdir().unwrap();
        let a = try_lease(d.path(), 7).unwrap().unwrap();
        assert!(try_lease(d.path(), 7).unwrap().is_none());
        assert!(try_lease(d.path(), 8).unwrap().is_some());
        drop(a);
        assert!(try_lease(d.path(), 7).unwrap().is_some());
    }

    #[test]
    fn ids_of_live_processes_are_seen() {
        // SAFETY: getuid(2) cannot fail.
        let me = unsafe { libc::getuid() };
        assert!(ids_in_use().contains(&me));
    }
}
