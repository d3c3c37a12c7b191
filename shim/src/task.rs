//! containerd's Task API for one pod: each call goes to the pod's VM
//! through the agent, and the task events are published back.
//!
//! The pod's first container (a CRI sandbox or a plain `ctr run`
//! container) boots the VM; later containers of the pod join it; deleting
//! the first one shuts the VM down. The task pid containerd sees is the
//! VM process's: killing it kills the pod, as with any VM runtime.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use containerd_shim::api::{self as shim_api, Status};
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::events::task as ev;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{CodedInputStream, MessageDyn};
use containerd_shim::protos::topics;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Task, TtrpcContext, TtrpcResult};
use podvisor_protocol::api;
use ttrpc::{Code, Error as TtrpcError};

use crate::bundle::{Bundle, PodRef, Role};
use crate::config::Config;
use crate::process::{lock, now, Proc, ProcState};
use crate::sandbox::{ctx, Pod};
use crate::stdio::{Bridge, StdioPaths};
use podvisor_names::VM_DIED_EXIT_STATUS;

fn status(code: Code, msg: impl std::fmt::Display) -> TtrpcError {
    TtrpcError::RpcStatus(ttrpc::get_status(code, msg))
}

/// Agent failures keep their code (NOT_FOUND stays "not found" for
/// containerd); transport failures mean the VM is gone.
fn agent_err(call: &str, e: TtrpcError) -> TtrpcError {
    match e {
        TtrpcError::RpcStatus(s) => status(s.code(), format!("{call}: {}", s.message())),
        other => status(
            Code::UNAVAILABLE,
            format!("{call}: the VM is not reachable: {other}"),
        ),
    }
}

struct Container {
    id: String,
    bundle: String,
    /// This container booted the pod's VM.
    owns_pod: bool,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
}

impl Container {
    fn proc(&self, exec_id: &str) -> TtrpcResult<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs).get(exec_id).cloned().ok_or_else(|| {
            status(
                Code::NOT_FOUND,
                format!("exec {exec_id} not found in {}", self.id),
            )
        })
    }

    fn all(&self) -> Vec<Arc<Proc>> {
        std::iter::once(self.init.clone())
            .chain(lock(&self.execs).values().cloned())
            .collect()
    }
}

