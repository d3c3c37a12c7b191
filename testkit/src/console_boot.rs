//! podvisor's test-only `emulated` kernel (guest/kernel/build.sh) booted by
//! podvisor-vmm with 2 vCPUs and every device the VMM has (vsock, virtio-fs
//! through virtiofsd, a disk, a NIC on a tap, rng), under a /dev/kvm that
//! emulates guest kernel code: what Linux prints on the serial console is
//! all there is to read, for `tests/vmm_linux.rs` and the bench.

use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use podvisor_hypervisor::vmm::Vmm;
use podvisor_hypervisor::{run_in_netns, virtiofsd, Jail, NetDevice, Supervised, VmSpec};
use podvisor_vmm_config::{BlockConfig, CpuidBits, CpuidRegister, RestoreConfig, VmConfig};

use crate::vm::{image_dir, ip, paths, vmm_binary};

/// The MAC the guest's eth0 gets.
pub const MAC: &str = "02:70:76:00:00:2a";
/// The virtio-blk disk's size.
pub const DISK_BYTES: u64 = 8 << 20;
/// The console line of the kernel starting the image's init.
pub const RUN_INIT: &str = "Run /init as init process";
/// Where a boot is saved for a snapshot: both vCPUs run Linux, no device
/// is probed yet.
pub const SNAPSHOT_AT: &str = "smp: Brought up 1 node, 2 CPUs";

/// Where `make guest-kernel` links its output (PODVISOR_KERNEL_DIR says
/// otherwise).
pub fn kernel_dir() -> PathBuf {
    std::env::var_os("PODVISOR_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/kernel"))
}

/// A file of the emulated variant (vmlinux, bzImage, release, config).
pub fn emulated(file: &str) -> Result<PathBuf> {
    let p = kernel_dir().join("emulated").join(file);
    ensure!(
        p.exists(),
        "{} missing: run `make guest-kernel`",
        p.display()
    );
    Ok(p)
}

/// What the emulating KVM rejects in kernel mode that CPUID can hide:
/// cmpxchg16b, popcnt, xsave/xrstor (leaf 1 ECX), SMAP's clac/stac (leaf 7
/// EBX); hidden by the VMM's CPUID filter and, because a nested KVM may
/// ignore the filter's feature bits, by the kernel's own `clearcpuid=`.
pub fn hidden_features() -> (Vec<CpuidBits>, &'static str) {
    let bits = |leaf, register, bits| CpuidBits {
        leaf,
        subleaf: 0,
        register,
        bits,
    };
    (
        vec![
            bits(1, CpuidRegister::Ecx, 1 << 13 | 1 << 23 | 1 << 26 | 1 << 27),
            bits(7, CpuidRegister::Ebx, 1 << 20),
        ],
        "clearcpuid=cx16,popcnt,xsave,smap",
    )
}

/// A network namespace with one tap in it, removed on drop.
struct TapNetns {
    name: String,
}

