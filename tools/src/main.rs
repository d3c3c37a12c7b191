//! `podvisor-tools demo|bench|image`: the tools built on the test harness
//! (`podvisor-testkit`), apart from it.
//!
//! - `demo`: starts a private containerd with the podvisor runtime, runs a
//!   container with `ctr run`, and shows that it ran in a VM (guest kernel
//!   release and boot id next to the host's).
//! - `bench [kernel|guest|warm|vmm]`: prints the figures of DESIGN.md's
//!   target table that this machine can measure, each with the backend and
//!   accelerator used (`kernel`: only the guest kernel's, podvisor's
//!   beside Debian's; `guest`: QEMU start to the agent, jailed and not,
//!   and containers in a running VM; `warm`: only warm start's, cold boot
//!   beside a template's clone; `vmm`: podvisor-vmm's).
//! - `image ARCHIVE NAME [--add FILE:PATH]... CMD...`: writes the busybox
//!   test image (plus FILEs) as an OCI archive (the local cluster imports
//!   it; no registry is reached).

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use podvisor_protocol::api;
use podvisor_testkit::containerd::{text, Containerd, Release};
use podvisor_testkit::spec::container;
use podvisor_testkit::vm::manifest;
use podvisor_testkit::{ctx, detect_accel, Accel, StdioReq, TestVm, VmConfig};

mod kernel_bench;
mod net_bench;
mod vmm_bench;
mod warm_bench;

const BOOTS: usize = 3;
const CONTAINER_STARTS: usize = 10;
const CTR_RUNS: usize = 3;

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match std::env::args().nth(1).as_deref() {
        Some("demo") => demo(),
        Some("bench") => match std::env::args().nth(2).as_deref() {
            None => rt.block_on(bench()),
            Some("kernel") => rt.block_on(bench_kernel()),
            Some("guest") => rt.block_on(async {
                let (accel, note) = bench_head()?;
                guest_figures(accel, note).await
            }),
            Some("warm") => warm_bench::figures(bench_head()?.1),
            Some("vmm") => vmm_figures(),
            Some(other) => {
                bail!("bench {other:?}: no such part (kernel, guest, warm, vmm, or none for all)")
            }
        },
        Some("image") => image(&std::env::args().skip(2).collect::<Vec<_>>()),
        _ => {
            bail!("usage: podvisor-tools demo|bench [kernel|guest|warm|vmm]|image ARCHIVE NAME [--pause | CMD...]")
        }
    }
}

/// `image ARCHIVE NAME [--add FILE:PATH]... CMD...`: writes the busybox
/// test image, with FILEs added at PATHs, as an OCI archive for
/// `ctr images import` (the local cluster's images). `image ARCHIVE NAME
/// --pause`: the pod sandbox image.
fn image(args: &[String]) -> Result<()> {
    const USAGE: &str =
        "usage: podvisor-tools image ARCHIVE NAME [--pause | [--add FILE:PATH]... CMD...]";
    let [archive, name, rest @ ..] = args else {
        bail!(USAGE);
    };
    if rest == ["--pause"] {
        let def = podvisor_testkit::image::pause();
        return podvisor_testkit::image::archive(std::path::Path::new(archive), name, &def);
    }
    let mut rest: &[String] = rest;
    let mut files = Vec::new();
    while let [flag, spec, tail @ ..] = rest {
        if flag != "--add" {
            break;
        }
        let Some((from, to)) = spec.split_once(':') else {
            bail!("--add {spec}: expected FILE:PATH");
        };
        files.push((std::path::Path::new(from), to));
        rest = tail;
    }
    if rest.is_empty() {
        bail!("image {name}: no default command given ({USAGE})");
    }
    let cmd: Vec<&str> = rest.iter().map(String::as_str).collect();
    podvisor_testkit::image::busybox_archive_with(std::path::Path::new(archive), name, &cmd, &files)
}

