//! A process's stdio on the host: containerd's FIFOs (or files) bridged to
//! the agent's per-stream vsock connections.
//!
//! - stdin: the FIFO is opened for reading (this waits for containerd's
//!   client to open its end); at its EOF the vsock stream is shut down, and
//!   the agent closes the process's stdin.
//! - stdout/stderr: copied from vsock until the agent ends the stream; the
//!   process's exit is reported only once both copies are done. The agent
//!   reports the exit only after it sent every output byte, so once the
//!   exit is known a stream that stays silent for [`EXIT_DRAIN_IDLE`] is
//!   closed from this side: the vsock backend can lose the end of a
//!   stream (the guest's shutdown is not passed on, and its close can stay
//!   queued behind a pending reset), and an exec must not hang on that.

use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use podvisor_protocol::api;
use podvisor_protocol::hybrid_vsock::dial_within;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long to wait for the agent's stdio ports.
const DIAL: Duration = Duration::from_secs(30);

/// How long an output stream may stay silent, once the process has
/// ended, before it is taken as ended.
pub const EXIT_DRAIN_IDLE: Duration = Duration::from_secs(10);

const COPY_BUFFER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("stdio {0:?}: only paths are supported, not URIs")]
    Uri(String),
    #[error("opening {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("connecting the {stream} stream: {source}")]
    Dial {
        stream: &'static str,
        source: podvisor_protocol::DialError,
    },
}

/// containerd's stdio of one process.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    /// Which streams to ask the agent for.
    pub fn request(&self) -> api::StdioRequest {
        api::StdioRequest {
            stdin: !self.stdin.is_empty(),
            stdout: !self.stdout.is_empty(),
            stderr: !self.stderr.is_empty() && !self.terminal,
            terminal: self.terminal,
            ..Default::default()
        }
    }

    fn check(path: &str) -> Result<(), StdioError> {
        if path.contains("://") {
            return Err(StdioError::Uri(path.to_string()));
        }
        Ok(())
    }
}

/// The running copies of one process.
pub struct Bridge {
    stdin_path: Option<PathBuf>,
    stdin: Option<JoinHandle<()>>,
    outputs: Vec<JoinHandle<()>>,
    exited: watch::Sender<bool>,
}

impl Bridge {
    /// Connects the agent's `ports` and starts copying to and from `paths`
    /// for the process `exec_id` of container `id` (its init: empty).
    pub async fn connect(
        vsock: &Path,
        ports: &api::StdioPorts,
        paths: &StdioPaths,
        (id, exec_id): (&str, &str),
    ) -> Result<Bridge, StdioError> {
        for p in [&paths.stdin, &paths.stdout, &paths.stderr] {
            StdioPaths::check(p)?;
        }
        let dial = |stream: &'static str, port: u32| async move {
            dial_within(vsock, port, DIAL)
                .await
                .map_err(|source| StdioError::Dial { stream, source })
        };

        let (exited, _) = watch::channel(false);
        let mut outputs = Vec::new();
        for (name, port, path) in [
            ("stdout", ports.stdout, &paths.stdout),
            ("stderr", ports.stderr, &paths.stderr),
        ] {
            if port == 0 || path.is_empty() {
                continue;
            }
            let sink = open_output(Path::new(path)).await?;
            let conn = dial(name, port).await?;
            let stream = if exec_id.is_empty() {
                format!("{name} of container {id}")
            } else {
                format!("{name} of exec {exec_id} in container {id}")
            };
            outputs.push(tokio::spawn(copy_output(
                stream,
                conn,
                sink,
                exited.subscribe(),
                EXIT_DRAIN_IDLE,
            )));
        }

        let mut stdin = None;
        let stdin_path =
            (!paths.stdin.is_empty() && ports.stdin != 0).then(|| PathBuf::from(&paths.stdin));
        if let Some(path) = stdin_path.clone() {
            let mut conn = dial("stdin", ports.stdin).await?;
            stdin = Some(tokio::spawn(async move {
                // Blocks until the client opens its end (or close_stdin
                // opens and closes one for it).
                let opened = {
                    let path = path.clone();
                    tokio::task::spawn_blocking(move || std::fs::File::open(path)).await
                };
                let file = match opened {
                    Ok(Ok(f)) => f,
                    Ok(Err(e)) => return tracing::warn!("opening stdin {}: {e}", path.display()),
                    Err(e) => return tracing::warn!("stdin task: {e}"),
                };
                let copied = match pipe::Receiver::from_file(file) {
                    Ok(mut rx) => tokio::io::copy(&mut rx, &mut conn).await.map(drop),
                    // Not a FIFO: a regular file.
                    Err(_) => match tokio::fs::File::open(&path).await {
                        Ok(mut f) => tokio::io::copy(&mut f, &mut conn).await.map(drop),
                        Err(e) => Err(e),
                    },
                };
                if let Err(e) = copied {
                    tracing::debug!("stdin copy ended: {e}");
                }
                let _ = conn.shutdown().await;
            }));
        }
        Ok(Bridge {
            stdin_path,
            stdin,
            outputs,
            exited,
        })
    }

    /// containerd's CloseIO: the client has no more input. A client that
    /// never opened its end gets one opened and closed for it, so the copy
    /// sees EOF; input already written is still delivered.
    pub fn close_stdin(&self) {
        if let Some(path) = &self.stdin_path {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path);
        }
    }

    /// Call once the process has ended: resolves when every output byte
    /// reached containerd's side (each stream ended, or stayed silent for
    /// [`EXIT_DRAIN_IDLE`]).
    pub async fn drained(&mut self) {
        self.exited.send_replace(true);
        for t in self.outputs.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(t) = &self.stdin {
            // A FIFO open still waiting for the client holds a blocking
            // thread: release it.
            if !t.is_finished() {
                self.close_stdin();
            }
            t.abort();
        }
        for t in &self.outputs {
            t.abort();
        }
    }
}

