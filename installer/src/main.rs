//! `podvisor-install`: puts podvisor on a node (the Helm chart's DaemonSet
//! runs it with the host's root at /host) and takes it off again.
//!
//! install:   copy binaries + guest image, install the node config, register
//!            the runtime with containerd, restart containerd, label the node.
//! uninstall: the reverse, refusing while podvisor sandboxes still run.
//! daemon:    install, then wait for SIGTERM and uninstall (the DaemonSet).

use std::path::PathBuf;
use std::process::Command as Process;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use podvisor_installer::node::Node;

/// The label the RuntimeClass's node selector matches.
const LABEL: &str = "podvisor.io/runtime";

#[derive(Parser)]
#[command(
    name = "podvisor-install",
    version,
    about = "Installs podvisor on a Kubernetes node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Install(Opts),
    Uninstall {
        #[command(flatten)]
        opts: Opts,
        /// Uninstall even while podvisor sandboxes run (they cannot be
        /// cleaned up by containerd afterwards).
        #[arg(long)]
        force: bool,
    },
    /// Install, then uninstall on SIGTERM.
    Daemon(Opts),
}

#[derive(Args, Clone)]
struct Opts {
    /// The host's root directory as this process sees it.
    #[arg(long, default_value = "/")]
    host_root: PathBuf,
    /// The tree to install (make install's layout: bin/, share/guest/).
    #[arg(long, default_value = "/opt/podvisor")]
    source: PathBuf,
    /// The podvisor config to install as the node's /etc/podvisor/config.toml.
    #[arg(long)]
    node_config: PathBuf,
    /// containerd's config file, as a path on the host.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    containerd_config: PathBuf,
    /// How to restart containerd after changing its config: `systemd` runs
    /// `systemctl restart containerd` in the host's namespaces (needs hostPID).
    #[arg(long, value_enum, default_value_t = Restart::Systemd)]
    restart: Restart,
    /// The node to label (the DaemonSet passes its node's name); no label
    /// is set when absent.
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Restart {
    Systemd,
    None,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Install(opts) => install(&opts).await,
        Command::Uninstall { opts, force } => uninstall(&opts, force).await,
        Command::Daemon(opts) => {
            // Listening before installing: a SIGTERM during install still
            // leads to the uninstall.
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            install(&opts).await?;
            info!("installed; uninstalling on SIGTERM");
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            uninstall(&opts, false).await
        }
    }
}

fn node(opts: &Opts) -> Node {
    Node {
        host_root: opts.host_root.clone(),
        containerd_config: opts.containerd_config.clone(),
    }
}

async fn install(opts: &Opts) -> Result<()> {
    let config = std::fs::read_to_string(&opts.node_config)
        .with_context(|| format!("reading {}", opts.node_config.display()))?;
    let outcome = node(opts)
        .install(&opts.source, &config)
        .context("installing podvisor")?;
    info!(host_root = %opts.host_root.display(), "files installed");
    if outcome.containerd_config_changed {
        restart_containerd(opts)?;
    } else {
        info!(config = %opts.containerd_config.display(), "containerd already has the podvisor runtime");
    }
    label(opts, Some("true")).await
}

async fn uninstall(opts: &Opts, force: bool) -> Result<()> {
    // No new pods first, then the runtime goes.
    label(opts, None).await?;
    let outcome = node(opts)
        .uninstall(force)
        .context("uninstalling podvisor")?;
    if outcome.containerd_config_changed {
        restart_containerd(opts)?;
    }
    info!(host_root = %opts.host_root.display(), "uninstalled");
    Ok(())
}

fn restart_containerd(opts: &Opts) -> Result<()> {
    if opts.restart == Restart::None {
        info!("containerd's config changed; not restarting it (--restart none)");
        return Ok(());
    }
    let mut cmd = if opts.host_root == std::path::Path::new("/") {
        Process::new("systemctl")
    } else {
        let mut c = Process::new("nsenter");
        c.args([
            "--target",
            "1",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--pid",
            "--",
            "systemctl",
        ]);
        c
    };
    let status = cmd
        .args(["restart", "containerd"])
        .status()
        .context("running systemctl restart containerd")?;
    if !status.success() {
        bail!("systemctl restart containerd: {status}");
    }
    info!("containerd restarted");
    Ok(())
}

async fn label(opts: &Opts, value: Option<&str>) -> Result<()> {
    let Some(name) = &opts.node else {
        return Ok(());
    };
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API to label the node")?;
    let nodes: Api<KubeNode> = Api::all(client);
    let patch = json!({"metadata": {"labels": {LABEL: value}}});
    nodes
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("labelling node {name}"))?;
    info!(node = %name, label = LABEL, ?value, "node labelled");
    Ok(())
}
