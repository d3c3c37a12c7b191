//! The guest as one pod sandbox: its containers by id, the sandbox-wide
//! settings (hostname, DNS, sysctls), the pod's in-memory volumes (a tmpfs
//! each, shared by its containers), facts about the guest, and the
//! power-off at the end.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::mount::MsFlags;
use podvisor_protocol::api;

use crate::container::shared::Releases;
use crate::container::{sysctl, validate_id, Container};
use crate::error::{internal, invalid, not_found, precondition, AgentError, Result};
use crate::lock;
use crate::reaper::Reaper;
use crate::warm;

/// Delay between answering DestroySandbox and powering off, so the answer
/// leaves the guest first.
const POWEROFF_DELAY: Duration = Duration::from_millis(100);

pub struct Sandbox {
    reaper: Arc<Reaper>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Ids being created, so a second create of the same id fails at once.
    creating: Mutex<HashSet<String>>,
    /// Whether DestroySandbox powers the machine off (the agent is PID 1).
    owns_machine: bool,
    ready_ms: u64,
    /// Set once a clone of a warm-start template has finished its restore.
    restored: AtomicBool,
    /// The pod's in-memory volumes mounted so far, by name.
    tmpfs: Mutex<HashSet<String>>,
    /// Removed containers whose shared submounts are yet to go.
    releases: Releases,
}

/// A pod tmpfs request, checked: where it is mounted, its mount data and
/// flags, and the directories to make below its root.
pub struct PodTmpfsPlan {
    pub path: std::path::PathBuf,
    pub data: String,
    pub flags: MsFlags,
    pub subdirs: Vec<Vec<String>>,
}

/// Checks a pod tmpfs request: a name that is one plain path component, a
/// mode of permission bits only, subdirectories of plain components.
pub fn pod_tmpfs_plan(v: &api::PodTmpfs) -> Result<PodTmpfsPlan> {
    validate_id("pod tmpfs", &v.name)?;
    if v.mode > 0o7777 {
        return Err(invalid!(
            "pod tmpfs {}: mode {:o} is more than permission bits",
            v.name,
            v.mode
        ));
    }
    let mut data = format!("mode={:o},uid={},gid={}", v.mode, v.uid, v.gid);
    if v.size_bytes > 0 {
        data.push_str(&format!(",size={}", v.size_bytes));
    }
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if v.noexec {
        flags |= MsFlags::MS_NOEXEC;
    }
    let subdirs = v
        .subdirs
        .iter()
        .map(|dir| {
            let parts: Vec<String> = dir.split('/').map(str::to_string).collect();
            let plain = |p: &String| {
                !p.is_empty() && p != "." && p != ".." && !p.contains('\0') && p.len() <= 255
            };
            if parts.len() > MAX_SUBDIR_DEPTH || !parts.iter().all(plain) {
                return Err(invalid!(
                    "pod tmpfs {}: subdirectory {dir:?} is not a relative path of plain \
                     components (at most {MAX_SUBDIR_DEPTH})",
                    v.name
                ));
            }
            Ok(parts)
        })
        .collect::<Result<_>>()?;
    Ok(PodTmpfsPlan {
        path: std::path::Path::new(podvisor_protocol::GUEST_TMPFS_DIR).join(&v.name),
        data,
        flags,
        subdirs,
    })
}

/// The most components a pod tmpfs subdirectory has.
const MAX_SUBDIR_DEPTH: usize = 64;

/// Makes `parts` below `root`, one directory at a time, never following a
/// symbolic link (a container may have put one there).
fn make_below(root: &std::path::Path, parts: &[String]) -> std::result::Result<(), nix::Error> {
    use nix::fcntl::{open, openat, OFlag};
    use nix::sys::stat::{mkdirat, Mode};
    let how = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    let mut dir = open(root, how, Mode::empty())?;
    for p in parts {
        match mkdirat(&dir, p.as_str(), Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(nix::Error::EEXIST) => {}
            Err(e) => return Err(e),
        }
        dir = openat(&dir, p.as_str(), how, Mode::empty())?;
    }
    Ok(())
}

