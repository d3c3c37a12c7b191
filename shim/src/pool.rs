//! The warm pool: per VM shape (a template's key), up to `[warm]
//! pool_size` clones restored ahead and left running idle, each with its
//! vsock and shared directory plugged and its agent answering. The next
//! pod of that shape takes one ([`claim`]: its directory renamed into the
//! sandbox's, its processes adopted through pidfds, its NICs plugged by
//! the hypervisor layer) instead of restoring one.
//!
//! Who keeps it: no daemon. After each pod of a shape the pool serves,
//! the shim starts a short-lived filler (`containerd-shim-podvisor-v2
//! pool fill`, detached); under the pool's lock (one filler at a time) it
//! cleans up, then restores clones until the shape has its count (and all
//! shapes together stay within `pool_max_mib`), then exits, and the VMs
//! run on by themselves, each in an empty network namespace of its own.
//! Nothing long-lived to supervise, upgrade or leak; the pool is only what
//! is on disk:
//!
//! ```text
//! /run/podvisor/_pool/     root's alone (its sockets reach the agents)
//!   fill.lock              one filler (or drain) at a time
//!   fill.log               the fillers' output
//!   <key>/<id>.building/   a clone being restored
//!   <key>/<id>/            a ready clone: pool.json and the sandbox
//!                          directory's layout (sockets, logs, shared/)
//!   <key>/<id>.discarded/  a clone being removed
//! ```
//!
//! A record names the host's boot and each process by pid and start time.
//! The filler removes: records of another boot, without killing anything
//! (their pids are others' now); VMs whose processes died (the rest
//! killed); unfinished restores (every process whose command line names
//! the directory killed: a filler killed mid-restore recorded nothing);
//! the pools of shapes whose template is gone (replaced or pruned).
//! `pool drain` kills and removes everything.
//!
//! Pool VMs run idle rather than paused: vhost-device-vsock 0.3.0 restarts
//! its queues when QEMU pauses and resumes a VM, and a connection right
//! after the resume ends its worker thread (29 failures in 40 tries here),
//! while an idle guest costs about 0.3% of a core.

use std::path::{Path, PathBuf};
use std::time::Duration;

use podvisor_hypervisor::process::{lock_file, process_start_time};
use podvisor_hypervisor::{
    self as hypervisor, template, Hypervisor, HypervisorError, Supervised, VmSpec,
};
use podvisor_names::paths::{POOL_ROOT, STATE_ROOT};
use podvisor_names::pool::{DRAIN, FILL, FILL_LOG, RECORD, SUBCOMMAND};
use podvisor_protocol::hybrid_vsock::{connect_agent, ReadyListener};
use serde::{Deserialize, Serialize};

use crate::cgroup::PodCgroup;
use crate::config::{Config, ConfigError, VmSizing};
use crate::sandbox_dir::{kill_recorded, remove_tree, RecordedProcess, SandboxDir, State};

/// One filler (or drain) at a time, over every shape.
const LOCK: &str = "fill.lock";
/// A pool VM's directory while it is being restored, or removed, ends so.
const BUILDING_SUFFIX: &str = ".building";
const DISCARDED_SUFFIX: &str = ".discarded";
/// How long a new pool VM's agent may take to answer.
const READY_WITHIN: Duration = Duration::from_secs(20);
/// How long killed pool VM processes get to be gone.
const GONE_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Refused(String),
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> PoolError {
    let what = what.to_string();
    move |source| PoolError::Io { what, source }
}

/// A pool VM, as recorded beside it.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    boot_id: String,
    memory_mib: u32,
    /// The VM process first.
    processes: Vec<RecordedProcess>,
}

impl Record {
    /// Every process still runs (not exited, not a zombie).
    fn alive(&self) -> bool {
        self.processes.iter().all(running)
    }

    fn read(dir: &Path) -> Option<Record> {
        serde_json::from_slice(&std::fs::read(dir.join(RECORD)).ok()?).ok()
    }

    fn write(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!("{RECORD}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, dir.join(RECORD))
    }
}

/// Whether a recorded process still runs: the same process (start time),
/// not exited (a zombie whose parent has not reaped it yet has).
fn running(p: &RecordedProcess) -> bool {
    process_start_time(p.pid) == Some(p.start_time)
        && std::fs::read_to_string(format!("/proc/{}/stat", p.pid)).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or_default()
                .trim_start()
                .starts_with('Z')
        })
}

