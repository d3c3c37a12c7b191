//! Restarting containerd so that it reads its changed config, the two ways
//! a node runs it: a systemd unit (`systemctl restart` in the host's
//! namespaces), or a process a supervisor restarts when it exits, found
//! through the pid file it writes (the local test cluster, nodes whose
//! containerd is run by another daemon). The DaemonSet runs with hostPID, so
//! the host's pids are its own.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{command}: {status}")]
    Failed { command: String, status: String },
    #[error("{path}: {source}")]
    PidFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {content:?} is not a process id")]
    BadPid { path: PathBuf, content: String },
    #[error("{path} names pid {pid}, which is {found}, not {expected}: not signalling it")]
    NotTheProcess {
        path: PathBuf,
        pid: i32,
        found: String,
        expected: String,
    },
    #[error("signalling {expected} (pid {pid}): {source}")]
    Signal {
        expected: String,
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("{expected} (pid {pid}) did not {what} within {secs} s ({path})")]
    Timeout {
        expected: String,
        pid: i32,
        what: &'static str,
        secs: u64,
        path: PathBuf,
    },
}

/// `systemctl restart UNIT`, in the host's namespaces when this process
/// does not run in them (`host_root` is not `/`).
pub fn systemd(host_root: &Path, unit: &str) -> Result<(), RestartError> {
    let mut cmd = if host_root == Path::new("/") {
        Command::new("systemctl")
    } else {
        let mut c = Command::new("nsenter");
        c.args([
            "--target",
            "1",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--pid",
            "--",
            "systemctl",
        ]);
        c
    };
    let command = format!("systemctl restart {unit}");
    let status = cmd
        .args(["restart", unit])
        .status()
        .map_err(|source| RestartError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !status.success() {
        return Err(RestartError::Failed {
            command,
            status: status.to_string(),
        });
    }
    Ok(())
}

/// SIGTERM to the process `pid_file` names, which must be `expected` (its
/// `/proc/PID/comm`: a stale file naming another process is refused), then
/// waits until it is gone and the file names a new live `expected` (its
/// supervisor started it again). Returns the new pid.
pub fn pid_file(pid_file: &Path, expected: &str, timeout: Duration) -> Result<i32, RestartError> {
    let old = running(pid_file, expected)?;
    kill(Pid::from_raw(old), Signal::SIGTERM).map_err(|source| RestartError::Signal {
        expected: expected.into(),
        pid: old,
        source,
    })?;
    let deadline = Instant::now() + timeout;
    let timeout_err = |what| RestartError::Timeout {
        expected: expected.into(),
        pid: old,
        what,
        secs: timeout.as_secs(),
        path: pid_file.into(),
    };
    while alive_as(old, expected) {
        if Instant::now() >= deadline {
            return Err(timeout_err("exit"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    loop {
        // The supervisor may not have written the new pid yet, or the file
        // may be mid-write: only a live `expected` under a new pid counts.
        if let Ok(new) = running(pid_file, expected) {
            if new != old {
                return Ok(new);
            }
        }
        if Instant::now() >= deadline {
            return Err(timeout_err("come back"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pid `path` holds, when that process is alive and is `expected`.
fn running(path: &Path, expected: &str) -> Result<i32, RestartError> {
    let content = fs::read_to_string(path).map_err(|source| RestartError::PidFile {
        path: path.into(),
        source,
    })?;
    let pid = content
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|&p| p > 1)
        .ok_or_else(|| RestartError::BadPid {
            path: path.into(),
            content: content.trim().chars().take(64).collect(),
        })?;
    let found = comm(pid).unwrap_or_else(|| "no process".into());
    if found != expected {
        return Err(RestartError::NotTheProcess {
            path: path.into(),
            pid,
            found,
            expected: expected.into(),
        });
    }
    Ok(pid)
}

/// Whether `pid` lives (not a zombie) and is `expected`.
fn alive_as(pid: i32, expected: &str) -> bool {
    let zombie = fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true);
    !zombie && comm(pid).as_deref() == Some(expected)
}

fn comm(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}
