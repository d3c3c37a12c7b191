//! A private containerd for tests and the demo, Debian's 1.6 or the 2.x
//! `upstream/build.sh` builds ([`Release`]): its own root, state and socket
//! in a temporary directory, the CRI plugin with runtime handlers `runc`
//! and `podvisor`, a CNI bridge network (with host ports), optionally a
//! registry mirror, and the busybox and pause images imported. The shim it
//! runs is this workspace's build.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::image::{archive, pause, ImageDef};
use crate::vm::{image_dir, paths, tool};

/// The image test containers run, and the pod sandbox image.
pub const BUSYBOX: &str = "docker.io/podvisor/busybox:latest";
pub const PAUSE: &str = "docker.io/podvisor/pause:latest";
/// The ctr namespace of the tests; CRI uses k8s.io.
pub const NAMESPACE: &str = "podvisor-test";
pub const RUNTIME: &str = podvisor_names::RUNTIME_TYPE;
/// The CNI bridge of the tests' pods (their veths' host ends join it); a
/// name of our own so nothing else is touched.
pub const BRIDGE: &str = "pvtest0";

/// Which containerd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Debian 12's 1.6 (`/usr/bin`; CONTAINERD and CTR override).
    V1,
    /// The 2.x `upstream/build.sh` builds into build/upstream/containerd
    /// (CONTAINERD2_DIR overrides).
    V2,
}

impl Release {
    pub const ALL: [Release; 2] = [Release::V1, Release::V2];

    /// From `PODVISOR_CONTAINERD` (`1`, `2`, or unset for both).
    pub fn selected() -> Vec<Release> {
        match std::env::var("PODVISOR_CONTAINERD").as_deref() {
            Ok("1") | Ok("1.6") => vec![Release::V1],
            Ok("2") => vec![Release::V2],
            _ => Release::ALL.to_vec(),
        }
    }

    /// The directory of the 2.x binaries.
    fn upstream_dir() -> PathBuf {
        std::env::var_os("CONTAINERD2_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/upstream/containerd")
            })
    }

    pub fn containerd(self) -> PathBuf {
        match self {
            Release::V1 => tool("CONTAINERD", "containerd"),
            Release::V2 => Self::upstream_dir().join("containerd"),
        }
    }

    pub fn ctr(self) -> PathBuf {
        match self {
            Release::V1 => tool("CTR", "ctr"),
            Release::V2 => Self::upstream_dir().join("ctr"),
        }
    }

    /// Where its own shims (containerd-shim-runc-v2) are, if not in PATH.
    fn shim_dir(self) -> Option<PathBuf> {
        (self == Release::V2).then(Self::upstream_dir)
    }

    /// `containerd --version`'s version, such as `1.6.20~ds1` or `v2.2.9`.
    pub fn version(self) -> String {
        Command::new(self.containerd())
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .nth(2)
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "unknown".into())
    }

    /// A short name for test names and tables.
    pub fn label(self) -> &'static str {
        match self {
            Release::V1 => "containerd-1.6",
            Release::V2 => "containerd-2",
        }
    }
}

/// A registry mirror: pulls of `hosts` go to `mirror` (plain HTTP).
#[derive(Debug)]
pub struct Mirror<'a> {
    pub mirror: &'a str,
    pub hosts: &'a [&'a str],
}

#[derive(Debug)]
pub struct Containerd {
    /// The daemon; replaced by [`Containerd::restart`].
    child: std::sync::Mutex<Child>,
    /// How it was started: program, config, PATH.
    launch: (PathBuf, PathBuf, std::ffi::OsString),
    pub release: Release,
    pub address: PathBuf,
    /// The podvisor config the runtime uses (ConfigPath).
    pub podvisor_config: PathBuf,
    dir: tempfile::TempDir,
}

