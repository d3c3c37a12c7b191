//! podvisor's own guest kernel on podvisor-vmm, read from its console: how
//! a real Linux sees the VMM's platform (E820, the MP table, ACPI tables
//! and the DSDT's virtio-mmio devices, SMP bring-up, every virtio device),
//! and the same kernel under QEMU TCG up to the agent, so both backends
//! share one kernel. Run with `make test-vmm-linux`.
//!
//! The kernel is the `emulated` variant `make guest-kernel` builds beside
//! the image's (guest/kernel/): it runs on a /dev/kvm that emulates guest
//! kernel code, as on podvisor's CI, which also cannot run guest user space
//! (the agent's first system call faults, init dies, the kernel panics and
//! resets the VM). So the console is the witness: the test reads Linux's
//! view up to `Run /init`, then checks the VM ended in the reset the panic
//! asked for, with the VMM's matching exit status. The same boot, saved
//! half-way and resumed by another VMM process, proves snapshots. Where KVM runs guest code
//! at hardware speed, `make test-vmm`'s full boot (the agent answering,
//! containers) runs instead and this boot is skipped; without /dev/kvm it
//! is skipped too; each with the reason.

// An integration-test crate: every function here is test code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::tests_outside_test_module
)]

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use libtest_mimic::Arguments;
use podvisor_testkit::console_boot::{self, emulated, DISK_BYTES, MAC, RUN_INIT, SNAPSHOT_AT};
use podvisor_testkit::harness::{async_trials, AsyncTest};
use podvisor_testkit::spec::container;
use podvisor_testkit::{Accel, TestVm, VmConfig};
use podvisor_vmm::probe::Verdict;

/// From VMM start to its exit: minutes on an emulating KVM (ext4's and
/// jbd2's init alone take 20 s there), more under load.
const BOOT_LIMIT: Duration = Duration::from_secs(600);

/// The line of `console` holding `needle`, or an error naming it.
fn line_with<'a>(console: &'a str, needle: &str) -> Result<&'a str> {
    console
        .lines()
        .find(|l| l.contains(needle))
        .with_context(|| format!("console lacks {needle:?}"))
}

/// `first` appears on the console before `second`.
fn before(console: &str, first: &str, second: &str) -> Result<()> {
    let a = console
        .find(first)
        .context(format!("console lacks {first:?}"))?;
    let b = console
        .find(second)
        .context(format!("console lacks {second:?}"))?;
    ensure!(a < b, "{first:?} comes after {second:?}");
    Ok(())
}

/// Each of `drivers` bound a virtio device (the emulated kernel's
/// "<driver> virtioN: podvisor: bound" line).
fn bound(console: &str, drivers: &[&str]) -> Result<()> {
    for driver in drivers {
        let prefix = format!("{driver} virtio");
        ensure!(
            console
                .lines()
                .any(|l| l.starts_with(&prefix) && l.contains("podvisor: bound")),
            "{driver} did not bind: no \"{prefix}N: podvisor: bound\" line"
        );
    }
    Ok(())
}

/// The boot's end, once the devices are bound: eth0 with its MAC, the
/// crng seeded by virtio-rng (neither the CPU nor the boot loader is
/// trusted on this boot) before `Run /init`; init cannot run here, so the
/// kernel panics and resets (panic=-1, reboot=k), and the VMM's status
/// for a reset is 3.
fn ends_as_designed(c: &str, status: std::process::ExitStatus) -> Result<()> {
    let eth0 = line_with(c, "device=eth0")?;
    ensure!(eth0.contains(&format!("hwaddr={MAC}")), "eth0: {eth0}");
    before(c, "virtio_rng virtio", "random: crng init done")?;
    before(c, "random: crng init done", RUN_INIT)?;
    line_with(c, "Kernel panic - not syncing")?;
    ensure!(
        status.code() == Some(3),
        "podvisor-vmm exited {status}; a reset is 3"
    );
    Ok(())
}

async fn linux_sees_the_vmm_platform() -> Result<()> {
    let boot = console_boot::boot(BOOT_LIMIT).await?;
    eprintln!(
        "vmm-linux: VMM start to `{RUN_INIT}` in {:?}; VMM {}",
        boot.run_init, boot.status
    );
    let c = &boot.console;
    let checks = || -> Result<()> {
        // The platform: memory map, MP table, ACPI tables and
        // interpreter, CPUs.
        line_with(c, "BIOS-e820: [mem 0x0000000000000000-")?;
        line_with(c, "found SMP MP-table at")?;
        for table in ["RSDP", "XSDT", "FACP", "DSDT", "APIC"] {
            line_with(c, &format!("ACPI: {table} 0x"))?;
        }
        line_with(c, "ACPI: Interpreter enabled")?;
        line_with(c, "smp: Brought up 1 node, 2 CPUs")?;
        // Each virtio device, found through the DSDT and bound.
        bound(
            c,
            &[
                "vmw_vsock_virtio_transport",
                "virtiofs",
                "virtio_blk",
                "virtio_net",
                "virtio_rng",
            ],
        )?;
        line_with(c, "podvisor: tag <podvisor>")?;
        line_with(
            c,
            &format!("[vda] {} 512-byte logical blocks", DISK_BYTES / 512),
        )?;
        ends_as_designed(c, boot.status)?;
        ensure!(boot.helpers_gone, "virtiofsd outlived the VM");
        Ok(())
    };
    checks().map_err(|e| anyhow::anyhow!("{e:#}\n{}", boot.tails()))
}

