//! An OCI container in the guest, and the processes that run in it.
//!
//! The agent's own runtime (not youki's libcontainer; README says why):
//! - [`launch`]: fork, namespaces and the setup handshake;
//! - [`namespaces`]: which namespaces an init makes and which it joins;
//! - [`rootfs`]: mounts, devices, pivot_root inside the container;
//! - [`shared`]: its virtio-fs submounts, held by the agent meanwhile;
//! - [`sysctl`]: kernel parameters the spec sets;
//! - [`process`]: user, capabilities, rlimits, exec;
//! - [`seccomp`]: the spec's seccomp profile as a BPF filter;
//! - [`cgroup`]: the container's cgroup v2 limits, stats and kill;
//! - [`stdio`]: the process's streams and their vsock ports;
//! - [`user`]: user names from the container's /etc/passwd.

pub mod cgroup;
pub mod launch;
pub mod namespaces;
pub mod process;
pub mod rootfs;
pub mod seccomp;
pub mod shared;
pub mod stdio;
pub mod sysctl;
pub mod user;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci_spec::runtime::{LinuxResources, Process as OciProcess, Spec};
use podvisor_names::VM_DIED_EXIT_STATUS;
use podvisor_protocol::{api, GUEST_SHARED_DIR};
use tokio::sync::watch;

use crate::error::{internal, invalid, not_found, precondition, AgentError, Result};
use crate::lock;
use crate::reaper::{ExitStatus, Reaper};
use cgroup::Cgroup;
use launch::{LaunchPlan, Launched, Target};
use namespaces::NamespacePlan;
use process::ProcessPlan;
use seccomp::Filter;
use shared::SharedMounts;
use stdio::Streams;

/// An error inside a forked child, before it execs; sent to the agent as
/// text.
#[derive(Debug)]
pub struct ChildError(pub String);

/// How long the host has to connect a process's stdio before start fails.
const STDIO_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest container or exec id accepted.
const MAX_ID: usize = 128;

/// Checks a container or exec id: it names directories and cgroups.
pub fn validate_id(kind: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(invalid!(
            "invalid {kind} id {id:?}: use 1-{MAX_ID} characters of [A-Za-z0-9_.-]"
        ))
    }
}

/// One process: a container's init or an exec.
pub struct Process {
    pub pid: i32,
    streams: Streams,
    exit: watch::Receiver<Option<ExitStatus>>,
    /// Set until started.
    pending: Mutex<Option<Launched>>,
    oom_kills_before: u64,
}

impl Process {
    fn new(
        launched: Launched,
        streams: Streams,
        reaper: &Reaper,
        oom_kills_before: u64,
    ) -> Process {
        let (tx, rx) = watch::channel(None);
        let exited = reaper.watch(launched.pid);
        tokio::spawn(async move {
            if let Ok(status) = exited.await {
                let _ = tx.send(Some(status));
            }
        });
        Process {
            pid: launched.pid,
            streams,
            exit: rx,
            pending: Mutex::new(Some(launched)),
            oom_kills_before,
        }
    }

    pub fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    fn started(&self) -> bool {
        lock(&self.pending).is_none()
    }

    async fn start(&self) -> Result<()> {
        let launched = lock(&self.pending)
            .take()
            .ok_or_else(|| precondition!("process {} was already started", self.pid))?;
        self.streams.wait_connected(STDIO_CONNECT_TIMEOUT).await?;
        tokio::task::spawn_blocking(move || launched.start())
            .await
            .map_err(|e| internal!("start task: {e}"))?
    }

    /// The exit status, once the process exited and its output was
    /// delivered.
    async fn wait(&self) -> ExitStatus {
        let mut rx = self.exit.clone();
        let status = match rx.wait_for(|s| s.is_some()).await {
            Ok(s) => s.unwrap_or(i32::from(VM_DIED_EXIT_STATUS)),
            Err(_) => i32::from(VM_DIED_EXIT_STATUS),
        };
        self.streams.drained().await;
        status
    }

    fn signal(&self, signal: i32) -> Result<()> {
        if self.exited().is_some() {
            return Err(not_found!("process {} has already exited", self.pid));
        }
        // SAFETY: kill(2) with plain integers.
        if unsafe { libc::kill(self.pid, signal) } != 0 {
            let e = std::io::Error::last_os_error();
            // Reaped between the check above and now: it is finished, as
            // runc reports such a process.
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Err(not_found!("process {} has already exited", self.pid));
            }
            return Err(internal!("kill {} {signal}: {e}", self.pid));
        }
        Ok(())
    }
}

