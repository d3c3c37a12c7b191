//! Hypervisor backends: one trait, one module per backend.
//!
//! A backend turns a [`VmSpec`] into a [`RunningVm`]: the VM process and
//! its helpers (vsock, virtio-fs), each a supervised child, plus the
//! hybrid-vsock socket the agent is reached through. Everything above this
//! module (the sandbox, the task service) sees only that.
//!
//! - [`vmm`]: the in-tree VMM (`podvisor-vmm`), where the probe finds KVM
//!   runs guest code at hardware speed.
//! - [`qemu`]: QEMU `-M q35`, KVM when the probe finds it fast, TCG
//!   otherwise, vsock through `vhost-device-vsock`.
//!
//! Both share the guest's files through virtiofsd ([`start_virtiofsd`]).

pub mod qemu;
pub mod vmm;

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};

use crate::config::{HypervisorKind, Paths};

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("starting {name} ({program}): {source}")]
    Spawn {
        name: &'static str,
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("{name} exited ({status}) before it was ready; see {log}")]
    EarlyExit {
        name: &'static str,
        status: String,
        log: PathBuf,
    },
    #[error("{name} did not create {path} within {after:?}")]
    NotReady {
        name: &'static str,
        path: PathBuf,
        after: Duration,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// What a VM is made of.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Appended to the base kernel command line.
    pub kernel_params: String,
    /// Where sockets and logs go (console.log, <helper>.log).
    pub dir: PathBuf,
    /// The hybrid-vsock UDS to expose (the caller may listen on
    /// `<vsock>_<port>` for guest-initiated connections before launch).
    pub vsock: PathBuf,
    /// Shared with the guest as virtio-fs tag `podvisor`.
    pub shared_dir: PathBuf,
    /// virtio-net devices, each on an existing tap.
    pub net: Vec<NetDevice>,
    /// The network namespace the VM process runs in (where its taps are).
    pub netns: Option<PathBuf>,
}

/// Makes `cmd` start in the network namespace `netns`.
pub(crate) fn run_in_netns(cmd: &mut Command, netns: Option<&Path>) -> Result<(), HypervisorError> {
    let Some(netns) = netns else { return Ok(()) };
    let ns: std::os::fd::OwnedFd = std::fs::File::open(netns)
        .map_err(|source| HypervisorError::Io {
            what: format!("opening network namespace {}", netns.display()),
            source,
        })?
        .into();
    // SAFETY: setns(2) is async-signal-safe; the closure owns the fd.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// A guest NIC: the host tap it is attached to and the MAC the guest sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDevice {
    pub tap: String,
    pub mac: String,
}

#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Backend and acceleration, for logs and figures ("qemu/tcg").
    fn describe(&self) -> String;

    /// Starts the VM and its helpers; returns once they run (not once the
    /// guest has booted: dial the agent for that).
    async fn launch(&self, spec: &VmSpec) -> Result<RunningVm, HypervisorError>;
}

/// The backend for `kind`, with the reason for the choice. `auto` runs the
/// KVM probe: the in-tree VMM where guest code runs at hardware speed,
/// else QEMU (KVM when usable at speed, TCG otherwise).
pub fn select(
    kind: HypervisorKind,
    paths: &Paths,
) -> Result<(Box<dyn Hypervisor>, String), HypervisorError> {
    let verdict = podvisor_vmm::probe::probe();
    let fast = verdict.is_fast();
    let qemu = |accel: qemu::Accel| -> Box<dyn Hypervisor> {
        Box::new(qemu::Qemu::new(paths.clone(), accel))
    };
    let accel = if fast {
        qemu::Accel::Kvm
    } else {
        qemu::Accel::Tcg
    };
    Ok(match (kind, fast) {
        (HypervisorKind::Vmm, true) | (HypervisorKind::Auto, true) => (
            Box::new(vmm::Vmm::new(paths.clone())),
            format!("{kind:?} -> vmm: {verdict}"),
        ),
        (HypervisorKind::Vmm, false) => {
            if matches!(verdict, podvisor_vmm::probe::Verdict::Unavailable(_)) {
                return Err(HypervisorError::Unavailable(format!(
                    "hypervisor \"vmm\" needs /dev/kvm: {verdict}"
                )));
            }
            (
                Box::new(vmm::Vmm::new(paths.clone())),
                format!("Vmm -> vmm as configured, although {verdict}"),
            )
        }
        (HypervisorKind::Qemu, _) | (HypervisorKind::Auto, false) => (
            qemu(accel),
            format!("{kind:?} -> qemu with {}: {verdict}", accel.name()),
        ),
    })
}

/// How long a helper may take to create its socket.
pub(crate) const HELPER_READY: Duration = Duration::from_secs(10);

