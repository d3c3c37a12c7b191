//! A container's OCI bundle, and what of it the guest gets.
//!
//! The guest cannot see host paths, so [`Bundle::share`] mounts the rootfs
//! containerd prepared at `shared/<id>/rootfs` and every bind-mount source
//! at `shared/<id>/mounts/<n>`, and rewrites the spec to point at those
//! paths as the guest sees them (`/run/podvisor/shared/...`). Every host
//! mount is bound on its own: a recursive bind's submounts are shared at
//! `mounts/<n>.<k>` and become mounts of their own in the spec, so each
//! keeps its read-only or writable state in the guest, and no copy of a
//! submount sits on the host's directories (which the host could then not
//! remove). A bind of memory the pod shares (a memory-backed emptyDir, or
//! a subPath of one; the sandbox's `/dev/shm`) is not shared: it names a
//! tmpfs of the guest's (`/run/podvisor/tmpfs/<name>`, a `PodTmpfs` the
//! agent mounts). Namespace paths to the pod's sandbox become the
//! guest's names for the sandbox's namespaces; the network namespace goes
//! (the VM's network is the pod's). Host-only parts (hooks, device nodes)
//! are dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount as RootfsMount;
use nix::mount::{mount, MsFlags};
use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};
use podvisor_protocol::{api, GUEST_NAMESPACE_DIR, GUEST_SHARED_DIR, GUEST_TMPFS_DIR};

/// Kubernetes' CRI plugin marks sandbox and workload containers so.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("reading {path}: {reason}")]
    Spec { path: PathBuf, reason: String },
    #[error("container {id}: {reason}")]
    Share { id: String, reason: String },
}

/// The pod a container is shared into: its sandbox's container id and the
/// task pid containerd knows the sandbox by (the VM process's), which
/// CRI namespace paths (`/proc/<pid>/ns/<kind>`) name.
pub struct PodRef<'a> {
    pub sandbox_id: &'a str,
    pub vm_pid: u32,
}

/// Which VM a container belongs in.
#[derive(Debug, PartialEq, Eq)]
pub enum Role {
    /// It starts a pod (a CRI sandbox, or a plain `ctr run` container):
    /// it gets a new VM, named by its own id.
    Sandbox,
    /// A workload container of the pod `sandbox_id`.
    Member { sandbox_id: String },
}

pub struct Bundle {
    pub dir: PathBuf,
    pub spec: Spec,
}

/// What the guest gets of a container: its OCI spec (JSON), and the pod's
/// in-memory volumes its mounts use.
#[derive(Debug)]
pub struct Shared {
    pub spec: Vec<u8>,
    pub tmpfs: Vec<api::PodTmpfs>,
}

/// kubelet's directory of a pod's emptyDir volumes, each `<dir>/<name>`.
const EMPTY_DIR: &str = "kubernetes.io~empty-dir";
/// kubelet's directory of a pod's subPath binds, each
/// `<pod>/<dir>/<volume>/<container>/<n>`.
const VOLUME_SUBPATHS: &str = "volume-subpaths";

