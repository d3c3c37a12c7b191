//! podvisor's hypervisor layer: runs one VM as a set of supervised host
//! processes, through one of two backends, and links no KVM code (the KVM
//! probe runs out of process, `podvisor-vmm --probe`).
//!
//! A backend turns a [`VmSpec`] into a [`RunningVm`]: the VM process and
//! its helpers (vsock, virtio-fs), each a supervised child, plus the
//! hybrid-vsock socket the agent is reached through. Everything above this
//! crate (the shim's sandbox and task service, the test harness) sees only
//! that.
//!
//! - [`vmm`]: the in-tree VMM (`podvisor-vmm`), driven by its JSON config
//!   (`podvisor-vmm-config`), where the probe finds KVM runs guest code at
//!   hardware speed;
//! - [`qemu`]: QEMU `-M q35`, KVM when the probe finds it fast, TCG
//!   otherwise, vsock through `vhost-device-vsock`;
//! - [`virtiofsd`]: the shared directory, for both;
//! - [`template`]: warm start, VMs restored from a saved template (QEMU;
//!   [`qmp`] drives it);
//! - [`tap`]: the NICs' taps, opened or given to the VM;
//! - [`process`]: supervision of every process above;
//! - [`jail`]: how those processes are confined on the host;
//! - [`probe`]: the KVM probe's verdict, cached once per host boot;
//! - [`select`]: which backend a VM gets, and why.

pub mod jail;
pub mod probe;
pub mod process;
pub mod qemu;
mod qmp;
mod tap;
pub mod template;
pub mod virtiofsd;
pub mod vmm;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use podvisor_names::paths;
use serde::Deserialize;

pub use jail::Jail;
pub use podvisor_vmm_config::CpuidBits;
pub use probe::Verdict;
pub use process::{describe_exit, log_tails, run_in_netns, Supervised};
pub use qemu::Accel;

/// The guest CID; each VM has its own vsock device, so one value serves all.
const GUEST_CID: u32 = 3;

/// Kernel parameters every podvisor guest gets, on either backend: the
/// serial console; and a guest kernel that oopses or panics ends its VM at
/// once (panic, then reboot, which ends the VM process), so the pod's
/// containers are reported dead instead of hanging in a kernel that can no
/// longer finish them. (Seen here: Debian 6.1's "Busy inodes after
/// unmount of virtiofs" BUG when a pod is stopped right after it started
/// left the pause process unkillable and StopPodSandbox hanging.) The
/// dummy driver makes no `dummy0` of its own, so a privileged container's
/// `ip link add dummy0 type dummy` finds the name free, as on a host.
const GUEST_PARAMS: &str = "console=ttyS0 panic=-1 oops=panic quiet dummy.numdummies=0";

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("starting {name} ({program}): {source}")]
    Spawn {
        name: &'static str,
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("{name} exited ({status}) before it was ready; see {log}")]
    EarlyExit {
        name: &'static str,
        status: String,
        log: PathBuf,
    },
    #[error("{name} did not create {path} within {after:?}")]
    NotReady {
        name: &'static str,
        path: PathBuf,
        after: Duration,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("QMP {command}: {desc}")]
    Qmp { command: String, desc: String },
    #[error("template {dir}: {reason}")]
    Template { dir: PathBuf, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// What a VM is made of.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The kernel QEMU boots (a bzImage).
    pub kernel: PathBuf,
    /// The same kernel uncompressed (an ELF vmlinux), which the in-tree VMM
    /// boots instead, without the bzImage's decompressor; none: it boots
    /// `kernel`.
    pub vmlinux: Option<PathBuf>,
    pub initramfs: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Appended to the base kernel command line.
    pub kernel_params: String,
    /// The VM's directory: the processes' logs (<process>.log), kept
    /// root's; the VM's own files go in [`VmSpec::vm_dir`] below it.
    pub dir: PathBuf,
    /// The hybrid-vsock UDS to expose, in [`VmSpec::vm_dir`] (the caller
    /// may listen on `<vsock>_<port>` for guest-initiated connections
    /// before launch, after [`Jail::prepare`]).
    pub vsock: PathBuf,
    /// Shared with the guest as virtio-fs tag `podvisor`.
    pub shared_dir: PathBuf,
    /// virtio-net devices, each on an existing tap.
    pub net: Vec<NetDevice>,
    /// The network namespace the VM process runs in (where its taps are);
    /// none and no NICs: a new, empty one of its own.
    pub netns: Option<PathBuf>,
    /// CPUID bits the guest must not see (the in-tree VMM applies them;
    /// QEMU's backend says it cannot).
    pub cpuid_hide: Vec<CpuidBits>,
    /// The id the VM's processes run as ([`jail::ids`]); none: leased by
    /// [`Jail::prepare`] when the jail is on.
    pub owner: Option<jail::ids::Owner>,
}

