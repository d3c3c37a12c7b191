//! virtiofsd: the vhost-user-fs backend both VM backends share a
//! sandbox's directory with the guest through.

use std::path::PathBuf;

use tokio::process::Command;

use crate::process::{wait_for_socket, Supervised, HELPER_READY};
use crate::{HypervisorError, Paths, VmSpec};

/// Starts virtiofsd on the VM's shared directory; returns it once its
/// vhost-user socket exists, with the socket's path.
pub async fn start(paths: &Paths, spec: &VmSpec) -> Result<(Supervised, PathBuf), HypervisorError> {
    let sock = spec.dir.join("virtiofs.sock");
    let log = spec.dir.join("virtiofsd.log");
    let _ = std::fs::remove_file(&sock); // a stale one would pass for ours
    let mut fs = Supervised::spawn(
        "virtiofsd",
        Command::new(&paths.virtiofsd)
            .arg(format!("--socket-path={}", sock.display()))
            .arg("-o")
            .arg(format!("source={}", spec.shared_dir.display()))
            .args(["-o", "cache=none", "-o", "announce_submounts"]),
        &log,
    )?;
    if let Err(e) = wait_for_socket(&sock, &fs, &log, HELPER_READY).await {
        fs.kill().await;
        return Err(e);
    }
    Ok((fs, sock))
}
