//! A process's stdio on the host: containerd's FIFOs (or files) bridged to
//! the agent's per-stream vsock connections.
//!
//! - stdin: the FIFO is opened for reading (this waits for containerd's
//!   client to open its end); at its EOF the vsock stream is shut down, and
//!   the agent closes the process's stdin.
//! - stdout/stderr: copied from vsock until the agent ends the stream; the
//!   process's exit is reported only once both copies are done.

use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use podvisor_protocol::api;
use podvisor_protocol::hybrid_vsock::dial_within;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

/// How long to wait for the agent's stdio ports.
const DIAL: Duration = Duration::from_secs(30);

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
}

impl Bridge {
    /// Connects the agent's `ports` and starts copying to and from `paths`.
    pub async fn connect(
        vsock: &Path,
        ports: &api::StdioPorts,
        paths: &StdioPaths,
    ) -> Result<Bridge, StdioError> {
        for p in [&paths.stdin, &paths.stdout, &paths.stderr] {
            StdioPaths::check(p)?;
        }
        let dial = |stream: &'static str, port: u32| async move {
            dial_within(vsock, port, DIAL)
                .await
                .map_err(|source| StdioError::Dial { stream, source })
        };

        let mut outputs = Vec::new();
        for (name, port, path) in [
            ("stdout", ports.stdout, &paths.stdout),
            ("stderr", ports.stderr, &paths.stderr),
        ] {
            if port == 0 || path.is_empty() {
                continue;
            }
            let mut sink = open_output(Path::new(path)).await?;
            let mut conn = dial(name, port).await?;
            outputs.push(tokio::spawn(async move {
                if let Err(e) = tokio::io::copy(&mut conn, &mut sink).await {
                    tracing::debug!("{name} copy ended: {e}");
                }
                let _ = sink.flush().await;
            }));
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

    /// Resolves once every output byte reached containerd's side.
    pub async fn drained(&mut self) {
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
}
