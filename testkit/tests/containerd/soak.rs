//! The soak (`make soak`, and a short one in `make test`): CRI pods
//! through their whole life cycle, many times with several in flight, and
//! then nothing of them left on the host and containerd no bigger than
//! before. Prints cycles per minute and the sandbox start's p50/p99.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use podvisor_testkit::containerd::{Containerd, BRIDGE};

use super::{json_file, ok, pod_file, stop_pod, wait_clean};

/// Cycles run by default (`PODVISOR_SOAK_CYCLES` overrides).
const CYCLES: usize = 20;
/// Pods in their life cycle at any moment.
const IN_FLIGHT: usize = 4;
/// How much containerd may grow over the soak, from its footprint after a
/// first round of pods.
const FD_BOUND: usize = 8;
const RSS_BOUND_KIB: u64 = 32 * 1024;

/// A long-lived process's open descriptors and resident memory.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    fds: usize,
    rss_kib: u64,
}

impl Footprint {
    fn of(pid: u32) -> Result<Footprint> {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("descriptors of pid {pid}"))?
            .count();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no VmRSS for pid {pid}"))?;
        Ok(Footprint { fds, rss_kib })
    }
}

/// What the soak's pods could leave beyond the harness's own check
/// (processes, shim sockets, netns, sandbox directories, cgroups,
/// mounts): a veth still on the test bridge (with its qdiscs), or any
/// entry under /run/podvisor named by one of their sandbox ids.
fn pods_left(sandboxes: &[String]) -> Vec<String> {
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show", "master", BRIDGE])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut left: Vec<String> = links
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|name| format!("link {} on {BRIDGE}", name.trim()))
        .collect();
    let root = Path::new(podvisor_names::paths::STATE_ROOT);
    left.extend(
        sandboxes
            .iter()
            .map(|id| root.join(id))
            .filter(|p| p.symlink_metadata().is_ok())
            .map(|p| format!("entry {}", p.display())),
    );
    left
}

/// One pod's life: RunPodSandbox, CreateContainer, StartContainer, an
/// exec that must answer from the pod's own guest, StopContainer (the
/// container ends 0 on TERM), RemoveContainer, StopPodSandbox,
/// RemovePodSandbox. Returns the sandbox's id and how long RunPodSandbox
/// took.
fn cycle(c: &Containerd, i: usize, host_boot: &str) -> Result<(String, Duration)> {
    let name = format!("soak{i}");
    let d = c.dir();
    let pod = pod_file(d, &name)?;
    let ctr = json_file(
        d,
        &format!("{name}-ctr.json"),
        r#"{"metadata":{"name":"work"},"image":{"image":"docker.io/podvisor/busybox:latest"},"command":["sh","-c","trap 'exit 0' TERM; sleep 600 & wait"],"linux":{}}"#,
    )?;
    let started = Instant::now();
    let sandbox = ok(&mut c.crictl(&["runp", "--runtime", "podvisor", &pod]), 300)
        .context("RunPodSandbox")?
        .trim()
        .to_string();
    let start = started.elapsed();
    let result = (|| -> Result<()> {
        let id = ok(&mut c.crictl(&["create", &sandbox, &ctr, &pod]), 180)
            .context("CreateContainer")?
            .trim()
            .to_string();
        ok(&mut c.crictl(&["start", &id]), 180).context("StartContainer")?;
        let out = ok(
            &mut c.crictl(&[
                "exec",
                &id,
                "sh",
                "-c",
                "hostname; cat /proc/sys/kernel/random/boot_id",
            ]),
            120,
        )
        .context("exec")?;
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        ensure!(
            lines.len() == 2 && lines[0] == name && !lines[1].is_empty() && lines[1] != host_boot,
            "the exec answered {out:?}, not {name}'s guest"
        );
        ok(&mut c.crictl(&["stop", "--timeout", "30", &id]), 120).context("StopContainer")?;
        let info: serde_json::Value =
            serde_json::from_str(&ok(&mut c.crictl(&["inspect", "-o", "json", &id]), 60)?)?;
        let code = info.pointer("/status/exitCode").and_then(|v| v.as_i64());
        ensure!(code == Some(0), "the container ended {code:?} on TERM");
        ok(&mut c.crictl(&["rm", &id]), 120).context("RemoveContainer")?;
        Ok(())
    })();
    // A failed cycle's sandbox directory (the guest console, the VM's and
    // helpers' logs) is kept before the pod's teardown removes it.
    let result = result.map_err(|e| match keep_sandbox_dir(&sandbox) {
        Ok(kept) => e.context(format!(
            "its sandbox directory is kept in {}",
            kept.display()
        )),
        Err(why) => e.context(format!(
            "its sandbox directory could not be kept ({why:#}): when the VM died, the \
             shim's warning in containerd's log carries its last logs"
        )),
    });
    let stopped = stop_pod(c, &sandbox).context("StopPodSandbox and RemovePodSandbox");
    result
        .and(stopped)
        .with_context(|| format!("{name} ({sandbox})"))?;
    Ok((sandbox, start))
}

