//! Port forwarding into the guest: the host (the shim's forwarder in the
//! pod's network namespace, where containerd dials `localhost:<port>` for
//! `kubectl port-forward`) connects to vsock port [`FORWARD_PORT`], names
//! a TCP port, and gets a stream to that port on the guest's loopback,
//! which is where runc's containerd would have reached it.

use std::time::Duration;

use podvisor_protocol::FORWARD_PORT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream};

/// How long the host may take to name the port.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves port forwarding until the process ends; a failed connection
/// never ends it.
pub async fn serve() -> anyhow::Result<()> {
    let listener = VsockListener::bind(VsockAddr::new(libc::VMADDR_CID_ANY, FORWARD_PORT))
        .map_err(|e| anyhow::anyhow!("binding vsock port {FORWARD_PORT}: {e}"))?;
    loop {
        match listener.accept().await {
            Ok((conn, peer)) if peer.cid() == libc::VMADDR_CID_HOST => {
                tokio::spawn(forward(conn));
            }
            Ok((_, peer)) => tracing::warn!("port forward from {peer:?} refused: not the host"),
            Err(e) => {
                tracing::warn!("port forward accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn forward(mut conn: VsockStream) {
    let port = match tokio::time::timeout(HEADER_TIMEOUT, read_port(&mut conn)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return reply_err(&mut conn, &e).await,
        Err(_) => return reply_err(&mut conn, "no port named in time").await,
    };
    let tcp = match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(t) => t,
        Err(v4) => match TcpStream::connect(("::1", port)).await {
            Ok(t) => t,
            Err(v6) => {
                let why = format!("connecting to port {port}: IPv4 {v4}, IPv6 {v6}");
                return reply_err(&mut conn, &why).await;
            }
        },
    };
    if conn.write_all(b"OK\n").await.is_err() {
        return;
    }
    relay(conn, tcp).await;
}

/// Copies both ways until the server is done. Hybrid vsock has no
/// half-close (a host that stops sending has closed the connection), so
/// the server's end of output ends the forward: the vsock connection is
/// closed whole, which the host sees as its end.
async fn relay(conn: VsockStream, mut tcp: TcpStream) {
    let (mut vr, mut vw) = tokio::io::split(conn);
    let (mut tr, mut tw) = tcp.split();
    tokio::select! {
        _ = tokio::io::copy(&mut tr, &mut vw) => {}
        _ = async {
            let _ = tokio::io::copy(&mut vr, &mut tw).await;
            // The host is gone; let the server see the end too, and wait
            // for whatever it still says.
            let _ = tw.shutdown().await;
            std::future::pending::<()>().await
        } => {}
    }
}

/// The header: the port in decimal and a newline.
async fn read_port(conn: &mut VsockStream) -> Result<u16, String> {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        match conn.read(&mut b).await {
            Ok(0) => return Err("closed before naming a port".into()),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < 8 => line.push(b[0]),
            Ok(_) => return Err("port line too long".into()),
            Err(e) => return Err(format!("reading the port: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&line);
    text.trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("bad port {text:?}"))
}

async fn reply_err(conn: &mut VsockStream, why: &str) {
    tracing::debug!("port forward: {why}");
    let _ = conn
        .write_all(format!("ERR {}\n", why.replace('\n', " ")).as_bytes())
        .await;
}