/// The same boot (without virtio-fs, which cannot be saved) paused and
/// saved once both vCPUs run Linux; a new VMM process resumes the
/// snapshot and Linux goes on from there: its timers, interrupt
/// controllers and clock work (the boot would stall without them), it
/// probes and binds every device, virtio-rng seeds it, and it reaches
/// `Run /init`, never printing again what it printed before.
async fn linux_resumes_from_a_snapshot_taken_mid_boot() -> Result<()> {
    let boot = console_boot::snapshot_boot(SNAPSHOT_AT, BOOT_LIMIT).await?;
    let r = &boot.restored;
    eprintln!(
        "vmm-linux: snapshot at {SNAPSHOT_AT:?}: {}; restored VMM start to `{RUN_INIT}` in {:?}, VMM {}",
        boot.saved, r.run_init, r.status
    );
    let c = &r.console;
    let checks = || -> Result<()> {
        line_with(&boot.before, "BIOS-e820: [mem 0x0000000000000000-")?;
        ensure!(
            !c.contains("BIOS-e820") && !c.contains(SNAPSHOT_AT),
            "the restored guest booted again instead of going on"
        );
        bound(
            c,
            &[
                "vmw_vsock_virtio_transport",
                "virtio_blk",
                "virtio_net",
                "virtio_rng",
            ],
        )?;
        ends_as_designed(c, r.status)?;
        line_with(&r.vmm_log, "restored a snapshot in")?;
        Ok(())
    };
    checks().map_err(|e| {
        anyhow::anyhow!(
            "{e:#}\nbefore the snapshot:\n{}\nrestored: {}",
            boot.before
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n"),
            r.tails()
        )
    })
}

/// The emulated variant's bzImage under QEMU TCG: the agent answers and a
/// container runs on that kernel.
async fn same_kernel_reaches_the_agent_under_tcg() -> Result<()> {
    let mut cfg = VmConfig::new(Accel::Tcg);
    cfg.kernel = Some(emulated("bzImage")?);
    cfg.kernel_params = "loglevel=7".into();
    let vm = TestVm::boot(&cfg).await?;
    eprintln!(
        "vmm-linux: QEMU TCG start to agent ready in {:?}",
        vm.boot_time
    );
    let release = std::fs::read_to_string(emulated("release")?)?;
    let out = vm.run("uname", &container(&["uname", "-r"])).await?;
    ensure!(
        out.stdout.trim() == release.trim(),
        "uname -r {:?}, the emulated kernel is {release:?}",
        out.stdout
    );
    line_with(&vm.console(), "podvisor: tag <podvisor>")
        .context("the console is not the emulated kernel's")?;
    vm.shutdown().await;
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let verdict = podvisor_vmm::probe::probe();
    let skip = match &verdict {
        Verdict::Unavailable(_) => Some(format!("no usable /dev/kvm: {verdict}")),
        v if v.is_fast() => Some(format!(
            "KVM runs guest code at hardware speed ({verdict}): make test-vmm boots the full image there"
        )),
        _ => None,
    };
    if let Some(why) = &skip {
        eprintln!(
            "SKIPPING linux_sees_the_vmm_platform, linux_resumes_from_a_snapshot_taken_mid_boot: {why}"
        );
    }
    let tests: Vec<(&str, AsyncTest, bool)> = vec![
        (
            "linux_sees_the_vmm_platform",
            || Box::pin(linux_sees_the_vmm_platform()),
            skip.is_some(),
        ),
        (
            "linux_resumes_from_a_snapshot_taken_mid_boot",
            || Box::pin(linux_resumes_from_a_snapshot_taken_mid_boot()),
            skip.is_some(),
        ),
        (
            "same_kernel_reaches_the_agent_under_tcg",
            || Box::pin(same_kernel_reaches_the_agent_under_tcg()),
            false,
        ),
    ];
    libtest_mimic::run(&args, async_trials(tests).expect("tokio runtime")).exit();
}
