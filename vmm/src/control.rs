//! The control socket: one JSON request per connection, one JSON answer.
//!
//! - `{"op":"status"}` -> `{"state":"running","vcpus":2,"memory_mib":512,"uptime_ms":1234}`
//!   (`state` is `paused` between `pause` and `resume`)
//! - `{"op":"shutdown"}` -> `{"ok":true}`, then the VM stops (exit status 0).
//! - `{"op":"pause"}` -> `{"ok":true}` once every vCPU has left the guest.
//! - `{"op":"snapshot","memory":"/path/memory","state":"/path/state"}` (paused
//!   only) -> `{"ok":true,"memory_pages":N,"ms":T}`: guest memory and the
//!   VM's state saved, for a config's `restore`.
//! - `{"op":"resume"}` -> `{"ok":true}`.
//!
//! Anything else gets `{"error":"..."}`. A client that says nothing is
//! dropped after a second; the VM never waits on a client. The client
//! side is `podvisor_vmm_config::control`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::exit::{ExitReason, ExitSignal};
use crate::seccomp::{self, ThreadKind};

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

/// What the control socket asks of the VM ([`crate::vm::Handle`]).
pub trait Control: Send + Sync {
    fn facts(&self) -> Facts;
    fn paused(&self) -> bool;
    fn pause(&self) -> Result<(), String>;
    fn resume(&self);
    /// Saves the paused VM; the answer's fields on success.
    fn snapshot(&self, memory: &Path, state: &Path) -> Result<serde_json::Value, String>;
}

fn answer(line: &str, vm: &dyn Control, started: Instant, exit: &ExitSignal) -> serde_json::Value {
    let req: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return json!({"error": format!("not JSON: {e}")}),
    };
    let ok = |r: Result<(), String>| match r {
        Ok(()) => json!({"ok": true}),
        Err(e) => json!({ "error": e }),
    };
    match req.get("op").and_then(|o| o.as_str()) {
        Some("status") => {
            let f = vm.facts();
            json!({
                "state": if exit.is_set() { "stopping" } else if vm.paused() { "paused" } else { "running" },
                "vcpus": f.vcpus,
                "memory_mib": f.memory_mib,
                "uptime_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            })
        }
        Some("shutdown") => {
            exit.trigger(ExitReason::Stopped);
            json!({"ok": true})
        }
        Some("pause") => ok(vm.pause()),
        Some("resume") => {
            vm.resume();
            json!({"ok": true})
        }
        Some("snapshot") => {
            let path = |k: &str| req.get(k).and_then(|v| v.as_str()).map(PathBuf::from);
            match (path("memory"), path("state")) {
                (Some(m), Some(s)) => vm
                    .snapshot(&m, &s)
                    .unwrap_or_else(|e| json!({ "error": e })),
                _ => json!({"error": "snapshot needs \"memory\" and \"state\" paths"}),
            }
        }
        Some(op) => json!({
            "error": format!("unknown op {op:?}; known: status, shutdown, pause, snapshot, resume")
        }),
        None => json!({"error": "missing \"op\""}),
    }
}

fn serve(mut s: UnixStream, vm: &dyn Control, started: Instant, exit: &ExitSignal) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut line = String::new();
    let reply = match BufReader::new(std::io::Read::take(&s, 4096)).read_line(&mut line) {
        Ok(_) => answer(line.trim(), vm, started, exit),
        Err(e) => json!({"error": format!("reading request: {e}")}),
    };
    let _ = writeln!(s, "{reply}");
}

impl ControlSocket {
    pub fn bind(
        path: &Path,
        vm: Arc<dyn Control>,
        exit: Arc<ExitSignal>,
    ) -> std::io::Result<ControlSocket> {
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let started = Instant::now();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                if let Err(e) = seccomp::apply(ThreadKind::Control) {
                    exit.trigger(ExitReason::Failed(e.to_string()));
                    return;
                }
                while !exit.is_set() {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            serve(s, vm.as_ref(), started, &exit);
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

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_vmm_config::control::{request, send};

    use std::sync::atomic::{AtomicBool, Ordering};

    /// Stands for a VM (the real one: `tests/kvm_guests.rs`).
    #[derive(Default)]
    struct Fake {
        paused: AtomicBool,
    }

    impl Control for Fake {
        fn facts(&self) -> Facts {
            Facts {
                vcpus: 2,
                memory_mib: 64,
            }
        }
        fn paused(&self) -> bool {
            self.paused.load(Ordering::SeqCst)
        }
        fn pause(&self) -> Result<(), String> {
            self.paused.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn resume(&self) {
            self.paused.store(false, Ordering::SeqCst);
        }
        fn snapshot(&self, memory: &Path, _: &Path) -> Result<serde_json::Value, String> {
            if !self.paused() {
                return Err("not paused".into());
            }
            Ok(json!({"ok": true, "memory": memory}))
        }
    }

    #[test]
    fn status_shutdown_and_junk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sock");
        let exit = Arc::new(ExitSignal::new().unwrap());
        let c = ControlSocket::bind(&p, Arc::new(Fake::default()), exit.clone()).unwrap();
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
        // Pause, snapshot (its paths required), resume.
        let snap = json!({"op": "snapshot", "memory": "/m", "state": "/s"});
        assert_eq!(send(&p, &snap).unwrap()["error"], "not paused");
        assert_eq!(request(&p, "pause").unwrap()["ok"], true);
        assert_eq!(request(&p, "status").unwrap()["state"], "paused");
        assert!(
            send(&p, &json!({"op": "snapshot", "memory": "/m"})).unwrap()["error"]
                .as_str()
                .unwrap()
                .contains("\"state\"")
        );
        assert_eq!(send(&p, &snap).unwrap()["memory"], "/m");
        assert_eq!(request(&p, "resume").unwrap()["ok"], true);
        assert_eq!(request(&p, "status").unwrap()["state"], "running");
        // A silent client does not block the next one for long.
        let _silent = UnixStream::connect(&p).unwrap();
        assert_eq!(request(&p, "shutdown").unwrap()["ok"], true);
        assert_eq!(exit.reason(), Some(ExitReason::Stopped));
        drop(c);
        assert!(!p.exists());
    }
}
