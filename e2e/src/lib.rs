//! The e2e suite's view of a cluster: `kubectl` against the kubeconfig it is
//! given (what a user types), and a shell on the node for what only the
//! node can tell (its kernel and boot id, what is left of a pod's VM):
//! run directly on the local cluster (`make test-e2e`), through
//! `PODVISOR_E2E_NODE_EXEC` (for example `docker exec <kind node>`) on kind.
//!
//! Environment:
//! - `KUBECONFIG`: the cluster; without it the suite reports its tests as
//!   ignored and says why.
//! - `KUBECTL`: the kubectl binary (default `kubectl` on PATH).
//! - `PODVISOR_E2E_NODE_EXEC`: command prefix that runs a command on the
//!   node (default: none, the node is this machine).
//! - `PODVISOR_E2E_IMAGE`: the busybox image the test pods run (default the
//!   one `cluster/up.sh` and the kind node image import).

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

pub const DEFAULT_IMAGE: &str = "docker.io/podvisor/busybox:latest";
/// The namespace the suite makes for its pods and removes at the end.
pub const NAMESPACE: &str = "podvisor-e2e";
pub use podvisor_names::RUNTIME_CLASS;

#[derive(Debug)]
pub struct Cluster {
    kubectl: String,
    node_exec: Vec<String>,
    pub image: String,
}

/// Runs `cmd` with `stdin` as its input, killing it after `secs`.
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>, secs: u64) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = reader(child.stdout.take().map(|s| Box::new(s) as _));
    let err = reader(child.stderr.take().map(|s| Box::new(s) as _));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown} did not finish within {secs}s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// stdout of a command that must succeed; its stderr in the error.
