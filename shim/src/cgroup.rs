//! The pod's cgroup on the host: the sandbox's `linux.cgroupsPath`, the
//! leaf containerd names below the pod cgroup kubelet made (cgroupfs:
//! `/kubepods/<qos>/pod<uid>/<sandbox-id>`; systemd:
//! `kubepods-<qos>-pod<uid>.slice:cri-containerd:<sandbox-id>`), in every
//! hierarchy the host mounts (cgroup v1: each controller's; v2: the
//! unified one).
//!
//! The shim moves itself in before it starts the VM, so the VM process,
//! its helpers and the shim's own per-pod work are born there, and moves
//! the processes of a pool VM it takes over in (on v1 their memory with
//! them; on v2 what they already hold stays charged where the pool
//! started). The pod's overhead and guest memory are then accounted
//! and limited where Kubernetes says: kubelet sets the pod cgroup's
//! limits to the RuntimeClass overhead plus the containers' limits. What
//! outlives the pod (the pool filler and its VMs) starts where the shim
//! was. At teardown the shim goes back there and removes the leaf; after
//! a crashed shim, `delete` removes it. The leaf is made directly in the
//! cgroup filesystem (with the systemd driver too, as a `.scope` directory
//! systemd does not manage); parents that are missing are made, and on v2
//! each level enables its available controllers for the next, as runc
//! does; the parents are kubelet's to remove.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

const CGROUP_FS: &str = "/sys/fs/cgroup";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroupsPath {path:?}: {reason}")]
    Path { path: String, reason: String },
    #[error("the pod's cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One hierarchy the shim is in: where it is mounted and where in it the
/// shim was when it started.
#[derive(Debug)]
struct Hierarchy {
    mount: PathBuf,
    /// v1 cpuset: a new cgroup has no CPUs or memory nodes until given its
    /// parent's.
    cpuset: bool,
    /// v1 memory: charges can move with a process.
    memory_v1: bool,
    /// v2: a cgroup's controllers are those its parent enables.
    unified: bool,
    /// The shim's cgroup in it, as a directory.
    home: PathBuf,
}

/// The sandbox's cgroup in each hierarchy, the shim inside it.
#[derive(Debug)]
pub struct PodCgroup {
    /// (hierarchy, the leaf there).
    leaves: Vec<(Hierarchy, PathBuf)>,
}

impl PodCgroup {
    /// Makes the leaf `cgroups_path` names in every hierarchy and moves
    /// the shim into it; on failure, nothing of it is left and the shim is
    /// where it was.
    pub fn enter(cgroups_path: &str) -> Result<PodCgroup, CgroupError> {
        let relative = resolve(cgroups_path)?;
        let hierarchies = own_hierarchies()?;
        if hierarchies.is_empty() {
            return Err(CgroupError::Path {
                path: cgroups_path.to_string(),
                reason: format!("no cgroup hierarchy is mounted under {CGROUP_FS}"),
            });
        }
        // Each leaf recorded even if making it failed: dropping `cgroup`
        // removes whatever was made.
        let mut cgroup = PodCgroup { leaves: Vec::new() };
        for h in hierarchies {
            let leaf = h.mount.join(&relative);
            let made = make(&h, &relative);
            cgroup.leaves.push((h, leaf));
            made?;
        }
        let me = std::process::id();
        for (h, leaf) in &cgroup.leaves {
            if h.memory_v1 {
                // Best effort: gone from newer kernels' v1.
                let _ = fs::write(leaf.join("memory.move_charge_at_immigrate"), "3");
            }
            let procs = leaf.join("cgroup.procs");
            fs::write(&procs, me.to_string()).map_err(io_err(&procs))?;
        }
        Ok(cgroup)
    }

    /// Moves `pid` and its descendants (a pool VM's processes) in; an
    /// error (v1: its memory does not fit the pod's limit) means they are
    /// not all the pod's.
    pub fn adopt(&self, pid: u32) -> Result<(), CgroupError> {
        for p in with_descendants(pid) {
            for (_, leaf) in &self.leaves {
                let procs = leaf.join("cgroup.procs");
                match fs::write(&procs, p.to_string()) {
                    Ok(()) => {}
                    // Exited meanwhile.
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                    Err(e) => return Err(io_err(&procs)(e)),
                }
            }
        }
        Ok(())
    }

