//! A container image built locally from Debian's busybox-static, as an
//! OCI archive that `ctr images import` loads (no registry needed).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::rootfs::busybox_rootfs;

const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Writes an OCI archive of a busybox image named `name` (for example
/// `docker.io/podvisor/busybox:latest`) running `cmd` by default.
pub fn busybox_archive(out: &Path, name: &str, cmd: &[&str]) -> Result<()> {
    busybox_archive_with(out, name, cmd, &[])
}

/// The same, with `files` (host path, path in the image) added, such as a
/// static binary of ours for the cluster tests' controller image.
pub fn busybox_archive_with(
    out: &Path,
    name: &str,
    cmd: &[&str],
    files: &[(&Path, &str)],
) -> Result<()> {
    let work = tempfile::tempdir()?;
    let rootfs = work.path().join("rootfs");
    busybox_rootfs(&rootfs)?;
    for (from, to) in files {
        let dest = rootfs.join(to.trim_start_matches('/'));
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::copy(from, &dest)
            .with_context(|| format!("adding {} to the image", from.display()))?;
    }
    let layout = work.path().join("oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;

    let layer_tar = work.path().join("layer.tar");
    tar(&rootfs, &layer_tar)?;
    let layer = std::fs::read(&layer_tar)?;
    let put = |data: &[u8]| -> Result<(String, usize)> {
        let digest = format!("{:x}", Sha256::digest(data));
        std::fs::write(blobs.join(&digest), data)?;
        Ok((format!("sha256:{digest}"), data.len()))
    };
    let (layer_digest, layer_size) = put(&layer)?;
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd,
            "WorkingDir": "/"
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]}
    }))?;
    let (config_digest, config_size) = put(&config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": LAYER, "digest": layer_digest, "size": layer_size}]
    }))?;
    let (manifest_digest, manifest_size) = put(&manifest)?;
    let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": MANIFEST,
                "digest": manifest_digest,
                "size": manifest_size,
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
