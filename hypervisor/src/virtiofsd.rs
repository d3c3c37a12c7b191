//! virtiofsd: the vhost-user-fs backend both VM backends share a
//! sandbox's directory with the guest through.

use std::path::PathBuf;

use tokio::process::Command;

use crate::process::{wait_for_socket, Supervised, HELPER_READY};
use crate::{HypervisorError, Jail, Paths, VmSpec};

/// Starts virtiofsd on the VM's shared directory, confined by `jail` on
/// top of its own sandbox (its default: namespaces and a seccomp filter);
/// returns it once its vhost-user socket exists (in the VM's own
/// directory, given to the VM's id), with the socket's path.
pub async fn start(
    paths: &Paths,
    jail: Jail,
    spec: &VmSpec,
) -> Result<(Supervised, PathBuf), HypervisorError> {
    let sock = spec.vm_dir().join("virtiofs.sock");
    let log = spec.dir.join("virtiofsd.log");
    // A stale socket would pass for ours; virtiofsd writes its pid file
    // beside it as root, following a link: neither is left from a VM
    // before (no process of the VM's id runs yet but its vsock helper,
    // which the guest cannot reach before QEMU starts).
    let _ = std::fs::remove_file(&sock);
    let mut pid_file = sock.clone().into_os_string();
    pid_file.push(".pid");
    let _ = std::fs::remove_file(pid_file);
    let mut cmd = Command::new(&paths.virtiofsd);
    cmd.arg(format!("--socket-path={}", sock.display()))
        .arg("-o")
        .arg(format!("source={}", spec.shared_dir.display()))
        .args(["-o", "cache=none", "-o", "announce_submounts"]);
    jail.confine_file_server(&mut cmd);
    let mut fs = Supervised::spawn("virtiofsd", &mut cmd, &log)?;
    // The VM process, its id's, connects to it.
    let ready = wait_for_socket(&sock, &fs, &log, HELPER_READY)
        .await
        .and_then(|()| Jail::give(spec, &sock));
    if let Err(e) = ready {
        fs.kill().await;
        return Err(e);
    }
    Ok((fs, sock))
}
