//! Reconciling one VirtualMachine: decide from its spec, its last status and
//! its pod (if any) whether to create, delete or leave the pod (`plan`),
//! act, and write the status the pod implies (`observe`) by server-side
//! apply. Deletion goes through a finalizer that waits for the pod to go.
//! The pod's facts are gathered once ([`PodFacts`]); `api_tests.rs` runs
//! `apply` and `cleanup` against a mocked API server.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::crd::{Condition, Phase, RunStrategy, VirtualMachine, VirtualMachineStatus};
use crate::metrics::Metrics;
use crate::pod::{self, Limits, LABEL_RESTARTS_BEFORE};

pub const MANAGER: &str = "podvisor-controller";
pub const FINALIZER: &str = "podvisor.io/vm-pod";

/// How long a reconcile waits for a deleted pod before trying again later.
const POD_GONE_WAIT: Duration = Duration::from_secs(60);
/// Resync even without events (pods and VMs are watched; this is a backstop).
const RESYNC: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<ReconcileError>>),
    #[error("pod {0} is still terminating")]
    PodTerminating(String),
    #[error("pod {0} exists and is not this VirtualMachine's")]
    PodConflict(String),
    #[error("VirtualMachine has no namespace")]
    NoNamespace,
}

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// What to do with a VM's pod.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Create a pod; its label carries this many earlier restarts.
    Create {
        restarts_before: i32,
    },
    /// Delete the pod, with the reason for the event.
    Delete {
        reason: &'static str,
    },
    Nothing,
}

/// What the controller sees of a pod.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PodState {
    #[default]
    Absent,
    Terminating,
    Pending,
    /// Pending, not yet on a node, and made from an older spec.
    Stale,
    Running,
    Succeeded,
    Failed,
}

/// Everything the controller reads of a VM's pod, gathered in one place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodFacts {
    pub state: PodState,
    /// Made from another spec than the VM's current one.
    pub outdated: bool,
    pub name: Option<String>,
    pub node: Option<String>,
    pub ip: Option<String>,
    /// The restarts of the pods it replaced plus its container's.
    pub restarts: i32,
    /// Why its container waits (CrashLoopBackOff, ErrImagePull, ...).
    pub waiting_reason: Option<String>,
    /// The scheduler's message, while it cannot place the pod.
    pub unschedulable: Option<String>,
    pub ready: bool,
    /// What the pod says of its failure.
    pub failure: Option<String>,
}

impl PodFacts {
    /// The facts of `pod` (none: absent), compared with `desired`, the pod
    /// the VM's current spec makes (none: the spec is invalid).
    pub fn gather(pod: Option<&Pod>, desired: Option<&Pod>) -> PodFacts {
        let Some(pod) = pod else {
            return PodFacts::default();
        };
        let status = pod.status.as_ref();
        let containers = status
            .and_then(|s| s.container_statuses.as_deref())
            .unwrap_or_default();
        let conditions = status
            .and_then(|s| s.conditions.as_deref())
            .unwrap_or_default();
        let outdated = desired.is_some_and(|d| pod::outdated(pod, d));
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let state = if pod.metadata.deletion_timestamp.is_some() {
            PodState::Terminating
        } else {
            match status.and_then(|s| s.phase.as_deref()) {
                Some("Running") => PodState::Running,
                Some("Succeeded") => PodState::Succeeded,
                Some("Failed") => PodState::Failed,
                _ if node.is_none() && outdated => PodState::Stale,
                _ => PodState::Pending,
            }
        };
        let restarts_before = pod
            .labels()
            .get(LABEL_RESTARTS_BEFORE)
            .and_then(|v| v.parse::<i32>().ok())
            .unwrap_or(0);
        PodFacts {
            state,
            outdated,
            name: Some(pod.name_any()),
            node,
            ip: status.and_then(|s| s.pod_ip.clone()),
            restarts: restarts_before + containers.iter().map(|c| c.restart_count).sum::<i32>(),
            waiting_reason: containers
                .iter()
                .find_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone()),
            unschedulable: conditions
                .iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                .map(|c| c.message.clone().unwrap_or_default()),
            ready: conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            failure: status.and_then(|s| s.message.clone().or_else(|| s.reason.clone())),
        }
    }
}

