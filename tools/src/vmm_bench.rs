//! Figures for the in-tree VMM that hold on any KVM host, even a nested
//! one: process start to the guest's first instruction, CPU spent, and
//! memory beyond guest RAM. Each beside QEMU (`-M microvm`, the lightest
//! machine QEMU has) running an equally tiny guest in the same run.
//!
//! The VMM's guest is `vmm/tests/guests/spin.S` (64-bit, through the VMM's
//! own Linux boot path); QEMU's is a 64 KiB firmware image whose reset
//! vector writes one byte to COM1. Both write the serial console into a
//! FIFO this process reads, so "first byte" is the guest's first I/O.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use podvisor_testkit::vm::{tool, vmm_binary};

const RUNS: usize = 10;
const GUEST_MIB: u64 = 128;

/// One start of one VMM.
pub struct Start {
    /// Spawn to the guest's first serial byte.
    pub wall: Duration,
    /// CPU time of all the process's threads by then.
    pub cpu: Duration,
    /// Resident memory that is not guest RAM, once settled.
    pub rss_beyond_guest: u64,
}

/// Medians over [`RUNS`] starts.
pub struct Figures {
    pub wall: Duration,
    pub cpu: Duration,
    pub rss_beyond_guest: u64,
}

fn median<T: Ord + Copy>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

fn cpu_time(pid: u32) -> Duration {
    let mut ns = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
    }
    Duration::from_nanos(ns)
}

