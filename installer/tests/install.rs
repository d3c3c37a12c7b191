//! `podvisor-install` run as the DaemonSet runs it, against a host root in a
//! temporary directory holding copies of real containerd configs (Debian's
//! containerd 1.6 default, v2; a kind node's containerd 2 config, v3).

// An integration-test crate: every function here is test code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::tests_outside_test_module
)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use podvisor_names::paths::INSTALLED_FILES;

const BIN: &str = env!("CARGO_BIN_EXE_podvisor-install");

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

struct Host {
    _dir: tempfile::TempDir,
    root: PathBuf,
    source: PathBuf,
    node_config: PathBuf,
}

impl Host {
    /// A host whose containerd config is `containerd` (None: no file).
    fn new(containerd: Option<&str>) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("host");
        let source = dir.path().join("image/opt/podvisor");
        for f in INSTALLED_FILES {
            let p = source.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, format!("contents of {f}")).unwrap();
        }
        let node_config = dir.path().join("config.toml");
        fs::write(
            &node_config,
            "allowed_annotations = [\"podvisor.io/vcpus\"]\n",
        )
        .unwrap();
        fs::create_dir_all(root.join("etc/containerd")).unwrap();
        if let Some(text) = containerd {
            fs::write(root.join("etc/containerd/config.toml"), text).unwrap();
        }
        Host {
            _dir: dir,
            root,
            source,
            node_config,
        }
    }

    fn run(&self, verb: &str, extra: &[&str]) -> Output {
        let out = Command::new(BIN)
            .arg(verb)
            .arg("--host-root")
            .arg(&self.root)
            .arg("--source")
            .arg(&self.source)
            .arg("--node-config")
            .arg(&self.node_config)
            .args(["--restart", "none"])
            .args(extra)
            .env_remove("NODE_NAME")
            .output()
            .unwrap();
        out
    }

    fn ok(&self, verb: &str) {
        let out = self.run(verb, &[]);
        assert!(
            out.status.success(),
            "{verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn read(&self, rel: &str) -> Option<String> {
        fs::read_to_string(self.root.join(rel)).ok()
    }

    fn containerd(&self) -> Option<String> {
        self.read("etc/containerd/config.toml")
    }
}

fn install_twice_then_uninstall(original: &str, expected: &str) {
    let host = Host::new(Some(original));
    host.ok("install");
    assert_eq!(host.containerd().as_deref(), Some(expected));
    for f in INSTALLED_FILES {
        assert_eq!(
            host.read(&format!("opt/podvisor/{f}")),
            Some(format!("contents of {f}")),
            "{f}"
        );
    }
    let link = fs::read_link(host.root.join("usr/local/bin/containerd-shim-podvisor-v2")).unwrap();
    assert_eq!(
        link,
        Path::new("/opt/podvisor/bin/containerd-shim-podvisor-v2")
    );
    assert_eq!(
        host.read("etc/podvisor/config.toml").as_deref(),
        Some("allowed_annotations = [\"podvisor.io/vcpus\"]\n")
    );

    let before = fs::metadata(host.root.join("etc/containerd/config.toml")).unwrap();
    host.ok("install");
    assert_eq!(
        host.containerd().as_deref(),
        Some(expected),
        "second install changed it"
    );
    let after = fs::metadata(host.root.join("etc/containerd/config.toml")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        before.ino(),
        after.ino(),
        "second install rewrote an unchanged file"
    );

    // A shim saved a warm-start template meanwhile.
    let template = host.root.join("var/lib/podvisor/templates/0123abcd");
    fs::create_dir_all(&template).unwrap();
    fs::write(template.join("memory"), "guest memory").unwrap();

    host.ok("uninstall");
    assert_eq!(
        host.containerd().as_deref(),
        Some(original),
        "uninstall did not restore it"
    );
    assert!(
        !host.root.join("var/lib/podvisor").exists(),
        "uninstall left the templates"
    );
    assert!(!host.root.join("opt/podvisor").exists());
    assert!(
        fs::symlink_metadata(host.root.join("usr/local/bin/containerd-shim-podvisor-v2")).is_err()
    );
    assert!(!host.root.join("etc/podvisor").exists());
}

#[test]
fn containerd_v2_config() {
    install_twice_then_uninstall(
        &fixture("containerd-v2.toml"),
        &fixture("containerd-v2.installed.toml"),
    );
}

#[test]
fn containerd_v3_config() {
    install_twice_then_uninstall(
        &fixture("containerd-v3.toml"),
        &fixture("containerd-v3.installed.toml"),
    );
}

#[test]
fn missing_containerd_config_is_created_and_removed() {
    let host = Host::new(None);
    host.ok("install");
    let text = host.containerd().unwrap();
    assert!(text.starts_with("version = 2\n"), "{text}");
    assert!(
        text.contains("runtime_type = \"io.containerd.podvisor.v2\""),
        "{text}"
    );
    host.ok("uninstall");
    assert_eq!(host.containerd(), None);
}