impl TapNetns {
    fn create(tap: &str) -> Result<TapNetns> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("pv-console-boot-{}-{n}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = TapNetns { name };
        ip(&["-n", &ns.name, "tuntap", "add", tap, "mode", "tap"])?;
        ip(&["-n", &ns.name, "link", "set", tap, "up"])?;
        Ok(ns)
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for TapNetns {
    fn drop(&mut self) {
        let _ = StdCommand::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// How a console boot went.
#[derive(Debug)]
pub struct ConsoleBoot {
    pub console: String,
    pub vmm_log: String,
    /// podvisor-vmm's exit status.
    pub status: ExitStatus,
    /// From starting podvisor-vmm to [`RUN_INIT`] on the console.
    pub run_init: Option<Duration>,
    /// From starting podvisor-vmm to the console's first byte.
    pub first_output: Option<Duration>,
    /// The VMM and virtiofsd had both exited once the VM ended.
    pub helpers_gone: bool,
}

impl ConsoleBoot {
    /// The console's and the VMM log's last lines, for a failure message.
    pub fn tails(&self) -> String {
        format!(
            "console:\n{}\nvmm.log:\n{}",
            tail(&self.console, 40),
            tail(&self.vmm_log, 20)
        )
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A console boot's VM: its directory, the namespace holding its tap, and
/// what it is made of.
struct Rig {
    dir: tempfile::TempDir,
    netns: TapNetns,
    spec: VmSpec,
    disk: PathBuf,
}

impl Rig {
    fn new() -> Result<Rig> {
        let dir = tempfile::Builder::new()
            .prefix("podvisor-console-boot-")
            .tempdir()?;
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared)?;
        let disk = dir.path().join("disk.img");
        std::fs::File::create(&disk)?.set_len(DISK_BYTES)?;
        let netns = TapNetns::create("tap0")?;
        let (cpuid_hide, clearcpuid) = hidden_features();
        let spec = VmSpec {
            kernel: emulated("bzImage")?,
            vmlinux: Some(emulated("vmlinux")?),
            initramfs: image_dir().join("initramfs"),
            vcpus: 2,
            memory_mib: 256,
            // Linux's view in full; eth0 configured by the kernel (which
            // prints its MAC); neither the CPU's RNG nor the boot loader's
            // seed trusted, so only virtio-rng can seed the crng before
            // init; no RCU stall reports (emulated kernel code is slow
            // enough to trip them, and each floods the slow console).
            kernel_params: format!(
                "loglevel=7 {clearcpuid} random.trust_cpu=off random.trust_bootloader=off \
                 rcupdate.rcu_cpu_stall_suppress=1 \
                 ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off"
            ),
            dir: dir.path().to_owned(),
            vsock: VmSpec::vsock_in(dir.path()),
            shared_dir: shared,
            net: vec![NetDevice {
                tap: "tap0".into(),
                mac: MAC.into(),
            }],
            netns: Some(netns.path()),
            cpuid_hide,
            owner: None,
        };
        // The VMM runs as root here, unjailed: its own directory, root's.
        let spec = Jail {
            enabled: false,
            ..Jail::default()
        }
        .prepare(&spec)?;
        Ok(Rig {
            dir,
            netns,
            spec,
            disk,
        })
    }

    /// The VMM's config: every device, virtio-fs at `fs_sock` if given.
    fn config(&self, fs_sock: Option<&Path>) -> Result<VmConfig> {
        let mut config = Vmm::config(&self.spec, fs_sock.unwrap_or(Path::new("/")))?;
        if fs_sock.is_none() {
            config.fs.clear();
        }
        config.block.push(BlockConfig {
            path: self.disk.clone(),
            read_only: false,
        });
        config.validate()?;
        Ok(config)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts podvisor-vmm on `config` in the tap's namespace, as `name`
    /// (its config and log files are named after it).
    fn start(&self, config: &VmConfig, name: &str) -> Result<RunningVmm> {
        let config_path = self.path(&format!("{name}.json"));
        std::fs::write(&config_path, serde_json::to_vec_pretty(config)?)?;
        let mut cmd = tokio::process::Command::new(vmm_binary());
        cmd.arg("--config").arg(&config_path);
        run_in_netns(&mut cmd, Some(&self.netns.path()))?;
        let log = self.path(&format!("{name}.log"));
        let started = Instant::now();
        let vm = Supervised::spawn("podvisor-vmm", &mut cmd, &log)?;
        Ok(RunningVmm {
            vm,
            started,
            console: config.console.clone().unwrap_or_default(),
            log,
        })
    }
}

/// A podvisor-vmm process of a console boot.
struct RunningVmm {
    vm: Supervised,
    started: Instant,
    console: PathBuf,
    log: PathBuf,
}

impl RunningVmm {
    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stuck(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "podvisor-vmm {what}\nconsole:\n{}\nvmm.log:\n{}",
            tail(&self.console(), 40),
            tail(&self.log(), 20)
        )
    }

    /// Waits until `needle` is on the console.
    async fn wait_for(&mut self, needle: &str, limit: Duration) -> Result<()> {
        while !self.console().contains(needle) {
            if let Some(s) = self.vm.exited() {
                return Err(self.stuck(&format!("exited ({s}) before {needle:?}")));
            }
            if self.started.elapsed() > limit {
                self.vm.kill().await;
                return Err(self.stuck(&format!("printed no {needle:?} within {limit:?}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Waits for the VMM to exit; returns its status, and when the console
    /// had its first byte and [`RUN_INIT`].
    async fn wait_exit(&mut self, limit: Duration) -> Result<Ended> {
        let mut ended = Ended {
            status: None,
            first_output: None,
            run_init: None,
        };
        loop {
            let console = self.console();
            let at = self.started.elapsed();
            if ended.first_output.is_none() && !console.is_empty() {
                ended.first_output = Some(at);
            }
            if ended.run_init.is_none() && console.contains(RUN_INIT) {
                ended.run_init = Some(at);
            }
            if let Some(s) = self.vm.exited() {
                ended.status = Some(s);
                return Ok(ended);
            }
            if at > limit {
                self.vm.kill().await;
                return Err(self.stuck(&format!("still running after {limit:?}")));
            }
            // Finely until the first byte, which a figure is made of.
            let poll = if ended.first_output.is_none() { 5 } else { 100 };
            tokio::time::sleep(Duration::from_millis(poll)).await;
        }
    }

    /// The console boot, once the VMM has ended.
    fn ended(&self, e: Ended, helpers_gone: bool) -> Result<ConsoleBoot> {
        Ok(ConsoleBoot {
            console: self.console(),
            vmm_log: self.log(),
            status: e.status.context("the VMM has not ended")?,
            run_init: e.run_init,
            first_output: e.first_output,
            helpers_gone,
        })
    }
}

/// When a console boot's VMM ended, and what it printed when.
struct Ended {
    status: Option<ExitStatus>,
    first_output: Option<Duration>,
    run_init: Option<Duration>,
}

/// Boots the emulated vmlinux with the image's initramfs and waits up to
/// `limit` for the VMM to exit.
pub async fn boot(limit: Duration) -> Result<ConsoleBoot> {
    let rig = Rig::new()?;
    let (mut fs, fs_sock) = virtiofsd::start(&paths(), Jail::default(), &rig.spec).await?;
    let config = rig.config(Some(&fs_sock))?;
    let mut vm = rig.start(&config, "vmm")?;
    let ended = match vm.wait_exit(limit).await {
        Ok(e) => e,
        Err(e) => {
            fs.kill().await;
            return Err(e);
        }
    };
    // virtiofsd ends with its vhost-user peer; give it a moment.
    let fs_gone = tokio::time::timeout(Duration::from_secs(5), fs.wait())
        .await
        .is_ok();
    if !fs_gone {
        fs.kill().await;
    }
    vm.ended(ended, fs_gone)
}

/// A boot saved half-way and resumed by another VMM process.
#[derive(Debug)]
pub struct SnapshotBoot {
    /// The first VMM's console, up to the snapshot.
    pub before: String,
    /// The `snapshot` op's answer.
    pub saved: serde_json::Value,
    /// The restored VMM, to its end (its console holds only what the guest
    /// printed after the snapshot).
    pub restored: ConsoleBoot,
}

/// The same boot without virtio-fs (its state lives in virtiofsd, which
/// cannot save it): paused and saved once `at` is on the console, that
/// VMM killed, and a new one started from the snapshot (the same tap and
/// disk, its own console and vsock socket) and read to its end within
/// `limit`.
pub async fn snapshot_boot(at: &str, limit: Duration) -> Result<SnapshotBoot> {
    let rig = Rig::new()?;
    let mut config = rig.config(None)?;
    let control = rig.path("vmm.sock");
    config.control_socket = Some(control.clone());
    let mut first = rig.start(&config, "vmm")?;
    first.wait_for(at, limit).await?;
    let (memory, state) = (rig.path("snapshot.memory"), rig.path("snapshot.state"));
    let ask = |req: serde_json::Value| {
        let control = control.clone();
        tokio::task::spawn_blocking(move || podvisor_vmm_config::control::send(&control, &req))
    };
    let paused = ask(serde_json::json!({"op": "pause"})).await??;
    let saved =
        ask(serde_json::json!({"op": "snapshot", "memory": memory, "state": state})).await??;
    first.vm.kill().await;
    let before = first.console();
    ensure!(
        paused["ok"] == true && saved["ok"] == true,
        "pause: {paused}; snapshot: {saved}\nvmm.log:\n{}",
        tail(&first.log(), 20)
    );
    config.control_socket = None;
    config.console = Some(rig.path("console-restored.log"));
    if let Some(v) = config.vsock.as_mut() {
        v.uds = rig.path("vm-restored.vsock");
    }
    config.restore = Some(RestoreConfig { memory, state });
    let mut restored = rig.start(&config, "vmm-restored")?;
    let ended = restored.wait_exit(limit).await?;
    Ok(SnapshotBoot {
        before,
        saved,
        restored: restored.ended(ended, true)?,
    })
}
