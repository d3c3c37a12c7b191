//! One pod's VM: its sandbox directory, the hypervisor processes, the pod
//! network carried into it, and the agent. Taken from the warm pool,
//! restored from its shape's template, or booted cold, for the pod's first
//! container, shut down by its last; in between it offers the operations
//! on the guest's containers ([`Guest`]), each one agent call with its
//! error mapped once. [`remove_host_state`] is the one teardown of what a
//! pod leaves on the host, for an orderly shutdown and for containerd's
//! crash-cleanup `delete` alike.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::protos::api::Mount as RootfsMount;
use podvisor_names::VM_DIED_EXIT_STATUS;
use podvisor_protocol::api::{self, AgentClient};
use podvisor_protocol::hybrid_vsock::{connect_agent, ReadyListener};
use tokio::sync::{watch, Mutex};

use crate::bundle::{Bundle, PodRef, Shared};
use crate::cgroup::{CgroupError, PodCgroup};
use crate::config::{Config, VmSizing};
use crate::container::{Exit, Guest};
use crate::error::{Result, ShimError};
use crate::network::{NetworkError, PodNetwork};
use crate::port_forward::PortForward;
use crate::sandbox_dir::{remove_other_boots, RecordedProcess, SandboxDir, State};
use crate::stdio::{Bridge, StdioPaths};
use crate::{pool, warm};
use podvisor_hypervisor::jail::ids::Owner;
use podvisor_hypervisor::{self as hypervisor, RunningVm, Supervised, VmSpec};
use podvisor_names::paths::STATE_ROOT;

/// From QEMU start to the agent answering (TCG boots take seconds).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// From resuming a clone to its agent answering (under TCG here: under a
/// second); beyond it the pod boots cold.
const CLONE_READY: Duration = Duration::from_secs(20);
/// How long the guest gets to power off after DestroySandbox.
const POWEROFF_GRACE: Duration = Duration::from_secs(10);
/// Lines of each log kept in a warning about a VM that ended unasked: a
/// guest panic's first line ("Kernel panic - not syncing") comes before
/// its backtraces (an NMI's are about 80 lines), and panic=-1 resets the
/// guest without printing an end marker.
const LAST_LOG_LINES: usize = 200;
/// Timeout of ordinary agent calls; WaitProcess has none.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    State(#[from] crate::sandbox_dir::StateError),
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
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("agent {call}: {source}")]
    Call {
        call: &'static str,
        source: ttrpc::Error,
    },
}

pub struct Pod {
    pub id: String,
    dir: SandboxDir,
    agent: AgentClient,
    vsock: PathBuf,
    /// pid of the VM process: the task pid containerd sees.
    pub vm_pid: u32,
    /// "qemu/tcg", ...
    pub describe: String,
    /// The config's `allow_host_namespaces`, for the pod's later
    /// containers.
    pub allow_host_namespaces: bool,
    vm_exit: watch::Receiver<Option<ExitStatus>>,
    /// Each helper's exit (vsock, virtio-fs), by name.
    helper_exits: Vec<(&'static str, watch::Receiver<Option<ExitStatus>>)>,
    /// The helper whose exit took the VM down, and how it ended.
    helper_failure: std::sync::OnceLock<String>,
    /// Set once the shim began shutting the VM down: an exit before it
    /// was not asked for.
    stopping: std::sync::atomic::AtomicBool,
    vm: Mutex<RunningVm>,
    network: Option<PodNetwork>,
    /// Stops with the pod (dropped).
    _port_forward: Option<PortForward>,
    /// Left (dropped) once the VM's processes are gone.
    cgroup: std::sync::Mutex<Option<PodCgroup>>,
}

/// How long the VM may take to end after a helper ended, before the
/// helper is taken for the cause.
const HELPER_BLAME_AFTER: Duration = Duration::from_millis(500);

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(CALL_TIMEOUT.as_nanos()).unwrap_or(i64::MAX))
}

