//! cgroup v2 of one container: `/sys/fs/cgroup/podvisor/<container-id>`.
//!
//! The guest is cgroup-v2 only and the agent owns the whole tree, so the
//! spec's `cgroupsPath` (a host path) is not used: each container gets a
//! leaf under `podvisor/`, with the memory, cpu and pids (and, where the
//! kernel has them, cpuset and io) controllers enabled above it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;
use podvisor_protocol::api;

use crate::error::{internal, invalid, Result};

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const PARENT: &str = "podvisor";
const CONTROLLERS: [&str; 5] = ["cpu", "memory", "pids", "cpuset", "io"];

/// Process slots the containers together cannot take: the agent's own
/// threads and the processes it starts before they join a container.
const RESERVED_TASKS: u64 = 128;

/// Enables the controllers from the root down to `podvisor/`, and caps
/// `podvisor/` below the guest's memory and task count by what the agent
/// keeps for itself ([`parent_limits`]). Called once at boot, after
/// cgroup2 is mounted.
pub fn init_hierarchy(root: &Path) -> io::Result<()> {
    let parent = root.join(PARENT);
    fs::create_dir_all(&parent)?;
    for dir in [root, parent.as_path()] {
        for c in CONTROLLERS {
            // Missing controllers (cpuset, io on some kernels) are not fatal.
            if let Err(e) = fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")) {
                tracing::debug!("enabling {c} in {}: {e}", dir.display());
            }
        }
    }
    // What is free now, before any container: the kernel's own memory,
    // the root tmpfs and the kernel threads are already taken.
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let available = crate::sandbox::kib_field(&read("/proc/meminfo"), "MemAvailable:") * 1024;
    let limit = |p: &str| read(p).trim().parse::<u64>().ok();
    let running = read("/proc/loadavg")
        .split_whitespace()
        .nth(3)
        .and_then(|f| f.split('/').nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    let tasks = match (
        limit("/proc/sys/kernel/pid_max"),
        limit("/proc/sys/kernel/threads-max"),
    ) {
        (Some(p), Some(t)) => Some(p.min(t).saturating_sub(running)),
        _ => None,
    };
    let limits = parent_limits(available, tasks);
    for (file, value) in limits {
        if let Err(e) = fs::write(parent.join(file), value.to_string()) {
            tracing::warn!("capping {PARENT}/{file} at {value}: {e}");
        }
    }
    Ok(())
}

/// The containers' parent's `memory.max` and `pids.max` in a guest with
/// `available` bytes of memory and room for `tasks` more tasks at boot: a
/// sixteenth of that memory (16 to 64 MiB) and [`RESERVED_TASKS`] kept for
/// the agent, so a memory hog or fork bomb with no limit of its own is
/// stopped there (its container OOM-killed, its forks refused) while the
/// agent serves on. Each task slot is backed by [`TASK_MEMORY`] of the
/// containers' memory: a process costs the guest about 100 KiB (kernel
/// stack, page tables, its own pages), and Linux's own task limit leaves
/// 128 KiB each, so without it a fork bomb would run the memory out first
/// and the OOM killer would choose among every container's processes
/// rather than refuse the bomb's forks. A value that cannot be known is
/// left out.
fn parent_limits(available: u64, tasks: Option<u64>) -> Vec<(&'static str, u64)> {
    let mut out = Vec::new();
    let reserve = (available / 16).clamp(16 << 20, 64 << 20);
    let memory = (available > 2 * reserve).then(|| available - reserve);
    if let Some(m) = memory {
        out.push(("memory.max", m));
    }
    let by_count = tasks
        .filter(|t| *t > 2 * RESERVED_TASKS)
        .map(|t| t - RESERVED_TASKS);
    let by_memory = memory.map(|m| m / TASK_MEMORY);
    let slots = match (by_count, by_memory) {
        (Some(c), Some(m)) => Some(c.min(m)),
        (c, m) => c.or(m),
    };
    if let Some(s) = slots {
        out.push(("pids.max", s));
    }
    out
}

/// The containers' memory behind each of their task slots.
const TASK_MEMORY: u64 = 256 << 10;

