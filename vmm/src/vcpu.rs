//! One thread per vCPU: `KVM_RUN` in a loop, port I/O and MMIO exits
//! routed to the buses, every other exit turned into a VM exit reason.
//! [`stop_all`] interrupts the vCPUs blocked in the guest so they see the
//! VM end; [`Pause`] parks them, and has them save their state, for a
//! snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::arch::dump;
use crate::arch::state::{self, VcpuState};
use crate::devices::Bus;
use crate::exit::{ExitReason, ExitSignal};
use crate::memory::GuestMemoryMmap;
use crate::seccomp::{self, ThreadKind};

#[derive(Debug)]
pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: Arc<ExitSignal>,
    pub pause: Arc<Pause>,
    /// The MSRs a paused vCPU saves.
    pub msrs: Arc<Vec<u32>>,
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
    pub fn run(mut self) {
        if let Err(e) = seccomp::apply(ThreadKind::Vcpu) {
            self.exit
                .trigger(ExitReason::Failed(format!("vCPU {}: {e}", self.index)));
            return;
        }
        if let Some(t) = self.build_started {
            tracing::info!(
                "vCPU {}: first KVM_RUN {:.2} ms after the VM build began",
                self.index,
                t.elapsed().as_secs_f64() * 1000.0
            );
        }
        self.pause.register(self.index);
        while !self.exit.is_set() {
            if self.pause.is_paused() {
                self.park();
            } else {
                self.run_once();
            }
        }
        self.pause.deregister(self.index);
        tracing::debug!("vCPU {} stopped", self.index);
    }

    /// Leaves the guest with KVM's in-flight I/O completed, then waits for
    /// resume (or the VM's end), saving this vCPU's state whenever asked.
    fn park(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        // KVM completes the exit we served, then returns EINTR at once (a
        // string I/O instruction may exit to us again first).
        let mut settled = false;
        for _ in 0..64 {
            if self.run_once() {
                settled = true;
                break;
            }
            if self.exit.is_set() {
                break;
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        let (index, fd, msrs) = (self.index, &self.fd, &self.msrs);
        self.pause.park(index, &self.exit, || {
            if !settled {
                return Err(format!(
                    "vCPU {index} kept exiting with I/O in flight; not saved"
                ));
            }
            state::save_vcpu(fd, msrs).map_err(|e| format!("saving vCPU {index}: {e}"))
        });
    }

    /// One `KVM_RUN` and its exit; true when it was interrupted (a kick,
    /// or `immediate_exit`).
    fn run_once(&mut self) -> bool {
        let index = self.index;
        let exit = &self.exit;
        let mut interrupted = false;
        let failure = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.pio.read(u64::from(port), data) {
                    tracing::trace!("vCPU {index}: read of unclaimed port {port:#x}");
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !self.pio.write(u64::from(port), data) {
                    tracing::trace!("vCPU {index}: write to unclaimed port {port:#x}");
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio.read(addr, data) {
                    tracing::debug!("vCPU {index}: read of unclaimed MMIO {addr:#x}");
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !self.mmio.write(addr, data) {
                    tracing::debug!("vCPU {index}: write to unclaimed MMIO {addr:#x}");
                }
                None
            }
            Ok(VcpuExit::Hlt) => None,
            Ok(VcpuExit::Intr) => {
                interrupted = true;
                None
            }
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
            Ok(VcpuExit::InternalError) => Some(internal_error(&mut self.fd)),
            Ok(other) => Some(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                interrupted = true;
                None
            }
            Err(e) => Some(format!("KVM_RUN: {e}")),
        };
        // A failure names itself and shows the vCPU's state, so a guest
        // that died can be diagnosed from the VMM's log alone.
        if let Some(why) = failure {
            tracing::error!(
                "vCPU {index}: {why}\n{}",
                dump::describe(&self.fd, &self.mem)
            );
            exit.trigger(ExitReason::Failed(format!("vCPU {index}: {why}")));
        }
        interrupted
    }

    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        install_kick_handler();
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || self.run())
    }
}

