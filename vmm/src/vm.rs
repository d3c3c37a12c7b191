//! Building a VM from its config and running it.
//!
//! [`Vm::build`] does everything that can fail on bad input before any
//! vCPU runs: KVM setup (irqchip, PIT), guest memory, devices, ACPI and MP
//! tables, kernel and initramfs, vCPU registers; or, for a config that
//! restores a snapshot, its memory and saved state instead of a boot.
//! [`Vm::run`] starts one thread per vCPU and runs the device event loop
//! on the calling thread until the guest powers off, reboots or fails, or
//! the control socket stops it. [`Handle`] is what the control socket may
//! do meanwhile: pause, snapshot, resume.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::acpi::{self, MmioDevice};
use crate::arch::boot::{self, BootSpec};
use crate::arch::layout::{self, ACPI_PM, COM1, I8042, KVM_IDENTITY_MAP, KVM_TSS};
use crate::arch::state::{self, StateError};
use crate::arch::{cpuid, mptable, regs};
use crate::control::{Control, ControlSocket, Facts};
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::i8042::I8042;
use crate::devices::serial::Serial;
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::{
    block::Block, fs::Fs, net::Net, rng::Rng, vsock::Vsock, VirtioDevice,
};
use crate::devices::Bus;
use crate::exit::{ExitReason, ExitSignal};
use crate::memory::{self, GuestMemoryMmap};
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::{self, SnapshotError, VmState};
use crate::vcpu::{self, Pause, Vcpu};
use podvisor_vmm_config::{parse_mac, VmConfig};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] podvisor_vmm_config::ConfigError),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM on this host allows {max} vCPUs; the VM asks for {wanted}")]
    TooManyVcpus { max: usize, wanted: u8 },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error("restoring the snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    #[error("restoring the snapshot: {0}")]
    State(#[from] StateError),
    #[error("restoring the snapshot: vCPU {index}: {source}")]
    Vcpu { index: u8, source: StateError },
    #[error("{what}: {source}")]
    Device {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { what, source }
}

fn dev_err<E: std::error::Error + Send + Sync + 'static>(
    what: String,
) -> impl FnOnce(E) -> BuildError {
    move |e| BuildError::Device {
        what,
        source: Box::new(e),
    }
}

/// A built VM, ready to run.
#[derive(Debug)]
pub struct Vm {
    _kvm: Kvm,
    handle: Arc<Handle>,
    vcpus: Vec<Vcpu>,
    control: Option<ControlSocket>,
    mmio_devices: Vec<MmioDevice>,
}

/// A running VM as the control socket sees it: enough to pause it, save
/// it and let it go on.
#[derive(Debug)]
pub struct Handle {
    vm: VmFd,
    mem: GuestMemoryMmap,
    facts: Facts,
    pause: Arc<Pause>,
    exit: Arc<ExitSignal>,
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Why this host cannot save this VM, if it cannot.
    no_snapshot: Option<String>,
}

/// The virtio devices a config asks for, by name, in slot order.
type NamedDevices = Vec<(String, Box<dyn VirtioDevice>)>;

/// The virtio devices on the MMIO bus: their transports and windows.
struct Attached {
    mmio: Bus,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    windows: Vec<MmioDevice>,
}

/// The port-I/O devices with state a snapshot keeps.
struct Legacy {
    pio: Bus,
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
}

/// How long every vCPU may take to leave the guest for a pause.
const PAUSE_WITHIN: Duration = Duration::from_secs(5);

fn locked<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Vm {
    /// Builds the VM in named steps (Firecracker's builder is the model);
    /// every step that can fail on bad input runs before any vCPU does.
    /// A config with `restore` resumes that snapshot instead of booting.
    pub fn build(config: &VmConfig) -> Result<Vm, BuildError> {
        let build_started = Instant::now();
        config.validate()?;
        let saved = match &config.restore {
            Some(r) => {
                let s = VmState::read(&r.state)?;
                s.check_shape(config)?;
                Some(s)
            }
            None => None,
        };
        let (kvm, vm) = create_vm(config)?;
        // Guest RAM first: on a nested host, a memory slot added after the
        // in-kernel irqchip costs milliseconds more.
        let mem = match &config.restore {
            Some(r) => memory::load(&r.memory, config.memory_mib)?,
            None => memory::create(config.memory_mib)?,
        };
        register_memory(&vm, &mem)?;
        platform(&vm)?;
        let exit = Arc::new(ExitSignal::new().map_err(dev_err("exit eventfd".into()))?);
        let legacy = legacy_devices(&vm, config, &exit, saved.as_ref())?;
        let attached = attach_virtio(&vm, &mem, virtio_devices(config)?)?;
        let boot = match &saved {
            Some(_) => None,
            None => Some(load_guest(config, &mem, &attached.windows)?),
        };
        let no_snapshot = state::check_xsave(&kvm).err().map(|e| e.to_string());
        let msrs = Arc::new(state::msr_list(&kvm)?);
        let pause = Arc::new(Pause::default());
        let vcpus = create_vcpus(&kvm, &vm, config, boot, |index, fd| Vcpu {
            index,
            fd,
            pio: legacy.pio.clone(),
            mmio: attached.mmio.clone(),
            exit: exit.clone(),
            pause: pause.clone(),
            msrs: msrs.clone(),
            mem: mem.clone(),
            build_started: (index == 0).then_some(build_started),
        })?;
        if let Some(s) = &saved {
            if let Some(why) = &no_snapshot {
                return Err(BuildError::Snapshot(SnapshotError::Host(why.clone())));
            }
            // The vCPUs first: restoring the interrupt controllers may
            // deliver to their LAPICs. The devices last: what they raise
            // on restore must meet restored controllers.
            for (v, st) in vcpus.iter().zip(&s.vcpus) {
                state::restore_vcpu(&v.fd, st).map_err(|source| BuildError::Vcpu {
                    index: v.index,
                    source,
                })?;
            }
            state::restore_platform(&vm, &s.platform)?;
            restore_transports(&attached.transports, s)?;
            locked(&legacy.serial).retrigger();
            tracing::info!(
                "restored a snapshot in {:.2} ms",
                build_started.elapsed().as_secs_f64() * 1000.0
            );
        }
        let handle = Arc::new(Handle {
            vm,
            mem,
            facts: Facts {
                vcpus: config.vcpus,
                memory_mib: config.memory_mib,
            },
            pause,
            exit,
            serial: legacy.serial,
            i8042: legacy.i8042,
            transports: attached.transports,
            no_snapshot,
        });
        let control = control_socket(config, &handle)?;
        Ok(Vm {
            _kvm: kvm,
            handle,
            vcpus,
            control,
            mmio_devices: attached.windows,
        })
    }

    /// Guest memory, as built (for inspection before `run`).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.handle.mem
    }

    /// The virtio-mmio windows, in slot order.
    pub fn mmio_devices(&self) -> &[MmioDevice] {
        &self.mmio_devices
    }

    /// Lets another thread (a signal handler thread) end the VM.
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.handle.exit.clone()
    }

    /// Runs the VM to its end.
    pub fn run(mut self) -> ExitReason {
        let reason = self.run_inner();
        drop(self.control.take());
        reason
    }

    fn run_inner(&mut self) -> ExitReason {
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => return ExitReason::Failed(format!("epoll: {e}")),
        };
        // Token: 0 exit; then (transport << 16) | (1 << 15 for a device fd) | index.
        const EXIT: u64 = u64::MAX;
        // Kick eventfds are level-triggered (kick() reads them); device fds
        // are edge-triggered and each device drains what it can, so a
        // device waiting for guest buffers does not spin the loop.
        let watch = |fd: RawFd, token: u64, events: EventSet| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(|e| ExitReason::Failed(format!("epoll_ctl: {e}")))
        };
        let h = self.handle.clone();
        if let Err(r) = watch(h.exit.eventfd().as_raw_fd(), EXIT, EventSet::IN) {
            return r;
        }
        for (ti, t) in h.transports.iter().enumerate() {
            let Ok(t) = t.lock() else { continue };
            let base = (ti as u64) << 16;
            if t.handles_kicks() {
                for (q, k) in t.kick_eventfds().iter().enumerate() {
                    if let Err(r) = watch(k.as_raw_fd(), base | q as u64, EventSet::IN) {
                        return r;
                    }
                }
            }
            for (i, fd) in t.device_fds().into_iter().enumerate() {
                if let Err(r) = watch(
                    fd,
                    base | 1 << 15 | i as u64,
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                ) {
                    return r;
                }
            }
        }

        let mut threads = Vec::new();
        for v in self.vcpus.drain(..) {
            let index = v.index;
            match v.spawn() {
                Ok(t) => threads.push(t),
                Err(e) => {
                    h.exit
                        .trigger(ExitReason::Failed(format!("starting vCPU {index}: {e}")));
                    break;
                }
            }
        }

        // Installed once the vCPUs (each with its own filter) have started.
        if let Err(e) = seccomp::apply(ThreadKind::Vmm) {
            h.exit.trigger(ExitReason::Failed(e.to_string()));
        }
        let mut events = vec![EpollEvent::default(); 32];
        'outer: while !h.exit.is_set() {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    h.exit
                        .trigger(ExitReason::Failed(format!("epoll_wait: {e}")));
                    break;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token == EXIT {
                    break 'outer;
                }
                let Some(t) = h.transports.get((token >> 16) as usize) else {
                    continue;
                };
                let Ok(mut t) = t.lock() else { continue };
                let index = (token & 0x7fff) as usize;
                if token & (1 << 15) != 0 {
                    t.fd_ready(index);
                } else {
                    t.kick(index);
                }
            }
        }
        vcpu::stop_all(threads, Duration::from_secs(5));
        h.exit
            .reason()
            .unwrap_or_else(|| ExitReason::Failed("the VM stopped without a reason".into()))
    }
}

