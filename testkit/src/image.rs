//! Container images built locally from Debian's busybox-static: one
//! layer (the busybox rootfs plus the files an image adds) and an OCI
//! config, written as an OCI archive that `ctr images import` loads, or
//! pushed to a registry ([`crate::registry`]).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::rootfs::busybox_rootfs;

pub const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What an image holds beyond the busybox rootfs, and how it runs.
#[derive(Debug, Clone, Default)]
pub struct ImageDef {
    /// The image config's `User` (`1002`, `www-data:1004`).
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// Files added or replaced: path in the image, content, mode.
    pub files: Vec<(String, Vec<u8>, u32)>,
    /// Hard links (path, target) added after the files, such as a second
    /// name for busybox.
    pub links: Vec<(String, String)>,
    pub ports: Vec<u16>,
}

impl ImageDef {
    /// Running `cmd` by default.
    pub fn with_cmd(cmd: &[&str]) -> ImageDef {
        ImageDef {
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    pub fn file(mut self, path: &str, content: impl Into<Vec<u8>>, mode: u32) -> ImageDef {
        self.files.push((path.to_string(), content.into(), mode));
        self
    }
}

/// A built image: its blobs by role.
#[derive(Debug)]
pub struct Built {
    pub layer: Vec<u8>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

impl Built {
    pub fn manifest_digest(&self) -> String {
        sha256(&self.manifest)
    }
}

/// Builds `def`: the busybox rootfs with its files, one layer.
pub fn build(def: &ImageDef) -> Result<Built> {
    let work = tempfile::tempdir()?;
    let rootfs = work.path().join("rootfs");
    busybox_rootfs(&rootfs)?;
    for (path, content, mode) in &def.files {
        let dest = rootfs.join(path.trim_start_matches('/'));
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if dest.exists() {
            std::fs::remove_file(&dest)?;
        }
        std::fs::write(&dest, content).with_context(|| format!("writing {path} in the image"))?;
        std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(*mode))?;
    }
    for (path, target) in &def.links {
        let dest = rootfs.join(path.trim_start_matches('/'));
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::hard_link(rootfs.join(target.trim_start_matches('/')), &dest)
            .with_context(|| format!("linking {path} to {target} in the image"))?;
    }
    let layer_tar = work.path().join("layer.tar");
    tar(&rootfs, &layer_tar)?;
    let layer = std::fs::read(&layer_tar)?;
    let mut config = json!({
        "Env": [DEFAULT_PATH],
        "Cmd": def.cmd,
        "WorkingDir": "/"
    });
    if !def.entrypoint.is_empty() {
        config["Entrypoint"] = json!(def.entrypoint);
    }
    if let Some(u) = &def.user {
        config["User"] = json!(u);
    }
    if !def.ports.is_empty() {
        let ports: serde_json::Map<String, serde_json::Value> = def
            .ports
            .iter()
            .map(|p| (format!("{p}/tcp"), json!({})))
            .collect();
        config["ExposedPorts"] = json!(ports);
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]}
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": sha256(&config), "size": config.len()},
        "layers": [{"mediaType": LAYER, "digest": sha256(&layer), "size": layer.len()}]
    }))?;
    Ok(Built {
        layer,
        config,
        manifest,
    })
}

/// The pod sandbox image: a process named `pause` (busybox's sleep, run
/// from a copy of that name, as the real pause image's process is called)
/// that sleeps until it is killed.
pub fn pause() -> ImageDef {
    let mut def = ImageDef::with_cmd(&["/bin/sh", "-c", "exec -a busybox /pause sleep 2147483647"]);
    def.links.push(("/pause".into(), "/bin/busybox".into()));
    def
}

/// Writes `def` as an OCI archive of an image named `name`.
pub fn archive(out: &Path, name: &str, def: &ImageDef) -> Result<()> {
    write_archive(out, name, &build(def)?)
}

/// Writes an OCI archive of a busybox image named `name` (for example
/// `docker.io/podvisor/busybox:latest`) running `cmd` by default, with
/// `files` (host path, path in the image) added with their modes, such as
/// a static binary of ours for the cluster tests' controller image.
pub fn busybox_archive_with(
    out: &Path,
    name: &str,
    cmd: &[&str],
    files: &[(&Path, &str)],
) -> Result<()> {
    let mut def = ImageDef::with_cmd(cmd);
    for (from, to) in files {
        let adding = || format!("adding {} to the image", from.display());
        let data = std::fs::read(from).with_context(adding)?;
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(from).with_context(adding)?.permissions(),
        ) & 0o7777;
        def = def.file(to, data, mode);
    }
    write_archive(out, name, &build(&def)?)
}

/// `image` as an OCI archive naming it `name`.
fn write_archive(out: &Path, name: &str, image: &Built) -> Result<()> {
    let work = tempfile::tempdir()?;
    let layout = work.path().join("oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    for blob in [&image.layer, &image.config, &image.manifest] {
        let digest = sha256(blob);
        std::fs::write(blobs.join(digest.trim_start_matches("sha256:")), blob)?;
    }
    let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": MANIFEST,
                "digest": image.manifest_digest(),
                "size": image.manifest.len(),
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": tag
                }
            }]
        }))?,
    )?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    tar(&layout, out)
}

/// `dir` as an uncompressed tar with fixed owners and times.
fn tar(dir: &Path, out: &Path) -> Result<()> {
    let st = Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-C",
        ])
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .arg(".")
        .status()
        .context("running tar")?;
    if !st.success() {
        bail!("tar of {} failed", dir.display());
    }
    Ok(())
}
