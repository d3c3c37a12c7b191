//! One thread per vCPU: `KVM_RUN` in a loop, port I/O and MMIO exits
//! routed to the buses, every other exit turned into a VM exit reason.
//! [`kick`] interrupts a vCPU blocked in the guest so it sees the VM end.

use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::Bus;
use crate::exit::{ExitReason, ExitSignal};

pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: Arc<ExitSignal>,
    /// When the VMM began building the VM; the boot vCPU logs how long
    /// it took to reach its first `KVM_RUN`.
    pub build_started: Option<Instant>,
}

/// The signal that knocks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            tracing::error!("installing the vCPU kick handler: {e}");
        }
    });
}

impl Vcpu {
    /// Runs until the VM ends; returns when this vCPU has stopped.
    pub fn run(self) {
        let Vcpu {
            index,
            mut fd,
            pio,
            mmio,
            exit,
            build_started,
        } = self;
        if let Some(t) = build_started {
            tracing::info!(
                "vCPU {index}: first KVM_RUN {:.2} ms after the VM build began",
                t.elapsed().as_secs_f64() * 1000.0
            );
        }
        while !exit.is_set() {
            let fail =
                |why: String| exit.trigger(ExitReason::Failed(format!("vCPU {index}: {why}")));
            match fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !pio.read(u64::from(port), data) {
                        tracing::trace!("vCPU {index}: read of unclaimed port {port:#x}");
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !pio.write(u64::from(port), data) {
                        tracing::trace!("vCPU {index}: write to unclaimed port {port:#x}");
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !mmio.read(addr, data) {
                        tracing::debug!("vCPU {index}: read of unclaimed MMIO {addr:#x}");
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !mmio.write(addr, data) {
                        tracing::debug!("vCPU {index}: write to unclaimed MMIO {addr:#x}");
                    }
                }
                Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) => {}
                Ok(VcpuExit::Shutdown) => fail("triple fault (KVM_EXIT_SHUTDOWN)".into()),
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => exit.trigger(ExitReason::PowerOff),
                    KVM_SYSTEM_EVENT_RESET => exit.trigger(ExitReason::Reboot),
                    KVM_SYSTEM_EVENT_CRASH => fail("guest crash event".into()),
                    other => fail(format!("system event {other}")),
                },
                Ok(VcpuExit::FailEntry(reason, cpu)) => fail(format!(
                    "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                )),
                Ok(VcpuExit::InternalError) => {
                    fail("KVM internal error (instruction emulation failed)".into())
                }
                Ok(other) => fail(format!("unexpected exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => fail(format!("KVM_RUN: {e}")),
            }
        }
        tracing::debug!("vCPU {index} stopped");
    }

    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        install_kick_handler();
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || self.run())
    }
}

/// Stops every vCPU thread: signals each until it leaves `KVM_RUN` and
/// sees the exit flag. Gives up (and says so) after `within`.
pub fn stop_all(threads: Vec<JoinHandle<()>>, within: Duration) {
    use std::os::unix::thread::JoinHandleExt;
    let deadline = Instant::now() + within;
    for t in threads {
        while !t.is_finished() {
            if Instant::now() > deadline {
                tracing::error!("a vCPU thread did not stop within {within:?}");
                return;
            }
            // SAFETY: the thread has not been joined, so its pthread_t is valid.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = t.join();
    }
}