/// RssAnon + RssFile: everything resident but shared memory, where both
/// VMMs keep guest RAM (a memfd).
fn rss_beyond_guest(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    ["RssAnon:", "RssFile:"]
        .iter()
        .filter_map(|k| text.lines().find_map(|l| l.strip_prefix(k)))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

fn mkfifo(path: &Path) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        bail!(
            "mkfifo {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Starts `cmd` (whose serial console is `fifo`) and measures it.
fn measure(fifo: &Path, cmd: &mut Command) -> Result<Start> {
    let _ = std::fs::remove_file(fifo);
    mkfifo(fifo)?;
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)?;
    let t = Instant::now();
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut b = [0u8; 64];
    let result = loop {
        match reader.read(&mut b) {
            Ok(n) if n > 0 => {
                let wall = t.elapsed();
                let cpu = cpu_time(pid);
                std::thread::sleep(Duration::from_millis(300));
                break Ok(Start {
                    wall,
                    cpu,
                    rss_beyond_guest: rss_beyond_guest(pid),
                });
            }
            _ if t.elapsed() > Duration::from_secs(20) => {
                break Err(anyhow::anyhow!("no serial output within 20 s"));
            }
            _ => {
                if let Ok(Some(st)) = child.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    break Err(anyhow::anyhow!(
                        "{:?} exited ({st}) before any output: {err}",
                        cmd.get_program()
                    ));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(fifo);
    result
}

fn figures(starts: Vec<Start>) -> Figures {
    Figures {
        wall: median(starts.iter().map(|s| s.wall).collect()),
        cpu: median(starts.iter().map(|s| s.cpu).collect()),
        rss_beyond_guest: median(starts.iter().map(|s| s.rss_beyond_guest).collect()),
    }
}

/// A test guest (`spin`, `vsock`), assembled by the VMM tests'
/// `guests/build.sh`.
fn test_guest(dir: &Path, name: &str) -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmm/tests/guests/build.sh");
    let out = Command::new(&script)
        .arg(name)
        .arg(dir)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "assembling the {name} guest (binutils): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(dir.join(format!("{name}.elf")))
}

/// 64 KiB of firmware: at the reset vector, `mov dx,0x3f8; mov al,'!';
/// out dx,al; cli; hlt; jmp $-1`.
fn reset_vector_firmware(dir: &Path) -> Result<PathBuf> {
    let mut fw = vec![0xf4u8; 0x10000];
    let code = [0xba, 0xf8, 0x03, 0xb0, 0x21, 0xee, 0xfa, 0xf4, 0xeb, 0xfd];
    fw[0xfff0..0xfff0 + code.len()].copy_from_slice(&code);
    let p = dir.join("reset.bin");
    std::fs::write(&p, fw)?;
    Ok(p)
}

/// podvisor-vmm, with its seccomp filters and without (`--no-seccomp`,
/// runs interleaved), then QEMU microvm; `Err` for QEMU where it cannot
/// run.
pub struct Starts {
    pub vmm: Figures,
    pub vmm_no_seccomp: Figures,
    pub qemu: std::result::Result<Figures, String>,
}

pub fn run() -> Result<Starts> {
    let dir = tempfile::tempdir()?;
    let fifo = dir.path().join("console");
    let guest = test_guest(dir.path(), "spin")?;
    let vmm = vmm_binary();
    if !vmm.exists() {
        bail!("{} missing: `make shim` builds it", vmm.display());
    }
    let config = serde_json::json!({
        "vcpus": 1, "memory_mib": GUEST_MIB, "kernel": guest, "console": fifo,
    })
    .to_string();
    let (mut ours, mut unfiltered) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        ours.push(measure(
            &fifo,
            Command::new(&vmm).args(["--config-json", &config]),
        )?);
        unfiltered.push(measure(
            &fifo,
            Command::new(&vmm).args(["--no-seccomp", "--config-json", &config]),
        )?);
    }
    let (vmm, vmm_no_seccomp) = (figures(ours), figures(unfiltered));

    let fw = reset_vector_firmware(dir.path())?;
    let qemu = tool("QEMU", "qemu-system-x86_64");
    let mut theirs = Vec::new();
    for _ in 0..RUNS {
        let r = measure(
            &fifo,
            Command::new(&qemu)
                .args([
                    "-M",
                    "microvm,memory-backend=mem",
                    "-accel",
                    "kvm",
                    "-cpu",
                    "host",
                ])
                .args([
                    "-object",
                    &format!("memory-backend-memfd,id=mem,size={GUEST_MIB}M"),
                ])
                .args(["-m", &format!("{GUEST_MIB}M"), "-smp", "1"])
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .arg("-bios")
                .arg(&fw)
                .arg("-serial")
                .arg(format!("file:{}", fifo.display())),
        );
        match r {
            Ok(s) => theirs.push(s),
            Err(e) => {
                return Ok(Starts {
                    vmm,
                    vmm_no_seccomp,
                    qemu: Err(format!("{e:#}")),
                })
            }
        }
    }
    Ok(Starts {
        vmm,
        vmm_no_seccomp,
        qemu: Ok(figures(theirs)),
    })
}

/// Cold boot against restore, on the `vsock` guest (its driver answers one
/// host connection, echoes it and powers off): medians over [`RUNS`].
pub struct SnapshotFigures {
    /// Process start to the guest's echo, booting.
    pub cold: Duration,
    /// The same from a snapshot taken once the driver was ready.
    pub restored: Duration,
    /// The `snapshot` op (pause already done): vCPU, device and memory.
    pub save: Duration,
    pub memory_pages: u64,
}

/// Spawns podvisor-vmm on `config` and times it to the guest's echo over
/// the hybrid-vsock socket `uds`.
fn time_to_echo(config: &serde_json::Value, uds: &Path) -> Result<Duration> {
    use std::io::{BufRead, BufReader, Write};
    let started = Instant::now();
    let mut child = Command::new(vmm_binary())
        .args(["--config-json", &config.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> Result<Duration> {
        let s = loop {
            match std::os::unix::net::UnixStream::connect(uds) {
                Ok(s) => break s,
                Err(_) if started.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => bail!("{}: {e}", uds.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        (&s).write_all(b"CONNECT 1024\n")?;
        let mut r = BufReader::new(&s);
        let mut ok = String::new();
        r.read_line(&mut ok)?;
        (&s).write_all(b"ping")?;
        let mut echo = [0u8; 4];
        std::io::Read::read_exact(&mut r, &mut echo)?;
        if !ok.starts_with("OK ") || &echo != b"ping" {
            bail!("the guest answered {ok:?} and echoed {echo:?}");
        }
        Ok(started.elapsed())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

pub fn snapshot_run() -> Result<SnapshotFigures> {
    let dir = tempfile::tempdir()?;
    let guest = test_guest(dir.path(), "vsock")?;
    let config = |name: &str| {
        serde_json::json!({
            "vcpus": 1, "memory_mib": GUEST_MIB, "kernel": guest,
            "vsock": {"cid": 3, "uds": dir.path().join(name)},
        })
    };
    let mut cold = Vec::new();
    for i in 0..RUNS {
        let c = config(&format!("cold-{i}"));
        cold.push(time_to_echo(&c, &dir.path().join(format!("cold-{i}")))?);
    }
    // The snapshot, once the driver is ready.
    let (console, control) = (dir.path().join("console"), dir.path().join("control"));
    let (memory, state) = (dir.path().join("memory"), dir.path().join("state"));
    let mut c = config("template");
    c["console"] = serde_json::json!(console);
    c["control_socket"] = serde_json::json!(control);
    let mut template = Command::new(vmm_binary())
        .args(["--config-json", &c.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let saved = (|| -> Result<serde_json::Value> {
        let t = Instant::now();
        while !std::fs::read_to_string(&console).is_ok_and(|c| c.contains("ready")) {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the vsock guest printed no \"ready\"");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let send = podvisor_vmm_config::control::send;
        send(&control, &serde_json::json!({"op": "pause"}))?;
        Ok(send(
            &control,
            &serde_json::json!({"op": "snapshot", "memory": memory, "state": state}),
        )?)
    })();
    let _ = template.kill();
    let _ = template.wait();
    let saved = saved?;
    if saved["ok"] != true {
        bail!("snapshot: {saved}");
    }
    let mut restored = Vec::new();
    for i in 0..RUNS {
        let mut c = config(&format!("restored-{i}"));
        c["restore"] = serde_json::json!({"memory": memory, "state": state});
        restored.push(time_to_echo(&c, &dir.path().join(format!("restored-{i}")))?);
    }
    Ok(SnapshotFigures {
        cold: median(cold),
        restored: median(restored),
        save: Duration::from_secs_f64(saved["ms"].as_f64().unwrap_or(0.0) / 1000.0),
        memory_pages: saved["memory_pages"].as_u64().unwrap_or(0),
    })
}