fn boot_id() -> Result<String, PoolError> {
    podvisor_hypervisor::process::boot_id().map_err(io_err("the boot id"))
}

fn root() -> &'static Path {
    Path::new(POOL_ROOT)
}

/// Creates the pool's root: root's alone (its sockets reach the agents).
fn make_root() -> Result<(), PoolError> {
    std::fs::create_dir_all(root())
        .and_then(|()| {
            std::fs::set_permissions(root(), std::os::unix::fs::PermissionsExt::from_mode(0o700))
        })
        .map_err(io_err(format!("creating {POOL_ROOT}")))
}

/// The pool's lock, held until dropped.
async fn lock() -> Result<std::fs::File, PoolError> {
    let path = root().join(LOCK);
    lock_file(&path)
        .await
        .map_err(io_err(format!("locking {}", path.display())))
}

/// The entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// A ready pool VM's directory is named by its id alone; one being
/// restored or being removed carries a suffix.
fn is_ready(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| !n.to_string_lossy().contains('.'))
}

/// Whether a pod of `sizing` on `hv` may take a pool VM (and so keeps its
/// shape's pool filled): the pool is on and the VM would be a clone.
pub fn serves(config: &Config, sizing: &VmSizing, hv: &dyn Hypervisor) -> bool {
    config.warm.pool_size > 0
        && config.warm.templates
        && sizing.kernel_params == config.kernel_params
        && hv.has_warm_start()
}

/// The pool key of a VM of `spec` on `hv`: its template's.
pub fn key(hv: &dyn Hypervisor, spec: &VmSpec) -> Result<String, HypervisorError> {
    template::key(&hv.describe(), hv.program(), spec)
}

/// A ready pool VM of `key` for sandbox `sandbox_id`: its directory
/// renamed to the sandbox's, recorded there at once (so a shim that dies
/// from here on leaves containerd's cleanup a VM to kill), its processes
/// adopted (the VM process first). `describe` is how the sandbox's state
/// names its start. None when the pool has no VM alive; dead ones are
/// left to the next filler, off the pod's path.
pub fn claim(key: &str, sandbox_id: &str, describe: &str) -> Option<(SandboxDir, Vec<Supervised>)> {
    let target = SandboxDir::path_for(sandbox_id);
    let boot = boot_id().ok()?;
    if target.exists() {
        return None;
    }
    for entry in entries(&root().join(key)) {
        if !is_ready(&entry) {
            continue;
        }
        let Some(record) = Record::read(&entry).filter(|r| r.boot_id == boot && r.alive()) else {
            continue;
        };
        // Atomic: of concurrent pods, one gets it, the others look on.
        if std::fs::rename(&entry, &target).is_err() {
            continue;
        }
        let dir = SandboxDir::open(sandbox_id);
        let recorded = dir.write_state(State {
            sandbox_id: sandbox_id.to_string(),
            hypervisor: describe.to_string(),
            processes: record.processes.clone(),
            ..State::default()
        });
        let adopted = recorded.map_err(|e| e.to_string()).and_then(|()| {
            record
                .processes
                .iter()
                .map(|p| Supervised::adopt(process_name(&p.name), p.pid, p.start_time))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())
        });
        match adopted {
            Ok(processes) => {
                tracing::info!(
                    sandbox = sandbox_id,
                    "VM taken from the pool ({})",
                    entry.display()
                );
                return Some((dir, processes));
            }
            Err(e) => {
                tracing::warn!(sandbox = sandbox_id, "pool VM {}: {e}", entry.display());
                kill_and_wait(&record.processes);
                dir.destroy();
            }
        }
    }
    None
}

/// The static name of a recorded process, for its supervisor.
fn process_name(name: &str) -> &'static str {
    ["qemu", "vhost-device-vsock", "virtiofsd"]
        .into_iter()
        .find(|n| *n == name)
        .unwrap_or("vm process")
}

