//! A container's OCI bundle, and what of it the guest gets.
//!
//! The guest cannot see host paths, so [`Bundle::share`] mounts the rootfs
//! containerd prepared at `shared/<id>/rootfs` and every bind-mount source
//! at `shared/<id>/mounts/<n>`, and rewrites the spec to point at those
//! paths as the guest sees them (`/run/podvisor/shared/...`). Host-only
//! parts of the spec (hooks, device nodes, namespace paths) are dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount as RootfsMount;
use nix::mount::{mount, MsFlags};
use oci_spec::runtime::Spec;
use podvisor_protocol::GUEST_SHARED_DIR;

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

impl Bundle {
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let path = dir.join("config.json");
        let spec = Spec::load(&path).map_err(|e| BundleError::Spec {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Bundle {
            dir: dir.to_owned(),
            spec,
        })
    }

    pub fn annotations(&self) -> HashMap<String, String> {
        self.spec.annotations().clone().unwrap_or_default()
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
    /// `target` (its `shared/<id>/`) and returns the spec the guest gets.
    /// On error the caller removes `target`.
    pub fn share(
        &self,
        id: &str,
        rootfs: &[RootfsMount],
        target: &Path,
    ) -> Result<Vec<u8>, BundleError> {
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
        let guest_dir = Path::new(GUEST_SHARED_DIR).join(id);
        if let Some(mounts) = spec.mounts_mut() {
            for (n, m) in mounts.iter_mut().enumerate() {
                let opts = m.options().clone().unwrap_or_default();
                let is_bind = m.typ().as_deref() == Some("bind")
                    || opts.iter().any(|o| o == "bind" || o == "rbind");
                if !is_bind {
                    continue;
                }
                let src = m.source().clone().ok_or_else(|| {
                    fail(format!(
                        "bind mount {} has no source",
                        m.destination().display()
                    ))
                })?;
                let name = format!("mounts/{n}");
                let host = target.join(&name);
                bind(
                    &src,
                    &host,
                    opts.iter().any(|o| o == "rbind"),
                    opts.iter().any(|o| o == "ro"),
                )
                .map_err(|e| {
                    fail(format!(
                        "sharing {} for {}: {e}",
                        src.display(),
                        m.destination().display()
                    ))
                })?;
                m.set_source(Some(guest_dir.join(&name)));
            }
        }
        if let Some(root) = spec.root_mut() {
            root.set_path("rootfs".into());
        }
        spec.set_hooks(None);
        if let Some(linux) = spec.linux_mut() {
            // Host device nodes and namespace paths mean nothing in the guest.
            linux.set_devices(None);
            if let Some(ns) = linux.namespaces_mut() {
                for n in ns.iter_mut() {
                    n.set_path(None);
                }
            }
            if let Some(res) = linux.resources_mut() {
                res.set_devices(None);
            }
        }
        serde_json::to_vec(&spec).map_err(|e| fail(format!("encoding the spec: {e}")))
    }
}

/// Bind-mounts `src` on `dst`, creating `dst` as a directory or an empty
/// file to match.
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

    #[test]
    fn missing_config_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = Bundle::load(dir.path()).err().unwrap();
        assert!(e.to_string().contains("config.json"), "{e}");
    }
}
