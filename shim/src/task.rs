//! containerd's Task API for one pod, thin over [`Container`] and
//! [`Pod`]: each handler finds the container, asks it (or the pod), and
//! publishes the task event; errors are [`ShimError`]s, mapped to ttrpc
//! codes in one place.
//!
//! The pod's first container (a CRI sandbox or a plain `ctr run`
//! container) boots the VM; later containers of the pod join it; deleting
//! the first one shuts the VM down. The task pid containerd sees is the
//! VM process's: killing it kills the pod, as with any VM runtime.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use containerd_shim::api::{self as shim_api, Status};
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::events::task as ev;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Task, TtrpcContext, TtrpcResult};

use crate::bundle::{Bundle, Role};
use crate::config::Config;
use crate::container::{check_host_namespaces, Container, Exit, OnExit};
use crate::convert::{config_path, stats_to_metrics};
use crate::error::{Result, ShimError};
use crate::pod::Pod;
use crate::process::{lock, Proc, ProcState};
use crate::stdio::StdioPaths;

/// containerd's Task service for this shim's pod: a cheap handle, cloned
/// into the exit watchers it starts.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let containers: Vec<String> = lock(&self.inner.containers).keys().cloned().collect();
        f.debug_struct("TaskService")
            .field("namespace", &self.inner.namespace)
            .field("containers", &containers)
            .finish_non_exhaustive()
    }
}

struct Inner {
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    pod: tokio::sync::Mutex<Option<Arc<Pod>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

impl TaskService {
    pub fn new(namespace: &str, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> TaskService {
        TaskService {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                publisher,
                exit,
                pod: tokio::sync::Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
            }),
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let i = &self.inner;
        if let Err(e) = i
            .publisher
            .publish(Default::default(), topic, &i.namespace, event)
            .await
        {
            tracing::warn!("publishing {topic}: {e}");
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.inner.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("container {id} not found")))
    }

    async fn pod(&self) -> Result<Arc<Pod>> {
        self.inner
            .pod
            .lock()
            .await
            .clone()
            .ok_or_else(|| ShimError::FailedPrecondition("this shim has no VM".into()))
    }

    /// The container and the pod it runs in.
    async fn find(&self, id: &str) -> Result<(Arc<Container>, Arc<Pod>)> {
        let c = self.container(id)?;
        Ok((c, self.pod().await?))
    }

    /// Boots the pod's VM for its first container, and watches it.
    async fn boot(&self, id: &str, bundle: &Bundle, options: Option<&Any>) -> Result<Arc<Pod>> {
        let config = Config::load(config_path(options).as_deref())?;
        check_host_namespaces(bundle, config.allow_host_namespaces)?;
        let sizing = config.vm_sizing(&bundle.annotations())?;
        let hostname = bundle.spec.hostname().clone().unwrap_or_default();
        let netns = crate::network::netns_of(&bundle.spec);
        let cgroups_path = bundle.cgroups_path();
        let pod = Arc::new(
            Pod::boot(
                id,
                &config,
                &sizing,
                &hostname,
                netns.as_deref(),
                cgroups_path.as_deref(),
            )
            .await?,
        );
        tracing::info!(
            sandbox = id,
            "VM up ({}, {} vCPU, {} MiB, pid {})",
            pod.describe,
            sizing.vcpus,
            sizing.memory_mib,
            pod.vm_pid
        );
        let (me, watched) = (self.clone(), pod.clone());
        tokio::spawn(async move {
            watched.exited().await;
            me.vm_died(&watched).await;
        });
        Ok(pod)
    }

    /// The pod for a new container: booted by a sandbox, joined by a
    /// member; with whether this container owns it.
    async fn pod_for(
        &self,
        id: &str,
        bundle: &Bundle,
        options: Option<&Any>,
    ) -> Result<(Arc<Pod>, bool)> {
        let mut slot = self.inner.pod.lock().await;
        match (&*slot, bundle.role()) {
            (Some(p), Role::Member { .. }) => {
                check_host_namespaces(bundle, p.allow_host_namespaces)?;
                Ok((p.clone(), false))
            }
            (None, Role::Member { sandbox_id }) => Err(ShimError::FailedPrecondition(format!(
                "the sandbox {sandbox_id} of container {id} is not running in this shim"
            ))),
            (Some(p), Role::Sandbox) => Err(ShimError::FailedPrecondition(format!(
                "this shim already runs sandbox {}",
                p.id
            ))),
            (None, Role::Sandbox) => {
                let pod = self.boot(id, bundle, options).await?;
                *slot = Some(pod.clone());
                Ok((pod, true))
            }
        }
    }

    /// Shuts the pod's VM down and forgets it.
    async fn end_pod(&self, pod: &Pod) {
        pod.shutdown().await;
        *self.inner.pod.lock().await = None;
    }

