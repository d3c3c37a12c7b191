//! Pod network figures: TCP throughput host to pod and pod to host, and
//! ping round-trip time, for a podvisor pod and, in the same run, a runc
//! pod on the same CNI bridge. The pod side is busybox (`nc`, `dd`); the
//! host side is this process and busybox `ping`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use podvisor_testkit::containerd::{text, Containerd, BUSYBOX};
use podvisor_testkit::vm::tool;

/// The CNI bridge's address on the host (see `containerd.rs`).
const BRIDGE_IP: &str = "10.88.77.1";
const PORT: u16 = 5001;
/// Host to pod: send for this long.
const SEND_FOR: Duration = Duration::from_secs(3);
/// Pod to host: this many 64 KiB blocks.
const BLOCKS: usize = 512;

pub struct Figures {
    /// MB/s (10^6 bytes per second).
    pub host_to_pod: f64,
    pub pod_to_host: f64,
    /// Average ping round trip.
    pub rtt: Duration,
}

/// Where the far end runs: a CRI pod, or a bare namespace on the bridge.
enum Peer<'a> {
    Pod {
        ctd: &'a Containerd,
        sandbox: String,
        container: String,
    },
    Netns {
        name: String,
        host_veth: String,
    },
}

struct Pod<'a> {
    peer: Peer<'a>,
    ip: String,
}

impl Drop for Pod<'_> {
    fn drop(&mut self) {
        match &self.peer {
            Peer::Pod { ctd, sandbox, .. } => {
                let _ = ctd.crictl(&["stopp", sandbox]).output();
                let _ = ctd.crictl(&["rmp", sandbox]).output();
            }
            Peer::Netns { name, host_veth } => {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
                let _ = Command::new("ip").args(["link", "del", host_veth]).output();
            }
        }
    }
}

fn ok(mut cmd: impl std::borrow::BorrowMut<Command>) -> Result<String> {
    let cmd = cmd.borrow_mut();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", text(&out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn start_pod<'a>(ctd: &'a Containerd, runtime: &str) -> Result<Pod<'a>> {
    let d = ctd.dir();
    let pod = d.join(format!("net-{runtime}-pod.json"));
    std::fs::write(
        &pod,
        format!(
            r#"{{"metadata":{{"name":"net-{runtime}","namespace":"default","uid":"net-{runtime}","attempt":0}},"linux":{{}}}}"#
        ),
    )?;
    let spec = d.join("net-sleeper.json");
    std::fs::write(
        &spec,
        format!(
            r#"{{"metadata":{{"name":"sleeper"}},"image":{{"image":"{BUSYBOX}"}},"command":["sleep","3600"],"linux":{{}}}}"#
        ),
    )?;
    let (pod, spec) = (pod.display().to_string(), spec.display().to_string());
    let sandbox = ok(ctd.crictl(&["runp", "--runtime", runtime, &pod]))?;
    let mut p = Pod {
        peer: Peer::Pod {
            ctd,
            sandbox: sandbox.clone(),
            container: String::new(),
        },
        ip: String::new(),
    };
    let container = ok(ctd.crictl(&["create", &sandbox, &spec, &pod]))?;
    if let Peer::Pod { container: c, .. } = &mut p.peer {
        c.clone_from(&container);
    }
    ok(ctd.crictl(&["start", &container]))?;
    let info: serde_json::Value =
        serde_json::from_str(&ok(ctd.crictl(&["inspectp", "-o", "json", &sandbox]))?)?;
    p.ip = info
        .pointer("/status/network/ip")
        .and_then(|v| v.as_str())
        .context("no pod IP")?
        .to_string();
    Ok(p)
}

/// A namespace with `ip` on the bridge, wired as the CNI bridge plugin
/// wires a runc pod.
fn start_netns(ip: &str) -> Result<Pod<'static>> {
    let name = format!("pvt-bench-{}", std::process::id());
    let host_veth = format!("pvb{}", std::process::id() % 100_000);
    let p = Pod {
        peer: Peer::Netns {
            name: name.clone(),
            host_veth: host_veth.clone(),
        },
        ip: ip.to_string(),
    };
    let cidr = format!("{ip}/24");
    let steps: [&[&str]; 7] = [
        &["netns", "add", &name],
        &[
            "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ],
        &["link", "set", &host_veth, "master", "pvtest0", "up"],
        &["-n", &name, "addr", "add", &cidr, "dev", "eth0"],
        &["-n", &name, "link", "set", "eth0", "up"],
        &["-n", &name, "link", "set", "lo", "up"],
        &["-n", &name, "route", "add", "default", "via", BRIDGE_IP],
    ];
    for s in steps {
        ok(Command::new("ip").args(s))?;
    }
    Ok(p)
}

