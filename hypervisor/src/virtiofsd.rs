//! virtiofsd: the vhost-user-fs backend both VM backends share a
//! sandbox's directory with the guest through.

use std::path::PathBuf;

use tokio::process::Command;

use crate::process::{wait_for_socket, Supervised, HELPER_READY};
use crate::{HypervisorError, Jail, Paths, VmSpec};

/// Starts virtiofsd on the VM's shared directory, confined by `jail` on
/// top of its own sandbox (its default: namespaces and a seccomp filter);
/// returns it once its vhost-user socket exists, with the socket's path.
pub async fn start(
    paths: &Paths,
    jail: Jail,
    spec: &VmSpec,
) -> Result<(Supervised, PathBuf), HypervisorError> {
    let sock = spec.dir.join("virtiofs.sock");
    let log = spec.dir.join("virtiofsd.log");
    let _ = std::fs::remove_file(&sock); // a stale one would pass for ours
    let mut cmd = Command::new(&paths.virtiofsd);
    cmd.arg(format!("--socket-path={}", sock.display()))
        .arg("-o")
        .arg(format!("source={}", spec.shared_dir.display()))
        .args(["-o", "cache=none", "-o", "announce_submounts"]);
    jail.confine_file_server(&mut cmd);
    let mut fs = Supervised::spawn("virtiofsd", &mut cmd, &log)?;
    if let Err(e) = wait_for_socket(&sock, &fs, &log, HELPER_READY).await {
        fs.kill().await;
        return Err(e);
    }
    Ok((fs, sock))
}