    /// Makes `cmd` start where the shim was, outside the pod's cgroup (for
    /// what outlives the pod); an error if it could not.
    pub fn start_outside(&self, cmd: &mut tokio::process::Command) -> Result<(), CgroupError> {
        let homes = self
            .leaves
            .iter()
            .map(|(h, _)| {
                let procs = h.home.join("cgroup.procs");
                fs::OpenOptions::new()
                    .write(true)
                    .open(&procs)
                    .map_err(io_err(&procs))
            })
            .collect::<Result<Vec<fs::File>, CgroupError>>()?;
        // SAFETY: write(2) is async-signal-safe; the files are open, and
        // "0" moves the writer.
        unsafe {
            cmd.pre_exec(move || {
                for f in &homes {
                    if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok(())
    }
}

/// Leaving: the shim goes back where it was and the leaf is removed (once
/// the VM's processes are gone: an exiting one keeps it busy a moment).
impl Drop for PodCgroup {
    fn drop(&mut self) {
        let me = std::process::id().to_string();
        for (h, _) in &self.leaves {
            let procs = h.home.join("cgroup.procs");
            if let Err(e) = fs::write(&procs, &me) {
                tracing::warn!("moving the shim back to {}: {e}", procs.display());
            }
        }
        remove_leaves(self.leaves.iter().map(|(_, leaf)| leaf.as_path()));
    }
}

/// After a crashed shim: kills what is left in the leaf `cgroups_path`
/// names (only the pod's processes live there: a helper's child the
/// shim's record missed) and removes it.
pub fn remove_leftover(cgroups_path: &str) {
    let (Ok(relative), Ok(hierarchies)) = (resolve(cgroups_path), own_hierarchies()) else {
        return;
    };
    let leaves: Vec<PathBuf> = hierarchies
        .iter()
        .map(|h| h.mount.join(&relative))
        .filter(|l| l.exists())
        .collect();
    for leaf in &leaves {
        let procs = fs::read_to_string(leaf.join("cgroup.procs")).unwrap_or_default();
        for pid in procs
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2) with plain integers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    remove_leaves(leaves.iter().map(PathBuf::as_path));
}

/// Removes each leaf, giving processes that are exiting up to two seconds
/// in all to leave them.
fn remove_leaves<'a>(leaves: impl Iterator<Item = &'a Path>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    for leaf in leaves {
        loop {
            match fs::remove_dir(leaf) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!("removing {}: {e}; retrying", leaf.display());
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    tracing::warn!("removing the pod's cgroup {}: {e}", leaf.display());
                    break;
                }
            }
        }
    }
}

/// `pid` and its descendants, as /proc lists them (each thread's
/// children).
fn with_descendants(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let mut i = 0;
    while let Some(&p) = pids.get(i) {
        let tasks = fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten();
        for t in tasks.flatten() {
            let children = fs::read_to_string(t.path().join("children")).unwrap_or_default();
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    pids
}

/// Makes the cgroup `relative` and any missing parent in hierarchy `h`:
/// v1 cpuset gives each its parent's CPUs and memory nodes; v2 has each
/// level above the leaf enable its controllers for the next.
fn make(h: &Hierarchy, relative: &Path) -> Result<(), CgroupError> {
    let mut dir = h.mount.clone();
    for part in relative.components() {
        let parent = dir.clone();
        if h.unified {
            enable_controllers(&parent);
        }
        dir.push(part);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
        if h.cpuset {
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let mine = dir.join(file);
                if fs::read_to_string(&mine)
                    .unwrap_or_default()
                    .trim()
                    .is_empty()
                {
                    let theirs = fs::read_to_string(parent.join(file)).unwrap_or_default();
                    fs::write(&mine, theirs.trim()).map_err(io_err(&mine))?;
                }
            }
        }
    }
    Ok(())
}

/// v2: enables in `dir` every controller it has for its children (one by
/// one: a controller the kernel refuses there does not stop the others).
fn enable_controllers(dir: &Path) {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for c in available.split_whitespace() {
        if enabled.split_whitespace().any(|e| e == c) {
            continue;
        }
        if let Err(e) = fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")) {
            tracing::debug!("enabling {c} in {}: {e}", dir.display());
        }
    }
}

/// The cgroup `cgroups_path` names, relative to a hierarchy's root: a path
/// (cgroupfs driver), or `slice:prefix:name` (systemd driver, expanded as
/// systemd lays out slices and scopes).
fn resolve(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let bad = |reason: &str| CgroupError::Path {
        path: cgroups_path.to_string(),
        reason: reason.to_string(),
    };
    let path = match cgroups_path.split(':').collect::<Vec<_>>()[..] {
        [path] => PathBuf::from(path),
        [slice, prefix, name] => {
            let mut p = expand_slice(if slice.is_empty() {
                "system.slice"
            } else {
                slice
            })
            .ok_or_else(|| bad("not a systemd slice:prefix:name"))?;
            // runc's unit name: a scope unless a slice is asked for.
            if name.ends_with(".slice") {
                p.push(name);
            } else {
                p.push(format!("{prefix}-{name}.scope"));
            }
            p
        }
        _ => return Err(bad("neither a path nor a systemd slice:prefix:name")),
    };
    let mut relative = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => relative.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(bad("it must not climb out with \"..\""))
            }
        }
    }
    if relative.as_os_str().is_empty() {
        return Err(bad("it names the root cgroup"));
    }
    Ok(relative)
}