/// The subdirectory of a VM's directory its own processes write in (its
/// console, sockets, a template's memory), owned by the VM's id; the rest
/// of the VM's directory stays root's, so that nothing the host writes as
/// root goes where the VM's processes could plant a link.
pub const VM_DIR: &str = "vm";

impl VmSpec {
    /// Where the VM's own processes write: see [`VM_DIR`].
    pub fn vm_dir(&self) -> PathBuf {
        self.dir.join(VM_DIR)
    }

    /// The guest's console log, written by the VM process.
    pub fn console(&self) -> PathBuf {
        self.vm_dir().join("console.log")
    }

    /// The hybrid-vsock UDS for a VM in `dir`.
    pub fn vsock_in(dir: &Path) -> PathBuf {
        dir.join(VM_DIR).join("vm.vsock")
    }
}

/// A guest NIC: the host tap it is attached to and the MAC the guest sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDevice {
    pub tap: String,
    pub mac: String,
}

#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Backend and acceleration, for logs and figures ("qemu/tcg").
    fn describe(&self) -> String;

    /// Starts the VM and its helpers; returns once they run (not once the
    /// guest has booted: dial the agent for that).
    async fn launch(&self, spec: &VmSpec) -> Result<RunningVm, HypervisorError>;

    /// The program the VM process runs (part of a template's key).
    fn program(&self) -> &Path;

    /// Boots `spec` as a warm-start template (no vsock, shared directory
    /// or NIC: each clone gets its own hot-plugged) up to its agent
    /// serving, and saves it into `spec.dir` ([`template::MEMORY`],
    /// [`template::STATE`]).
    async fn save_template(&self, spec: &VmSpec) -> Result<(), HypervisorError> {
        let _ = spec;
        Err(HypervisorError::Unavailable(format!(
            "{} has no warm start yet",
            self.describe()
        )))
    }

    /// Whether this backend saves templates and restores clones.
    fn has_warm_start(&self) -> bool {
        false
    }

    /// Takes over a clone restored ahead by another process (a pool VM:
    /// `processes` adopted, the VM process first), plugs `spec`'s NICs
    /// into it and returns it; its agent already serves.
    async fn adopt(
        &self,
        spec: &VmSpec,
        processes: Vec<Supervised>,
    ) -> Result<RunningVm, HypervisorError> {
        let _ = (spec, processes);
        Err(HypervisorError::Unavailable(format!(
            "{} has no warm start yet",
            self.describe()
        )))
    }

    /// Starts a clone of `template` with `spec`'s vsock, shared directory
    /// and NICs, resumed; its agent reports ready as a cold boot's does.
    async fn restore(
        &self,
        spec: &VmSpec,
        template: &template::Template,
    ) -> Result<RunningVm, HypervisorError> {
        let _ = (spec, template);
        Err(HypervisorError::Unavailable(format!(
            "{} has no warm start yet",
            self.describe()
        )))
    }
}

/// Which backend runs a VM, as the node config or a pod's annotation says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    /// The in-tree VMM where KVM is fast, else QEMU.
    Auto,
    Vmm,
    Qemu,
}

impl HypervisorKind {
    /// As the config and the annotation spell it.
    pub fn name(self) -> &'static str {
        match self {
            HypervisorKind::Auto => "auto",
            HypervisorKind::Vmm => "vmm",
            HypervisorKind::Qemu => "qemu",
        }
    }
}

impl std::str::FromStr for HypervisorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            HypervisorKind::Auto,
            HypervisorKind::Vmm,
            HypervisorKind::Qemu,
        ]
        .into_iter()
        .find(|k| k.name() == s)
        .ok_or_else(|| format!("unknown hypervisor {s:?} (auto, vmm or qemu)"))
    }
}

