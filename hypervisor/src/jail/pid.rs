//! The jailed process's own PID namespace: it sees (in its proc) and can
//! signal only itself, not the host's processes nor other VMs'.
//!
//! Between fork and exec the child unshares a PID namespace and forks
//! again: the grandchild, PID 1 there, goes on to exec; the intermediate
//! reports the grandchild's host pid on a pipe and exits. The spawning
//! process is a child subreaper while that happens, so the grandchild
//! becomes its child: it is supervised through a pidfd and its exit
//! status (a seccomp filter's SIGSYS) is read as a parent reads it.
//!
//! As PID 1 of its namespace the process gets no signal it has no handler
//! for, except SIGKILL and SIGSTOP from outside; the shim only ever kills
//! it (SIGKILL through a pidfd), and a VM powers off through its guest.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use tokio::process::Command;

use crate::process::{start, Supervised};
use crate::HypervisorError;

/// Held while this process is a subreaper for a spawn: the flag is
/// process-wide, set and cleared around each.
static SUBREAPER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The pipe a jailed child reports its grandchild's pid on.
#[derive(Debug)]
pub struct PidNamespace {
    read: std::fs::File,
    write: OwnedFd,
}

fn pipe() -> std::io::Result<(std::fs::File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just returned to us, owned from here.
    unsafe {
        use std::os::fd::FromRawFd;
        Ok((
            std::fs::File::from_raw_fd(fds[0]),
            OwnedFd::from_raw_fd(fds[1]),
        ))
    }
}

impl PidNamespace {
    /// Registers the fork into a new PID namespace in `cmd`: register it
    /// before any step that must run in the namespace (mounting the
    /// jail's proc).
    pub fn enter_on_spawn(cmd: &mut Command) -> std::io::Result<PidNamespace> {
        let (read, write) = pipe()?;
        let report = write.as_raw_fd();
        // SAFETY: `fork_into` only issues async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(move || fork_into(report));
        }
        Ok(PidNamespace { read, write })
    }

    /// Spawns `cmd` (registered with [`PidNamespace::enter_on_spawn`])
    /// with its output in `log`, and supervises the grandchild that execs.
    pub async fn spawn(
        self,
        name: &'static str,
        cmd: &mut Command,
        log: &Path,
    ) -> Result<Supervised, HypervisorError> {
        let _one_at_a_time = SUBREAPER.lock().await;
        set_subreaper(true).map_err(|source| HypervisorError::Io {
            what: "becoming a child subreaper".into(),
            source,
        })?;
        let started = start(name, cmd, log);
        let PidNamespace { mut read, write } = self;
        drop(write);
        // Written before the intermediate exits (or nothing, if it failed).
        let mut buf = [0u8; 4];
        let grandchild = read
            .read_exact(&mut buf)
            .ok()
            .map(|()| libc::pid_t::from_ne_bytes(buf));
        let supervised = match started {
            Ok(mut intermediate) => {
                // Its exit makes the grandchild ours.
                let waited = intermediate.wait().await;
                let watched = match (&waited, grandchild) {
                    (Ok(st), Some(pid)) if st.success() => {
                        Supervised::child(name, u32::try_from(pid).unwrap_or_default())
                    }
                    _ => Err(HypervisorError::Spawn {
                        name,
                        program: cmd.as_std().get_program().into(),
                        source: std::io::Error::other(format!(
                            "forking into its PID namespace: {waited:?}"
                        )),
                    }),
                };
                if watched.is_err() {
                    if let Some(pid) = grandchild {
                        kill_and_reap(pid);
                    }
                }
                watched
            }
            Err(e) => {
                // The grandchild's exec failed: it exited, ours to reap.
                if let Some(pid) = grandchild {
                    kill_and_reap(pid);
                }
                Err(e)
            }
        };
        if let Err(e) = set_subreaper(false) {
            tracing::warn!("no longer a child subreaper: {e}");
        }
        supervised
    }
}

/// Ends `pid`, an unreaped child of ours (so never a reused pid), and
/// reaps it.
fn kill_and_reap(pid: libc::pid_t) {
    // SAFETY: kill(2) and waitpid(2) on our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

fn set_subreaper(on: bool) -> std::io::Result<()> {
    // SAFETY: prctl(2) with plain integers.
    if unsafe {
        libc::prctl(
            libc::PR_SET_CHILD_SUBREAPER,
            libc::c_ulong::from(on),
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Between fork and exec: into a new PID namespace, forking; the
/// grandchild returns (and execs), the intermediate reports it and exits.
fn fork_into(report: RawFd) -> std::io::Result<()> {
    // SAFETY: unshare(2), fork(2), write(2), close(2) and _exit(2) are
    // async-signal-safe; nothing here allocates.
    unsafe {
        if libc::unshare(libc::CLONE_NEWPID) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        match libc::fork() {
            -1 => Err(std::io::Error::last_os_error()),
            0 => {
                libc::close(report);
                Ok(())
            }
            pid => {
                let bytes = pid.to_ne_bytes();
                let wrote = libc::write(report, bytes.as_ptr().cast(), bytes.len());
                if wrote != 4 {
                    // Nobody would know the grandchild: end it.
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                    libc::_exit(1)
                }
                libc::_exit(0)
            }
        }
    }
}
