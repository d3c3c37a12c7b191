//! Putting podvisor's files on a node and taking them off again: binaries
//! and guest image under `/opt/podvisor`, the shim on containerd's PATH, the
//! node's podvisor config, and the containerd registration. Every path is
//! under a host root (`/host` in the DaemonSet, a temporary directory in
//! tests). What install changed is recorded so uninstall undoes exactly that.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::containerd;

use podvisor_names::paths::{
    INSTALLED_FILES, INSTALL_PREFIX, JAIL_IDS, NODE_CONFIG, POOL_ROOT, STATE_ROOT, TEMPLATE_ROOT,
};
use podvisor_names::pool::{DRAIN, SUBCOMMAND};
use podvisor_names::SHIM_BINARY;

/// Where the shim is linked, on containerd's PATH.
const SHIM_LINK_DIR: &str = "/usr/local/bin";
/// What install did, for uninstall (under the install prefix).
const INSTALL_STATE: &str = "install-state.json";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Containerd {
        path: PathBuf,
        #[source]
        source: containerd::ConfigEditError,
    },
    #[error("{path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "podvisor sandboxes still run on this node ({0}); delete their pods first \
         (containerd needs the shim to clean them up), or pass --force"
    )]
    SandboxesRunning(String),
    #[error("draining the warm pool ({command}): {reason}")]
    Pool { command: String, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where things go on one node.
#[derive(Debug)]
pub struct Node {
    pub host_root: PathBuf,
    /// containerd's config, as the host sees it.
    pub containerd_config: PathBuf,
}

/// What install did, for uninstall.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct State {
    /// The containerd config did not exist; uninstall deletes it.
    created_containerd_config: bool,
    /// The node config install replaced, restored on uninstall (None: there
    /// was none, so uninstall deletes it).
    previous_node_config: Option<String>,
}

/// What changed, so the caller knows whether containerd needs a restart.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub containerd_config_changed: bool,
}

impl Node {
    /// `path` (absolute, as on the node) under the host root.
    fn host(&self, path: impl AsRef<Path>) -> PathBuf {
        self.host_root
            .join(path.as_ref().strip_prefix("/").unwrap_or(path.as_ref()))
    }

    fn shim_link(&self) -> PathBuf {
        self.host(Path::new(SHIM_LINK_DIR).join(SHIM_BINARY))
    }

    fn install_state(&self) -> PathBuf {
        self.host(Path::new(INSTALL_PREFIX).join(INSTALL_STATE))
    }

    fn containerd_config(&self) -> PathBuf {
        let rel = self
            .containerd_config
            .strip_prefix("/")
            .unwrap_or(&self.containerd_config);
        self.host_root.join(rel)
    }

