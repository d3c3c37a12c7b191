//! The host-side confinement of a VM's processes (`hypervisor::jail`, the
//! VMM's seccomp filters), checked from outside as an operator would:
//! /proc/<pid>/status and limits of the VM process and each helper, what
//! virtiofsd's root shows, and a VMM killed by its filter reported as such
//! with nothing of it left. Run with `make test-security`.

// An integration-test crate: every function here is test code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::tests_outside_test_module
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use libtest_mimic::Arguments;
use podvisor_hypervisor::jail::MAX_OPEN_FILES;
use podvisor_hypervisor::vmm::Vmm;
use podvisor_hypervisor::{describe_exit, Hypervisor, HypervisorError, Jail, VmSpec, VM_DIR};
use podvisor_testkit::harness::{async_trials, kvm_unusable, AsyncTest};
use podvisor_testkit::vm::{image_dir, paths};
use podvisor_testkit::{detect_accel, TestVm, VmConfig};

/// A field of /proc/<pid>/status (of one thread with `task`).
fn status(proc_dir: &Path, key: &str) -> String {
    std::fs::read_to_string(proc_dir.join("status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// A row of /proc/<pid>/limits: (soft, hard).
fn limit(pid: u32, name: &str) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let row = text.lines().find(|l| l.starts_with(name)).unwrap_or("");
    let mut w = row[name.len().min(row.len())..].split_whitespace();
    (
        w.next().unwrap_or("").to_string(),
        w.next().unwrap_or("").to_string(),
    )
}

/// The id `pid` runs as: its uid, checked to be its gid too, every one
/// of them (real, effective, saved, filesystem), with no other group.
fn jail_id(name: &str, pid: u32) -> Result<u32> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let (uids, gids) = (status(&proc_dir, "Uid:"), status(&proc_dir, "Gid:"));
    let id = uids.split_whitespace().next().unwrap_or("").to_string();
    ensure!(
        uids.split_whitespace().collect::<Vec<_>>() == [id.as_str(); 4]
            && gids.split_whitespace().collect::<Vec<_>>() == [id.as_str(); 4],
        "{name} (pid {pid}): Uid {uids:?}, Gid {gids:?}"
    );
    ensure!(
        status(&proc_dir, "Groups:").is_empty(),
        "{name} (pid {pid}): supplementary groups {:?}",
        status(&proc_dir, "Groups:")
    );
    let id: u32 = id.parse()?;
    let jail = Jail::default();
    ensure!(
        id != 0 && (jail.first_id..jail.first_id + jail.ids).contains(&id),
        "{name} (pid {pid}) runs as {id}, not an id of the jail's range"
    );
    Ok(id)
}

/// Checks what the jail gives the VM process and its vsock helper, of a
/// `memory_mib` guest: an unprivileged id of the jail's, no capabilities
/// (effective, permitted, bounding), no_new_privs, no core dumps, bounded
/// open files and file size.
fn check_confined(name: &str, pid: u32, memory_mib: u32) -> Result<()> {
    jail_id(name, pid)?;
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    for caps in ["CapInh:", "CapEff:", "CapPrm:", "CapBnd:", "CapAmb:"] {
        ensure!(
            status(&proc_dir, caps) == "0000000000000000",
            "{name} (pid {pid}): {caps} {:?}",
            status(&proc_dir, caps)
        );
    }
    ensure!(
        status(&proc_dir, "NoNewPrivs:") == "1",
        "{name} (pid {pid}): NoNewPrivs is {:?}",
        status(&proc_dir, "NoNewPrivs:")
    );
    let zero = ("0".to_string(), "0".to_string());
    ensure!(
        limit(pid, "Max core file size") == zero,
        "{name}: core dumps allowed: {:?}",
        limit(pid, "Max core file size")
    );
    let files = MAX_OPEN_FILES.to_string();
    ensure!(
        limit(pid, "Max open files") == (files.clone(), files),
        "{name}: open files {:?}",
        limit(pid, "Max open files")
    );
    let size = ((u64::from(memory_mib) << 20) + (1 << 30)).to_string();
    ensure!(
        limit(pid, "Max file size") == (size.clone(), size),
        "{name}: file size {:?}",
        limit(pid, "Max file size")
    );
    Ok(())
}

/// What the jail gives virtiofsd: no_new_privs and no core dumps (its
/// descriptors and file sizes are its own business).
fn check_file_server(pid: u32) -> Result<()> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    ensure!(
        status(&proc_dir, "NoNewPrivs:") == "1",
        "virtiofsd: NoNewPrivs is {:?}",
        status(&proc_dir, "NoNewPrivs:")
    );
    ensure!(
        limit(pid, "Max core file size") == ("0".to_string(), "0".to_string()),
        "virtiofsd: core dumps allowed: {:?}",
        limit(pid, "Max core file size")
    );
    Ok(())
}

