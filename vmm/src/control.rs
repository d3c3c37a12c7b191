//! The control socket: one JSON request per connection, one JSON answer.
//!
//! - `{"op":"status"}` -> `{"state":"running","vcpus":2,"memory_mib":512,"uptime_ms":1234}`
//! - `{"op":"shutdown"}` -> `{"ok":true}`, then the VM stops (exit status 0).
//!
//! Anything else gets `{"error":"..."}`. A client that says nothing is
//! dropped after a second; the VM never waits on a client.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::exit::{ExitReason, ExitSignal};

#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Clone, Copy)]
pub struct Facts {
    pub vcpus: u8,
    pub memory_mib: u64,
}

fn answer(line: &str, facts: Facts, started: Instant, exit: &ExitSignal) -> serde_json::Value {
    let req: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return json!({"error": format!("not JSON: {e}")}),
    };
    match req.get("op").and_then(|o| o.as_str()) {
        Some("status") => json!({
            "state": if exit.is_set() { "stopping" } else { "running" },
            "vcpus": facts.vcpus,
            "memory_mib": facts.memory_mib,
            "uptime_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }),
        Some("shutdown") => {
            exit.trigger(ExitReason::Stopped);
            json!({"ok": true})
        }
        Some(op) => json!({"error": format!("unknown op {op:?}; known: status, shutdown")}),
        None => json!({"error": "missing \"op\""}),
    }
}

fn serve(mut s: UnixStream, facts: Facts, started: Instant, exit: &ExitSignal) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut line = String::new();
    let reply = match BufReader::new(std::io::Read::take(&s, 4096)).read_line(&mut line) {
        Ok(_) => answer(line.trim(), facts, started, exit),
        Err(e) => json!({"error": format!("reading request: {e}")}),
    };
    let _ = writeln!(s, "{reply}");
}

impl ControlSocket {
    pub fn bind(
        path: &Path,
        facts: Facts,
        exit: Arc<ExitSignal>,
    ) -> std::io::Result<ControlSocket> {
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let started = Instant::now();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                while !exit.is_set() {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            serve(s, facts, started, &exit);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })?;
        Ok(ControlSocket {
            path: path.to_owned(),
            thread: Some(thread),
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends one request to a control socket and returns the answer.
pub fn request(path: &Path, op: &str) -> std::io::Result<serde_json::Value> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    writeln!(s, "{}", json!({"op": op}))?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shutdown_and_junk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sock");
        let exit = Arc::new(ExitSignal::new().unwrap());
        let c = ControlSocket::bind(
            &p,
            Facts {
                vcpus: 2,
                memory_mib: 64,
            },
            exit.clone(),
        )
        .unwrap();
        let st = request(&p, "status").unwrap();
        assert_eq!(
            (st["state"].as_str(), st["vcpus"].as_u64()),
            (Some("running"), Some(2))
        );
        assert!(request(&p, "explode").unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("unknown op"));
        let mut raw = UnixStream::connect(&p).unwrap();
        raw.write_all(b"{{{\n").unwrap();
        let mut l = String::new();
        BufReader::new(&raw).read_line(&mut l).unwrap();
        assert!(l.contains("not JSON"), "{l}");
        // A silent client does not block the next one for long.
        let _silent = UnixStream::connect(&p).unwrap();
        assert_eq!(request(&p, "shutdown").unwrap()["ok"], true);
        assert_eq!(exit.reason(), Some(ExitReason::Stopped));
        drop(c);
        assert!(!p.exists());
    }
}
