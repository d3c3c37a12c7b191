//! Restarting a supervised process through its pid file, against a real
//! supervisor (a shell loop that starts `sleep` again whenever it exits and
//! writes its pid, as cluster/up.sh supervises containerd).

// An integration-test crate: every function here is test code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::tests_outside_test_module
)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use podvisor_installer::restart::{pid_file, RestartError};

struct Supervisor {
    child: Child,
    _dir: tempfile::TempDir,
    pid_file: PathBuf,
}

impl Supervisor {
    /// `sleep 1000`, started again `restart` times after it exits.
    fn start(restarts: u32) -> Supervisor {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("sleep.pid");
        let script = format!(
            "n=0; while :; do sleep 1000 & echo $! > {f}.tmp; mv {f}.tmp {f}; wait $!; \
             n=$((n+1)); [ $n -gt {restarts} ] && exit 0; done",
            f = pid_file.display()
        );
        let child = Command::new("bash").args(["-c", &script]).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pid_file.exists() {
            assert!(Instant::now() < deadline, "the supervisor wrote no pid");
            std::thread::sleep(Duration::from_millis(20));
        }
        Supervisor {
            child,
            _dir: dir,
            pid_file,
        }
    }

    fn pid(&self) -> i32 {
        fs::read_to_string(&self.pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let pid = self.pid();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
}

fn gone(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
        || fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'))
            .unwrap_or(true)
}

#[test]
fn the_process_is_stopped_and_its_supervisor_starts_it_again() {
    let s = Supervisor::start(5);
    let old = s.pid();
    let new = pid_file(&s.pid_file, "sleep", Duration::from_secs(20)).unwrap();
    assert_ne!(new, old);
    assert!(gone(old), "pid {old} still runs");
    assert_eq!(s.pid(), new);
    assert_eq!(
        fs::read_to_string(format!("/proc/{new}/comm"))
            .unwrap()
            .trim(),
        "sleep"
    );
    // And again: each restart signals the current process.
    let third = pid_file(&s.pid_file, "sleep", Duration::from_secs(20)).unwrap();
    assert!(third != new && gone(new));
}

#[test]
fn a_process_that_does_not_come_back_times_out_naming_it() {
    let s = Supervisor::start(0);
    let old = s.pid();
    let err = pid_file(&s.pid_file, "sleep", Duration::from_secs(2)).unwrap_err();
    assert!(
        matches!(err, RestartError::Timeout { pid, what: "come back", .. } if pid == old),
        "{err}"
    );
    assert!(err.to_string().contains("sleep.pid"), "{err}");
}

#[test]
fn a_stale_file_naming_another_process_is_refused_and_nothing_signalled() {
    let s = Supervisor::start(5);
    let ours = std::process::id();
    let stale = s.pid_file.with_file_name("stale.pid");
    fs::write(&stale, format!("{ours}\n")).unwrap();
    let err = pid_file(&stale, "sleep", Duration::from_secs(2)).unwrap_err();
    assert!(
        matches!(&err, RestartError::NotTheProcess { found, .. } if found != "sleep"),
        "{err}"
    );
    // The supervised process was not touched either.
    let before = s.pid();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(s.pid(), before);
    assert!(!gone(before));
}

#[test]
fn bad_and_missing_pid_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for (content, want) in [
        ("", "\"\""),
        ("abc\n", "\"abc\""),
        ("1\n", "\"1\""),
        ("-5", "\"-5\""),
    ] {
        let f = dir.path().join("bad.pid");
        fs::write(&f, content).unwrap();
        let err = pid_file(&f, "containerd", Duration::from_secs(1)).unwrap_err();
        assert!(
            matches!(err, RestartError::BadPid { .. }),
            "{content:?}: {err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("bad.pid") && msg.contains(want), "{msg}");
    }
    let missing = dir.path().join("missing.pid");
    let err = pid_file(&missing, "containerd", Duration::from_secs(1)).unwrap_err();
    assert!(
        matches!(err, RestartError::PidFile { .. }) && err.to_string().contains("missing.pid"),
        "{err}"
    );
}
