//! `/run/podvisor/<sandbox-id>/`: everything a pod's VM puts on the host,
//! what lets `containerd-shim-podvisor-v2 delete` clean up after a
//! crashed shim, and the removal of what another boot left (where
//! /run/podvisor outlives a host restart).
//!
//! ```text
//! /run/podvisor/<sandbox-id>/    root's
//!   state.json          VM and helper pids (with start times), written at boot
//!   *.log               the VM process's and the helpers' output
//!   vm/                 the VM's own (its unprivileged id's, 0700)
//!     console.log       the guest console
//!     *.sock, vm.vsock  helper sockets, the hybrid-vsock UDS
//!   shared/             virtio-fs root (a shared bind mount of itself)
//!     <container-id>/rootfs        the container's rootfs mounts
//!     <container-id>/mounts/<n>    its bind mounts (volumes, /etc/hosts, ...)
//! ```

use std::path::{Path, PathBuf};

use containerd_shim::mount::umount_recursive;
use nix::mount::{mount, MsFlags};
use serde::{Deserialize, Serialize};

pub use podvisor_hypervisor::process::{boot_id, process_start_time};
use podvisor_names::paths::STATE_ROOT;

#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct StateError {
    what: String,
    source: std::io::Error,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StateError {
    let what = what.into();
    move |source| StateError { what, source }
}

fn nix_err(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> StateError {
    let what = what.into();
    move |e| StateError {
        what,
        source: e.into(),
    }
}

/// A process the VM consists of, as recorded for crash cleanup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecordedProcess {
    pub name: String,
    pub pid: u32,
    /// Field 22 of /proc/<pid>/stat: tells a reused pid apart.
    pub start_time: u64,
}

