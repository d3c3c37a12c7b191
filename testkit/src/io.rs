//! Running containers through the agent from the host, as the shim will:
//! create with a spec, connect the stdio ports over hybrid vsock, start,
//! wait, collect the output.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use podvisor_protocol::api;
use podvisor_protocol::hybrid_vsock::dial_within;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

use crate::rootfs::busybox_rootfs;
use crate::vm::{ctx, TestVm};

const DIAL: Duration = Duration::from_secs(30);

/// Which streams to ask for.
#[derive(Debug, Clone, Copy)]
pub struct StdioReq {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub terminal: bool,
}

impl StdioReq {
    /// stdout and stderr.
    pub const OUT: StdioReq = StdioReq {
        stdin: false,
        stdout: true,
        stderr: true,
        terminal: false,
    };
    /// stdin, stdout and stderr.
    pub const ALL: StdioReq = StdioReq {
        stdin: true,
        stdout: true,
        stderr: true,
        terminal: false,
    };
    /// A terminal with input.
    pub const TTY: StdioReq = StdioReq {
        stdin: true,
        stdout: true,
        stderr: false,
        terminal: true,
    };

    fn proto(self) -> api::StdioRequest {
        api::StdioRequest {
            stdin: self.stdin,
            stdout: self.stdout,
            stderr: self.stderr,
            terminal: self.terminal,
            ..Default::default()
        }
    }
}

/// The host ends of a process's streams; output is read to its end in
/// the background.
#[derive(Debug)]
pub struct Streams {
    pub stdin: Option<UnixStream>,
    stdout: Option<JoinHandle<std::io::Result<Vec<u8>>>>,
    stderr: Option<JoinHandle<std::io::Result<Vec<u8>>>>,
}

impl Streams {
    pub async fn connect(uds: &Path, ports: &api::StdioPorts) -> Result<Streams> {
        let dial = |port: u32| async move {
            if port == 0 {
                return Ok(None);
            }
            dial_within(uds, port, DIAL)
                .await
                .map(Some)
                .with_context(|| format!("connecting stdio port {port}"))
        };
        let reader = |s: Option<UnixStream>| {
            s.map(|mut s| {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    s.read_to_end(&mut buf).await.map(|_| buf)
                })
            })
        };
        Ok(Streams {
            stdin: dial(ports.stdin).await?,
            stdout: reader(dial(ports.stdout).await?),
            stderr: reader(dial(ports.stderr).await?),
        })
    }

    /// Everything the process wrote to stdout and stderr, up to EOF.
    pub async fn output(&mut self) -> Result<(Vec<u8>, Vec<u8>)> {
        async fn take(h: Option<JoinHandle<std::io::Result<Vec<u8>>>>) -> Result<Vec<u8>> {
            match h {
                Some(h) => Ok(h.await.context("reader task")??),
                None => Ok(Vec::new()),
            }
        }
        Ok((
            take(self.stdout.take()).await?,
            take(self.stderr.take()).await?,
        ))
    }
}

/// What a finished process left.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub status: i32,
    pub oom_killed: bool,
}

impl TestVm {
    /// Gives container `cid` a busybox rootfs in the shared directory.
    pub fn add_rootfs(&self, cid: &str) -> Result<()> {
        let dir = self.shared().join(cid).join("rootfs");
        if !dir.exists() {
            busybox_rootfs(&dir)?;
        }
        Ok(())
    }

    /// CreateContainer with a fresh rootfs, then connects its streams.
    pub async fn create(&self, cid: &str, spec: &Value, stdio: StdioReq) -> Result<Streams> {
        self.add_rootfs(cid)?;
        self.create_raw(cid, spec.to_string().as_bytes(), stdio)
            .await
    }

