//! The images `make images` built (build/images/*.tar, OCI archives), as a
//! node's containerd runs them: each is imported into a private containerd
//! 2.x and its entrypoint run under runc with `--version`; the controller's
//! runs as the non-root user its config names, the node image carries the
//! tree the installer copies to a node, and the kind node image has podvisor
//! installed as kind's containerd reads it. Run with `make test-images`
//! (PODVISOR_IMAGES names another directory of archives).

// An integration-test crate: every function here is test code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::tests_outside_test_module
)]

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{ensure, Context, Result};
use libtest_mimic::{Arguments, Failed, Trial};
use podvisor_testkit::containerd::{text, Containerd, Release};
use serde_json::Value;

/// The chart's appVersion, which `images/build.sh` tags the images with.
fn version() -> Result<String> {
    let chart = std::fs::read_to_string(workspace().join("charts/podvisor/Chart.yaml"))?;
    chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .context("no appVersion in the chart")
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn archive(name: &str) -> PathBuf {
    std::env::var_os("PODVISOR_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("build/images"))
        .join(format!("{name}.tar"))
}

fn ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?}: {}", text(&out));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Imports image `name` from its archive; its reference and OCI config.
fn import(c: &Containerd, name: &str) -> Result<(String, Value)> {
    let path = archive(name);
    ensure!(
        path.is_file(),
        "{} missing: make images builds it",
        path.display()
    );
    let reference = format!("docker.io/podvisor/{name}:{}", version()?);
    let config = ok(Command::new("skopeo").args([
        "inspect",
        "--config",
        &format!("oci-archive:{}", path.display()),
    ]))?;
    let config: Value = serde_json::from_str(&config).context("skopeo's config is not JSON")?;
    ok(&mut c.ctr(&["images", "import", &path.to_string_lossy()]))?;
    let listed = ok(&mut c.ctr(&["images", "ls", "-q"]))?;
    ensure!(
        listed.lines().any(|l| l == reference),
        "{reference} not among the imported images: {listed}"
    );
    Ok((reference, config))
}

/// `ctr run --rm` of `reference` under runc with `args` as its command;
/// its stdout. Each run has a container id of its own: the tests run in
/// parallel.
fn run(c: &Containerd, reference: &str, args: &[&str]) -> Result<String> {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let id = format!(
        "image-check-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    );
    ok(c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.runc.v2",
        reference,
        &id,
    ])
    .args(args))
}

/// The entrypoint the image's config names, with `args` after it.
fn run_entrypoint(
    c: &Containerd,
    reference: &str,
    config: &Value,
    args: &[&str],
) -> Result<String> {
    let mut argv: Vec<&str> = config["config"]["Entrypoint"]
        .as_array()
        .context("the image has no entrypoint")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(!argv.is_empty(), "empty entrypoint: {config}");
    argv.extend(args);
    run(c, reference, &argv)
}

/// Each file the installer copies to a node is under /opt/podvisor, as
/// `make install` laid it out.
fn has_node_tree(c: &Containerd, reference: &str, image: &str) -> Result<()> {
    let tree = run(
        c,
        reference,
        &[
            "sh",
            "-c",
            "cd /opt/podvisor && find bin share -type f | sort && cat share/guest/manifest",
        ],
    )?;
    for file in podvisor_names::paths::INSTALLED_FILES {
        ensure!(
            tree.lines().any(|l| l == *file),
            "/opt/podvisor/{file} missing from the {image} image:\n{tree}"
        );
    }
    ensure!(
        tree.lines().any(|l| l.starts_with("kernel_release ")),
        "the {image} image's guest manifest names no kernel release:\n{tree}"
    );
    Ok(())
}

fn controller(c: &Containerd) -> Result<()> {
    let (reference, config) = import(c, "controller")?;
    ensure!(
        config["config"]["User"] == "65532:65532",
        "the controller should run as nonroot (65532): {}",
        config["config"]
    );
    let out = run_entrypoint(c, &reference, &config, &["--version"])?;
    let want = format!("podvisor-controller {}", version()?);
    ensure!(
        out.trim() == want,
        "--version printed {out:?}, not {want:?}"
    );
    Ok(())
}

fn node(c: &Containerd) -> Result<()> {
    let (reference, config) = import(c, "node")?;
    let out = run_entrypoint(c, &reference, &config, &["--version"])?;
    let want = format!("podvisor-install {}", version()?);
    ensure!(
        out.trim() == want,
        "--version printed {out:?}, not {want:?}"
    );
    has_node_tree(c, &reference, "node")
}

