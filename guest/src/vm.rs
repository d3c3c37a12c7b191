//! One guest VM for tests and benchmarks: QEMU (`-M q35`, KVM where the
//! probe finds it fast, TCG elsewhere) with `vhost-device-vsock` for the
//! hybrid-vsock socket and virtiofsd for the shared directory, each a
//! supervised child that dies with the VM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use podvisor_protocol::api::{self, AgentClient};
use podvisor_protocol::hybrid_vsock;
use podvisor_vmm::probe;

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

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM where the probe finds hardware speed, else TCG; PODVISOR_ACCEL
    /// (kvm|tcg) overrides.
    pub fn detect() -> (Accel, String) {
        match std::env::var("PODVISOR_ACCEL").as_deref() {
            Ok("kvm") => return (Accel::Kvm, "PODVISOR_ACCEL=kvm".into()),
            Ok("tcg") => return (Accel::Tcg, "PODVISOR_ACCEL=tcg".into()),
            _ => {}
        }
        let verdict = probe::probe();
        let accel = if verdict.is_fast() {
            Accel::Kvm
        } else {
            Accel::Tcg
        };
        (accel, verdict.to_string())
    }

    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub memory_mib: u32,
    pub vcpus: u32,
    pub accel: Accel,
    /// Extra kernel command line.
    pub kernel_args: String,
    /// Seconds to wait for the agent.
    pub boot_timeout: Duration,
}

impl VmConfig {
    pub fn new(accel: Accel) -> VmConfig {
        VmConfig {
            memory_mib: 512,
            vcpus: 1,
            accel,
            kernel_args: String::new(),
            boot_timeout: Duration::from_secs(120),
        }
    }
}

/// Fields drop in order: QEMU and the helpers go before their directory.
pub struct TestVm {
    children: Children,
    pub agent: AgentClient,
    /// Time from spawning QEMU to the agent answering Check.
    pub boot_time: Duration,
    pub accel: Accel,
    dir: tempfile::TempDir,
}

fn tool(env: &str, default: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let cargo_bin = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cargo/bin").join(default))
        .filter(|p| p.exists());
    cargo_bin.unwrap_or_else(|| PathBuf::from(default))
}

fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Result<(&'static str, Child)> {
    let out = std::fs::File::create(log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: prctl in the forked child before exec: it dies with us.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
    Ok((name, child))
}

async fn wait_for_socket(path: &Path, child: &mut Child, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if let Some(st) = child.try_wait()? {
            bail!("{name} exited ({st}) before creating {}", path.display());
        }
        if Instant::now() > deadline {
            bail!("{name} did not create {} within 10s", path.display());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

impl TestVm {
    /// Boots the guest image and waits for the agent to answer Check.
    pub async fn boot(cfg: &VmConfig) -> Result<TestVm> {
        let image = image_dir();
        let (kernel, initramfs) = (image.join("kernel"), image.join("initramfs"));
        for f in [&kernel, &initramfs] {
            if !f.exists() {
                bail!("{} missing: run `make guest-image`", f.display());
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("podvisor-guest-")
            .tempdir()?;
        let d = dir.path().to_owned();
        std::fs::create_dir(d.join("shared"))?;
        // Killed on every early return.
        let mut children = Children(Vec::new());

        let mut vsock = spawn(
            "vhost-device-vsock",
            Command::new(tool("VHOST_DEVICE_VSOCK", "vhost-device-vsock"))
                .arg("--vm")
                .arg(format!(
                    "guest-cid=3,socket={},uds-path={}",
                    d.join("vhost.sock").display(),
                    d.join("vm.vsock").display()
                )),
            &d.join("vhost-device-vsock.log"),
        )?;
        let mut fs = spawn(
            "virtiofsd",
            Command::new(tool("VIRTIOFSD", "/usr/lib/qemu/virtiofsd"))
                .arg(format!("--socket-path={}", d.join("fs.sock").display()))
                .arg("-o")
                .arg(format!("source={}", d.join("shared").display()))
                .arg("-o")
                .arg("cache=none"),
            &d.join("virtiofsd.log"),
        )?;
        wait_for_socket(&d.join("vhost.sock"), &mut vsock.1, "vhost-device-vsock").await?;
        wait_for_socket(&d.join("fs.sock"), &mut fs.1, "virtiofsd").await?;
        children.0.push(vsock);
        children.0.push(fs);

        let mem = cfg.memory_mib;
        let mut qemu = Command::new(tool("QEMU", "qemu-system-x86_64"));
        qemu.args(["-M", "q35", "-accel", cfg.accel.name()])
            .args([
                "-cpu",
                if cfg.accel == Accel::Kvm {
                    "host"
                } else {
                    "max"
                },
            ])
            .args(["-m", &format!("{mem}M"), "-smp", &cfg.vcpus.to_string()])
            .args(["-nodefaults", "-nographic", "-no-reboot"])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            ])
            .args(["-numa", "node,memdev=mem"])
            .args([
                "-chardev",
                &format!("socket,id=vs,path={}", d.join("vhost.sock").display()),
            ])
            .args(["-device", "vhost-user-vsock-pci,chardev=vs"])
            .args([
                "-chardev",
                &format!("socket,id=fs,path={}", d.join("fs.sock").display()),
            ])
            .args(["-device", "vhost-user-fs-pci,chardev=fs,tag=podvisor"])
            .args([
                "-serial",
                &format!("file:{}", d.join("console.log").display()),
            ])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initramfs)
            .arg("-append")
            .arg(format!("console=ttyS0 panic=-1 quiet {}", cfg.kernel_args));
        let started = Instant::now();
        children
            .0
            .push(spawn("qemu", &mut qemu, &d.join("qemu.log"))?);

        let agent = hybrid_vsock::connect_agent(&d.join("vm.vsock"), cfg.boot_timeout)
            .await
            .with_context(|| format!("waiting for the agent\n{}", diagnostics(&d)))?;
        agent
            .check(ctx(), &api::CheckRequest::new())
            .await
            .with_context(|| format!("agent Check\n{}", diagnostics(&d)))?;
        Ok(TestVm {
            children,
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
        self.dir.path().join("vm.vsock")
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// The console and helper logs, for a failure message.
    pub fn diagnostics(&self) -> String {
        diagnostics(self.dir.path())
    }

    /// Pids of QEMU and the helpers, for leak checks.
    pub fn pids(&self) -> Vec<u32> {
        self.children.0.iter().map(|(_, c)| c.id()).collect()
    }

    /// Waits up to `within` for QEMU to exit by itself (the guest powered
    /// off) and returns its status.
    pub async fn wait_qemu_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + within;
        let qemu = self
            .children
            .0
            .iter_mut()
            .find(|(n, _)| *n == "qemu")
            .map(|(_, c)| c)
            .context("no qemu child")?;
        loop {
            if let Some(st) = qemu.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!("QEMU still running {within:?} after the guest was told to power off");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops QEMU and the helpers, and removes the VM's directory.
    pub fn shutdown(self) {
        drop(self);
    }
}

/// QEMU and its helpers; killed and reaped when dropped.
struct Children(Vec<(&'static str, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        // QEMU first, so the helpers see their peer go.
        for (_, c) in self.0.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn diagnostics(dir: &Path) -> String {
    let mut s = String::new();
    for f in [
        "console.log",
        "qemu.log",
        "vhost-device-vsock.log",
        "virtiofsd.log",
    ] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        s.push_str(&format!("--- {f} (last lines)\n"));
        for l in tail.into_iter().rev() {
            s.push_str(l);
            s.push('\n');
        }
    }
    s
}

/// A call context with a generous timeout (TCG is slow, a hang is not).
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(120).as_nanos() as i64)
}
