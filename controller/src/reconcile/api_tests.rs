//! `apply` and `cleanup` against a mocked API server (kube-rs's tower-test
//! pattern, as controller-rs does): each test scripts the requests the
//! reconcile must make, in order, checks what they carry, and answers
//! them; a request off the script fails the test, and one the script
//! lacks leaves the reconcile waiting, which the timeout turns into a
//! failure. The real API server runs the same code in `make
//! test-controller`.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, Resource};
use serde_json::{json, Value};

use super::{apply, cleanup, Context, ReconcileError, LABEL_RESTARTS_BEFORE};
use crate::crd::VirtualMachine;
use crate::metrics::Metrics;
use crate::pod::Limits;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One request the reconcile must make, and the answer it gets.
struct Step {
    method: &'static str,
    path: String,
    /// Checks the request's JSON body (`Null` when it has none).
    check: fn(&Value),
    status: u16,
    reply: Value,
}

fn step(method: &'static str, path: &str, status: u16, reply: Value) -> Step {
    Step {
        method,
        path: path.to_string(),
        check: |_| {},
        status,
        reply,
    }
}

fn not_found(what: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "message": format!("{what} not found"), "reason": "NotFound", "code": 404})
}

const PODS: &str = "/api/v1/namespaces/ns/pods";
const POD: &str = "/api/v1/namespaces/ns/pods/web";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";
const STATUS: &str = "/apis/podvisor.io/v1alpha1/namespaces/ns/virtualmachines/web/status";

/// Answers `script` in order; returns once it is done.
async fn serve(mut handle: Handle, script: Vec<Step>) {
    for s in script {
        let (req, send) = handle
            .next_request()
            .await
            .expect("the reconcile ended early");
        let (method, path) = (req.method().to_string(), req.uri().path().to_string());
        assert_eq!(
            (method.as_str(), path.as_str()),
            (s.method, s.path.as_str()),
            "unexpected request (query {:?})",
            req.uri().query()
        );
        let body = req.into_body().collect_bytes().await.unwrap();
        let json = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap()
        };
        (s.check)(&json);
        let reply = serde_json::to_vec(&s.reply).unwrap();
        send.send_response(
            Response::builder()
                .status(s.status)
                .body(Body::from(reply))
                .unwrap(),
        );
    }
}

fn context() -> (Arc<Context>, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "ns");
    let reporter = Reporter {
        controller: "podvisor-controller".into(),
        instance: None,
    };
    let ctx = Context {
        client: client.clone(),
        recorder: Recorder::new(client, reporter),
        limits: Limits {
            max_cpus: 8,
            max_memory_mib: 8192,
            cpu_allocation_ratio: 10,
        },
        metrics: Arc::new(Metrics::default()),
    };
    (Arc::new(ctx), handle)
}

fn vm(strategy: &str) -> VirtualMachine {
    let spec =
        serde_json::from_value(json!({"image": "busybox", "runStrategy": strategy})).unwrap();
    let mut vm = VirtualMachine::new("web", spec);
    vm.meta_mut().namespace = Some("ns".into());
    vm.meta_mut().uid = Some("uid-1".into());
    vm.meta_mut().generation = Some(1);
    vm
}

/// A running pod of `vm`'s (owned by it), as the API server returns it.
fn owned_pod(vm: &VirtualMachine) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "ns", "uid": "pod-uid",
                     "ownerReferences": [vm.controller_owner_ref(&()).unwrap()]},
        "spec": {"nodeName": "node-1", "containers": [{"name": "vm", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.7"}
    })
}

/// Runs `f` against the mocked server answering `script`.
async fn run<T>(
    script: Vec<Step>,
    f: impl FnOnce(Arc<Context>) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>,
) -> T {
    let (ctx, handle) = context();
    let server = tokio::spawn(serve(handle, script));
    let out = tokio::time::timeout(Duration::from_secs(10), f(ctx))
        .await
        .expect("the reconcile made a request the script lacks, or hung");
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the reconcile skipped scripted requests")
        .unwrap();
    out
}