impl Bundle {
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let path = dir.join("config.json");
        let fail = |reason: String| BundleError::Spec {
            path: path.clone(),
            reason,
        };
        // serde_json's own errors name the bad field and value.
        let bytes = std::fs::read(&path).map_err(|e| fail(e.to_string()))?;
        let spec: Spec = serde_json::from_slice(&bytes).map_err(|e| fail(e.to_string()))?;
        Ok(Bundle {
            dir: dir.to_owned(),
            spec,
        })
    }

    /// The spec's `linux.cgroupsPath`: for a sandbox, the pod's cgroup.
    pub fn cgroups_path(&self) -> Option<String> {
        self.spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|p| !p.is_empty())
    }

    pub fn annotations(&self) -> HashMap<String, String> {
        self.spec.annotations().clone().unwrap_or_default()
    }

    /// The CRI host-namespace settings this container asks for
    /// (`hostNetwork`, `hostPID`, `hostIPC`): the namespaces a CRI spec
    /// leaves out share the node's. Plain (non-CRI) containers ask for
    /// none.
    pub fn host_namespaces(&self) -> Vec<&'static str> {
        let a = self.annotations();
        let Some(kind) = a.get(CONTAINER_TYPE) else {
            return Vec::new();
        };
        let listed: Vec<LinuxNamespaceType> = self
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .map(|ns| ns.iter().map(|n| n.typ()).collect())
            .unwrap_or_default();
        let mut wanted = vec![
            (LinuxNamespaceType::Pid, "hostPID"),
            (LinuxNamespaceType::Ipc, "hostIPC"),
        ];
        if kind == "sandbox" {
            wanted.insert(0, (LinuxNamespaceType::Network, "hostNetwork"));
        }
        wanted
            .into_iter()
            .filter(|(t, _)| !listed.contains(t))
            .map(|(_, field)| field)
            .collect()
    }

    pub fn role(&self) -> Role {
        let a = self.annotations();
        match (a.get(CONTAINER_TYPE).map(String::as_str), a.get(SANDBOX_ID)) {
            (Some("container"), Some(sid)) if !sid.is_empty() => Role::Member {
                sandbox_id: sid.clone(),
            },
            _ => Role::Sandbox,
        }
    }

    /// Mounts the rootfs and the bind-mount sources of container `id` under
    /// `target` (its `shared/<id>/`) and returns what the guest gets. A
    /// bind of a tmpfs the pod keeps in memory ([`pod_tmpfs`]) is not
    /// shared: it names the guest's own tmpfs instead. On error the caller
    /// removes `target`.
    pub fn share(
        &self,
        id: &str,
        rootfs: &[RootfsMount],
        target: &Path,
        pod: &PodRef<'_>,
    ) -> Result<Shared, BundleError> {
        let fail = |reason: String| BundleError::Share {
            id: id.to_string(),
            reason,
        };
        let root_dir = target.join("rootfs");
        std::fs::create_dir_all(&root_dir)
            .map_err(|e| fail(format!("creating {}: {e}", root_dir.display())))?;
        if rootfs.is_empty() {
            let root = self.spec.root().as_ref().ok_or_else(|| {
                fail("the spec has no root and containerd sent no rootfs mounts".into())
            })?;
            let src = self.dir.join(root.path());
            bind(&src, &root_dir, true, false)
                .map_err(|e| fail(format!("rootfs {}: {e}", src.display())))?;
        } else {
            for m in rootfs {
                let t = (!m.type_.is_empty()).then_some(m.type_.as_str());
                let s = (!m.source.is_empty()).then_some(m.source.as_str());
                containerd_shim::mount::mount_rootfs(t, s, &m.options, &root_dir).map_err(|e| {
                    fail(format!("mounting rootfs ({} {}): {e}", m.type_, m.source))
                })?;
            }
        }

        let mut spec = self.spec.clone();
        let mut tmpfs = Vec::new();
        let guest_dir = Path::new(GUEST_SHARED_DIR).join(id);
        if let Some(mounts) = spec.mounts_mut() {
            let mut shared = Vec::with_capacity(mounts.len());
            for (n, mut m) in mounts.drain(..).enumerate() {
                let opts = m.options().clone().unwrap_or_default();
                let is_bind = m.typ().as_deref() == Some("bind")
                    || opts.iter().any(|o| o == "bind" || o == "rbind");
                if !is_bind {
                    shared.push(m);
                    continue;
                }
                let src = m.source().clone().ok_or_else(|| {
                    fail(format!(
                        "bind mount {} has no source",
                        m.destination().display()
                    ))
                })?;
                if let Some((mut volume, below)) = pod_tmpfs(&src, m.destination(), pod.sandbox_id)
                {
                    let guest = Path::new(GUEST_TMPFS_DIR).join(&volume.name);
                    if below.is_empty() {
                        m.set_source(Some(guest));
                    } else {
                        m.set_source(Some(guest.join(&below)));
                        volume.subdirs.push(below);
                    }
                    tmpfs.push(volume);
                    shared.push(m);
                    continue;
                }
                let name = format!("mounts/{n}");
                let host = target.join(&name);
                let dest = m.destination().display().to_string();
                let share_err = |what: &Path, e: String| {
                    fail(format!("sharing {} for {dest}: {e}", what.display()))
                };
                // Each host mount gets a bind of its own, never a
                // recursive one: a copy of a submount on the source's own
                // directories would keep the host from removing them.
                bind(&src, &host, false, opts.iter().any(|o| o == "ro"))
                    .map_err(|e| share_err(&src, e))?;
                let guest_src = guest_dir.join(&name);
                m.set_source(Some(guest_src));
                let subs = if opts.iter().any(|o| o == "rbind") {
                    submounts(&src, &m)
                } else {
                    Vec::new()
                };
                shared.push(m);
                for (k, (rel, sub)) in subs.into_iter().enumerate() {
                    let sub_name = format!("mounts/{n}.{k}");
                    let from = src.join(&rel);
                    bind(&from, &target.join(&sub_name), false, false)
                        .map_err(|e| share_err(&from, e))?;
                    let mut sub = sub;
                    sub.set_source(Some(guest_dir.join(&sub_name)));
                    shared.push(sub);
                }
            }
            *mounts = shared;
        }
        if let Some(root) = spec.root_mut() {
            root.set_path("rootfs".into());
        }
        spec.set_hooks(None);
        if let Some(linux) = spec.linux_mut() {
            // Host device nodes mean nothing in the guest.
            linux.set_devices(None);
            if let Some(ns) = linux.namespaces_mut() {
                let mut kept = Vec::with_capacity(ns.len());
                for mut n in ns.drain(..) {
                    if n.typ() == LinuxNamespaceType::Network {
                        continue;
                    }
                    if let Some(path) = n.path().clone().filter(|p| !p.as_os_str().is_empty()) {
                        n.set_path(Some(guest_namespace(&path, n.typ(), pod).ok_or_else(
                            || {
                                fail(format!(
                                    "{:?} namespace {} is the host's: a container in a VM can \
                                     only join namespaces of its own pod",
                                    n.typ(),
                                    path.display()
                                ))
                            },
                        )?));
                    }
                    kept.push(n);
                }
                *ns = kept;
            }
            if let Some(res) = linux.resources_mut() {
                res.set_devices(None);
            }
        }
        let spec =
            serde_json::to_vec(&spec).map_err(|e| fail(format!("encoding the spec: {e}")))?;
        Ok(Shared { spec, tmpfs })
    }
}

