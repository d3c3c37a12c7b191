//! podvisor's test-only `emulated` kernel (guest/kernel/build.sh) booted by
//! podvisor-vmm with 2 vCPUs and every device the VMM has (vsock, virtio-fs
//! through virtiofsd, a disk, a NIC on a tap, rng), under a /dev/kvm that
//! emulates guest kernel code: what Linux prints on the serial console is
//! all there is to read, for `tests/vmm_linux.rs` and the bench.

use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use podvisor_hypervisor::vmm::Vmm;
use podvisor_hypervisor::{run_in_netns, virtiofsd, NetDevice, Supervised, VmSpec};
use podvisor_vmm_config::{BlockConfig, CpuidBits, CpuidRegister};

use crate::vm::{image_dir, ip, paths, vmm_binary};

/// The MAC the guest's eth0 gets.
pub const MAC: &str = "02:70:76:00:00:2a";
/// The virtio-blk disk's size.
pub const DISK_BYTES: u64 = 8 << 20;
/// The console line of the kernel starting the image's init.
pub const RUN_INIT: &str = "Run /init as init process";

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
        let name = format!("pv-console-boot-{}", std::process::id());
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

/// Boots the emulated vmlinux with the image's initramfs and waits up to
/// `limit` for the VMM to exit.
pub async fn boot(limit: Duration) -> Result<ConsoleBoot> {
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
        // Linux's view in full; eth0 configured by the kernel (which prints
        // its MAC); neither the CPU's RNG nor the boot loader's seed
        // trusted, so only virtio-rng can seed the crng before init; no
        // RCU stall reports (emulated kernel code is slow enough to trip
        // them, and each floods the slow console).
        kernel_params: format!(
            "loglevel=7 {clearcpuid} random.trust_cpu=off random.trust_bootloader=off \
             rcupdate.rcu_cpu_stall_suppress=1 \
             ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off"
        ),
        dir: dir.path().to_owned(),
        vsock: dir.path().join("vm.vsock"),
        shared_dir: shared,
        net: vec![NetDevice {
            tap: "tap0".into(),
            mac: MAC.into(),
        }],
        netns: Some(netns.path()),
        cpuid_hide,
    };
    let paths = paths();
    let (mut fs, fs_sock) = virtiofsd::start(&paths, &spec).await?;
    let mut config = Vmm::config(&spec, &fs_sock)?;
    config.block.push(BlockConfig {
        path: disk,
        read_only: false,
    });
    config.validate()?;
    let config_path = dir.path().join("vmm.json");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;

    let mut cmd = tokio::process::Command::new(vmm_binary());
    cmd.arg("--config").arg(&config_path);
    run_in_netns(&mut cmd, spec.netns.as_deref())?;
    let log = dir.path().join("vmm.log");
    let console_path = dir.path().join("console.log");
    let started = Instant::now();
    let mut vm = Supervised::spawn("podvisor-vmm", &mut cmd, &log)?;
    let mut run_init = None;
    let status = loop {
        if run_init.is_none()
            && std::fs::read_to_string(&console_path).is_ok_and(|c| c.contains(RUN_INIT))
        {
            run_init = Some(started.elapsed());
        }
        if let Some(s) = vm.exited() {
            break Some(s);
        }
        if started.elapsed() > limit {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let Some(status) = status else {
        vm.kill().await;
        fs.kill().await;
        bail!(
            "podvisor-vmm still running after {limit:?}\nconsole:\n{}\nvmm.log:\n{}",
            tail(&read(&console_path), 40),
            tail(&read(&log), 20)
        );
    };
    // virtiofsd ends with its vhost-user peer; give it a moment.
    let fs_gone = tokio::time::timeout(Duration::from_secs(5), fs.wait())
        .await
        .is_ok();
    if !fs_gone {
        fs.kill().await;
    }
    Ok(ConsoleBoot {
        console: read(&console_path),
        vmm_log: read(&log),
        status,
        run_init,
        helpers_gone: fs_gone,
    })
}