/// A container's OCI spec, checked before anything is made for it: the
/// process plan, the seccomp filter, the namespaces, the sysctl names and
/// the cgroup files of its resources. Nothing here touches the guest but
/// the rootfs's /etc/passwd for a user name.
pub struct SpecPlan {
    pub spec: Spec,
    pub process: ProcessPlan,
    pub seccomp: Option<Arc<Filter>>,
    pub namespaces: NamespacePlan,
    pub resources: Vec<(&'static str, String)>,
}

impl SpecPlan {
    pub fn parse(id: &str, spec_json: &[u8]) -> Result<Spec> {
        serde_json::from_slice(spec_json)
            .map_err(|e| invalid!("invalid OCI spec for container {id}: {e}"))
    }

    /// Checks `spec`; `rootfs` resolves a user name (none: refused);
    /// `terminal` is the stdio request's; `init_pid_of` finds the init of
    /// another running container, whose namespaces the spec may name.
    pub fn new(
        id: &str,
        spec: Spec,
        rootfs: Option<&Path>,
        terminal: bool,
        init_pid_of: &dyn Fn(&str) -> Option<i32>,
    ) -> Result<SpecPlan> {
        let oci_process = spec
            .process()
            .as_ref()
            .ok_or_else(|| invalid!("OCI spec of container {id} has no process"))?;
        let mut process = ProcessPlan::from_oci(oci_process, rootfs)?;
        check_terminal(&process, terminal)?;
        let linux = spec.linux().as_ref();
        let seccomp = linux
            .and_then(|l| l.seccomp().as_ref())
            .map(|p| Filter::compile(p).map(Arc::new))
            .transpose()
            .map_err(|e| invalid!("container {id}: {e}"))?;
        process.seccomp = seccomp.clone();
        if let Some(sysctls) = linux.and_then(|l| l.sysctl().as_ref()) {
            sysctl::check(sysctls.keys())?;
        }
        let namespaces = NamespacePlan::from_spec(
            linux
                .and_then(|l| l.namespaces().as_deref())
                .unwrap_or_default(),
            init_pid_of,
        )?;
        let resources = match linux.and_then(|l| l.resources().as_ref()) {
            Some(res) => cgroup::resource_files(res)?,
            None => Vec::new(),
        };
        Ok(SpecPlan {
            spec,
            process,
            seccomp,
            namespaces,
            resources,
        })
    }
}

/// The process of an exec, checked; `rootfs` and `terminal` as for
/// [`SpecPlan::new`].
pub fn exec_plan(
    exec_id: &str,
    process_json: &[u8],
    rootfs: Option<&Path>,
    terminal: bool,
) -> Result<ProcessPlan> {
    let oci: OciProcess = serde_json::from_slice(process_json)
        .map_err(|e| invalid!("invalid OCI process for exec {exec_id}: {e}"))?;
    let plan = ProcessPlan::from_oci(&oci, rootfs)?;
    check_terminal(&plan, terminal)?;
    Ok(plan)
}

/// The cgroup files an UpdateContainer of `id` writes.
pub fn resource_update(id: &str, resources_json: &[u8]) -> Result<Vec<(&'static str, String)>> {
    let res: LinuxResources = serde_json::from_slice(resources_json)
        .map_err(|e| invalid!("invalid linux.resources for container {id}: {e}"))?;
    cgroup::resource_files(&res)
}

fn check_terminal(plan: &ProcessPlan, terminal: bool) -> Result<()> {
    if plan.terminal != terminal {
        return Err(invalid!(
            "process.terminal ({}) and the stdio request's terminal ({terminal}) disagree",
            plan.terminal,
        ));
    }
    Ok(())
}

pub struct Container {
    pub id: String,
    rootfs: PathBuf,
    shared: SharedMounts,
    cgroup: Cgroup,
    init: Process,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// The spec's seccomp filter, for every exec too.
    seccomp: Option<Arc<Filter>>,
}

impl Container {
    /// Builds the container of `spec_json`; its init waits for start.
    /// `init_pid_of` finds the init of another running container, whose
    /// namespaces the spec may name.
    pub async fn create(
        id: &str,
        spec_json: &[u8],
        stdio_req: &api::StdioRequest,
        reaper: &Arc<Reaper>,
        init_pid_of: &(dyn Fn(&str) -> Option<i32> + Sync),
    ) -> Result<(Container, api::StdioPorts)> {
        let spec = SpecPlan::parse(id, spec_json)?;
        let rootfs = rootfs_path(id, &spec)?;
        let SpecPlan {
            spec,
            process: plan,
            seccomp,
            namespaces,
            resources,
        } = SpecPlan::new(id, spec, Some(&rootfs), stdio_req.terminal, init_pid_of)?;
        let namespaces = namespaces.open()?;
        let own_pid = namespaces.own_pid;
        let shared = SharedMounts::hold(id, &rootfs, &spec);
        let cgroup = match Cgroup::create(Path::new(cgroup::CGROUP_ROOT), id) {
            Ok(c) => c,
            Err(e) => {
                shared.release();
                return Err(e);
            }
        };
        let built = async {
            cgroup.write_all(&resources)?;
            let setup = stdio::prepare(stdio_req)?;
            let launch_plan = LaunchPlan {
                target: Target::Init {
                    spec: Box::new(spec.clone()),
                    rootfs: rootfs.clone(),
                    namespaces,
                },
                cgroup_procs: cgroup.path().join("cgroup.procs"),
                process: plan,
            };
            let mut launched = spawn_launch(launch_plan, setup.child, reaper.clone()).await?;
            let streams = Streams::start(setup.host, launched.tty_master.take())?;
            Ok::<_, AgentError>(Process::new(launched, streams, reaper, 0))
        }
        .await;
        match built {
            Ok(init) => {
                if !own_pid {
                    kill_all_when_init_exits(&init, cgroup.clone());
                }
                let ports = init.streams.ports();
                Ok((
                    Container {
                        id: id.to_string(),
                        rootfs,
                        shared,
                        cgroup,
                        init,
                        execs: Mutex::new(HashMap::new()),
                        seccomp,
                    },
                    ports,
                ))
            }
            Err(e) => {
                cgroup.remove();
                shared.release();
                Err(e)
            }
        }
    }

