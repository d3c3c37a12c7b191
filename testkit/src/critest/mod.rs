//! The CRI validation suite (critest, from the cri-tools release
//! `upstream/cri-tools` pins) run against the podvisor handler and, as the
//! baseline, runc, on a private containerd of each release (Debian's 1.6
//! and 2.x), with its images from a registry on loopback ([`images`]).
//!
//! The verdict: every spec runc passes, podvisor passes too, except those
//! on the committed list of what a VM runtime cannot do by design
//! (`critest-by-design.toml` beside this crate's Cargo.toml, each with its
//! reason). A listed spec that podvisor passes after all is reported, so
//! the list stays short and true.

pub mod images;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::containerd::{Containerd, Mirror, Release};
use crate::image::build;
use crate::registry::Registry;
use crate::vm::tool;

/// Where the registry listens unless PODVISOR_REGISTRY says.
const REGISTRY_ADDR: &str = "127.0.0.1:5117";

/// The handlers each containerd serves: the baseline first.
pub const HANDLERS: [&str; 2] = ["runc", "podvisor"];

/// How a spec ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Skipped,
    /// With the first line of the failure.
    Failed(String),
}

impl Outcome {
    fn mark(&self) -> &'static str {
        match self {
            Outcome::Passed => "pass",
            Outcome::Skipped => "skip",
            Outcome::Failed(_) => "FAIL",
        }
    }
}

/// One critest run: a handler on a containerd.
#[derive(Debug)]
pub struct Run {
    pub release: Release,
    pub version: String,
    pub handler: &'static str,
    pub specs: BTreeMap<String, Outcome>,
    pub duration: Duration,
    /// critest's output.
    pub log: PathBuf,
}

impl Run {
    pub fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.specs.values().filter(|o| f(o)).count()
    }

    pub fn summary(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped in {:.0} s",
            self.count(|o| *o == Outcome::Passed),
            self.count(|o| matches!(o, Outcome::Failed(_))),
            self.count(|o| *o == Outcome::Skipped),
            self.duration.as_secs_f64()
        )
    }
}

/// A spec podvisor cannot pass by design, and why.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ByDesign {
    pub spec: String,
    pub reason: String,
}

