//! The shim process's lifecycle as containerd drives it: `start` (one
//! shim per pod, found by the pod's sandbox id), serving the task API, and
//! `delete`, which containerd runs when a shim is gone without cleaning up.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::DeleteResponse;
use containerd_shim::asynchronous::{spawn, ExitSignal};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Error, Flags, StartOpts};

use crate::bundle::{Bundle, Role};
use crate::pod::remove_host_state;
use crate::process::now;
use crate::sandbox_dir::{kill_recorded, SandboxDir, State};
use crate::task::TaskService;

pub struct Shim {
    id: String,
    namespace: String,
    /// containerd's address: with the namespace and the pod, it names the
    /// shim socket.
    address: String,
    /// The socket this shim serves on (serving processes only).
    socket: String,
    exit: Arc<ExitSignal>,
}

impl std::fmt::Debug for Shim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shim")
            .field("id", &self.id)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// Removes a shim socket (`unix://` address) that nothing serves anymore.
fn remove_socket(address: &str) {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    if !path.is_empty() && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
}

/// What containerd-shim must not do for us: reap children (tokio reaps
/// the VM and its helpers) or adopt orphans.
pub fn shim_config() -> containerd_shim::Config {
    containerd_shim::Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    }
}

#[async_trait]
impl containerd_shim::asynchronous::Shim for Shim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        Shim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            address: args.address.clone(),
            socket: args.socket.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    /// One shim per pod: a workload container is served by its sandbox's
    /// shim (same socket address), anything else gets its own. The
    /// bundle's `address` file names it: containerd 1.6 reconnects to its
    /// shims through it after a restart (2.x keeps its own record), and the
    /// crate writes it only for a shim that was already serving.
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let bundle =
            Bundle::load(Path::new(".")).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let grouping = match bundle.role() {
            Role::Sandbox => opts.id.clone(),
            Role::Member { sandbox_id } => sandbox_id,
        };
        let address = spawn(opts, &grouping, Vec::new()).await?;
        containerd_shim::asynchronous::util::write_str_to_file("address", &address).await?;
        Ok(address)
    }

    /// containerd's cleanup after a shim that died: kill the VM and its
    /// helpers (verified by start time), unmount and remove what the
    /// container left under /run/podvisor.
    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let bundle = Bundle::load(Path::new(".")).ok();
        let role = bundle.as_ref().map_or(Role::Sandbox, Bundle::role);
        let grouping = match &role {
            Role::Sandbox => self.id.as_str(),
            Role::Member { sandbox_id } => sandbox_id.as_str(),
        };
        let socket = containerd_shim::socket_address(&self.address, &self.namespace, grouping);
        remove_socket(&socket);
        match role {
            Role::Sandbox => {
                let dir = SandboxDir::open(&self.id);
                // Another boot's pids are other processes now, and its
                // network namespaces are gone.
                let state = dir.read_state().filter(State::of_this_boot);
                for p in state.iter().flat_map(|s| &s.processes) {
                    if kill_recorded(p) {
                        tracing::info!("killed leftover {} (pid {})", p.name, p.pid);
                    }
                }
                remove_host_state(&dir, state.as_ref().and_then(|s| s.network.as_ref())).await;
                if let Some(path) = bundle.as_ref().and_then(Bundle::cgroups_path) {
                    crate::cgroup::remove_leftover(&path);
                }
                // Again, now that nothing of the sandbox runs: a process
                // of the dead shim's (one it was starting when it died)
                // may have held its socket a moment longer.
                remove_socket(&socket);
            }
            Role::Member { sandbox_id } => SandboxDir::open(&sandbox_id).remove_container(&self.id),
        }
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: Some(now()).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        // containerd-shim removes the socket only when it found it in use.
        let path = self.socket.strip_prefix("unix://").unwrap_or(&self.socket);
        let r = std::fs::remove_file(path);
        tracing::debug!("removing socket {path:?}: {r:?}");
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService::new(&self.namespace, publisher, self.exit.clone())
    }
}