/// The directory holding `containerd-shim-podvisor-v2`: PODVISOR_SHIM_DIR,
/// else the cargo target directory this binary was built into.
pub fn shim_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("PODVISOR_SHIM_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        if dir.join("containerd-shim-podvisor-v2").exists() {
            return Ok(dir.to_owned());
        }
    }
    bail!(
        "containerd-shim-podvisor-v2 not found next to {} (build it: cargo build -p podvisor-shim)",
        exe.display()
    )
}

/// Whether this process may lower OOM scores (CAP_SYS_RESOURCE). Where it
/// may not (some sandboxed CI machines), runc fails a CRI pause container's
/// oomScoreAdj -998 ("can't get final child's PID from pipe"), so
/// containerd is told to clamp scores instead (as cluster/up.sh does).
fn can_lower_oom_score() -> bool {
    Command::new("sh")
        .args(["-c", "echo -998 > /proc/self/oom_score_adj"])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl Containerd {
    pub fn start(release: Release) -> Result<Containerd> {
        Self::start_with(release, None)
    }

    /// With pulls from the registries `mirror` names going to it.
    pub fn start_with(release: Release, mirror: Option<&Mirror<'_>>) -> Result<Containerd> {
        Self::start_in(release, mirror, &image_dir())
    }

    /// With the guest image in `image` (`image_dir()` otherwise).
    pub fn start_with_image(release: Release, image: &Path) -> Result<Containerd> {
        Self::start_in(release, None, image)
    }

    fn start_in(release: Release, mirror: Option<&Mirror<'_>>, image: &Path) -> Result<Containerd> {
        let dir = tempfile::Builder::new()
            .prefix("podvisor-containerd-")
            .tempdir()?;
        let d = dir.path().to_owned();
        let address = d.join("containerd.sock");
        let p = paths();
        // The guests panic on an NMI from the host (QMP's inject-nmi): how
        // the tests make a guest die under its pod.
        let podvisor_config = d.join("podvisor.toml");
        std::fs::write(
            &podvisor_config,
            format!(
                "kernel = {:?}\nvmm_kernel = {:?}\ninitramfs = {:?}\nkernel_params = \"unknown_nmi_panic\"\nallowed_annotations = [\"podvisor.io/vcpus\", \"podvisor.io/memory-mib\"]\nmax_vcpus = 4\n\n[warm]\ntemplate_dir = {:?}\n\n[paths]\nqemu = {:?}\nvirtiofsd = {:?}\nvhost_device_vsock = {:?}\n",
                image.join("kernel"),
                image.join("vmlinux"),
                image.join("initramfs"),
                d.join("templates"),
                p.qemu,
                p.virtiofsd,
                p.vhost_device_vsock
            ),
        )?;
        let cni = d.join("cni");
        std::fs::create_dir_all(&cni)?;
        std::fs::write(
            cni.join("10-podvisor-test.conflist"),
            format!(
                r#"{{"cniVersion":"1.0.0","name":"podvisor-test","plugins":[
  {{"type":"bridge","bridge":"{BRIDGE}","isGateway":true,"ipMasq":false,
    "ipam":{{"type":"host-local","ranges":[[{{"subnet":"10.88.77.0/24"}}]],"routes":[{{"dst":"0.0.0.0/0"}}]}}}},
  {{"type":"portmap","capabilities":{{"portMappings":true}}}},
  {{"type":"loopback"}}]}}"#
            ),
        )?;
        let certs = d.join("certs.d");
        if let Some(m) = mirror {
            for host in m.hosts {
                let hd = certs.join(host);
                std::fs::create_dir_all(&hd)?;
                std::fs::write(
                    hd.join("hosts.toml"),
                    format!(
                        "server = \"https://{host}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                        m.mirror
                    ),
                )?;
            }
        }
        let dirs = ConfigDirs {
            root: d.join("root"),
            state: d.join("state"),
            address: address.clone(),
            podvisor_config: podvisor_config.clone(),
            cni,
            certs,
            restrict_oom: !can_lower_oom_score(),
        };
        let config = d.join("config.toml");
        std::fs::write(&config, config_toml(release, &dirs))?;

        let mut path = vec![shim_dir()?];
        path.extend(release.shim_dir());
        path.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        std::fs::File::create(d.join("containerd.log"))?;
        let launch = (release.containerd(), config, std::env::join_paths(path)?);
        let child = spawn_containerd(&launch, &d)?;
        let ctd = Containerd {
            child: std::sync::Mutex::new(child),
            launch,
            release,
            address,
            podvisor_config,
            dir,
        };
        ctd.wait_up()?;
        for (name, def) in [(BUSYBOX, ImageDef::with_cmd(&["sh"])), (PAUSE, pause())] {
            let tar = d.join(format!("{}.tar", name.replace(['/', ':'], "_")));
            archive(&tar, name, &def)?;
            for ns in [NAMESPACE, "k8s.io"] {
                ctd.ctr_in(ns, &["images", "import"])
                    .arg(&tar)
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .with_context(|| format!("importing {name} into {ns}"))?;
            }
        }
        Ok(ctd)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's pid (it changes with [`Containerd::restart`]).
    pub fn pid(&self) -> Result<u32> {
        let child = self
            .child
            .lock()
            .map_err(|_| anyhow::anyhow!("containerd handle poisoned"))?;
        Ok(child.id())
    }

    /// Waits for the daemon to answer.
    fn wait_up(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self
            .ctr(&["version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            if Instant::now() > deadline {
                bail!("containerd did not come up:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Stops the daemon (SIGTERM, as systemd does) and starts it again
    /// with the same config and state; shims and their pods run on.
    pub fn restart(&self) -> Result<()> {
        let mut child = self
            .child
            .lock()
            .map_err(|_| anyhow::anyhow!("containerd handle poisoned"))?;
        terminate(&mut child);
        *child = spawn_containerd(&self.launch, self.dir.path())?;
        drop(child);
        self.wait_up()
    }

    /// `ctr` against this containerd, in the tests' namespace.
    pub fn ctr(&self, args: &[&str]) -> Command {
        self.ctr_in(NAMESPACE, args)
    }

    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Command {
        let mut c = Command::new(self.release.ctr());
        c.arg("--address")
            .arg(&self.address)
            .args(["-n", namespace])
            .args(args);
        c
    }

    /// `ctr run` with the podvisor runtime and its config.
    pub fn ctr_run(&self, flags: &[&str], id: &str, cmd: &[&str]) -> Command {
        let mut c = self.ctr(&["run", "--runtime", RUNTIME, "--runtime-config-path"]);
        c.arg(&self.podvisor_config)
            .args(flags)
            .arg(BUSYBOX)
            .arg(id)
            .args(cmd);
        c
    }

    /// `crictl` against this containerd's CRI endpoint.
    pub fn crictl(&self, args: &[&str]) -> Command {
        let endpoint = format!("unix://{}", self.address.display());
        let mut c = Command::new(tool("CRICTL", "crictl"));
        c.args([
            "--runtime-endpoint",
            &endpoint,
            "--image-endpoint",
            &endpoint,
            "--timeout",
            "120s",
        ])
        .args(args);
        c
    }

    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Copies the whole log out of the daemon's directory (removed when
    /// it stops), to read after a failure; says where it went.
    pub fn keep_log(&self) -> String {
        let kept = (|| -> std::io::Result<PathBuf> {
            let (mut file, path) = tempfile::Builder::new()
                .prefix(&format!("podvisor-{}-", self.release.label()))
                .suffix(".log")
                .tempfile()?
                .keep()
                .map_err(|e| e.error)?;
            std::io::copy(
                &mut std::fs::File::open(self.dir.path().join("containerd.log"))?,
                &mut file,
            )?;
            Ok(path)
        })();
        match kept {
            Ok(path) => path.display().to_string(),
            Err(e) => format!("not kept: {e}"),
        }
    }

    /// containerd's whole log (the shims' logs included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Removes every pod, task and container, as an operator would with
    /// crictl and ctr (a failed test leaves its pods running otherwise:
    /// shims outlive containerd by design).
    pub fn remove_everything(&self) {
        let out = |c: &mut Command| {
            c.output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        for pod in out(&mut self.crictl(&["pods", "-q"])).split_whitespace() {
            let _ = self.crictl(&["stopp", pod]).output();
            let _ = self.crictl(&["rmp", "-f", pod]).output();
        }
        for id in out(&mut self.ctr(&["containers", "ls", "-q"])).split_whitespace() {
            let _ = self.ctr(&["task", "kill", "-a", "-s", "KILL", id]).output();
            for _ in 0..50 {
                let ls = out(&mut self.ctr(&["task", "ls"]));
                let running = ls
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(id) && l.contains("RUNNING"));
                if !running {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.ctr(&["task", "delete", "-f", id]).output();
            let _ = self.ctr(&["containers", "rm", id]).output();
        }
    }

    /// Stops containerd and removes the CNI bridge it made.
    pub fn stop(mut self) {
        self.remove_everything();
        if let Ok(child) = self.child.get_mut() {
            terminate(child);
        }
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
        // containerd may leave snapshots mounted under its root.
        unmount_below(self.dir.path());
    }
}

/// Starts containerd as `launch` says, its output appended to
/// `dir/containerd.log` (at `PODVISOR_CONTAINERD_LOG_LEVEL`, when set).
fn spawn_containerd(launch: &(PathBuf, PathBuf, std::ffi::OsString), dir: &Path) -> Result<Child> {
    let (program, config, path) = launch;
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("containerd.log"))?;
    let mut cmd = Command::new(program);
    if let Some(level) = std::env::var_os("PODVISOR_CONTAINERD_LOG_LEVEL") {
        cmd.arg("--log-level").arg(level);
    }
    cmd.arg("--config")
        .arg(config)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (containerd 1.6: apt-get install containerd; 2.x: upstream/build.sh containerd)",
                program.display()
            )
        })
}

/// SIGTERMs containerd and reaps it (SIGKILL after 10 s).
fn terminate(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Detaches every mount at or below `dir`, deepest first.
fn unmount_below(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p) {
            // SAFETY: a NUL-terminated path; umount2 touches no memory of ours.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// The directories and settings a config names.
struct ConfigDirs {
    root: PathBuf,
    state: PathBuf,
    address: PathBuf,
    podvisor_config: PathBuf,
    cni: PathBuf,
    certs: PathBuf,
    restrict_oom: bool,
}

/// containerd's config: format 2 for 1.6, format 3 for 2.x (where the CRI
/// plugin is split into images and runtime).
fn config_toml(release: Release, d: &ConfigDirs) -> String {
    let runtimes = |cri: &str| {
        format!(
            r#"  [plugins."{cri}".containerd]
    default_runtime_name = "runc"
    [plugins."{cri}".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."{cri}".containerd.runtimes.podvisor]
      runtime_type = "{RUNTIME}"
      pod_annotations = ["podvisor.io/*"]
      [plugins."{cri}".containerd.runtimes.podvisor.options]
        ConfigPath = "{}"
"#,
            d.podvisor_config.display()
        )
    };
    let head = format!(
        r#"root = "{}"
state = "{}"
[grpc]
  address = "{}"
"#,
        d.root.display(),
        d.state.display(),
        d.address.display()
    );
    match release {
        Release::V1 => format!(
            r#"version = 2
{head}[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  restrict_oom_score_adj = {restrict}
{runtimes}  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
"#,
            restrict = d.restrict_oom,
            runtimes = runtimes("io.containerd.grpc.v1.cri"),
            cni = d.cni.display(),
            certs = d.certs.display(),
        ),
        Release::V2 => format!(
            r#"version = 3
{head}[plugins."io.containerd.cri.v1.images"]
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{certs}"
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = {restrict}
{runtimes}  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{cni}"
"#,
            restrict = d.restrict_oom,
            runtimes = runtimes("io.containerd.cri.v1.runtime"),
            cni = d.cni.display(),
            certs = d.certs.display(),
        ),
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Ok(child) = self.child.get_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Output of a finished command, as text.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