/// The decision table. `valid` is whether the spec can become a pod; `last`
/// is the status the controller wrote before.
pub fn plan(
    strategy: RunStrategy,
    valid: bool,
    pod: PodState,
    last: &VirtualMachineStatus,
) -> Plan {
    use PodState::*;
    let finished = matches!(last.phase, Some(Phase::Succeeded | Phase::Failed));
    // Replacing a VM that ran counts as a restart; a first start, a start
    // after a stop, or replacing a pod that never ran does not.
    let replacing = matches!(
        last.phase,
        Some(Phase::Running | Phase::Succeeded | Phase::Failed)
    );
    let create = || {
        if !valid {
            return Plan::Nothing;
        }
        let restarts_before = if replacing { last.restarts + 1 } else { 0 };
        Plan::Create { restarts_before }
    };
    match (strategy, pod) {
        (_, Terminating) => Plan::Nothing,
        (_, Stale) => Plan::Delete {
            reason: "the spec changed before the VM's pod was scheduled",
        },
        (RunStrategy::Halted, Absent) => Plan::Nothing,
        (RunStrategy::Halted, _) => Plan::Delete {
            reason: "runStrategy is Halted",
        },
        (RunStrategy::Always, Succeeded | Failed) => Plan::Delete {
            reason: "the VM stopped and runStrategy is Always",
        },
        (RunStrategy::RerunOnFailure, Failed) => Plan::Delete {
            reason: "the VM failed and runStrategy is RerunOnFailure",
        },
        (RunStrategy::Always, Absent) => create(),
        (RunStrategy::RerunOnFailure, Absent) => {
            if last.phase == Some(Phase::Succeeded) {
                Plan::Nothing
            } else {
                create()
            }
        }
        (RunStrategy::Once, Absent) => {
            if finished {
                Plan::Nothing
            } else {
                create()
            }
        }
        _ => Plan::Nothing,
    }
}

/// How a VM stands, before it becomes conditions.
#[derive(Debug, PartialEq, Eq)]
struct Standing {
    phase: Phase,
    printable: String,
    reason: &'static str,
    message: String,
}

/// The VM's phase, printable status and Ready reason, from its pod.
fn standing(
    pod: &PodFacts,
    strategy: RunStrategy,
    invalid: Option<&str>,
    last: &VirtualMachineStatus,
) -> Standing {
    let s = |phase, printable: &str, reason, message: &str| Standing {
        phase,
        printable: printable.to_string(),
        reason,
        message: message.to_string(),
    };
    let standing = match pod.state {
        PodState::Absent => match (invalid, strategy, last.phase) {
            (Some(e), _, _) => s(Phase::Stopped, "InvalidSpec", "InvalidSpec", e),
            (None, RunStrategy::Halted, _) => s(
                Phase::Stopped,
                "Stopped",
                "Stopped",
                "runStrategy is Halted",
            ),
            (None, RunStrategy::Once, Some(p @ (Phase::Succeeded | Phase::Failed)))
            | (None, RunStrategy::RerunOnFailure, Some(p @ Phase::Succeeded)) => {
                s(p, &format!("{p:?}"), "Finished", "the VM ran to completion")
            }
            _ => s(
                Phase::Pending,
                "Starting",
                "Starting",
                "creating the VM's pod",
            ),
        },
        PodState::Terminating => s(
            last.phase.unwrap_or(Phase::Running),
            "Stopping",
            "Stopping",
            "the VM's pod is terminating",
        ),
        PodState::Pending | PodState::Stale => {
            let printable = match (&pod.unschedulable, &pod.waiting_reason) {
                (Some(_), _) => "Unschedulable",
                (None, Some(r)) if r != "ContainerCreating" => r,
                _ => "Starting",
            };
            let message = pod.unschedulable.as_deref().unwrap_or("the VM is booting");
            s(Phase::Pending, printable, "Starting", message)
        }
        PodState::Running => {
            let printable = match &pod.waiting_reason {
                Some(r) if !pod.ready => r,
                _ => "Running",
            };
            if pod.ready {
                s(
                    Phase::Running,
                    printable,
                    "Running",
                    "the VM's pod is ready",
                )
            } else {
                s(
                    Phase::Running,
                    printable,
                    "NotReady",
                    "the VM's pod is not ready",
                )
            }
        }
        PodState::Succeeded => s(
            Phase::Succeeded,
            "Succeeded",
            "Finished",
            "the VM ran to completion",
        ),
        PodState::Failed => s(
            Phase::Failed,
            "Failed",
            "Failed",
            pod.failure.as_deref().unwrap_or("the VM's workload failed"),
        ),
    };
    // An invalid spec is reported even while an older pod still runs.
    match invalid {
        Some(e) if pod.state != PodState::Absent => Standing {
            reason: "InvalidSpec",
            message: format!("{e}; the running VM keeps its earlier spec"),
            ..standing
        },
        _ => standing,
    }
}

