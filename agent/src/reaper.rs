//! Reaps every child of the agent and hands exit statuses to watchers.
//!
//! As PID 1 the agent is the parent of last resort for the whole guest, so
//! a single loop collects every exit (`waitpid(-1)` on each SIGCHLD) and
//! nothing else in the agent may call `waitpid`. A pid that exits before
//! anyone watches it is kept for a while, because a container's pid is
//! learned only after its intermediate process reports it; not for long,
//! so that a reused pid never inherits an old exit.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// Unclaimed exits kept at most: orphans of the guest nobody asks about.
const UNCLAIMED_MAX: usize = 256;
/// How long an unclaimed exit is kept: far longer than a launch takes to
/// report its pid, far shorter than the guest takes to reuse a pid.
const UNCLAIMED_TTL: Duration = Duration::from_secs(120);

/// How a process ended, in the shell's convention: the exit code, or
/// 128 + the number of the signal that killed it.
pub type ExitStatus = i32;

pub struct Reaper {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    watchers: HashMap<i32, oneshot::Sender<ExitStatus>>,
    unclaimed: VecDeque<(i32, ExitStatus, Instant)>,
}

impl Reaper {
    /// Starts reaping. Call inside the runtime, before forking anything.
    pub fn start() -> std::io::Result<Arc<Reaper>> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Arc::new(Reaper {
            inner: Mutex::new(Inner::default()),
        });
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// The exit status of `pid`, once it exits (or if it already has).
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        inner.expire(Instant::now());
        if let Some(pos) = inner.unclaimed.iter().position(|(p, _, _)| *p == pid) {
            if let Some((_, status, _)) = inner.unclaimed.remove(pos) {
                let _ = tx.send(status);
            }
        } else {
            inner.watchers.insert(pid, tx);
        }
        rx
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave it inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reap_all(&self) {
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid.as_raw(), code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid.as_raw(), 128 + sig as i32),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("waitpid: {e}");
                    return;
                }
            };
            self.deliver(pid, status);
        }
    }

    fn deliver(&self, pid: i32, status: ExitStatus) {
        self.deliver_at(pid, status, Instant::now());
    }

    fn deliver_at(&self, pid: i32, status: ExitStatus, now: Instant) {
        let mut inner = self.lock();
        match inner.watchers.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(status);
            }
            None => {
                inner.expire(now);
                if inner.unclaimed.len() >= UNCLAIMED_MAX {
                    inner.unclaimed.pop_front();
                }
                inner.unclaimed.push_back((pid, status, now));
            }
        }
    }
}

impl Inner {
    fn expire(&mut self, now: Instant) {
        while let Some((_, _, at)) = self.unclaimed.front() {
            if now.duration_since(*at) < UNCLAIMED_TTL {
                break;
            }
            self.unclaimed.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reaper() -> Reaper {
        Reaper {
            inner: Mutex::new(Inner::default()),
        }
    }

    #[test]
    fn exit_before_watch_is_kept() {
        let r = reaper();
        r.deliver(42, 3);
        let mut rx = r.watch(42);
        assert_eq!(rx.try_recv().unwrap(), 3);
        // Claimed once only.
        let mut again = r.watch(42);
        assert!(again.try_recv().is_err());
    }

    #[test]
    fn watch_then_exit() {
        let r = reaper();
        let mut rx = r.watch(7);
        assert!(rx.try_recv().is_err());
        r.deliver(7, 137);
        assert_eq!(rx.try_recv().unwrap(), 137);
    }

    #[test]
    fn old_unclaimed_exits_expire() {
        let r = reaper();
        let long_ago = Instant::now()
            .checked_sub(UNCLAIMED_TTL + Duration::from_secs(1))
            .unwrap();
        r.deliver_at(500, 9, long_ago);
        // A new process that got pid 500 is not reported dead.
        assert!(r.watch(500).try_recv().is_err());
    }

    #[test]
    fn unclaimed_is_bounded() {
        let r = reaper();
        for pid in 0..(i32::try_from(UNCLAIMED_MAX).unwrap() + 10) {
            r.deliver(pid, 0);
        }
        assert_eq!(r.lock().unclaimed.len(), UNCLAIMED_MAX);
        // The oldest went first.
        assert!(r.watch(0).try_recv().is_err());
        assert_eq!(
            r.watch(i32::try_from(UNCLAIMED_MAX).unwrap() + 9)
                .try_recv()
                .unwrap(),
            0
        );
    }
}
