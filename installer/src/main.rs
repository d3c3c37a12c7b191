//! `podvisor-install`: puts podvisor on a node (the Helm chart's DaemonSet
//! runs it with the host's root at /host) and takes it off again.
//!
//! install:   copy binaries + guest image, install the node config, register
//!            the runtime with containerd, restart containerd, label the node.
//! uninstall: the reverse, refusing while podvisor sandboxes still run.
//! daemon:    install, then wait for SIGTERM and uninstall (the DaemonSet).
//! ready:     whether `daemon` has installed (its readiness probe).
//! remove:    deletes the DaemonSet, waits for its installers to uninstall
//!            (the chart's pre-delete hook).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use podvisor_installer::node::Node;
use podvisor_installer::restart;

/// The label the RuntimeClass's node selector matches.
const LABEL: &str = "podvisor.io/runtime";
/// How long containerd may take to stop and be started again.
const RESTART_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Parser)]
#[command(
    name = "podvisor-install",
    version,
    about = "Installs podvisor on a Kubernetes node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Where `daemon` marks that it has installed, in its own container
    /// (`ready` checks it).
    #[arg(long, global = true, default_value = "/tmp/podvisor-installed")]
    ready_file: PathBuf,
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
    /// Exits 0 once `daemon`, in this container, has installed (the
    /// DaemonSet's readiness probe).
    Ready,
    /// Deletes the installer DaemonSet and waits until each of its pods has
    /// uninstalled podvisor from its node and is gone (the chart's
    /// pre-delete hook: the installers need their RBAC meanwhile).
    Remove {
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        daemonset: String,
        /// How long the installers may take, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
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
    /// `systemctl restart containerd` in the host's namespaces; `pid-file`
    /// sends SIGTERM to the containerd `--containerd-pid-file` names and
    /// waits for its supervisor to start it again (both need hostPID);
    /// `none` leaves it to the operator.
    #[arg(long, value_enum, default_value_t = Restart::Systemd)]
    restart: Restart,
    /// containerd's pid file, as a path on the host (`--restart pid-file`).
    #[arg(long, required_if_eq("restart", "pid-file"))]
    containerd_pid_file: Option<PathBuf>,
    /// The node to label (the DaemonSet passes its node's name); no label
    /// is set when absent.
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Restart {
    Systemd,
    PidFile,
    None,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let ready = cli.ready_file.as_path();
    match cli.command {
        Command::Install(opts) => install(&opts).await,
        Command::Uninstall { opts, force } => uninstall(&opts, force).await,
        Command::Daemon(opts) => {
            // Listening before installing: a SIGTERM during install still
            // leads to the uninstall.
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            install(&opts).await?;
            ready
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(ready, b""))
                .with_context(|| format!("writing {}", ready.display()))?;
            info!("installed; uninstalling on SIGTERM");
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            // Not ready while the runtime goes.
            let _ = std::fs::remove_file(ready);
            info!("SIGTERM: uninstalling");
            uninstall(&opts, false).await
        }
        Command::Remove {
            namespace,
            daemonset,
            timeout,
        } => {
            remove(
                &namespace,
                &daemonset,
                std::time::Duration::from_secs(timeout),
            )
            .await
        }
        Command::Ready => {
            if !ready.exists() {
                bail!(
                    "podvisor is not installed yet ({} is absent)",
                    ready.display()
                );
            }
            Ok(())
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
        info!(config = %opts.containerd_config.display(), "podvisor runtime registered with containerd");
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
    info!(host_root = %opts.host_root.display(), "files removed");
    if outcome.containerd_config_changed {
        info!(config = %opts.containerd_config.display(), "podvisor runtime unregistered from containerd");
        restart_containerd(opts)?;
    }
    info!(host_root = %opts.host_root.display(), "uninstalled");
    Ok(())
}

fn restart_containerd(opts: &Opts) -> Result<()> {
    match (opts.restart, &opts.containerd_pid_file) {
        (Restart::None, _) => {
            info!("containerd's config changed; not restarting it (--restart none)");
            return Ok(());
        }
        (Restart::Systemd, _) => restart::systemd(&opts.host_root, "containerd")?,
        (Restart::PidFile, Some(file)) => {
            let host_file = opts.host_root.join(file.strip_prefix("/").unwrap_or(file));
            let pid = restart::pid_file(&host_file, "containerd", RESTART_TIMEOUT)?;
            info!(pid, "containerd started again by its supervisor");
        }
        (Restart::PidFile, None) => bail!("--restart pid-file needs --containerd-pid-file"),
    }
    info!("containerd restarted");
    Ok(())
}

async fn remove(namespace: &str, name: &str, timeout: std::time::Duration) -> Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let sets: Api<DaemonSet> = Api::namespaced(client, namespace);
    // Foreground: the DaemonSet stays until its pods are gone, each after
    // its installer's uninstall on SIGTERM.
    match sets.delete(name, &DeleteParams::foreground()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {
            info!(daemonset = name, "already gone");
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("deleting DaemonSet {namespace}/{name}")),
    }
    info!(
        daemonset = name,
        "deleting; waiting for each installer to uninstall"
    );
    let deadline = tokio::time::Instant::now() + timeout;
    while sets
        .get_opt(name)
        .await
        .with_context(|| format!("reading DaemonSet {namespace}/{name}"))?
        .is_some()
    {
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "DaemonSet {namespace}/{name} is still there after {timeout:?}: an installer \
                 has not uninstalled (its pod's log says why)"
            );
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    info!(daemonset = name, "every installer has uninstalled");
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