/// The value at `path` in a TOML document.
fn toml_at<'a>(doc: &'a toml::Value, path: &[&str]) -> Result<&'a toml::Value> {
    path.iter().try_fold(doc, |v, key| {
        v.get(key)
            .with_context(|| format!("no {} in:\n{doc}", path.join(".")))
    })
}

/// kind's node with podvisor installed by the node image's installer
/// (e2e/kind/Dockerfile), looked at without booting it (kind needs Docker):
/// kind's containerd 2.x takes the runtime the installer registered in
/// kind's config, and keeps kind's own settings; the node config, tree and
/// shim are in place and the shim runs there; QEMU, the virtiofsd the
/// node config names and Kubernetes' node binaries are there.
fn kind_node(c: &Containerd) -> Result<()> {
    let (reference, config) = import(c, "kind-node")?;
    ensure!(
        config["config"]["Entrypoint"]
            == serde_json::json!(["/usr/local/bin/entrypoint", "/sbin/init"]),
        "kind's entrypoint: {}",
        config["config"]
    );
    let versions = run(
        c,
        &reference,
        &[
            "sh",
            "-c",
            "containerd --version && kubelet --version && kubeadm version -o short \
             && qemu-system-x86_64 --version && /usr/lib/qemu/virtiofsd --version",
        ],
    )?;
    for want in [
        " v2.",
        "Kubernetes v1.34.",
        "\nv1.34.",
        "QEMU emulator version",
        "virtiofsd version",
    ] {
        ensure!(versions.contains(want), "no {want:?} in:\n{versions}");
    }
    let info = run(
        c,
        &reference,
        &["sh", "-c", "containerd-shim-podvisor-v2 -info < /dev/null"],
    )?;
    ensure!(
        info.contains(podvisor_names::RUNTIME_TYPE),
        "the shim's -info in the kind node: {info:?}"
    );
    let dump: toml::Value = toml::from_str(&run(c, &reference, &["containerd", "config", "dump"])?)
        .context("containerd config dump is not TOML")?;
    let cri = ["plugins", "io.containerd.cri.v1.runtime", "containerd"];
    let podvisor = toml_at(
        &dump,
        &[&cri[..], &["runtimes", podvisor_names::HANDLER]].concat(),
    )?;
    ensure!(
        podvisor.get("runtime_type").and_then(toml::Value::as_str)
            == Some(podvisor_names::RUNTIME_TYPE)
            && podvisor.get("pod_annotations")
                == Some(&toml::Value::Array(vec![toml::Value::String(
                    podvisor_names::annotations::PASSED.into()
                )])),
        "the podvisor runtime as kind's containerd reads it: {podvisor}"
    );
    let default = toml_at(&dump, &[&cri[..], &["default_runtime_name"]].concat())?;
    let systemd = toml_at(
        &dump,
        &[&cri[..], &["runtimes", "runc", "options", "SystemdCgroup"]].concat(),
    )?;
    ensure!(
        default.as_str() == Some("runc") && systemd.as_bool() == Some(true),
        "kind's runc settings changed: default {default}, SystemdCgroup {systemd}"
    );
    let installed = run(c, &reference, &["cat", podvisor_names::paths::NODE_CONFIG])?;
    let shipped = std::fs::read_to_string(workspace().join("shim/config.toml"))?;
    ensure!(
        installed == shipped,
        "the kind node's {} is not shim/config.toml:\n{installed}",
        podvisor_names::paths::NODE_CONFIG
    );
    has_node_tree(c, &reference, "kind-node")
}

type Test = fn(&Containerd) -> Result<()>;

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let containerd = std::sync::Arc::new(
        Containerd::start(Release::V2).map_err(|e| format!("starting containerd 2.x: {e:#}")),
    );
    let tests: [(&str, Test); 3] = [
        ("controller_image_runs_as_nonroot", controller),
        ("node_image_carries_the_node_tree", node),
        ("kind_node_image_has_podvisor_installed", kind_node),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            let c = containerd.clone();
            Trial::test(name, move || match c.as_ref() {
                Ok(c) => test(c).map_err(|e| Failed::from(format!("{e:#}"))),
                Err(e) => Err(Failed::from(e.clone())),
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if let Ok(Ok(c)) = std::sync::Arc::try_unwrap(containerd) {
        c.stop();
    }
    conclusion.exit_code()
}