/// Ready (and RestartRequired while the pod is from an older spec), each
/// keeping its transition time while its status stays.
fn conditions(
    pod: &PodFacts,
    standing: &Standing,
    invalid: Option<&str>,
    generation: Option<i64>,
    last: &VirtualMachineStatus,
) -> Vec<Condition> {
    let condition = |type_: &str, status: &str, reason: &str, message: String| {
        let previous = last.conditions.iter().find(|c| c.type_ == type_);
        let last_transition_time = match previous {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => Some(now()),
        };
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time,
            observed_generation: generation,
        }
    };
    let ready = pod.ready && pod.state == PodState::Running && invalid.is_none();
    let mut all = vec![condition(
        "Ready",
        if ready { "True" } else { "False" },
        standing.reason,
        standing.message.clone(),
    )];
    if pod.outdated && pod.state != PodState::Absent {
        all.push(condition(
            "RestartRequired",
            "True",
            "SpecChanged",
            "the spec changed since the VM started; it applies at the next start \
             (runStrategy Halted, then Always)"
                .into(),
        ));
    }
    all
}

/// The status the VM's pod (after acting on the plan) implies.
pub fn observe(
    vm: &VirtualMachine,
    pod: &PodFacts,
    invalid: Option<&str>,
    last: &VirtualMachineStatus,
) -> VirtualMachineStatus {
    let generation = vm.metadata.generation;
    let standing = standing(pod, vm.spec.run_strategy, invalid, last);
    let conditions = conditions(pod, &standing, invalid, generation, last);
    let present = pod.state != PodState::Absent;
    VirtualMachineStatus {
        printable_status: Some(standing.printable),
        phase: Some(standing.phase),
        conditions,
        pod: pod.name.clone(),
        node: pod.node.clone(),
        ip: pod.ip.clone(),
        restarts: if present { pod.restarts } else { last.restarts },
        observed_generation: generation,
    }
}

fn now() -> String {
    k8s_openapi::chrono::Utc::now().to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true)
}

/// The controller's reconcile function.
pub async fn reconcile(
    vm: Arc<VirtualMachine>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let _timer = ctx.metrics.reconcile_started();
    let ns = vm.namespace().ok_or(ReconcileError::NoNamespace)?;
    let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&vms, FINALIZER, vm, |event| async {
        match event {
            Finalizer::Apply(vm) => apply(&vm, &ctx).await,
            Finalizer::Cleanup(vm) => cleanup(&vm, &ctx).await,
        }
    })
    .await
    .map_err(|e| ReconcileError::Finalizer(Box::new(e)))
}

