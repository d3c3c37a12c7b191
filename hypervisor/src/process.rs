//! The processes a VM is made of, supervised: spawning with the output in
//! a log, exit watching, killing through the owner (never a reused pid),
//! handing a running VM's processes over to another process (released by
//! one, adopted through a pidfd by the next), waiting for a helper's socket, entering the pod's network namespace,
//! file locks between processes, and the log tails that explain a failure.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
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
    /// `true`: kill it; `false`: let it go on unsupervised (released);
    /// dropped: kill it.
    kill: Option<oneshot::Sender<bool>>,
}

impl Supervised {
    pub fn spawn(
        name: &'static str,
        cmd: &mut Command,
        log: &Path,
    ) -> Result<Supervised, HypervisorError> {
        let mut child = start(name, cmd, log)?;
        let pid = child.id().unwrap_or_default();
        let (exit_tx, exit_rx) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel::<bool>();
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                // A kill request, or the handle dropped.
                k = kill_rx => {
                    if k == Ok(false) {
                        return;
                    }
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

    /// Supervises `pid`, a child of this process it did not spawn itself
    /// (a jailed process that forked into its own PID namespace,
    /// [`crate::jail`]), through a pidfd: its exit status is read as its
    /// parent reads it.
    pub(crate) fn child(name: &'static str, pid: u32) -> Result<Supervised, HypervisorError> {
        let pidfd = open_pidfd(name, pid)?;
        Ok(Supervised::watch(name, pid, pidfd, true))
    }

    /// Takes over a running process this one did not start (a pool VM's,
    /// released by the process that restored it), through a pidfd: its
    /// exit is seen and a kill reaches it and no reused pid. `start_time`
    /// (see [`process_start_time`]) must match, or it is another process.
    /// Its exit status is not ours to read: an exit seen after our kill is
    /// reported as SIGKILL, any other as status 0.
    pub fn adopt(
        name: &'static str,
        pid: u32,
        start_time: u64,
    ) -> Result<Supervised, HypervisorError> {
        let pidfd = open_pidfd(name, pid)?;
        // Checked after opening: the pidfd now pins this very process.
        if process_start_time(pid) != Some(start_time) {
            return Err(HypervisorError::Io {
                what: format!("adopting {name} (pid {pid})"),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        Ok(Supervised::watch(name, pid, pidfd, false))
    }

    /// Watches `pidfd`, of `pid`: a kill goes through it; `reap`: the
    /// process is our child, whose status waitid(2) reads.
    fn watch(name: &'static str, pid: u32, pidfd: AsyncFd<OwnedFd>, reap: bool) -> Supervised {
        let (exit_tx, exit_rx) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel::<bool>();
        tokio::spawn(async move {
            let killed = tokio::select! {
                _ = pidfd.readable() => false,
                k = kill_rx => {
                    if k == Ok(false) {
                        return;
                    }
                    // SAFETY: pidfd_send_signal(2) on the pidfd we own.
                    unsafe {
                        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), libc::SIGKILL, 0, 0)
                    };
                    let _ = pidfd.readable().await;
                    true
                }
            };
            let unread = ExitStatus::from_raw(if killed { libc::SIGKILL } else { 0 });
            let status = if reap {
                reap_pidfd(pidfd.get_ref()).unwrap_or_else(|e| {
                    tracing::warn!("reaping {name} (pid {pid}): {e}");
                    unread
                })
            } else {
                unread
            };
            let _ = exit_tx.send(Some(status));
        });
        Supervised {
            name,
            pid,
            exit: exit_rx,
            kill: Some(kill_tx),
        }
    }

    /// Lets the process go on unsupervised (for another process to adopt);
    /// returns its pid.
    pub fn release(mut self) -> u32 {
        if let Some(k) = self.kill.take() {
            let _ = k.send(false);
        }
        self.pid
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
            let _ = k.send(true);
        }
        self.wait().await;
    }
}

/// Starts `cmd` with its output in `log` (created), no stdin.
pub(crate) fn start(
    name: &'static str,
    cmd: &mut Command,
    log: &Path,
) -> Result<Child, HypervisorError> {
    let io = |what: String| move |source| HypervisorError::Io { what, source };
    let out = std::fs::File::create(log).map_err(io(format!("creating {}", log.display())))?;
    let err = out.try_clone().map_err(io("dup log".into()))?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(false);
    let program = PathBuf::from(cmd.as_std().get_program());
    cmd.spawn().map_err(|source| HypervisorError::Spawn {
        name,
        program,
        source,
    })
}

fn open_pidfd(name: &'static str, pid: u32) -> Result<AsyncFd<OwnedFd>, HypervisorError> {
    let gone = |source| HypervisorError::Io {
        what: format!("watching {name} (pid {pid})"),
        source,
    };
    let raw =
        libc::pid_t::try_from(pid).map_err(|_| gone(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: pidfd_open(2) with plain integers; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
    let fd = i32::try_from(fd).map_err(|_| gone(std::io::ErrorKind::InvalidData.into()))?;
    if fd < 0 {
        return Err(gone(std::io::Error::last_os_error()));
    }
    // SAFETY: a descriptor pidfd_open just returned, owned from here.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an OwnedFd keeps its one descriptor open until dropped.
    unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
        .map_err(|e| gone(std::io::Error::other(e.to_string())))
}

/// Reaps the exited child behind `pidfd`: its status, as wait(2) encodes it.
fn reap_pidfd(pidfd: &OwnedFd) -> std::io::Result<ExitStatus> {
    let fd = libc::id_t::try_from(pidfd.as_raw_fd())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: zeroed siginfo_t is a valid value; waitid(2) fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid(2) on a pidfd we own, writing into `info`.
    let rc = unsafe { libc::waitid(libc::P_PIDFD, fd, &mut info, libc::WEXITED) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: waitid filled in a child's exit: si_status is set.
    let status = unsafe { info.si_status() };
    Ok(ExitStatus::from_raw(match info.si_code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_DUMPED => (status & 0x7f) | 0x80,
        _ => status & 0x7f,
    }))
}

/// How a VM-side process ended, in words. SIGSYS is a seccomp filter's
/// verdict: the process made a system call its filter forbids (a bug in
/// the rules, or a guest that took over the process).
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (_, Some(libc::SIGSYS)) => {
            "killed by SIGSYS: a system call outside its seccomp filter".into()
        }
        (_, Some(sig)) => format!("killed by signal {sig}"),
        (Some(code), None) => format!("exit status {code}"),
        (None, None) => status.to_string(),
    }
}

/// This host boot's id: pids and start times recorded in another boot
/// name other processes.
pub fn boot_id() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_string())
}

