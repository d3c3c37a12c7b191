//! stdio of a container process: pipes (or a pty) on the process side,
//! one vsock listener per stream on the host side, and the copy tasks
//! between them.
//!
//! Each requested stream gets a vsock port of its own (the kernel picks
//! it); the host connects once to each. Output streams end with a
//! shutdown once the process side reaches EOF, so the host reads every
//! byte and then EOF. Nothing polls: the copies wait on epoll.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use nix::fcntl::OFlag;
use podvisor_protocol::api;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::unix::pipe;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_vsock::{VsockAddr, VsockListener};

use super::launch::LaunchStdio;
use crate::error::{internal, precondition, Result};
use crate::lock;

const COPY_BUFFER: usize = 64 * 1024;

/// What the process side gets, and what the agent keeps, before launch.
pub struct StdioSetup {
    pub child: LaunchStdio,
    pub host: HostEnds,
}

/// The agent's ends of the pipes (or, with a terminal, just the wishes:
/// the pty comes from the child).
pub struct HostEnds {
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    terminal: bool,
    want_stdin: bool,
}

pub fn prepare(req: &api::StdioRequest) -> Result<StdioSetup> {
    if req.terminal {
        return Ok(StdioSetup {
            child: LaunchStdio::Terminal,
            host: HostEnds {
                stdin: None,
                stdout: None,
                stderr: None,
                terminal: true,
                want_stdin: req.stdin,
            },
        });
    }
    let null = || -> Result<OwnedFd> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map(OwnedFd::from)
            .map_err(|e| internal!("opening /dev/null: {e}"))
    };
    let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| internal!("pipe: {e}"));
    let (child_in, host_in) = if req.stdin {
        let (r, w) = pipe()?;
        (r, Some(w))
    } else {
        (null()?, None)
    };
    let out = |wanted: bool| -> Result<(OwnedFd, Option<OwnedFd>)> {
        if wanted {
            let (r, w) = pipe()?;
            Ok((w, Some(r)))
        } else {
            Ok((null()?, None))
        }
    };
    let (child_out, host_out) = out(req.stdout)?;
    let (child_err, host_err) = out(req.stderr)?;
    Ok(StdioSetup {
        child: LaunchStdio::Fds([child_in, child_out, child_err]),
        host: HostEnds {
            stdin: host_in,
            stdout: host_out,
            stderr: host_err,
            terminal: false,
            want_stdin: req.stdin,
        },
    })
}

