//! Warm start's figures: cold boot beside a clone of the shape's template
//! and beside a VM from the warm pool, on the same containerd, machine and
//! backend: CRI RunPodSandbox, `ctr run` to the first output, the
//! template's build, what a resident pod's VM process holds (PSS, its
//! guest RAM included), and what an idle pool VM costs.

use std::time::Duration;

use anyhow::{Context, Result};
use podvisor_testkit::containerd::{text, Containerd, Release};

use crate::{
    ctr_first_output, ctr_first_output_once, median, mib, ms, processes_with, pss, row, runp,
    runp_with, CTR_RUNS, RUNP_RUNS,
};

pub fn figures(note: &str) -> Result<()> {
    let ctd = Containerd::start(Release::V2)?;
    let result = measure(&ctd, note);
    ctd.stop();
    result
}

fn measure(ctd: &Containerd, note: &str) -> Result<()> {
    let config = std::fs::read_to_string(&ctd.podvisor_config)?;
    let templates = |on: bool| {
        std::fs::write(
            &ctd.podvisor_config,
            config.replace("[warm]\n", &format!("[warm]\ntemplates = {on}\n")),
        )
    };
    let runc_runp = median(
        (0..RUNP_RUNS)
            .map(|i| runp_with(ctd, &format!("runc{i}"), "runc"))
            .collect::<Result<Vec<_>>>()?,
    );
    templates(false)?;
    let cold_runp = runps(ctd, "cold")?;
    let cold_first = ctr_first_output(ctd)?;
    let cold_pss = resident_pss(ctd, "resident-cold")?;

    templates(true)?;
    let first = runp(ctd, "template-build")?;
    let manifest = template_manifest(ctd)?;
    let clone_runp = runps(ctd, "clone")?;
    let clone_first = ctr_first_output(ctd)?;
    let clone_pss = resident_pss(ctd, "resident-clone")?;

    std::fs::write(
        &ctd.podvisor_config,
        config.replace("[warm]\n", "[warm]\npool_size = 1\n"),
    )?;
    let pooled = pool_figures(ctd);
    let drained = drain_pool();
    templates(true)?;
    let pooled = pooled?;
    drained?;

    row(
        &format!(
            "RunPodSandbox, runc (containerd, CNI and pause: the floor), median of {RUNP_RUNS}"
        ),
        ms(runc_runp),
        "-",
    );
    row(
        &format!("RunPodSandbox, cold boot ({note}), median of {RUNP_RUNS}"),
        ms(cold_runp),
        "-",
    );
    row(
        &format!("RunPodSandbox, clone of a template ({note}), median of {RUNP_RUNS}"),
        ms(clone_runp),
        "<= 600 ms",
    );
    row(
        "  the shape's first pod (builds the template, then restores)",
        ms(first),
        "-",
    );
    row(
        "  of it: template build (boot to agent, save)",
        format!("{} ms", manifest["build_ms"]),
        "-",
    );
    row(
        &format!("RunPodSandbox, from the warm pool ({note}), median of {RUNP_RUNS}"),
        ms(pooled.runp),
        "<= 200 ms",
    );
    row(
        &format!("ctr run to first output, cold boot ({note})"),
        ms(cold_first),
        "-",
    );
    row(
        &format!("ctr run to first output, clone ({note})"),
        ms(clone_first),
        "-",
    );
    let pages = manifest["memory_pages"].as_u64().unwrap_or(0);
    row(
        &format!("ctr run to first output, from the pool ({note})"),
        ms(pooled.first),
        "-",
    );
    row(
        "template: guest memory in use (copied into each clone)",
        mib(pages * 4096),
        "-",
    );
    row(
        "template: device and vCPU state",
        mib(manifest["state_bytes"].as_u64().unwrap_or(0)),
        "-",
    );
    row(
        "VM process PSS per pod, guest RAM included, cold boot",
        mib(cold_pss),
        "-",
    );
    row(
        "VM process PSS per pod, guest RAM included, clone",
        mib(clone_pss),
        "-",
    );
    row(
        "pool VM held idle: PSS of its processes (QEMU and helpers)",
        mib(pooled.pss),
        "-",
    );
    row(
        "pool VM held idle: CPU, share of one core over 10 s",
        format!("{:.2}%", pooled.idle_cpu * 100.0),
        "-",
    );
    println!(
        "  clones share no guest memory: each has its own memfd (vhost-user backends map it too)"
    );
    println!("  from the pool on hardware KVM (design target <= 30 ms): not measurable here");
    Ok(())
}

