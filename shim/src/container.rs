//! One container of the pod and its life: create (share the bundle, ask
//! the agent, bridge stdio; undo all of it on any failure), start (and
//! watch for the exit), exec, signal, delete. Written against [`Guest`],
//! what the lifecycle needs of the pod's VM: the real one is
//! [`Pod`](crate::pod::Pod); the unit tests use a fake.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use containerd_shim::protos::api::Mount as RootfsMount;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use podvisor_names::VM_DIED_EXIT_STATUS;

use crate::bundle::{Bundle, Shared};
use crate::error::{Result, ShimError};
use crate::process::{lock, now, Proc, ProcState};
use crate::stdio::{Bridge, StdioPaths};

/// Refuses a container that asks for the node's namespaces, unless the
/// config lets such pods run with the VM's (`allow_host_namespaces`).
pub fn check_host_namespaces(bundle: &Bundle, allowed: bool) -> Result<()> {
    let asked = bundle.host_namespaces();
    if asked.is_empty() || allowed {
        return Ok(());
    }
    Err(ShimError::InvalidArgument(format!(
        "{} cannot be honoured: the pod runs in its own VM, which has no access to the \
         node's namespaces (set allow_host_namespaces = true in the podvisor config to \
         run such pods with the VM's own namespaces instead)",
        asked.join(", ")
    )))
}

/// A process's end, as the guest reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Shell convention: the exit code, or 128 + the signal.
    pub status: u32,
    /// Killed by the OOM killer in its memory limit.
    pub oom: bool,
}

/// What the container lifecycle needs of a pod's VM.
#[async_trait]
pub trait Guest: Send + Sync {
    /// Mounts container `id`'s rootfs and volumes where the guest sees
    /// them; returns what the guest gets.
    fn share(&self, id: &str, bundle: &Bundle, rootfs: &[RootfsMount]) -> Result<Shared>;
    /// Unmounts and removes what [`Guest::share`] made.
    fn unshare(&self, id: &str);
    /// Creates the container in the guest, its stdio bridged.
    async fn create(&self, id: &str, shared: Shared, stdio: &StdioPaths) -> Result<Bridge>;
    /// Adds an exec to a container, its stdio bridged.
    async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: Vec<u8>,
        stdio: &StdioPaths,
    ) -> Result<Bridge>;
    async fn start(&self, id: &str, exec_id: &str) -> Result<()>;
    async fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()>;
    /// Resolves when the process ended; a VM that went away ends it too.
    async fn wait(&self, id: &str, exec_id: &str) -> Exit;
    /// Drops a container (or an exec) from the guest; best effort, as the
    /// VM may be gone.
    async fn remove(&self, id: &str, exec_id: &str);
}

/// What runs once a started process has ended (its output delivered):
/// the task service publishes the exit.
pub type OnExit =
    Box<dyn FnOnce(Arc<Proc>, Exit) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

pub struct Container {
    pub id: String,
    /// The bundle directory containerd gave (for State).
    pub bundle: String,
    /// This container booted the pod's VM: deleting it ends the pod.
    pub owns_pod: bool,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
}

impl Container {
    /// Creates container `id` in the guest: shares its bundle, asks the
    /// agent, bridges its stdio. On any failure what was done is undone
    /// (the guest's state, the mounts) and the error returned.
    pub async fn create(
        guest: &dyn Guest,
        id: &str,
        bundle_dir: &str,
        bundle: &Bundle,
        rootfs: &[RootfsMount],
        stdio: StdioPaths,
        owns_pod: bool,
    ) -> Result<Container> {
        let made = async {
            let shared = guest.share(id, bundle, rootfs)?;
            guest.create(id, shared, &stdio).await
        }
        .await;
        let bridge = match made {
            Ok(b) => b,
            Err(e) => {
                guest.remove(id, "").await;
                guest.unshare(id);
                return Err(e);
            }
        };
        Ok(Container {
            id: id.to_string(),
            bundle: bundle_dir.to_string(),
            owns_pod,
            init: Arc::new(Proc::new("", stdio, bridge)),
            execs: Mutex::new(HashMap::new()),
        })
    }

