//! `podvisor-pod-bench`: pod create to Running and pod delete to gone, a
//! podvisor pod beside a runc pod (the cluster's default handler) in the
//! same run, against `KUBECONFIG` (`make bench` brings up the local
//! cluster). Prints the median of a few pods of each and the backend and
//! accelerator podvisor's VMs ran on.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use podvisor_e2e::{Cluster, RUNTIME_CLASS, SLEEP};

const PODS: usize = 5;

struct Figures {
    running: Duration,
    gone: Duration,
    backend: String,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// What ran pod `name`'s VM on the node: podvisor-vmm, or QEMU and its
/// accelerator, read off the VM process's command line.
fn backend(c: &Cluster, name: &str) -> Result<String> {
    let id = c.sandbox_id(name)?;
    for (_, line) in c.processes_naming(&id)? {
        let argv: Vec<&str> = line.split_whitespace().collect();
        let Some(prog) = argv.first() else { continue };
        if prog.ends_with("podvisor-vmm") {
            return Ok("podvisor-vmm/kvm".into());
        }
        if prog.contains("qemu-system") {
            let accel = argv
                .iter()
                .position(|a| *a == "-accel")
                .and_then(|i| argv.get(i + 1))
                .map(|a| a.split(',').next().unwrap_or(a))
                .unwrap_or("?");
            return Ok(format!("qemu/{accel}"));
        }
    }
    bail!("no VM process for sandbox {id} on the node")
}

fn measure(c: &Cluster, runtime_class: Option<&str>) -> Result<Figures> {
    let mut running = Vec::new();
    let mut gone = Vec::new();
    let mut backend_seen = "runc".to_string();
    for i in 0..PODS {
        let name = format!("bench-{}-{i}", runtime_class.unwrap_or("runc"));
        let mut pod = c.pod(&name, "Always", &[("main", SLEEP)]);
        if runtime_class.is_none() {
            pod["spec"]
                .as_object_mut()
                .context("pod spec")?
                .remove("runtimeClassName");
        }
        let t = Instant::now();
        c.apply(&pod)?;
        c.kubectl(&[
            "wait",
            "--for=jsonpath={.status.phase}=Running",
            &format!("pod/{name}"),
            "--timeout=150s",
        ])
        .with_context(|| c.describe(&name))?;
        running.push(t.elapsed());
        if runtime_class.is_some() && i == 0 {
            backend_seen = backend(c, &name)?;
        }
        let t = Instant::now();
        c.kubectl(&["delete", "pod", &name, "--wait=true", "--timeout=150s"])?;
        gone.push(t.elapsed());
    }
    Ok(Figures {
        running: median(running),
        gone: median(gone),
        backend: backend_seen,
    })
}

fn row(name: &str, value: String, note: &str) {
    println!("{name:<66} {value:>11}  {note}");
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn main() -> Result<()> {
    let c = Cluster::from_env().map_err(anyhow::Error::msg)?;
    c.create_namespace()?;
    let ours = measure(&c, Some(RUNTIME_CLASS));
    let runc = measure(&c, None);
    let _ = c.delete_namespace();
    let ours = ours?;
    println!("pods through Kubernetes (kubectl apply/delete), median of {PODS}");
    row(
        &format!("pod create to Running, podvisor ({})", ours.backend),
        secs(ours.running),
        "Kata 0.39 s time-to-workload (CLH)",
    );
    row(
        &format!("pod delete to gone, podvisor ({})", ours.backend),
        secs(ours.gone),
        "-",
    );
    match runc {
        Ok(r) => {
            row(
                "  baseline: pod create to Running, runc",
                secs(r.running),
                &format!(
                    "podvisor/runc {:.1}x",
                    ours.running.as_secs_f64() / r.running.as_secs_f64()
                ),
            );
            row(
                "  baseline: pod delete to gone, runc",
                secs(r.gone),
                &format!(
                    "podvisor/runc {:.1}x",
                    ours.gone.as_secs_f64() / r.gone.as_secs_f64()
                ),
            );
        }
        Err(e) => println!("  baseline: a runc pod could not run on this node: {e:#}"),
    }
    Ok(())
}
