//! A busybox root filesystem (Debian's busybox-static) for test
//! containers: the binary, one hard link per applet (as the busybox image
//! has them, so masking one applet's path masks only it), and an /etc with
//! a root, an unprivileged `user` and a few groups.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
user:x:1000:1000:user:/home/user:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
pub const GROUP: &str = "root:x:0:\nwheel:x:10:user\naudio:x:29:\nuser:x:1000:\nnogroup:x:65534:\n";

fn busybox() -> PathBuf {
    std::env::var_os("BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"))
}

/// Builds the rootfs at `dest`.
pub fn busybox_rootfs(dest: &Path) -> Result<()> {
    let bb = busybox();
    let list = Command::new(&bb)
        .arg("--list")
        .output()
        .with_context(|| format!("running {} (apt-get install busybox-static)", bb.display()))?;
    if !list.status.success() {
        bail!("{} --list failed", bb.display());
    }
    for d in [
        "bin",
        "etc",
        "proc",
        "sys",
        "dev",
        "root",
        "home/user",
        "tmp",
        "var",
        "run",
    ] {
        std::fs::create_dir_all(dest.join(d))?;
    }
    std::fs::set_permissions(dest.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    std::fs::copy(&bb, dest.join("bin/busybox"))
        .with_context(|| format!("copying {}", bb.display()))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.contains('/') {
            std::fs::hard_link(dest.join("bin/busybox"), dest.join("bin").join(applet))?;
        }
    }
    std::fs::write(dest.join("etc/passwd"), PASSWD)?;
    std::fs::write(dest.join("etc/group"), GROUP)?;
    std::os::unix::fs::chown(dest.join("home/user"), Some(1000), Some(1000))?;
    Ok(())
}