impl Sandbox {
    pub fn new(reaper: Arc<Reaper>, owns_machine: bool) -> Sandbox {
        Sandbox {
            reaper,
            containers: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashSet::new()),
            owns_machine,
            ready_ms: boottime_ms(),
            restored: AtomicBool::new(false),
            tmpfs: Mutex::new(HashSet::new()),
            releases: Releases::default(),
        }
    }

    /// Mounts each of `volumes` not mounted yet. The first container to
    /// use one sizes it; it stays until the VM ends, as an emptyDir lives
    /// as long as its pod.
    fn mount_pod_tmpfs(&self, volumes: &[api::PodTmpfs]) -> Result<()> {
        let plans = volumes
            .iter()
            .map(|v| Ok((v.name.as_str(), pod_tmpfs_plan(v)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut mounted = lock(&self.tmpfs);
        for (name, plan) in plans {
            if !mounted.contains(name) {
                std::fs::create_dir_all(&plan.path)
                    .map_err(|e| internal!("creating {}: {e}", plan.path.display()))?;
                nix::mount::mount(
                    Some("tmpfs"),
                    &plan.path,
                    Some("tmpfs"),
                    plan.flags,
                    Some(plan.data.as_str()),
                )
                .map_err(|e| invalid!("mounting pod tmpfs {name} ({}): {e}", plan.data))?;
                tracing::info!("pod tmpfs {name} mounted ({})", plan.data);
                mounted.insert(name.to_string());
            }
            for parts in &plan.subdirs {
                make_below(&plan.path, parts)
                    .map_err(|e| invalid!("pod tmpfs {name}: making {}: {e}", parts.join("/")))?;
            }
        }
        Ok(())
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| not_found!("container {id:?} not found"))
    }

    pub fn guest_details(&self) -> api::GuestDetailsResponse {
        let uts = nix::sys::utsname::uname().ok();
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        api::GuestDetailsResponse {
            kernel_release: uts
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .unwrap_or_default()
                .trim()
                .to_string(),
            memory_total_bytes: kib_field(&meminfo, "MemTotal:") * 1024,
            // SAFETY: sysconf has no preconditions.
            online_cpus: u32::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) })
                .unwrap_or(0),
            agent_rss_bytes: kib_field(&status, "VmRSS:") * 1024,
            agent_ready_ms: self.ready_ms,
            ..Default::default()
        }
    }

    pub async fn create_sandbox(&self, req: &api::CreateSandboxRequest) -> Result<()> {
        let setup = SandboxSetup::from_request(req)?;
        if let Err(e) = warm::set_clock(req.host_time_ns) {
            tracing::warn!("setting the clock from the host's: {e}");
        }
        if let Err(e) = warm::mix_host_entropy(&req.host_entropy) {
            tracing::warn!("mixing in the host's entropy: {e}");
        }
        if self.owns_machine && warm::is_template() {
            self.finish_restore().await?;
        }
        if let Some(name) = &setup.hostname {
            nix::unistd::sethostname(name).map_err(|e| invalid!("hostname {name:?}: {e}"))?;
        }
        if !setup.resolv_conf.is_empty() {
            std::fs::create_dir_all("/etc").map_err(|e| internal!("/etc: {e}"))?;
            std::fs::write("/etc/resolv.conf", &setup.resolv_conf)
                .map_err(|e| internal!("writing /etc/resolv.conf: {e}"))?;
        }
        for (key, value) in &req.sysctls {
            sysctl::write(key, value).map_err(|e| invalid!("{}", e.0))?;
        }
        Ok(())
    }

    /// A clone's first sandbox: the kernel's RNG reseed on the new VM
    /// generation, and the shared directory hot-plugged after restore.
    async fn finish_restore(&self) -> Result<()> {
        if self.restored.load(Ordering::Acquire) {
            return Ok(());
        }
        if warm::kernel_reseeded().await {
            tracing::info!(
                "restored from a template: the kernel reseeded its RNG (new VM generation ID)"
            );
        } else {
            tracing::warn!("restored from a template, but the kernel reported no RNG reseed (no vmgenid?); the host's entropy was mixed in");
        }
        // Until virtio-fs has bound, the tag is unknown: EINVAL.
        warm::retry(
            "mounting the hot-plugged shared directory",
            |_| true,
            crate::init::mount_shared,
        )
        .await
        .map_err(|e| internal!("mounting the shared directory after restore: {e:#}"))?;
        self.restored.store(true, Ordering::Release);
        Ok(())
    }

    pub async fn create_container(
        &self,
        req: &api::CreateContainerRequest,
    ) -> Result<api::StdioPorts> {
        let id = req.container_id.as_str();
        validate_id("container", id)?;
        self.releases.wait(id).await;
        {
            let containers = lock(&self.containers);
            let mut creating = lock(&self.creating);
            if containers.contains_key(id) || !creating.insert(id.to_string()) {
                return Err(AgentError::AlreadyExists(format!(
                    "container {id} already exists"
                )));
            }
        }
        let stdio = req.stdio.clone().unwrap_or_default();
        let init_pid_of =
            |other: &str| lock(&self.containers).get(other).and_then(|c| c.init_pid());
        let result = match self.mount_pod_tmpfs(&req.tmpfs) {
            Ok(()) => {
                Container::create(id, &req.oci_spec_json, &stdio, &self.reaper, &init_pid_of).await
            }
            Err(e) => Err(e),
        };
        lock(&self.creating).remove(id);
        let (container, ports) = result?;
        lock(&self.containers).insert(id.to_string(), Arc::new(container));
        tracing::info!("created");
        Ok(ports)
    }

    pub async fn start(&self, id: &str, exec_id: &str) -> Result<()> {
        let c = self.container(id)?;
        if exec_id.is_empty() {
            c.start().await
        } else {
            c.start_exec(exec_id).await
        }
    }

    pub async fn exec(&self, req: &api::ExecProcessRequest) -> Result<api::ExecProcessResponse> {
        let c = self.container(&req.container_id)?;
        let stdio = req.stdio.clone().unwrap_or_default();
        let (pid, ports) = c
            .exec(&req.exec_id, &req.process_json, &stdio, &self.reaper)
            .await?;
        Ok(api::ExecProcessResponse {
            ports: Some(ports).into(),
            pid: u32::try_from(pid).unwrap_or(0),
            ..Default::default()
        })
    }

    pub fn signal(&self, req: &api::SignalProcessRequest) -> Result<()> {
        let signal = signal_number(req.signal)?;
        self.container(&req.container_id)?
            .signal(&req.exec_id, signal, req.all)
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<api::WaitProcessResponse> {
        self.container(id)?.wait(exec_id).await
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        self.container(id)?.close_stdin(exec_id)
    }

    pub fn resize(&self, req: &api::TtyWinResizeRequest) -> Result<()> {
        self.container(&req.container_id)?
            .resize(&req.exec_id, req.rows, req.columns)
    }

    pub fn pids(&self, id: &str) -> Result<Vec<u32>> {
        Ok(self.container(id)?.pids())
    }

    pub fn stats(&self, id: &str) -> Result<api::StatsContainerResponse> {
        Ok(self.container(id)?.stats())
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        self.container(id)?.update(resources_json)
    }

    pub fn remove(&self, id: &str, exec_id: &str) -> Result<()> {
        let c = self.container(id)?;
        if !exec_id.is_empty() {
            return c.remove_exec(exec_id);
        }
        if c.running() {
            return Err(precondition!(
                "container {id} is still running: signal it and wait first"
            ));
        }
        lock(&self.containers).remove(id);
        // Its submounts go a little later; a new container of its id waits.
        self.releases.later(id, c.destroy());
        tracing::info!("removed");
        Ok(())
    }

    /// Kills every container and, as PID 1, powers the guest off shortly
    /// after the answer is sent.
    pub fn destroy(&self) {
        let all: Vec<_> = lock(&self.containers).drain().map(|(_, c)| c).collect();
        for c in &all {
            c.kill_all();
        }
        if self.owns_machine {
            tokio::spawn(async move {
                tokio::time::sleep(POWEROFF_DELAY).await;
                crate::init::power_off();
            });
        }
    }
}