impl Pod {
    /// Creates the sandbox directory, starts the VM in the pod's cgroup
    /// (`cgroups_path`, where the shim moves first) and waits for the
    /// agent.
    pub async fn boot(
        id: &str,
        config: &Config,
        sizing: &VmSizing,
        hostname: &str,
        netns: Option<&std::path::Path>,
        cgroups_path: Option<&str>,
    ) -> Result<Pod, PodError> {
        for (what, path) in [("kernel", &config.kernel), ("initramfs", &config.initramfs)] {
            if !path.exists() {
                return Err(PodError::Image {
                    what,
                    path: path.clone(),
                });
            }
        }
        // Left when it drops: on any failure below, after the processes.
        let cgroup = cgroups_path.map(PodCgroup::enter).transpose()?;
        let (hv, why) = hypervisor::select(
            sizing.hypervisor,
            &config.paths,
            config.jail,
            Path::new(STATE_ROOT),
        )
        .await?;
        tracing::info!(sandbox = id, "hypervisor: {why}");
        // What another boot left goes first (pids it records are not its).
        remove_other_boots();
        // A pool VM of the pod's shape, if one is ready: its directory
        // becomes the sandbox's.
        let pool_key = pool::serves(config, sizing, &*hv)
            .then(|| pool::key(&*hv, &config.vm_spec(sizing, Path::new(STATE_ROOT))))
            .and_then(|k| {
                k.map_err(|e| tracing::warn!(sandbox = id, "no pool: {e}"))
                    .ok()
            });
        let from_pool = format!("{} (from pool)", hv.describe());
        let (dir, pooled) = match pool_key
            .as_deref()
            .and_then(|k| pool::claim(k, id, &from_pool))
        {
            Some((dir, processes)) => {
                // It runs as the id the filler leased it, one of the jail's.
                let owner = processes
                    .first()
                    .ok_or_else(|| "no VM process".to_string())
                    .and_then(|vm| Owner::of_process(vm.pid).map_err(|e| e.to_string()))
                    .and_then(|o| {
                        if config.jail.runs_as(o.id) {
                            Ok(o)
                        } else {
                            Err(format!("it runs as {}, not as the jail would run it", o.id))
                        }
                    });
                let joined = owner.and_then(|o| match &cgroup {
                    Some(c) => processes
                        .iter()
                        .try_for_each(|p| c.adopt(p.pid))
                        .map(|()| o)
                        .map_err(|e| format!("it cannot join the pod's cgroup: {e}")),
                    None => Ok(o),
                });
                match joined {
                    Ok(o) => (dir, Some((processes, o))),
                    // Not the pod's to use: restored or booted instead.
                    Err(e) => {
                        tracing::warn!(sandbox = id, "the pool VM cannot be used: {e}");
                        kill_all(processes).await;
                        (dir, None)
                    }
                }
            }
            None => (SandboxDir::create(id)?, None),
        };
        let network = match netns {
            Some(ns) => match PodNetwork::setup(ns).await {
                Ok(n) => Some(n),
                Err(e) => {
                    if let Some((processes, _)) = pooled {
                        kill_all(processes).await;
                    }
                    dir.destroy();
                    return Err(e.into());
                }
            },
            None => None,
        };
        let undo = |dir: SandboxDir, network: Option<PodNetwork>| async move {
            remove_host_state(&dir, network.as_ref()).await;
        };
        // A pool VM runs as the id it was given; any other VM as one
        // leased now, its directory and taps given to that id.
        let spec = config.jail.prepare(&VmSpec {
            net: network
                .as_ref()
                .map(PodNetwork::devices)
                .unwrap_or_default(),
            netns: netns.map(ToOwned::to_owned),
            owner: pooled.as_ref().map(|(_, o)| o.clone()),
            ..config.vm_spec(sizing, dir.root())
        });
        let ready = match spec.map_err(PodError::from).and_then(|spec| {
            ReadyListener::bind(&spec.vsock)
                .map(|r| (spec, r))
                .map_err(|source| PodError::Agent {
                    source,
                    console: String::new(),
                })
        }) {
            Ok(r) => r,
            Err(e) => {
                if let Some((processes, _)) = pooled {
                    kill_all(processes).await;
                }
                undo(dir, network).await;
                return Err(e);
            }
        };
        let (mut spec, ready) = ready;
        let boot = Boot {
            id,
            dir: &dir,
            hostname,
            network: network.as_ref(),
        };
        // A pool VM or a clone that does not come up gives way to the
        // next way of starting: a clone, then a cold boot.
        let mut started = None;
        if let Some((processes, _)) = pooled {
            match hv.adopt(&spec, processes).await {
                Ok(vm) => {
                    started = boot
                        .warm(vm, None, from_pool, "the pool VM did not come up")
                        .await;
                }
                Err(e) => tracing::warn!(sandbox = id, "the pool VM could not be taken over: {e}"),
            }
            if started.is_none() {
                // Its id went with it: the next VM leases one.
                spec.owner = None;
            }
        }
        if started.is_none() {
            match warm::restore(config, sizing, &*hv, &spec).await {
                Ok(vm) => {
                    let describe = format!("{} (from template)", hv.describe());
                    started = boot
                        .warm(
                            vm,
                            Some(&ready),
                            describe,
                            "cold boot: the clone did not come up",
                        )
                        .await;
                }
                Err(why) => tracing::info!(sandbox = id, "cold boot: {why}"),
            }
        }
        let (vm, agent) = match started {
            Some(started) => started,
            None => {
                let mut vm = match hv.launch(&spec).await {
                    Ok(vm) => vm,
                    Err(e) => {
                        undo(dir, network).await;
                        return Err(e.into());
                    }
                };
                match boot
                    .connect(&vm, Some(&ready), hv.describe(), BOOT_TIMEOUT)
                    .await
                {
                    Ok(agent) => (vm, agent),
                    Err(e) => {
                        vm.stop(Duration::ZERO).await;
                        undo(dir, network).await;
                        return Err(e);
                    }
                }
            }
        };
        // Refilled after each pod of a pooled shape, whether it took a
        // pool VM or found none.
        if pool_key.is_some() {
            pool::spawn_fill(config, sizing, cgroup.as_ref());
        }
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
            helper_exits: vm
                .helpers
                .iter()
                .map(|h| (h.name, h.exit_watch()))
                .collect(),
            helper_failure: std::sync::OnceLock::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            dir,
            vm: Mutex::new(vm),
            network,
            _port_forward: port_forward,
            cgroup: std::sync::Mutex::new(cgroup),
        })
    }

    /// Resolves when the VM process has exited, for whatever reason. A
    /// helper that ends first (vsock, virtio-fs: killed, or by its seccomp
    /// filter) takes the VM down with it, since the pod cannot be served
    /// without it.
    pub async fn exited(&self) {
        let (tx, mut first) = tokio::sync::mpsc::channel(self.helper_exits.len() + 1);
        let watches = std::iter::once((None, self.vm_exit.clone())).chain(
            self.helper_exits
                .iter()
                .map(|(name, rx)| (Some(*name), rx.clone())),
        );
        for (helper, mut rx) in watches {
            let tx = tx.clone();
            tokio::spawn(async move {
                let status = rx.wait_for(|s| s.is_some()).await.ok().and_then(|s| *s);
                if let Some(status) = status {
                    let _ = tx.send((helper, status)).await;
                }
            });
        }
        drop(tx);
        let first = first.recv().await;
        // A helper also ends when the VM does (virtiofsd once QEMU hangs
        // up; the shim stops helpers after the VM): only one whose VM
        // still runs a moment later ended under it.
        let mut vm = self.vm_exit.clone();
        let vm_running = match first {
            Some((Some(_), _)) => {
                tokio::time::timeout(HELPER_BLAME_AFTER, vm.wait_for(|s| s.is_some()))
                    .await
                    .is_err()
            }
            _ => false,
        };
        if let (Some((Some(helper), status)), true) = (first, vm_running) {
            let why = format!(
                "{helper} ended ({}) under a running VM, which was stopped",
                podvisor_hypervisor::describe_exit(status)
            );
            tracing::warn!(sandbox = self.id, "{why}");
            let _ = self.helper_failure.set(why);
            self.vm.lock().await.vm.kill().await;
        }
        let mut rx = self.vm_exit.clone();
        let _ = rx.wait_for(|s| s.is_some()).await;
    }

    /// How the VM ended, in words; none while it runs.
    pub fn exit_reason(&self) -> Option<String> {
        let status = (*self.vm_exit.borrow())?;
        Some(match self.helper_failure.get() {
            Some(why) => why.clone(),
            None => podvisor_hypervisor::describe_exit(status),
        })
    }

    pub fn is_dead(&self) -> bool {
        self.vm_exit.borrow().is_some()
    }

    /// Whether the VM ended before the shim asked it to.
    pub fn ended_unasked(&self) -> bool {
        self.is_dead() && !self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The end of the guest console and of each helper's log, for a
    /// warning about a VM or an agent that ended unasked: the guest's last
    /// words (a panic, the agent's error) are gone with the sandbox
    /// directory.
    pub fn last_logs(&self) -> String {
        podvisor_hypervisor::log_tails(self.dir.root(), LAST_LOG_LINES)
    }

    /// Kills the VM's helpers after the VM died on its own.
    pub async fn reap(&self) {
        self.vm.lock().await.stop(Duration::ZERO).await;
    }

    /// Powers the guest off (or kills it), stops the helpers and removes
    /// the sandbox directory with every mount below it.
    pub async fn shutdown(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut refused = None;
        if !self.is_dead() {
            let asked = tokio::time::timeout(
                POWEROFF_GRACE,
                self.agent
                    .destroy_sandbox(ctx(), &api::DestroySandboxRequest::new()),
            )
            .await;
            refused = match asked {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {POWEROFF_GRACE:?}")),
            };
        }
        self.vm.lock().await.stop(POWEROFF_GRACE).await;
        if let Some(why) = refused {
            tracing::warn!(
                sandbox = self.id,
                "DestroySandbox failed ({why}); the VM was stopped ({}); its last logs:\n{}",
                self.exit_reason().unwrap_or_default(),
                self.last_logs()
            );
        }
        remove_host_state(&self.dir, self.network.as_ref()).await;
        let cgroup = self.cgroup.lock().ok().and_then(|mut c| c.take());
        drop(cgroup);
        tracing::info!(
            sandbox = self.id,
            "VM stopped and sandbox directory removed"
        );
    }
}

