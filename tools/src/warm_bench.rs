//! Warm start's figures: cold boot beside a clone of the shape's template,
//! on the same containerd, machine and backend: CRI RunPodSandbox, `ctr
//! run` to the first output, the template's build, and what a resident
//! pod's VM process holds (PSS, its guest RAM included).

use std::time::Duration;

use anyhow::{Context, Result};
use podvisor_testkit::containerd::{text, Containerd, Release};

use crate::{ctr_first_output, median, mib, ms, processes_with, row, runp, RUNP_RUNS};

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
    templates(true)?;

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
    println!(
        "  clones share no guest memory: each has its own memfd (vhost-user backends map it too)"
    );
    Ok(())
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
        .map(|(pid, _)| {
            let t =
                std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            t.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        })
        .sum();
    ctd.remove_everything();
    Ok(pss)
}