/// The configured command line, plus the virtio-mmio devices when the
/// config asks for them there.
fn kernel_cmdline(config: &VmConfig, devices: &[MmioDevice]) -> String {
    let mut c = config.cmdline.clone();
    if config.mmio_on_cmdline {
        for d in devices {
            c.push_str(&format!(" virtio_mmio.device=4K@{:#x}:{}", d.addr, d.gsi));
        }
    }
    c.trim().to_string()
}

/// Opens KVM and creates the VM, checking KVM allows its vCPUs.
fn create_vm(config: &VmConfig) -> Result<(Kvm, VmFd), BuildError> {
    let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
    let max = kvm.get_max_vcpus();
    if usize::from(config.vcpus) > max {
        return Err(BuildError::TooManyVcpus {
            max,
            wanted: config.vcpus,
        });
    }
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    Ok((kvm, vm))
}

/// Guest RAM, registered with KVM slot by slot.
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), BuildError> {
    for (slot, r) in mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: u32::try_from(slot).map_err(|e| dev_err("memory slot".into())(e))?,
            flags: 0,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
        };
        // SAFETY: the mapping lives in the VM's handle, as long as the VM
        // fd it is registered with.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// KVM's platform pieces: TSS and identity map, the in-kernel IOAPIC and
/// LAPICs, the PIT.
fn platform(vm: &VmFd) -> Result<(), BuildError> {
    vm.set_tss_address(KVM_TSS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_CREATE_PIT2"))
}

fn bus_err(e: crate::devices::BusOverlap) -> BuildError {
    BuildError::Device {
        what: "bus".into(),
        source: Box::new(e),
    }
}

/// The port-I/O bus: serial console, i8042 (reset), ACPI power register;
/// the first two in a snapshot's state when there is one.
fn legacy_devices(
    vm: &VmFd,
    config: &VmConfig,
    exit: &Arc<ExitSignal>,
    saved: Option<&VmState>,
) -> Result<Legacy, BuildError> {
    let mut pio = Bus::default();
    let console: Box<dyn Write + Send> = match &config.console {
        Some(p) => Box::new(LineWriter::new(
            File::create(p).map_err(dev_err(format!("console {}", p.display())))?,
        )),
        None => Box::new(std::io::sink()),
    };
    let serial_irq = irqfd(vm, layout::COM1_GSI)?;
    let serial = match saved {
        Some(s) => Serial::restored(serial_irq, console, &s.serial)
            .map_err(|e| BuildError::Snapshot(SnapshotError::Mismatch(e)))?,
        None => Serial::new(serial_irq, console),
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(u64::from(COM1), 8, serial.clone())
        .map_err(bus_err)?;
    let mut i8042 = I8042::new(exit.clone());
    if let Some(s) = saved {
        i8042.restore(&s.i8042);
    }
    let i8042 = Arc::new(Mutex::new(i8042));
    pio.insert(u64::from(I8042), 5, i8042.clone())
        .map_err(bus_err)?;
    pio.insert(
        u64::from(ACPI_PM),
        2,
        Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
    )
    .map_err(bus_err)?;
    Ok(Legacy { pio, serial, i8042 })
}

/// Puts each saved transport back in its slot (guest memory loaded).
fn restore_transports(
    transports: &[Arc<Mutex<MmioTransport>>],
    saved: &VmState,
) -> Result<(), BuildError> {
    for (t, s) in transports.iter().zip(&saved.devices) {
        locked(t)
            .restore(s)
            .map_err(|e| BuildError::Snapshot(SnapshotError::Mismatch(e)))?;
    }
    Ok(())
}

/// Each virtio device the config asks for, opened (sockets bound, backends
/// connected, disks and taps opened).
fn virtio_devices(config: &VmConfig) -> Result<NamedDevices, BuildError> {
    let mut devices: NamedDevices = Vec::new();
    if let Some(v) = &config.vsock {
        let d = Vsock::new(u64::from(v.cid), &v.uds)
            .map_err(dev_err(format!("vsock socket {}", v.uds.display())))?;
        devices.push(("vsock".into(), Box::new(d)));
    }
    for (i, f) in config.fs.iter().enumerate() {
        let d = Fs::connect(&f.socket, &f.tag)
            .map_err(dev_err(format!("virtio-fs backend {}", f.socket.display())))?;
        devices.push((format!("fs{i}"), Box::new(d)));
    }
    for (i, b) in config.block.iter().enumerate() {
        let d = Block::open(&b.path, b.read_only, &format!("podvisor-vd{i}"))
            .map_err(dev_err(format!("disk {}", b.path.display())))?;
        devices.push((format!("block{i}"), Box::new(d)));
    }
    for (i, n) in config.net.iter().enumerate() {
        let mac = n
            .mac
            .as_deref()
            .map(parse_mac)
            .transpose()
            .map_err(|e| BuildError::Device {
                what: format!("net{i}"),
                source: e.into(),
            })?;
        let d = Net::open_tap(&n.tap, mac).map_err(dev_err(format!("tap {}", n.tap)))?;
        devices.push((format!("net{i}"), Box::new(d)));
    }
    if config.rng {
        devices.push(("rng".into(), Box::new(Rng::new())));
    }
    Ok(devices)
}

/// Puts each device behind a virtio-mmio transport in its slot: MMIO
/// window, interrupt, and an ioeventfd per queue.
fn attach_virtio(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    devices: NamedDevices,
) -> Result<Attached, BuildError> {
    let mut attached = Attached {
        mmio: Bus::default(),
        transports: Vec::new(),
        windows: Vec::new(),
    };
    for (i, (name, dev)) in devices.into_iter().enumerate() {
        let (addr, gsi) = layout::virtio_slot(i);
        let irq = irqfd(vm, gsi)?;
        let t = MmioTransport::new(dev, mem.clone(), irq, name.clone())
            .map_err(dev_err(name.clone()))?;
        for (q, kick) in t.kick_eventfds().iter().enumerate() {
            let q = u32::try_from(q).map_err(|e| dev_err(name.clone())(e))?;
            vm.register_ioevent(kick, &IoEventAddress::Mmio(addr + REG_QUEUE_NOTIFY), q)
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
        }
        let t = Arc::new(Mutex::new(t));
        attached
            .mmio
            .insert(addr, layout::VIRTIO_MMIO_SIZE, t.clone())
            .map_err(bus_err)?;
        attached.transports.push(t);
        attached.windows.push(MmioDevice { addr, gsi });
    }
    Ok(attached)
}

/// What the guest boots from: ACPI and MP tables, boot page tables and
/// GDT, kernel, initramfs and command line. Returns the entry point.
fn load_guest(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    windows: &[MmioDevice],
) -> Result<u64, BuildError> {
    let rsdp = acpi::write(mem, config.vcpus, windows)?;
    let cmdline = kernel_cmdline(config, windows);
    mptable::write(mem, config.vcpus)?;
    regs::write_boot_tables(mem)?;
    let entry = boot::load(
        mem,
        &BootSpec {
            kernel: &config.kernel,
            initramfs: config.initramfs.as_deref(),
            cmdline: &cmdline,
            rsdp,
        },
    )?;
    Ok(entry.rip)
}

/// One vCPU per config vCPU with its CPUID; for a boot (`rip` given)
/// also boot MSRs, FPU, LAPIC LINTs, and for the boot vCPU 64-bit mode at
/// `rip` (the others wait for INIT/SIPI). A restore sets the rest.
fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    config: &VmConfig,
    rip: Option<u64>,
    make: impl Fn(u8, kvm_ioctls::VcpuFd) -> Vcpu,
) -> Result<Vec<Vcpu>, BuildError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let amd = cpuid::is_amd(&supported);
    let mut vcpus = Vec::new();
    for index in 0..config.vcpus {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&cpuid::for_vcpu(
            &supported,
            index,
            config.vcpus,
            &config.cpuid_hide,
        ))
        .map_err(kvm_err("KVM_SET_CPUID2"))?;
        if let Some(rip) = rip {
            regs::setup_msrs(&fd)?;
            if amd {
                regs::setup_amd_hwcr(&fd);
            }
            regs::setup_fpu(&fd)?;
            regs::setup_lint(&fd)?;
            if index == 0 {
                regs::setup_sregs(&fd)?;
                regs::setup_regs(&fd, rip)?;
            }
        }
        vcpus.push(make(index, fd));
    }
    Ok(vcpus)
}