fn success(cmd: &mut Command, stdin: Option<&[u8]>, secs: u64) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = run(cmd, stdin, secs)?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Cluster {
    /// The cluster `KUBECONFIG` names, or why there is none.
    pub fn from_env() -> std::result::Result<Cluster, String> {
        if std::env::var_os("KUBECONFIG").is_none() {
            return Err(
                "KUBECONFIG is not set (make test-e2e brings up a local cluster \
                        and runs this suite against it)"
                    .into(),
            );
        }
        let node_exec = std::env::var("PODVISOR_E2E_NODE_EXEC")
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect();
        Ok(Cluster {
            kubectl: std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()),
            node_exec,
            image: std::env::var("PODVISOR_E2E_IMAGE").unwrap_or_else(|_| DEFAULT_IMAGE.into()),
        })
    }

    /// `kubectl ARGS` (not namespaced), as a command to run.
    pub fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.args(args);
        c
    }

    /// `kubectl -n podvisor-e2e ARGS`; its stdout, or an error with stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        success(
            &mut self.kubectl_cmd(&[&["-n", NAMESPACE], args].concat()),
            None,
            180,
        )
    }

    /// `kubectl apply -f -` of one object (JSON).
    pub fn apply(&self, object: &Value) -> Result<()> {
        let body = serde_json::to_vec(object)?;
        success(
            &mut self.kubectl_cmd(&["-n", NAMESPACE, "apply", "-f", "-"]),
            Some(&body),
            60,
        )
        .map(drop)
    }

    /// An object as JSON; `kind` may be cluster-scoped.
    pub fn get(&self, kind: &str, name: &str) -> Result<Value> {
        let text = self.kubectl(&["get", kind, name, "-o", "json"])?;
        serde_json::from_str(&text).with_context(|| format!("{kind}/{name}: not JSON"))
    }

    /// Waits until `pod` is Ready (all its containers running).
    pub fn wait_ready(&self, pod: &str) -> Result<()> {
        self.kubectl(&[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{pod}"),
            "--timeout=150s",
        ])
        .map(drop)
        .map_err(|e| anyhow!("{e}\n{}", self.describe(pod)))
    }

    /// `kubectl describe pod` for an error message, with the nodes' taints
    /// and conditions (a pod that never schedules says why only there).
    pub fn describe(&self, pod: &str) -> String {
        let pod = self
            .kubectl(&["describe", "pod", pod])
            .unwrap_or_else(|e| e.to_string());
        let nodes = self
            .kubectl(&[
                "get",
                "nodes",
                "-o",
                "jsonpath={range .items[*]}node {.metadata.name} taints: {.spec.taints}{\"\\n\"}\
                 {range .status.conditions[*]}  {.type}={.status} {.reason}: {.message}{\"\\n\"}{end}{end}",
            ])
            .unwrap_or_else(|e| e.to_string());
        format!("{pod}\n{nodes}")
    }

    /// Polls `check` every half second until it returns Some, for `secs`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        secs: u64,
        mut check: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut last = None;
        loop {
            match check() {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last = Some(e),
            }
            if Instant::now() > deadline {
                let why = last
                    .map(|e| format!(" (last error: {e:#})"))
                    .unwrap_or_default();
                bail!("{what}: not within {secs}s{why}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `kubectl exec POD -c CONTAINER -- CMD`, trimmed stdout.
    pub fn exec(&self, pod: &str, container: &str, cmd: &[&str]) -> Result<String> {
        let out = self.kubectl(&[&["exec", pod, "-c", container, "--"], cmd].concat())?;
        Ok(out.trim().to_string())
    }

    /// `sh -c SCRIPT` on the node; its stdout.
    pub fn node_sh(&self, script: &str) -> Result<String> {
        let mut argv: Vec<&str> = self.node_exec.iter().map(String::as_str).collect();
        argv.extend(["sh", "-c", script]);
        let mut c = Command::new(argv[0]);
        c.args(&argv[1..]);
        success(&mut c, None, 60).with_context(|| format!("on the node: {script}"))
    }

    /// The node's processes whose command line names `id`: (pid, command
    /// line with spaces between arguments).
    pub fn processes_naming(&self, id: &str) -> Result<Vec<(u32, String)>> {
        // The id goes into the script in two quoted halves and reaches grep
        // on its stdin, so that neither the shell nor grep match themselves.
        let (a, b) = id.split_at(id.len() / 2);
        let out = self.node_sh(&format!(
            "echo '{a}''{b}' | grep -l -F -f - /proc/[0-9]*/cmdline 2>/dev/null | \
             while read -r f; do p=${{f#/proc/}}; \
               echo \"${{p%/cmdline}} $(tr '\\0' ' ' < $f)\"; done; true"
        ))?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let (pid, cmd) = l.split_once(' ')?;
                let cmd = cmd.trim();
                // A process that ended while being read has no command line.
                (!cmd.is_empty()).then(|| Some((pid.parse().ok()?, cmd.to_string())))?
            })
            .collect())
    }

    /// The sandbox id containerd gave `pod` (crictl on the node).
    pub fn sandbox_id(&self, pod: &str) -> Result<String> {
        let id = self.node_sh(&format!(
            "crictl pods --namespace {NAMESPACE} --name '^{pod}$' --state ready -q"
        ))?;
        let id = id.trim();
        if id.is_empty() || id.contains('\n') {
            bail!("no single ready sandbox for pod {pod} on the node: {id:?}");
        }
        Ok(id.to_string())
    }

    /// A fresh namespace for the suite (an old one is removed first).
    pub fn create_namespace(&self) -> Result<()> {
        self.delete_namespace()?;
        success(
            &mut self.kubectl_cmd(&["create", "namespace", NAMESPACE]),
            None,
            60,
        )
        .map(drop)
    }

    pub fn delete_namespace(&self) -> Result<()> {
        success(
            &mut self.kubectl_cmd(&[
                "delete",
                "namespace",
                NAMESPACE,
                "--ignore-not-found",
                "--wait=true",
                "--timeout=300s",
            ]),
            None,
            320,
        )
        .map(drop)
    }

    /// A pod running `containers` (name, command) from the test image in a
    /// podvisor VM.
    pub fn pod(&self, name: &str, restart: &str, containers: &[(&str, &[&str])]) -> Value {
        let containers: Vec<Value> = containers
            .iter()
            .map(|(n, cmd)| {
                json!({"name": n, "image": self.image, "imagePullPolicy": "IfNotPresent",
                       "command": cmd})
            })
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "runtimeClassName": RUNTIME_CLASS,
                "restartPolicy": restart,
                "terminationGracePeriodSeconds": 20,
                "containers": containers
            }
        })
    }
}

/// A container command that runs until it is told to stop and stops at
/// once on SIGTERM (a plain `sleep` as PID 1 ignores it).
pub const SLEEP: &[&str] = &["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"];

/// Field `path` (a/b/c, array indexes as numbers) of `v`, as text.
pub fn field(v: &Value, path: &str) -> String {
    let mut cur = v;
    for part in path.split('/') {
        cur = match part.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[part],
        };
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}