/// What reaching a started VM's agent needs, whichever way the VM started.
struct Boot<'a> {
    id: &'a str,
    dir: &'a SandboxDir,
    hostname: &'a str,
    network: Option<&'a PodNetwork>,
}

impl Boot<'_> {
    /// A VM started warm (from the pool or a template), with its agent; or
    /// none, the VM stopped and `failed` logged with why, for the next way
    /// of starting to take over.
    async fn warm(
        &self,
        mut vm: RunningVm,
        ready: Option<&ReadyListener>,
        describe: String,
        failed: &str,
    ) -> Option<(RunningVm, AgentClient)> {
        match self.connect(&vm, ready, describe, CLONE_READY).await {
            Ok(agent) => Some((vm, agent)),
            Err(e) => {
                vm.stop(Duration::ZERO).await;
                tracing::warn!(sandbox = self.id, "{failed}: {e}");
                None
            }
        }
    }

    /// Records the VM as the sandbox's, waits up to `within` for its agent
    /// (reporting on `ready`, unless it did before), and gives it the
    /// sandbox and the pod network.
    async fn connect(
        &self,
        vm: &RunningVm,
        ready: Option<&ReadyListener>,
        describe: String,
        within: Duration,
    ) -> Result<AgentClient, PodError> {
        let Boot {
            id,
            dir,
            hostname,
            network,
        } = *self;
        dir.write_state(State {
            network: network.cloned(),
            sandbox_id: id.to_string(),
            hypervisor: describe,
            processes: RecordedProcess::of(vm),
            ..State::default()
        })?;
        let console = || hypervisor::log_tails(dir.root(), 20);
        let agent = tokio::select! {
            r = connect_agent(&vm.vsock, ready, within) => r.map_err(|source| PodError::Agent { source, console: console() })?,
            st = vm.vm.wait() => return Err(PodError::DiedBooting {
                status: vm.describe_end(st),
                console: console(),
            }),
        };
        agent
            .create_sandbox(
                ctx(),
                &api::CreateSandboxRequest {
                    sandbox_id: id.to_string(),
                    hostname: hostname.to_string(),
                    host_time_ns: host_time_ns(),
                    host_entropy: host_entropy(),
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
}

/// Kills a pool VM's adopted processes (a pod that could not use it).
async fn kill_all(processes: Vec<Supervised>) {
    for mut p in processes {
        p.kill().await;
    }
}

/// The host's CLOCK_REALTIME, ns since the epoch.
fn host_time_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// 32 bytes from the host's RNG, for the guest to mix in (none if the
/// host's RNG fails, which it does not once booted).
fn host_entropy() -> Vec<u8> {
    let mut buf = vec![0u8; 32];
    // SAFETY: getrandom into a buffer of the length given.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if usize::try_from(n).ok() != Some(buf.len()) {
        buf.clear();
    }
    buf
}

/// Removes what a pod left on the host once its VM's processes are gone:
/// the taps and tc filters in the pod's network namespace, then the
/// sandbox directory with every mount below it. An orderly shutdown, a
/// failed boot and containerd's crash-cleanup `delete` all end here.
pub async fn remove_host_state(dir: &SandboxDir, network: Option<&PodNetwork>) {
    if let Some(n) = network {
        n.teardown().await;
    }
    dir.destroy();
}

impl Pod {
    pub async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let req = api::ListProcessesRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        let resp = self
            .agent
            .list_processes(ctx(), &req)
            .await
            .map_err(Self::failed("ListProcesses"))?;
        Ok(resp.pids)
    }

    pub async fn stats(&self, id: &str) -> Result<api::StatsContainerResponse> {
        let req = api::StatsContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        };
        self.agent
            .stats_container(ctx(), &req)
            .await
            .map_err(Self::failed("StatsContainer"))
    }

    pub async fn update(&self, id: &str, resources: Vec<u8>) -> Result<()> {
        let req = api::UpdateContainerRequest {
            container_id: id.to_string(),
            resources_json: resources,
            ..Default::default()
        };
        self.agent
            .update_container(ctx(), &req)
            .await
            .map_err(Self::failed("UpdateContainer"))?;
        Ok(())
    }

    pub async fn resize_pty(&self, id: &str, exec_id: &str, rows: u32, columns: u32) -> Result<()> {
        let req = api::TtyWinResizeRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            rows,
            columns,
            ..Default::default()
        };
        self.agent
            .tty_win_resize(ctx(), &req)
            .await
            .map_err(Self::failed("TtyWinResize"))?;
        Ok(())
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let req = api::CloseStdinRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        self.agent
            .close_stdin(ctx(), &req)
            .await
            .map_err(Self::failed("CloseStdin"))?;
        Ok(())
    }

    /// One agent call, its failure named after it.
    fn failed(call: &'static str) -> impl FnOnce(ttrpc::Error) -> ShimError {
        move |source| ShimError::Agent { call, source }
    }
}