/// The guest tmpfs standing in for the bind source `src` mounted at
/// `dest`, if `src` is a tmpfs the pod's containers share in memory: a
/// memory-backed emptyDir (kubelet's `.../kubernetes.io~empty-dir/<name>`,
/// a tmpfs mount of its own; a disk-backed one is a plain directory and
/// stays on the host) or the `/dev/shm` containerd made for the pod's
/// sandbox `sandbox_id` (`.../sandboxes/<id>/shm`). The guest's copy keeps
/// the host tmpfs's size, mode, owner and noexec, so a `sizeLimit`
/// (kubelet's `size=`) holds in the guest, in the guest's memory.
///
/// A subPath of such a volume (kubelet's bind of the directory below the
/// volume's root, at `<pod>/volume-subpaths/<volume>/<container>/<n>`)
/// names the same guest tmpfs and the directory below it (with the guest's
/// copy made where missing), so every container of the pod sees one
/// volume. A subPath naming a file stays on the host.
fn pod_tmpfs(src: &Path, dest: &Path, sandbox_id: &str) -> Option<(api::PodTmpfs, String)> {
    match subpath_of(src) {
        Some((volume, below)) => Some((tmpfs_volume(&volume, dest, sandbox_id)?, below)),
        None => Some((tmpfs_volume(src, dest, sandbox_id)?, String::new())),
    }
}

