//! `kubectl port-forward` for a pod in a VM. containerd serves it by
//! dialing `localhost:<port>` inside the pod's network namespace on the
//! host, where nothing listens: the pod's servers are in the guest. So
//! the shim listens there on one loopback port per address family, a NAT
//! rule in that namespace redirects every TCP connection to loopback to
//! it, and each connection goes to the guest over vsock
//! ([`FORWARD_PORT`]) with the port it was meant for (`SO_ORIGINAL_DST`);
//! the agent connects it to that port on the guest's loopback.
//!
//! Nothing outside the pod's namespace changes, and nothing there but
//! containerd's port-forward dials loopback (the VM's processes use Unix
//! sockets). The rule goes with the namespace. Hybrid vsock carries no
//! half-close, so a forward ends when the server in the guest is done
//! (containerd itself gives a server a second after its client stops).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use podvisor_protocol::hybrid_vsock::dial;
use podvisor_protocol::FORWARD_PORT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Forwarding for one pod; stops when dropped.
pub struct PortForward {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for PortForward {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("port forwarding in {netns}: {what}: {source}")]
    Io {
        netns: PathBuf,
        what: String,
        source: std::io::Error,
    },
    #[error("port forwarding in {netns}: {command} failed: {output}")]
    Rule {
        netns: PathBuf,
        command: String,
        output: String,
    },
}

impl PortForward {
    /// Listens in `netns`, installs the redirect and forwards to the
    /// guest behind the hybrid-vsock socket `vsock`.
    pub async fn start(netns: &Path, vsock: &Path) -> Result<PortForward, ForwardError> {
        let io = |what: &str| {
            let netns = netns.to_owned();
            let what = what.to_string();
            move |source| ForwardError::Io {
                netns,
                what,
                source,
            }
        };
        let ns = netns.to_owned();
        let (v4, v6) = tokio::task::spawn_blocking(move || listen_in(&ns))
            .await
            .map_err(|e| io("listening")(std::io::Error::other(e)))?
            .map_err(io("listening"))?;
        let mut tasks = Vec::new();
        let v4 = TcpListener::from_std(v4).map_err(io("listener"))?;
        let port4 = v4.local_addr().map_err(io("listener address"))?.port();
        redirect(netns, "iptables", "127.0.0.0/8", port4).await?;
        tasks.push(tokio::spawn(accept(v4, vsock.to_owned(), false)));
        // IPv6 only where the namespace has it (containerd falls back to
        // ::1 when 127.0.0.1 refuses).
        if let Some(v6) = v6 {
            let v6 = TcpListener::from_std(v6).map_err(io("listener"))?;
            let port6 = v6.local_addr().map_err(io("listener address"))?.port();
            match redirect(netns, "ip6tables", "::1/128", port6).await {
                Ok(()) => tasks.push(tokio::spawn(accept(v6, vsock.to_owned(), true))),
                Err(e) => tracing::info!("no IPv6 port forwarding: {e}"),
            }
        }
        Ok(PortForward { tasks })
    }
}

/// An IPv4 loopback listener and, where the namespace has IPv6, an IPv6 one.
type Listeners = (std::net::TcpListener, Option<std::net::TcpListener>);

/// Loopback listeners made inside `netns` (a socket stays in the namespace
/// it was made in), on a thread of their own that ends with the setns.
fn listen_in(netns: &Path) -> std::io::Result<Listeners> {
    let ns = std::fs::File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a descriptor we own; only this thread moves.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let v4 = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            v4.set_nonblocking(true)?;
            let v6 = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0))
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .ok();
            Ok((v4, v6))
        })
        .join()
        .map_err(|_| std::io::Error::other("listener thread panicked"))?
    })
}

/// Adds the NAT rule sending TCP to `dest` in `netns` to `port`.
async fn redirect(netns: &Path, tool: &str, dest: &str, port: u16) -> Result<(), ForwardError> {
    let port = port.to_string();
    let args = [
        "-w",
        "5",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        dest,
        "-j",
        "REDIRECT",
        "--to-ports",
        &port,
    ];
    let mut cmd = tokio::process::Command::new(tool);
    cmd.args(args);
    podvisor_hypervisor::run_in_netns(&mut cmd, Some(netns)).map_err(|e| ForwardError::Io {
        netns: netns.to_owned(),
        what: "entering the namespace".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let command = format!("{tool} {}", args.join(" "));
    let out = cmd.output().await.map_err(|source| ForwardError::Io {
        netns: netns.to_owned(),
        what: format!("running {tool}"),
        source,
    })?;
    if !out.status.success() {
        return Err(ForwardError::Rule {
            netns: netns.to_owned(),
            command,
            output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

async fn accept(listener: TcpListener, vsock: PathBuf, v6: bool) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::spawn(forward(conn, vsock.clone(), v6));
            }
            Err(e) => {
                tracing::warn!("port forward accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn forward(conn: TcpStream, vsock: PathBuf, v6: bool) {
    let port = match original_port(&conn, v6) {
        Ok(p) => p,
        Err(e) => return tracing::warn!("port forward: original destination: {e}"),
    };
    let mut guest = match dial(&vsock, FORWARD_PORT).await {
        Ok(g) => g,
        Err(e) => return tracing::warn!("port forward to {port}: {e}"),
    };
    if guest
        .write_all(format!("{port}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let mut reply = Vec::new();
    loop {
        let mut b = [0u8; 1];
        match guest.read(&mut b).await {
            Ok(1) if b[0] != b'\n' && reply.len() < 512 => reply.push(b[0]),
            Ok(1) if b[0] == b'\n' => break,
            _ => return refuse(conn),
        }
    }
    if reply != b"OK" {
        tracing::debug!(
            "port forward to {port}: {}",
            String::from_utf8_lossy(&reply)
        );
        return refuse(conn);
    }
    relay(conn, guest).await;
}

/// Copies both ways until the guest is done. Hybrid vsock has no
/// half-close: ending the guest stream's write side would close it whole,
/// so a client that stops sending (containerd closes its connection a
/// second after its client does) leaves the guest stream open for the
/// answer; the guest's end of output (it closes the stream once the
/// server closed) ends the forward.
async fn relay(mut conn: TcpStream, guest: tokio::net::UnixStream) {
    let (mut cr, mut cw) = conn.split();
    let (mut gr, mut gw) = tokio::io::split(guest);
    tokio::select! {
        _ = async {
            let _ = tokio::io::copy(&mut gr, &mut cw).await;
            let _ = cw.shutdown().await;
        } => {}
        _ = async {
            if tokio::io::copy(&mut cr, &mut gw).await.is_ok() {
                std::future::pending::<()>().await
            }
        } => {}
    }
}

/// Closes `conn` with a reset, as a refused connection looks to the
/// client that already got through the handshake here.
fn refuse(conn: TcpStream) {
    let _ = conn.set_zero_linger();
}

/// The port the client dialed before the redirect (`SO_ORIGINAL_DST`; the
/// port sits at the same place in a sockaddr_in and a sockaddr_in6).
fn original_port(conn: &TcpStream, v6: bool) -> std::io::Result<u16> {
    let (level, option) = if v6 {
        (libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST)
    } else {
        (libc::SOL_IP, libc::SO_ORIGINAL_DST)
    };
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut sa: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_storage>())
        .unwrap_or(libc::socklen_t::MAX);
    // SAFETY: getsockopt writes at most `len` bytes into our buffer.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            level,
            option,
            (&mut sa as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in,
    // whose sin_port is where sockaddr_in6 keeps sin6_port.
    let sin = unsafe { &*(&sa as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
    Ok(u16::from_be(sin.sin_port))
}