#[tokio::test]
async fn apply_creates_the_pod_then_reports_it_starting() {
    let vm = vm("Always");
    let mut created = owned_pod(&vm);
    created["status"] = json!({"phase": "Pending"});
    created["spec"]["nodeName"] = Value::Null;
    let script = vec![
        step("GET", POD, 404, not_found("pods \"web\"")),
        Step {
            check: |pod| {
                assert_eq!(pod["spec"]["runtimeClassName"], "podvisor");
                assert_eq!(pod["metadata"]["annotations"]["podvisor.io/vcpus"], "1");
                assert_eq!(pod["metadata"]["labels"][LABEL_RESTARTS_BEFORE], "0");
                assert_eq!(pod["metadata"]["ownerReferences"][0]["uid"], "uid-1");
            },
            ..step("POST", PODS, 201, created)
        },
        Step {
            check: |e| assert_eq!(e["reason"], "Started"),
            ..step("POST", EVENTS, 201, json!({}))
        },
        Step {
            check: |s| {
                assert_eq!(s["status"]["printableStatus"], "Starting");
                assert_eq!(s["status"]["phase"], "Pending");
                assert_eq!(s["status"]["conditions"][0]["status"], "False");
            },
            ..step(
                "PATCH",
                STATUS,
                200,
                serde_json::to_value(vm.clone()).unwrap(),
            )
        },
    ];
    let got = run(script, |ctx| {
        Box::pin(async move { apply(&vm, &ctx).await })
    })
    .await;
    assert!(got.is_ok(), "{got:?}");
}

#[tokio::test]
async fn apply_never_touches_a_pod_it_does_not_own() {
    let vm = vm("Always");
    let mut foreign = owned_pod(&vm);
    foreign["metadata"]["ownerReferences"] = json!([]);
    let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "message": "pods \"web\" already exists", "reason": "AlreadyExists",
                          "code": 409});
    let script = vec![
        step("GET", POD, 200, foreign),
        step("POST", PODS, 409, conflict),
        Step {
            check: |e| assert_eq!(e["reason"], "PodConflict"),
            ..step("POST", EVENTS, 201, json!({}))
        },
    ];
    let got = run(script, |ctx| {
        Box::pin(async move { apply(&vm, &ctx).await })
    })
    .await;
    assert!(
        matches!(got, Err(ReconcileError::PodConflict(_))),
        "{got:?}"
    );
}

#[tokio::test]
async fn apply_halted_deletes_the_pod_and_reports_it_stopping() {
    let vm = vm("Halted");
    let pod = owned_pod(&vm);
    let mut terminating = pod.clone();
    terminating["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
    let script = vec![
        step("GET", POD, 200, pod.clone()),
        step("DELETE", POD, 200, terminating.clone()),
        Step {
            check: |e| assert_eq!(e["reason"], "Stopping"),
            ..step("POST", EVENTS, 201, json!({}))
        },
        step("GET", POD, 200, terminating),
        Step {
            check: |s| assert_eq!(s["status"]["printableStatus"], "Stopping"),
            ..step(
                "PATCH",
                STATUS,
                200,
                serde_json::to_value(vm.clone()).unwrap(),
            )
        },
    ];
    let got = run(script, |ctx| {
        Box::pin(async move { apply(&vm, &ctx).await })
    })
    .await;
    assert!(got.is_ok(), "{got:?}");
}

#[tokio::test]
async fn cleanup_deletes_the_pod_and_waits_until_it_is_gone() {
    let vm = vm("Always");
    let pod = owned_pod(&vm);
    let empty = json!({"apiVersion": "v1", "kind": "PodList",
                       "metadata": {"resourceVersion": "7"}, "items": []});
    let script = vec![
        step("GET", POD, 200, pod.clone()),
        step("DELETE", POD, 200, pod),
        Step {
            check: |e| assert_eq!(e["reason"], "Stopping"),
            ..step("POST", EVENTS, 201, json!({}))
        },
        // The wait: a list that no longer holds the pod.
        step("GET", PODS, 200, empty),
    ];
    let got = run(script, |ctx| {
        Box::pin(async move { cleanup(&vm, &ctx).await })
    })
    .await;
    assert_eq!(got.ok(), Some(Action::await_change()));
}

#[tokio::test]
async fn cleanup_without_an_owned_pod_deletes_nothing() {
    let vm = vm("Always");
    let script = vec![step("GET", POD, 404, not_found("pods \"web\""))];
    let got = run(script, |ctx| {
        Box::pin(async move { cleanup(&vm, &ctx).await })
    })
    .await;
    assert_eq!(got.ok(), Some(Action::await_change()));
}
