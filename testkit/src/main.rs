//! `podvisor-testkit demo|bench`: boots the guest image under QEMU.
//!
//! - `demo`: runs one container in a fresh VM and shows that it ran in the
//!   guest (kernel release, boot id) rather than on the host.
//! - `bench`: prints the guest's figures (boot to agent, agent RSS, image
//!   size, container start), measured here, with the accelerator named.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use podvisor_protocol::api;
use podvisor_testkit::spec::container;
use podvisor_testkit::vm::{image_dir, manifest};
use podvisor_testkit::{ctx, detect_accel, Accel, StdioReq, TestVm, VmConfig};

const BOOTS: usize = 3;
const CONTAINER_STARTS: usize = 10;

fn main() -> Result<()> {
    let cmd = std::env::args().nth(1).unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cmd.as_str() {
        "demo" => rt.block_on(demo()),
        "bench" => rt.block_on(bench()),
        "image" => {
            let usage = "usage: podvisor-testkit image OUT.tar NAME [CMD...]";
            let args: Vec<String> = std::env::args().skip(2).collect();
            let (out, name) = match (args.first(), args.get(1)) {
                (Some(o), Some(n)) => (o, n),
                _ => bail!(usage),
            };
            let cmd: Vec<&str> = match &args[2..] {
                [] => vec!["sh"],
                rest => rest.iter().map(String::as_str).collect(),
            };
            podvisor_testkit::image::busybox_archive(std::path::Path::new(out), name, &cmd)
        }
        _ => bail!("usage: podvisor-testkit demo|bench|image"),
    }
}

async fn demo() -> Result<()> {
    let (accel, why) = detect_accel();
    println!(
        "booting the guest image from {} (QEMU, {}: {why})",
        image_dir().display(),
        accel.name()
    );
    let vm = TestVm::boot(&VmConfig::new(accel)).await?;
    println!("agent answered after {:.2?}", vm.boot_time);
    let script = "echo \"hello from $(hostname), pid $$\"; echo \"kernel $(uname -r)\"; \
                  echo \"boot id $(cat /proc/sys/kernel/random/boot_id)\"";
    let out = vm.run("demo", &container(&["sh", "-c", script])).await?;
    println!("--- container output (exit status {})", out.status);
    print!("{}", out.stdout);
    println!("--- host");
    println!(
        "kernel {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim()
    );
    println!(
        "boot id {}",
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?.trim()
    );
    vm.agent
        .destroy_sandbox(ctx(), &api::DestroySandboxRequest::new())
        .await?;
    vm.shutdown().await;
    Ok(())
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

async fn bench() -> Result<()> {
    let (accel, why) = detect_accel();
    let cfg = VmConfig::new(accel);
    println!(
        "podvisor guest figures: QEMU -M q35, accel {} ({why})",
        accel.name()
    );
    println!("kernel {}", manifest("kernel_release")?);

    let mut boots = Vec::new();
    let mut ready_ms = Vec::new();
    let mut rss_idle = 0;
    for _ in 0..BOOTS {
        let vm = TestVm::boot(&cfg).await?;
        boots.push(vm.boot_time);
        let d = vm
            .agent
            .get_guest_details(ctx(), &api::GuestDetailsRequest::new())
            .await?;
        ready_ms.push(Duration::from_millis(d.agent_ready_ms));
        rss_idle = d.agent_rss_bytes;
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

    let image = image_dir();
    let size = |f: &str| -> Result<u64> {
        Ok(std::fs::metadata(image.join(f))
            .with_context(|| format!("{f} in {}", image.display()))?
            .len())
    };
    let accel_note = match accel {
        Accel::Kvm => "KVM",
        Accel::Tcg => "TCG, software emulation",
    };
    println!();
    println!("{:<64} {:>11}  target (DESIGN.md)", "figure", "measured");
    let row = |name: &str, value: String, target: &str| {
        println!("{name:<64} {value:>11}  {target}");
    };
    row(
        &format!("QEMU start to agent Check, median of {BOOTS} ({accel_note})"),
        ms(median(boots.clone())),
        "-",
    );
    row(
        &format!("guest kernel start to agent serving, median ({accel_note})"),
        ms(median(ready_ms)),
        "<= 100 ms on real KVM",
    );
    row(
        &format!("container create+start, median of {CONTAINER_STARTS} ({accel_note})"),
        ms(median(starts)),
        "<= 30 ms on real KVM",
    );
    row("agent RSS in the guest, idle", mib(rss_idle), "-");
    row(
        &format!("agent RSS after {CONTAINER_STARTS} containers"),
        mib(rss_busy),
        "-",
    );
    row("initramfs size (zstd)", mib(size("initramfs")?), "-");
    row(
        "kernel size (Debian cloud bzImage)",
        mib(size("kernel")?),
        "-",
    );
    let each: Vec<String> = boots.into_iter().map(ms).collect();
    println!("each boot: {}", each.join(", "));
    Ok(())
}
