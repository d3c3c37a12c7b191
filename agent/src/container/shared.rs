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

use nix::mount::{umount2, MntFlags};
use oci_spec::runtime::Spec;
use podvisor_protocol::GUEST_SHARED_DIR;

/// How long after a container's removal its submounts go.
pub const RELEASE_GRACE: Duration = Duration::from_secs(2);

/// The submounts under one container's shared directory, mounted in the
/// agent's namespace; [`SharedMounts::release`] unmounts them.
#[derive(Debug, Clone)]
pub struct SharedMounts {
    dir: PathBuf,
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
        for path in std::iter::once(rootfs).chain(sources) {
            let _ = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
                .open(path);
        }
        let held = mounts_below(&dir).len();
        tracing::debug!(held, "shared submounts held");
        SharedMounts { dir }
    }

    /// Unmounts every mount under the container's shared directory in the
    /// agent's namespace, deepest first.
    pub fn release(&self) {
        for m in mounts_below(&self.dir) {
            if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
                tracing::warn!("unmounting {}: {e}", m.display());
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

/// The mount points strictly below `dir` in the agent's namespace, deepest
/// first.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    below(mount_points(&info), dir)
}

/// Those of `points` strictly below `dir`, deepest first, each once.
fn below(points: Vec<PathBuf>, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = points
        .into_iter()
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Each mount point of a mountinfo text (its fifth field, octal escapes
/// undone).
fn mount_points(info: &str) -> Vec<PathBuf> {
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

/// Undoes mountinfo's `\ooo` escapes (space, tab, newline, backslash).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0')))
            .and_then(|n| u8::try_from(n).ok());
        match octal {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_the_fifth_field_unescaped() {
        let info = "\
22 1 0:20 / / rw - rootfs rootfs rw
30 22 0:26 / /run/podvisor/shared rw - virtiofs podvisor rw
41 30 0:31 / /run/podvisor/shared/abc/rootfs rw - virtiofs podvisor rw
42 30 0:32 / /run/podvisor/shared/abc/mounts/0 rw - virtiofs podvisor rw
43 30 0:33 / /run/podvisor/shared/abcd/rootfs rw - virtiofs podvisor rw
44 22 0:34 / /a\\040b\\134c\\012 rw - tmpfs tmpfs rw
";
        let points = mount_points(info);
        assert_eq!(points[5], PathBuf::from("/a b\\c\n"));
        assert_eq!(unescape("\\9x\\04"), "\\9x\\04");
        assert_eq!(
            below(points, Path::new("/run/podvisor/shared/abc")),
            [
                PathBuf::from("/run/podvisor/shared/abc/mounts/0"),
                PathBuf::from("/run/podvisor/shared/abc/rootfs"),
            ]
        );
    }
}