fn first_line(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn demo() -> Result<()> {
    let (accel, why) = detect_accel();
    println!(
        "starting a private containerd {} with the podvisor runtime",
        Release::V2.version()
    );
    println!("VMs run under QEMU with {} ({why})", accel.name());
    let ctd = Containerd::start(Release::V2)?;
    let script = "echo \"kernel  $(uname -r)\"; echo \"boot id $(cat /proc/sys/kernel/random/boot_id)\"; \
                  echo \"cpus    $(nproc)\"; echo \"memory  $(awk '/MemTotal/ {print $2, $3}' /proc/meminfo)\"";
    let mut cmd = ctd.ctr_run(&["--rm"], "demo", &["sh", "-c", script]);
    println!(
        "$ ctr run --runtime {} --rm {} demo sh -c '...'",
        podvisor_testkit::containerd::RUNTIME,
        podvisor_testkit::containerd::BUSYBOX
    );
    let started = Instant::now();
    let out = cmd.output().context("running ctr")?;
    let took = started.elapsed();
    let result = if out.status.success() {
        println!("--- in the container (a VM), {took:.1?} from ctr run to exit");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        println!("--- on the host");
        println!("kernel  {}", first_line("/proc/sys/kernel/osrelease"));
        println!("boot id {}", first_line("/proc/sys/kernel/random/boot_id"));
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "ctr run failed: {}\n{}",
            text(&out),
            ctd.log_tail()
        ))
    };
    ctd.stop();
    result
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1 << 20) as f64)
}

fn row(name: &str, value: String, target: &str) {
    println!("{name:<66} {value:>11}  {target}");
}

/// The backend's note and the table's head.
fn bench_head() -> Result<(Accel, &'static str)> {
    let (accel, why) = detect_accel();
    let note = match accel {
        Accel::Kvm => "qemu/kvm",
        Accel::Tcg => "qemu/tcg",
    };
    println!("podvisor figures on this machine; backend {note} ({why})");
    println!("guest kernel {}", manifest("kernel_release")?);
    println!();
    println!("{:<66} {:>11}  target (DESIGN.md)", "figure", "measured");
    Ok((accel, note))
}

/// `bench kernel`: the guest kernel's part alone (ours beside Debian's).
async fn bench_kernel() -> Result<()> {
    let (accel, note) = bench_head()?;
    kernel_bench::figures(accel, note).await
}

async fn bench() -> Result<()> {
    let (accel, note) = bench_head()?;
    vmm_figures()?;
    guest_figures(accel, note).await?;
    kernel_bench::figures(accel, note).await?;
    warm_bench::figures(note)?;
    containerd_figures(note)?;
    critest_figures()
}

/// critest (the CRI validation suite) per containerd and handler: its
/// tallies and how long each run took, and whether podvisor passes what
/// runc does (`make test-cri` is the same run as a test).
fn critest_figures() -> Result<()> {
    use podvisor_testkit::critest::{by_design, run_all, verdict, Options, Outcome};
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/cri");
    let runs = run_all(&Options {
        releases: Release::ALL.to_vec(),
        parallel: 2,
        out,
    })?;
    for r in &runs {
        row(
            &format!(
                "critest {} on containerd {}: passed/failed/skipped",
                r.handler, r.version
            ),
            format!(
                "{}/{}/{}",
                r.count(|o| *o == Outcome::Passed),
                r.count(|o| matches!(o, Outcome::Failed(_))),
                r.count(|o| *o == Outcome::Skipped)
            ),
            "every spec runc passes",
        );
        row(
            "  its run time",
            format!("{:.0} s", r.duration.as_secs_f64()),
            "-",
        );
    }
    let list = by_design()?;
    let v = verdict(&runs, &list);
    row(
        "critest specs runc passes and podvisor fails (not by design)",
        v.regressions.len().to_string(),
        &format!("0 ({} by design)", list.len()),
    );
    Ok(())
}