/// The committed list.
pub fn by_design() -> Result<Vec<ByDesign>> {
    #[derive(serde::Deserialize)]
    struct File {
        by_design: Vec<ByDesign>,
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("critest-by-design.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let f: File = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(f.by_design)
}

/// What to run.
#[derive(Debug)]
pub struct Options {
    pub releases: Vec<Release>,
    /// critest's parallel nodes (each podvisor spec boots a VM).
    pub parallel: u32,
    /// Where reports and logs go.
    pub out: PathBuf,
}

/// Starts the registry, pushes the stand-in images, and runs critest for
/// each release and handler.
pub fn run_all(opts: &Options) -> Result<Vec<Run>> {
    std::fs::create_dir_all(&opts.out)?;
    let addr = std::env::var("PODVISOR_REGISTRY").unwrap_or_else(|_| REGISTRY_ADDR.into());
    let registry = Registry::start(&addr)?;
    for s in images::stand_ins()? {
        let built = build(&s.def)?;
        for r in &s.refs {
            let (_, repo, tag) = images::split_ref(r).with_context(|| format!("bad ref {r}"))?;
            registry
                .push(repo, tag, &built)
                .with_context(|| format!("pushing {r}"))?;
        }
    }
    let mirror = Mirror {
        mirror: &registry.addr,
        hosts: &images::REGISTRIES,
    };
    let mut runs = Vec::new();
    for &release in &opts.releases {
        let ctd = Containerd::start_with(release, Some(&mirror))?;
        let version = release.version();
        for handler in HANDLERS {
            eprintln!(
                "critest: {handler} on containerd {version} ({} parallel)",
                opts.parallel
            );
            let before = podvisor_dirs();
            let run = run_one(&ctd, &version, handler, opts);
            ctd.remove_everything();
            let leak = wait_for_no_leftovers(&ctd, &before);
            let run = run?;
            leak?;
            eprintln!(
                "critest: {handler} on containerd {version}: {}",
                run.summary()
            );
            runs.push(run);
        }
        ctd.stop();
    }
    Ok(runs)
}

fn run_one(ctd: &Containerd, version: &str, handler: &'static str, opts: &Options) -> Result<Run> {
    let name = format!("{}-{handler}", ctd.release.label());
    let report = opts.out.join(format!("{name}.json"));
    let log = opts.out.join(format!("{name}.log"));
    let _ = std::fs::remove_file(&report);
    let endpoint = format!("unix://{}", ctd.address.display());
    let critest = tool("CRITEST", "critest");
    let logf = std::fs::File::create(&log)?;
    let suite_args = [
        format!("-runtime-endpoint={endpoint}"),
        format!("-image-endpoint={endpoint}"),
        format!("-runtime-handler={handler}"),
        // The config critest looks for by default is the host's.
        format!("-config={}", opts.out.join("crictl.yaml").display()),
    ];
    // critest is a Go test binary; in parallel, ginkgo (built beside it)
    // runs it as its nodes, as critest's own --parallel would, but with
    // the report where we want it.
    let mut cmd = if opts.parallel > 1 {
        let suite = opts.out.join("critest.test");
        let _ = std::fs::remove_file(&suite);
        std::os::unix::fs::symlink(&critest, &suite)?;
        let ginkgo = critest.with_file_name("ginkgo");
        let mut c = Command::new(ginkgo);
        c.arg(format!("--nodes={}", opts.parallel))
            .arg(format!("--output-dir={}", opts.out.display()))
            .arg(format!("--json-report={name}.json"))
            .args(["--no-color", "--timeout=2h", "--skip=benchmark"])
            .arg(&suite)
            .arg("--")
            .args(&suite_args);
        c
    } else {
        let mut c = Command::new(&critest);
        c.args(&suite_args)
            .arg(format!("--ginkgo.json-report={}", report.display()))
            .args(["--ginkgo.no-color", "--ginkgo.timeout=2h"]);
        c
    };
    cmd.current_dir(&opts.out)
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf);
    let start = Instant::now();
    let status = cmd.status().with_context(|| {
        format!(
            "running {} (upstream/build.sh cri-tools)",
            critest.display()
        )
    })?;
    let duration = start.elapsed();
    let specs = parse_report(&report).with_context(|| {
        format!(
            "critest ({status}) left no usable report; its output is in {}",
            log.display()
        )
    })?;
    Ok(Run {
        release: ctd.release,
        version: version.to_string(),
        handler,
        specs,
        duration,
        log,
    })
}

/// Ginkgo's JSON report: spec full text -> outcome. A failed suite setup
/// fails the run.
pub fn parse_report(path: &Path) -> Result<BTreeMap<String, Outcome>> {
    let v: Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let mut out = BTreeMap::new();
    for suite in v.as_array().into_iter().flatten() {
        for spec in suite["SpecReports"].as_array().into_iter().flatten() {
            let kind = spec["LeafNodeType"].as_str().unwrap_or_default();
            let state = spec["State"].as_str().unwrap_or_default();
            let message = spec["Failure"]["Message"]
                .as_str()
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
            if kind != "It" {
                if !matches!(state, "passed" | "skipped") {
                    bail!("critest's {kind} {state}: {message}");
                }
                continue;
            }
            let mut name: Vec<&str> = spec["ContainerHierarchyTexts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            name.push(spec["LeafNodeText"].as_str().unwrap_or_default());
            let outcome = match state {
                "passed" => Outcome::Passed,
                "skipped" | "pending" => Outcome::Skipped,
                _ => Outcome::Failed(format!("{state}: {message}")),
            };
            out.insert(name.join(" "), outcome);
        }
    }
    if out.is_empty() {
        bail!("no specs in {}", path.display());
    }
    Ok(out)
}

/// The sandbox directories on the host now (the state root also holds
/// host-wide files, such as the KVM probe's cached verdict).
fn podvisor_dirs() -> Vec<String> {
    std::fs::read_dir(podvisor_names::paths::STATE_ROOT)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// No shim of this containerd, and no sandbox directory made since
/// `before`, is left once every pod is gone.
fn wait_for_no_leftovers(ctd: &Containerd, before: &[String]) -> Result<()> {
    let address = ctd.address.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut left: Vec<String> = podvisor_dirs()
            .into_iter()
            .filter(|d| !before.contains(d))
            .map(|d| format!("sandbox directory {d}"))
            .collect();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmd = std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            if cmd.contains("containerd-shim-podvisor-v2") && cmd.contains(&address) {
                left.push(format!("shim {}", cmd.trim()));
            }
        }
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("left behind after critest:\n{}", left.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// What the runs say about podvisor.
#[derive(Debug)]
pub struct Verdict {
    /// Specs runc passed and podvisor failed, not on the list: the
    /// failures of the suite.
    pub regressions: Vec<(Release, String, String)>,
    /// Specs on the list that podvisor passed.
    pub stale: Vec<String>,
    /// Specs on the list that no run has (a typo, or gone upstream).
    pub unknown: Vec<String>,
}

pub fn verdict(runs: &[Run], by_design: &[ByDesign]) -> Verdict {
    let mut regressions = Vec::new();
    let mut passed_listed = Vec::new();
    for release in Release::ALL {
        let of = |h: &str| runs.iter().find(|r| r.release == release && r.handler == h);
        let (Some(runc), Some(pv)) = (of("runc"), of("podvisor")) else {
            continue;
        };
        for (spec, outcome) in &pv.specs {
            let listed = by_design.iter().any(|b| &b.spec == spec);
            match outcome {
                Outcome::Failed(why)
                    if runc.specs.get(spec) == Some(&Outcome::Passed) && !listed =>
                {
                    regressions.push((release, spec.clone(), why.clone()))
                }
                Outcome::Passed if listed => passed_listed.push(spec.clone()),
                _ => {}
            }
        }
    }
    passed_listed.sort();
    passed_listed.dedup();
    let unknown = by_design
        .iter()
        .filter(|b| !runs.iter().any(|r| r.specs.contains_key(&b.spec)))
        .map(|b| b.spec.clone())
        .collect();
    Verdict {
        regressions,
        stale: passed_listed,
        unknown,
    }
}

/// The table: one row per spec, one column per containerd and handler,
/// then each run's totals and time.
pub fn table(runs: &[Run], by_design: &[ByDesign]) -> String {
    let mut specs: Vec<&String> = runs.iter().flat_map(|r| r.specs.keys()).collect();
    specs.sort();
    specs.dedup();
    let mut out = String::new();
    let header: Vec<String> = runs
        .iter()
        .map(|r| format!("{} {}", short_version(&r.version), r.handler))
        .collect();
    out.push_str(&format!("| spec | {} |\n", header.join(" | ")));
    out.push_str(&format!("|---|{}\n", "---|".repeat(runs.len())));
    for spec in specs {
        let cells: Vec<&str> = runs
            .iter()
            .map(|r| r.specs.get(spec).map(Outcome::mark).unwrap_or("-"))
            .collect();
        let note = if by_design.iter().any(|b| &b.spec == spec) {
            " (by design)"
        } else {
            ""
        };
        out.push_str(&format!("| {spec}{note} | {} |\n", cells.join(" | ")));
    }
    out.push_str("\n| containerd | handler | passed | failed | skipped | time |\n|---|---|---|---|---|---|\n");
    for r in runs {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0} s |\n",
            r.version,
            r.handler,
            r.count(|o| *o == Outcome::Passed),
            r.count(|o| matches!(o, Outcome::Failed(_))),
            r.count(|o| *o == Outcome::Skipped),
            r.duration.as_secs_f64()
        ));
    }
    out
}

/// `1.6.20~ds1` -> `1.6.20`, `v2.2.9` -> `2.2.9`.
fn short_version(v: &str) -> &str {
    let v = v.trim_start_matches('v');
    v.split('~').next().unwrap_or(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(release: Release, handler: &'static str, specs: &[(&str, Outcome)]) -> Run {
        Run {
            release,
            version: "v2.2.9".into(),
            handler,
            specs: specs
                .iter()
                .map(|(n, o)| (n.to_string(), o.clone()))
                .collect(),
            duration: Duration::from_secs(1),
            log: PathBuf::new(),
        }
    }

    #[test]
    fn only_what_runc_passes_and_the_list_allows_not_counts() {
        let fail = || Outcome::Failed("failed: boom".into());
        let runs = [
            run(
                Release::V2,
                "runc",
                &[
                    ("a", Outcome::Passed),
                    ("b", fail()),
                    ("c", Outcome::Passed),
                    ("d", Outcome::Passed),
                    ("e", Outcome::Passed),
                ],
            ),
            run(
                Release::V2,
                "podvisor",
                &[
                    ("a", fail()),
                    ("b", fail()),
                    ("c", fail()),
                    ("d", Outcome::Passed),
                    ("e", Outcome::Skipped),
                ],
            ),
        ];
        let list = [
            ByDesign {
                spec: "c".into(),
                reason: "VM".into(),
            },
            ByDesign {
                spec: "d".into(),
                reason: "VM".into(),
            },
            ByDesign {
                spec: "z".into(),
                reason: "VM".into(),
            },
        ];
        let v = verdict(&runs, &list);
        assert_eq!(v.regressions.len(), 1);
        assert_eq!(v.regressions[0].1, "a");
        assert_eq!(v.stale, vec!["d".to_string()]);
        assert_eq!(v.unknown, vec!["z".to_string()]);
        let t = table(&runs, &list);
        assert!(t.contains("| a | pass | FAIL |"), "{t}");
        assert!(t.contains("| c (by design) | pass | FAIL |"), "{t}");
        assert!(t.contains("| v2.2.9 | podvisor | 1 | 3 | 1 | 1 s |"), "{t}");
    }

    #[test]
    fn the_committed_list_parses_and_each_entry_has_a_reason() {
        let list = by_design().unwrap();
        assert!(!list.is_empty());
        for b in list {
            assert!(b.reason.len() > 20, "{}: reason too short", b.spec);
        }
    }

    #[test]
    fn ginkgo_reports_parse() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        std::fs::write(
            &p,
            r#"[{"SpecReports":[
              {"LeafNodeType":"BeforeSuite","State":"passed"},
              {"ContainerHierarchyTexts":["[sig-node] Image Manager"],"LeafNodeText":"pulls","LeafNodeType":"It","State":"passed"},
              {"ContainerHierarchyTexts":["[sig-node] X"],"LeafNodeText":"fails","LeafNodeType":"It","State":"failed","Failure":{"Message":"Expected\nmore"}},
              {"ContainerHierarchyTexts":["[sig-node] X"],"LeafNodeText":"skips","LeafNodeType":"It","State":"skipped"}]}]"#,
        )
        .unwrap();
        let r = parse_report(&p).unwrap();
        assert_eq!(r["[sig-node] Image Manager pulls"], Outcome::Passed);
        assert_eq!(
            r["[sig-node] X fails"],
            Outcome::Failed("failed: Expected".into())
        );
        assert_eq!(r["[sig-node] X skips"], Outcome::Skipped);
    }
}