/// What the jail's root shows `name` (pid `pid`) of the VM's directory
/// `dir`: its own subdirectory's files, at their host path, in a
/// directory its id owns, private; not the rest (the shared directory,
/// the host's logs); of the host's other files (`host_file`,
/// `/etc/passwd`): nothing; `/dev/kvm` (where the host has one) its id's.
fn check_jail_root(name: &str, pid: u32, dir: &Path, host_file: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let id = jail_id(name, pid)?;
    let vm_dir = dir.join(VM_DIR);
    ensure!(
        inside(&vm_dir.join("console.log")).exists(),
        "{name} (pid {pid}) does not see its VM's console.log at {}",
        vm_dir.display()
    );
    let meta = std::fs::metadata(&vm_dir)?;
    ensure!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777) == (id, id, 0o700),
        "{}: owner {}:{}, mode {:o}, not {id}'s alone",
        vm_dir.display(),
        meta.uid(),
        meta.gid(),
        meta.mode() & 0o7777
    );
    for hidden in [host_file, Path::new("/etc/passwd"), &dir.join("shared")] {
        ensure!(
            !inside(hidden).exists(),
            "{name} (pid {pid}) sees the host's {}",
            hidden.display()
        );
    }
    // Its own PID namespace, where it is 1 and alone: its proc lists no
    // other process (the host's, another VM's) to open or signal.
    let nspid = status(Path::new(&format!("/proc/{pid}")), "NSpid:");
    ensure!(
        nspid.split_whitespace().collect::<Vec<_>>() == [pid.to_string().as_str(), "1"],
        "{name} (pid {pid}) is not PID 1 of a namespace of its own: NSpid {nspid:?}"
    );
    // Its own IPC namespace: no System V object shared with the host.
    let ipc = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/ipc"));
    ensure!(
        ipc(&pid.to_string())? != ipc("self")?,
        "{name} (pid {pid}) shares the host's IPC namespace"
    );
    if Path::new("/dev/kvm").exists() {
        let kvm = std::fs::metadata(inside(Path::new("/dev/kvm")))?;
        ensure!(
            (kvm.uid(), kvm.mode() & 0o777) == (id, 0o600),
            "{name} (pid {pid}): its /dev/kvm is {}'s, mode {:o}",
            kvm.uid(),
            kvm.mode() & 0o777
        );
    }
    let listed: Vec<String> = std::fs::read_dir(root.join("proc"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.parse::<u32>().is_ok())
        .collect();
    ensure!(
        listed == ["1"],
        "{name} (pid {pid}) sees processes {listed:?} in its proc"
    );
    // Its mounts: the root, /usr and its proc (no sysctl written, no
    // other process's files) read-only; nothing runs from the VM's
    // directory.
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    let dir_text = vm_dir.display().to_string();
    for (at, flag) in [
        ("/", "ro"),
        ("/usr", "ro"),
        ("/proc", "ro"),
        (dir_text.as_str(), "noexec"),
    ] {
        let mount = mounts
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(at))
            .with_context(|| format!("{name} (pid {pid}) has no mount at {at}:\n{mounts}"))?;
        ensure!(
            mount
                .split(' ')
                .nth(5)
                .is_some_and(|o| o.split(',').any(|f| f == flag)),
            "{name} (pid {pid}): {at} is not {flag}: {mount}"
        );
    }
    Ok(())
}

/// The one child process of `pid`.
fn only_child(pid: u32) -> Result<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))?;
    match children.split_whitespace().collect::<Vec<_>>()[..] {
        [one] => Ok(one.parse()?),
        ref other => bail!("pid {pid} has children {other:?}, not one"),
    }
}