/// Copies the regular files under /run/podvisor/<sandbox> (logs, console,
/// state; not sockets) to a directory that outlives the pod.
fn keep_sandbox_dir(sandbox: &str) -> Result<std::path::PathBuf> {
    let from = Path::new(podvisor_names::paths::STATE_ROOT).join(sandbox);
    let to = std::env::temp_dir().join(format!("podvisor-soak-{sandbox}"));
    let mut dirs = vec![from.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() {
                let dest = to.join(entry.path().strip_prefix(&from)?);
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::copy(entry.path(), &dest)?;
            }
        }
    }
    Ok(to)
}

/// `p` (0..=100) of sorted `v`, nearest rank.
fn percentile(v: &[Duration], p: usize) -> Duration {
    let rank = (v.len() * p).div_ceil(100).max(1);
    v.get(rank - 1).copied().unwrap_or_default()
}

/// Runs cycles `first..=last`, `IN_FLIGHT` at a time, stopping at the
/// first failure: each one's sandbox id and start time, or every error.
fn cycles(
    c: &Containerd,
    first: usize,
    last: usize,
    host_boot: &str,
) -> Result<Vec<(String, Duration)>> {
    let next = AtomicUsize::new(first);
    let failed = AtomicBool::new(false);
    let done = Mutex::new(Vec::new());
    let errors = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..IN_FLIGHT {
            s.spawn(|| {
                while !failed.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i > last {
                        break;
                    }
                    match cycle(c, i, host_boot) {
                        Ok(d) => {
                            if let Ok(mut v) = done.lock() {
                                v.push(d);
                            }
                        }
                        Err(e) => {
                            failed.store(true, Ordering::SeqCst);
                            if let Ok(mut v) = errors.lock() {
                                v.push(format!("cycle {i}: {e:#}"));
                            }
                        }
                    }
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap_or_default();
    ensure!(errors.is_empty(), "cycles failed:\n{}", errors.join("\n"));
    Ok(done.into_inner().unwrap_or_default())
}

/// A first round of `IN_FLIGHT` pods sets containerd's baseline (Go's
/// runtime and containerd's caches settle on first use, at that load);
/// then `PODVISOR_SOAK_CYCLES` pods (20 unless set), `IN_FLIGHT` at a
/// time; then nothing of them is left and containerd is within its bounds.
pub fn soak_pod_cycles_leave_nothing(c: &Containerd) -> Result<()> {
    let count: usize = match std::env::var("PODVISOR_SOAK_CYCLES") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("PODVISOR_SOAK_CYCLES={v:?} is not a count"))?,
        Err(_) => CYCLES,
    };
    let host_boot = podvisor_hypervisor::process::boot_id()?;
    let warm_up = cycles(c, 0, IN_FLIGHT - 1, &host_boot).context("the first round")?;
    wait_clean()?;
    let pid = c.pid()?;
    let before = Footprint::of(pid)?;

    let began = Instant::now();
    let done = cycles(c, IN_FLIGHT, IN_FLIGHT + count - 1, &host_boot)?;
    let took = began.elapsed();
    let mut starts: Vec<Duration> = done.iter().map(|(_, t)| *t).collect();
    starts.sort();

    // Nothing left: the harness's check, containerd's view, and what the
    // pods' ids name.
    wait_clean()?;
    for (what, cmd) in [
        ("pods", c.crictl(&["pods", "-q"])),
        ("containers", c.crictl(&["ps", "-a", "-q"])),
        (
            "k8s.io containers",
            c.ctr_in("k8s.io", &["containers", "ls", "-q"]),
        ),
        ("k8s.io tasks", c.ctr_in("k8s.io", &["tasks", "ls", "-q"])),
    ] {
        let left = ok(cmd, 60)?;
        ensure!(
            left.trim().is_empty(),
            "containerd still lists {what}: {left}"
        );
    }
    let ids: Vec<String> = warm_up.into_iter().chain(done).map(|(id, _)| id).collect();
    let left = pods_left(&ids);
    ensure!(left.is_empty(), "left on the host: {left:?}");
    // containerd closes what the last pods' shims held, and its heap
    // shrinks back, within moments.
    let within = |f: Footprint| {
        f.fds <= before.fds + FD_BOUND && f.rss_kib <= before.rss_kib + RSS_BOUND_KIB
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let now = Footprint::of(pid)?;
        if within(now) || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let minutes = took.as_secs_f64() / 60.0;
    eprintln!(
        "soak: {} cycles (after a first round of {IN_FLIGHT}), {IN_FLIGHT} in flight, {:.1} cycles/min; sandbox start p50 {:.2} s, p99 {:.2} s; leaks 0; containerd fds {} -> {} (bound +{FD_BOUND}), RSS {:.1} -> {:.1} MiB (bound +{} MiB)",
        starts.len(),
        starts.len() as f64 / minutes,
        percentile(&starts, 50).as_secs_f64(),
        percentile(&starts, 99).as_secs_f64(),
        before.fds,
        after.fds,
        before.rss_kib as f64 / 1024.0,
        after.rss_kib as f64 / 1024.0,
        RSS_BOUND_KIB / 1024,
    );
    ensure!(
        starts.len() == count,
        "{} of {count} cycles ran",
        starts.len()
    );
    ensure!(
        after.fds <= before.fds + FD_BOUND,
        "containerd's descriptors grew from {} to {}",
        before.fds,
        after.fds
    );
    ensure!(
        after.rss_kib <= before.rss_kib + RSS_BOUND_KIB,
        "containerd's RSS grew from {} KiB to {} KiB",
        before.rss_kib,
        after.rss_kib
    );
    Ok(())
}