/// Start time of `pid` (jiffies since boot, field 22 of /proc/<pid>/stat),
/// if it runs: with the pid, it names one process for good.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
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
                status: describe_exit(st),
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

/// Makes the VM process `cmd` of `spec` start in the pod's network
/// namespace; one without a pod network and without NICs (a pool VM, whose
/// NICs come later as descriptors; a pod with no network) in a new, empty
/// one, keeping no reach into the host's network.
pub fn place_vm(cmd: &mut Command, spec: &crate::VmSpec) -> Result<(), HypervisorError> {
    if spec.netns.is_some() || !spec.net.is_empty() {
        return run_in_netns(cmd, spec.netns.as_deref());
    }
    // SAFETY: unshare(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Makes `cmd` start in the network namespace `netns` (none: where this
/// process is).
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
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// An exclusive lock on `path` (created, with its directory, if missing),
/// held until the file is dropped; waits for another holder. A lock file
/// its holder removed (and another process perhaps made anew) is not the
/// lock any more: taken again at the path.
pub async fn lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    let path: PathBuf = path.to_owned();
    tokio::task::spawn_blocking(move || loop {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let held = std::os::unix::fs::MetadataExt::ino(&f.metadata()?);
        match std::fs::metadata(&path) {
            Ok(m) if std::os::unix::fs::MetadataExt::ino(&m) == held => return Ok(f),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// The most of a log's end read for an error message.
const LOG_TAIL_BYTES: u64 = 64 << 10;

/// The last `lines` lines of every process's log in a VM directory and of
/// the guest console (in the VM's own directory), for error messages.
pub fn log_tails(dir: &Path, lines: usize) -> String {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    names.retain(|p| p.extension().is_some_and(|e| e == "log"));
    names.push(dir.join(crate::VM_DIR).join("console.log"));
    names.sort();
    let mut out = String::new();
    for path in names {
        let Some(text) = read_log(&path) else {
            continue;
        };
        let all: Vec<&str> = text.lines().collect();
        let name = path.strip_prefix(dir).unwrap_or(&path).to_string_lossy();
        out.push_str(&format!("--- {name} (last lines)\n"));
        // The guest writes the console: each line is marked as quoted and
        // its control characters are shown escaped, so it cannot pass for a
        // line of the host's log.
        for l in &all[all.len().saturating_sub(lines)..] {
            out.push_str("| ");
            for c in l.chars() {
                if c.is_control() && c != '\t' {
                    out.extend(c.escape_default());
                } else {
                    out.push(c);
                }
            }
            out.push('\n');
        }
    }
    out
}

/// The end of a log (its last 64 KiB), if it is a plain file; a link is
/// not followed (the VM's own directory is its processes' to fill, and
/// their logs may be as large as guest memory).
fn read_log(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let len = f.metadata().ok().filter(|m| m.is_file())?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))
        .ok()?;
    let mut text = Vec::new();
    f.take(LOG_TAIL_BYTES).read_to_end(&mut text).ok()?;
    Some(String::from_utf8_lossy(&text).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process released by its spawner runs on; adopted by pid and
    /// start time, its exit is seen and a kill reaches it; a wrong start
    /// time (a reused pid) is refused.
    #[tokio::test]
    async fn released_processes_are_adopted_and_killed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sleep.log");
        let s = Supervised::spawn("sleep", Command::new("sleep").arg("60"), &log).unwrap();
        let pid = s.release();
        let start = process_start_time(pid).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(process_start_time(pid), Some(start), "released, yet gone");
        assert!(Supervised::adopt("sleep", pid, start + 1).is_err());
        let mut adopted = Supervised::adopt("sleep", pid, start).unwrap();
        assert!(adopted.exited().is_none());
        adopted.kill().await;
        let st = adopted.exited().unwrap();
        assert_eq!(st.signal(), Some(libc::SIGKILL), "{st}");
        // Reaped by this test's runtime (its spawner): gone for good.
        tokio::time::timeout(Duration::from_secs(5), async {
            while process_start_time(pid) == Some(start) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
    }

    #[test]
    fn exits_are_described_and_sigsys_names_seccomp() {
        assert_eq!(describe_exit(ExitStatus::from_raw(3 << 8)), "exit status 3");
        assert_eq!(
            describe_exit(ExitStatus::from_raw(libc::SIGKILL)),
            "killed by signal 9"
        );
        assert!(describe_exit(ExitStatus::from_raw(libc::SIGSYS)).contains("seccomp filter"));
    }

    #[test]
    fn log_tails_show_every_log_and_only_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let long: String = (0..50).map(|i| format!("line {i}\n")).collect();
        std::fs::create_dir(dir.path().join(crate::VM_DIR)).unwrap();
        std::fs::write(dir.path().join("vm/console.log"), long).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("passwd.log")).unwrap();
        std::fs::write(dir.path().join("vm/other.log"), "the VM's own").unwrap();
        std::fs::write(
            dir.path().join("virtiofsd.log"),
            "fs said this\n\x1b[2Jlevel=info forged\rover\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("vm.vsock"), "not a log").unwrap();
        let t = log_tails(dir.path(), 3);
        assert!(
            t.contains("--- vm/console.log") && t.contains("line 49") && !t.contains("line 46"),
            "{t}"
        );
        assert!(t.contains("| fs said this\n"), "{t}");
        assert!(
            t.contains("| \\u{1b}[2Jlevel=info forged\\rover\n"),
            "control characters escaped: {t}"
        );
        assert!(!t.contains("not a log"), "{t}");
        assert!(!t.contains("root:"), "a link is not followed: {t}");
        assert!(!t.contains("the VM's own"), "{t}");
        // Only the end of a large log is read.
        std::fs::write(
            dir.path().join("big.log"),
            format!("first\n{}last\n", "x".repeat(200 << 10)),
        )
        .unwrap();
        let t = log_tails(dir.path(), 3);
        assert!(
            t.contains("last") && !t.contains("first"),
            "big.log read whole"
        );
    }
}