/// A handle on the container's cgroup directory (cloning it shares the
/// cgroup, it does not make another).
#[derive(Debug, Clone)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn create(root: &Path, container_id: &str) -> Result<Cgroup> {
        let path = root.join(PARENT).join(container_id);
        fs::create_dir(&path).map_err(|e| internal!("creating cgroup {}: {e}", path.display()))?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `files` (from [`resource_files`]); the files of fields a
    /// spec leaves out stay as they are.
    pub fn write_all(&self, files: &[(&str, String)]) -> Result<()> {
        for (file, value) in files {
            self.write(file, value)?;
        }
        Ok(())
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        fs::write(self.path.join(file), value).map_err(|e| {
            internal!(
                "setting cgroup {file} = {value:?} for {}: {e}",
                self.path.display()
            )
        })
    }

    fn read(&self, file: &str) -> String {
        fs::read_to_string(self.path.join(file)).unwrap_or_default()
    }

    /// Guest pids of every process in the container.
    pub fn procs(&self) -> Vec<u32> {
        self.read("cgroup.procs")
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Sends `signal` to every process in the container.
    pub fn signal_all(&self, signal: i32) {
        if signal == libc::SIGKILL && self.write("cgroup.kill", "1").is_ok() {
            return;
        }
        for pid in self.procs() {
            let Ok(pid) = libc::pid_t::try_from(pid) else {
                continue;
            };
            // SAFETY: kill(2) with plain integers.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// How many times the OOM killer killed a process in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        flat_keyed(&self.read("memory.events"), "oom_kill")
    }

    pub fn stats(&self) -> api::StatsContainerResponse {
        let cpu_stat = self.read("cpu.stat");
        let mem_stat = self.read("memory.stat");
        let events = self.read("memory.events");
        let cpu = api::CpuStats {
            usage_usec: flat_keyed(&cpu_stat, "usage_usec"),
            user_usec: flat_keyed(&cpu_stat, "user_usec"),
            system_usec: flat_keyed(&cpu_stat, "system_usec"),
            nr_periods: flat_keyed(&cpu_stat, "nr_periods"),
            nr_throttled: flat_keyed(&cpu_stat, "nr_throttled"),
            throttled_usec: flat_keyed(&cpu_stat, "throttled_usec"),
            ..Default::default()
        };
        let memory = api::MemoryStats {
            usage_bytes: single(&self.read("memory.current")),
            limit_bytes: single(&self.read("memory.max")),
            anon_bytes: flat_keyed(&mem_stat, "anon"),
            file_bytes: flat_keyed(&mem_stat, "file"),
            oom_events: flat_keyed(&events, "oom"),
            oom_kill_events: flat_keyed(&events, "oom_kill"),
            ..Default::default()
        };
        let pids = api::PidsStats {
            current: single(&self.read("pids.current")),
            limit: single(&self.read("pids.max")),
            ..Default::default()
        };
        api::StatsContainerResponse {
            cpu: Some(cpu).into(),
            memory: Some(memory).into(),
            pids: Some(pids).into(),
            ..Default::default()
        }
    }

    /// Kills what is left and removes the cgroup directory.
    pub fn remove(&self) {
        for _ in 0..100 {
            self.signal_all(libc::SIGKILL);
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                // EBUSY until the killed processes are reaped.
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        tracing::warn!("cgroup {} still busy; left in place", self.path.display());
    }
}

/// The cgroup v2 files and values that express `res`.
pub fn resource_files(res: &LinuxResources) -> Result<Vec<(&'static str, String)>> {
    let mut out = Vec::new();
    let max_or = |v: i64| {
        if v < 0 {
            "max".to_string()
        } else {
            v.to_string()
        }
    };
    if let Some(mem) = res.memory() {
        if let Some(limit) = mem.limit() {
            out.push(("memory.max", max_or(limit)));
        }
        if let Some(low) = mem.reservation() {
            out.push(("memory.low", max_or(low)));
        }
        // OCI's swap is memory+swap; cgroup v2 wants swap alone.
        if let Some(swap) = mem.swap() {
            let v = match (swap, mem.limit()) {
                (s, _) if s < 0 => "max".to_string(),
                (s, Some(l)) if l >= 0 => {
                    if s < l {
                        return Err(invalid!(
                            "memory.swap ({s}) must not be below memory.limit ({l})"
                        ));
                    }
                    (s - l).to_string()
                }
                (s, _) => s.to_string(),
            };
            out.push(("memory.swap.max", v));
        }
    }
    if let Some(cpu) = res.cpu() {
        if let Some(shares) = cpu.shares() {
            out.push(("cpu.weight", shares_to_weight(shares).to_string()));
        }
        if cpu.quota().is_some() || cpu.period().is_some() {
            let quota = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_string(),
            };
            let period = cpu.period().unwrap_or(100_000);
            if period == 0 {
                return Err(invalid!("cpu.period must be positive"));
            }
            out.push(("cpu.max", format!("{quota} {period}")));
        }
        if let Some(cpus) = cpu.cpus() {
            out.push(("cpuset.cpus", cpus.clone()));
        }
        if let Some(mems) = cpu.mems() {
            out.push(("cpuset.mems", mems.clone()));
        }
    }
    if let Some(pids) = res.pids() {
        let limit = pids.limit();
        out.push((
            "pids.max",
            if limit > 0 {
                limit.to_string()
            } else {
                "max".to_string()
            },
        ));
    }
    if let Some(unified) = res.unified() {
        for (key, value) in unified {
            let file = unified_file(key)?;
            out.push((file, value.clone()));
        }
    }
    Ok(out)
}

/// `linux.resources.unified` keys name cgroup files directly; only plain
/// controller files are accepted (no paths).
fn unified_file(key: &str) -> Result<&'static str> {
    const ALLOWED: [&str; 12] = [
        "memory.max",
        "memory.high",
        "memory.low",
        "memory.min",
        "memory.swap.max",
        "memory.oom.group",
        "cpu.max",
        "cpu.weight",
        "cpu.idle",
        "pids.max",
        "cpuset.cpus",
        "cpuset.mems",
    ];
    ALLOWED
        .into_iter()
        .find(|a| *a == key)
        .ok_or_else(|| invalid!("unsupported cgroup key {key:?} in linux.resources.unified"))
}

