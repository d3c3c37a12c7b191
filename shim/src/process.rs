//! The shim's view of one process (a container's init or an exec): its
//! stdio bridge and its state, which moves Created -> Running -> Stopped
//! exactly once, however the exit is learned (the agent's WaitProcess or
//! the VM dying).

use std::sync::Mutex;

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;

use crate::stdio::{Bridge, StdioPaths};

use podvisor_names::VM_DIED_EXIT_STATUS;

#[derive(Debug, Clone, PartialEq)]
pub enum ProcState {
    Created,
    Running,
    Stopped { status: u32, at: Timestamp },
}

pub struct Proc {
    pub exec_id: String,
    pub stdio: StdioPaths,
    state: watch::Sender<ProcState>,
    bridge: Mutex<Option<Bridge>>,
}

impl Proc {
    pub fn new(exec_id: &str, stdio: StdioPaths, bridge: Bridge) -> Proc {
        Proc {
            exec_id: exec_id.to_string(),
            stdio,
            state: watch::channel(ProcState::Created).0,
            bridge: Mutex::new(Some(bridge)),
        }
    }

    pub fn state(&self) -> ProcState {
        self.state.borrow().clone()
    }

    pub fn set_running(&self) {
        self.state.send_if_modified(|s| {
            let change = *s == ProcState::Created;
            if change {
                *s = ProcState::Running;
            }
            change
        });
    }

    /// Records the exit; true only for the first caller, who publishes it.
    pub fn set_stopped(&self, status: u32) -> bool {
        self.state.send_if_modified(|s| {
            if matches!(s, ProcState::Stopped { .. }) {
                return false;
            }
            *s = ProcState::Stopped { status, at: now() };
            true
        })
    }

    /// Resolves with the exit status and time once stopped.
    pub async fn wait(&self) -> (u32, Timestamp) {
        let mut rx = self.state.subscribe();
        let stopped = rx
            .wait_for(|s| matches!(s, ProcState::Stopped { .. }))
            .await;
        match stopped.as_deref() {
            Ok(ProcState::Stopped { status, at }) => (*status, at.clone()),
            _ => (u32::from(VM_DIED_EXIT_STATUS), now()),
        }
    }

    /// Waits until every output byte went to containerd's side.
    pub async fn drain_output(&self) {
        let bridge = lock(&self.bridge).take();
        if let Some(mut b) = bridge {
            b.drained().await;
        }
    }

    pub fn close_stdin(&self) {
        if let Some(b) = lock(&self.bridge).as_ref() {
            b.close_stdin();
        }
    }
}

pub fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc() -> Proc {
        Proc {
            exec_id: String::new(),
            stdio: StdioPaths::default(),
            state: watch::channel(ProcState::Created).0,
            bridge: Mutex::new(None),
        }
    }

    #[tokio::test]
    async fn the_first_exit_wins() {
        let p = proc();
        p.set_running();
        assert_eq!(p.state(), ProcState::Running);
        assert!(p.set_stopped(3));
        assert!(!p.set_stopped(u32::from(VM_DIED_EXIT_STATUS)));
        assert_eq!(p.wait().await.0, 3);
        // A stopped process never runs again.
        p.set_running();
        assert!(matches!(p.state(), ProcState::Stopped { status: 3, .. }));
    }
}