/// Removes a pool VM's directory; kills its processes first if they are
/// this boot's (recorded, or for an unfinished restore, every process
/// whose command line names the directory). The directory is first
/// renamed aside, atomically: a VM a pod took meanwhile is the pod's, and
/// left alone.
fn discard(entry: &Path, boot: &str) {
    let aside = PathBuf::from(format!("{}{DISCARDED_SUFFIX}", entry.display()));
    if std::fs::rename(entry, &aside).is_err() {
        return;
    }
    match Record::read(&aside) {
        Some(r) if r.boot_id == boot => kill_and_wait(&r.processes),
        Some(_) => {}
        None => kill_and_wait(&processes_naming(entry)),
    }
    tracing::info!("pool: removing {}", entry.display());
    remove_tree(&aside);
}

/// Every process whose command line names the pool VM directory `dir`
/// under any of its names (`<id>`, `<id>.building`, ...): a VM's helpers
/// and QEMU name their sockets and logs there.
fn processes_naming(dir: &Path) -> Vec<RecordedProcess> {
    let base = dir.to_string_lossy();
    let name_at = base.rfind('/').map_or(0, |i| i + 1);
    let base = match base[name_at..].find('.') {
        Some(dot) => &base[..name_at + dot],
        None => &base[..],
    };
    let needle = base.as_bytes();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        // The name ends there: `<id>` is not another id it begins.
        let names_it = cmdline
            .windows(needle.len() + 1)
            .any(|w| w.starts_with(needle) && matches!(w[needle.len()], b'.' | b'/' | 0));
        if names_it {
            if let Some(start_time) = process_start_time(pid) {
                found.push(RecordedProcess {
                    name: "vm process".into(),
                    pid,
                    start_time,
                });
            }
        }
    }
    found
}

/// SIGKILLs recorded processes and waits (a while) for them to be gone.
fn kill_and_wait(processes: &[RecordedProcess]) {
    for p in processes {
        kill_recorded(p);
    }
    let deadline = std::time::Instant::now() + GONE_WITHIN;
    while processes.iter().any(running) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a detached filler for `sizing`'s shape (it outlives this shim
/// if it must); its output goes to the pool's `fill.log`.
pub fn spawn_fill(config: &Config, sizing: &VmSizing, pod_cgroup: Option<&PodCgroup>) {
    let log_path = root().join(FILL_LOG);
    let started = (|| -> Result<(), PoolError> {
        make_root()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(log_path.display()))?;
        let exe = std::env::current_exe().map_err(io_err("finding the shim's own binary"))?;
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args([SUBCOMMAND, FILL, "--vcpus"])
            .arg(sizing.vcpus.to_string())
            .arg("--memory-mib")
            .arg(sizing.memory_mib.to_string())
            .args(["--hypervisor", sizing.hypervisor.name()]);
        if let Some(c) = &config.source {
            cmd.arg("--config").arg(c);
        }
        // Not the pod's bundle: the filler and its VMs outlive the pod.
        cmd.current_dir("/");
        let err = log.try_clone().map_err(io_err(log_path.display()))?;
        cmd.stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err);
        // SAFETY: setsid(2) is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        // Nor the pod's cgroup.
        if let Some(c) = pod_cgroup {
            c.start_outside(&mut cmd)
                .map_err(|e| PoolError::Refused(e.to_string()))?;
        }
        let mut child = cmd
            .spawn()
            .map_err(io_err(format!("starting {} pool fill", exe.display())))?;
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(())
    })();
    if let Err(e) = started {
        tracing::warn!("starting the pool filler: {e}");
    }
}