pub struct TaskService {
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    pod: tokio::sync::Mutex<Option<Arc<Pod>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

impl TaskService {
    pub fn new(
        namespace: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Arc<TaskService> {
        Arc::new(TaskService {
            namespace: namespace.to_string(),
            publisher,
            exit,
            pod: tokio::sync::Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
        })
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(Default::default(), topic, &self.namespace, event)
            .await
        {
            tracing::warn!("publishing {topic}: {e}");
        }
    }

    fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))
    }

    async fn pod(&self) -> TtrpcResult<Arc<Pod>> {
        self.pod
            .lock()
            .await
            .clone()
            .ok_or_else(|| status(Code::FAILED_PRECONDITION, "this shim has no VM"))
    }

    /// Boots the pod's VM for its first container.
    async fn boot(
        self: &Arc<Self>,
        id: &str,
        bundle: &Bundle,
        options: Option<&Any>,
    ) -> TtrpcResult<Arc<Pod>> {
        let config = Config::load(config_path(options).as_deref())
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        check_host_namespaces(bundle, config.allow_host_namespaces)?;
        let sizing = config
            .vm_sizing(&bundle.annotations())
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let hostname = bundle.spec.hostname().clone().unwrap_or_default();
        let netns = crate::network::netns_of(&bundle.spec);
        let pod = Arc::new(
            Pod::boot(id, &config, &sizing, &hostname, netns.as_deref())
                .await
                .map_err(|e| status(Code::INTERNAL, format!("starting the VM: {e}")))?,
        );
        tracing::info!(
            sandbox = id,
            "VM up ({}, {} vCPU, {} MiB, pid {})",
            pod.describe,
            sizing.vcpus,
            sizing.memory_mib,
            pod.vm_pid
        );
        let me = self.clone();
        let watched = pod.clone();
        tokio::spawn(async move {
            watched.exited().await;
            me.vm_died(&watched).await;
        });
        Ok(pod)
    }

    /// The VM is gone: every process in it has exited.
    async fn vm_died(&self, pod: &Pod) {
        let containers: Vec<_> = lock(&self.containers).values().cloned().collect();
        for c in containers {
            for p in c.all() {
                if p.set_stopped(u32::from(VM_DIED_EXIT_STATUS)) {
                    self.publish_exit(&c.id, &p, pod.vm_pid).await;
                }
            }
        }
        pod.reap().await;
        tracing::warn!(
            sandbox = pod.id,
            "the VM exited; its processes are reported dead"
        );
    }

    async fn publish_exit(&self, container_id: &str, p: &Proc, pid: u32) {
        let (exit_status, exited_at) = match p.state() {
            ProcState::Stopped { status, at } => (status, at),
            _ => return,
        };
        let id = if p.exec_id.is_empty() {
            container_id.to_string()
        } else {
            p.exec_id.clone()
        };
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(ev::TaskExit {
                container_id: container_id.to_string(),
                id,
                pid,
                exit_status,
                exited_at: Some(exited_at).into(),
                ..Default::default()
            }),
        )
        .await;
    }

    /// Waits for a started process in the guest, then reports its exit.
    fn watch_exit(self: &Arc<Self>, pod: Arc<Pod>, container_id: String, p: Arc<Proc>) {
        let me = self.clone();
        tokio::spawn(async move {
            let req = api::WaitProcessRequest {
                container_id: container_id.clone(),
                exec_id: p.exec_id.clone(),
                ..Default::default()
            };
            // No timeout: a process may run for months.
            let (status, oom) = match pod
                .agent
                .wait_process(ttrpc::context::Context::default(), &req)
                .await
            {
                Ok(w) => (w.exit_status as u32, w.oom_killed),
                Err(e) => {
                    tracing::warn!(container = container_id, "WaitProcess: {e}");
                    (u32::from(VM_DIED_EXIT_STATUS), false)
                }
            };
            p.drain_output().await;
            if oom {
                me.publish(
                    topics::TASK_OOM_EVENT_TOPIC,
                    Box::new(ev::TaskOOM {
                        container_id: container_id.clone(),
                        ..Default::default()
                    }),
                )
                .await;
            }
            if p.set_stopped(status) {
                me.publish_exit(&container_id, &p, pod.vm_pid).await;
            }
        });
    }

    /// Undoes a failed or finished container: its guest state, its mounts.
    async fn remove_container(&self, pod: &Pod, id: &str) {
        forget(pod, id, "").await;
        pod.dir.remove_container(id);
    }
}

/// Refuses a CRI container that asks for the node's namespaces, unless the
/// config lets such pods run with the VM's (`allow_host_namespaces`).
fn check_host_namespaces(bundle: &Bundle, allowed: bool) -> TtrpcResult<()> {
    let asked = bundle.host_namespaces();
    if asked.is_empty() || allowed {
        return Ok(());
    }
    Err(status(
        Code::INVALID_ARGUMENT,
        format!(
            "{} cannot be honoured: the pod runs in its own VM, which has no access to the \
             node's namespaces (set allow_host_namespaces = true in the podvisor config to \
             run such pods with the VM's own namespaces instead)",
            asked.join(", ")
        ),
    ))
}

/// Drops a container (or, with `exec_id`, an exec) from the guest; a dead
/// VM has nothing left to drop.
async fn forget(pod: &Pod, id: &str, exec_id: &str) {
    if pod.is_dead() {
        return;
    }
    let req = api::RemoveContainerRequest {
        container_id: id.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    };
    if let Err(e) = pod.agent.remove_container(ctx(), &req).await {
        tracing::debug!(container = id, exec = exec_id, "RemoveContainer: {e}");
    }
}