async fn apply(vm: &VirtualMachine, ctx: &Context) -> Result<Action, ReconcileError> {
    let ns = vm.namespace().ok_or(ReconcileError::NoNamespace)?;
    let name = vm.name_any();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let last = vm.status.clone().unwrap_or_default();
    // The pod the current spec makes, built once; none for an invalid spec.
    let (desired, invalid) = match pod::validate(vm, ctx.limits) {
        Ok(size) => (Some(pod::build(vm, size)), None),
        Err(e) => (None, Some(e.to_string())),
    };

    let mut current = owned_pod(&pods, &name, vm).await?;
    let facts = PodFacts::gather(current.as_ref(), desired.as_ref());
    match (
        plan(vm.spec.run_strategy, desired.is_some(), facts.state, &last),
        desired.as_ref(),
    ) {
        (Plan::Create { restarts_before }, Some(desired)) => {
            let new = pod::replacing(desired.clone(), restarts_before);
            match pods.create(&PostParams::default(), &new).await {
                Ok(p) => {
                    info!(vm = %name, namespace = %ns, "created pod");
                    let note = format!("created pod {name}");
                    publish(ctx, vm, EventType::Normal, "Started", note).await;
                    current = Some(p);
                }
                // A pod of that name that is not this VM's (owned_pod
                // looked just now): say so, and try again later.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let note = format!(
                        "pod {name} exists and is not this VirtualMachine's; \
                         delete or rename it"
                    );
                    publish(ctx, vm, EventType::Warning, "PodConflict", note).await;
                    return Err(ReconcileError::PodConflict(name));
                }
                Err(e) => return Err(e.into()),
            }
        }
        (Plan::Delete { reason }, _) => {
            info!(vm = %name, namespace = %ns, reason, "deleting pod");
            match pods.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    let note = format!("deleting pod {name}: {reason}");
                    publish(ctx, vm, EventType::Normal, "Stopping", note).await;
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            current = pods.get_opt(&name).await?;
        }
        _ => {}
    }
    let first_report = last
        .conditions
        .first()
        .is_none_or(|c| c.reason != "InvalidSpec");
    if let Some(e) = invalid.as_ref().filter(|_| first_report) {
        warn!(vm = %name, namespace = %ns, error = %e, "invalid spec");
        publish(ctx, vm, EventType::Warning, "InvalidSpec", e.clone()).await;
    }

    let facts = PodFacts::gather(current.as_ref(), desired.as_ref());
    let status = observe(vm, &facts, invalid.as_deref(), &last);
    if vm.status.as_ref() != Some(&status) {
        let patch = json!({
            "apiVersion": "podvisor.io/v1alpha1",
            "kind": "VirtualMachine",
            "status": status,
        });
        let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
        vms.patch_status(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    Ok(Action::requeue(RESYNC))
}

/// The pod named after `vm` if `vm` owns it (a pod of the same name that
/// someone else made is never touched).
async fn owned_pod(
    pods: &Api<Pod>,
    name: &str,
    vm: &VirtualMachine,
) -> Result<Option<Pod>, ReconcileError> {
    let pod = pods.get_opt(name).await?;
    let uid = vm.uid();
    Ok(pod.filter(|p| {
        p.owner_references()
            .iter()
            .any(|o| Some(&o.uid) == uid.as_ref() && o.controller == Some(true))
    }))
}

async fn cleanup(vm: &VirtualMachine, ctx: &Context) -> Result<Action, ReconcileError> {
    let ns = vm.namespace().ok_or(ReconcileError::NoNamespace)?;
    let name = vm.name_any();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(pod) = owned_pod(&pods, &name, vm).await? else {
        return Ok(Action::await_change());
    };
    info!(vm = %name, namespace = %ns, "VirtualMachine deleted; deleting its pod");
    match pods.delete(&name, &DeleteParams::default()).await {
        Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 404, .. })) => {}
        Err(e) => return Err(e.into()),
    }
    publish(
        ctx,
        vm,
        EventType::Normal,
        "Stopping",
        format!("deleting pod {name}: the VirtualMachine is being deleted"),
    )
    .await;
    let uid = pod.uid().unwrap_or_default();
    let gone = await_condition(pods, &name, conditions::is_deleted(&uid));
    match tokio::time::timeout(POD_GONE_WAIT, gone).await {
        Ok(Ok(_)) => Ok(Action::await_change()),
        _ => Err(ReconcileError::PodTerminating(name)),
    }
}

async fn publish(ctx: &Context, vm: &VirtualMachine, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &vm.object_ref(&())).await {
        warn!(error = %e, "publishing an event");
    }
}

/// Failed reconciles are retried with backoff by the controller; this one
/// counts them and says when.
pub fn error_policy(vm: Arc<VirtualMachine>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    warn!(vm = %vm.name_any(), error = %error, "reconcile failed; retrying");
    ctx.metrics.reconcile_failed();
    Action::requeue(Duration::from_secs(5))
}

