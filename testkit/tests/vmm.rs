//! The podvisor guest image on the in-tree VMM: the Debian kernel boots
//! through the VMM's own boot path, finds its virtio-mmio devices in the
//! DSDT, the agent answers over the VMM's hybrid vsock, containers run on
//! virtio-fs, and DestroySandbox powers the VM off through ACPI.
//!
//! This needs KVM that runs guest code at hardware speed. Where the probe
//! finds none (a nested /dev/kvm that emulates, as on podvisor's CI), those
//! tests are reported as ignored and the probe's verdict is printed. The
//! probe itself, as the shim asks it (the `podvisor-vmm --probe` binary,
//! cached per host boot), is checked everywhere. Run with `make test-vmm`.

// An integration-test crate: every function here is test code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::tests_outside_test_module
)]

use std::time::Duration;

use anyhow::{ensure, Result};
use libtest_mimic::{Arguments, Trial};
use podvisor_protocol::api;
use podvisor_testkit::harness::{async_trials, AsyncTest};
use podvisor_testkit::spec::container;
use podvisor_testkit::{ctx, vm::manifest, vm::vmm_binary, Accel, TestVm, VmConfig};

fn cfg() -> VmConfig {
    let mut c = VmConfig::new(Accel::Kvm);
    c.vmm = true;
    c.vcpus = 2;
    c.memory_mib = 512;
    c.boot_timeout = Duration::from_secs(30);
    c
}

fn host(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

async fn boots_and_runs_a_container() -> Result<()> {
    let vm = TestVm::boot(&cfg()).await?;
    eprintln!("vmm: VMM start to agent ready in {:?}", vm.boot_time);
    let release = vm.run("uname", &container(&["uname", "-r"])).await?;
    let want = manifest("kernel_release")?;
    ensure!(
        release.stdout.trim() == want,
        "uname -r {:?}, image has {want}",
        release.stdout
    );
    ensure!(
        release.stdout.trim() != host("/proc/sys/kernel/osrelease"),
        "uname is the host's"
    );
    let d = vm
        .agent
        .get_guest_details(ctx(), &api::GuestDetailsRequest::new())
        .await?;
    ensure!(
        !d.boot_id.is_empty() && d.boot_id != host("/proc/sys/kernel/random/boot_id"),
        "guest boot id {:?}",
        d.boot_id
    );
    let cpus = vm.run("nproc", &container(&["nproc"])).await?;
    ensure!(
        cpus.stdout.trim() == "2",
        "nproc {:?}: both vCPUs must come up",
        cpus.stdout
    );
    let mem = vm
        .run("mem", &container(&["grep", "MemTotal", "/proc/meminfo"]))
        .await?;
    let kib: u64 = mem
        .stdout
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    ensure!(
        (400 << 10..=512 << 10).contains(&kib),
        "MemTotal {kib} kB for a 512 MiB guest"
    );
    vm.shutdown().await;
    Ok(())
}

/// Exit status 0 after DestroySandbox: the guest powered off through the
/// VMM's ACPI sleep register (a reboot would be 3, a failure 2).
async fn destroy_sandbox_powers_off() -> Result<()> {
    let vm = TestVm::boot(&cfg()).await?;
    let status = vm.power_off(Duration::from_secs(30)).await?;
    ensure!(status.code() == Some(0), "podvisor-vmm exited {status}");
    Ok(())
}

/// The verdict the shim gets (`podvisor-vmm --probe`, out of process) is
/// the in-process probe's, and the second ask reads the cache this host's
/// boot id, kernel and /dev/kvm key.
fn probe_out_of_process_is_cached(in_process: &podvisor_vmm::probe::Verdict) -> Result<()> {
    use podvisor_hypervisor::probe::{self, HostKey};
    let root = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let first = rt.block_on(probe::verdict(&vmm_binary(), root.path()));
    let kind = |v: &podvisor_vmm::probe::Verdict| std::mem::discriminant(v);
    ensure!(
        kind(&first) == kind(in_process),
        "out of process: {first}; in process: {in_process}"
    );
    if matches!(first, podvisor_vmm::probe::Verdict::Unavailable(_)) {
        return Ok(());
    }
    let cache = std::fs::read_to_string(root.path().join("kvm-probe.json"))?;
    let key = HostKey::current().map_err(anyhow::Error::msg)?;
    ensure!(
        cache.contains(&key.boot_id) && cache.contains(&key.kvm_device),
        "cache {cache} lacks this host's key {key:?}"
    );
    let again = rt.block_on(probe::verdict(
        std::path::Path::new("/nonexistent/podvisor-vmm"),
        root.path(),
    ));
    ensure!(again == first, "second ask did not read the cache: {again}");
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let verdict = podvisor_vmm::probe::probe();
    let skip = !verdict.is_fast();
    if skip {
        eprintln!("SKIPPING the Linux boot tests on the in-tree VMM: {verdict}");
    } else if !vmm_binary().exists() {
        eprintln!(
            "{} missing: build it with `cargo build -p podvisor-vmm`",
            vmm_binary().display()
        );
    }
    let tests: Vec<(&str, AsyncTest, bool)> = vec![
        (
            "linux_boots_on_the_vmm_and_runs_a_container",
            || Box::pin(boots_and_runs_a_container()),
            skip,
        ),
        (
            "destroy_sandbox_powers_the_vmm_off",
            || Box::pin(destroy_sandbox_powers_off()),
            skip,
        ),
    ];
    let mut trials = async_trials(tests).expect("tokio runtime");
    trials.push(Trial::test(
        "probe_out_of_process_agrees_and_is_cached",
        move || probe_out_of_process_is_cached(&verdict).map_err(|e| format!("{e:#}").into()),
    ));
    libtest_mimic::run(&args, trials).exit();
}