/// The control socket, where the config names one.
fn control_socket(
    config: &VmConfig,
    handle: &Arc<Handle>,
) -> Result<Option<ControlSocket>, BuildError> {
    let Some(p) = &config.control_socket else {
        return Ok(None);
    };
    ControlSocket::bind(p, handle.clone(), handle.exit.clone())
        .map(Some)
        .map_err(dev_err(format!("control socket {}", p.display())))
}

impl Control for Handle {
    fn facts(&self) -> Facts {
        self.facts
    }

    fn paused(&self) -> bool {
        self.pause.is_paused()
    }

    fn pause(&self) -> Result<(), String> {
        self.pause.pause(self.facts.vcpus, &self.exit, PAUSE_WITHIN)
    }

    fn resume(&self) {
        self.pause.resume();
    }

    /// Saves a paused VM with the device event loop held off (every
    /// transport locked), so that no device moves a ring or raises an
    /// interrupt between the parts: first the vCPUs (each saves itself
    /// now), then the interrupt controllers, PIT and clock, the devices,
    /// and guest memory. Each file is written aside and renamed into
    /// place, memory first: a failed snapshot leaves no state beside a
    /// memory file it does not match.
    fn snapshot(&self, memory: &Path, state: &Path) -> Result<serde_json::Value, String> {
        let started = Instant::now();
        if let Some(why) = &self.no_snapshot {
            return Err(why.clone());
        }
        if memory == state {
            return Err(format!("memory and state are both {}", memory.display()));
        }
        if !self.pause.is_paused() {
            return Err("the VM is running; pause it first".into());
        }
        let transports: Vec<MutexGuard<'_, MmioTransport>> =
            self.transports.iter().map(|t| locked(t)).collect();
        let devices = transports
            .iter()
            .map(|t| t.save())
            .collect::<Result<Vec<_>, _>>()?;
        let vcpus = self
            .pause
            .save_all(self.facts.vcpus, &self.exit, PAUSE_WITHIN)?;
        let saved = VmState {
            format: snapshot::FORMAT,
            memory_mib: self.facts.memory_mib,
            vcpus,
            platform: state::save_platform(&self.vm).map_err(|e| e.to_string())?,
            serial: locked(&self.serial).save(),
            i8042: locked(&self.i8042).save(),
            devices,
        };
        let partial = snapshot::partial(memory);
        let pages = memory::save(&self.mem, &partial).map_err(|e| e.to_string())?;
        std::fs::rename(&partial, memory)
            .map_err(|e| format!("renaming {} into place: {e}", partial.display()))?;
        saved.write(state).map_err(|e| e.to_string())?;
        drop(transports);
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!("snapshot: {pages} memory pages in {ms:.1} ms");
        Ok(serde_json::json!({"ok": true, "memory_pages": pages, "ms": ms}))
    }
}

/// An eventfd KVM injects as an edge on IOAPIC pin `gsi`.
fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd, BuildError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(dev_err(format!("irqfd for GSI {gsi}")))?;
    vm.register_irqfd(&evt, gsi).map_err(kvm_err("KVM_IRQFD"))?;
    Ok(evt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio_devices_go_on_the_cmdline_only_when_asked() {
        let mut c = VmConfig::from_json(
            r#"{"vcpus":1,"memory_mib":64,"kernel":"/k","cmdline":"console=ttyS0"}"#,
        )
        .unwrap();
        let devs = [
            MmioDevice {
                addr: 0xd000_0000,
                gsi: 5,
            },
            MmioDevice {
                addr: 0xd000_1000,
                gsi: 6,
            },
        ];
        assert_eq!(kernel_cmdline(&c, &devs), "console=ttyS0");
        c.mmio_on_cmdline = true;
        assert_eq!(
            kernel_cmdline(&c, &devs),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
    }
}