impl RecordedProcess {
    /// The processes of `vm`, the VM process first.
    pub fn of(vm: &podvisor_hypervisor::RunningVm) -> Vec<RecordedProcess> {
        vm.processes()
            .into_iter()
            .map(|(name, pid)| RecordedProcess {
                name: name.to_string(),
                pid,
                start_time: process_start_time(pid).unwrap_or_default(),
            })
            .collect()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub sandbox_id: String,
    pub hypervisor: String,
    pub processes: Vec<RecordedProcess>,
    /// Taps and tc filters in the pod's network namespace.
    #[serde(default)]
    pub network: Option<crate::network::PodNetwork>,
    /// The host boot the processes ran in ([`SandboxDir::write_state`]
    /// sets it; none in a state written before it was recorded).
    #[serde(default)]
    pub boot_id: Option<String>,
}

impl State {
    /// Whether the recorded pids are this boot's (unknown counts as
    /// this boot's: a state written before boots were recorded).
    pub fn of_this_boot(&self) -> bool {
        match (&self.boot_id, boot_id()) {
            (Some(recorded), Ok(now)) => *recorded == now,
            _ => true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SandboxDir {
    root: PathBuf,
}

impl SandboxDir {
    pub fn path_for(sandbox_id: &str) -> PathBuf {
        Path::new(STATE_ROOT).join(sandbox_id)
    }

    /// The directory of an existing (or crashed) sandbox.
    pub fn open(sandbox_id: &str) -> SandboxDir {
        SandboxDir {
            root: Self::path_for(sandbox_id),
        }
    }

    /// Creates the directory and makes `shared/` a shared mount, so
    /// rootfs and volume mounts made later reach virtiofsd's namespace.
    pub fn create(sandbox_id: &str) -> Result<SandboxDir, StateError> {
        Self::create_at(&Self::path_for(sandbox_id))
    }

    /// [`SandboxDir::create`] at `root` (a pool VM's directory, renamed
    /// into its sandbox's when handed out).
    pub fn create_at(root: &Path) -> Result<SandboxDir, StateError> {
        let dir = SandboxDir {
            root: root.to_owned(),
        };
        if dir.root.exists() {
            return Err(StateError {
                what: format!("sandbox directory {}", dir.root.display()),
                source: std::io::ErrorKind::AlreadyExists.into(),
            });
        }
        let shared = dir.shared();
        std::fs::create_dir_all(&shared)
            .map_err(io_err(format!("creating {}", shared.display())))?;
        let made = mount(
            Some(&shared),
            &shared,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .and_then(|()| {
            mount(
                None::<&str>,
                &shared,
                None::<&str>,
                MsFlags::MS_SHARED,
                None::<&str>,
            )
        });
        if let Err(e) = made {
            dir.destroy();
            return Err(nix_err(format!(
                "making {} a shared mount",
                shared.display()
            ))(e));
        }
        Ok(dir)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn shared(&self) -> PathBuf {
        self.root.join("shared")
    }

    /// `shared/<container-id>/`: what the guest sees of one container.
    pub fn container(&self, container_id: &str) -> PathBuf {
        self.shared().join(container_id)
    }

    /// Writes `state`, stamped with this boot's id.
    pub fn write_state(&self, mut state: State) -> Result<(), StateError> {
        state.boot_id = Some(boot_id().map_err(io_err("reading the boot id"))?);
        let path = self.root.join("state.json");
        let tmp = self.root.join("state.json.tmp");
        let data = serde_json::to_vec_pretty(&state).map_err(|e| StateError {
            what: "encoding state".into(),
            source: e.into(),
        })?;
        std::fs::write(&tmp, data).map_err(io_err(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(io_err(format!("writing {}", path.display())))
    }

    pub fn read_state(&self) -> Option<State> {
        let data = std::fs::read(self.root.join("state.json")).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Unmounts one container's rootfs and bind mounts and removes its
    /// directory.
    pub fn remove_container(&self, container_id: &str) {
        remove_tree(&self.container(container_id));
    }

    /// Unmounts everything below the sandbox directory and removes it.
    pub fn destroy(&self) {
        remove_tree(&self.root);
    }
}

/// Removes the sandbox directories another host boot left under
/// /run/podvisor (one that is not a tmpfs, or a restart that kept it):
/// their state names that boot. Nothing they record is killed (its pids
/// are other processes now); a directory of this boot, or one with no
/// state yet (a pod starting), is left alone. Run as a pod starts.
pub fn remove_other_boots() {
    let Ok(now) = boot_id() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(STATE_ROOT) else {
        return;
    };
    for entry in entries.flatten() {
        // `_pool`, `_jail-ids`: the node's, not sandboxes.
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('_') || !entry.path().is_dir() {
            continue;
        }
        let dir = SandboxDir { root: entry.path() };
        let Some(recorded) = dir.read_state().and_then(|s| s.boot_id) else {
            continue;
        };
        if recorded != now {
            tracing::info!(
                "removing {}, left by another boot ({recorded})",
                dir.root.display()
            );
            dir.destroy();
        }
    }
}

/// Unmounts every mount at or below `dir` (deepest first) and removes it.
pub fn remove_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    if let Some(d) = dir.to_str() {
        if let Err(e) = umount_recursive(Some(d), libc::MNT_DETACH) {
            tracing::warn!("unmounting below {d}: {e}");
        }
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!("removing {}: {e}", dir.display());
    }
}

/// SIGKILLs a recorded process if it is still the same process.
pub fn kill_recorded(p: &RecordedProcess) -> bool {
    if process_start_time(p.pid) != Some(p.start_time) {
        return false;
    }
    let Ok(pid) = libc::pid_t::try_from(p.pid) else {
        return false;
    };
    // SAFETY: kill(2) with plain integers; the start time matched.
    unsafe { libc::kill(pid, libc::SIGKILL) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_tells_processes_apart() {
        let me = std::process::id();
        let t = process_start_time(me).unwrap();
        assert!(t > 0);
        let stale = RecordedProcess {
            name: "old".into(),
            pid: me,
            start_time: t + 1,
        };
        // A pid whose start time differs is someone else: left alone.
        assert!(!kill_recorded(&stale));
        assert_eq!(process_start_time(u32::MAX), None);
    }

    #[test]
    fn states_tell_their_boot() {
        let now = boot_id().unwrap();
        let of = |b: Option<&str>| State {
            boot_id: b.map(str::to_string),
            ..State::default()
        };
        assert!(of(Some(&now)).of_this_boot());
        assert!(!of(Some("00000000-0000-4000-8000-000000000000")).of_this_boot());
        // Written before boots were recorded: a running pod's, kept.
        assert!(of(None).of_this_boot());
        let old: State =
            serde_json::from_str(r#"{"sandbox_id":"a","hypervisor":"qemu","processes":[]}"#)
                .unwrap();
        assert_eq!(old.boot_id, None);
    }

    #[test]
    fn written_states_carry_this_boot() {
        let d = tempfile::tempdir().unwrap();
        let dir = SandboxDir {
            root: d.path().to_owned(),
        };
        dir.write_state(State::default()).unwrap();
        assert_eq!(dir.read_state().unwrap().boot_id, Some(boot_id().unwrap()));
    }
}