/// Waits up to 10 s for no process to name `dir`; the ones left if any.
async fn none_left_naming(dir: &Path) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_naming(dir);
        if left.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("left running: {left:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Processes whose command line names `dir` (the test's own VM
/// directory): what a leak check may look for.
fn processes_naming(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

/// A pod's VM on QEMU (TCG here, KVM where fast): QEMU under its seccomp
/// sandbox; virtiofsd under its own filter, its root the shared directory
/// (a host file is not there); every process confined by the jail; and
/// the agent answering through all of it.
async fn qemu_processes_are_confined() -> Result<()> {
    let cfg = VmConfig::new(detect_accel().0);
    let vm = TestVm::boot(&cfg).await?;
    let host = tempfile::Builder::new()
        .prefix("podvisor-host-")
        .tempdir()?;
    let host_file = host.path().join("host-only");
    std::fs::write(&host_file, "host")?;
    let marker = vm.dir().join("host-only");
    std::fs::write(&marker, "host")?;
    std::fs::write(vm.shared().join("shared-marker"), "shared")?;
    let checked = (|| -> Result<()> {
        let procs = vm.processes();
        let names: Vec<&str> = procs.iter().map(|p| p.0).collect();
        ensure!(
            names == ["qemu", "vhost-device-vsock", "virtiofsd"],
            "processes: {procs:?}"
        );
        // QEMU and its vsock helper share an id no other VM gets while
        // they hold it.
        let id = jail_id("qemu", procs[0].1)?;
        ensure!(jail_id("vhost-device-vsock", procs[1].1)? == id);
        let other = tempfile::tempdir()?;
        let other = Jail::default().prepare(&vmm_spec(other.path())?)?;
        let other = other.owner.as_ref().map(|o| o.id);
        ensure!(
            other.is_some() && other != Some(id),
            "another VM would get id {other:?}, the running VM's being {id}"
        );
        for &(name, pid) in &procs {
            if name == "virtiofsd" {
                check_file_server(pid)?;
            } else {
                check_confined(name, pid, cfg.memory_mib)?;
                check_jail_root(name, pid, vm.dir(), &host_file)?;
            }
            // virtiofsd forks: its parent only waits for the child, which
            // serves the guest from inside the sandbox.
            let served_by = match name {
                "virtiofsd" => only_child(pid)?,
                _ => pid,
            };
            let proc_dir = PathBuf::from(format!("/proc/{served_by}"));
            let seccomp = status(&proc_dir, "Seccomp:");
            // QEMU's -sandbox, virtiofsd's own filter, vhost-device-vsock's
            // from the jail (hypervisor/seccomp).
            ensure!(seccomp == "2", "{name}: Seccomp {seccomp:?}");
            if name == "qemu" {
                let cmdline = std::fs::read(proc_dir.join("cmdline"))?;
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                ensure!(
                    cmdline.contains(&format!(
                        "-sandbox {}",
                        podvisor_hypervisor::jail::QEMU_SANDBOX
                    )),
                    "qemu: {cmdline}"
                );
            }
            if name == "virtiofsd" {
                let root = proc_dir.join("root");
                ensure!(
                    !root.join(marker.strip_prefix("/")?).exists(),
                    "virtiofsd sees the host's {}",
                    marker.display()
                );
                ensure!(
                    std::fs::read_to_string(root.join("shared-marker"))
                        .ok()
                        .as_deref()
                        == Some("shared"),
                    "virtiofsd's root is not the shared directory"
                );
            }
        }
        Ok(())
    })();
    let dir = vm.dir().to_owned();
    let stopped = vm.power_off(Duration::from_secs(30)).await;
    checked.with_context(|| format!("in {}", dir.display()))?;
    stopped?;
    Ok(())
}

/// The spec of a VM on the in-tree VMM in `dir`: the guest image's kernel,
/// which need not get far (the checks look at the VMM process).
fn vmm_spec(dir: &Path) -> Result<VmSpec> {
    let image = image_dir();
    std::fs::create_dir_all(dir.join("shared"))?;
    Ok(VmSpec {
        kernel: image.join("kernel"),
        vmlinux: Some(image.join("vmlinux")).filter(|k| k.exists()),
        initramfs: image.join("initramfs"),
        vcpus: 2,
        memory_mib: 256,
        kernel_params: String::new(),
        dir: dir.to_owned(),
        vsock: VmSpec::vsock_in(dir),
        shared_dir: dir.join("shared"),
        net: vec![],
        netns: None,
        cpuid_hide: vec![],
        owner: None,
    })
}

/// A pod's VM on the in-tree VMM: every thread of podvisor-vmm (main,
/// signals, each vCPU) under its seccomp filter with no_new_privs, and
/// the jail's limits on it and virtiofsd.
async fn vmm_processes_are_confined() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("podvisor-sec-").tempdir()?;
    let spec = vmm_spec(dir.path())?;
    let host = tempfile::Builder::new()
        .prefix("podvisor-host-")
        .tempdir()?;
    let host_file = host.path().join("host-only");
    std::fs::write(&host_file, "host")?;
    let mut vm = Vmm::new(paths(), Jail::default()).launch(&spec).await?;
    // The vCPU threads start, and the main thread installs its filter,
    // once the VM is built.
    let vmm = vm.vm.pid;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while status(Path::new(&format!("/proc/{vmm}")), "Seccomp:") != "2"
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let checked = (|| -> Result<()> {
        for (name, pid) in vm.processes() {
            if name == "virtiofsd" {
                check_file_server(pid)?;
                continue;
            }
            check_confined(name, pid, spec.memory_mib)?;
            check_jail_root(name, pid, dir.path(), &host_file)?;
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))?;
            let mut seen = Vec::new();
            for t in tasks {
                let t = t?.path();
                let comm = std::fs::read_to_string(t.join("comm"))?.trim().to_string();
                // KVM's own kernel workers run in the process too.
                if comm.starts_with("kvm-") {
                    continue;
                }
                let (seccomp, nnp) = (status(&t, "Seccomp:"), status(&t, "NoNewPrivs:"));
                ensure!(
                    seccomp == "2" && nnp == "1",
                    "{name} thread {comm}: Seccomp {seccomp:?}, NoNewPrivs {nnp:?}"
                );
                seen.push(comm);
            }
            if name == "podvisor-vmm" {
                seen.sort();
                ensure!(
                    seen == ["podvisor-vmm", "signals", "vcpu0", "vcpu1"],
                    "VMM threads: {seen:?}"
                );
            }
        }
        Ok(())
    })();
    vm.stop(Duration::ZERO).await;
    checked?;
    none_left_naming(dir.path()).await
}

