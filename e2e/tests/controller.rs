//! The Kubernetes control plane of podvisor, as an operator installs it and
//! a user meets it: `helm install` of the chart on a node podvisor was never
//! put on (its installer DaemonSet installs podvisor there and restarts
//! containerd), VirtualMachines created, stopped, started, deleted and
//! refused, and `helm uninstall` leaving the node as it was. Runs against
//! `KUBECONFIG`; `make test-controller` brings up the local cluster for it
//! (PODVISOR_CLUSTER_BARE=1: no podvisor on the node).
//!
//! Needs, besides the e2e suite's settings: `HELM` (default helm),
//! `PODVISOR_CONTROLLER_IMAGE` and `PODVISOR_NODE_IMAGE` (images the node
//! has), `PODVISOR_CONTAINERD_CONFIG` (the node's containerd config) and
//! `PODVISOR_CONTAINERD_PID_FILE` (containerd's pid, which its supervisor
//! writes).

// An integration-test crate: every function here is test code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::tests_outside_test_module
)]

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, ensure, Context, Result};
use libtest_mimic::{Arguments, Failed, Trial};
use podvisor_e2e::{field, run, Cluster, NAMESPACE, SLEEP};
use serde_json::{json, Value};

const RELEASE: &str = "podvisor";
const SYSTEM: &str = "podvisor-system";
const LABEL: &str = "podvisor.io/runtime";

struct Env {
    c: Cluster,
    helm: String,
    containerd_config: String,
    containerd_pid_file: String,
    controller_image: String,
    node_image: String,
    node: String,
    repo: PathBuf,
    /// The controller's restart count once the install is done.
    controller_restarts: AtomicU64,
}

type Test = fn(&Env) -> Result<()>;