/// `ConfigPath` from containerd's runtime options
/// (runtimeoptions.v1.Options: type_url = 1, config_path = 2).
fn config_path(options: Option<&Any>) -> Option<PathBuf> {
    let any = options?;
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut input = CodedInputStream::from_bytes(&any.value);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 2 && wire == 2 {
            return input
                .read_string()
                .ok()
                .filter(|s| !s.is_empty())
                .map(PathBuf::from);
        }
        if input
            .skip_field(containerd_shim::protos::protobuf::rt::WireType::new(wire)?)
            .is_err()
        {
            return None;
        }
    }
    None
}

fn stats_to_metrics(s: &api::StatsContainerResponse) -> v2::Metrics {
    let cpu = s.cpu.clone().unwrap_or_default();
    let mem = s.memory.clone().unwrap_or_default();
    let pids = s.pids.clone().unwrap_or_default();
    v2::Metrics {
        cpu: Some(v2::CPUStat {
            usage_usec: cpu.usage_usec,
            user_usec: cpu.user_usec,
            system_usec: cpu.system_usec,
            nr_periods: cpu.nr_periods,
            nr_throttled: cpu.nr_throttled,
            throttled_usec: cpu.throttled_usec,
            ..Default::default()
        })
        .into(),
        memory: Some(v2::MemoryStat {
            usage: mem.usage_bytes,
            usage_limit: mem.limit_bytes,
            anon: mem.anon_bytes,
            file: mem.file_bytes,
            ..Default::default()
        })
        .into(),
        memory_events: Some(v2::MemoryEvents {
            oom: mem.oom_events,
            oom_kill: mem.oom_kill_events,
            ..Default::default()
        })
        .into(),
        pids: Some(v2::PidsStat {
            current: pids.current,
            limit: pids.limit,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

/// The shim's TTRPC service; containerd holds one per shim process.
pub struct Service(pub Arc<TaskService>);

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _: &TtrpcContext,
        req: shim_api::CreateTaskRequest,
    ) -> TtrpcResult<shim_api::CreateTaskResponse> {
        let svc = &self.0;
        if !req.checkpoint.is_empty() {
            return Err(status(
                Code::UNIMPLEMENTED,
                "checkpoint/restore is not supported",
            ));
        }
        let id = req.id.clone();
        if lock(&svc.containers).contains_key(&id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {id} already exists"),
            ));
        }
        let bundle = Bundle::load(Path::new(&req.bundle))
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;

        // The pod: booted by its first container, joined by the rest.
        let (pod, owns_pod) = {
            let mut slot = svc.pod.lock().await;
            match (&*slot, bundle.role()) {
                (Some(p), Role::Member { .. }) => (p.clone(), false),
                (None, Role::Member { sandbox_id }) => {
                    return Err(status(
                        Code::FAILED_PRECONDITION,
                        format!(
                        "the sandbox {sandbox_id} of container {id} is not running in this shim"
                    ),
                    ))
                }
                (Some(p), Role::Sandbox) => {
                    return Err(status(
                        Code::FAILED_PRECONDITION,
                        format!("this shim already runs sandbox {}", p.id),
                    ))
                }
                (None, Role::Sandbox) => {
                    let pod = svc.boot(&id, &bundle, req.options.as_ref()).await?;
                    *slot = Some(pod.clone());
                    (pod, true)
                }
            }
        };

        let made = async {
            if !owns_pod {
                check_host_namespaces(&bundle, pod.allow_host_namespaces)?;
            }
            let pod_ref = PodRef {
                sandbox_id: &pod.id,
                vm_pid: pod.vm_pid,
            };
            let spec = bundle
                .share(&id, &req.rootfs, &pod.dir.container(&id), &pod_ref)
                .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
            let stdio = StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            };
            let resp = pod
                .agent
                .create_container(
                    ctx(),
                    &api::CreateContainerRequest {
                        container_id: id.clone(),
                        oci_spec_json: spec,
                        stdio: Some(stdio.request()).into(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| agent_err("CreateContainer", e))?;
            let ports = resp.ports.clone().unwrap_or_default();
            let bridge = Bridge::connect(&pod.vsock, &ports, &stdio)
                .await
                .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
            Ok::<_, TtrpcError>(Proc::new("", stdio, bridge))
        }
        .await;
        let init = match made {
            Ok(p) => Arc::new(p),
            Err(e) => {
                svc.remove_container(&pod, &id).await;
                if owns_pod {
                    pod.shutdown().await;
                    *svc.pod.lock().await = None;
                }
                return Err(e);
            }
        };
        lock(&svc.containers).insert(
            id.clone(),
            Arc::new(Container {
                id: id.clone(),
                bundle: req.bundle.clone(),
                owns_pod,
                init,
                execs: Mutex::new(HashMap::new()),
            }),
        );
        svc.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(ev::TaskCreate {
                container_id: id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(ev::TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                })
                .into(),
                pid: pod.vm_pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(shim_api::CreateTaskResponse {
            pid: pod.vm_pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _: &TtrpcContext,
        req: shim_api::StartRequest,
    ) -> TtrpcResult<shim_api::StartResponse> {
        let svc = &self.0;
        let c = svc.container(&req.id)?;
        let p = c.proc(&req.exec_id)?;
        if p.state() != ProcState::Created {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("{} {} was already started", req.id, req.exec_id),
            ));
        }
        let pod = svc.pod().await?;
        pod.agent
            .start_container(
                ctx(),
                &api::StartContainerRequest {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| agent_err("StartContainer", e))?;
        p.set_running();
        svc.watch_exit(pod.clone(), req.id.clone(), p.clone());
        if req.exec_id.is_empty() {
            svc.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(ev::TaskStart {
                    container_id: req.id.clone(),
                    pid: pod.vm_pid,
                    ..Default::default()
                }),
            )
            .await;
        } else {
            svc.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(ev::TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid: pod.vm_pid,
                    ..Default::default()
                }),
            )
            .await;
        }
        Ok(shim_api::StartResponse {
            pid: pod.vm_pid,
            ..Default::default()
        })
    }

    async fn exec(
        &self,
        _: &TtrpcContext,
        req: shim_api::ExecProcessRequest,
    ) -> TtrpcResult<shim_api::Empty> {
        let svc = &self.0;
        let c = svc.container(&req.id)?;
        if lock(&c.execs).contains_key(&req.exec_id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("exec {} already exists", req.exec_id),
            ));
        }
        let pod = svc.pod().await?;
        let spec = req.spec.clone().unwrap_or_default();
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let resp = pod
            .agent
            .exec_process(
                ctx(),
                &api::ExecProcessRequest {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    process_json: spec.value,
                    stdio: Some(stdio.request()).into(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| agent_err("ExecProcess", e))?;
        let ports = resp.ports.clone().unwrap_or_default();
        let bridge = match Bridge::connect(&pod.vsock, &ports, &stdio).await {
            Ok(b) => b,
            Err(e) => {
                forget(&pod, &req.id, &req.exec_id).await;
                return Err(status(Code::INTERNAL, e.to_string()));
            }
        };
        lock(&c.execs).insert(
            req.exec_id.clone(),
            Arc::new(Proc::new(&req.exec_id, stdio, bridge)),
        );
        svc.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(ev::TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(shim_api::Empty::new())
    }

    async fn kill(
        &self,
        _: &TtrpcContext,
        req: shim_api::KillRequest,
    ) -> TtrpcResult<shim_api::Empty> {
        let svc = &self.0;
        let c = svc.container(&req.id)?;
        let p = c.proc(&req.exec_id)?;
        if matches!(p.state(), ProcState::Stopped { .. }) {
            return Err(status(
                Code::NOT_FOUND,
                format!("process {} {} already finished", req.id, req.exec_id),
            ));
        }
        let pod = svc.pod().await?;
        pod.agent
            .signal_process(
                ctx(),
                &api::SignalProcessRequest {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    signal: req.signal,
                    all: req.all,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| agent_err("SignalProcess", e))?;
        Ok(shim_api::Empty::new())
    }

    async fn wait(
        &self,
        _: &TtrpcContext,
        req: shim_api::WaitRequest,
    ) -> TtrpcResult<shim_api::WaitResponse> {
        let p = self.0.container(&req.id)?.proc(&req.exec_id)?;
        let (exit_status, at) = p.wait().await;
        Ok(shim_api::WaitResponse {
            exit_status,
            exited_at: Some(at).into(),
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _: &TtrpcContext,
        req: shim_api::StateRequest,
    ) -> TtrpcResult<shim_api::StateResponse> {
        let svc = &self.0;
        let c = svc.container(&req.id)?;
        let p = c.proc(&req.exec_id)?;
        let pid = svc
            .pod
            .lock()
            .await
            .as_ref()
            .map(|p| p.vm_pid)
            .unwrap_or_default();
        let mut resp = shim_api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid,
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        resp.status = match p.state() {
            ProcState::Created => Status::CREATED,
            ProcState::Running => Status::RUNNING,
            ProcState::Stopped { status, at } => {
                resp.exit_status = status;
                resp.exited_at = Some(at).into();
                Status::STOPPED
            }
        }
        .into();
        Ok(resp)
    }

    async fn delete(
        &self,
        _: &TtrpcContext,
        req: shim_api::DeleteRequest,
    ) -> TtrpcResult<shim_api::DeleteResponse> {
        let svc = &self.0;
        let c = svc.container(&req.id)?;
        let p = c.proc(&req.exec_id)?;
        if p.state() == ProcState::Running {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("{} {} is still running", req.id, req.exec_id),
            ));
        }
        let (exit_status, exited_at) = match p.state() {
            ProcState::Stopped { status, at } => (status, at),
            _ => (0, now()),
        };
        let pod = svc.pod().await?;
        if !req.exec_id.is_empty() {
            forget(&pod, &req.id, &req.exec_id).await;
            lock(&c.execs).remove(&req.exec_id);
        } else {
            svc.remove_container(&pod, &req.id).await;
            lock(&svc.containers).remove(&req.id);
            svc.publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(ev::TaskDelete {
                    container_id: req.id.clone(),
                    id: req.id.clone(),
                    pid: pod.vm_pid,
                    exit_status,
                    exited_at: Some(exited_at.clone()).into(),
                    ..Default::default()
                }),
            )
            .await;
            if c.owns_pod {
                pod.shutdown().await;
                *svc.pod.lock().await = None;
            }
        }
        Ok(shim_api::DeleteResponse {
            pid: pod.vm_pid,
            exit_status,
            exited_at: Some(exited_at).into(),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _: &TtrpcContext,
        req: shim_api::PidsRequest,
    ) -> TtrpcResult<shim_api::PidsResponse> {
        let svc = &self.0;
        svc.container(&req.id)?;
        let pod = svc.pod().await?;
        let resp = pod
            .agent
            .list_processes(
                ctx(),
                &api::ListProcessesRequest {
                    container_id: req.id.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| agent_err("ListProcesses", e))?;
        Ok(shim_api::PidsResponse {
            processes: resp
                .pids
                .into_iter()
                .map(|pid| containerd_shim::protos::api::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _: &TtrpcContext,
        req: shim_api::StatsRequest,
    ) -> TtrpcResult<shim_api::StatsResponse> {
        let svc = &self.0;
        svc.container(&req.id)?;
        let pod = svc.pod().await?;
        let s = pod
            .agent
            .stats_container(
                ctx(),
                &api::StatsContainerRequest {
                    container_id: req.id.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| agent_err("StatsContainer", e))?;
        let any = containerd_shim::util::convert_to_any(Box::new(stats_to_metrics(&s)))
            .map_err(|e| status(Code::INTERNAL, format!("encoding metrics: {e}")))?;
        Ok(shim_api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    async fn update(
        &self,
        _: &TtrpcContext,
        req: shim_api::UpdateTaskRequest,
    ) -> TtrpcResult<shim_api::Empty> {
        let svc = &self.0;
        svc.container(&req.id)?;
        let pod = svc.pod().await?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, "update without resources"))?;
        pod.agent
            .update_container(
                ctx(),
                &api::UpdateContainerRequest {
                    container_id: req.id.clone(),
                    resources_json: resources,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| agent_err("UpdateContainer", e))?;
        Ok(shim_api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _: &TtrpcContext,
        req: shim_api::ResizePtyRequest,
    ) -> TtrpcResult<shim_api::Empty> {
        let svc = &self.0;
        svc.container(&req.id)?.proc(&req.exec_id)?;
        let pod = svc.pod().await?;
        pod.agent
            .tty_win_resize(
                ctx(),
                &api::TtyWinResizeRequest {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    rows: req.height,
                    columns: req.width,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| agent_err("TtyWinResize", e))?;
        Ok(shim_api::Empty::new())
    }

    async fn close_io(
        &self,
        _: &TtrpcContext,
        req: shim_api::CloseIORequest,
    ) -> TtrpcResult<shim_api::Empty> {
        let svc = &self.0;
        let p = svc.container(&req.id)?.proc(&req.exec_id)?;
        if req.stdin {
            p.close_stdin();
            let pod = svc.pod().await?;
            pod.agent
                .close_stdin(
                    ctx(),
                    &api::CloseStdinRequest {
                        container_id: req.id.clone(),
                        exec_id: req.exec_id.clone(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| agent_err("CloseStdin", e))?;
        }
        Ok(shim_api::Empty::new())
    }

    async fn connect(
        &self,
        _: &TtrpcContext,
        req: shim_api::ConnectRequest,
    ) -> TtrpcResult<shim_api::ConnectResponse> {
        let svc = &self.0;
        svc.container(&req.id)?;
        let pid = svc.pod().await?.vm_pid;
        Ok(shim_api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _: &TtrpcContext,
        _: shim_api::ShutdownRequest,
    ) -> TtrpcResult<shim_api::Empty> {
        let svc = &self.0;
        if lock(&svc.containers).is_empty() && svc.pod.lock().await.is_none() {
            svc.exit.signal();
        }
        Ok(shim_api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::CodedOutputStream;

    fn options(type_url: &str, path: &str) -> Any {
        let mut value = Vec::new();
        {
            let mut out = CodedOutputStream::vec(&mut value);
            out.write_string(1, podvisor_names::RUNTIME_TYPE).unwrap();
            out.write_string(2, path).unwrap();
            out.write_bytes(3, b"").unwrap();
            out.flush().unwrap();
        }
        Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn config_path_comes_from_runtime_options() {
        let a = options("runtimeoptions.v1.Options", "/etc/podvisor/alt.toml");
        assert_eq!(
            config_path(Some(&a)),
            Some(PathBuf::from("/etc/podvisor/alt.toml"))
        );
        let other = options("containerd.runc.v1.Options", "/x");
        assert_eq!(config_path(Some(&other)), None);
        assert_eq!(config_path(None), None);
        let garbage = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: vec![0xff, 0xff, 0xff],
            ..Default::default()
        };
        assert_eq!(config_path(Some(&garbage)), None);
    }

    #[test]
    fn host_namespaces_are_refused_unless_the_config_allows_them() {
        let spec: oci_spec::runtime::Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2",
                "annotations":{"io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.sandbox-id":"s"},
                "linux":{"namespaces":[{"type":"ipc"},{"type":"mount"}]}}"#,
        )
        .unwrap();
        let bundle = Bundle {
            dir: "/b".into(),
            spec,
        };
        let e = check_host_namespaces(&bundle, false).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("hostNetwork, hostPID") && msg.contains("allow_host_namespaces"),
            "{msg}"
        );
        check_host_namespaces(&bundle, true).unwrap();
    }

    #[test]
    fn metrics_carry_the_guest_figures() {
        let s = api::StatsContainerResponse {
            memory: Some(api::MemoryStats {
                usage_bytes: 10,
                limit_bytes: 20,
                oom_kill_events: 1,
                ..Default::default()
            })
            .into(),
            pids: Some(api::PidsStats {
                current: 2,
                limit: 5,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let m = stats_to_metrics(&s);
        assert_eq!(m.memory.usage, 10);
        assert_eq!(m.memory.usage_limit, 20);
        assert_eq!(m.memory_events.oom_kill, 1);
        assert_eq!(m.pids.current, 2);
    }
}