/// The programs the backends run (`[paths]` of the node config).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Paths {
    pub vmm: PathBuf,
    pub qemu: PathBuf,
    pub virtiofsd: PathBuf,
    pub vhost_device_vsock: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            vmm: paths::VMM.into(),
            qemu: "qemu-system-x86_64".into(),
            virtiofsd: "/usr/lib/qemu/virtiofsd".into(),
            vhost_device_vsock: paths::VHOST_DEVICE_VSOCK.into(),
        }
    }
}

/// The backend for `kind`, with the reason for the choice. `auto` asks the
/// KVM probe (its verdict cached under `state_root` for the host's boot):
/// the in-tree VMM where guest code runs at hardware speed, else QEMU (KVM
/// when usable at speed, TCG otherwise).
pub async fn select(
    kind: HypervisorKind,
    paths: &Paths,
    jail: Jail,
    state_root: &Path,
) -> Result<(Box<dyn Hypervisor>, String), HypervisorError> {
    let verdict = probe::verdict(&paths.vmm, state_root).await;
    let fast = verdict.is_fast();
    let accel = if fast { Accel::Kvm } else { Accel::Tcg };
    let qemu = || -> Box<dyn Hypervisor> { Box::new(qemu::Qemu::new(paths.clone(), accel, jail)) };
    Ok(match (kind, fast) {
        (HypervisorKind::Vmm, true) | (HypervisorKind::Auto, true) => (
            Box::new(vmm::Vmm::new(paths.clone(), jail)),
            format!("{kind:?} -> vmm: {verdict}"),
        ),
        (HypervisorKind::Vmm, false) => {
            if matches!(verdict, Verdict::Unavailable(_)) {
                return Err(HypervisorError::Unavailable(format!(
                    "hypervisor \"vmm\" needs /dev/kvm: {verdict}"
                )));
            }
            (
                Box::new(vmm::Vmm::new(paths.clone(), jail)),
                format!("Vmm -> vmm as configured, although {verdict}"),
            )
        }
        (HypervisorKind::Qemu, _) | (HypervisorKind::Auto, false) => (
            qemu(),
            format!("{kind:?} -> qemu with {}: {verdict}", accel.name()),
        ),
    })
}

/// A started VM: the VM process and its helpers.
#[derive(Debug)]
pub struct RunningVm {
    /// The VM process (QEMU or podvisor-vmm).
    pub vm: Supervised,
    pub helpers: Vec<Supervised>,
    /// Host end of the guest's vsock (hybrid-vsock UDS).
    pub vsock: PathBuf,
    pub describe: String,
}

impl RunningVm {
    /// How the VM process ended (`status`), in words, with each helper
    /// that ended already (often the reason: its seccomp filter, a kill).
    pub fn describe_end(&self, status: Option<std::process::ExitStatus>) -> String {
        let mut text = status
            .map(describe_exit)
            .unwrap_or_else(|| "status unknown".into());
        for h in &self.helpers {
            if let Some(st) = h.exited() {
                text.push_str(&format!("; {} had ended: {}", h.name, describe_exit(st)));
            }
        }
        text
    }

    /// Waits up to `grace` for the VM process to exit by itself (the guest
    /// powered off), then kills it and every helper.
    pub async fn stop(&mut self, grace: Duration) {
        if tokio::time::timeout(grace, self.vm.wait()).await.is_err() {
            tracing::warn!("VM did not power off within {grace:?}; killing it");
        }
        self.vm.kill().await;
        for h in &mut self.helpers {
            h.kill().await;
        }
    }

    /// Lets the VM process and the helpers run on unsupervised, for another
    /// process to adopt ([`Hypervisor::adopt`]); returns their names and
    /// pids, the VM process first.
    pub fn release(self) -> Vec<(&'static str, u32)> {
        std::iter::once(self.vm)
            .chain(self.helpers)
            .map(|s| (s.name, s.release()))
            .collect()
    }

    /// Pids of the VM process and the helpers, with their names.
    pub fn processes(&self) -> Vec<(&'static str, u32)> {
        std::iter::once(&self.vm)
            .chain(self.helpers.iter())
            .map(|s| (s.name, s.pid))
            .collect()
    }
}