/// What CreateSandbox sets up, checked before any of it is done: the
/// hostname, `/etc/resolv.conf`, and the names of the sysctls.
#[derive(Debug)]
pub struct SandboxSetup {
    pub hostname: Option<String>,
    pub resolv_conf: String,
}

impl SandboxSetup {
    pub fn from_request(req: &api::CreateSandboxRequest) -> Result<SandboxSetup> {
        let hostname = match req.hostname.as_str() {
            "" => None,
            h if h.len() > HOST_NAME_MAX || !is_token(h) => {
                return Err(invalid!(
                    "hostname {h:?} is not a host name (at most {HOST_NAME_MAX} bytes, no spaces)"
                ))
            }
            h => Some(h.to_string()),
        };
        let mut resolv_conf = String::new();
        for s in &req.dns_servers {
            if s.parse::<std::net::IpAddr>().is_err() {
                return Err(invalid!("DNS server {s:?} is not an IP address"));
            }
            resolv_conf.push_str(&format!("nameserver {s}\n"));
        }
        for (what, line, words) in [
            ("DNS search domain", "search", &req.dns_searches),
            ("DNS option", "options", &req.dns_options),
        ] {
            if let Some(bad) = words.iter().find(|w| !is_token(w)) {
                return Err(invalid!("{what} {bad:?} is empty or holds spaces"));
            }
            if !words.is_empty() {
                resolv_conf.push_str(&format!("{line} {}\n", words.join(" ")));
            }
        }
        sysctl::check(req.sysctls.keys())?;
        Ok(SandboxSetup {
            hostname,
            resolv_conf,
        })
    }
}