/// For a subPath bind `src` of an emptyDir directory: the volume's own
/// directory, and the path below its root (mountinfo's root of the bind).
fn subpath_of(src: &Path) -> Option<(PathBuf, String)> {
    let volume = src.parent()?.parent()?;
    let subpaths = volume.parent()?;
    if subpaths.file_name()? != VOLUME_SUBPATHS || !src.is_dir() {
        return None;
    }
    let dir = subpaths
        .parent()?
        .join("volumes")
        .join(EMPTY_DIR)
        .join(volume.file_name()?);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let below = mount_root(&mountinfo, &src.canonicalize().ok()?)?;
    let below = below.trim_start_matches('/');
    (!below.is_empty()).then(|| (dir, below.to_string()))
}

/// The root (the path within its filesystem) of the last mount at `point`
/// in a mountinfo text.
fn mount_root(mountinfo: &str, point: &Path) -> Option<String> {
    mountinfo.lines().rev().find_map(|line| {
        let mut f = line.split(' ');
        let root = unescape(f.nth(3)?);
        (Path::new(&unescape(f.next()?)) == point).then_some(root)
    })
}

/// The pod tmpfs a volume directory (or the sandbox's shm) `src` bound at
/// `dest` is, if it is one.
fn tmpfs_volume(src: &Path, dest: &Path, sandbox_id: &str) -> Option<api::PodTmpfs> {
    use std::os::unix::fs::MetadataExt;
    let name = pod_tmpfs_name(src, dest, sandbox_id)?;
    let stat = nix::sys::statfs::statfs(src).ok()?;
    let own_mount =
        std::fs::metadata(src).ok()?.dev() != std::fs::metadata(src.parent()?).ok()?.dev();
    if stat.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC || !own_mount {
        return None;
    }
    let root = std::fs::metadata(src).ok()?;
    let flags = nix::sys::statvfs::statvfs(src).ok()?.flags();
    Some(api::PodTmpfs {
        name,
        size_bytes: stat
            .blocks()
            .saturating_mul(u64::try_from(stat.block_size()).ok()?),
        mode: root.mode() & 0o7777,
        uid: root.uid(),
        gid: root.gid(),
        noexec: flags.contains(nix::sys::statvfs::FsFlags::ST_NOEXEC),
        ..Default::default()
    })
}

/// The pod tmpfs name a bind of `src` at `dest` would have: a memory
/// emptyDir's `empty-dir-<volume>`, or `shm` for the sandbox's `/dev/shm`.
fn pod_tmpfs_name(src: &Path, dest: &Path, sandbox_id: &str) -> Option<String> {
    let parent = src.parent()?;
    match src.file_name()?.to_str() {
        Some(volume) if parent.file_name()? == EMPTY_DIR => Some(format!("empty-dir-{volume}")),
        Some("shm")
            if dest == Path::new("/dev/shm")
                && parent.file_name()? == sandbox_id
                && parent.parent()?.file_name()? == "sandboxes" =>
        {
            Some("shm".into())
        }
        _ => None,
    }
}

/// The guest's name for a namespace `path` of the pod's sandbox
/// (`/proc/<vm pid>/ns/<kind>`, as containerd writes it), or None for any
/// other path.
fn guest_namespace(path: &Path, typ: LinuxNamespaceType, pod: &PodRef<'_>) -> Option<PathBuf> {
    let kind = match typ {
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Time => "time",
        _ => return None,
    };
    let expected = PathBuf::from(format!("/proc/{}/ns/{kind}", pod.vm_pid));
    (path == expected).then(|| {
        Path::new(GUEST_NAMESPACE_DIR)
            .join(pod.sandbox_id)
            .join(kind)
    })
}

