//! `podvisor-controller`: runs the VirtualMachine controller (in-cluster or
//! with a kubeconfig), or prints the CRD (`podvisor-controller crd`).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::{Config, Controller, Error as ControllerError};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client};
use tracing::{debug, info, warn};

use podvisor_controller::crd::VirtualMachine;
use podvisor_controller::metrics::{self, Metrics};
use podvisor_controller::pod::{Limits, LABEL_VM};
use podvisor_controller::reconcile::{self, Context, MANAGER};

#[derive(Parser)]
#[command(version, about = "podvisor's VirtualMachine controller")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "PODVISOR_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Most vCPUs a VirtualMachine may ask for (the nodes' max_vcpus).
    #[arg(long, env = "PODVISOR_MAX_CPUS", default_value_t = 16)]
    max_cpus: u32,
    /// Most memory a VirtualMachine may ask for, in MiB (the nodes' max_memory_mib).
    #[arg(long, env = "PODVISOR_MAX_MEMORY_MIB", default_value_t = 16384)]
    max_memory_mib: u64,
    /// vCPUs per CPU a VM's pod requests from the scheduler (10: a 1-vCPU
    /// VM requests 100m; 1: a whole CPU per vCPU).
    #[arg(long, env = "PODVISOR_CPU_ALLOCATION_RATIO", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    cpu_allocation_ratio: u32,
    /// Reconciles run at once.
    #[arg(long, default_value_t = 8)]
    concurrency: u16,
}

#[derive(Subcommand)]
enum Command {
    /// Print the VirtualMachine CRD as YAML.
    Crd,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(Command::Crd) = args.command {
        print!("{}", podvisor_controller::crd_yaml()?);
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();

    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::default());
    tokio::spawn({
        let metrics = metrics.clone();
        let addr = args.metrics_addr;
        async move {
            if let Err(e) = metrics::serve(addr, metrics).await {
                warn!(%addr, error = %e, "metrics endpoint stopped");
            }
        }
    });

    let reporter = Reporter {
        controller: MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        limits: Limits {
            max_cpus: args.max_cpus,
            max_memory_mib: args.max_memory_mib,
            cpu_allocation_ratio: args.cpu_allocation_ratio,
        },
        metrics: metrics.clone(),
    });
    let vms: Api<VirtualMachine> = Api::all(client.clone());
    let pods: Api<Pod> = Api::all(client.clone());
    let controller = Controller::new(vms, watcher::Config::default())
        .owns(pods, watcher::Config::default().labels(LABEL_VM))
        .with_config(Config::default().concurrency(args.concurrency))
        .shutdown_on_signal();
    let store = controller.store();
    tokio::spawn(async move {
        // Polled again each second: kube-runtime's readiness wakes only
        // its last waiter, and the controller waits on it too.
        loop {
            match tokio::time::timeout(Duration::from_secs(1), store.wait_until_ready()).await {
                Ok(Ok(())) => break,
                Ok(Err(_)) => return,
                Err(_) => continue,
            }
        }
        metrics.ready.store(true, Ordering::Relaxed);
        info!("caches synced; reconciling");
    });
    info!(
        max_cpus = args.max_cpus,
        max_memory_mib = args.max_memory_mib,
        "starting"
    );
    controller
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            match result {
                // A VirtualMachine deleted while queued: nothing to do.
                Err(ControllerError::ObjectNotFound(obj)) => debug!(%obj, "gone"),
                Err(e) => warn!(error = %e, "reconcile"),
                Ok(_) => {}
            }
        })
        .await;
    info!("stopped");
    Ok(())
}
