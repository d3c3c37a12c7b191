//! One pod's VM: its directory, the hypervisor processes, and the agent
//! client. Booted by the pod's first container, shut down by its last.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use podvisor_protocol::api::{self, AgentClient};
use podvisor_protocol::hybrid_vsock::{connect_agent, ReadyListener};
use tokio::sync::{watch, Mutex};

use crate::config::{Config, VmSizing};
use crate::network::{NetworkError, PodNetwork};
use crate::port_forward::PortForward;
use crate::state::{process_start_time, RecordedProcess, SandboxDir, State};
use podvisor_hypervisor::{self as hypervisor, RunningVm, VmSpec};

/// From QEMU start to the agent answering (TCG boots take seconds).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the guest gets to power off after DestroySandbox.
const POWEROFF_GRACE: Duration = Duration::from_secs(10);
/// Timeout of ordinary agent calls; WaitProcess has none.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::HypervisorError),
    #[error(
        "guest {what} {path} missing: install the guest image (make install) or fix the config"
    )]
    Image { what: &'static str, path: PathBuf },
    #[error("the VM exited ({status}) while booting; logs:\n{console}")]
    DiedBooting { status: String, console: String },
    #[error("the agent did not answer: {source}; logs:\n{console}")]
    Agent {
        source: podvisor_protocol::DialError,
        console: String,
    },
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("agent {call}: {source}")]
    Call {
        call: &'static str,
        source: ttrpc::Error,
    },
}

pub struct Pod {
    pub id: String,
    pub dir: SandboxDir,
    pub agent: AgentClient,
    pub vsock: PathBuf,
    /// pid of the VM process: the task pid containerd sees.
    pub vm_pid: u32,
    /// "qemu/tcg", ...
    pub describe: String,
    /// The config's `allow_host_namespaces`, for the pod's later
    /// containers.
    pub allow_host_namespaces: bool,
    vm_exit: watch::Receiver<Option<ExitStatus>>,
    vm: Mutex<RunningVm>,
    network: Option<PodNetwork>,
    /// Stops with the pod (dropped).
    _port_forward: Option<PortForward>,
}

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(CALL_TIMEOUT.as_nanos() as i64)
}

impl Pod {
    /// Creates the sandbox directory, starts the VM and waits for the agent.
    pub async fn boot(
        id: &str,
        config: &Config,
        sizing: &VmSizing,
        hostname: &str,
        netns: Option<&std::path::Path>,
    ) -> Result<Pod, PodError> {
        for (what, path) in [("kernel", &config.kernel), ("initramfs", &config.initramfs)] {
            if !path.exists() {
                return Err(PodError::Image {
                    what,
                    path: path.clone(),
                });
            }
        }
        let (hv, why) = hypervisor::select(
            sizing.hypervisor,
            &config.paths,
            std::path::Path::new(podvisor_names::paths::STATE_ROOT),
        )
        .await?;
        tracing::info!(sandbox = id, "hypervisor: {why}");
        let dir = SandboxDir::create(id)?;
        let network = match netns {
            Some(ns) => match PodNetwork::setup(ns).await {
                Ok(n) => Some(n),
                Err(e) => {
                    dir.destroy();
                    return Err(e.into());
                }
            },
            None => None,
        };
        let spec = VmSpec {
            kernel: config.kernel.clone(),
            initramfs: config.initramfs.clone(),
            vcpus: sizing.vcpus,
            memory_mib: sizing.memory_mib,
            kernel_params: sizing.kernel_params.clone(),
            dir: dir.root().to_owned(),
            vsock: dir.root().join("vm.vsock"),
            shared_dir: dir.shared(),
            net: network
                .as_ref()
                .map(PodNetwork::devices)
                .unwrap_or_default(),
            netns: netns.map(ToOwned::to_owned),
            cpuid_hide: config.cpuid_hide.clone(),
        };
        let undo = |dir: SandboxDir, network: Option<PodNetwork>| async move {
            if let Some(n) = &network {
                n.teardown().await;
            }
            dir.destroy();
        };
        let ready = match ReadyListener::bind(&spec.vsock) {
            Ok(r) => r,
            Err(e) => {
                undo(dir, network).await;
                return Err(PodError::Agent {
                    source: e,
                    console: String::new(),
                });
            }
        };
        let mut vm = match hv.launch(&spec).await {
            Ok(vm) => vm,
            Err(e) => {
                undo(dir, network).await;
                return Err(e.into());
            }
        };
        match Self::connect(
            id,
            &dir,
            &vm,
            &ready,
            hv.describe(),
            hostname,
            network.as_ref(),
        )
        .await
        {
            Ok(agent) => {
                let port_forward = match netns {
                    Some(ns) => match PortForward::start(ns, &vm.vsock).await {
                        Ok(f) => Some(f),
                        Err(e) => {
                            tracing::warn!(sandbox = id, "kubectl port-forward unavailable: {e}");
                            None
                        }
                    },
                    None => None,
                };
                Ok(Pod {
                    id: id.to_string(),
                    agent,
                    vsock: vm.vsock.clone(),
                    vm_pid: vm.vm.pid,
                    describe: vm.describe.clone(),
                    allow_host_namespaces: config.allow_host_namespaces,
                    vm_exit: vm.vm.exit_watch(),
                    dir,
                    vm: Mutex::new(vm),
                    network,
                    _port_forward: port_forward,
                })
            }
            Err(e) => {
                vm.stop(Duration::ZERO).await;
                undo(dir, network).await;
                Err(e)
            }
        }
    }

