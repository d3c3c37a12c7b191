//! A container's part of the host's shared directory
//! (`/run/podvisor/shared/<id>`), held in the agent's own mount namespace
//! for the container's life.
//!
//! Each host mount there (the rootfs, every bind source) is a virtio-fs
//! submount in the guest (virtiofsd announces them, so that their inode
//! numbers do not collide), with a superblock of its own that lives while a
//! mount of it does. The kernel mounts a submount in the namespace whose
//! path walk crosses it: left to itself, only in the container's. Then the
//! superblock goes with the container's last process, while the kernel may
//! still complete a FUSE_RELEASE of the container's files asynchronously;
//! that completion drops an inode of the freed superblock and the guest
//! panics (Linux 6.12 `fuse_release_end` → `iput`; Kata Containers issue
//! 12589 has the same crash). So the agent walks into each before the
//! container is made, and unmounts them [`RELEASE_GRACE`] after the
//! container is removed: its processes are gone then, and the releases of
//! their files long answered (virtio-fs hides its connections from
//! fusectl, so the requests in flight cannot be counted).

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};
use oci_spec::runtime::Spec;
use podvisor_protocol::GUEST_SHARED_DIR;

/// How long after a container's removal its submounts go.
pub const RELEASE_GRACE: Duration = Duration::from_secs(2);

/// The directories under one container's shared directory the agent
/// walked into, deepest first: each a submount's root in the agent's
/// namespace where the host had a mount; [`SharedMounts::release`]
/// unmounts them.
#[derive(Debug, Clone)]
pub struct SharedMounts {
    dirs: Vec<PathBuf>,
}

impl SharedMounts {
    /// Mounts, in the agent's namespace, the submounts at `rootfs` and at
    /// each of `spec`'s mount sources under the container's shared
    /// directory (opening a directory crosses its automount point; a
    /// source that is a file or absent has none, and the launch reports
    /// what is missing).
    pub fn hold(id: &str, rootfs: &Path, spec: &Spec) -> SharedMounts {
        let dir = Path::new(GUEST_SHARED_DIR).join(id);
        let sources = spec
            .mounts()
            .iter()
            .flatten()
            .filter_map(|m| m.source().as_deref())
            .filter(|s| s.starts_with(&dir));
        let mut dirs: Vec<PathBuf> = std::iter::once(rootfs)
            .chain(sources)
            .filter(|path| {
                fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
                    .open(path)
                    .is_ok()
            })
            .map(Path::to_path_buf)
            .collect();
        dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        dirs.dedup();
        SharedMounts { dirs }
    }

    /// Unmounts each submount held, deepest first (a directory that was
    /// no mount point on the host is none here either).
    pub fn release(&self) {
        for d in &self.dirs {
            match umount2(d, MntFlags::MNT_DETACH) {
                Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => {}
                Err(e) => tracing::warn!("unmounting {}: {e}", d.display()),
            }
        }
    }
}

/// The containers whose submounts are yet to go, [`RELEASE_GRACE`] after
/// their removal; a new container of the same id waits for them.
#[derive(Debug, Default)]
pub struct Releases(Arc<Mutex<HashSet<String>>>);

impl Releases {
    /// Releases `mounts`, container `id`'s, after [`RELEASE_GRACE`].
    pub fn later(&self, id: &str, mounts: SharedMounts) {
        let pending = self.0.clone();
        crate::lock(&pending).insert(id.to_string());
        let id = id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(RELEASE_GRACE).await;
            mounts.release();
            crate::lock(&pending).remove(&id);
        });
    }

    /// Returns once no release of container `id`'s submounts is pending.
    pub async fn wait(&self, id: &str) {
        while crate::lock(&self.0).contains(id) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