/// The in-tree VMM beside QEMU microvm, on the same tiny guest.
fn vmm_figures() -> Result<()> {
    let vmm_bench::Starts {
        vmm: ours,
        vmm_no_seccomp,
        qemu,
    } = vmm_bench::run()?;
    row(
        "podvisor-vmm start to guest's first I/O, wall, median (KVM)",
        ms(ours.wall),
        "<= 5 ms (Firecracker ~12 ms to first KVM_RUN)",
    );
    row(
        "  the jail's cost: the same without seccomp filters (--no-seccomp), wall / CPU",
        format!("{} / {}", ms(vmm_no_seccomp.wall), ms(vmm_no_seccomp.cpu)),
        "-",
    );
    row(
        "podvisor-vmm CPU time by then",
        ms(ours.cpu),
        "Firecracker <= 8 CPU ms",
    );
    row(
        "podvisor-vmm RSS beyond guest memory",
        mib(ours.rss_beyond_guest),
        "<= 4 MiB (Firecracker <= 5 MiB)",
    );
    match qemu {
        Ok(q) => {
            row(
                "  baseline: QEMU -M microvm, same measure, wall",
                ms(q.wall),
                "-",
            );
            row("  baseline: QEMU -M microvm, CPU time", ms(q.cpu), "-");
            row(
                "  baseline: QEMU -M microvm, RSS beyond guest memory",
                mib(q.rss_beyond_guest),
                "-",
            );
        }
        Err(e) => println!("  baseline: QEMU microvm could not run here: {e}"),
    }
    let snap = vmm_bench::snapshot_run()?;
    row(
        "podvisor-vmm start to a tiny guest answering on vsock, median: cold boot / restored",
        format!("{} / {}", ms(snap.cold), ms(snap.restored)),
        "-",
    );
    row(
        "podvisor-vmm snapshot of it (pause done; 128 MiB guest)",
        format!("{}, {} pages written", ms(snap.save), snap.memory_pages),
        "-",
    );
    Ok(())
}

/// The guest and agent alone, through the shim's QEMU backend.
async fn guest_figures(accel: Accel, note: &str) -> Result<()> {
    let cfg = VmConfig::new(accel);
    let unjailed = VmConfig {
        jail: podvisor_hypervisor::Jail {
            enabled: false,
            ..Default::default()
        },
        ..cfg.clone()
    };
    let (mut boots, mut unjailed_boots) = (Vec::new(), Vec::new());
    let mut rss_idle = 0;
    // Jailed and not in turn, so that a noisy moment hits both alike.
    for _ in 0..BOOTS {
        let vm = TestVm::boot(&cfg).await?;
        boots.push(vm.boot_time);
        let d = vm
            .agent
            .get_guest_details(ctx(), &api::GuestDetailsRequest::new())
            .await?;
        rss_idle = d.agent_rss_bytes;
        vm.shutdown().await;
        let vm = TestVm::boot(&unjailed).await?;
        unjailed_boots.push(vm.boot_time);
        vm.shutdown().await;
    }
    let vm = TestVm::boot(&cfg).await?;
    let mut starts = Vec::new();
    for i in 0..CONTAINER_STARTS {
        let id = format!("bench-{i}");
        vm.add_rootfs(&id)?;
        let t = Instant::now();
        let streams = vm.create(&id, &container(&["true"]), StdioReq::OUT).await?;
        vm.start(&id, "").await?;
        starts.push(t.elapsed());
        let out = vm.finish(&id, "", streams).await?;
        if out.status != 0 {
            bail!("container {id} exited {}", out.status);
        }
        vm.remove(&id).await?;
    }
    let rss_busy = vm
        .agent
        .get_guest_details(ctx(), &api::GuestDetailsRequest::new())
        .await?
        .agent_rss_bytes;
    vm.shutdown().await;

    row(
        &format!("QEMU start to agent ready, median of {BOOTS} ({note})"),
        ms(median(boots)),
        "-",
    );
    row(
        "  the jail's cost: the same without it ([jail] enabled = false)",
        ms(median(unjailed_boots)),
        "-",
    );
    row(
        &format!("container create+start in a running VM, median of {CONTAINER_STARTS} ({note})"),
        ms(median(starts)),
        "<= 30 ms on real KVM",
    );
    row("agent RSS in the guest, idle", mib(rss_idle), "-");
    row(
        &format!("agent RSS after {CONTAINER_STARTS} containers"),
        mib(rss_busy),
        "-",
    );
    Ok(())
}

