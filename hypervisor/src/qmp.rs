//! A QMP client: QEMU's JSON monitor on a UNIX socket, for the commands the
//! warm-start paths send (migration to and from a file, device hotplug,
//! descriptors handed over, stop and resume). Events are skipped; each command waits for its
//! answer.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::io::Interest;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::HypervisorError;

/// How long one command may take to be answered.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Qmp {
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
    path: std::path::PathBuf,
}

impl Qmp {
    /// Connects to `path` (retrying while QEMU creates it, up to `within`)
    /// and leaves capabilities negotiation mode. The socket is in the VM's
    /// own directory, its id's; it is connected to only before any pod's
    /// code ran in that VM (a template being saved, a clone before it
    /// resumes, a pool VM idle until a pod takes it), so nothing but QEMU
    /// can have put it there.
    pub async fn connect(path: &Path, within: Duration) -> Result<Qmp, HypervisorError> {
        let deadline = tokio::time::Instant::now() + within;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(source) if tokio::time::Instant::now() >= deadline => {
                    return Err(HypervisorError::Io {
                        what: format!("connecting to QMP at {}", path.display()),
                        source,
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            read: BufReader::new(r),
            write: w,
            path: path.to_owned(),
        };
        qmp.line().await?; // the greeting
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments`; returns its `return` value, or its
    /// error as [`HypervisorError::Qmp`].
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Value,
    ) -> Result<Value, HypervisorError> {
        let mut req = json!({ "execute": command, "arguments": arguments }).to_string();
        req.push('\n');
        self.write
            .write_all(req.as_bytes())
            .await
            .map_err(|source| self.io(source))?;
        self.answer(command).await
    }

    /// The answer to the command just sent (events before it skipped).
    async fn answer(&mut self, command: &str) -> Result<Value, HypervisorError> {
        loop {
            let answer = self.line().await?;
            if answer.get("event").is_some() {
                continue;
            }
            if let Some(ret) = answer.get("return") {
                return Ok(ret.clone());
            }
            let desc = answer
                .pointer("/error/desc")
                .and_then(Value::as_str)
                .unwrap_or("no answer")
                .to_string();
            return Err(HypervisorError::Qmp {
                command: command.to_string(),
                desc,
            });
        }
    }

    /// Hands `fd` to QEMU as `name` (`getfd`, the descriptor passed with
    /// SCM_RIGHTS), for a later command to use (`netdev_add ... fd=name`).
    pub async fn getfd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), HypervisorError> {
        let req = format!(
            "{}\n",
            json!({ "execute": "getfd", "arguments": { "fdname": name } })
        );
        let fds = [fd.as_raw_fd()];
        let sock = self.write.as_ref();
        let sent = loop {
            sock.writable().await.map_err(|source| self.io(source))?;
            // try_io clears the readiness on EAGAIN, so the loop waits.
            match sock.try_io(Interest::WRITABLE, || {
                sendmsg::<()>(
                    sock.as_raw_fd(),
                    &[std::io::IoSlice::new(req.as_bytes())],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            }) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => break r,
            }
        };
        match sent {
            Ok(n) if n == req.len() => {}
            Ok(_) => return Err(self.io(std::io::ErrorKind::WriteZero.into())),
            Err(e) => return Err(self.io(e)),
        }
        self.answer("getfd").await.map(|_| ())
    }

    /// Polls `query-migrate` until the migration (either direction) has
    /// completed; a failed or cancelled one is an error.
    pub async fn wait_migration(&mut self, within: Duration) -> Result<(), HypervisorError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let info = self.execute("query-migrate", json!({})).await?;
            match info.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some(s @ ("failed" | "cancelled")) => {
                    return Err(HypervisorError::Qmp {
                        command: "migrate".into(),
                        desc: format!(
                            "{s}: {}",
                            info.get("error-desc").and_then(Value::as_str).unwrap_or("")
                        ),
                    })
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(HypervisorError::Qmp {
                        command: "migrate".into(),
                        desc: format!("not completed within {within:?}: {info}"),
                    })
                }
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }

    async fn line(&mut self) -> Result<Value, HypervisorError> {
        let mut line = String::new();
        let n = tokio::time::timeout(ANSWER_TIMEOUT, self.read.read_line(&mut line))
            .await
            .map_err(|_| HypervisorError::Qmp {
                command: "(read)".into(),
                desc: format!("no answer within {ANSWER_TIMEOUT:?}"),
            })?
            .map_err(|source| self.io(source))?;
        if n == 0 {
            return Err(HypervisorError::Qmp {
                command: "(read)".into(),
                desc: "QEMU closed the monitor".into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| HypervisorError::Qmp {
            command: "(read)".into(),
            desc: format!("bad JSON {line:?}: {e}"),
        })
    }

    fn io(&self, source: std::io::Error) -> HypervisorError {
        HypervisorError::Io {
            what: format!("QMP at {}", self.path.display()),
            source,
        }
    }
}