    /// The init (`exec_id` empty) or an exec.
    pub fn proc(&self, exec_id: &str) -> Result<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("exec {exec_id} not found in {}", self.id)))
    }

    /// Starts the init or an exec; `on_exit` runs once it has ended.
    pub async fn start(&self, guest: Arc<dyn Guest>, exec_id: &str, on_exit: OnExit) -> Result<()> {
        let p = self.proc(exec_id)?;
        if p.state() != ProcState::Created {
            return Err(ShimError::FailedPrecondition(format!(
                "{} {exec_id} was already started",
                self.id
            )));
        }
        guest.start(&self.id, exec_id).await?;
        p.set_running();
        let (id, exec_id) = (self.id.clone(), exec_id.to_string());
        tokio::spawn(async move {
            // No timeout: a process may run for months.
            let exit = guest.wait(&id, &exec_id).await;
            p.drain_output().await;
            on_exit(p, exit).await;
        });
        Ok(())
    }

    /// Adds exec `exec_id`; a stdio that cannot be bridged drops it again.
    pub async fn exec(
        &self,
        guest: &dyn Guest,
        exec_id: &str,
        process: Vec<u8>,
        stdio: StdioPaths,
    ) -> Result<()> {
        if lock(&self.execs).contains_key(exec_id) {
            return Err(ShimError::AlreadyExists(format!(
                "exec {exec_id} already exists"
            )));
        }
        let bridge = guest.exec(&self.id, exec_id, process, &stdio).await;
        let bridge = match bridge {
            Ok(b) => b,
            Err(e) => {
                guest.remove(&self.id, exec_id).await;
                return Err(e);
            }
        };
        lock(&self.execs).insert(
            exec_id.to_string(),
            Arc::new(Proc::new(exec_id, stdio, bridge)),
        );
        Ok(())
    }

    /// Signals a process that has not ended (one that has is NOT_FOUND, as
    /// runc says).
    pub async fn signal(
        &self,
        guest: &dyn Guest,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let p = self.proc(exec_id)?;
        if matches!(p.state(), ProcState::Stopped { .. }) {
            return Err(ShimError::NotFound(format!(
                "process {} {exec_id} already finished",
                self.id
            )));
        }
        match guest.signal(&self.id, exec_id, signal, all).await {
            // The process ended while the signal was on its way, and with it
            // the VM: its exit can reach containerd, whose delete of the
            // sandbox shuts the VM down, before the agent's answer does.
            // The signal has nothing left to do.
            Err(ShimError::Agent { source, .. })
                if !matches!(source, ttrpc::Error::RpcStatus(_))
                    && matches!(p.state(), ProcState::Stopped { .. }) =>
            {
                tracing::debug!(
                    container = self.id,
                    exec = exec_id,
                    "signal {signal}: the process ended and the VM went before the answer ({source})"
                );
                Ok(())
            }
            other => other,
        }
    }

    /// Deletes the init (the whole container: its guest state and mounts)
    /// or an exec, once it is not running; returns how it ended.
    pub async fn delete(&self, guest: &dyn Guest, exec_id: &str) -> Result<(u32, Timestamp)> {
        let p = self.proc(exec_id)?;
        let ended = match p.state() {
            ProcState::Running => {
                return Err(ShimError::FailedPrecondition(format!(
                    "{} {exec_id} is still running",
                    self.id
                )))
            }
            ProcState::Stopped { status, at } => (status, at),
            ProcState::Created => (0, now()),
        };
        guest.remove(&self.id, exec_id).await;
        if exec_id.is_empty() {
            guest.unshare(&self.id);
        } else {
            lock(&self.execs).remove(exec_id);
        }
        Ok(ended)
    }

    /// The VM is gone: every process not yet ended ends with the "VM died"
    /// status; returns those, for their exits to be published.
    pub fn vm_died(&self) -> Vec<Arc<Proc>> {
        std::iter::once(self.init.clone())
            .chain(lock(&self.execs).values().cloned())
            .filter(|p| p.set_stopped(u32::from(VM_DIED_EXIT_STATUS)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::Notify;

    /// A guest that records every call, fails the calls it is told to, and
    /// ends processes when the test says.
    #[derive(Default)]
    struct FakeGuest {
        calls: Mutex<Vec<String>>,
        fail: Mutex<Vec<&'static str>>,
        exit: Mutex<Option<Exit>>,
        ended: Notify,
        /// A process that ends, its VM gone, while a signal is on its way.
        ends_on_signal: Mutex<Option<Arc<Proc>>>,
    }

    impl FakeGuest {
        fn failing(call: &'static str) -> FakeGuest {
            let g = FakeGuest::default();
            lock(&g.fail).push(call);
            g
        }

        fn record(&self, call: &'static str, what: String) -> Result<()> {
            lock(&self.calls).push(format!("{call} {what}"));
            if lock(&self.fail).contains(&call) {
                let status = ttrpc::get_status(ttrpc::Code::INTERNAL, format!("{call} failed"));
                return Err(ShimError::Agent {
                    call,
                    source: ttrpc::Error::RpcStatus(status),
                });
            }
            Ok(())
        }

        fn calls(&self) -> Vec<String> {
            lock(&self.calls).clone()
        }

        /// Ends the process the fake's `wait` is waiting for.
        fn end(&self, exit: Exit) {
            *lock(&self.exit) = Some(exit);
            self.ended.notify_waiters();
        }
    }

    /// A bridge with nothing to copy (no stdio paths): no socket is dialled.
    async fn no_bridge() -> Result<Bridge> {
        let ports = podvisor_protocol::api::StdioPorts::default();
        Ok(Bridge::connect(
            std::path::Path::new("/nonexistent"),
            &ports,
            &StdioPaths::default(),
            ("test", ""),
        )
        .await?)
    }

    #[async_trait]
    impl Guest for FakeGuest {
        fn share(&self, id: &str, _: &Bundle, _: &[RootfsMount]) -> Result<Shared> {
            self.record("share", id.into())?;
            Ok(Shared {
                spec: b"{}".to_vec(),
                tmpfs: Vec::new(),
            })
        }
        fn unshare(&self, id: &str) {
            let _ = self.record("unshare", id.into());
        }
        async fn create(&self, id: &str, _: Shared, _: &StdioPaths) -> Result<Bridge> {
            self.record("create", id.into())?;
            no_bridge().await
        }
        async fn exec(
            &self,
            id: &str,
            exec_id: &str,
            _: Vec<u8>,
            _: &StdioPaths,
        ) -> Result<Bridge> {
            self.record("exec", format!("{id}/{exec_id}"))?;
            no_bridge().await
        }
        async fn start(&self, id: &str, exec_id: &str) -> Result<()> {
            self.record("start", format!("{id}/{exec_id}"))
        }
        async fn signal(&self, id: &str, exec_id: &str, signal: u32, _: bool) -> Result<()> {
            self.record("signal", format!("{id}/{exec_id} {signal}"))?;
            if let Some(p) = lock(&self.ends_on_signal).take() {
                p.set_stopped(137);
                return Err(ShimError::Agent {
                    call: "SignalProcess",
                    source: ttrpc::Error::Others("early eof".into()),
                });
            }
            Ok(())
        }
        async fn wait(&self, _: &str, _: &str) -> Exit {
            loop {
                let notified = self.ended.notified();
                if let Some(e) = *lock(&self.exit) {
                    return e;
                }
                notified.await;
            }
        }
        async fn remove(&self, id: &str, exec_id: &str) {
            let _ = self.record("remove", format!("{id}/{exec_id}"));
        }
    }

    fn bundle() -> Bundle {
        Bundle {
            dir: "/b".into(),
            spec: serde_json::from_str(r#"{"ociVersion":"1.0.2"}"#).unwrap(),
        }
    }

    async fn created(g: &FakeGuest) -> Container {
        Container::create(g, "c1", "/b", &bundle(), &[], StdioPaths::default(), true)
            .await
            .unwrap()
    }

    fn recorder() -> (OnExit, tokio::sync::mpsc::UnboundedReceiver<Exit>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let on_exit: OnExit = Box::new(move |p: Arc<Proc>, exit: Exit| {
            Box::pin(async move {
                p.set_stopped(exit.status);
                let _ = tx.send(exit);
            })
        });
        (on_exit, rx)
    }

    #[tokio::test]
    async fn a_failed_create_leaves_nothing_in_the_guest_or_on_the_host() {
        for failing in ["share", "create"] {
            let g = FakeGuest::failing(failing);
            let made =
                Container::create(&g, "c1", "/b", &bundle(), &[], StdioPaths::default(), false)
                    .await;
            let e = made.err().expect("create must fail");
            assert!(e.to_string().contains(failing), "{e}");
            let calls = g.calls();
            assert!(
                calls.ends_with(&["remove c1/".into(), "unshare c1".into()]),
                "{failing}: {calls:?}"
            );
        }
    }

    #[tokio::test]
    async fn start_runs_once_and_the_exit_is_reported_once() {
        let g = Arc::new(FakeGuest::default());
        let c = created(&g).await;
        let (on_exit, mut exits) = recorder();
        c.start(g.clone(), "", on_exit).await.unwrap();
        assert_eq!(c.proc("").unwrap().state(), ProcState::Running);
        let (again, _) = recorder();
        let e = c.start(g.clone(), "", again).await.unwrap_err();
        assert!(matches!(e, ShimError::FailedPrecondition(_)), "{e}");

        // Running: delete is refused, a signal goes to the guest.
        let e = c.delete(g.as_ref(), "").await.unwrap_err();
        assert!(matches!(e, ShimError::FailedPrecondition(_)), "{e}");
        c.signal(g.as_ref(), "", 15, false).await.unwrap();

        g.end(Exit {
            status: 143,
            oom: false,
        });
        let exit = tokio::time::timeout(Duration::from_secs(5), exits.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exit.status, 143);
        assert_eq!(c.proc("").unwrap().wait().await.0, 143);
        // Ended: a signal is NOT_FOUND, as runc says; delete removes it all.
        let e = c.signal(g.as_ref(), "", 9, false).await.unwrap_err();
        assert!(matches!(e, ShimError::NotFound(_)), "{e}");
        let (status, _) = c.delete(g.as_ref(), "").await.unwrap();
        assert_eq!(status, 143);
        let calls = g.calls();
        assert!(
            calls.ends_with(&["remove c1/".into(), "unshare c1".into()]),
            "{calls:?}"
        );
    }

    #[tokio::test]
    async fn a_signal_whose_process_ended_with_the_vm_before_the_answer_succeeds() {
        let g = Arc::new(FakeGuest::default());
        let c = created(&g).await;
        let (on_exit, _exits) = recorder();
        c.start(g.clone(), "", on_exit).await.unwrap();
        *lock(&g.ends_on_signal) = Some(c.proc("").unwrap());
        c.signal(g.as_ref(), "", 9, false).await.unwrap();

        // A lost VM under a process still running is an error, named.
        let c2 = created(&g).await;
        let (on_exit, _exits) = recorder();
        c2.start(g.clone(), "", on_exit).await.unwrap();
        *lock(&g.ends_on_signal) = Some(c.proc("").unwrap());
        let e = c2.signal(g.as_ref(), "", 9, false).await.unwrap_err();
        assert!(
            e.to_string()
                .starts_with("SignalProcess: the VM is not reachable"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn execs_are_named_once_and_dropped_when_their_stdio_fails() {
        let g = FakeGuest::default();
        let c = created(&g).await;
        c.exec(&g, "e1", b"{}".to_vec(), StdioPaths::default())
            .await
            .unwrap();
        let e = c
            .exec(&g, "e1", b"{}".to_vec(), StdioPaths::default())
            .await
            .unwrap_err();
        assert!(matches!(e, ShimError::AlreadyExists(_)), "{e}");
        assert!(c.proc("e2").is_err());

        // An exec the guest refuses is removed there and not kept here.
        lock(&g.fail).push("exec");
        assert!(c
            .exec(&g, "e2", b"{}".to_vec(), StdioPaths::default())
            .await
            .is_err());
        assert!(g.calls().contains(&"remove c1/e2".into()));
        assert!(c.proc("e2").is_err());

        // A created exec deletes with status 0; the container stays.
        let (status, _) = c.delete(&g, "e1").await.unwrap();
        assert_eq!(status, 0);
        assert!(c.proc("e1").is_err());
        assert!(!g.calls().contains(&"unshare c1".into()));
    }

    #[tokio::test]
    async fn a_dead_vm_ends_every_process_once() {
        let g = FakeGuest::default();
        let c = created(&g).await;
        c.exec(&g, "e1", b"{}".to_vec(), StdioPaths::default())
            .await
            .unwrap();
        let ended = c.vm_died();
        assert_eq!(ended.len(), 2);
        assert!(c.vm_died().is_empty(), "reported twice");
        let (status, _) = c.proc("e1").unwrap().wait().await;
        assert_eq!(status, u32::from(VM_DIED_EXIT_STATUS));
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
}