/// Pss of a process's own memory, in bytes: anonymous and file-backed,
/// not shared memory (the guest's RAM is a shared memfd, counted apart).
fn own_pss(pid: u32) -> u64 {
    proc_kib(pid, "smaps_rollup", &["Pss_Anon:", "Pss_File:"])
}

/// PSS of `pid` in bytes, its shared memory included.
fn pss(pid: u32) -> u64 {
    proc_kib(pid, "smaps_rollup", &["Pss:"])
}

fn rss(pid: u32) -> u64 {
    proc_kib(pid, "status", &["VmRSS:"])
}

/// The sum of the kB fields `keys` of `/proc/<pid>/<file>`, in bytes (0
/// for a process gone).
fn proc_kib(pid: u32, file: &str, keys: &[&str]) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    keys.iter()
        .filter_map(|k| text.lines().find_map(|l| l.strip_prefix(k)))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

/// Pids whose command line mentions `needle`, with their program names.
fn processes_with(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            let prog = cmd
                .split(' ')
                .next()
                .unwrap_or_default()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string();
            found.push((pid, prog));
        }
    }
    found
}

/// The shim under a private containerd: ctr run latency, per-pod memory.
/// Pods started per RunPodSandbox figure.
const RUNP_RUNS: usize = 3;

/// What the KVM probe costs a sandbox start: `podvisor-vmm --probe` run
/// (the first start after a host boot; before its verdict was cached, the
/// shim probed in-process on every start) and the cached verdict read
/// (every other start); medians of 5, on a state root of their own.
fn probe_figures() -> Result<(Duration, Duration)> {
    // On a thread of its own: the bench's caller already runs a runtime.
    std::thread::scope(|s| s.spawn(probe_times).join())
        .map_err(|_| anyhow::anyhow!("the probe figures' thread panicked"))?
}

fn probe_times() -> Result<(Duration, Duration)> {
    let root = tempfile::tempdir()?;
    let vmm = podvisor_testkit::vm::vmm_binary();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut probed = Vec::new();
    let mut cached = Vec::new();
    for _ in 0..5 {
        let _ = std::fs::remove_file(root.path().join("kvm-probe.json"));
        let t = Instant::now();
        rt.block_on(podvisor_hypervisor::probe::verdict(&vmm, root.path()));
        probed.push(t.elapsed());
        let t = Instant::now();
        rt.block_on(podvisor_hypervisor::probe::verdict(&vmm, root.path()));
        cached.push(t.elapsed());
    }
    Ok((median(probed), median(cached)))
}

/// `ctr run --rm` to the container's first byte of output, median of
/// CTR_RUNS.
fn ctr_first_output(ctd: &Containerd) -> Result<Duration> {
    let firsts = (0..CTR_RUNS)
        .map(|i| ctr_first_output_once(ctd, &format!("first-{i}")))
        .collect::<Result<Vec<_>>>()?;
    Ok(median(firsts))
}