/// A VMM thread that makes a call outside its filter (the test build's
/// hook, `PODVISOR_VMM_TEST_SIGSYS`): the VMM dies of SIGSYS, the
/// hypervisor layer says so, and nothing of the VM is left running.
async fn vmm_killed_by_its_filter_is_reported() -> Result<()> {
    let Some(hooked) = std::env::var_os("PODVISOR_VMM_HOOKS") else {
        bail!("PODVISOR_VMM_HOOKS (podvisor-vmm built with --features test-hooks) is not set: run `make test-security`");
    };
    let dir = tempfile::Builder::new()
        .prefix("podvisor-sigsys-")
        .tempdir()?;
    let spec = vmm_spec(dir.path())?;
    let mut p = paths();
    p.vmm = PathBuf::from(hooked);
    let why = match Vmm::new(p, Jail::default()).launch(&spec).await {
        Ok(mut vm) => {
            let st = tokio::time::timeout(Duration::from_secs(30), vm.vm.wait())
                .await
                .context("the VMM outlived its stray call")?
                .context("no exit status")?;
            vm.stop(Duration::ZERO).await;
            describe_exit(st)
        }
        // It may die before its socket is seen.
        Err(HypervisorError::EarlyExit { status, .. }) => status,
        Err(e) => return Err(e.into()),
    };
    ensure!(
        why.contains("SIGSYS") && why.contains("seccomp"),
        "reported as: {why}\nvmm.log:\n{}",
        std::fs::read_to_string(dir.path().join("vmm.log")).unwrap_or_default()
    );
    let log = std::fs::read_to_string(dir.path().join("vmm.log")).unwrap_or_default();
    ensure!(log.contains("calls ptrace"), "the hook did not run:\n{log}");
    none_left_naming(dir.path()).await
}