struct Pooled {
    runp: Duration,
    first: Duration,
    pss: u64,
    idle_cpu: f64,
}

/// With `pool_size = 1`: a pod of the shape primes the pool; then each
/// measured start waits for a ready pool VM first, and must have taken it.
fn pool_figures(ctd: &Containerd) -> Result<Pooled> {
    runp(ctd, "pool-prime")?;
    let taken = || ctd.log().matches("VM taken from the pool").count();
    let mut runps = Vec::new();
    for i in 0..RUNP_RUNS {
        let vm = wait_pool_vm()?;
        let before = taken();
        runps.push(runp(ctd, &format!("pool{i}"))?);
        anyhow::ensure!(
            taken() == before + 1,
            "pool{i} did not take {} from the pool",
            vm.display()
        );
    }
    let mut firsts = Vec::new();
    for i in 0..CTR_RUNS {
        wait_pool_vm()?;
        firsts.push(ctr_first_output_once(ctd, &format!("pool-first-{i}"))?);
    }
    let vm = wait_pool_vm()?;
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vm.join(podvisor_names::pool::RECORD))?)?;
    let pids: Vec<u64> = record["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["pid"].as_u64())
        .collect();
    let pss = pids
        .iter()
        .filter_map(|p| u32::try_from(*p).ok())
        .map(pss)
        .sum();
    let ticks = || -> u64 { pids.iter().map(|p| cpu_ticks(*p)).sum() };
    let t0 = ticks();
    std::thread::sleep(Duration::from_secs(10));
    // USER_HZ is 100 on Linux: 1000 ticks are 10 s of one core.
    #[allow(clippy::cast_precision_loss)]
    let idle_cpu = ticks().saturating_sub(t0) as f64 / 1000.0;
    Ok(Pooled {
        runp: median(runps),
        first: median(firsts),
        pss,
        idle_cpu,
    })
}

/// A ready pool VM's directory, once there is one.
fn wait_pool_vm() -> Result<std::path::PathBuf> {
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    loop {
        let ready = std::fs::read_dir(podvisor_names::paths::POOL_ROOT)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|shape| {
                std::fs::read_dir(shape.path())
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .map(|e| e.path())
            // Ready ones are named by their id alone (no suffix).
            .find(|p| {
                p.join(podvisor_names::pool::RECORD).exists()
                    && p.file_name()
                        .is_some_and(|n| !n.to_string_lossy().contains('.'))
            });
        if let Some(vm) = ready {
            return Ok(vm);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no pool VM became ready; see {}/fill.log",
            podvisor_names::paths::POOL_ROOT
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn drain_pool() -> Result<()> {
    let shim = podvisor_testkit::containerd::shim_dir()?.join(podvisor_names::SHIM_BINARY);
    let out = std::process::Command::new(shim)
        .args([
            podvisor_names::pool::SUBCOMMAND,
            podvisor_names::pool::DRAIN,
        ])
        .output()?;
    anyhow::ensure!(out.status.success(), "pool drain: {}", text(&out));
    Ok(())
}

/// utime + stime of `pid`, clock ticks.
fn cpu_ticks(pid: u64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum()
}

fn runps(ctd: &Containerd, prefix: &str) -> Result<Duration> {
    let runs: Vec<Duration> = (0..RUNP_RUNS)
        .map(|i| runp(ctd, &format!("{prefix}{i}")))
        .collect::<Result<_>>()?;
    Ok(median(runs))
}

/// The manifest of the one template in `ctd`'s template store.
fn template_manifest(ctd: &Containerd) -> Result<serde_json::Value> {
    let dir = ctd.dir().join("templates");
    let t = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("manifest.json").exists())
        .with_context(|| format!("no template in {}", dir.display()))?;
    Ok(serde_json::from_slice(&std::fs::read(
        t.join("manifest.json"),
    )?)?)
}

/// PSS of a resident pod's VM process (QEMU or podvisor-vmm), its shared
/// guest RAM included.
fn resident_pss(ctd: &Containerd, name: &str) -> Result<u64> {
    let out = ctd.ctr_run(&["-d"], name, &["sleep", "1000"]).output()?;
    anyhow::ensure!(out.status.success(), "ctr run -d: {}", text(&out));
    std::thread::sleep(Duration::from_secs(2));
    let pss = processes_with(&format!("/run/podvisor/{name}/"))
        .into_iter()
        .filter(|(_, prog)| prog.starts_with("qemu") || prog == "podvisor-vmm")
        .map(|(pid, _)| pss(pid))
        .sum();
    ctd.remove_everything();
    Ok(pss)
}