/// Restores clones of `sizing`'s shape until the pool holds
/// `pool_size` of them, or until all shapes' pool VMs would pass
/// `pool_max_mib`. Returns how many it added.
pub async fn fill(config: &Config, sizing: &VmSizing) -> Result<usize, PoolError> {
    let (hv, _) = hypervisor::select(
        sizing.hypervisor,
        &config.paths,
        config.jail,
        Path::new(STATE_ROOT),
    )
    .await?;
    if !serves(config, sizing, &*hv) {
        return Err(PoolError::Refused(format!(
            "the pool serves no VM of this shape on {} (pool_size {}, templates {}, kernel parameters {:?})",
            hv.describe(),
            config.warm.pool_size,
            config.warm.templates,
            sizing.kernel_params
        )));
    }
    let probe = config.vm_spec(sizing, root());
    let key = key(&*hv, &probe)?;
    make_root()?;
    let _lock = lock().await?;
    let boot = boot_id()?;
    clean(&config.warm.template_dir, &boot);
    let t = template::get_or_build(
        &*hv,
        hv.program(),
        &probe,
        &config.warm.template_dir,
        config.warm.max_templates,
    )
    .await?;
    let shape = root().join(&key);
    std::fs::create_dir_all(&shape).map_err(io_err(format!("creating {}", shape.display())))?;
    let mut added = 0;
    loop {
        let ready = entries(&shape).iter().filter(|e| is_ready(e)).count();
        if ready >= config.warm.pool_size {
            break;
        }
        let used = pool_mib();
        if used + u64::from(sizing.memory_mib) > config.warm.pool_max_mib {
            tracing::info!(
                "pool: {used} MiB held; another {} MiB VM would pass pool_max_mib {}",
                sizing.memory_mib,
                config.warm.pool_max_mib
            );
            break;
        }
        let id = format!("{:016x}", rand_u64());
        let building = shape.join(format!("{id}{BUILDING_SUFFIX}"));
        let dir = SandboxDir::create_at(&building)
            .map_err(io_err_from(format!("creating {}", building.display())))?;
        let start = std::time::Instant::now();
        let restored = match config.jail.prepare(&config.vm_spec(sizing, dir.root())) {
            Ok(spec) => restore_one(&*hv, &spec, &t, &boot, &shape.join(&id)).await,
            Err(e) => Err(e),
        };
        if let Err(e) = restored {
            dir.destroy();
            if matches!(e, HypervisorError::Template { .. }) {
                let _ = std::fs::remove_dir_all(&t.dir);
            }
            return Err(e.into());
        }
        tracing::info!(
            "pool: {} ready in {} ms",
            shape.join(&id).display(),
            start.elapsed().as_millis()
        );
        added += 1;
    }
    Ok(added)
}

fn io_err_from(what: String) -> impl FnOnce(crate::sandbox_dir::StateError) -> PoolError {
    move |e| PoolError::Io {
        what,
        source: std::io::Error::other(e.to_string()),
    }
}

/// Restores one clone into `spec.dir` (a `.building` directory), records
/// it, waits for its agent, and renames the directory to `ready`; the
/// VM's processes then run on unsupervised.
async fn restore_one(
    hv: &dyn Hypervisor,
    spec: &VmSpec,
    t: &template::Template,
    boot: &str,
    ready: &Path,
) -> Result<(), HypervisorError> {
    let io = |what: String| move |source| HypervisorError::Io { what, source };
    let listener = ReadyListener::bind(&spec.vsock)
        .map_err(|e| io(format!("binding {}", spec.vsock.display()))(std::io::Error::other(e)))?;
    let mut vm = hv.restore(spec, t).await?;
    let record = Record {
        boot_id: boot.to_string(),
        memory_mib: spec.memory_mib,
        processes: RecordedProcess::of(&vm),
    };
    let serving = async {
        record
            .write(&spec.dir)
            .map_err(io(format!("recording {}", spec.dir.display())))?;
        connect_agent(&spec.vsock, Some(&listener), READY_WITHIN)
            .await
            .map_err(|e| {
                HypervisorError::Unavailable(format!(
                    "the pool VM's agent did not answer: {e}; logs:\n{}",
                    hypervisor::log_tails(&spec.dir, 20)
                ))
            })?;
        drop(listener);
        std::fs::rename(&spec.dir, ready).map_err(io(format!("renaming {}", spec.dir.display())))
    }
    .await;
    match serving {
        Ok(()) => {
            vm.release();
            Ok(())
        }
        Err(e) => {
            vm.stop(Duration::ZERO).await;
            Err(e)
        }
    }
}

/// Removes what no longer belongs to the pool (its filler holds the
/// lock): records of another boot, VMs whose processes died, unfinished
/// restores, and the VMs of shapes whose template under `templates` is
/// gone.
fn clean(templates: &Path, boot: &str) {
    for shape in entries(root()).iter().filter(|p| p.is_dir()) {
        let orphaned = shape
            .file_name()
            .is_none_or(|key| !templates.join(key).is_dir());
        for entry in entries(shape) {
            let stale = orphaned
                || !is_ready(&entry)
                || Record::read(&entry).is_none_or(|r| r.boot_id != boot || !r.alive());
            if stale {
                discard(&entry, boot);
            }
        }
        if orphaned {
            let _ = std::fs::remove_dir(shape);
        }
    }
}