/// Starts virtiofsd on the VM's shared directory; returns it once its
/// vhost-user socket exists, with the socket's path.
pub(crate) async fn start_virtiofsd(
    paths: &Paths,
    spec: &VmSpec,
) -> Result<(Supervised, PathBuf), HypervisorError> {
    let sock = spec.dir.join("virtiofs.sock");
    let log = spec.dir.join("virtiofsd.log");
    let mut fs = Supervised::spawn(
        "virtiofsd",
        Command::new(&paths.virtiofsd)
            .arg(format!("--socket-path={}", sock.display()))
            .arg("-o")
            .arg(format!("source={}", spec.shared_dir.display()))
            .args(["-o", "cache=none", "-o", "announce_submounts"]),
        &log,
    )?;
    if let Err(e) = wait_for_socket(&sock, &fs, &log, HELPER_READY).await {
        fs.kill().await;
        return Err(e);
    }
    Ok((fs, sock))
}

/// A child process the shim supervises: its exit is observable, and it is
/// killed through the task that owns it (so a reused pid is never hit),
/// at the latest when this handle is dropped.
pub struct Supervised {
    pub name: &'static str,
    pub pid: u32,
    exit: watch::Receiver<Option<ExitStatus>>,
    kill: Option<oneshot::Sender<()>>,
}

impl Supervised {
    pub fn spawn(
        name: &'static str,
        cmd: &mut Command,
        log: &Path,
    ) -> Result<Supervised, HypervisorError> {
        let io = |what: String| move |source| HypervisorError::Io { what, source };
        let out = std::fs::File::create(log).map_err(io(format!("creating {}", log.display())))?;
        let err = out.try_clone().map_err(io("dup log".into()))?;
        cmd.stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(false);
        let program = PathBuf::from(cmd.as_std().get_program());
        let mut child: Child = cmd.spawn().map_err(|source| HypervisorError::Spawn {
            name,
            program,
            source,
        })?;
        let pid = child.id().unwrap_or_default();
        let (exit_tx, exit_rx) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                // A kill request, or the handle dropped.
                _ = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            match status {
                Ok(s) => {
                    let _ = exit_tx.send(Some(s));
                }
                Err(e) => tracing::warn!("waiting for {name}: {e}"),
            }
        });
        Ok(Supervised {
            name,
            pid,
            exit: exit_rx,
            kill: Some(kill_tx),
        })
    }

    pub fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// A handle that sees the exit without holding the process.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.exit.clone()
    }

    /// Resolves when the process has exited (and was reaped).
    pub async fn wait(&self) -> Option<ExitStatus> {
        let mut rx = self.exit.clone();
        rx.wait_for(|s| s.is_some()).await.ok().and_then(|s| *s)
    }

    /// SIGKILLs the process and waits until it is reaped.
    pub async fn kill(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        self.wait().await;
    }
}

/// A started VM: the VM process and its helpers.
pub struct RunningVm {
    /// The VM process (QEMU or podvisor-vmm).
    pub vm: Supervised,
    pub helpers: Vec<Supervised>,
    /// Host end of the guest's vsock (hybrid-vsock UDS).
    pub vsock: PathBuf,
    pub describe: String,
}

impl RunningVm {
    /// Waits up to `grace` for the VM process to exit by itself (the guest
    /// powered off), then kills it and every helper.
    pub async fn stop(&mut self, grace: Duration) {
        if tokio::time::timeout(grace, self.vm.wait()).await.is_err() {
            tracing::warn!("VM did not power off within {grace:?}; killing it");
        }
        self.vm.kill().await;
        for h in &mut self.helpers {
            h.kill().await;
        }
    }

    /// Pids of the VM process and the helpers, with their names.
    pub fn processes(&self) -> Vec<(&'static str, u32)> {
        std::iter::once(&self.vm)
            .chain(self.helpers.iter())
            .map(|s| (s.name, s.pid))
            .collect()
    }
}

/// The last `lines` lines of the guest console and of every helper's log
/// in a VM directory, for error messages.
pub fn log_tails(dir: &Path, lines: usize) -> String {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    names.retain(|p| p.extension().is_some_and(|e| e == "log"));
    names.sort();
    let mut out = String::new();
    for path in names {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        out.push_str(&format!("--- {name} (last lines)\n"));
        for l in &all[all.len().saturating_sub(lines)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// Waits for `path` to appear while `child` runs.
pub(crate) async fn wait_for_socket(
    path: &Path,
    child: &Supervised,
    log: &Path,
    within: Duration,
) -> Result<(), HypervisorError> {
    let deadline = tokio::time::Instant::now() + within;
    while !path.exists() {
        if let Some(st) = child.exited() {
            return Err(HypervisorError::EarlyExit {
                name: child.name,
                status: st.to_string(),
                log: log.to_owned(),
            });
        }
        if tokio::time::Instant::now() > deadline {
            return Err(HypervisorError::NotReady {
                name: child.name,
                path: path.to_owned(),
                after: within,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tails_show_every_log_and_only_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let long: String = (0..50).map(|i| format!("line {i}\n")).collect();
        std::fs::write(dir.path().join("console.log"), long).unwrap();
        std::fs::write(dir.path().join("virtiofsd.log"), "fs said this\n").unwrap();
        std::fs::write(dir.path().join("vm.vsock"), "not a log").unwrap();
        let t = log_tails(dir.path(), 3);
        assert!(
            t.contains("--- console.log") && t.contains("line 49") && !t.contains("line 46"),
            "{t}"
        );
        assert!(t.contains("fs said this"), "{t}");
        assert!(!t.contains("not a log"), "{t}");
    }
}
