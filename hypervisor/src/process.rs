//! The processes a VM is made of, supervised: spawning with the output in
//! a log, exit watching, killing through the owner (never a reused pid),
//! waiting for a helper's socket, entering the pod's network namespace,
//! file locks between processes, and the log tails that explain a failure.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};

use crate::HypervisorError;

/// How long a helper may take to create its socket.
pub const HELPER_READY: Duration = Duration::from_secs(10);

/// A child process the hypervisor layer supervises: its exit is observable, and it is
/// killed through the task that owns it (so a reused pid is never hit),
/// at the latest when this handle is dropped.
#[derive(Debug)]
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

/// Waits for `path` to appear while `child` runs.
pub async fn wait_for_socket(
    path: &Path,
    child: &Supervised,
    log: &Path,
    within: Duration,
) -> Result<(), HypervisorError> {
    wait_until(|| path.exists(), path, child, log, within).await
}

/// Waits until `ready` holds (it looks at `path`) while `child` runs.
pub async fn wait_until(
    ready: impl Fn() -> bool,
    path: &Path,
    child: &Supervised,
    log: &Path,
    within: Duration,
) -> Result<(), HypervisorError> {
    let deadline = tokio::time::Instant::now() + within;
    while !ready() {
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

/// Makes `cmd` start in the network namespace `netns`.
pub fn run_in_netns(cmd: &mut Command, netns: Option<&Path>) -> Result<(), HypervisorError> {
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

/// An exclusive lock on `path` (created, with its directory, if missing),
/// held until the file is dropped; waits for another holder.
pub async fn lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    let path: PathBuf = path.to_owned();
    tokio::task::spawn_blocking(move || {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f)
    })
    .await
    .map_err(std::io::Error::other)?
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