/// Guest memory of every pool VM (ready or being restored), MiB.
fn pool_mib() -> u64 {
    entries(root())
        .iter()
        .flat_map(|shape| entries(shape))
        .filter_map(|e| Record::read(&e))
        .map(|r| u64::from(r.memory_mib))
        .sum()
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom into a buffer of the length given.
    let _ = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    u64::from_ne_bytes(b)
}

/// Kills every pool VM of this boot and removes the pool. Returns how
/// many VMs it removed.
pub async fn drain() -> Result<usize, PoolError> {
    if !root().exists() {
        return Ok(0);
    }
    let boot = boot_id()?;
    let lock = lock().await?;
    let mut removed = 0;
    for shape in entries(root()).iter().filter(|p| p.is_dir()) {
        for entry in entries(shape) {
            discard(&entry, &boot);
            removed += 1;
        }
        std::fs::remove_dir(shape).map_err(io_err(format!("removing {}", shape.display())))?;
    }
    // The lock goes last; a filler that was waiting for it finds it gone
    // and takes a new one (see `lock_file`).
    for file in entries(root()) {
        std::fs::remove_file(&file).map_err(io_err(format!("removing {}", file.display())))?;
    }
    std::fs::remove_dir(root()).map_err(io_err(format!("removing {POOL_ROOT}")))?;
    drop(lock);
    Ok(removed)
}

/// `containerd-shim-podvisor-v2 pool fill [--config PATH] [--vcpus N]
/// [--memory-mib N] [--hypervisor KIND]` fills the pool of the node's
/// default shape (or of the one given); `pool drain` kills and removes
/// every pool VM.
pub async fn cli(args: &[String]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match args.first().map(String::as_str) {
        Some(FILL) => {
            let (config, sizing) = crate::warm::shape_args(&args[1..])?;
            let added = fill(&config, &sizing).await?;
            tracing::info!("pool: {added} VM(s) added");
            Ok(())
        }
        Some(DRAIN) if args.len() == 1 => {
            let removed = drain().await?;
            tracing::info!("pool: {removed} VM(s) removed");
            Ok(())
        }
        _ => Err(format!(
            "expected `{FILL} [--config PATH] [--vcpus N] [--memory-mib N] [--hypervisor KIND]` or `{DRAIN}`, got {args:?}"
        )
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_name_their_processes_and_boot() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let r = Record {
            boot_id: boot_id().unwrap(),
            memory_mib: 256,
            processes: vec![RecordedProcess {
                name: "qemu".into(),
                pid: me,
                start_time: process_start_time(me).unwrap(),
            }],
        };
        r.write(dir.path()).unwrap();
        let back = Record::read(dir.path()).unwrap();
        assert!(back.alive());
        assert_eq!(processes_naming(Path::new("/nonexistent/pool/dir")), vec![]);
        // A VM is found by its directory under any of its names. (Its
        // own child, forked before exec, may show the same command line.)
        let mut sleeper = std::process::Command::new("sh")
            .args([
                "-c",
                "sleep 30; true",
                "/nonexistent/pool/k/0123.building/vm.vsock",
            ])
            .spawn()
            .unwrap();
        let pids = |name: &str| -> Vec<u32> {
            processes_naming(&Path::new("/nonexistent/pool/k").join(name))
                .iter()
                .map(|p| p.pid)
                .collect()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !pids("0123").contains(&sleeper.id()) {
            assert!(std::time::Instant::now() < deadline, "sh never showed up");
            std::thread::sleep(Duration::from_millis(10));
        }
        for name in ["0123.building", "0123.discarded"] {
            assert!(pids(name).contains(&sleeper.id()), "{name}");
        }
        assert!(!pids("012").contains(&sleeper.id()));
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        assert!(is_ready(Path::new("/p/k/0123")));
        assert!(!is_ready(Path::new("/p/k/0123.building")));
        assert_eq!(back.boot_id.len(), 36, "{}", back.boot_id);
        let stale = Record {
            processes: vec![RecordedProcess {
                start_time: back.processes[0].start_time + 1,
                ..back.processes[0].clone()
            }],
            ..back
        };
        assert!(
            !stale.alive(),
            "a reused pid passed for the recorded process"
        );
        assert_eq!(process_name("virtiofsd"), "virtiofsd");
        assert_eq!(process_name("sh"), "vm process");
    }
}