/// The live streams of one process.
pub struct Streams {
    ports: api::StdioPorts,
    connected: Mutex<Vec<(&'static str, oneshot::Receiver<()>)>>,
    outputs_left: watch::Receiver<usize>,
    stdin_close: Mutex<Option<oneshot::Sender<()>>>,
    tty: Option<OwnedFd>,
    tasks: Vec<JoinHandle<()>>,
}

impl Streams {
    /// Binds a listener per stream and starts the copies. `tty_master` is
    /// the pty the child passed back, for a terminal process.
    pub fn start(host: HostEnds, tty_master: Option<OwnedFd>) -> Result<Streams> {
        let mut ports = api::StdioPorts::default();
        let mut connected = Vec::new();
        let mut tasks = Vec::new();
        let mut outputs = 0usize;
        let (left_tx, left_rx) = watch::channel(0usize);
        let mut stdin_close = None;

        let mut inputs: Option<Box<dyn AsyncWrite + Send + Unpin>> = None;
        let mut out_streams: Vec<(&'static str, Box<dyn AsyncRead + Send + Unpin>)> = Vec::new();
        let mut tty = None;
        if host.terminal {
            let master = tty_master.ok_or_else(|| internal!("terminal process without a pty"))?;
            if host.want_stdin {
                inputs = Some(Box::new(Pty::new(dup(&master)?)?));
            }
            out_streams.push(("stdout", Box::new(Pty::new(dup(&master)?)?)));
            tty = Some(master);
        } else {
            if let Some(fd) = host.stdin {
                inputs = Some(Box::new(
                    pipe::Sender::from_owned_fd(fd).map_err(|e| internal!("stdin pipe: {e}"))?,
                ));
            }
            for (name, fd) in [("stdout", host.stdout), ("stderr", host.stderr)] {
                if let Some(fd) = fd {
                    let rx = pipe::Receiver::from_owned_fd(fd)
                        .map_err(|e| internal!("{name} pipe: {e}"))?;
                    out_streams.push((name, Box::new(rx)));
                }
            }
        }

        if let Some(mut sink) = inputs {
            let (listener, port) = listen()?;
            ports.stdin = port;
            let (conn_tx, conn_rx) = oneshot::channel();
            let (close_tx, close_rx) = oneshot::channel::<()>();
            connected.push(("stdin", conn_rx));
            stdin_close = Some(close_tx);
            tasks.push(tokio::spawn(async move {
                let mut conn = tokio::select! {
                    r = listener.accept() => match r {
                        Ok((c, _)) => c,
                        Err(e) => return tracing::warn!("stdin accept: {e}"),
                    },
                    // Closed before the host ever connected: nothing to
                    // wait for at start, and the process reads EOF.
                    _ = close_rx => {
                        let _ = conn_tx.send(());
                        return;
                    }
                };
                drop(listener);
                let _ = conn_tx.send(());
                // Ends when the host ends its stream, or the process exits.
                if let Err(e) = tokio::io::copy(&mut conn, &mut sink).await {
                    tracing::debug!("stdin copy ended: {e}");
                }
                let _ = sink.shutdown().await;
            }));
        }

        for (name, source) in out_streams {
            let (listener, port) = listen()?;
            match name {
                "stdout" => ports.stdout = port,
                _ => ports.stderr = port,
            }
            let (conn_tx, conn_rx) = oneshot::channel();
            connected.push((name, conn_rx));
            outputs += 1;
            let left = left_tx.clone();
            tasks.push(tokio::spawn(async move {
                let mut conn = match listener.accept().await {
                    Ok((c, _)) => c,
                    Err(e) => return tracing::warn!("{name} accept: {e}"),
                };
                drop(listener);
                let _ = conn_tx.send(());
                let mut src = BufReader::with_capacity(COPY_BUFFER, source);
                if let Err(e) = tokio::io::copy_buf(&mut src, &mut conn).await {
                    tracing::debug!("{name} copy ended: {e}");
                }
                let _ = conn.shutdown(std::net::Shutdown::Write);
                left.send_modify(|n| *n = n.saturating_sub(1));
            }));
        }
        left_tx.send_replace(outputs);

        Ok(Streams {
            ports,
            connected: Mutex::new(connected),
            outputs_left: left_rx,
            stdin_close: Mutex::new(stdin_close),
            tty,
            tasks,
        })
    }

    pub fn ports(&self) -> api::StdioPorts {
        self.ports.clone()
    }

    /// Waits until the host connected to every stream, so no byte is
    /// written before someone reads it and no output is lost.
    pub async fn wait_connected(&self, within: Duration) -> Result<()> {
        let pending: Vec<_> = std::mem::take(&mut *lock(&self.connected));
        for (name, rx) in pending {
            match tokio::time::timeout(within, rx).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(internal!("{name} stream failed before connecting")),
                Err(_) => {
                    return Err(precondition!(
                        "the host did not connect to the {name} stream within {within:?}"
                    ))
                }
            }
        }
        Ok(())
    }

    /// Resolves once every output stream was copied to its end.
    pub async fn drained(&self) {
        let mut rx = self.outputs_left.clone();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Closes stdin if the host never connected to it; a connected stdin
    /// closes when the host ends its stream (the bytes before that are
    /// all delivered first).
    pub fn close_stdin(&self) {
        if let Some(tx) = lock(&self.stdin_close).take() {
            let _ = tx.send(());
        }
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        let tty = self
            .tty
            .as_ref()
            .ok_or_else(|| precondition!("the process has no terminal"))?;
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ with a valid winsize on our pty master.
        if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(internal!("TIOCSWINSZ: {}", io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn listen() -> Result<(VsockListener, u32)> {
    let listener = VsockListener::bind(VsockAddr::new(libc::VMADDR_CID_ANY, libc::VMADDR_PORT_ANY))
        .map_err(|e| internal!("binding a vsock stdio port: {e}"))?;
    let port = listener
        .local_addr()
        .map_err(|e| internal!("vsock stdio port: {e}"))?
        .port();
    Ok((listener, port))
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd> {
    fd.try_clone().map_err(|e| internal!("dup pty: {e}"))
}

/// A non-blocking pty master. EIO on read (every slave closed) is EOF.
struct Pty(AsyncFd<OwnedFd>);

impl Pty {
    fn new(fd: OwnedFd) -> Result<Pty> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| internal!("pty flags: {e}"))?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| internal!("pty non-blocking: {e}"))?;
        // SAFETY: the AsyncFd owns `fd`, which stays open and the same
        // until it is dropped.
        let fd =
            unsafe { AsyncFd::register(fd) }.map_err(|e| internal!("pty: {}", e.into_parts().1))?;
        Ok(Pty(fd))
    }
}

impl AsyncRead for Pty {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Pty {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