    pub fn running(&self) -> bool {
        self.init.started() && self.init.exited().is_none()
    }

    /// The init's pid while it has not exited (created or running), for
    /// containers that join its namespaces.
    pub fn init_pid(&self) -> Option<i32> {
        self.init.exited().is_none().then_some(self.init.pid)
    }

    pub async fn start(&self) -> Result<()> {
        if self.init.exited().is_some() {
            return Err(precondition!("container {} has already exited", self.id));
        }
        self.init.start().await
    }

    /// Creates an exec process; [`Container::start_exec`] runs it.
    pub async fn exec(
        &self,
        exec_id: &str,
        process_json: &[u8],
        stdio_req: &api::StdioRequest,
        reaper: &Arc<Reaper>,
    ) -> Result<(i32, api::StdioPorts)> {
        validate_id("exec", exec_id)?;
        if !self.running() {
            return Err(precondition!(
                "cannot exec in container {}: it is not running",
                self.id
            ));
        }
        if lock(&self.execs).contains_key(exec_id) {
            return Err(AgentError::AlreadyExists(format!(
                "exec {exec_id} already exists in container {}",
                self.id
            )));
        }
        let mut plan = exec_plan(
            exec_id,
            process_json,
            Some(&self.rootfs),
            stdio_req.terminal,
        )?;
        plan.seccomp = self.seccomp.clone();
        let setup = stdio::prepare(stdio_req)?;
        let launch_plan = LaunchPlan {
            target: Target::Exec {
                init_pid: self.init.pid,
            },
            cgroup_procs: self.cgroup.path().join("cgroup.procs"),
            process: plan,
        };
        let oom_before = self.cgroup.oom_kills();
        let mut launched = spawn_launch(launch_plan, setup.child, reaper.clone()).await?;
        let streams = Streams::start(setup.host, launched.tty_master.take())?;
        let process = Arc::new(Process::new(launched, streams, reaper, oom_before));
        let ports = process.streams.ports();
        let pid = process.pid;
        let mut execs = lock(&self.execs);
        if execs.contains_key(exec_id) {
            return Err(AgentError::AlreadyExists(format!(
                "exec {exec_id} already exists in container {}",
                self.id
            )));
        }
        execs.insert(exec_id.to_string(), process);
        Ok((pid, ports))
    }

    /// Forgets an exec process that has exited (or never started).
    pub fn remove_exec(&self, exec_id: &str) -> Result<()> {
        let p = self.process(exec_id)?;
        if p.started() && p.exited().is_none() {
            return Err(precondition!(
                "exec {exec_id} in container {} is still running",
                self.id
            ));
        }
        lock(&self.execs).remove(exec_id);
        Ok(())
    }

