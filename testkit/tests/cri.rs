//! `make test-cri`: the CRI validation suite (critest) for the runc
//! handler (the baseline) and podvisor, on Debian's containerd 1.6 and on
//! 2.x. Prints one table (spec × containerd × handler) and fails when
//! podvisor fails a spec runc passes, unless `critest-by-design.toml` lists
//! it. PODVISOR_CONTAINERD=1|2 picks one containerd; PODVISOR_CRITEST_PARALLEL
//! sets critest's parallel nodes.

// An integration-test crate: every function here is test code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::tests_outside_test_module
)]

use std::path::Path;

use anyhow::{bail, Result};
use podvisor_testkit::containerd::Release;
use podvisor_testkit::critest::{by_design, run_all, table, verdict, Options};

fn main() {
    // libtest's flags (`--nocapture`, filters) mean nothing here.
    if let Err(e) = run() {
        eprintln!("test-cri: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let list = by_design()?;
    let parallel = std::env::var("PODVISOR_CRITEST_PARALLEL")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(2);
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/cri");
    let runs = run_all(&Options {
        releases: Release::selected(),
        parallel,
        out: out.clone(),
    })?;
    println!("{}", table(&runs, &list));
    println!("reports and critest output: {}", out.display());
    let v = verdict(&runs, &list);
    for spec in &v.stale {
        println!("note: podvisor passes \"{spec}\" now; take it off critest-by-design.toml");
    }
    if !v.unknown.is_empty() {
        bail!(
            "critest-by-design.toml lists specs no run has: {:?}",
            v.unknown
        );
    }
    if !v.regressions.is_empty() {
        for (release, spec, why) in &v.regressions {
            println!("REGRESSION on {}: {spec}\n    {why}", release.label());
        }
        bail!(
            "{} spec(s) runc passes fail with podvisor",
            v.regressions.len()
        );
    }
    println!(
        "podvisor passes every spec runc passes, but {} by design",
        list.len()
    );
    Ok(())
}