// In this order: the chart first, the uninstall last.
const TESTS: &[(&str, Test)] = &[
    ("chart_lints_and_renders", chart_renders),
    ("helm_install_puts_podvisor_on_the_node", helm_install),
    ("controller_serves_health_and_metrics", controller_health),
    ("virtual_machine_runs_in_a_vm", vm_runs),
    ("run_strategy_halted_stops_always_starts", halted_and_always),
    ("once_and_rerun_on_failure", once_and_rerun),
    ("invalid_specs_are_refused_or_reported", invalid_specs),
    ("deleting_a_vm_removes_its_pod_and_finalizer", delete_vm),
    ("helm_uninstall_leaves_the_node_as_it_was", uninstall),
];

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let env = setup();
    if let Err(why) = &env {
        eprintln!("controller: every test ignored: {why}");
    }
    if let Ok(e) = &env {
        if !args.list {
            if let Err(err) = e.c.create_namespace() {
                eprintln!("controller: cannot create namespace {NAMESPACE}: {err:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    let env = std::sync::Arc::new(env);
    let trials = TESTS
        .iter()
        .map(|&(name, test)| {
            let ignored = env.is_err();
            let env = env.clone();
            Trial::test(name, move || match env.as_ref() {
                Ok(e) => test(e).map_err(|err| Failed::from(format!("{err:#}"))),
                Err(_) => Ok(()),
            })
            .with_ignored_flag(ignored)
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if let Ok(e) = env.as_ref() {
        if !args.list {
            let _ = e.c.delete_namespace();
        }
    }
    conclusion.exit_code()
}

fn setup() -> std::result::Result<Env, String> {
    let c = Cluster::from_env()?;
    let var = |name: &str| {
        std::env::var(name).map_err(|_| {
            format!("{name} is not set (make test-controller sets it for the local cluster)")
        })
    };
    let node = c
        .kubectl(&["get", "nodes", "-o", "jsonpath={.items[0].metadata.name}"])
        .map_err(|e| format!("no node: {e:#}"))?;
    Ok(Env {
        helm: std::env::var("HELM").unwrap_or_else(|_| "helm".into()),
        containerd_config: var("PODVISOR_CONTAINERD_CONFIG")?,
        containerd_pid_file: var("PODVISOR_CONTAINERD_PID_FILE")?,
        controller_image: var("PODVISOR_CONTROLLER_IMAGE")?,
        node_image: var("PODVISOR_NODE_IMAGE")?,
        node,
        repo: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."),
        controller_restarts: AtomicU64::new(0),
        c,
    })
}

impl Env {
    fn chart(&self) -> String {
        self.repo.join("charts/podvisor").display().to_string()
    }

    /// `helm ARGS`; stdout, or an error with stderr.
    fn helm(&self, args: &[&str]) -> Result<String> {
        let out = run(Command::new(&self.helm).args(args), None, 300)?;
        if !out.status.success() {
            bail!(
                "helm {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The chart's values for this cluster: the images the node has, and
    /// the installer restarting containerd through its supervisor's pid
    /// file (this cluster's containerd is not a systemd unit).
    fn values(&self) -> Vec<String> {
        let image = |image: &str| {
            let (repo, tag) = image.rsplit_once(':').unwrap_or((image, "latest"));
            (repo.to_string(), tag.to_string())
        };
        let (controller_repo, controller_tag) = image(&self.controller_image);
        let (node_repo, node_tag) = image(&self.node_image);
        vec![
            format!("--set=controller.image.repository={controller_repo}"),
            format!("--set=controller.image.tag={controller_tag}"),
            format!("--set=installer.image.repository={node_repo}"),
            format!("--set=installer.image.tag={node_tag}"),
            "--set=installer.image.pullPolicy=Never".into(),
            format!(
                "--set=installer.containerdConfig={}",
                self.containerd_config
            ),
            "--set=installer.restart=pid-file".into(),
            format!(
                "--set=installer.containerdPidFile={}",
                self.containerd_pid_file
            ),
        ]
    }

    /// The node config the chart renders (its ConfigMap's config.toml).
    fn node_config(&self) -> Result<String> {
        let yaml = self.helm(&[
            "template",
            RELEASE,
            &self.chart(),
            "--kube-version=1.34.0",
            "--show-only=templates/node-config.yaml",
        ])?;
        let json = kubectl_client_json(&self.c, &yaml)?;
        Ok(field(&json, "data/config.toml"))
    }

    /// What the installer may touch on the node: each path's type, mode and
    /// owner, each file's checksum (or that it is absent); and the label.
    fn node_state(&self) -> Result<String> {
        let files = self.c.node_sh(&format!(
            "for p in {} /etc/podvisor /opt/podvisor /usr/local/bin/containerd-shim-podvisor-v2; do \
               if [ -e \"$p\" ] || [ -L \"$p\" ]; then \
                 find \"$p\" -printf '%y %m %u:%g %p -> %l\\n' | sort; \
                 find \"$p\" -type f -exec sha256sum {{}} + | sort -k2; \
               else echo \"absent $p\"; fi; done",
            self.containerd_config
        ))?;
        Ok(format!("{files}label {:?}\n", self.node_label()?))
    }

    /// containerd's pid now.
    fn containerd_pid(&self) -> Result<String> {
        Ok(self
            .c
            .node_sh(&format!("cat {}", self.containerd_pid_file))?
            .trim()
            .to_string())
    }

    /// The installer DaemonSet's pods.
    fn installer_pods(&self) -> Result<Vec<Value>> {
        let pods = self.c.kubectl(&[
            "-n",
            SYSTEM,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/component=installer",
            "-o",
            "json",
        ])?;
        let pods: Value = serde_json::from_str(&pods)?;
        Ok(pods["items"].as_array().cloned().unwrap_or_default())
    }

    fn vm(&self, name: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "podvisor.io/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": spec,
        })
    }

    fn pvm(&self, name: &str) -> Result<Value> {
        self.c.get("virtualmachine", name)
    }

    /// Waits until the VM's printableStatus is `want`; returns the VM.
    fn wait_status(&self, name: &str, want: &str, secs: u64) -> Result<Value> {
        self.c
            .wait_for(&format!("VirtualMachine {name} {want}"), secs, || {
                let vm = self.pvm(name)?;
                Ok((field(&vm, "status/printableStatus") == want).then_some(vm))
            })
            .map_err(|e| {
                let now = self
                    .pvm(name)
                    .map(|v| v["status"].to_string())
                    .unwrap_or_default();
                e.context(format!("status now: {now}"))
            })
    }

    fn pod_gone(&self, name: &str, secs: u64) -> Result<()> {
        self.c.wait_for(&format!("pod {name} gone"), secs, || {
            let out = self
                .c
                .kubectl(&["get", "pod", name, "--ignore-not-found", "-o", "name"])?;
            Ok(out.trim().is_empty().then_some(()))
        })
    }

    /// The (type, reason) of each event about VirtualMachine `name`.
    fn events(&self, name: &str) -> Result<Vec<(String, String)>> {
        let out = self.c.kubectl(&[
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.kind=VirtualMachine,involvedObject.name={name}"),
            "-o",
            "jsonpath={range .items[*]}{.type} {.reason}{\"\\n\"}{end}",
        ])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(t, r)| (t.to_string(), r.to_string()))
            .collect())
    }

    fn node_label(&self) -> Result<String> {
        let node = self.c.get("node", &self.node)?;
        Ok(node["metadata"]["labels"][LABEL]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }
}

/// A YAML document as JSON, through `kubectl create --dry-run=client`.
fn kubectl_client_json(c: &Cluster, yaml: &str) -> Result<Value> {
    let out = run(
        &mut c.kubectl_cmd(&["create", "--dry-run=client", "-o", "json", "-f", "-"]),
        Some(yaml.as_bytes()),
        60,
    )?;
    ensure!(
        out.status.success(),
        "kubectl create --dry-run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Where the suite keeps the node's state from before `helm install`.
fn saved_node_state() -> PathBuf {
    std::env::temp_dir().join("podvisor-node-state.before")
}

fn chart_renders(e: &Env) -> Result<()> {
    let chart = e.chart();
    e.helm(&["lint", "--strict", "--kube-version=1.34.0", &chart])?;
    let all = e.helm(&[
        "template",
        RELEASE,
        &chart,
        "--kube-version=1.34.0",
        "-n",
        SYSTEM,
    ])?;
    for kind in [
        "RuntimeClass",
        "Deployment",
        "DaemonSet",
        "ClusterRole",
        "ServiceAccount",
        "ConfigMap",
    ] {
        ensure!(
            all.contains(&format!("kind: {kind}\n")),
            "no {kind} rendered"
        );
    }
    ensure!(
        all.contains("--restart=systemd"),
        "the installer restarts a systemd containerd by default:\n{all}"
    );
    // The chart's RuntimeClass is deploy/runtimeclass.yaml.
    let rc = e.helm(&[
        "template",
        RELEASE,
        &chart,
        "--kube-version=1.34.0",
        "--show-only=templates/runtimeclass.yaml",
    ])?;
    let deploy = std::fs::read_to_string(e.repo.join("deploy/runtimeclass.yaml"))?;
    ensure!(
        kubectl_client_json(&e.c, &rc)? == kubectl_client_json(&e.c, &deploy)?,
        "chart RuntimeClass differs from deploy/runtimeclass.yaml:\n{rc}"
    );
    // The values schema refuses what the node could not run, and a restart
    // it cannot do.
    for (bad, names) in [
        ("--set=node.hypervisor=xen", "hypervisor"),
        ("--set=installer.restart=reboot", "restart"),
        (
            "--set=installer.containerdPidFile=run/containerd.pid",
            "containerdPidFile",
        ),
        (
            "--set=installer.restart=pid-file",
            "installer.containerdPidFile is needed",
        ),
    ] {
        let out = e.helm(&["template", RELEASE, &chart, "--kube-version=1.34.0", bad]);
        ensure!(
            out.as_ref()
                .is_err_and(|err| err.to_string().contains(names)),
            "{bad} was not refused naming {names}: {out:?}"
        );
    }
    let config = e.node_config()?;
    ensure!(
        config.contains("\"podvisor.io/vcpus\"") && config.contains("max_vcpus = 16"),
        "rendered node config: {config}"
    );
    Ok(())
}

fn helm_install(e: &Env) -> Result<()> {
    // A node podvisor was never put on.
    let before = e.node_state()?;
    ensure!(
        before.contains("absent /opt/podvisor") && before.contains("label \"\""),
        "the node has podvisor already:\n{before}"
    );
    let containerd_config = e.c.node_sh(&format!("cat {}", e.containerd_config))?;
    ensure!(
        !containerd_config.contains("io.containerd.podvisor.v2"),
        "containerd knows podvisor already:\n{containerd_config}"
    );
    std::fs::write(saved_node_state(), &before)?;
    let containerd_before = e.containerd_pid()?;

    // The chart brings its own RuntimeClass.
    e.c.kubectl(&["delete", "runtimeclass", "podvisor", "--ignore-not-found"])?;
    let chart = e.chart();
    let mut args = vec![
        "install",
        RELEASE,
        &chart,
        "-n",
        SYSTEM,
        "--create-namespace",
        "--wait",
        "--timeout=5m",
    ];
    let values = e.values();
    args.extend(values.iter().map(String::as_str));
    e.helm(&args)?;

    // The installer's pod is Ready (its probe: podvisor is installed) and
    // its log shows each step.
    let pods = e.installer_pods()?;
    ensure!(pods.len() == 1, "installer pods: {pods:?}");
    let pod = &pods[0];
    let ready = pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    ensure!(ready, "installer pod not Ready: {}", pod["status"]);
    ensure!(
        field(pod, "spec/containers/0/image") == e.node_image,
        "installer image: {}",
        pod["spec"]["containers"][0]["image"]
    );
    let log =
        e.c.kubectl(&["-n", SYSTEM, "logs", &field(pod, "metadata/name")])?;
    for step in [
        "files installed",
        "podvisor runtime registered with containerd",
        "containerd started again by its supervisor",
        "node labelled",
        "installed; uninstalling on SIGTERM",
    ] {
        ensure!(log.contains(step), "installer log lacks {step:?}:\n{log}");
    }

    // The node has podvisor, containerd was restarted and took it.
    ensure!(e.node_label()? == "true", "node not labelled:\n{log}");
    let installed = e.c.node_sh("cat /etc/podvisor/config.toml")?;
    ensure!(installed == e.node_config()?, "node config: {installed:?}");
    let same = e.c.node_sh(
        "cd /opt/podvisor && sha256sum bin/containerd-shim-podvisor-v2 bin/podvisor-vmm \
         share/guest/kernel share/guest/initramfs && readlink /usr/local/bin/containerd-shim-podvisor-v2",
    )?;
    ensure!(
        same.lines().count() == 5
            && same.ends_with("/opt/podvisor/bin/containerd-shim-podvisor-v2\n"),
        "installed files:\n{same}"
    );
    let config = e.c.node_sh(&format!("cat {}", e.containerd_config))?;
    ensure!(
        config.contains("runtime_type = \"io.containerd.podvisor.v2\""),
        "containerd config:\n{config}"
    );
    let containerd_after = e.containerd_pid()?;
    ensure!(
        containerd_after != containerd_before,
        "containerd was not restarted (pid {containerd_after})"
    );
    let info = e.c.node_sh("crictl info")?;
    ensure!(
        info.contains("io.containerd.podvisor.v2"),
        "containerd's CRI does not know podvisor after the restart"
    );

    let crd =
        e.c.get("crd", "virtualmachines.podvisor.io")
            .context("CRD not installed")?;
    ensure!(field(&crd, "spec/names/shortNames/0") == "pvm");
    let rc = e.c.get("runtimeclass", "podvisor")?;
    ensure!(
        rc["metadata"]["annotations"]["meta.helm.sh/release-name"] == RELEASE,
        "RuntimeClass not the release's: {rc}"
    );
    ensure!(
        field(&rc, "handler") == "podvisor",
        "RuntimeClass after helm install: {rc}"
    );
    let dep = e.c.kubectl(&[
        "-n",
        SYSTEM,
        "get",
        "deployment",
        "podvisor-controller",
        "-o",
        "json",
    ])?;
    let dep: Value = serde_json::from_str(&dep)?;
    ensure!(
        dep["status"]["availableReplicas"] == 1,
        "controller not available: {}",
        dep["status"]
    );
    // The installer restarts containerd while the kubelet may be starting
    // the controller; a start that restart cuts short never ran (no start
    // time) and the kubelet retries it. Any other restart is the
    // controller's own failure.
    let status = &controller_pod(e)?["status"]["containerStatuses"][0];
    let restarts = status["restartCount"].as_u64().unwrap_or_default();
    ensure!(
        restarts == 0 || field(status, "lastState/terminated/startedAt") == "1970-01-01T00:00:00Z",
        "the controller failed during the install: {status}"
    );
    e.controller_restarts.store(restarts, Ordering::SeqCst);
    Ok(())
}

fn controller_pod(e: &Env) -> Result<Value> {
    let pods = e.c.kubectl(&[
        "-n",
        SYSTEM,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/component=controller",
        "-o",
        "json",
    ])?;
    let pods: Value = serde_json::from_str(&pods)?;
    let pod = pods["items"][0].clone();
    ensure!(!pod.is_null(), "no controller pod");
    Ok(pod)
}

fn controller_health(e: &Env) -> Result<()> {
    let pod = controller_pod(e)?;
    ensure!(
        field(&pod, "spec/runtimeClassName").is_empty(),
        "the controller itself runs in a plain container"
    );
    let name = field(&pod, "metadata/name");
    let proxy = |path: &str| {
        e.c.kubectl(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/{SYSTEM}/pods/{name}:8080/proxy{path}"),
        ])
    };
    ensure!(proxy("/healthz")?.trim() == "ok");
    ensure!(proxy("/readyz")?.trim() == "ok");
    let metrics = proxy("/metrics")?;
    ensure!(
        metrics.contains("podvisor_controller_reconciles_total")
            && metrics.contains("podvisor_controller_reconcile_duration_seconds_bucket"),
        "metrics:\n{metrics}"
    );
    Ok(())
}

/// The guest kernel release of the node's guest image.
fn guest_kernel(e: &Env) -> Result<String> {
    let r =
        e.c.node_sh("sed -n 's/^kernel_release //p' /opt/podvisor/share/guest/manifest")?;
    Ok(r.trim().to_string())
}

fn vm_runs(e: &Env) -> Result<()> {
    e.c.apply(&e.vm(
        "web",
        json!({"image": e.c.image, "command": SLEEP, "cpus": 1, "memory": "384Mi",
               "kernelParams": "podvisor.e2e=42",
               "env": [{"name": "GREETING", "value": "hello from the VM"}]}),
    ))?;
    let vm = e.wait_status("web", "Running", 240)?;
    ensure!(
        field(&vm, "status/node") == e.node,
        "node: {}",
        vm["status"]
    );
    let pod = e.c.get("pod", "web")?;
    ensure!(
        field(&vm, "status/ip") == field(&pod, "status/podIP")
            && !field(&vm, "status/ip").is_empty(),
        "status IP {} vs pod IP {}",
        vm["status"],
        field(&pod, "status/podIP")
    );
    ensure!(field(&vm, "status/pod") == "web");
    ensure!(field(&vm, "status/conditions/0/type") == "Ready");
    ensure!(field(&vm, "status/conditions/0/status") == "True");
    ensure!(vm["status"]["observedGeneration"] == vm["metadata"]["generation"]);
    ensure!(field(&vm, "metadata/finalizers/0") == "podvisor.io/vm-pod");

    // kubectl get pvm shows it, with the printer columns.
    let table = e.c.kubectl(&["get", "pvm", "web"])?;
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure!(
        header == ["NAME", "STATUS", "READY", "RESTARTS", "NODE", "IP", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure!(
        row.len() == 7
            && row[..6]
                == [
                    "web",
                    "Running",
                    "True",
                    "0",
                    e.node.as_str(),
                    field(&vm, "status/ip").as_str()
                ],
        "{table}"
    );

    // The pod: runtime class, owner, and a VM of the asked size.
    ensure!(field(&pod, "spec/runtimeClassName") == "podvisor");
    ensure!(field(&pod, "metadata/ownerReferences/0/kind") == "VirtualMachine");
    ensure!(field(&pod, "metadata/ownerReferences/0/uid") == field(&vm, "metadata/uid"));
    let annotations = &pod["metadata"]["annotations"];
    ensure!(
        annotations["podvisor.io/vcpus"] == "1" && annotations["podvisor.io/memory-mib"] == "384",
        "pod annotations: {annotations}"
    );
    let requests = &pod["spec"]["containers"][0]["resources"]["requests"];
    ensure!(
        requests["cpu"] == "100m" && requests["memory"] == "384Mi",
        "requests: {requests}"
    );
    let uname = e.c.exec("web", "vm", &["uname", "-r"])?;
    ensure!(uname == guest_kernel(e)?, "uname -r in the VM: {uname}");
    ensure!(uname != e.c.node_sh("uname -r")?.trim());
    // Sized and booted as the spec says (the node default is 512 MiB).
    let nproc = e.c.exec("web", "vm", &["nproc"])?;
    ensure!(nproc == "1", "nproc in the VM: {nproc}");
    let cmdline = e.c.exec("web", "vm", &["cat", "/proc/cmdline"])?;
    ensure!(
        cmdline.split(' ').any(|p| p == "podvisor.e2e=42"),
        "guest cmdline: {cmdline}"
    );
    let mem_kib: u64 =
        e.c.exec(
            "web",
            "vm",
            &[
                "sh",
                "-c",
                "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo",
            ],
        )?
        .parse()
        .context("MemTotal")?;
    ensure!(
        (300 * 1024..=384 * 1024).contains(&mem_kib),
        "MemTotal {mem_kib} kB for a 384Mi VM"
    );
    let greeting = e.c.exec("web", "vm", &["sh", "-c", "echo $GREETING"])?;
    ensure!(greeting == "hello from the VM");

    let events = e.events("web")?;
    ensure!(
        events.iter().any(|(_, r)| r == "Started"),
        "events: {events:?}"
    );
    Ok(())
}

fn patch_strategy(e: &Env, name: &str, strategy: &str) -> Result<()> {
    e.c.kubectl(&[
        "patch",
        "pvm",
        name,
        "--type=merge",
        "-p",
        &json!({"spec": {"runStrategy": strategy}}).to_string(),
    ])
    .map(drop)
}

fn halted_and_always(e: &Env) -> Result<()> {
    let first = field(&e.c.get("pod", "web")?, "metadata/uid");
    patch_strategy(e, "web", "Halted")?;
    e.pod_gone("web", 120)?;
    let vm = e.wait_status("web", "Stopped", 60)?;
    ensure!(field(&vm, "status/phase") == "Stopped");
    ensure!(field(&vm, "status/conditions/0/status") == "False");
    ensure!(
        vm["status"]["pod"].is_null() && vm["status"]["ip"].is_null(),
        "{}",
        vm["status"]
    );

    patch_strategy(e, "web", "Always")?;
    let vm = e.wait_status("web", "Running", 240)?;
    let second = field(&e.c.get("pod", "web")?, "metadata/uid");
    ensure!(first != second, "the same pod came back");
    ensure!(
        vm["status"]["restarts"] == 0,
        "a start after a stop is no restart: {}",
        vm["status"]
    );
    ensure!(e.c.exec("web", "vm", &["uname", "-r"])? == guest_kernel(e)?);
    Ok(())
}

fn once_and_rerun(e: &Env) -> Result<()> {
    e.c.apply(&e.vm(
        "job",
        json!({"image": e.c.image, "command": ["sh", "-c", "echo done"], "runStrategy": "Once"}),
    ))?;
    let vm = e.wait_status("job", "Succeeded", 240)?;
    ensure!(field(&vm, "status/phase") == "Succeeded");
    // Not run again; its pod stays for its logs.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let pod = e.c.get("pod", "job")?;
    ensure!(field(&pod, "status/phase") == "Succeeded");
    ensure!(e.c.kubectl(&["logs", "job"])? == "done\n");
    ensure!(field(&e.pvm("job")?, "status/printableStatus") == "Succeeded");

    e.c.apply(&e.vm(
        "flaky",
        json!({"image": e.c.image, "command": ["sh", "-c", "exit 3"], "runStrategy": "RerunOnFailure"}),
    ))?;
    let vm = e.c.wait_for("flaky restarted", 240, || {
        let vm = e.pvm("flaky")?;
        Ok((vm["status"]["restarts"].as_i64().unwrap_or(0) >= 1).then_some(vm))
    })?;
    let pod = e.c.get("pod", "flaky")?;
    ensure!(field(&pod, "spec/restartPolicy") == "OnFailure");
    ensure!(field(&vm, "status/conditions/0/status") == "False");
    e.c.kubectl(&["delete", "pvm", "job", "flaky", "--timeout=180s"])?;
    e.pod_gone("job", 60)?;
    e.pod_gone("flaky", 60)
}

fn invalid_specs(e: &Env) -> Result<()> {
    // The schema refuses these outright.
    for (spec, says) in [
        (json!({"image": e.c.image, "cpus": -1}), "spec.cpus"),
        (
            json!({"image": e.c.image, "hypervisor": "xen"}),
            "spec.hypervisor",
        ),
        (
            json!({"image": e.c.image, "runStrategy": "Sometimes"}),
            "spec.runStrategy",
        ),
        (json!({"image": ""}), "spec.image"),
        (
            json!({"image": e.c.image, "volumes": [{"name": "v", "mountPath": "/v"}]}),
            "exactly one of",
        ),
    ] {
        let body = serde_json::to_vec(&e.vm("bad", spec.clone()))?;
        let out = run(
            &mut e.c.kubectl_cmd(&["-n", NAMESPACE, "apply", "-f", "-"]),
            Some(&body),
            60,
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "accepted: {spec}");
        ensure!(err.contains(says), "{spec}: {err}");
    }
    // Beyond the cluster's maximum: accepted by the schema, reported in status.
    e.c.apply(&e.vm("huge", json!({"image": e.c.image, "memory": "64Gi"})))?;
    let vm = e.wait_status("huge", "InvalidSpec", 60)?;
    let c = &vm["status"]["conditions"][0];
    ensure!(
        c["reason"] == "InvalidSpec" && c["status"] == "False",
        "{c}"
    );
    ensure!(
        field(c, "message").contains("65536 MiB is outside 128..=16384 MiB"),
        "{c}"
    );
    let pod =
        e.c.kubectl(&["get", "pod", "huge", "--ignore-not-found", "-o", "name"])?;
    ensure!(pod.trim().is_empty(), "a pod was made: {pod}");
    let events = e.events("huge")?;
    ensure!(
        events.contains(&("Warning".into(), "InvalidSpec".into())),
        "events: {events:?}"
    );
    // Fixing it starts it.
    e.c.kubectl(&["patch", "pvm", "huge", "--type=merge", "-p", r#"{"spec":{"memory":"256Mi","command":["sh","-c","trap 'exit 0' TERM; sleep 3600 & wait"]}}"#])?;
    e.wait_status("huge", "Running", 240)?;
    e.c.kubectl(&["delete", "pvm", "huge", "--timeout=180s"])?;
    // A pod of the VM's name that someone else made is never touched.
    e.c.apply(&json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "taken", "namespace": NAMESPACE},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
            "name": "main", "image": e.c.image, "imagePullPolicy": "IfNotPresent",
            "command": SLEEP}]}
    }))?;
    let uid = field(&e.c.get("pod", "taken")?, "metadata/uid");
    e.c.apply(&e.vm("taken", json!({"image": e.c.image, "command": SLEEP})))?;
    e.c.wait_for("a PodConflict event", 60, || {
        let events = e.events("taken")?;
        Ok(events
            .contains(&("Warning".into(), "PodConflict".into()))
            .then_some(()))
    })?;
    e.c.kubectl(&["delete", "pvm", "taken", "--timeout=60s"])?;
    let pod = e.c.get("pod", "taken")?;
    ensure!(
        field(&pod, "metadata/uid") == uid && pod["metadata"]["ownerReferences"].is_null(),
        "the foreign pod was touched: {}",
        pod["metadata"]
    );
    e.c.kubectl(&["delete", "pod", "taken", "--timeout=60s"])?;
    // And the controller never fell over.
    let pod = controller_pod(e)?;
    ensure!(
        pod["status"]["containerStatuses"][0]["restartCount"]
            == e.controller_restarts.load(Ordering::SeqCst),
        "controller restarted: {}",
        pod["status"]["containerStatuses"]
    );
    Ok(())
}

fn delete_vm(e: &Env) -> Result<()> {
    let sandbox = e.c.sandbox_id("web")?;
    e.c.kubectl(&["delete", "pvm", "web", "--wait=true", "--timeout=180s"])?;
    let left =
        e.c.kubectl(&["get", "pvm", "web", "--ignore-not-found", "-o", "name"])?;
    ensure!(left.trim().is_empty(), "VirtualMachine still there: {left}");
    e.pod_gone("web", 10)?;
    let procs = e.c.processes_naming(&sandbox)?;
    ensure!(procs.is_empty(), "VM processes left: {procs:?}");
    let state =
        e.c.node_sh(&format!("ls /run/podvisor/{sandbox} 2>&1 || true"))?;
    ensure!(state.contains("No such file"), "state left: {state}");
    Ok(())
}

fn uninstall(e: &Env) -> Result<()> {
    // VirtualMachines go while their controller still runs (their
    // finalizer needs it).
    e.c.kubectl(&["delete", "pvm", "--all", "--wait=true", "--timeout=180s"])?;
    e.helm(&["uninstall", RELEASE, "-n", SYSTEM, "--wait", "--timeout=3m"])?;
    e.c.wait_for("the release's pods gone", 180, || {
        let pods = e.c.kubectl(&[
            "-n",
            SYSTEM,
            "get",
            "pods",
            "-l",
            &format!("app.kubernetes.io/instance={RELEASE}"),
            "-o",
            "name",
        ])?;
        Ok(pods.trim().is_empty().then_some(()))
    })?;
    let left = e.c.kubectl(&[
        "-n",
        SYSTEM,
        "get",
        "deploy,pods,sa,configmap",
        "-o",
        "name",
    ])?;
    ensure!(
        left.lines()
            .all(|l| l.ends_with("/default") || l.ends_with("/kube-root-ca.crt")),
        "left after helm uninstall: {left}"
    );

    // The installer's pod uninstalled podvisor on its SIGTERM: the node is
    // as it was before helm install, byte for byte.
    let before = std::fs::read_to_string(saved_node_state())?;
    let after = e.node_state()?;
    ensure!(
        after == before,
        "the node differs after helm uninstall:\nbefore:\n{before}\nafter:\n{after}"
    );
    let info = e.c.node_sh("crictl info")?;
    ensure!(
        !info.contains("io.containerd.podvisor.v2"),
        "containerd still knows podvisor after the uninstall"
    );
    Ok(())
}