/// cgroup v1 cpu.shares (2..=262144) to v2 cpu.weight (1..=10000), the
/// conversion runc and crun use.
fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 100;
    }
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// A value from a "key value" per line file such as memory.events.
fn flat_keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A single-value file; "max" (no limit) reads as 0.
fn single(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn limits_map_to_v2_files() {
        let files = resource_files(&res(r#"{"memory":{"limit":33554432,"swap":67108864},
                "cpu":{"shares":1024,"quota":50000,"period":100000},
                "pids":{"limit":20}}"#))
        .unwrap();
        assert!(files.contains(&("memory.max", "33554432".into())));
        assert!(files.contains(&("memory.swap.max", "33554432".into())));
        assert!(files.contains(&("cpu.weight", "39".into())));
        assert!(files.contains(&("cpu.max", "50000 100000".into())));
        assert!(files.contains(&("pids.max", "20".into())));
    }

    #[test]
    fn unlimited_values_are_max() {
        let files = resource_files(&res(
            r#"{"memory":{"limit":-1,"swap":-1},"cpu":{"quota":-1},"pids":{"limit":0}}"#,
        ))
        .unwrap();
        assert!(files.contains(&("memory.max", "max".into())));
        assert!(files.contains(&("memory.swap.max", "max".into())));
        assert!(files.contains(&("cpu.max", "max 100000".into())));
        assert!(files.contains(&("pids.max", "max".into())));
    }

    #[test]
    fn swap_below_limit_is_refused() {
        let err = resource_files(&res(r#"{"memory":{"limit":100,"swap":50}}"#)).unwrap_err();
        assert!(err.to_string().contains("memory.swap"), "{err}");
    }

    #[test]
    fn unified_keys_are_allow_listed() {
        assert!(resource_files(&res(r#"{"unified":{"memory.high":"1000"}}"#)).is_ok());
        let err = resource_files(&res(r#"{"unified":{"../../x":"1"}}"#)).unwrap_err();
        assert!(err.to_string().contains("../../x"), "{err}");
    }

    #[test]
    fn shares_conversion_matches_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1024), 39);
    }

    #[test]
    fn the_parent_keeps_a_reserve_for_the_agent() {
        const MIB: u64 = 1 << 20;
        // 512 MiB free: 32 MiB kept; a task slot per 256 KiB of the rest,
        // below Linux's own limit for that memory.
        assert_eq!(
            parent_limits(512 * MIB, Some(3_900)),
            vec![("memory.max", 480 * MIB), ("pids.max", 1_920)]
        );
        // Small guests keep 16 MiB, large ones 64 MiB.
        assert_eq!(parent_limits(128 * MIB, Some(32_768))[0].1, 112 * MIB);
        assert_eq!(parent_limits(8192 * MIB, Some(32_768))[0].1, 8128 * MIB);
        // Where Linux's limit is lower, it holds, less the agent's slots.
        assert_eq!(
            parent_limits(8192 * MIB, Some(20_000))[1],
            ("pids.max", 19_872)
        );
        // Unknown memory: Linux's limit alone, less the agent's slots.
        assert_eq!(parent_limits(0, Some(3_900)), vec![("pids.max", 3_772)]);
        // Unknown (unreadable) sizes are left uncapped.
        assert!(parent_limits(0, None).is_empty());
    }

    #[test]
    fn flat_keyed_parses() {
        let ev = "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n";
        assert_eq!(flat_keyed(ev, "oom_kill"), 1);
        assert_eq!(flat_keyed(ev, "oom"), 2);
        assert_eq!(flat_keyed(ev, "absent"), 0);
        assert_eq!(single("max\n"), 0);
        assert_eq!(single("4096\n"), 4096);
    }
}