#[test]
fn operators_node_config_comes_back() {
    let host = Host::new(Some("version = 2\n"));
    let mine = "# mine\nmax_vcpus = 4\n";
    fs::create_dir_all(host.root.join("etc/podvisor")).unwrap();
    fs::write(host.root.join("etc/podvisor/config.toml"), mine).unwrap();
    host.ok("install");
    host.ok("install");
    assert_ne!(host.read("etc/podvisor/config.toml").as_deref(), Some(mine));
    host.ok("uninstall");
    assert_eq!(host.read("etc/podvisor/config.toml").as_deref(), Some(mine));
}

#[test]
fn an_operators_node_config_equal_to_the_installed_one_stays() {
    let host = Host::new(Some("version = 2\n"));
    let same = fs::read_to_string(&host.node_config).unwrap();
    fs::create_dir_all(host.root.join("etc/podvisor")).unwrap();
    fs::write(host.root.join("etc/podvisor/config.toml"), &same).unwrap();
    host.ok("install");
    host.ok("uninstall");
    assert_eq!(
        host.read("etc/podvisor/config.toml").as_deref(),
        Some(same.as_str())
    );
}

#[test]
fn uninstall_refuses_while_sandboxes_run() {
    let host = Host::new(Some("version = 2\n"));
    host.ok("install");
    let sandbox = host.root.join("run/podvisor/abc123");
    fs::create_dir_all(&sandbox).unwrap();
    fs::write(sandbox.join("state.json"), "{}").unwrap();
    let out = host.run("uninstall", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("abc123") && err.contains("--force"), "{err}");
    assert!(host
        .root
        .join("opt/podvisor/bin/containerd-shim-podvisor-v2")
        .exists());
    assert!(host.containerd().unwrap().contains("podvisor"));
    let out = host.run("uninstall", &["--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(host.containerd().as_deref(), Some("version = 2\n"));
}

/// A warm pool the installed shim cannot drain (here its binary is a
/// stand-in that cannot run in the host root) stops the uninstall before
/// it changes anything, naming the command. (A real drain: the containerd
/// suite's pool test.)
#[test]
fn uninstall_drains_the_pool_first() {
    let host = Host::new(Some("version = 2\n"));
    host.ok("install");
    let pool = host.root.join("run/podvisor/_pool/0123abcd");
    fs::create_dir_all(&pool).unwrap();
    let out = host.run("uninstall", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warm pool") && err.contains("pool drain"),
        "{err}"
    );
    assert!(host
        .root
        .join("opt/podvisor/bin/containerd-shim-podvisor-v2")
        .exists());
    assert!(host.containerd().unwrap().contains("podvisor"));
    fs::remove_dir_all(host.root.join("run/podvisor/_pool")).unwrap();
    host.ok("uninstall");
}

#[test]
fn bad_configs_fail_clearly_and_change_nothing() {
    for (text, says) in [
        ("[plugins]\nx = 1\n", "version 1 is not supported"),
        ("version = \n", "not TOML"),
    ] {
        let host = Host::new(Some(text));
        let out = host.run("install", &[]);
        assert!(!out.status.success(), "{text:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says) && err.contains("config.toml"), "{err}");
        assert_eq!(host.containerd().as_deref(), Some(text));
    }
}

#[test]
fn daemon_installs_then_uninstalls_on_sigterm() {
    let original = fixture("containerd-v3.toml");
    let host = Host::new(Some(&original));
    let ready_file = host.root.with_file_name("ready");
    let ready = || {
        Command::new(BIN)
            .arg("ready")
            .arg("--ready-file")
            .arg(&ready_file)
            .output()
            .unwrap()
    };
    let not_yet = ready();
    assert!(!not_yet.status.success());
    assert!(
        String::from_utf8_lossy(&not_yet.stderr).contains("not installed yet"),
        "{not_yet:?}"
    );
    let mut child = Command::new(BIN)
        .arg("daemon")
        .arg("--ready-file")
        .arg(&ready_file)
        .arg("--host-root")
        .arg(&host.root)
        .arg("--source")
        .arg(&host.source)
        .arg("--node-config")
        .arg(&host.node_config)
        .args(["--restart", "none"])
        .env_remove("NODE_NAME")
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // Ready (the DaemonSet's probe) once installed.
    while !ready().status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "daemon did not become ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(host.read("opt/podvisor/install-state.json").is_some());
    assert_eq!(
        host.containerd().as_deref(),
        Some(fixture("containerd-v3.installed.toml").as_str())
    );
    // The DaemonSet's pod is stopped: SIGTERM.
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(host.containerd().as_deref(), Some(original.as_str()));
    assert!(!host.root.join("opt/podvisor").exists());
    assert!(!ready().status.success(), "still ready after the uninstall");
}