/// Copies one output stream until the agent ends it, or until it has
/// been silent for `idle` after the process ended. Time spent writing to
/// a slow reader on containerd's side never counts as silence.
async fn copy_output(
    name: String,
    mut conn: impl AsyncRead + Unpin,
    mut sink: impl AsyncWrite + Unpin,
    mut exited: watch::Receiver<bool>,
    idle: Duration,
) {
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut ended = *exited.borrow();
    loop {
        let read = if ended {
            match tokio::time::timeout(idle, conn.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(
                        "{name}: the guest sent nothing for {idle:?} after the process ended \
                         and did not end the stream; closing it"
                    );
                    break;
                }
            }
        } else {
            // Reading is cancel safe: a read cut short here loses nothing.
            tokio::select! {
                r = conn.read(&mut buf) => r,
                _ = exited.wait_for(|e| *e) => {
                    ended = true;
                    continue;
                }
            }
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("{name} copy ended: {e}");
                break;
            }
        };
        if let Err(e) = sink.write_all(&buf[..n]).await {
            tracing::debug!("{name} copy ended: {e}");
            break;
        }
    }
    let _ = sink.flush().await;
}

/// Opens an output FIFO read-write (it never blocks, and a reader that
/// comes and goes does not break it), or appends to a regular file.
async fn open_output(
    path: &Path,
) -> Result<Box<dyn tokio::io::AsyncWrite + Send + Unpin>, StdioError> {
    let err = |source| StdioError::Open {
        path: path.to_owned(),
        source,
    };
    let is_fifo = std::fs::metadata(path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false);
    if is_fifo {
        let tx = pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(path)
            .map_err(err)?;
        Ok(Box::new(tx))
    } else {
        let f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(err)?;
        Ok(Box::new(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_merges_stderr() {
        let p = StdioPaths {
            stdin: "/i".into(),
            stdout: "/o".into(),
            stderr: "/e".into(),
            terminal: true,
        };
        let r = p.request();
        assert!(r.stdin && r.stdout && !r.stderr && r.terminal);
        let none = StdioPaths::default().request();
        assert!(!none.stdin && !none.stdout && !none.stderr);
    }

    #[test]
    fn uris_are_refused() {
        let e = StdioPaths::check("binary:///usr/bin/logger").unwrap_err();
        assert!(e.to_string().contains("not URIs"), "{e}");
    }

    const IDLE: Duration = Duration::from_secs(10);

    /// Runs `copy_output` from a guest end the test writes to, into a sink
    /// the test reads from.
    fn copying() -> (
        tokio::io::DuplexStream,
        tokio::io::DuplexStream,
        watch::Sender<bool>,
        JoinHandle<()>,
    ) {
        let (guest, conn) = tokio::io::duplex(1024);
        let (sink, host) = tokio::io::duplex(1024);
        let (exited, rx) = watch::channel(false);
        let task = tokio::spawn(copy_output("stdout".into(), conn, sink, rx, IDLE));
        (guest, host, exited, task)
    }

    async fn read_all(mut host: tokio::io::DuplexStream) -> Vec<u8> {
        let mut out = Vec::new();
        host.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_the_guest_never_ends_is_closed_once_the_process_ended_and_it_stayed_silent() {
        let (mut guest, host, exited, task) = copying();
        guest.write_all(b"boot id\n").await.unwrap();
        // Silent for long before the exit: still open.
        tokio::time::sleep(IDLE * 30).await;
        assert!(!task.is_finished());
        exited.send_replace(true);
        let started = tokio::time::Instant::now();
        task.await.unwrap();
        assert_eq!(started.elapsed(), IDLE);
        assert_eq!(read_all(host).await, b"boot id\n");
        drop(guest);
    }

    #[tokio::test(start_paused = true)]
    async fn output_still_arriving_after_the_exit_is_all_delivered() {
        let (mut guest, host, exited, task) = copying();
        exited.send_replace(true);
        for i in 0..5u8 {
            tokio::time::sleep(IDLE - Duration::from_secs(1)).await;
            guest.write_all(&[b'a' + i]).await.unwrap();
        }
        drop(guest);
        task.await.unwrap();
        assert_eq!(read_all(host).await, b"abcde");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_slow_to_take_the_output_is_not_silence() {
        let (mut guest, mut host, exited, task) = copying();
        let sent: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        let data = sent.clone();
        let writer = tokio::spawn(async move {
            guest.write_all(&data).await.unwrap();
            guest
        });
        exited.send_replace(true);
        // The sink holds 1024 bytes: the copy waits on the reader, which
        // takes a while to come.
        tokio::time::sleep(IDLE * 3).await;
        let mut got = Vec::new();
        let mut chunk = [0u8; 512];
        while got.len() < sent.len() {
            let n = host.read(&mut chunk).await.unwrap();
            got.extend_from_slice(&chunk[..n]);
            tokio::time::sleep(IDLE * 2).await;
        }
        drop(writer.await.unwrap());
        task.await.unwrap();
        assert_eq!(got, sent);
        assert!(read_all(host).await.is_empty());
    }
}