/// The vsock helper's filter is installed and kills: coreutils' mkdir,
/// started as vhost-device-vsock would be (jailed, then the filter),
/// makes calls the rules lack (mkdir, and libselinux's statfs at its
/// start): it dies of SIGSYS and the directory is not there, where the
/// same start without the filter makes it.
async fn vsock_helper_filter_kills_a_call_outside_it() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("podvisor-sec-").tempdir()?;
    let spec = Jail::default().prepare(&vmm_spec(dir.path())?)?;
    let made = spec.vm_dir().join("made-by-the-helper");
    let log = dir.path().join("mkdir.log");
    let mut cmd = tokio::process::Command::new("/usr/bin/mkdir");
    cmd.arg(&made);
    let helper = Jail::default()
        .confine_vsock_helper(&mut cmd, &spec)?
        .spawn("mkdir", &mut cmd, &log)
        .await?;
    let st = helper.wait().await.context("no exit status")?;
    ensure!(
        std::os::unix::process::ExitStatusExt::signal(&st) == Some(libc::SIGSYS),
        "mkdir under vhost-device-vsock's filter: {}",
        describe_exit(st)
    );
    ensure!(!made.exists(), "{} was made", made.display());
    // The same program without the filter makes it (the jail alone lets
    // it: the directory is the VM's, writable), and its exit status comes
    // out of its PID namespace: 0, then 1 for a directory that exists.
    for expected in [0, 1] {
        let mut cmd = tokio::process::Command::new("/usr/bin/mkdir");
        cmd.arg(&made);
        let jailed = Jail::default()
            .confine(&mut cmd, &spec)?
            .spawn("mkdir", &mut cmd, &log)
            .await?;
        let st = jailed.wait().await.context("no exit status")?;
        ensure!(
            st.code() == Some(expected) && made.is_dir(),
            "mkdir jailed, unfiltered: {st}, expected exit status {expected}"
        );
    }
    Ok(())
}

/// A VM directory another VM takes over (a pool VM's, when the pod that
/// claimed it boots another VM instead) is given whole to the new VM's
/// id: what the old VM left there (its console, which QEMU reopens) is the
/// new id's, and two VMs prepared at once hold different ids.
async fn a_vm_directory_taken_over_is_given_to_the_new_id() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::Builder::new().prefix("podvisor-sec-").tempdir()?;
    let first = Jail::default().prepare(&vmm_spec(dir.path())?)?;
    let old = first.owner.as_ref().map(|o| o.id).context("no id leased")?;
    std::fs::write(first.console(), "the old VM's console")?;
    std::os::unix::fs::lchown(first.console(), Some(old), Some(old))?;
    let taken = Jail::default().prepare(&VmSpec {
        owner: None,
        ..first.clone()
    })?;
    let new = taken.owner.as_ref().map(|o| o.id).context("no id leased")?;
    ensure!(new != old, "both VMs got id {old}");
    for p in [taken.vm_dir(), taken.console()] {
        let m = std::fs::metadata(&p)?;
        ensure!(
            (m.uid(), m.gid()) == (new, new),
            "{} is {}:{}, not the new VM's {new}",
            p.display(),
            m.uid(),
            m.gid()
        );
    }
    // A third, while the second holds its id, gets another.
    let third = Jail::default().prepare(&vmm_spec(dir.path())?)?;
    ensure!(
        third.owner.as_ref().map(|o| o.id) != Some(new),
        "id {new} given twice"
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    // The hook fires in the hooked binary only; set before any thread.
    std::env::set_var("PODVISOR_VMM_TEST_SIGSYS", "vcpu");
    let args = Arguments::from_args();
    let no_kvm = kvm_unusable();
    if let Some(why) = &no_kvm {
        eprintln!("SKIPPING the in-tree VMM's checks: {why}");
    }
    let tests: Vec<(&str, AsyncTest, bool)> = vec![
        (
            "qemu_vm_processes_are_confined",
            || Box::pin(qemu_processes_are_confined()),
            false,
        ),
        (
            "a_vm_directory_taken_over_is_given_to_the_new_id",
            || Box::pin(a_vm_directory_taken_over_is_given_to_the_new_id()),
            false,
        ),
        (
            "vsock_helper_filter_kills_a_call_outside_it",
            || Box::pin(vsock_helper_filter_kills_a_call_outside_it()),
            false,
        ),
        (
            "vmm_processes_are_confined",
            || Box::pin(vmm_processes_are_confined()),
            no_kvm.is_some(),
        ),
        (
            "vmm_killed_by_its_seccomp_filter_is_reported_and_leaves_nothing",
            || Box::pin(vmm_killed_by_its_filter_is_reported()),
            no_kvm.is_some(),
        ),
    ];
    libtest_mimic::run(&args, async_trials(tests).expect("tokio runtime")).exit_code()
}