    pub async fn start_exec(&self, exec_id: &str) -> Result<()> {
        self.process(exec_id)?.start().await
    }

    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| not_found!("no exec {exec_id} in container {}", self.id))
    }

    fn with_process<T>(&self, exec_id: &str, f: impl FnOnce(&Process) -> T) -> Result<T> {
        if exec_id.is_empty() {
            Ok(f(&self.init))
        } else {
            Ok(f(&*self.process(exec_id)?))
        }
    }

    pub fn signal(&self, exec_id: &str, signal: i32, all: bool) -> Result<()> {
        if all {
            self.cgroup.signal_all(signal);
            return Ok(());
        }
        self.with_process(exec_id, |p| p.signal(signal))?
    }

    pub async fn wait(&self, exec_id: &str) -> Result<api::WaitProcessResponse> {
        let (status, oom_before) = if exec_id.is_empty() {
            (self.init.wait().await, self.init.oom_kills_before)
        } else {
            let p = self.process(exec_id)?;
            (p.wait().await, p.oom_kills_before)
        };
        let oom_killed = status == 128 + libc::SIGKILL && self.cgroup.oom_kills() > oom_before;
        Ok(api::WaitProcessResponse {
            exit_status: status,
            oom_killed,
            ..Default::default()
        })
    }

    pub fn close_stdin(&self, exec_id: &str) -> Result<()> {
        self.with_process(exec_id, |p| p.streams.close_stdin())
    }

    pub fn resize(&self, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let rows = u16::try_from(rows).map_err(|_| invalid!("rows {rows} out of range"))?;
        let cols = u16::try_from(cols).map_err(|_| invalid!("columns {cols} out of range"))?;
        self.with_process(exec_id, |p| p.streams.resize(rows, cols))?
    }

    pub fn pids(&self) -> Vec<u32> {
        self.cgroup.procs()
    }

    pub fn stats(&self) -> api::StatsContainerResponse {
        self.cgroup.stats()
    }

    pub fn update(&self, resources_json: &[u8]) -> Result<()> {
        self.cgroup
            .write_all(&resource_update(&self.id, resources_json)?)
    }

    /// Frees the cgroup; returns the shared submounts the agent holds for
    /// it, to release. The caller has made sure the container may go.
    pub fn destroy(&self) -> SharedMounts {
        self.cgroup.remove();
        self.shared.clone()
    }

    pub fn kill_all(&self) {
        self.cgroup.signal_all(libc::SIGKILL);
    }
}

/// In a PID namespace it does not own (the pod's, shared), a container's
/// init exiting leaves its other processes running, and holding its
/// output open: kill them then, as runc does for such containers.
fn kill_all_when_init_exits(init: &Process, cgroup: Cgroup) {
    let mut exit = init.exit.clone();
    tokio::spawn(async move {
        if exit.wait_for(|s| s.is_some()).await.is_ok() {
            cgroup.signal_all(libc::SIGKILL);
        }
    });
}

async fn spawn_launch(
    plan: LaunchPlan,
    stdio: launch::LaunchStdio,
    reaper: Arc<Reaper>,
) -> Result<Launched> {
    tokio::task::spawn_blocking(move || {
        launch::launch(&plan, stdio, |intermediate| {
            // Its exit is of no interest, but it must not linger unclaimed.
            drop(reaper.watch(intermediate));
        })
    })
    .await
    .map_err(|e| internal!("launch task: {e}"))?
}

/// The rootfs named by the spec: absolute, or relative to the container's
/// directory in the shared filesystem.
fn rootfs_path(id: &str, spec: &Spec) -> Result<PathBuf> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| invalid!("OCI spec of container {id} has no root"))?;
    let path = if root.path().is_absolute() {
        root.path().clone()
    } else {
        Path::new(GUEST_SHARED_DIR).join(id).join(root.path())
    };
    let real = path.canonicalize().map_err(|_| {
        precondition!(
            "rootfs {} of container {id} does not exist in the guest",
            path.display()
        )
    })?;
    // Only what the host shared is a rootfs, never the guest's own files.
    if !real.starts_with(GUEST_SHARED_DIR) || !real.is_dir() {
        return Err(invalid!(
            "rootfs {} of container {id} is not a directory under {GUEST_SHARED_DIR}",
            path.display()
        ));
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        for ok in ["a", "abc-DEF_1.2", &"x".repeat(MAX_ID)] {
            assert!(validate_id("container", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a b",
            &"x".repeat(MAX_ID + 1),
            "é",
        ] {
            let e = validate_id("container", bad).unwrap_err();
            assert!(e.to_string().contains("invalid container id"), "{e}");
        }
    }

    #[test]
    fn missing_rootfs_is_named() {
        let spec: Spec =
            serde_json::from_str(r#"{"ociVersion":"1.0.2","root":{"path":"/nonexistent/rootfs"}}"#)
                .unwrap();
        let e = rootfs_path("c1", &spec).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/rootfs"), "{e}");
    }
}