#[async_trait]
impl Guest for Pod {
    fn share(&self, id: &str, bundle: &Bundle, rootfs: &[RootfsMount]) -> Result<Shared> {
        let pod = PodRef {
            sandbox_id: &self.id,
            vm_pid: self.vm_pid,
        };
        Ok(bundle.share(id, rootfs, &self.dir.container(id), &pod)?)
    }

    fn unshare(&self, id: &str) {
        self.dir.remove_container(id);
    }

    async fn create(&self, id: &str, shared: Shared, stdio: &StdioPaths) -> Result<Bridge> {
        let req = api::CreateContainerRequest {
            container_id: id.to_string(),
            oci_spec_json: shared.spec,
            tmpfs: shared.tmpfs,
            stdio: Some(stdio.request()).into(),
            ..Default::default()
        };
        let resp = self
            .agent
            .create_container(ctx(), &req)
            .await
            .map_err(Self::failed("CreateContainer"))?;
        let ports = resp.ports.clone().unwrap_or_default();
        Ok(Bridge::connect(&self.vsock, &ports, stdio, (id, "")).await?)
    }

    async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: Vec<u8>,
        stdio: &StdioPaths,
    ) -> Result<Bridge> {
        let req = api::ExecProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            process_json: process,
            stdio: Some(stdio.request()).into(),
            ..Default::default()
        };
        let resp = self
            .agent
            .exec_process(ctx(), &req)
            .await
            .map_err(Self::failed("ExecProcess"))?;
        let ports = resp.ports.clone().unwrap_or_default();
        Ok(Bridge::connect(&self.vsock, &ports, stdio, (id, exec_id)).await?)
    }

    async fn start(&self, id: &str, exec_id: &str) -> Result<()> {
        let req = api::StartContainerRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        self.agent
            .start_container(ctx(), &req)
            .await
            .map_err(Self::failed("StartContainer"))?;
        Ok(())
    }

    async fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let req = api::SignalProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            signal,
            all,
            ..Default::default()
        };
        self.agent
            .signal_process(ctx(), &req)
            .await
            .map_err(Self::failed("SignalProcess"))?;
        Ok(())
    }

    async fn wait(&self, id: &str, exec_id: &str) -> Exit {
        let req = api::WaitProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        match self
            .agent
            .wait_process(ttrpc::context::Context::default(), &req)
            .await
        {
            Ok(w) => Exit {
                status: u32::try_from(w.exit_status).unwrap_or(u32::from(VM_DIED_EXIT_STATUS)),
                oom: w.oom_killed,
            },
            Err(e) => {
                tracing::warn!(container = id, exec = exec_id, "WaitProcess: {e}");
                Exit {
                    status: u32::from(VM_DIED_EXIT_STATUS),
                    oom: false,
                }
            }
        }
    }

    async fn remove(&self, id: &str, exec_id: &str) {
        if self.is_dead() {
            return;
        }
        let req = api::RemoveContainerRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        if let Err(e) = self.agent.remove_container(ctx(), &req).await {
            tracing::debug!(container = id, exec = exec_id, "RemoveContainer: {e}");
        }
    }
}