#[cfg(test)]
mod api_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// The status of a VM whose pod is `pod`, `outdated` or not.
    fn observe(
        vm: &VirtualMachine,
        pod: Option<&Pod>,
        outdated: bool,
        invalid: Option<&str>,
        last: &VirtualMachineStatus,
    ) -> VirtualMachineStatus {
        let mut facts = PodFacts::gather(pod, None);
        facts.outdated = outdated && pod.is_some();
        super::observe(vm, &facts, invalid, last)
    }
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateWaiting, ContainerStatus, PodCondition, PodSpec, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use std::collections::BTreeMap;
    use PodState::*;
    use RunStrategy::*;

    fn last(phase: Option<Phase>, restarts: i32) -> VirtualMachineStatus {
        VirtualMachineStatus {
            phase,
            restarts,
            ..Default::default()
        }
    }

    #[test]
    fn always_creates_and_replaces() {
        assert_eq!(
            plan(Always, true, Absent, &last(None, 0)),
            Plan::Create { restarts_before: 0 }
        );
        assert_eq!(
            plan(Always, true, Running, &last(Some(Phase::Running), 0)),
            Plan::Nothing
        );
        assert_eq!(plan(Always, true, Pending, &last(None, 0)), Plan::Nothing);
        assert!(matches!(
            plan(Always, true, Failed, &last(Some(Phase::Running), 0)),
            Plan::Delete { .. }
        ));
        assert!(matches!(
            plan(Always, true, Succeeded, &last(Some(Phase::Running), 0)),
            Plan::Delete { .. }
        ));
        // The pod went away under a running VM: a replacement, one more restart.
        assert_eq!(
            plan(Always, true, Absent, &last(Some(Phase::Failed), 2)),
            Plan::Create { restarts_before: 3 }
        );
        // Started again after Halted: counting starts over.
        assert_eq!(
            plan(Always, true, Absent, &last(Some(Phase::Stopped), 2)),
            Plan::Create { restarts_before: 0 }
        );
    }

    #[test]
    fn halted_deletes_and_stays_stopped() {
        for state in [Pending, Running, Succeeded, Failed] {
            assert!(
                matches!(
                    plan(Halted, true, state, &last(None, 0)),
                    Plan::Delete { .. }
                ),
                "{state:?}"
            );
        }
        assert_eq!(
            plan(Halted, true, Absent, &last(Some(Phase::Running), 0)),
            Plan::Nothing
        );
        assert_eq!(
            plan(Halted, true, Terminating, &last(Some(Phase::Running), 0)),
            Plan::Nothing
        );
    }

    #[test]
    fn rerun_on_failure_stops_after_success() {
        assert!(matches!(
            plan(RerunOnFailure, true, Failed, &last(None, 0)),
            Plan::Delete { .. }
        ));
        assert_eq!(
            plan(RerunOnFailure, true, Succeeded, &last(None, 0)),
            Plan::Nothing
        );
        assert_eq!(
            plan(
                RerunOnFailure,
                true,
                Absent,
                &last(Some(Phase::Succeeded), 0)
            ),
            Plan::Nothing
        );
        assert_eq!(
            plan(RerunOnFailure, true, Absent, &last(Some(Phase::Failed), 0)),
            Plan::Create { restarts_before: 1 }
        );
    }

    #[test]
    fn once_runs_once() {
        assert_eq!(
            plan(Once, true, Absent, &last(None, 0)),
            Plan::Create { restarts_before: 0 }
        );
        assert_eq!(
            plan(Once, true, Failed, &last(Some(Phase::Running), 0)),
            Plan::Nothing
        );
        assert_eq!(
            plan(Once, true, Succeeded, &last(Some(Phase::Running), 0)),
            Plan::Nothing
        );
        assert_eq!(
            plan(Once, true, Absent, &last(Some(Phase::Failed), 0)),
            Plan::Nothing
        );
        assert_eq!(
            plan(Once, true, Absent, &last(Some(Phase::Succeeded), 0)),
            Plan::Nothing
        );
    }

    #[test]
    fn a_stale_unscheduled_pod_is_replaced() {
        for strategy in [Always, RerunOnFailure, Once, Halted] {
            assert!(matches!(
                plan(strategy, true, Stale, &last(Some(Phase::Pending), 0)),
                Plan::Delete { .. }
            ));
        }
    }

    #[test]
    fn a_changed_spec_under_a_running_vm_asks_for_a_restart() {
        let s = observe(
            &vm("Always"),
            Some(&pod("Running", true, None, 0)),
            true,
            None,
            &Default::default(),
        );
        let c = s.conditions.iter().find(|c| c.type_ == "RestartRequired");
        assert_eq!(c.map(|c| c.status.as_str()), Some("True"), "{s:?}");
        assert_eq!(s.printable_status.as_deref(), Some("Running"));
        let s = observe(&vm("Always"), None, true, None, &Default::default());
        assert!(s.conditions.iter().all(|c| c.type_ != "RestartRequired"));
    }

    #[test]
    fn an_unscheduled_pod_of_an_older_spec_is_stale() {
        let v = vm("Always");
        let desired = pod::build(&v, pod::validate(&v, limits()).unwrap());
        let mut p = pod("Pending", false, None, 0);
        // No template hash: made from another spec than `desired`.
        let facts = PodFacts::gather(Some(&p), Some(&desired));
        assert_eq!((facts.state, facts.outdated), (PodState::Pending, true));
        p.spec.as_mut().unwrap().node_name = None;
        assert_eq!(
            PodFacts::gather(Some(&p), Some(&desired)).state,
            PodState::Stale
        );
        // The same spec, or an invalid one (no desired pod), is not stale.
        let current = pod::build(&v, pod::validate(&v, limits()).unwrap());
        assert_eq!(
            PodFacts::gather(Some(&current), Some(&desired)).state,
            PodState::Pending
        );
        assert_eq!(PodFacts::gather(Some(&p), None).state, PodState::Pending);
        assert_eq!(PodFacts::gather(None, Some(&desired)), PodFacts::default());
    }

    fn limits() -> pod::Limits {
        pod::Limits {
            max_cpus: 8,
            max_memory_mib: 8192,
            cpu_allocation_ratio: 10,
        }
    }

    #[test]
    fn invalid_specs_create_nothing_and_never_wait_on_terminating_pods() {
        for s in [Always, RerunOnFailure, Once] {
            assert_eq!(plan(s, false, Absent, &last(None, 0)), Plan::Nothing);
            assert_eq!(
                plan(s, true, Terminating, &last(Some(Phase::Running), 0)),
                Plan::Nothing
            );
        }
    }

    fn vm(strategy: &str) -> VirtualMachine {
        let spec =
            serde_json::from_value(json!({"image": "busybox", "runStrategy": strategy})).unwrap();
        let mut vm = VirtualMachine::new("web", spec);
        vm.metadata.generation = Some(4);
        vm
    }

    fn pod(phase: &str, ready: bool, waiting: Option<&str>, restarts: i32) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("web".into()),
                labels: Some(BTreeMap::from([(
                    LABEL_RESTARTS_BEFORE.to_string(),
                    "2".to_string(),
                )])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-1".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: Some("10.0.0.7".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                container_statuses: Some(vec![ContainerStatus {
                    name: "vm".into(),
                    restart_count: restarts,
                    state: waiting.map(|w| ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some(w.into()),
                            message: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn running_pod_is_running_and_ready_with_node_ip_restarts() {
        let s = observe(
            &vm("Always"),
            Some(&pod("Running", true, None, 1)),
            false,
            None,
            &Default::default(),
        );
        assert_eq!(s.printable_status.as_deref(), Some("Running"));
        assert_eq!(s.phase, Some(Phase::Running));
        assert_eq!(
            (s.node.as_deref(), s.ip.as_deref()),
            (Some("node-1"), Some("10.0.0.7"))
        );
        assert_eq!(s.pod.as_deref(), Some("web"));
        assert_eq!(s.restarts, 3);
        assert_eq!(s.observed_generation, Some(4));
        let ready = &s.conditions[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status.as_str()),
            ("Ready", "True")
        );
        assert_eq!(ready.observed_generation, Some(4));
    }

    #[test]
    fn crash_loop_and_pull_errors_show_through() {
        let s = observe(
            &vm("Always"),
            Some(&pod("Running", false, Some("CrashLoopBackOff"), 4)),
            false,
            None,
            &Default::default(),
        );
        assert_eq!(s.printable_status.as_deref(), Some("CrashLoopBackOff"));
        assert_eq!(s.conditions[0].status, "False");
        let s = observe(
            &vm("Always"),
            Some(&pod("Pending", false, Some("ErrImagePull"), 0)),
            false,
            None,
            &Default::default(),
        );
        assert_eq!(s.printable_status.as_deref(), Some("ErrImagePull"));
        let s = observe(
            &vm("Always"),
            Some(&pod("Pending", false, Some("ContainerCreating"), 0)),
            false,
            None,
            &Default::default(),
        );
        assert_eq!(s.printable_status.as_deref(), Some("Starting"));
    }

    #[test]
    fn halted_without_pod_is_stopped_and_keeps_restarts() {
        let s = observe(
            &vm("Halted"),
            None,
            false,
            None,
            &last(Some(Phase::Running), 5),
        );
        assert_eq!(s.printable_status.as_deref(), Some("Stopped"));
        assert_eq!(s.phase, Some(Phase::Stopped));
        assert_eq!(s.restarts, 5);
        assert_eq!(
            (s.pod.as_ref(), s.node.as_ref(), s.ip.as_ref()),
            (None, None, None)
        );
        assert_eq!(s.conditions[0].status, "False");
    }

    #[test]
    fn terminating_pod_is_stopping() {
        let mut p = pod("Running", true, None, 0);
        p.metadata.deletion_timestamp = Some(Time(k8s_openapi::chrono::Utc::now()));
        let s = observe(
            &vm("Halted"),
            Some(&p),
            false,
            None,
            &last(Some(Phase::Running), 0),
        );
        assert_eq!(s.printable_status.as_deref(), Some("Stopping"));
        assert_eq!(s.conditions[0].status, "False");
    }

    #[test]
    fn invalid_spec_is_a_condition() {
        let s = observe(
            &vm("Always"),
            None,
            false,
            Some("cpus: 99 is more than this cluster's maximum of 16"),
            &Default::default(),
        );
        assert_eq!(s.printable_status.as_deref(), Some("InvalidSpec"));
        let c = &s.conditions[0];
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert!(c.message.contains("maximum of 16"), "{}", c.message);
        // With an older pod still running, the condition says so too.
        let s = observe(
            &vm("Always"),
            Some(&pod("Running", true, None, 0)),
            false,
            Some("memory: bad"),
            &Default::default(),
        );
        assert_eq!(s.conditions[0].reason, "InvalidSpec");
        assert_eq!(s.printable_status.as_deref(), Some("Running"));
    }

    #[test]
    fn finished_once_vm_stays_finished_without_pod() {
        let s = observe(
            &vm("Once"),
            None,
            false,
            None,
            &last(Some(Phase::Succeeded), 0),
        );
        assert_eq!(s.printable_status.as_deref(), Some("Succeeded"));
        let s = observe(
            &vm("Once"),
            Some(&pod("Failed", false, None, 0)),
            false,
            None,
            &Default::default(),
        );
        assert_eq!(s.phase, Some(Phase::Failed));
    }

    #[test]
    fn transition_time_only_moves_on_change() {
        let first = observe(
            &vm("Always"),
            Some(&pod("Running", true, None, 0)),
            false,
            None,
            &Default::default(),
        );
        let mut prior = first.clone();
        prior.conditions[0].last_transition_time = Some("2020-01-01T00:00:00Z".into());
        let again = observe(
            &vm("Always"),
            Some(&pod("Running", true, None, 0)),
            false,
            None,
            &prior,
        );
        assert_eq!(
            again.conditions[0].last_transition_time.as_deref(),
            Some("2020-01-01T00:00:00Z")
        );
        let changed = observe(
            &vm("Always"),
            Some(&pod("Running", false, None, 0)),
            false,
            None,
            &prior,
        );
        assert_ne!(
            changed.conditions[0].last_transition_time.as_deref(),
            Some("2020-01-01T00:00:00Z")
        );
    }
}