    /// Copies `source` (a `make install` tree) to the node, installs
    /// `node_config` as the node's podvisor config and registers the runtime.
    pub fn install(&self, source: &Path, node_config: &str) -> Result<Outcome, InstallError> {
        let state_path = self.install_state();
        let mut state = read_state(&state_path)?.unwrap_or_default();
        let prefix = self.host(INSTALL_PREFIX);
        for rel in INSTALLED_FILES {
            let from = source.join(rel);
            let to = prefix.join(rel);
            if same_file(&from, &to) {
                continue;
            }
            copy_atomically(&from, &to)?;
        }
        let link = self.shim_link();
        let target = Path::new(INSTALL_PREFIX).join("bin").join(SHIM_BINARY);
        if fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
            mkdir_parent(&link)?;
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link).map_err(io_err(&link))?;
        }

        let config = self.host(NODE_CONFIG);
        let current = read_opt(&config)?;
        // Remember the operator's file the first time, even one that is
        // already what is installed: uninstall leaves it as it was.
        if !state_path.exists() {
            state.previous_node_config = current.clone();
        }
        if current.as_deref() != Some(node_config) {
            write_atomically(&config, node_config.as_bytes())?;
        }

        let cpath = self.containerd_config();
        let before = read_opt(&cpath)?;
        if before.is_none() && !state_path.exists() {
            state.created_containerd_config = true;
        }
        let text = before.clone().unwrap_or_else(|| "version = 2\n".into());
        let after = containerd::add_runtime(&text).map_err(|source| InstallError::Containerd {
            path: cpath.clone(),
            source,
        })?;
        let changed = before.as_deref() != Some(after.as_str());
        if changed {
            write_atomically(&cpath, after.as_bytes())?;
        }
        let json = serde_json::to_vec_pretty(&state).map_err(|source| InstallError::State {
            path: state_path.clone(),
            source,
        })?;
        write_atomically(&state_path, &json)?;
        Ok(Outcome {
            containerd_config_changed: changed,
        })
    }

    /// Undoes `install`. Refuses while podvisor sandboxes exist unless `force`.
    pub fn uninstall(&self, force: bool) -> Result<Outcome, InstallError> {
        let running = self.sandboxes()?;
        if !running.is_empty() && !force {
            return Err(InstallError::SandboxesRunning(running.join(", ")));
        }
        // First: a pool that cannot be drained leaves the install as it is.
        self.drain_pool()?;
        let state_path = self.install_state();
        let state = read_state(&state_path)?.unwrap_or_default();

        let cpath = self.containerd_config();
        let mut changed = false;
        if let Some(text) = read_opt(&cpath)? {
            let after =
                containerd::remove_runtime(&text).map_err(|source| InstallError::Containerd {
                    path: cpath.clone(),
                    source,
                })?;
            if state.created_containerd_config && after == "version = 2\n" {
                fs::remove_file(&cpath).map_err(io_err(&cpath))?;
                changed = true;
            } else if after != text {
                write_atomically(&cpath, after.as_bytes())?;
                changed = true;
            }
        }

        let config = self.host(NODE_CONFIG);
        if state_path.exists() {
            match &state.previous_node_config {
                Some(previous) => write_atomically(&config, previous.as_bytes())?,
                None => remove_if_exists(&config)?,
            }
            if let Some(dir) = config.parent() {
                let _ = fs::remove_dir(dir); // only if empty
            }
        }
        let link = self.shim_link();
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link).map_err(io_err(&link))?;
        }
        let prefix = self.host(INSTALL_PREFIX);
        if prefix.exists() {
            fs::remove_dir_all(&prefix).map_err(io_err(&prefix))?;
        }
        // Warm-start templates the shims saved (no sandbox uses them now).
        let templates = self.host(TEMPLATE_ROOT);
        if templates.exists() {
            fs::remove_dir_all(&templates).map_err(io_err(&templates))?;
        }
        if let Some(dir) = templates.parent() {
            let _ = fs::remove_dir(dir); // only if empty
        }
        // The VMs' id leases (no VM holds one now).
        let ids = self.host(JAIL_IDS);
        if ids.exists() {
            fs::remove_dir_all(&ids).map_err(io_err(&ids))?;
        }
        Ok(Outcome {
            containerd_config_changed: changed,
        })
    }

    /// Stops the warm pool's VMs and removes it, through the installed
    /// shim (`pool drain`, run in the host's root: the installer's
    /// DaemonSet shares the host's PID namespace).
    fn drain_pool(&self) -> Result<(), InstallError> {
        if !self.host(POOL_ROOT).exists() {
            return Ok(());
        }
        let shim = Path::new(INSTALL_PREFIX).join("bin").join(SHIM_BINARY);
        let command = format!(
            "chroot {} {} {SUBCOMMAND} {DRAIN}",
            self.host_root.display(),
            shim.display()
        );
        let fail = |reason: String| InstallError::Pool {
            command: command.clone(),
            reason,
        };
        let out = std::process::Command::new("chroot")
            .arg(&self.host_root)
            .arg(&shim)
            .args([SUBCOMMAND, DRAIN])
            .output()
            .map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            return Err(fail(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// The podvisor sandboxes the node runs (`/run/podvisor/<id>`).
    fn sandboxes(&self) -> Result<Vec<String>, InstallError> {
        let dir = self.host(STATE_ROOT);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut ids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().join("state.json").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        Ok(ids)
    }
}

fn read_state(path: &Path) -> Result<Option<State>, InstallError> {
    let Some(text) = read_opt(path)? else {
        return Ok(None);
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| InstallError::State {
            path: path.to_path_buf(),
            source,
        })
}

fn read_opt(path: &Path) -> Result<Option<String>, InstallError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn remove_if_exists(path: &Path) -> Result<(), InstallError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

fn mkdir_parent(path: &Path) -> Result<(), InstallError> {
    match path.parent() {
        Some(dir) => fs::create_dir_all(dir).map_err(io_err(dir)),
        None => Ok(()),
    }
}

/// Whether `a` and `b` are the same file (installing a tree onto itself).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Copies through a temporary name and a rename, so a running shim or VMM
/// keeps its old binary and nothing sees a half-written file.
fn copy_atomically(from: &Path, to: &Path) -> Result<(), InstallError> {
    mkdir_parent(to)?;
    let tmp = to.with_extension("podvisor-install.tmp");
    fs::copy(from, &tmp).map_err(io_err(from))?;
    fs::rename(&tmp, to).map_err(io_err(to))
}

fn write_atomically(to: &Path, data: &[u8]) -> Result<(), InstallError> {
    mkdir_parent(to)?;
    let tmp = to.with_extension("podvisor-install.tmp");
    fs::write(&tmp, data).map_err(io_err(&tmp))?;
    // Keep the mode of the file it replaces (containerd's config may be 0600).
    if let Ok(meta) = fs::metadata(to) {
        fs::set_permissions(&tmp, meta.permissions()).map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, to).map_err(io_err(to))
}