/// `ctr run --rm <id> echo first`: from its start to the first byte out.
fn ctr_first_output_once(ctd: &Containerd, id: &str) -> Result<Duration> {
    let mut child = ctd
        .ctr_run(&["--rm"], id, &["echo", "first"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let t = Instant::now();
    let mut byte = [0u8; 1];
    let mut stdout = child.stdout.take().context("ctr stdout")?;
    if stdout.read(&mut byte)? != 1 {
        bail!(
            "ctr run printed nothing: {}",
            text(&child.wait_with_output()?)
        );
    }
    let took = t.elapsed();
    child.wait()?;
    Ok(took)
}

/// CRI RunPodSandbox of a podvisor pod named `name` (stopped and removed
/// after).
fn runp(ctd: &Containerd, name: &str) -> Result<Duration> {
    runp_with(ctd, name, podvisor_names::HANDLER)
}

/// [`runp`] with the runtime handler `handler` ("runc" for the baseline).
fn runp_with(ctd: &Containerd, name: &str, handler: &str) -> Result<Duration> {
    let pod = ctd.dir().join(format!("{name}-pod.json"));
    std::fs::write(
        &pod,
        format!(
            r#"{{"metadata":{{"name":"{name}","namespace":"default","uid":"{name}-uid","attempt":0}},"linux":{{}}}}"#
        ),
    )?;
    let pod = pod.display().to_string();
    let t = Instant::now();
    let out = ctd
        .crictl(&["runp", "--runtime", handler, &pod])
        .output()
        .context("running crictl (make upstream builds it)")?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!("crictl runp: {}", text(&out));
    }
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let _ = ctd.crictl(&["stopp", &id]).output();
    let _ = ctd.crictl(&["rmp", &id]).output();
    Ok(took)
}

fn containerd_figures(note: &str) -> Result<()> {
    let ctd = Containerd::start(Release::V2)?;
    let result = (|| -> Result<()> {
        row(
            &format!("ctr run to the container's first output, median of {CTR_RUNS} ({note})"),
            ms(ctr_first_output(&ctd)?),
            "-",
        );

        let out = ctd
            .ctr_run(&["-d"], "resident", &["sleep", "1000"])
            .output()?;
        if !out.status.success() {
            bail!("ctr run -d: {}", text(&out));
        }
        std::thread::sleep(Duration::from_secs(2));
        let procs = processes_with("/run/podvisor/resident/");
        let shim: Vec<u32> = processes_with("-id resident ")
            .into_iter()
            .filter(|(_, p)| p == "containerd-shim-podvisor-v2")
            .map(|(pid, _)| pid)
            .collect();
        let shim_pid = *shim.first().context("no shim process for the pod")?;
        let mut total = own_pss(shim_pid);
        let mut parts = vec![format!("shim {}", mib(own_pss(shim_pid)))];
        for (pid, prog) in &procs {
            let pss = own_pss(*pid);
            total += pss;
            parts.push(format!("{prog} {}", mib(pss)));
        }
        row("shim RSS per pod", mib(rss(shim_pid)), "<= 10 MiB");
        row(
            &format!("host memory per pod beyond guest RAM, PSS ({note})"),
            mib(total),
            "<= 32 MiB",
        );
        println!("  made of: {}", parts.join(", "));

        // RunPodSandbox with the KVM probe's verdict cached (every start
        // after a host boot's first), and with the cache removed first (the
        // first start after a boot; before the verdict was cached, the shim
        // probed KVM in-process on every start).
        let warm: Vec<Duration> = (0..RUNP_RUNS)
            .map(|i| runp(&ctd, &format!("bench{i}")))
            .collect::<Result<_>>()?;
        row(
            &format!("pod sandbox ready (CRI RunPodSandbox, {note}, warm start on), median of {RUNP_RUNS}"),
            ms(median(warm)),
            "<= 250 ms on real KVM",
        );
        let (probed, cached) = probe_figures()?;
        row(
            "  of it: KVM verdict read from the per-boot cache, median",
            ms(cached),
            "-",
        );
        row(
            "  the probe itself (a boot's first start; before: every start)",
            ms(probed),
            "-",
        );
        let shim = podvisor_testkit::containerd::shim_dir()?.join(podvisor_names::SHIM_BINARY);
        let shim = std::fs::metadata(&shim).map(|m| m.len()).unwrap_or(0);
        row("shim binary size (release)", mib(shim), "-");

        let ours = net_bench::measure(&ctd, "podvisor")?;
        let (base, what) = net_bench::baseline(&ctd)?;
        let mbs = |v: f64| format!("{v:.0} MB/s");
        let label = format!("  baseline: {what}");
        row(
            &format!("TCP host -> pod ({note})"),
            mbs(ours.host_to_pod),
            "-",
        );
        row(&label, mbs(base.host_to_pod), "-");
        row(
            &format!("TCP pod -> host ({note})"),
            mbs(ours.pod_to_host),
            "-",
        );
        row(&label, mbs(base.pod_to_host), "-");
        row(
            &format!("ping round trip host -> pod, average ({note})"),
            ms(ours.rtt),
            "-",
        );
        row(&label, ms(base.rtt), "-");
        Ok(())
    })();
    ctd.stop();
    result
}
