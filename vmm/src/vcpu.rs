//! One thread per vCPU: `KVM_RUN` in a loop, port I/O and MMIO exits
//! routed to the buses, every other exit turned into a VM exit reason.
//! [`kick`] interrupts a vCPU blocked in the guest so it sees the VM end.

use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::arch::dump;
use crate::devices::Bus;
use crate::exit::{ExitReason, ExitSignal};
use crate::memory::GuestMemoryMmap;

#[derive(Debug)]
pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: Arc<ExitSignal>,
    /// Guest RAM, read only to show the code at RIP when the guest fails.
    pub mem: GuestMemoryMmap,
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
            mem,
            build_started,
        } = self;
        if let Some(t) = build_started {
            tracing::info!(
                "vCPU {index}: first KVM_RUN {:.2} ms after the VM build began",
                t.elapsed().as_secs_f64() * 1000.0
            );
        }
        while !exit.is_set() {
            let failure = match fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !pio.read(u64::from(port), data) {
                        tracing::trace!("vCPU {index}: read of unclaimed port {port:#x}");
                    }
                    None
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !pio.write(u64::from(port), data) {
                        tracing::trace!("vCPU {index}: write to unclaimed port {port:#x}");
                    }
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !mmio.read(addr, data) {
                        tracing::debug!("vCPU {index}: read of unclaimed MMIO {addr:#x}");
                    }
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !mmio.write(addr, data) {
                        tracing::debug!("vCPU {index}: write to unclaimed MMIO {addr:#x}");
                    }
                    None
                }
                Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) => None,
                Ok(VcpuExit::Shutdown) => Some("triple fault (KVM_EXIT_SHUTDOWN)".to_string()),
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => {
                        exit.trigger(ExitReason::PowerOff);
                        None
                    }
                    KVM_SYSTEM_EVENT_RESET => {
                        exit.trigger(ExitReason::Reboot);
                        None
                    }
                    KVM_SYSTEM_EVENT_CRASH => Some("guest crash event".to_string()),
                    other => Some(format!("system event {other}")),
                },
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(format!(
                    "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                )),
                Ok(VcpuExit::InternalError) => Some(internal_error(&mut fd)),
                Ok(other) => Some(format!("unexpected exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(format!("KVM_RUN: {e}")),
            };
            // A failure names itself and shows the vCPU's state, so a guest
            // that died can be diagnosed from the VMM's log alone.
            if let Some(why) = failure {
                tracing::error!("vCPU {index}: {why}\n{}", dump::describe(&fd, &mem));
                exit.trigger(ExitReason::Failed(format!("vCPU {index}: {why}")));
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

/// KVM's account of a KVM_EXIT_INTERNAL_ERROR, from the run structure.
fn internal_error(fd: &mut VcpuFd) -> String {
    let run = fd.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which KVM
    // fills the `internal` member of the union.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = usize::try_from(internal.ndata)
        .unwrap_or(usize::MAX)
        .min(internal.data.len());
    dump::internal_error(internal.suberror, &internal.data[..n])
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
