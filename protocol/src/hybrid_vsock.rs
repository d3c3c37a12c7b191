//! Host side of hybrid vsock: reaching a guest vsock port through the VM's
//! Unix socket.
//!
//! Firecracker's protocol, which the in-tree VMM and `vhost-device-vsock`
//! both speak: connect to the VM's UDS, write `CONNECT <port>\n`, read
//! `OK <host-port>\n`; from then on the stream is the guest's. A guest with
//! no listener on that port makes the backend close the stream instead.
//! The other way, a guest connecting to host port P reaches a listener on
//! `<uds>_P`: [`ReadyListener`] waits there for the agent's "I serve".

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::{sleep, timeout_at, Instant};

use crate::api::AgentClient;
use crate::{AGENT_PORT, READY_PORT};

/// The longest handshake reply we accept ("OK 4294967295\n" is 14 bytes).
const MAX_REPLY: usize = 32;

/// Pause between attempts while a guest is still booting.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// The longest one attempt may take. A request that reaches the guest
/// before its vsock driver is up is never answered, so an attempt that
/// hangs is abandoned and retried on a new connection.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("listening on {path} for the agent: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("the agent did not report ready on {path} within {after:?}")]
    NotReady { path: PathBuf, after: Duration },
    #[error("cannot connect to hybrid-vsock socket {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("hybrid-vsock handshake for guest port {port} on {path}: {source}")]
    Handshake {
        path: PathBuf,
        port: u32,
        source: io::Error,
    },
    #[error("guest refused vsock port {port} (nothing listens there)")]
    Refused { port: u32 },
    #[error("unexpected hybrid-vsock reply for guest port {port}: {reply:?}")]
    BadReply { port: u32, reply: String },
    #[error("guest vsock port {port} not reachable through {path} within {after:?}: {last}")]
    Timeout {
        path: PathBuf,
        port: u32,
        after: Duration,
        last: String,
    },
}

impl DialError {
    /// Worth another try while the guest boots: the socket is not there
    /// yet, or the guest has not started listening.
    fn is_transient(&self) -> bool {
        match self {
            DialError::Connect { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ),
            DialError::Refused { .. } => true,
            DialError::Handshake { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}

/// Connects to the socket at `path` without following a link in its last
/// component: the directory it is in is the VM's unprivileged id's, which
/// could put a link to another VM's socket there. The path is opened
/// `O_PATH|O_NOFOLLOW`, must be a socket, and is connected through that
/// descriptor.
async fn connect_socket(path: &Path) -> io::Result<UnixStream> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let at = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    if !at.metadata()?.file_type().is_socket() {
        return Err(io::Error::other("not a socket"));
    }
    UnixStream::connect(format!("/proc/self/fd/{}", at.as_raw_fd())).await
}

/// One attempt: connect to `uds` and ask for guest `port`.
pub async fn dial(uds: &Path, port: u32) -> Result<UnixStream, DialError> {
    let mut stream = connect_socket(uds)
        .await
        .map_err(|source| DialError::Connect {
            path: uds.to_owned(),
            source,
        })?;
    let hs_err = |source| DialError::Handshake {
        path: uds.to_owned(),
        port,
        source,
    };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(hs_err)?;

    // Byte by byte: whatever follows the newline is the guest's data.
    let mut reply = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        let n = stream.read(&mut b).await.map_err(hs_err)?;
        if n == 0 {
            if reply.is_empty() {
                return Err(DialError::Refused { port });
            }
            break;
        }
        if b[0] == b'\n' {
            return parse_reply(port, &reply).map(|()| stream);
        }
        reply.push(b[0]);
        if reply.len() > MAX_REPLY {
            break;
        }
    }
    Err(DialError::BadReply {
        port,
        reply: String::from_utf8_lossy(&reply).into_owned(),
    })
}

fn parse_reply(port: u32, reply: &[u8]) -> Result<(), DialError> {
    let text = String::from_utf8_lossy(reply);
    match text.strip_prefix("OK ") {
        Some(n) if n.trim().parse::<u32>().is_ok() => Ok(()),
        _ => Err(DialError::BadReply {
            port,
            reply: text.into_owned(),
        }),
    }
}

/// Dials until the guest answers or `within` has passed, retrying while the
/// VM's socket is missing or the guest does not listen yet.
pub async fn dial_within(uds: &Path, port: u32, within: Duration) -> Result<UnixStream, DialError> {
    let deadline = Instant::now() + within;
    let timeout = |last: String| DialError::Timeout {
        path: uds.to_owned(),
        port,
        after: within,
        last,
    };
    loop {
        let attempt_end = deadline.min(Instant::now() + ATTEMPT_TIMEOUT);
        let last = match timeout_at(attempt_end, dial(uds, port)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) if e.is_transient() => e.to_string(),
            Ok(Err(e)) => return Err(e),
            Err(_) => "the handshake was not answered".to_string(),
        };
        if Instant::now() + RETRY_PAUSE >= deadline {
            return Err(timeout(last));
        }
        sleep(RETRY_PAUSE).await;
    }
}

/// Where the agent reports ready: `<uds>_1025`, bound before the VM
/// starts.
#[derive(Debug)]
pub struct ReadyListener {
    path: PathBuf,
    listener: UnixListener,
}

