//! One guest VM for tests and benchmarks, started through one of the
//! shim's own backends (the same processes and flags a pod gets): QEMU, or
//! the in-tree VMM. In a temporary directory, with the agent client
//! connected.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use podvisor_hypervisor::qemu::Qemu;
use podvisor_hypervisor::vmm::Vmm;
use podvisor_hypervisor::{Accel, Hypervisor, Jail, NetDevice, Paths, RunningVm, VmSpec, VM_DIR};
use podvisor_protocol::api::{self, AgentClient};
use podvisor_protocol::hybrid_vsock;

/// Where `make guest-image` puts the image, unless PODVISOR_GUEST_DIR says.
pub fn image_dir() -> PathBuf {
    std::env::var_os("PODVISOR_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest"))
}

/// A value from the image's manifest (kernel_release, ...).
pub fn manifest(key: &str) -> Result<String> {
    let path = image_dir().join("manifest");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (run `make guest-image`)", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
        .map(str::to_string)
        .with_context(|| format!("no {key} in {}", path.display()))
}

/// The accelerator for test VMs: the shim's probe (the same cached
/// verdict a pod gets), or PODVISOR_ACCEL (kvm|tcg).
pub fn detect_accel() -> (Accel, String) {
    match std::env::var("PODVISOR_ACCEL").as_deref() {
        Ok("kvm") => (Accel::Kvm, "PODVISOR_ACCEL=kvm".into()),
        Ok("tcg") => (Accel::Tcg, "PODVISOR_ACCEL=tcg".into()),
        _ => {
            // On a thread of its own, so sync and async callers alike can ask.
            let ask = || -> std::io::Result<podvisor_hypervisor::Verdict> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(rt.block_on(podvisor_hypervisor::probe::verdict(
                    &vmm_binary(),
                    Path::new(podvisor_names::paths::STATE_ROOT),
                )))
            };
            let verdict = match std::thread::scope(|s| s.spawn(ask).join()) {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => podvisor_hypervisor::Verdict::Unavailable(e.to_string()),
                Err(_) => podvisor_hypervisor::Verdict::Unavailable("probe thread panicked".into()),
            };
            let accel = if verdict.is_fast() {
                Accel::Kvm
            } else {
                Accel::Tcg
            };
            (accel, verdict.to_string())
        }
    }
}

/// A helper binary: the environment variable `env`, else `name` in PATH,
/// in the workspace's build/upstream/cri-tools (where `upstream/build.sh`
/// puts crictl) or in ~/.cargo/bin (where `cargo install` puts
/// vhost-device-vsock).
pub fn tool(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let in_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|c| c.exists())
        })
        .unwrap_or_default();
    let tools = || {
        Some(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../build/upstream/cri-tools")
                .join(name),
        )
        .filter(|p| p.exists())
    };
    let cargo_bin = || {
        std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cargo/bin").join(name))
            .filter(|p| p.exists())
    };
    in_path
        .or_else(tools)
        .or_else(cargo_bin)
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The workspace's `podvisor-vmm` (PODVISOR_VMM overrides), built in the
/// same profile as this crate.
pub fn vmm_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PODVISOR_VMM") {
        return PathBuf::from(p);
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(profile)
        .join("podvisor-vmm")
}

/// Runs `ip ARGS...` on the host; its stderr is the error.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The binaries a VM needs, as found on this machine.
pub fn paths() -> Paths {
    Paths {
        vmm: vmm_binary(),
        qemu: tool("QEMU", "qemu-system-x86_64"),
        virtiofsd: std::env::var_os("VIRTIOFSD")
            .map(PathBuf::from)
            .unwrap_or_else(|| Paths::default().virtiofsd),
        vhost_device_vsock: tool("VHOST_DEVICE_VSOCK", "vhost-device-vsock"),
    }
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub memory_mib: u32,
    pub vcpus: u32,
    /// The in-tree VMM instead of QEMU (which then uses `accel`).
    pub vmm: bool,
    pub accel: Accel,
    pub kernel_params: String,
    pub boot_timeout: Duration,
    /// NICs on existing host taps.
    pub net: Vec<NetDevice>,
    /// The guest image (kernel, initramfs, manifest): `image_dir()`.
    pub image: PathBuf,
    /// A kernel other than the image's (QEMU: a bzImage).
    pub kernel: Option<PathBuf>,
    /// How the VM's processes are confined (on, as a pod's; off only to
    /// measure what that costs, or with PODVISOR_JAIL=off to trace a
    /// helper's system calls: `hypervisor/seccomp/syscalls.sh`).
    pub jail: Jail,
}

impl VmConfig {
    pub fn new(accel: Accel) -> VmConfig {
        VmConfig {
            memory_mib: 512,
            vcpus: 1,
            vmm: false,
            accel,
            kernel_params: String::new(),
            boot_timeout: Duration::from_secs(120),
            net: Vec::new(),
            image: image_dir(),
            kernel: None,
            jail: Jail {
                enabled: std::env::var("PODVISOR_JAIL").as_deref() != Ok("off"),
                ..Jail::default()
            },
        }
    }
}

