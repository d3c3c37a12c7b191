//! How a VM ends. Whoever notices first (a vCPU on a triple fault, the
//! ACPI or i8042 device on power-off or reset, the control socket) calls
//! [`ExitSignal::trigger`]; the first reason wins, every vCPU stops, and
//! the process exits with [`ExitReason::exit_code`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 or ACPI reset register).
    Reboot,
    /// Stopped through the control socket or a signal.
    Stopped,
    /// The guest or KVM failed: triple fault, emulation error, a dead vCPU.
    Failed(String),
}

impl ExitReason {
    /// 0 powered off or stopped, 2 failed, 3 rebooted (1 is left to
    /// errors before the VM ran: bad config, missing kernel).
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff | ExitReason::Stopped => 0,
            ExitReason::Failed(_) => 2,
            ExitReason::Reboot => 3,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::PowerOff => write!(f, "guest powered off"),
            ExitReason::Reboot => write!(f, "guest rebooted"),
            ExitReason::Stopped => write!(f, "stopped on request"),
            ExitReason::Failed(why) => write!(f, "guest failed: {why}"),
        }
    }
}

/// Shared by every part that can end the VM.
#[derive(Debug)]
pub struct ExitSignal {
    set: AtomicBool,
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<ExitSignal> {
        Ok(ExitSignal {
            set: AtomicBool::new(false),
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless another came first, and wakes the event loop.
    pub fn trigger(&self, reason: ExitReason) {
        if let Ok(mut r) = self.reason.lock() {
            if r.is_none() {
                tracing::info!("VM exit: {reason}");
                *r = Some(reason);
            }
        }
        self.set.store(true, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }

    /// Readable once the VM should end.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_codes_differ() {
        let s = ExitSignal::new().unwrap();
        assert!(!s.is_set());
        s.trigger(ExitReason::Reboot);
        s.trigger(ExitReason::PowerOff);
        assert!(s.is_set());
        assert_eq!(s.reason(), Some(ExitReason::Reboot));
        assert_eq!(s.eventfd().read().unwrap(), 2);
        assert_eq!(ExitReason::PowerOff.exit_code(), 0);
        assert_eq!(ExitReason::Reboot.exit_code(), 3);
        assert_eq!(ExitReason::Failed("x".into()).exit_code(), 2);
    }
}