    async fn connect(
        id: &str,
        dir: &SandboxDir,
        vm: &RunningVm,
        ready: &ReadyListener,
        describe: String,
        hostname: &str,
        network: Option<&PodNetwork>,
    ) -> Result<AgentClient, PodError> {
        dir.write_state(&State {
            network: network.cloned(),
            sandbox_id: id.to_string(),
            hypervisor: describe,
            processes: vm
                .processes()
                .into_iter()
                .map(|(name, pid)| RecordedProcess {
                    name: name.to_string(),
                    pid,
                    start_time: process_start_time(pid).unwrap_or_default(),
                })
                .collect(),
        })?;
        let console = || hypervisor::log_tails(dir.root(), 20);
        let agent = tokio::select! {
            r = connect_agent(&vm.vsock, ready, BOOT_TIMEOUT) => r.map_err(|source| PodError::Agent { source, console: console() })?,
            st = vm.vm.wait() => return Err(PodError::DiedBooting {
                status: st.map(|s| s.to_string()).unwrap_or_default(),
                console: console(),
            }),
        };
        agent
            .create_sandbox(
                ctx(),
                &api::CreateSandboxRequest {
                    sandbox_id: id.to_string(),
                    hostname: hostname.to_string(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|source| PodError::Call {
                call: "CreateSandbox",
                source,
            })?;
        if let Some(n) = network {
            agent
                .configure_network(ctx(), &n.request())
                .await
                .map_err(|source| PodError::Call {
                    call: "ConfigureNetwork",
                    source,
                })?;
        }
        Ok(agent)
    }

    /// Resolves when the VM process has exited, for whatever reason.
    pub async fn exited(&self) {
        let mut rx = self.vm_exit.clone();
        let _ = rx.wait_for(|s| s.is_some()).await;
    }

    pub fn is_dead(&self) -> bool {
        self.vm_exit.borrow().is_some()
    }

    /// Kills the VM's helpers after the VM died on its own.
    pub async fn reap(&self) {
        self.vm.lock().await.stop(Duration::ZERO).await;
    }

    /// Powers the guest off (or kills it), stops the helpers and removes
    /// the sandbox directory with every mount below it.
    pub async fn shutdown(&self) {
        if !self.is_dead() {
            let asked = tokio::time::timeout(
                POWEROFF_GRACE,
                self.agent
                    .destroy_sandbox(ctx(), &api::DestroySandboxRequest::new()),
            )
            .await;
            if !matches!(asked, Ok(Ok(_))) {
                tracing::warn!(sandbox = self.id, "DestroySandbox failed; killing the VM");
            }
        }
        self.vm.lock().await.stop(POWEROFF_GRACE).await;
        if let Some(n) = &self.network {
            n.teardown().await;
        }
        self.dir.destroy();
        tracing::info!(
            sandbox = self.id,
            "VM stopped and sandbox directory removed"
        );
    }
}