/// Fields drop in order: the VM and its helpers go before their directory.
pub struct TestVm {
    vm: RunningVm,
    pub agent: AgentClient,
    /// Time from starting the VM to the agent answering Check.
    pub boot_time: Duration,
    pub accel: Accel,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for TestVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestVm")
            .field("vm", &self.vm)
            .field("boot_time", &self.boot_time)
            .field("accel", &self.accel)
            .finish_non_exhaustive()
    }
}

impl TestVm {
    /// Boots the guest image and waits for the agent to answer Check.
    pub async fn boot(cfg: &VmConfig) -> Result<TestVm> {
        let image = &cfg.image;
        let dir = tempfile::Builder::new()
            .prefix("podvisor-test-")
            .tempdir()?;
        std::fs::create_dir(dir.path().join("shared"))?;
        let spec = VmSpec {
            kernel: cfg.kernel.clone().unwrap_or_else(|| image.join("kernel")),
            // The in-tree VMM boots the image's vmlinux where it has one,
            // as a pod's would.
            vmlinux: Some(image.join("vmlinux")).filter(|k| cfg.kernel.is_none() && k.exists()),
            initramfs: image.join("initramfs"),
            vcpus: cfg.vcpus,
            memory_mib: cfg.memory_mib,
            kernel_params: cfg.kernel_params.clone(),
            dir: dir.path().to_owned(),
            vsock: VmSpec::vsock_in(dir.path()),
            shared_dir: dir.path().join("shared"),
            net: cfg.net.clone(),
            netns: None,
            cpuid_hide: vec![],
            owner: None,
        };
        for f in [&spec.kernel, &spec.initramfs] {
            if !f.exists() {
                bail!("{} missing: run `make guest-image`", f.display());
            }
        }
        let spec = cfg.jail.prepare(&spec)?;
        let ready = hybrid_vsock::ReadyListener::bind(&spec.vsock)?;
        let started = Instant::now();
        let vm = if cfg.vmm {
            Vmm::new(paths(), cfg.jail).launch(&spec).await?
        } else {
            Qemu::new(paths(), cfg.accel, cfg.jail)
                .launch(&spec)
                .await?
        };
        let agent = tokio::select! {
            r = hybrid_vsock::connect_agent(&vm.vsock, Some(&ready), cfg.boot_timeout) => {
                r.with_context(|| format!("waiting for the agent\n{}", diagnostics(dir.path())))?
            }
            st = vm.vm.wait() => bail!(
                "{} exited during boot ({})\n{}",
                vm.vm.name,
                vm.describe_end(st),
                diagnostics(dir.path())
            ),
        };
        agent
            .check(ctx(), &api::CheckRequest::new())
            .await
            .with_context(|| format!("agent Check\n{}", diagnostics(dir.path())))?;
        Ok(TestVm {
            vm,
            agent,
            boot_time: started.elapsed(),
            accel: cfg.accel,
            dir,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The host side of the guest's /run/podvisor/shared.
    pub fn shared(&self) -> PathBuf {
        self.dir.path().join("shared")
    }

    pub fn vsock_path(&self) -> PathBuf {
        self.vm.vsock.clone()
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(VM_DIR).join("console.log"))
            .unwrap_or_default()
    }

    /// The console and helper logs, for a failure message.
    pub fn diagnostics(&self) -> String {
        diagnostics(self.dir.path())
    }

    /// Names and pids of the VM process and its helpers, the VM first.
    pub fn processes(&self) -> Vec<(&'static str, u32)> {
        self.vm.processes()
    }

    /// Pids of QEMU and the helpers, for leak checks.
    pub fn pids(&self) -> Vec<u32> {
        self.vm
            .processes()
            .into_iter()
            .map(|(_, pid)| pid)
            .collect()
    }

    /// DestroySandbox, then waits up to `within` for the VM process to exit
    /// by itself (the guest powered off), stops everything and checks that
    /// no process of the VM and not its directory is left. Returns the VM
    /// process's exit status.
    pub async fn power_off(self, within: Duration) -> Result<ExitStatus> {
        let dir = self.dir().to_owned();
        let pids = self.pids();
        let name = self.vm.vm.name;
        self.agent
            .destroy_sandbox(ctx(), &api::DestroySandboxRequest::new())
            .await?;
        let status = match tokio::time::timeout(within, self.vm.vm.wait()).await {
            Ok(Some(st)) => st,
            Ok(None) => bail!("lost track of {name}"),
            Err(_) => bail!(
                "{name} still running {within:?} after the guest was told to power off:\n{}",
                self.diagnostics()
            ),
        };
        let diagnostics = self.diagnostics();
        self.shutdown().await;
        if dir.exists() {
            bail!("{} left behind", dir.display());
        }
        for pid in pids {
            if Path::new(&format!("/proc/{pid}")).exists() {
                bail!("process {pid} of the VM still running");
            }
        }
        if !status.success() {
            bail!("{name} exited with {status} after power-off:\n{diagnostics}");
        }
        Ok(status)
    }

    /// Stops QEMU and the helpers and removes the VM's directory.
    pub async fn shutdown(mut self) {
        self.vm.stop(Duration::ZERO).await;
    }
}

fn diagnostics(dir: &Path) -> String {
    podvisor_hypervisor::log_tails(dir, 30)
}

/// A call context with a generous timeout (TCG is slow, a hang is not).
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(
        i64::try_from(Duration::from_secs(120).as_nanos()).unwrap_or(i64::MAX),
    )
}