/// The host mounts below the source `src` of a recursive bind `parent`,
/// parents first, each as a mount of the spec (its path relative to `src`,
/// the mount with the guest source still to set): read-only if the parent
/// is recursively read-only (`rro`) or it is itself, writable otherwise.
fn submounts(src: &Path, parent: &Mount) -> Vec<(PathBuf, Mount)> {
    let Ok(real) = src.canonicalize() else {
        return Vec::new();
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let opts = parent.options().clone().unwrap_or_default();
    let rro = opts.iter().any(|o| o == "rro");
    let propagation: Vec<String> = opts
        .iter()
        .filter(|o| {
            matches!(
                o.as_str(),
                "rprivate" | "rslave" | "rshared" | "private" | "slave" | "shared"
            )
        })
        .cloned()
        .collect();
    let mut found: Vec<(PathBuf, bool)> = mounts_below(&mountinfo, &real);
    found.sort();
    found.dedup_by(|a, b| a.0 == b.0);
    found
        .into_iter()
        .map(|(rel, readonly)| {
            let mut options = vec!["bind".to_string()];
            options.push(
                match (rro, readonly) {
                    (true, _) => "rro",
                    (false, true) => "ro",
                    (false, false) => "rw",
                }
                .to_string(),
            );
            options.extend(propagation.iter().cloned());
            let mut m = parent.clone();
            m.set_destination(parent.destination().join(&rel));
            m.set_typ(Some("bind".into()));
            m.set_options(Some(options));
            (rel, m)
        })
        .collect()
}

/// Mount points strictly below `dir` in a mountinfo text, relative to it,
/// with whether each is read-only.
fn mounts_below(mountinfo: &str, dir: &Path) -> Vec<(PathBuf, bool)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let point = PathBuf::from(unescape(f.nth(4)?));
            let readonly = f.next()?.split(',').any(|o| o == "ro");
            let rel = point.strip_prefix(dir).ok()?.to_owned();
            (!rel.as_os_str().is_empty()).then_some((rel, readonly))
        })
        .collect()
}

/// mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Bind-mounts `src` (with the mounts below it if `recursive`) on `dst`,
/// creating `dst` as a directory or an empty file to match.
fn bind(src: &Path, dst: &Path, recursive: bool, readonly: bool) -> Result<(), String> {
    let meta = std::fs::metadata(src).map_err(|e| format!("{}: {e}", src.display()))?;
    if meta.is_dir() {
        std::fs::create_dir_all(dst).map_err(|e| e.to_string())?;
    } else {
        if let Some(p) = dst.parent() {
            std::fs::create_dir_all(p).map_err(|e| e.to_string())?;
        }
        std::fs::File::create(dst).map_err(|e| e.to_string())?;
    }
    let rec = if recursive {
        MsFlags::MS_REC
    } else {
        MsFlags::empty()
    };
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | rec,
        None::<&str>,
    )
    .map_err(|e| e.to_string())?;
    if readonly {
        mount(
            None::<&str>,
            dst,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| format!("read-only: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(annotations: &str) -> Bundle {
        let spec: Spec = serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"annotations":{annotations}}}"#
        ))
        .unwrap();
        Bundle {
            dir: "/b".into(),
            spec,
        }
    }

    #[test]
    fn cri_containers_join_their_sandbox() {
        assert_eq!(bundle("{}").role(), Role::Sandbox);
        assert_eq!(
            bundle(r#"{"io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.sandbox-id":"s1"}"#).role(),
            Role::Sandbox
        );
        assert_eq!(
            bundle(r#"{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"s1"}"#).role(),
            Role::Member {
                sandbox_id: "s1".into()
            }
        );
    }

    fn cri_bundle(kind: &str, namespaces: &str) -> Bundle {
        let spec: Spec = serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},
                "annotations":{{"io.kubernetes.cri.container-type":"{kind}","io.kubernetes.cri.sandbox-id":"sb"}},
                "linux":{{"namespaces":{namespaces}}}}}"#
        ))
        .unwrap();
        Bundle {
            dir: "/b".into(),
            spec,
        }
    }

    #[test]
    fn host_namespaces_are_the_ones_a_cri_spec_leaves_out() {
        let all = r#"[{"type":"pid"},{"type":"ipc"},{"type":"uts"},{"type":"mount"},{"type":"network","path":"/var/run/netns/x"}]"#;
        assert!(cri_bundle("sandbox", all).host_namespaces().is_empty());
        assert_eq!(
            cri_bundle("sandbox", r#"[{"type":"ipc"},{"type":"mount"}]"#).host_namespaces(),
            vec!["hostNetwork", "hostPID"]
        );
        assert_eq!(
            cri_bundle("container", r#"[{"type":"pid"},{"type":"mount"}]"#).host_namespaces(),
            vec!["hostIPC"]
        );
        // ctr run: no CRI annotations, nothing asked.
        assert!(bundle("{}").host_namespaces().is_empty());
    }

    #[test]
    fn sandbox_namespace_paths_become_guest_names() {
        let pod = PodRef {
            sandbox_id: "sb",
            vm_pid: 4242,
        };
        assert_eq!(
            guest_namespace(
                Path::new("/proc/4242/ns/pid"),
                LinuxNamespaceType::Pid,
                &pod
            ),
            Some(PathBuf::from(format!("{GUEST_NAMESPACE_DIR}/sb/pid")))
        );
        assert_eq!(
            guest_namespace(Path::new("/proc/1/ns/pid"), LinuxNamespaceType::Pid, &pod),
            None
        );
        assert_eq!(
            guest_namespace(
                Path::new("/proc/4242/ns/ipc"),
                LinuxNamespaceType::Pid,
                &pod
            ),
            None
        );
    }

    #[test]
    fn shared_spec_drops_the_network_and_refuses_host_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("rootfs")).unwrap();
        let pod = PodRef {
            sandbox_id: "sb",
            vm_pid: 4242,
        };
        let share = |ns: &str| {
            let b = Bundle {
                dir: dir.path().to_owned(),
                ..cri_bundle("container", ns)
            };
            let target = dir.path().join("shared/c1");
            let r = b.share("c1", &[], &target, &pod);
            let _ = nix::mount::umount2(&target.join("rootfs"), nix::mount::MntFlags::MNT_DETACH);
            r
        };
        let out = share(
            r#"[{"type":"pid","path":"/proc/4242/ns/pid"},{"type":"network","path":"/proc/4242/ns/net"},{"type":"mount"}]"#,
        )
        .unwrap();
        let spec: Spec = serde_json::from_slice(&out.spec).unwrap();
        let ns = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert_eq!(ns.len(), 2, "{ns:?}");
        assert_eq!(
            ns[0].path().clone().unwrap(),
            PathBuf::from(format!("{GUEST_NAMESPACE_DIR}/sb/pid"))
        );
        let e = share(r#"[{"type":"ipc","path":"/proc/1/ns/ipc"}]"#).unwrap_err();
        assert!(e.to_string().contains("/proc/1/ns/ipc"), "{e}");
    }

    #[test]
    fn memory_volumes_become_pod_tmpfs() {
        use nix::mount::{mount, umount2, MntFlags, MsFlags};
        let dir = tempfile::tempdir().unwrap();
        let volumes = dir.path().join("volumes").join(EMPTY_DIR);
        let (memory, disk, shm, host_shm) = (
            volumes.join("cache"),
            volumes.join("scratch"),
            dir.path().join("sandboxes/sb/shm"),
            dir.path().join("dev/shm"),
        );
        for d in [&memory, &disk, &shm, &host_shm] {
            std::fs::create_dir_all(d).unwrap();
        }
        let mounted = [
            (&memory, "size=8m,mode=777,gid=2000", MsFlags::empty()),
            (&shm, "size=64m,mode=1777", MsFlags::MS_NOEXEC),
            (&host_shm, "size=64m,mode=1777", MsFlags::empty()),
        ];
        for (d, data, flags) in mounted {
            mount(Some("tmpfs"), d, Some("tmpfs"), flags, Some(data)).unwrap();
        }
        // kubelet's bind of a subPath of the memory volume.
        let subpath = dir.path().join(VOLUME_SUBPATHS).join("cache/ctr/0");
        std::fs::create_dir_all(memory.join("sub/dir")).unwrap();
        std::fs::create_dir_all(&subpath).unwrap();
        mount(
            Some(&memory.join("sub/dir")),
            &subpath,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let below = pod_tmpfs(&subpath, Path::new("/work"), "sb");
        umount2(&subpath, MntFlags::MNT_DETACH).unwrap();
        let dev_shm = Path::new("/dev/shm");
        let found = [
            pod_tmpfs(&memory, Path::new("/cache"), "sb"),
            pod_tmpfs(&disk, Path::new("/scratch"), "sb"),
            pod_tmpfs(&shm, dev_shm, "sb"),
            pod_tmpfs(&shm, Path::new("/data"), "sb"),
            pod_tmpfs(&shm, dev_shm, "another"),
            pod_tmpfs(&host_shm, dev_shm, "sb"),
        ];
        for (d, _, _) in mounted {
            umount2(d, MntFlags::MNT_DETACH).unwrap();
        }
        let [memory, disk, shm, elsewhere, other_pods, hosts] = found.map(|f| {
            f.map(|(volume, below)| {
                assert_eq!(below, "", "{volume:?}");
                volume
            })
        });
        let (volume, below) = below.expect("a subPath of the memory volume");
        assert_eq!(
            (volume.name.as_str(), below.as_str()),
            ("empty-dir-cache", "sub/dir")
        );
        let memory = memory.expect("a tmpfs emptyDir");
        assert_eq!(
            (
                memory.name.as_str(),
                memory.size_bytes,
                memory.mode,
                memory.gid,
                memory.noexec
            ),
            ("empty-dir-cache", 8 << 20, 0o777, 2000, false)
        );
        assert!(disk.is_none(), "a disk emptyDir stays on the host");
        let shm = shm.expect("the pod's /dev/shm");
        assert_eq!(
            (shm.name.as_str(), shm.size_bytes, shm.mode, shm.noexec),
            ("shm", 64 << 20, 0o1777, true)
        );
        for (what, found) in [
            ("the sandbox's shm mounted elsewhere", elsewhere),
            ("another sandbox's shm", other_pods),
            ("a tmpfs that is not the sandbox's shm", hosts),
        ] {
            assert!(found.is_none(), "{what} stays on the host");
        }
    }

    #[test]
    fn mountinfo_submounts_are_found_below_a_directory() {
        let info = "\
36 35 98:0 / / rw,noatime master:1 - ext4 /dev/root rw
40 36 0:50 / /run/p/shared/c/mounts/3 ro,relatime shared:5 - ext4 /dev/root rw
41 40 0:51 / /run/p/shared/c/mounts/3/tmpfs rw,nosuid - tmpfs tmpfs rw
42 40 0:52 / /run/p/shared/c/mounts/3/with\\040space ro - tmpfs tmpfs rw
43 36 0:53 / /run/p/shared/c/mounts/30 rw - tmpfs tmpfs rw
";
        let found = mounts_below(info, Path::new("/run/p/shared/c/mounts/3"));
        assert_eq!(
            found,
            vec![
                (PathBuf::from("tmpfs"), false),
                (PathBuf::from("with space"), true)
            ]
        );
    }

    #[test]
    fn missing_config_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = Bundle::load(dir.path()).err().unwrap();
        assert!(e.to_string().contains("config.json"), "{e}");
    }

    #[test]
    fn a_bad_value_in_the_spec_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"ociVersion":"1.0.2","linux":{"seccomp":{"defaultAction":"SCMP_ACT_NOPE"}}}"#,
        )
        .unwrap();
        let e = Bundle::load(dir.path()).err().unwrap();
        assert!(e.to_string().contains("SCMP_ACT_NOPE"), "{e}");
    }
}