    /// The VM is gone: every process in it has exited.
    async fn vm_died(&self, pod: &Pod) {
        // Read before the exits go out: containerd's delete that follows
        // them removes the sandbox directory.
        let last_logs = pod.ended_unasked().then(|| pod.last_logs());
        let containers: Vec<_> = lock(&self.inner.containers).values().cloned().collect();
        for c in containers {
            for p in c.vm_died() {
                self.publish_exit(&c.id, &p, pod.vm_pid).await;
            }
        }
        let reason = pod.exit_reason().unwrap_or_default();
        match last_logs {
            Some(logs) => tracing::warn!(
                sandbox = pod.id,
                "the VM exited unasked ({reason}); its processes are reported dead; its last logs:\n{logs}"
            ),
            None => tracing::info!(sandbox = pod.id, "the VM exited ({reason})"),
        }
        pod.reap().await;
    }

    async fn publish_exit(&self, container_id: &str, p: &Proc, pid: u32) {
        let ProcState::Stopped { status, at } = p.state() else {
            return;
        };
        let id = if p.exec_id.is_empty() {
            container_id.to_string()
        } else {
            p.exec_id.clone()
        };
        let event = ev::TaskExit {
            container_id: container_id.to_string(),
            id,
            pid,
            exit_status: status,
            exited_at: Some(at).into(),
            ..Default::default()
        };
        self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event))
            .await;
    }

    /// What a started process's watcher does at its end: TaskOOM first
    /// (so CRI sees the reason before the exit), then TaskExit, once.
    fn on_exit(&self, container_id: &str, pid: u32) -> OnExit {
        let (me, id) = (self.clone(), container_id.to_string());
        Box::new(move |p: Arc<Proc>, exit: Exit| {
            Box::pin(async move {
                if exit.oom {
                    let event = ev::TaskOOM {
                        container_id: id.clone(),
                        ..Default::default()
                    };
                    me.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(event))
                        .await;
                }
                if p.set_stopped(exit.status) {
                    me.publish_exit(&id, &p, pid).await;
                }
            })
        })
    }

    async fn create(&self, req: shim_api::CreateTaskRequest) -> Result<u32> {
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unimplemented(
                "checkpoint/restore is not supported".into(),
            ));
        }
        let id = req.id.clone();
        if lock(&self.inner.containers).contains_key(&id) {
            return Err(ShimError::AlreadyExists(format!(
                "container {id} already exists"
            )));
        }
        let bundle = Bundle::load(Path::new(&req.bundle))?;
        let (pod, owns_pod) = self.pod_for(&id, &bundle, req.options.as_ref()).await?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let made = Container::create(
            pod.as_ref(),
            &id,
            &req.bundle,
            &bundle,
            &req.rootfs,
            stdio,
            owns_pod,
        )
        .await;
        let c = match made {
            Ok(c) => c,
            Err(e) => {
                if owns_pod {
                    self.end_pod(&pod).await;
                }
                return Err(e);
            }
        };
        lock(&self.inner.containers).insert(id.clone(), Arc::new(c));
        let event = ev::TaskCreate {
            container_id: id,
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
        };
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(pod.vm_pid)
    }

    async fn start(&self, req: &shim_api::StartRequest) -> Result<u32> {
        let (c, pod) = self.find(&req.id).await?;
        let on_exit = self.on_exit(&req.id, pod.vm_pid);
        c.start(pod.clone(), &req.exec_id, on_exit).await?;
        let (container_id, pid) = (req.id.clone(), pod.vm_pid);
        if req.exec_id.is_empty() {
            let event = ev::TaskStart {
                container_id,
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(event))
                .await;
        } else {
            let event = ev::TaskExecStarted {
                container_id,
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event))
                .await;
        }
        Ok(pid)
    }

    async fn exec(&self, req: shim_api::ExecProcessRequest) -> Result<()> {
        let (c, pod) = self.find(&req.id).await?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let process = req.spec.clone().unwrap_or_default().value;
        c.exec(pod.as_ref(), &req.exec_id, process, stdio).await?;
        let event = ev::TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(())
    }

    async fn state(&self, req: &shim_api::StateRequest) -> Result<shim_api::StateResponse> {
        let c = self.container(&req.id)?;
        let p = c.proc(&req.exec_id)?;
        let pid = self
            .inner
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

    async fn delete(&self, req: &shim_api::DeleteRequest) -> Result<shim_api::DeleteResponse> {
        let (c, pod) = self.find(&req.id).await?;
        let (exit_status, exited_at) = c.delete(pod.as_ref(), &req.exec_id).await?;
        if req.exec_id.is_empty() {
            lock(&self.inner.containers).remove(&req.id);
            let event = ev::TaskDelete {
                container_id: req.id.clone(),
                id: req.id.clone(),
                pid: pod.vm_pid,
                exit_status,
                exited_at: Some(exited_at.clone()).into(),
                ..Default::default()
            };
            self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event))
                .await;
            if c.owns_pod {
                self.end_pod(&pod).await;
            }
        }
        Ok(shim_api::DeleteResponse {
            pid: pod.vm_pid,
            exit_status,
            exited_at: Some(exited_at).into(),
            ..Default::default()
        })
    }

    async fn stats(&self, id: &str) -> Result<Any> {
        let (_, pod) = self.find(id).await?;
        let s = pod.stats(id).await?;
        containerd_shim::util::convert_to_any(Box::new(stats_to_metrics(&s)))
            .map_err(|e| ShimError::Internal(format!("encoding metrics: {e}")))
    }

    async fn update(&self, req: &shim_api::UpdateTaskRequest) -> Result<()> {
        let (_, pod) = self.find(&req.id).await?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| ShimError::InvalidArgument("update without resources".into()))?;
        pod.update(&req.id, resources).await
    }

    async fn close_io(&self, req: &shim_api::CloseIORequest) -> Result<()> {
        let (c, pod) = self.find(&req.id).await?;
        let p = c.proc(&req.exec_id)?;
        if req.stdin {
            p.close_stdin();
            pod.close_stdin(&req.id, &req.exec_id).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _: &TtrpcContext,
        req: shim_api::CreateTaskRequest,
    ) -> TtrpcResult<shim_api::CreateTaskResponse> {
        let pid = TaskService::create(self, req).await?;
        Ok(shim_api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _: &TtrpcContext,
        req: shim_api::StartRequest,
    ) -> TtrpcResult<shim_api::StartResponse> {
        let pid = TaskService::start(self, &req).await?;
        Ok(shim_api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn exec(
        &self,
        _: &TtrpcContext,
        req: shim_api::ExecProcessRequest,
    ) -> TtrpcResult<shim_api::Empty> {
        TaskService::exec(self, req).await?;
        Ok(shim_api::Empty::new())
    }

    async fn kill(
        &self,
        _: &TtrpcContext,
        req: shim_api::KillRequest,
    ) -> TtrpcResult<shim_api::Empty> {
        let (c, pod) = self.find(&req.id).await?;
        c.signal(pod.as_ref(), &req.exec_id, req.signal, req.all)
            .await?;
        Ok(shim_api::Empty::new())
    }

    async fn wait(
        &self,
        _: &TtrpcContext,
        req: shim_api::WaitRequest,
    ) -> TtrpcResult<shim_api::WaitResponse> {
        let p = self.container(&req.id)?.proc(&req.exec_id)?;
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
        Ok(TaskService::state(self, &req).await?)
    }

    async fn delete(
        &self,
        _: &TtrpcContext,
        req: shim_api::DeleteRequest,
    ) -> TtrpcResult<shim_api::DeleteResponse> {
        Ok(TaskService::delete(self, &req).await?)
    }

    async fn pids(
        &self,
        _: &TtrpcContext,
        req: shim_api::PidsRequest,
    ) -> TtrpcResult<shim_api::PidsResponse> {
        let (_, pod) = self.find(&req.id).await?;
        let processes = pod
            .pids(&req.id)
            .await?
            .into_iter()
            .map(|pid| containerd_shim::protos::api::ProcessInfo {
                pid,
                ..Default::default()
            })
            .collect();
        Ok(shim_api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _: &TtrpcContext,
        req: shim_api::StatsRequest,
    ) -> TtrpcResult<shim_api::StatsResponse> {
        let stats = TaskService::stats(self, &req.id).await?;
        Ok(shim_api::StatsResponse {
            stats: Some(stats).into(),
            ..Default::default()
        })
    }

    async fn update(
        &self,
        _: &TtrpcContext,
        req: shim_api::UpdateTaskRequest,
    ) -> TtrpcResult<shim_api::Empty> {
        TaskService::update(self, &req).await?;
        Ok(shim_api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _: &TtrpcContext,
        req: shim_api::ResizePtyRequest,
    ) -> TtrpcResult<shim_api::Empty> {
        let (c, pod) = self.find(&req.id).await?;
        c.proc(&req.exec_id)?;
        pod.resize_pty(&req.id, &req.exec_id, req.height, req.width)
            .await?;
        Ok(shim_api::Empty::new())
    }

    async fn close_io(
        &self,
        _: &TtrpcContext,
        req: shim_api::CloseIORequest,
    ) -> TtrpcResult<shim_api::Empty> {
        TaskService::close_io(self, &req).await?;
        Ok(shim_api::Empty::new())
    }

    async fn connect(
        &self,
        _: &TtrpcContext,
        req: shim_api::ConnectRequest,
    ) -> TtrpcResult<shim_api::ConnectResponse> {
        let (_, pod) = self.find(&req.id).await?;
        Ok(shim_api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pod.vm_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _: &TtrpcContext,
        _: shim_api::ShutdownRequest,
    ) -> TtrpcResult<shim_api::Empty> {
        let i = &self.inner;
        if lock(&i.containers).is_empty() && i.pod.lock().await.is_none() {
            i.exit.signal();
        }
        Ok(shim_api::Empty::new())
    }
}