/// The kernel's limit on a host name.
const HOST_NAME_MAX: usize = 64;

/// One word of a config line: not empty, no space or control character.
fn is_token(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// A signal number from the wire, checked.
pub fn signal_number(n: u32) -> Result<i32> {
    i32::try_from(n)
        .ok()
        .filter(|s| (1..=64).contains(s))
        .ok_or_else(|| invalid!("invalid signal {n}"))
}

/// A `Key:  <n> kB` field of /proc/meminfo or /proc/<pid>/status.
pub(crate) fn kib_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Milliseconds since the kernel started.
fn boottime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| {
            let (s, ns) = (u64::try_from(t.tv_sec()), u64::try_from(t.tv_nsec()));
            s.unwrap_or(0) * 1000 + ns.unwrap_or(0) / 1_000_000
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kib_fields_parse() {
        let status = "Name:\tagent\nVmRSS:\t    2048 kB\n";
        assert_eq!(kib_field(status, "VmRSS:"), 2048);
        assert_eq!(kib_field(status, "VmHWM:"), 0);
    }

    #[test]
    fn subdirectories_are_made_without_following_links() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let parts = |p: &str| p.split('/').map(str::to_string).collect::<Vec<_>>();
        make_below(root.path(), &parts("a/b")).unwrap();
        make_below(root.path(), &parts("a/b")).unwrap();
        assert!(root.path().join("a/b").is_dir());
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        assert!(make_below(root.path(), &parts("link/x")).is_err());
        assert!(!outside.path().join("x").exists(), "made through a link");
    }

    #[test]
    fn pod_tmpfs_requests_are_checked() {
        let v = |name: &str, size_bytes: u64, mode: u32| api::PodTmpfs {
            name: name.into(),
            size_bytes,
            mode,
            ..Default::default()
        };
        let plan = pod_tmpfs_plan(&v("empty-dir-cache", 8 << 20, 0o777)).unwrap();
        assert_eq!(
            plan.path,
            std::path::Path::new("/run/podvisor/tmpfs/empty-dir-cache")
        );
        assert_eq!(plan.data, "mode=777,uid=0,gid=0,size=8388608");
        assert_eq!(plan.flags, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        let shm = api::PodTmpfs {
            gid: 2000,
            ..v("shm", 0, 0o1777)
        };
        assert_eq!(
            pod_tmpfs_plan(&shm).unwrap().data,
            "mode=1777,uid=0,gid=2000"
        );
        let sub = api::PodTmpfs {
            subdirs: vec!["a/b c".into(), "d".into()],
            noexec: true,
            ..v("x", 0, 0o777)
        };
        let plan = pod_tmpfs_plan(&sub).unwrap();
        assert_eq!(plan.subdirs, [vec!["a", "b c"], vec!["d"]]);
        assert!(plan.flags.contains(MsFlags::MS_NOEXEC));
        for bad in ["../x", "a/../b", "/abs", "a//b", "", "a/.", "n\0ul"] {
            let req = api::PodTmpfs {
                subdirs: vec![bad.into()],
                ..v("x", 0, 0o777)
            };
            let e = pod_tmpfs_plan(&req).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains("subdirectory")),
                "{bad:?}: {e:?}"
            );
        }
        for (name, mode) in [("..", 0o777), ("a/b", 0o777), ("", 0o777), ("x", 0o10000)] {
            let e = pod_tmpfs_plan(&v(name, 0, mode))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("pod tmpfs"), "{name:?} {mode:o}: {e}");
        }
    }
}