impl ReadyListener {
    /// Binds `<uds>_<READY_PORT>`; call before starting the VM. Anyone
    /// who reaches it may connect (the vsock backend, which runs as the
    /// VM's unprivileged id): the directory it is in says who that is.
    pub fn bind(uds: &Path) -> Result<ReadyListener, DialError> {
        let mut name = uds.as_os_str().to_owned();
        name.push(format!("_{READY_PORT}"));
        let path = PathBuf::from(name);
        let _ = std::fs::remove_file(&path);
        let listen = |source| DialError::Listen {
            path: path.clone(),
            source,
        };
        let listener = UnixListener::bind(&path).map_err(listen)?;
        // Not through a link put in its place.
        let c_path =
            std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
                .map_err(|_| listen(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: fchmodat(2) of a NUL-terminated path.
        if unsafe {
            libc::fchmodat(
                libc::AT_FDCWD,
                c_path.as_ptr(),
                0o666,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        } != 0
        {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_file(&path);
            return Err(listen(e));
        }
        Ok(ReadyListener { path, listener })
    }

    /// Waits up to `within` for the agent's connection.
    pub async fn wait(&self, within: Duration) -> Result<(), DialError> {
        let not_ready = || DialError::NotReady {
            path: self.path.clone(),
            after: within,
        };
        match tokio::time::timeout(within, self.listener.accept()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(not_ready()),
        }
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A ttrpc client of the agent behind the VM's hybrid-vsock socket `uds`:
/// waits up to `within` for the agent to report ready on `ready` (none:
/// it reported before, to another host process), then dials its API port.
pub async fn connect_agent(
    uds: &Path,
    ready: Option<&ReadyListener>,
    within: Duration,
) -> Result<AgentClient, DialError> {
    let start = Instant::now();
    if let Some(ready) = ready {
        ready.wait(within).await?;
    }
    let left = within.saturating_sub(start.elapsed()).max(ATTEMPT_TIMEOUT);
    let stream = dial_within(uds, AGENT_PORT, left).await?;
    Ok(AgentClient::new(ttrpc::r#async::Client::new(stream.into())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::UnixListener;

    /// A fake backend that answers the first line with `reply` and then
    /// echoes; it stands in for vhost-device-vsock, which the guest tests
    /// exercise for real.
    async fn backend(reply: &'static str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut r = BufReader::new(r);
                    let mut line = String::new();
                    r.read_line(&mut line).await.unwrap();
                    assert!(line.starts_with("CONNECT "));
                    if reply.is_empty() {
                        return;
                    }
                    w.write_all(reply.as_bytes()).await.unwrap();
                    tokio::io::copy(&mut r, &mut w).await.ok();
                });
            }
        });
        (dir, path)
    }

    #[tokio::test]
    async fn handshake_then_stream_is_the_guests() {
        let (_d, path) = backend("OK 1073741824\n").await;
        let mut s = dial(&path, 1024).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn closed_stream_is_refused() {
        let (_d, path) = backend("").await;
        assert!(matches!(
            dial(&path, 1024).await,
            Err(DialError::Refused { port: 1024 })
        ));
    }

    #[tokio::test]
    async fn garbage_reply_is_an_error() {
        let (_d, path) = backend("NOPE\n").await;
        let err = dial(&path, 7).await.unwrap_err();
        assert!(matches!(err, DialError::BadReply { port: 7, .. }), "{err}");
    }

    /// A backend that accepts but never answers (a guest whose vsock
    /// driver is not up yet) is retried, not waited on forever.
    #[tokio::test]
    async fn unanswered_handshake_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let listener = UnixListener::bind(&path).unwrap();
        let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = attempts.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                // The first connection hangs; the second one is answered.
                if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    held.push(s);
                    continue;
                }
                let mut s = s;
                let mut b = [0u8; 1];
                while s.read(&mut b).await.unwrap() == 1 && b[0] != b'\n' {}
                s.write_all(b"OK 5\n").await.unwrap();
                held.push(s);
            }
        });
        let _s = dial_within(&path, 1024, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(attempts.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    }

    #[tokio::test]
    async fn a_link_in_place_of_the_socket_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.vsock");
        let _listener = UnixListener::bind(&real).unwrap();
        let link = dir.path().join("vm.vsock");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = dial(&link, 1024).await.unwrap_err();
        assert!(matches!(err, DialError::Connect { .. }), "{err}");
        std::fs::write(dir.path().join("file"), "").unwrap();
        assert!(dial(&dir.path().join("file"), 1024).await.is_err());
        // The socket itself: connected (and asked for the port).
        let server = tokio::spawn(async move {
            let (mut conn, _) = _listener.accept().await.unwrap();
            let mut line = [0u8; 13];
            conn.read_exact(&mut line).await.unwrap();
            conn.write_all(b"OK 1\n").await.unwrap();
            line
        });
        dial(&real, 1024).await.unwrap();
        assert_eq!(&server.await.unwrap(), b"CONNECT 1024\n");
    }

    #[tokio::test]
    async fn ready_listener_sees_the_agent_connect() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vm.vsock");
        let ready = ReadyListener::bind(&uds).unwrap();
        let port_path = dir.path().join("vm.vsock_1025");
        assert!(port_path.exists());
        let err = ready.wait(Duration::from_millis(50)).await.unwrap_err();
        assert!(err.to_string().contains("vm.vsock_1025"), "{err}");
        let _agent = UnixStream::connect(&port_path).await.unwrap();
        ready.wait(Duration::from_secs(5)).await.unwrap();
        drop(ready);
        assert!(!port_path.exists());
    }

    #[tokio::test]
    async fn missing_socket_times_out_with_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.sock");
        let err = dial_within(&path, 1024, Duration::from_millis(100))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DialError::Timeout { .. }), "{msg}");
        assert!(msg.contains("absent.sock"), "{msg}");
    }
}