fn exec_bg(p: &Pod, script: &str) -> Result<Child> {
    let mut cmd = match &p.peer {
        Peer::Pod { ctd, container, .. } => {
            ctd.crictl(&["exec", "-s", container, "sh", "-c", script])
        }
        Peer::Netns { name, .. } => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", name, "sh", "-c", script]);
            c
        }
    };
    Ok(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?)
}

fn host_to_pod(p: &Pod) -> Result<f64> {
    let mut sink = exec_bg(p, &format!("busybox nc -l -p {PORT} > /dev/null"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut s = loop {
        match TcpStream::connect((p.ip.as_str(), PORT)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => bail!("connecting to {}:{PORT}: {e}", p.ip),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let block = vec![0u8; 64 * 1024];
    let t = Instant::now();
    let mut sent = 0usize;
    while t.elapsed() < SEND_FOR {
        s.write_all(&block)?;
        sent += block.len();
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let secs = t.elapsed().as_secs_f64();
    let _ = sink.kill();
    let _ = sink.wait();
    Ok(sent as f64 / secs / 1e6)
}

fn pod_to_host(p: &Pod) -> Result<f64> {
    let listener = TcpListener::bind((BRIDGE_IP, 0))?;
    let port = listener.local_addr()?.port();
    let mut source = exec_bg(
        p,
        &format!("busybox dd if=/dev/zero bs=65536 count={BLOCKS} 2>/dev/null | busybox nc {BRIDGE_IP} {port}"),
    )?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => {
                let _ = source.kill();
                let _ = source.wait();
                bail!("the pod did not connect to {BRIDGE_IP}:{port}: {e}");
            }
        }
    };
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    let mut t = None;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        t.get_or_insert_with(Instant::now);
        got += n;
    }
    let secs = t
        .map(|t| t.elapsed().as_secs_f64())
        .unwrap_or(0.0)
        .max(1e-6);
    // busybox nc waits for our side to close before it exits.
    drop(s);
    let _ = source.wait();
    if got != BLOCKS * 65536 {
        bail!("pod sent {got} bytes, expected {}", BLOCKS * 65536);
    }
    Ok(got as f64 / secs / 1e6)
}

fn rtt(p: &Pod) -> Result<Duration> {
    let out = ok(Command::new(tool("BUSYBOX", "busybox"))
        .args(["ping", "-c", "10", "-i", "0.2", "-W", "10", &p.ip]))?;
    // "round-trip min/avg/max = 0.061/0.084/0.130 ms"
    let avg = out
        .lines()
        .find_map(|l| {
            l.split_once(" = ")
                .filter(|(k, _)| k.contains("min/avg/max"))
                .map(|(_, v)| v.to_string())
        })
        .and_then(|v| {
            v.split('/')
                .nth(1)
                .and_then(|a| a.trim().parse::<f64>().ok())
        })
        .with_context(|| format!("no round-trip summary in: {out}"))?;
    Ok(Duration::from_secs_f64(avg / 1000.0))
}

fn figures(p: &Pod) -> Result<Figures> {
    Ok(Figures {
        rtt: rtt(p)?,
        host_to_pod: host_to_pod(p)?,
        pod_to_host: pod_to_host(p)?,
    })
}

/// Figures for a pod of `runtime` ("podvisor" or "runc").
pub fn measure(ctd: &Containerd, runtime: &str) -> Result<Figures> {
    figures(&start_pod(ctd, runtime)?)
}

/// The baseline, with what it was: a runc pod, or where runc cannot
/// start one, a namespace on the same bridge.
pub fn baseline(ctd: &Containerd) -> Result<(Figures, String)> {
    match start_pod(ctd, "runc") {
        Ok(p) => Ok((figures(&p)?, "runc pod, same bridge".into())),
        Err(e) => {
            let msg = format!("{e:#}");
            let why = msg
                .lines()
                .rev()
                .find(|l| l.contains("runc"))
                .unwrap_or("runc failed")
                .trim()
                .to_string();
            eprintln!(
                "runc pod unavailable ({why}); the baseline is a bare namespace on the bridge"
            );
            let p = start_netns("10.88.77.250")?;
            Ok((
                figures(&p)?,
                "netns + veth on the same bridge (runc fails here)".into(),
            ))
        }
    }
}