/// `a-b-c.slice` → `a.slice/a-b.slice/a-b-c.slice` (`-.slice`, the root:
/// empty); `None` if it is not a slice name.
fn expand_slice(slice: &str) -> Option<PathBuf> {
    let stem = slice.strip_suffix(".slice")?;
    if slice.contains('/') {
        return None;
    }
    let mut path = PathBuf::new();
    if stem == "-" {
        return Some(path);
    }
    let mut prefix = String::new();
    for part in stem.split('-') {
        if part.is_empty() {
            return None;
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
        prefix.push('-');
    }
    Some(path)
}

/// The hierarchies the shim is in that are mounted under
/// [`CGROUP_FS`], with its cgroup in each.
fn own_hierarchies() -> Result<Vec<Hierarchy>, CgroupError> {
    let read = |p: &str| fs::read_to_string(p).map_err(io_err(Path::new(p)));
    Ok(hierarchies(
        &read("/proc/self/cgroup")?,
        &read("/proc/self/mountinfo")?,
    ))
}

/// [`own_hierarchies`] from the text of /proc/self/cgroup and mountinfo.
fn hierarchies(cgroup: &str, mountinfo: &str) -> Vec<Hierarchy> {
    // (fstype, mount point, root, super options) of each cgroup mount.
    let mounts: Vec<(&str, &str, &str, Vec<&str>)> = mountinfo
        .lines()
        .filter_map(|l| {
            let (fields, tail) = l.split_once(" - ")?;
            let f: Vec<&str> = fields.split(' ').collect();
            let t: Vec<&str> = tail.split(' ').collect();
            let (root, point) = (*f.get(3)?, *f.get(4)?);
            let fstype = *t.first()?;
            let options = t.get(2).map(|o| o.split(',').collect()).unwrap_or_default();
            (point.starts_with(CGROUP_FS) && (fstype == "cgroup" || fstype == "cgroup2"))
                .then_some((fstype, point, root, options))
        })
        .collect();
    let mut found: Vec<Hierarchy> = Vec::new();
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let wanted: Vec<&str> = controllers.split(',').filter(|c| !c.is_empty()).collect();
        let mount = mounts.iter().find(|(fstype, _, _, options)| {
            if wanted.is_empty() {
                *fstype == "cgroup2"
            } else {
                *fstype == "cgroup" && wanted.iter().all(|c| options.contains(c))
            }
        });
        let Some(&(fstype, point, root, _)) = mount else {
            continue;
        };
        // A mount of a subtree (a cgroup namespace's view) shows the
        // shim's path below its root.
        let Ok(inside) = Path::new(path).strip_prefix(root) else {
            continue;
        };
        let h = Hierarchy {
            mount: PathBuf::from(point),
            cpuset: fstype == "cgroup" && wanted.contains(&"cpuset"),
            memory_v1: fstype == "cgroup" && wanted.contains(&"memory"),
            unified: fstype == "cgroup2",
            home: Path::new(point).join(inside),
        };
        if !found.iter().any(|f| f.mount == h.mount) {
            found.push(h);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_and_systemd_paths_resolve() {
        assert_eq!(
            resolve("/kubepods/besteffort/podX/abc").unwrap(),
            PathBuf::from("kubepods/besteffort/podX/abc")
        );
        assert_eq!(
            resolve("kubepods-besteffort-podX.slice:cri-containerd:abc").unwrap(),
            PathBuf::from(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podX.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            resolve(":cri-containerd:abc").unwrap(),
            PathBuf::from("system.slice/cri-containerd-abc.scope")
        );
        assert_eq!(
            resolve("machine.slice::vm").unwrap(),
            PathBuf::from("machine.slice/-vm.scope"),
            "runc's name for an empty prefix"
        );
        for bad in [
            "/a/../../etc",
            "/",
            "a:b",
            "x.slice/y:p:n",
            "a--b.slice:p:n",
        ] {
            let e = resolve(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn hierarchies_pair_the_shims_cgroups_with_their_mounts() {
        let mountinfo = "\
25 20 0:22 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
27 25 0:24 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
28 25 0:25 /sub /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
29 25 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
30 20 0:27 / /mnt/elsewhere rw - cgroup cgroup rw,pids";
        let cgroup = "\
5:pids:/ctd
4:memory:/sub/ctd
3:cpuset:/
2:cpu,cpuacct:/ctd
0::/ctd";
        let h = hierarchies(cgroup, mountinfo);
        let got: Vec<(&str, &str, bool, bool)> = h
            .iter()
            .map(|h| {
                (
                    h.mount.to_str().unwrap(),
                    h.home.to_str().unwrap(),
                    h.cpuset,
                    h.memory_v1,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "/sys/fs/cgroup/memory",
                    "/sys/fs/cgroup/memory/ctd",
                    false,
                    true
                ),
                (
                    "/sys/fs/cgroup/cpuset",
                    "/sys/fs/cgroup/cpuset/",
                    true,
                    false
                ),
                (
                    "/sys/fs/cgroup/cpu,cpuacct",
                    "/sys/fs/cgroup/cpu,cpuacct/ctd",
                    false,
                    false
                ),
                (
                    "/sys/fs/cgroup/unified",
                    "/sys/fs/cgroup/unified/ctd",
                    false,
                    false
                ),
            ]
        );
    }
}