/// Parks every vCPU for a snapshot. [`Pause::pause`] asks and waits until
/// each vCPU has left the guest; [`Pause::save_all`] has the parked vCPUs
/// save their state (at the moment of the snapshot, not of the pause);
/// [`Pause::resume`] lets them go on. The VM ending releases them too.
#[derive(Debug, Default)]
pub struct Pause {
    inner: Mutex<Parked>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Parked {
    requested: bool,
    /// Counts resumes (and cancelled pauses): a parked vCPU goes on once
    /// it changes, even if a new pause is asked at once.
    resumes: u64,
    /// Counts `save_all` calls: each parked vCPU saves once per call.
    saves: u64,
    /// The running vCPU threads, to kick out of `KVM_RUN`.
    threads: Vec<(u8, libc::pthread_t)>,
    parked: BTreeSet<u8>,
    /// The states saved for the current `save_all` (or why one could not
    /// be saved).
    states: BTreeMap<u8, Result<VcpuState, String>>,
}

impl Pause {
    fn lock(&self) -> MutexGuard<'_, Parked> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait<'a>(&self, p: MutexGuard<'a, Parked>, at_most: Duration) -> MutexGuard<'a, Parked> {
        self.changed
            .wait_timeout(p, at_most)
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0)
    }

    fn register(&self, index: u8) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().threads.push((index, me));
    }

    /// A thread leaves the list before it ends, so no kick is sent to a
    /// thread that is gone.
    fn deregister(&self, index: u8) {
        self.lock().threads.retain(|(i, _)| *i != index);
        self.changed.notify_all();
    }

    /// Whether a pause is asked for (or holds).
    pub fn is_paused(&self) -> bool {
        self.lock().requested
    }

    /// A vCPU out of the guest: parked until resume or the VM's end,
    /// running `save` for each `save_all`. Returns at once if the pause
    /// was cancelled meanwhile.
    fn park(
        &self,
        index: u8,
        exit: &ExitSignal,
        mut save: impl FnMut() -> Result<VcpuState, String>,
    ) {
        let mut p = self.lock();
        if !p.requested {
            return;
        }
        let (resumes, mut saved) = (p.resumes, p.saves);
        p.parked.insert(index);
        self.changed.notify_all();
        while p.resumes == resumes && !exit.is_set() {
            if p.saves != saved {
                saved = p.saves;
                let state = save();
                p.states.insert(index, state);
                self.changed.notify_all();
                continue;
            }
            p = self.wait(p, Duration::from_millis(50));
        }
        p.parked.remove(&index);
    }

    /// Parks all `vcpus` vCPUs (or finds them parked).
    pub fn pause(&self, vcpus: u8, exit: &ExitSignal, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        let mut p = self.lock();
        p.requested = true;
        while p.parked.len() < usize::from(vcpus) {
            if exit.is_set() || Instant::now() > deadline {
                p.requested = false;
                p.resumes += 1;
                self.changed.notify_all();
                return Err(if exit.is_set() {
                    "the VM is stopping".into()
                } else {
                    format!("the vCPUs did not pause within {within:?}")
                });
            }
            for (i, t) in &p.threads {
                if !p.parked.contains(i) {
                    // SAFETY: a registered thread has not ended (it
                    // deregisters under this lock first).
                    unsafe { libc::pthread_kill(*t, kick_signal()) };
                }
            }
            p = self.wait(p, Duration::from_millis(1));
        }
        Ok(())
    }

    /// Has every parked vCPU save its state now; returns them in index
    /// order.
    pub fn save_all(
        &self,
        vcpus: u8,
        exit: &ExitSignal,
        within: Duration,
    ) -> Result<Vec<VcpuState>, String> {
        let deadline = Instant::now() + within;
        let mut p = self.lock();
        if !p.requested || p.parked.len() < usize::from(vcpus) {
            return Err("the VM is running; pause it first".into());
        }
        p.saves += 1;
        p.states.clear();
        self.changed.notify_all();
        while p.states.len() < usize::from(vcpus) {
            if exit.is_set() || Instant::now() > deadline {
                return Err(format!(
                    "the vCPUs did not save their state within {within:?}"
                ));
            }
            p = self.wait(p, Duration::from_millis(1));
        }
        std::mem::take(&mut p.states).into_values().collect()
    }

    /// Lets parked vCPUs run on.
    pub fn resume(&self) {
        let mut p = self.lock();
        p.requested = false;
        p.resumes += 1;
        p.states.clear();
        self.changed.notify_all();
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