    /// CreateContainer with the spec bytes as given.
    pub async fn create_raw(&self, cid: &str, spec: &[u8], stdio: StdioReq) -> Result<Streams> {
        let resp = self
            .agent
            .create_container(
                ctx(),
                &api::CreateContainerRequest {
                    container_id: cid.into(),
                    oci_spec_json: spec.to_vec(),
                    stdio: Some(stdio.proto()).into(),
                    ..Default::default()
                },
            )
            .await?;
        Streams::connect(&self.vsock_path(), &resp.ports).await
    }

    pub async fn start(&self, cid: &str, exec_id: &str) -> Result<()> {
        self.agent
            .start_container(
                ctx(),
                &api::StartContainerRequest {
                    container_id: cid.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                },
            )
            .await?;
        Ok(())
    }

    pub async fn wait(&self, cid: &str, exec_id: &str) -> Result<api::WaitProcessResponse> {
        Ok(self
            .agent
            .wait_process(
                ctx(),
                &api::WaitProcessRequest {
                    container_id: cid.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                },
            )
            .await?)
    }

    /// ExecProcess, connect its streams, StartContainer with its exec id.
    pub async fn exec(
        &self,
        cid: &str,
        exec_id: &str,
        process: &Value,
        stdio: StdioReq,
    ) -> Result<Streams> {
        let resp = self
            .agent
            .exec_process(
                ctx(),
                &api::ExecProcessRequest {
                    container_id: cid.into(),
                    exec_id: exec_id.into(),
                    process_json: process.to_string().into_bytes(),
                    stdio: Some(stdio.proto()).into(),
                    ..Default::default()
                },
            )
            .await?;
        let streams = Streams::connect(&self.vsock_path(), &resp.ports).await?;
        self.start(cid, exec_id).await?;
        Ok(streams)
    }

    pub async fn signal(&self, cid: &str, exec_id: &str, signal: i32) -> Result<()> {
        self.agent
            .signal_process(
                ctx(),
                &api::SignalProcessRequest {
                    container_id: cid.into(),
                    exec_id: exec_id.into(),
                    signal: u32::try_from(signal)?,
                    ..Default::default()
                },
            )
            .await?;
        Ok(())
    }

    pub async fn remove(&self, cid: &str) -> Result<()> {
        self.remove_exec(cid, "").await
    }

    /// RemoveContainer; with an exec id, forgets that exec.
    pub async fn remove_exec(&self, cid: &str, exec_id: &str) -> Result<()> {
        self.agent
            .remove_container(
                ctx(),
                &api::RemoveContainerRequest {
                    container_id: cid.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                },
            )
            .await?;
        Ok(())
    }

    /// Waits for a process and collects its output.
    pub async fn finish(&self, cid: &str, exec_id: &str, mut streams: Streams) -> Result<Output> {
        let w = self.wait(cid, exec_id).await?;
        let (out, err) = streams.output().await?;
        Ok(Output {
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
            status: w.exit_status,
            oom_killed: w.oom_killed,
        })
    }

    /// Creates and starts `sleep 1000` as container `cid`.
    pub async fn start_sleeper(&self, cid: &str) -> Result<Streams> {
        let streams = self
            .create(
                cid,
                &crate::spec::container(&["sleep", "1000"]),
                StdioReq::OUT,
            )
            .await?;
        self.start(cid, "").await?;
        Ok(streams)
    }

    /// SIGKILLs the container's init, waits for it and removes the
    /// container.
    pub async fn kill_and_remove(&self, cid: &str, streams: Streams) -> Result<Output> {
        self.signal(cid, "", libc::SIGKILL).await?;
        let out = self.finish(cid, "", streams).await?;
        self.remove(cid).await?;
        Ok(out)
    }

    /// Runs a container to its end and removes it.
    pub async fn run(&self, cid: &str, spec: &Value) -> Result<Output> {
        let streams = self.create(cid, spec, StdioReq::OUT).await?;
        self.start(cid, "").await?;
        let out = self.finish(cid, "", streams).await?;
        self.remove(cid).await?;
        Ok(out)
    }
}
