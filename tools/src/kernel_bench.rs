//! The guest kernel's figures: podvisor's own kernel beside Debian's cloud
//! kernel on the same machine and backend (boot to agent, `ctr run` to the
//! first output, sizes, guest memory left), the cold build's time, and
//! podvisor-vmm booting the test-only variant to `Run /init` where KVM
//! emulates guest code.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use podvisor_protocol::api;
use podvisor_testkit::console_boot;
use podvisor_testkit::containerd::{Containerd, Release};
use podvisor_testkit::spec::container;
use podvisor_testkit::{ctx, Accel, TestVm, VmConfig};

use crate::{ctr_first_output, median, mib, ms, row, BOOTS, CTR_RUNS};

/// The two images `make bench` builds: ours, then Debian's.
fn images() -> [(&'static str, PathBuf); 2] {
    let build = Path::new(env!("CARGO_MANIFEST_DIR")).join("../build");
    [
        ("podvisor", build.join("guest")),
        ("Debian", build.join("guest-debian")),
    ]
}

struct Figures {
    ready: Duration,
    first_output: Duration,
    mem_available_kib: u64,
    kernel: u64,
    initramfs: u64,
}

async fn measure(image: &Path, accel: Accel) -> Result<Figures> {
    let mut cfg = VmConfig::new(accel);
    cfg.image = image.to_owned();
    let mut ready = Vec::new();
    let mut mem_available_kib = 0;
    for _ in 0..BOOTS {
        let vm = TestVm::boot(&cfg).await?;
        let d = vm
            .agent
            .get_guest_details(ctx(), &api::GuestDetailsRequest::new())
            .await?;
        ready.push(Duration::from_millis(d.agent_ready_ms));
        let mem = vm
            .run(
                "mem",
                &container(&["grep", "MemAvailable", "/proc/meminfo"]),
            )
            .await?;
        mem_available_kib = mem
            .stdout
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("MemAvailable in {:?}", mem.stdout))?;
        vm.shutdown().await;
    }
    let size = |f: &str| -> Result<u64> {
        let p = image.join(f);
        Ok(std::fs::metadata(&p)
            .with_context(|| p.display().to_string())?
            .len())
    };
    Ok(Figures {
        ready: median(ready),
        first_output: first_output(image)?,
        mem_available_kib,
        kernel: size("kernel")?,
        initramfs: size("initramfs")?,
    })
}

/// `ctr run` to the first output on a containerd whose podvisor boots
/// `image`.
fn first_output(image: &Path) -> Result<Duration> {
    let ctd = Containerd::start_with_image(Release::V2, image)?;
    let result = ctr_first_output(&ctd);
    ctd.stop();
    result
}

pub async fn figures(accel: Accel, note: &str) -> Result<()> {
    let mut measured = Vec::new();
    for (name, image) in images() {
        if !image.join("kernel").exists() {
            println!(
                "  {name} kernel: no image in {} (make bench builds it)",
                image.display()
            );
            continue;
        }
        measured.push((name, measure(&image, accel).await?));
    }
    for (name, f) in &measured {
        row(
            &format!("guest kernel start to agent serving, {name} kernel ({note})"),
            ms(f.ready),
            "<= 1 s here (ours)",
        );
        row(
            &format!("ctr run to first output, median of {CTR_RUNS}, {name} kernel ({note})"),
            ms(f.first_output),
            "-",
        );
        row(
            &format!("guest MemAvailable after boot (512 MiB), {name} kernel"),
            mib(f.mem_available_kib << 10),
            "-",
        );
        row(
            &format!("kernel + initramfs, {name} kernel"),
            format!("{} + {}", mib(f.kernel), mib(f.initramfs)),
            "-",
        );
    }
    let kdir = console_boot::kernel_dir();
    match std::fs::read_to_string(kdir.join("build-seconds")) {
        Ok(s) => row(
            "guest kernel cold build (both variants, this machine's cores)",
            format!("{} s", s.trim()),
            "-",
        ),
        Err(e) => println!("  no guest kernel build time in {}: {e}", kdir.display()),
    }
    emulated_boot().await
}

/// podvisor-vmm to `Run /init` under a KVM that emulates guest code (the
/// only place this figure means something apart from a real-KVM boot).
async fn emulated_boot() -> Result<()> {
    let verdict = podvisor_hypervisor::probe::verdict(
        &podvisor_testkit::vm::vmm_binary(),
        Path::new(podvisor_names::paths::STATE_ROOT),
    )
    .await;
    if verdict.is_fast() || matches!(verdict, podvisor_hypervisor::Verdict::Unavailable(_)) {
        println!("  podvisor-vmm to `Run /init` under emulating KVM: not here ({verdict})");
        return Ok(());
    }
    let boot = console_boot::boot(Duration::from_secs(600)).await?;
    match boot.run_init {
        Some(t) => row(
            "podvisor-vmm start to `Run /init`, 2 vCPUs (emulating KVM)",
            format!("{:.1} s", t.as_secs_f64()),
            "-",
        ),
        None => bail!("no `Run /init` on the console\n{}", boot.tails()),
    }
    snapshot_figures(&boot).await
}

/// The same boot saved at [`console_boot::SNAPSHOT_AT`] and resumed by a
/// new VMM: what a save costs, and how soon a restored guest runs beside
/// how soon a booting one prints.
async fn snapshot_figures(cold: &console_boot::ConsoleBoot) -> Result<()> {
    let snap =
        console_boot::snapshot_boot(console_boot::SNAPSHOT_AT, Duration::from_secs(600)).await?;
    let pages = snap.saved["memory_pages"].as_u64().unwrap_or(0);
    row(
        "podvisor-vmm snapshot of a booting 256 MiB Linux guest, 2 vCPUs (vCPUs paused)",
        format!(
            "{:.0} ms, {:.1} MiB of memory",
            snap.saved["ms"].as_f64().unwrap_or(0.0),
            (pages * 4096) as f64 / f64::from(1u32 << 20)
        ),
        "-",
    );
    let restore_ms = snap
        .restored
        .vmm_log
        .lines()
        .find_map(|l| l.split("restored a snapshot in ").nth(1))
        .and_then(|r| r.trim_end_matches(" ms").trim().parse::<f64>().ok());
    row(
        "podvisor-vmm restore of it: VMM build from the snapshot",
        restore_ms.map_or("not logged".into(), |m| format!("{m:.1} ms")),
        "-",
    );
    let ms = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{} ms", d.as_millis()));
    row(
        "podvisor-vmm start to the guest's first console output: cold boot / restored",
        format!(
            "{} / {}",
            ms(cold.first_output),
            ms(snap.restored.first_output)
        ),
        "-",
    );
    Ok(())
}
