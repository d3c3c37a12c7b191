//! The shim under real containerd (Debian's 1.6, then 2.x), as `ctr` and
//! kubelet (via crictl) drive it. One private containerd serves every
//! test; each test ends by checking that nothing of its pods is left on the
//! host (what was there before the suite started, another VM's, is not
//! counted).
//! Run with `make test-containerd` (`make test-network`, `make test-warm`
//! and `make soak` run their own groups of it).

// An integration-test crate: every function here is test code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::tests_outside_test_module
)]

use std::borrow::BorrowMut;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use libtest_mimic::{Arguments, Failed, Trial};
use podvisor_testkit::containerd::{text, Containerd, Release};
use podvisor_testkit::vm::manifest;

#[path = "containerd/soak.rs"]
mod soak;

type TestFn = fn(&Containerd) -> Result<()>;

fn main() {
    let mut args = Arguments::from_args();
    // One containerd, one VM at a time: these machines have two cores.
    args.test_threads = Some(1);
    let tests: Vec<(&str, TestFn)> = vec![
        (
            "ctr_run_prints_guest_kernel_and_exit_code",
            ctr_run_prints_guest_kernel_and_exit_code,
        ),
        ("stdin_is_piped_through", stdin_is_piped_through),
        ("tty_interactive_session", tty_interactive_session),
        ("exec_kill_ps_metrics_delete", exec_kill_ps_metrics_delete),
        (
            "cri_pod_runs_two_containers_in_one_vm",
            cri_pod_runs_two_containers_in_one_vm,
        ),
        (
            "cri_pod_runs_in_its_cgroup_and_removes_it",
            cri_pod_runs_in_its_cgroup_and_removes_it,
        ),
        (
            "annotations_are_allow_listed_and_checked",
            annotations_are_allow_listed_and_checked,
        ),
        (
            "specs_a_vm_cannot_honour_are_refused_by_name",
            specs_a_vm_cannot_honour_are_refused_by_name,
        ),
        (
            "vm_killed_under_a_running_task",
            vm_killed_under_a_running_task,
        ),
        (
            "helper_killed_under_a_running_task",
            helper_killed_under_a_running_task,
        ),
        (
            "a_guest_panic_ends_the_task_as_a_dead_vm",
            a_guest_panic_ends_the_task_as_a_dead_vm,
        ),
        (
            "crashed_shim_is_cleaned_up_by_delete",
            crashed_shim_is_cleaned_up_by_delete,
        ),
        (
            "vmm_killed_by_its_seccomp_filter_fails_the_pod",
            vmm_killed_by_its_seccomp_filter_fails_the_pod,
        ),
        (
            "a_full_volume_gives_enospc_and_the_pod_carries_on",
            a_full_volume_gives_enospc_and_the_pod_carries_on,
        ),
        (
            "a_memory_hog_is_oom_killed_and_the_pod_carries_on",
            a_memory_hog_is_oom_killed_and_the_pod_carries_on,
        ),
        (
            "an_exited_container_lets_go_of_its_share_when_removed",
            an_exited_container_lets_go_of_its_share_when_removed,
        ),
        (
            "a_fork_bomb_meets_the_task_cap_and_the_agent_keeps_serving",
            a_fork_bomb_meets_the_task_cap_and_the_agent_keeps_serving,
        ),
        (
            "pods_run_on_across_a_containerd_restart",
            pods_run_on_across_a_containerd_restart,
        ),
        (
            "state_of_another_boot_is_removed_killing_nothing",
            state_of_another_boot_is_removed_killing_nothing,
        ),
        (
            "twenty_create_delete_cycles_leave_nothing",
            twenty_create_delete_cycles_leave_nothing,
        ),
    ];
    // `make test-network` runs these, on containerd 2.x only.
    let network: Vec<(&str, TestFn)> = vec![
        (
            "network_pod_serves_http_reaches_host_and_peer",
            network_pod_serves_http_reaches_host_and_peer,
        ),
        (
            "network_port_forward_reaches_the_guest",
            network_port_forward_reaches_the_guest,
        ),
        (
            "network_ten_pod_cycles_leave_nothing",
            network_ten_pod_cycles_leave_nothing,
        ),
        (
            "network_ten_pods_started_at_once_are_distinct",
            network_ten_pods_started_at_once_are_distinct,
        ),
    ];
    // `make test-warm` runs these, on containerd 2.x only.
    let warm: Vec<(&str, TestFn)> = vec![
        (
            "warm_clones_are_distinct_guests",
            warm_clones_are_distinct_guests,
        ),
        (
            "warm_changed_or_damaged_templates",
            warm_changed_or_damaged_templates,
        ),
        (
            "warm_concurrent_first_pods_build_one_template",
            warm_concurrent_first_pods_build_one_template,
        ),
        (
            "warm_pool_hands_out_and_refills",
            warm_pool_hands_out_and_refills,
        ),
    ];
    // `make soak` and `make test-soak` run this, on containerd 2.x only.
    let soak: Vec<(&str, TestFn)> = vec![(
        "soak_pod_cycles_leave_nothing",
        soak::soak_pod_cycles_leave_nothing,
    )];
    // The hooked VMM's stray call, on its vCPU thread (only that build
    // reads it); set before any thread, inherited by containerd, the
    // shims and their VMs.
    std::env::set_var("PODVISOR_VMM_TEST_SIGSYS", "vcpu");
    let no_kvm = podvisor_testkit::harness::kvm_unusable();
    if let Some(why) = &no_kvm {
        eprintln!("SKIPPING the in-tree VMM's pod: {why}");
    }
    BEFORE.get_or_init(host_state);
    // Each containerd in turn: Debian's 1.6, then 2.x (PODVISOR_CONTAINERD
    // picks one).
    let mut failed = false;
    for release in Release::selected() {
        let mut suite = tests.clone();
        if release == Release::V2 {
            suite.extend(network.iter().cloned());
            suite.extend(warm.iter().cloned());
            suite.extend(soak.iter().cloned());
        }
        let names: Vec<String> = suite
            .iter()
            .map(|(n, _)| format!("{}::{n}", release.label()))
            .collect();
        // No containerd for a release none of whose tests is asked for.
        if names
            .iter()
            .all(|n| args.is_filtered_out(&Trial::test(n.clone(), || Ok(()))))
        {
            continue;
        }
        let ctd = match Containerd::start(release) {
            Ok(c) => std::sync::Arc::new(c),
            Err(e) => {
                eprintln!("cannot start {}: {e:#}", release.label());
                std::process::exit(1);
            }
        };
        eprintln!("--- {} ({})", release.label(), release.version());
        let trials = suite
            .into_iter()
            .zip(names)
            .map(|((_, f), name)| {
                let ctd = ctd.clone();
                let needs_kvm = name.contains("vmm_");
                Trial::test(name, move || {
                    let result = f(&ctd).and_then(|()| wait_clean());
                    if result.is_err() {
                        // Keep one failure from failing the tests after it.
                        ctd.remove_everything();
                        let _ = wait_clean();
                    }
                    result.map_err(|e| {
                        Failed::from(format!(
                            "{e:#}\n--- containerd log (tail; all of it: {})\n{}",
                            ctd.keep_log(),
                            ctd.log_tail()
                        ))
                    })
                })
                .with_ignored_flag(needs_kvm && no_kvm.is_some())
            })
            .collect();
        let conclusion = libtest_mimic::run(&args, trials);
        failed |= conclusion.has_failed();
        match std::sync::Arc::try_unwrap(ctd) {
            Ok(c) => c.stop(),
            Err(_) => eprintln!("containerd still referenced at exit"),
        }
    }
    remove_test_cgroups();
    std::process::exit(i32::from(failed));
}

/// A pod whose VM, podvisor-vmm, is killed by its seccomp filter while it
/// boots (the build with the test-only hook, `PODVISOR_VMM_HOOKS`, as the
/// node's VMM): RunPodSandbox fails saying so, the shim logs it, and
/// nothing of the pod is left (the harness's check after each test).
fn vmm_killed_by_its_seccomp_filter_fails_the_pod(c: &Containerd) -> Result<()> {
    let Some(hooked) = std::env::var_os("PODVISOR_VMM_HOOKS") else {
        bail!("PODVISOR_VMM_HOOKS (podvisor-vmm built with --features test-hooks) is not set: run `make test-containerd`");
    };
    let config = std::fs::read_to_string(&c.podvisor_config)?;
    std::fs::write(
        &c.podvisor_config,
        format!(
            "hypervisor = \"vmm\"\n{}",
            config.replace("[paths]\n", &format!("[paths]\nvmm = {hooked:?}\n"))
        ),
    )?;
    let pod = pod_file(c.dir(), "sigsys")?;
    let out = run(c.crictl(&["runp", "--runtime", "podvisor", &pod]), 180);
    std::fs::write(&c.podvisor_config, &config)?;
    let out = out?;
    let said = text(&out);
    ensure!(!out.status.success(), "the pod started: {said}");
    ensure!(
        said.contains("killed by SIGSYS: a system call outside its seccomp filter"),
        "RunPodSandbox failed otherwise: {said}"
    );
    // The shim's error, as containerd logs it for the pod.
    let log = c.log();
    ensure!(
        // 2.x quotes the pod's name, 1.6 prints its metadata.
        log.lines().any(
            |l| (l.contains("name:\\\"sigsys\\\"") || l.contains("Name:sigsys,"))
                && l.contains("killed by SIGSYS")
                && l.contains("test hook: a vcpu thread calls ptrace")
        ),
        "containerd's log lacks the pod's failure:\n{}",
        c.log_tail()
    );
    ensure!(
        ok(&mut c.crictl(&["pods", "-q"]), 60)?.trim().is_empty(),
        "a pod is left"
    );
    Ok(())
}

/// Runs `cmd` to its end, killing it after `secs`.
fn run(cmd: impl BorrowMut<Command>, secs: u64) -> Result<Output> {
    run_with_input(cmd, None, secs)
}

fn run_with_input(
    mut cmd: impl BorrowMut<Command>,
    input: Option<&[u8]>,
    secs: u64,
) -> Result<Output> {
    let cmd = cmd.borrow_mut();
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(data)?;
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "{cmd:?} did not finish within {secs}s; output so far:\n{}",
                text(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ok(mut cmd: impl BorrowMut<Command>, secs: u64) -> Result<String> {
    let cmd = cmd.borrow_mut();
    let out = run(&mut *cmd, secs)?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        text(&out)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What was on the host before the suite started (another VM's shim,
/// QEMU, sockets, directories): never counted as this suite's leftovers.
static BEFORE: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// `found` without what was there before the suite started.
fn started_here(found: Vec<String>) -> Vec<String> {
    let before = BEFORE.get().map(Vec::as_slice).unwrap_or_default();
    found.into_iter().filter(|f| !before.contains(f)).collect()
}

/// Processes of ours still running: shims, VMs, helpers the suite started.
fn leftover_processes() -> Vec<String> {
    started_here(all_processes())
}

/// Every shim, VM and helper process on the host.
fn all_processes() -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let ours = [
            "containerd-shim-podvisor-v2",
            "podvisor-vmm",
            "qemu-system-x86_64",
            "virtiofsd",
            "vhost-device-vsock",
        ];
        if ours
            .iter()
            .any(|p| cmd.split(' ').next().unwrap_or_default().ends_with(p))
        {
            found.push(format!(
                "{} {}",
                e.file_name().to_string_lossy(),
                cmd.trim()
            ));
        }
    }
    found
}

/// Entries of a directory, as names.
fn names(dir: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Everything a pod of this suite leaves on the host, if anything.
fn leftovers() -> Vec<String> {
    started_here(host_state())
}

/// Every podvisor process, shim socket, pod network namespace, sandbox
/// directory and mount on the host.
fn host_state() -> Vec<String> {
    let mut left = all_processes();
    // Shim sockets, and network namespaces of pods.
    left.extend(
        names("/run/containerd/s")
            .into_iter()
            .map(|n| format!("socket /run/containerd/s/{n}")),
    );
    left.extend(
        names("/var/run/netns")
            .into_iter()
            .filter(|n| n.starts_with("cni-"))
            .map(|n| format!("netns {n}")),
    );
    if let Ok(entries) = std::fs::read_dir(podvisor_names::paths::STATE_ROOT) {
        left.extend(
            entries
                .flatten()
                // The id leases are the node's, made on first use.
                .filter(|e| {
                    e.path().is_dir() && e.path() != Path::new(podvisor_names::paths::JAIL_IDS)
                })
                .map(|e| format!("dir {}", e.path().display())),
        );
    }
    left.extend(
        test_cgroup_leaves()
            .into_iter()
            .map(|l| format!("cgroup {l}")),
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    left.extend(
        mounts
            .lines()
            .filter(|l| l.contains("/run/podvisor"))
            .map(|l| format!("mount {l}")),
    );
    left
}

/// Waits a little for shims to finish exiting, then insists on a clean
/// host.
fn wait_clean() -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = leftovers();
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("left behind on the host:\n{}", left.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn ctr_run_prints_guest_kernel_and_exit_code(c: &Containerd) -> Result<()> {
    let out = run(
        c.ctr_run(&["--rm"], "t1", &["sh", "-c", "uname -r; echo ok"]),
        180,
    )?;
    ensure!(out.status.success(), "ctr run failed: {}", text(&out));
    let guest = manifest("kernel_release")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        stdout == format!("{guest}\nok\n"),
        "output {stdout:?}, guest kernel {guest}"
    );
    ensure!(
        guest != host_kernel(),
        "guest and host kernels are the same"
    );

    let out = run(c.ctr_run(&["--rm"], "t1", &["sh", "-c", "exit 7"]), 180)?;
    ensure!(
        out.status.code() == Some(7),
        "ctr exited {:?}: {}",
        out.status,
        text(&out)
    );
    Ok(())
}

fn stdin_is_piped_through(c: &Containerd) -> Result<()> {
    let input: Vec<u8> = (0..200_000u32)
        .map(|i| b"podvisor\n"[(i % 9) as usize])
        .collect();
    let out = run_with_input(
        c.ctr_run(&["--rm"], "stdin", &["sh", "-c", "md5sum; echo end"]),
        Some(&input),
        180,
    )?;
    ensure!(out.status.success(), "ctr run failed: {}", text(&out));
    let expected = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut ch| {
            ch.stdin
                .take()
                .map(|mut s| s.write_all(&input))
                .transpose()?;
            ch.wait_with_output()
        })?;
    let want = String::from_utf8_lossy(&expected.stdout);
    let got = String::from_utf8_lossy(&out.stdout);
    ensure!(
        got.split_whitespace().next() == want.split_whitespace().next() && got.ends_with("end\n"),
        "in the container: {got:?}; on the host: {want:?}"
    );
    Ok(())
}

fn tty_interactive_session(c: &Containerd) -> Result<()> {
    // `script` gives ctr the terminal `ctr run -t` insists on.
    let cmd = c.ctr_run(&["-t", "--rm"], "tty", &["sh"]);
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let out = run_with_input(
        Command::new("script").args(["-qec", &line, "/dev/null"]),
        Some(b"tty; echo hello-$((6*7))\rexit 5\r"),
        180,
    )?;
    let shown = String::from_utf8_lossy(&out.stdout);
    ensure!(
        shown.contains("hello-42"),
        "no command output on the terminal: {shown:?}"
    );
    ensure!(
        shown.contains("/dev/pts/0"),
        "no pty in the container: {shown:?}"
    );
    ensure!(
        out.status.code() == Some(5),
        "exit {:?}: {shown:?}",
        out.status
    );
    Ok(())
}

fn task_status(c: &Containerd, id: &str) -> Result<String> {
    let ls = ok(&mut c.ctr(&["task", "ls"]), 30)?;
    Ok(ls
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("absent")
        .to_string())
}

fn wait_status(c: &Containerd, id: &str, want: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = task_status(c, id)?;
        if s == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("task {id} is {s}, not {want}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn exec_kill_ps_metrics_delete(c: &Containerd) -> Result<()> {
    let id = "busy";
    ok(c.ctr_run(&["-d"], id, &["sleep", "1000"]), 180)?;
    wait_status(c, id, "RUNNING")?;

    let out = ok(
        &mut c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            id,
            "sh",
            "-c",
            "echo in-exec; cat /proc/1/cmdline",
        ]),
        60,
    )?;
    ensure!(out.starts_with("in-exec\nsleep"), "exec output {out:?}");

    // A second process to see in ps and to TERM, once it runs: an exec
    // that is created but not yet started is in the container's cgroup
    // (so in ps) and a TERM then would beat its start.
    let mut sleeper = c
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "sl",
            id,
            "sh",
            "-c",
            "echo sleeping; exec sleep 1000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = sleeper.stdout.take().context("the exec's stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
        let _ = tx.send(read.map(|_| line));
    });
    let first = rx
        .recv_timeout(Duration::from_secs(60))
        .context("the exec printed nothing in 60 s")??;
    ensure!(first == "sleeping\n", "the exec printed {first:?}");
    let ps = ok(&mut c.ctr(&["task", "ps", id]), 30)?;
    ensure!(
        ps.lines().skip(1).count() == 2,
        "ctr task ps does not show the container's two processes: {ps}"
    );
    ok(
        &mut c.ctr(&["task", "kill", "--exec-id", "sl", "-s", "TERM", id]),
        30,
    )?;
    let st = sleeper.wait()?;
    ensure!(st.code() == Some(143), "exec after SIGTERM exited {st:?}");

    let metrics = ok(&mut c.ctr(&["task", "metrics", id]), 30)?;
    for key in ["memory.usage", "pids.current", "cpu.usage_usec"] {
        ensure!(
            metrics.contains(key),
            "{key} missing from metrics:\n{metrics}"
        );
    }

    ok(&mut c.ctr(&["task", "kill", "-s", "KILL", id]), 30)?;
    wait_status(c, id, "STOPPED")?;
    let del = run(&mut c.ctr(&["task", "delete", id]), 60)?;
    ensure!(del.status.success(), "task delete: {}", text(&del));
    ensure!(
        text(&del).contains("137"),
        "task delete did not report 137: {}",
        text(&del)
    );
    ok(&mut c.ctr(&["containers", "rm", id]), 30)?;
    ensure!(task_status(c, id)? == "absent");
    Ok(())
}

fn json_file(dir: &Path, name: &str, body: &str) -> Result<String> {
    let p = dir.join(name);
    std::fs::write(&p, body)?;
    Ok(p.display().to_string())
}

fn cri_pod_runs_two_containers_in_one_vm(c: &Containerd) -> Result<()> {
    let d = c.dir();
    let logs = d.join("pod-logs");
    std::fs::create_dir_all(&logs)?;
    let pod = json_file(
        d,
        "pod.json",
        &format!(
            r#"{{"metadata":{{"name":"pv","namespace":"default","uid":"pv-uid","attempt":0}},"log_directory":"{}","linux":{{}}}}"#,
            logs.display()
        ),
    )?;
    let container = |name: &str, cmd: &str| -> Result<String> {
        json_file(
            d,
            &format!("{name}.json"),
            &format!(
                r#"{{"metadata":{{"name":"{name}"}},"image":{{"image":"docker.io/podvisor/busybox:latest"}},"command":["sh","-c","{cmd}"],"log_path":"{name}.log","linux":{{}}}}"#
            ),
        )
    };
    let c1 = container("c1", "echo c1-started; exec sleep 1000")?;
    let c2 = container("c2", "echo c2-started; exec sleep 1000")?;

    let sandbox = ok(&mut c.crictl(&["runp", "--runtime", "podvisor", &pod]), 180)?
        .trim()
        .to_string();
    let vms = leftover_processes()
        .into_iter()
        .filter(|p| p.contains("qemu-system") && p.contains(&sandbox))
        .count();
    ensure!(vms == 1, "{vms} VMs for the pod");
    let mut ids = Vec::new();
    for spec in [&c1, &c2] {
        let id = ok(&mut c.crictl(&["create", &sandbox, spec, &pod]), 120)?
            .trim()
            .to_string();
        ok(&mut c.crictl(&["start", &id]), 120)?;
        ids.push(id);
    }
    let boot = |id: &str| {
        ok(
            &mut c.crictl(&["exec", "-s", id, "cat", "/proc/sys/kernel/random/boot_id"]),
            60,
        )
    };
    let (b1, b2) = (boot(&ids[0])?, boot(&ids[1])?);
    ensure!(
        b1 == b2 && !b1.trim().is_empty(),
        "containers in different VMs: {b1:?} vs {b2:?}"
    );
    let host_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    ensure!(b1 != host_boot, "the container reports the host's boot id");
    let total_vms = leftover_processes()
        .iter()
        .filter(|p| p.contains("qemu-system"))
        .count();
    ensure!(
        total_vms == 1,
        "{total_vms} VMs for one pod with two containers"
    );

    let ex = ok(
        &mut c.crictl(&["exec", "-s", &ids[0], "sh", "-c", "echo out; echo err >&2"]),
        60,
    )?;
    ensure!(ex.contains("out"), "ExecSync stdout: {ex:?}");
    let ex = run(
        &mut c.crictl(&["exec", "-s", &ids[0], "sh", "-c", "exit 3"]),
        60,
    )?;
    ensure!(
        !ex.status.success() && text(&ex).contains("exited with 3"),
        "ExecSync exit: {}",
        text(&ex)
    );

    // UpdateContainerResources reaches the container's cgroup in the guest.
    ok(
        &mut c.crictl(&["update", "--memory", "67108864", &ids[1]]),
        60,
    )?;
    let limit = ok(
        &mut c.crictl(&["exec", "-s", &ids[1], "cat", "/sys/fs/cgroup/memory.max"]),
        60,
    )?;
    ensure!(
        limit.trim() == "67108864",
        "memory.max after update: {limit:?}"
    );

    let stats = ok(&mut c.crictl(&["stats", "-o", "json"]), 60)?;
    for id in &ids {
        ensure!(stats.contains(id.as_str()), "no stats for {id}: {stats}");
    }
    ensure!(
        stats.contains("workingSetBytes"),
        "no memory in stats: {stats}"
    );
    let log = ok(&mut c.crictl(&["logs", &ids[0]]), 30)?;
    ensure!(log.contains("c1-started"), "logs: {log:?}");

    ok(&mut c.crictl(&["stopp", &sandbox]), 120)?;
    ok(&mut c.crictl(&["rmp", &sandbox]), 120)?;
    let left = ok(&mut c.crictl(&["pods", "-q"]), 30)?;
    ensure!(left.trim().is_empty(), "pods left: {left}");
    Ok(())
}

/// A process and its descendants.
fn with_descendants(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let mut i = 0;
    while let Some(&p) = pids.get(i) {
        // Each thread's children.
        let tasks = std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten();
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    pids
}

/// The host's mounted cgroup hierarchies: v1's under /sys/fs/cgroup/<name>,
/// or v2's /sys/fs/cgroup itself.
fn cgroup_mounts() -> Vec<std::path::PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_owned()];
    }
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists() && !p.is_symlink())
        .collect()
}

/// The cgroup of `pid` in each hierarchy the host mounts, as
/// /proc/<pid>/cgroup lists them ("memory" → "/a/b").
fn cgroups_of(pid: u32) -> Result<Vec<(String, String)>> {
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    Ok(std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':').skip(1);
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        // v1 hosts list an unmounted v2 line ("0::/").
        .filter(|(controllers, _)| v2 == controllers.is_empty())
        .collect())
}

/// The cgroup kubelet would have made for pod `name`, below one per run
/// of the suite ([`remove_test_cgroups`] removes it).
fn pod_cgroup(name: &str) -> String {
    format!("/{}/{name}", test_cgroup_root())
}

fn test_cgroup_root() -> String {
    format!("podvisor-test-{}", std::process::id())
}

/// The sandbox cgroups (leaves) below the suite's pod cgroups, in every
/// hierarchy: what a pod could leave behind.
fn test_cgroup_leaves() -> Vec<String> {
    cgroup_mounts()
        .into_iter()
        .flat_map(|m| {
            let pods = names(&m.join(test_cgroup_root()).to_string_lossy())
                .into_iter()
                .map(move |p| m.join(test_cgroup_root()).join(p));
            pods.flat_map(|p| {
                std::fs::read_dir(&p)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.path().display().to_string())
                    .collect::<Vec<_>>()
            })
        })
        .collect()
}

/// Removes the suite's pod cgroups (kubelet's part) at its end.
fn remove_test_cgroups() {
    for m in cgroup_mounts() {
        let root = m.join(test_cgroup_root());
        for pod in names(&root.to_string_lossy()) {
            let _ = std::fs::remove_dir(root.join(pod));
        }
        let _ = std::fs::remove_dir(root);
    }
}

/// Each of `pids` is in the cgroup `leaf` in every hierarchy.
fn all_in_cgroup(pids: &[u32], leaf: &str) -> Result<()> {
    for &pid in pids {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cgroups = cgroups_of(pid)?;
        ensure!(
            !cgroups.is_empty(),
            "{} (pid {pid}): no cgroups",
            comm.trim()
        );
        for (controllers, path) in cgroups {
            ensure!(
                path == leaf,
                "{} (pid {pid}) is in {controllers}:{path}, not the pod's {leaf}",
                comm.trim()
            );
        }
    }
    Ok(())
}

/// A pod whose sandbox names a cgroup parent, as kubelet's do: the shim,
/// the VM process and every helper run in the sandbox's cgroup below it,
/// in every hierarchy; the cgroup's memory use covers the VM's anonymous
/// memory and the guest RAM it touched; stopping the pod removes the sandbox's
/// cgroup and leaves the parent (kubelet's) in place.
fn cri_pod_runs_in_its_cgroup_and_removes_it(c: &Containerd) -> Result<()> {
    let parent = pod_cgroup("cg");
    let pod = json_file(
        c.dir(),
        "cg-pod.json",
        &format!(
            r#"{{"metadata":{{"name":"cg","namespace":"default","uid":"cg-uid","attempt":0}},"linux":{{"cgroup_parent":"{parent}"}}}}"#
        ),
    )?;
    let sandbox = ok(&mut c.crictl(&["runp", "--runtime", "podvisor", &pod]), 180)?
        .trim()
        .to_string();
    let leaf = format!("{parent}/{sandbox}");
    let shim: Vec<u32> = leftover_processes()
        .iter()
        .filter(|p| {
            p.contains("containerd-shim-podvisor-v2") && p.contains(&format!("-id {sandbox} "))
        })
        .filter_map(|p| p.split(' ').next()?.parse().ok())
        .collect();
    ensure!(shim.len() == 1, "one shim for {sandbox}? {shim:?}");
    let recorded = recorded_pids(
        &Path::new(podvisor_names::paths::STATE_ROOT)
            .join(&sandbox)
            .join("state.json"),
    )?;
    ensure!(recorded.len() >= 2, "state.json records {recorded:?}");
    let mut pids = vec![shim[0]];
    pids.extend(recorded.iter().flat_map(|&p| with_descendants(p)));
    all_in_cgroup(&pids, &leaf)?;
    let vm = recorded[0];
    // Guest RAM is shared memory (a memfd), the VMM's own anonymous.
    let status = std::fs::read_to_string(format!("/proc/{vm}/status"))?;
    let kib = |key: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {key} for the VM process"))
    };
    let (anon_kib, shmem_kib) = (kib("RssAnon:")?, kib("RssShmem:")?);
    ensure!(shmem_kib > 0, "the VM process maps no guest RAM: {status}");
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let usage_file = if v2 {
        format!("/sys/fs/cgroup{leaf}/memory.current")
    } else {
        format!("/sys/fs/cgroup/memory{leaf}/memory.usage_in_bytes")
    };
    let usage: u64 = std::fs::read_to_string(&usage_file)
        .with_context(|| usage_file.clone())?
        .trim()
        .parse()?;
    ensure!(
        usage >= (anon_kib + shmem_kib) * 1024,
        "{usage_file}: {usage} bytes, less than the VM's {anon_kib} KiB anonymous and {shmem_kib} KiB guest RAM"
    );
    ok(&mut c.crictl(&["stopp", &sandbox]), 120)?;
    ok(&mut c.crictl(&["rmp", &sandbox]), 120)?;
    for m in cgroup_mounts() {
        let gone = m.join(leaf.trim_start_matches('/'));
        ensure!(!gone.exists(), "{} is left", gone.display());
        let kept = m.join(parent.trim_start_matches('/'));
        ensure!(kept.exists(), "{} was removed too", kept.display());
    }
    Ok(())
}

fn annotations_are_allow_listed_and_checked(c: &Containerd) -> Result<()> {
    // The test config allows vcpus and memory-mib, up to 4 vCPUs.
    let out = ok(
        c.ctr_run(
            &["--rm", "--annotation", "podvisor.io/vcpus=2"],
            "ann",
            &["nproc"],
        ),
        180,
    )?;
    ensure!(out.trim() == "2", "nproc in a 2-vCPU pod said {out:?}");
    for (annotation, message) in [
        ("podvisor.io/vcpus=9", "outside 1..=4"),
        ("podvisor.io/memory-mib=lots", "is not a number"),
        (
            "podvisor.io/kernel-params=init=/bin/sh",
            "not allowed by this node's podvisor config",
        ),
        (
            "podvisor.io/hypervisor=qemu",
            "not allowed by this node's podvisor config",
        ),
    ] {
        let out = run(
            c.ctr_run(&["--rm", "--annotation", annotation], "ann", &["true"]),
            120,
        )?;
        ensure!(!out.status.success(), "{annotation} was accepted");
        ensure!(text(&out).contains(message), "{annotation}: {}", text(&out));
        // Nothing of the refused container stays behind.
        let _ = run(&mut c.ctr(&["containers", "rm", "ann"]), 30);
    }
    Ok(())
}

/// What a VM runtime cannot do fails create with a message naming it, and
/// leaves nothing behind: a pod asking for the node's network, PID or IPC
/// namespace, a sysctl the guest kernel lacks, a seccomp profile naming a
/// system call or an action that does not exist.
fn specs_a_vm_cannot_honour_are_refused_by_name(c: &Containerd) -> Result<()> {
    let d = c.dir();
    let pod_with = |name: &str, linux: &str| {
        json_file(
            d,
            &format!("{name}-pod.json"),
            &format!(
                r#"{{"metadata":{{"name":"{name}","namespace":"default","uid":"{name}-uid","attempt":0}},"linux":{linux}}}"#
            ),
        )
    };
    let refused = |what: &str, out: Output, want: &str| -> Result<()> {
        ensure!(!out.status.success(), "{what} was accepted");
        ensure!(text(&out).contains(want), "{what}: {}", text(&out));
        Ok(())
    };
    // NamespaceMode NODE is 2.
    for (field, key) in [
        ("hostNetwork", "network"),
        ("hostPID", "pid"),
        ("hostIPC", "ipc"),
    ] {
        let pod = pod_with(
            field,
            &format!(r#"{{"security_context":{{"namespace_options":{{"{key}":2}}}}}}"#),
        )?;
        let out = run(&mut c.crictl(&["runp", "--runtime", "podvisor", &pod]), 180)?;
        refused(field, out, field)?;
        wait_clean().with_context(|| format!("after the {field} pod"))?;
    }

    let pod = pod_with(
        "nosysctl",
        r#"{"sysctls":{"net.ipv4.podvisor_no_such_parameter":"1"}}"#,
    )?;
    let out = run(&mut c.crictl(&["runp", "--runtime", "podvisor", &pod]), 180)?;
    refused(
        "a missing sysctl",
        out,
        "net.ipv4.podvisor_no_such_parameter",
    )?;
    wait_clean().context("after the sysctl pod")?;

    let pod = pod_with("seccomp", "{}")?;
    let sandbox = ok(&mut c.crictl(&["runp", "--runtime", "podvisor", &pod]), 180)?
        .trim()
        .to_string();
    let profiles = [
        (
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["podvisor_no_such_call"],"action":"SCMP_ACT_ERRNO"}]}"#,
            "podvisor_no_such_call",
        ),
        (
            r#"{"defaultAction":"SCMP_ACT_PODVISOR_BOGUS"}"#,
            "SCMP_ACT_PODVISOR_BOGUS",
        ),
    ];
    for (i, (profile, want)) in profiles.iter().enumerate() {
        let path = json_file(d, &format!("profile-{i}.json"), profile)?;
        let container = json_file(
            d,
            &format!("seccomp-{i}.json"),
            &format!(
                r#"{{"metadata":{{"name":"sc{i}"}},"image":{{"image":"docker.io/podvisor/busybox:latest"}},"command":["true"],"linux":{{"security_context":{{"seccomp":{{"profile_type":2,"localhost_ref":"{path}"}}}}}}}}"#
            ),
        )?;
        // The CRI makes the task (and so asks the shim) at start.
        let id = ok(&mut c.crictl(&["create", &sandbox, &container, &pod]), 120)?
            .trim()
            .to_string();
        let out = run(&mut c.crictl(&["start", &id]), 120)?;
        refused(want, out, want)?;
        ok(&mut c.crictl(&["rm", &id]), 60)?;
    }
    let left = ok(&mut c.crictl(&["ps", "-a", "-q", "-p", &sandbox]), 30)?;
    ensure!(left.trim().is_empty(), "refused containers left: {left}");
    stop_pod(c, &sandbox)
}

fn vm_pid(c: &Containerd, id: &str) -> Result<u32> {
    let ls = ok(&mut c.ctr(&["task", "ls"]), 30)?;
    ls.lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no pid for {id} in {ls}"))
}

fn vm_killed_under_a_running_task(c: &Containerd) -> Result<()> {
    let id = "doomed";
    ok(c.ctr_run(&["-d"], id, &["sleep", "1000"]), 180)?;
    let pid = vm_pid(c, id)?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))?;
    ensure!(
        comm.starts_with("qemu-system"),
        "task pid {pid} is {comm:?}, not the VM"
    );
    // SAFETY: kill(2) on the VM process we just looked up.
    unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGKILL) };
    wait_status(c, id, "STOPPED")?;
    ok(&mut c.ctr(&["task", "delete", id]), 60)?;
    ok(&mut c.ctr(&["containers", "rm", id]), 30)?;
    let ls = ok(&mut c.ctr(&["task", "ls"]), 30)?;
    ensure!(ls.lines().count() <= 1, "ctr task ls not clean: {ls}");
    Ok(())
}

/// The guest dying under a running task (its kernel panics, as it does
/// when the agent, PID 1, dies): the VM ends, the task stops with the
/// VM-died status, the shim's log keeps the end of the guest's console
/// (gone with the sandbox directory), and nothing is left. The test
/// node's guests panic on an unknown NMI (`unknown_nmi_panic`), which the
/// test sends through the VM's QMP socket.
fn a_guest_panic_ends_the_task_as_a_dead_vm(c: &Containerd) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let id = "panicking";
    ok(c.ctr_run(&["-d"], id, &["sleep", "1000"]), 180)?;
    let vm = Path::new(podvisor_names::paths::STATE_ROOT)
        .join(id)
        .join(podvisor_hypervisor::VM_DIR);
    let qmp = std::os::unix::net::UnixStream::connect(vm.join("qmp.sock"))
        .context("connecting to the VM's QMP socket")?;
    qmp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut replies = BufReader::new(qmp.try_clone()?);
    let mut line = String::new();
    replies.read_line(&mut line)?;
    ensure!(line.contains("QMP"), "no QMP greeting: {line:?}");
    for command in ["qmp_capabilities", "inject-nmi"] {
        writeln!(&qmp, r#"{{"execute":"{command}"}}"#)?;
        line.clear();
        replies.read_line(&mut line)?;
        ensure!(line.contains("\"return\""), "{command}: {line:?}");
    }
    wait_status(c, id, "STOPPED").context("after the guest's panic")?;
    let log = console(id);
    ensure!(
        log.contains("Kernel panic"),
        "the guest's console shows no panic:\n{}",
        log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    let del = run(&mut c.ctr(&["task", "delete", id]), 60)?;
    ensure!(
        del.status.success() && text(&del).contains("255"),
        "task delete did not report the VM-died status 255: {}",
        text(&del)
    );
    ok(&mut c.ctr(&["containers", "rm", id]), 30)?;
    // The console goes with the sandbox directory: the shim's warning
    // keeps the guest's last words in containerd's log.
    // The last such warning is this test's: the log holds the earlier
    // tests' too.
    let log = c.log();
    let warned = log
        .rfind("the VM exited unasked")
        .map(|at| &log[at..])
        .is_some_and(|w| {
            w.contains("sandbox=\"panicking\"")
                && w.contains("--- vm/console.log")
                && w.contains("| Kernel panic - not syncing")
        });
    ensure!(
        warned,
        "the shim's log does not carry the guest's panic:\n{}",
        c.log_tail()
    );
    wait_clean().context("after the guest's panic")
}

/// A helper of the VM (vsock, virtio-fs) killed under a running task
/// takes the VM down with it: the task stops with the VM-died status, the
/// shim says which helper ended, and nothing is left.
fn helper_killed_under_a_running_task(c: &Containerd) -> Result<()> {
    for (n, helper) in ["vhost-device-vsock", "virtiofsd"].into_iter().enumerate() {
        let id = format!("helperless-{n}");
        ok(c.ctr_run(&["-d"], &id, &["sleep", "1000"]), 180)?;
        let vm = vm_pid(c, &id)?;
        let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            Path::new(podvisor_names::paths::STATE_ROOT)
                .join(&id)
                .join("state.json"),
        )?)?;
        let pid = state["processes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == helper)
            .and_then(|p| p["pid"].as_u64())
            .with_context(|| format!("no {helper} in {state}"))?;
        // SAFETY: kill(2) on the helper the shim recorded for this task.
        unsafe { libc::kill(i32::try_from(pid)?, libc::SIGKILL) };
        wait_status(c, &id, "STOPPED").with_context(|| format!("after killing {helper}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{vm}/stat")).is_ok_and(|s| !s.contains(") Z"))
        {
            ensure!(
                Instant::now() < deadline,
                "the VM (pid {vm}) runs on without its {helper}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let del = run(&mut c.ctr(&["task", "delete", &id]), 60)?;
        ensure!(
            del.status.success() && text(&del).contains("255"),
            "task delete did not report the VM-died status 255: {}",
            text(&del)
        );
        ok(&mut c.ctr(&["containers", "rm", &id]), 30)?;
        let said = format!("{helper} ended (killed by signal 9) under a running VM");
        ensure!(
            c.log().contains(&said),
            "the shim did not say {said:?}:\n{}",
            c.log_tail()
        );
        wait_clean().with_context(|| format!("after killing {helper}"))?;
    }
    Ok(())
}

fn crashed_shim_is_cleaned_up_by_delete(c: &Containerd) -> Result<()> {
    let id = "orphan";
    ok(c.ctr_run(&["-d"], id, &["sleep", "1000"]), 180)?;
    let shim: Vec<u32> = leftover_processes()
        .iter()
        .filter(|p| p.contains("containerd-shim-podvisor-v2") && p.contains(&format!("-id {id} ")))
        .filter_map(|p| p.split(' ').next()?.parse().ok())
        .collect();
    ensure!(
        shim.len() == 1,
        "expected one shim for {id}, found {shim:?}"
    );
    // SAFETY: kill(2) on the shim we just found.
    unsafe { libc::kill(i32::try_from(shim[0]).unwrap(), libc::SIGKILL) };
    // containerd notices and runs `containerd-shim-podvisor-v2 delete`.
    wait_clean()?;
    let _ = run(&mut c.ctr(&["task", "delete", id]), 30);
    ok(&mut c.ctr(&["containers", "rm", id]), 30)?;
    Ok(())
}

/// containerd restarted (SIGTERM, as systemd does, then started again)
/// while a pod runs: the pod's VM runs on (same processes, same guest boot
/// id), its container keeps logging, and exec, logs, stop and removal all
/// work through the new containerd.
fn pods_run_on_across_a_containerd_restart(c: &Containerd) -> Result<()> {
    let d = c.dir();
    let logs = d.join("logs-restart");
    std::fs::create_dir_all(&logs)?;
    let pod = json_file(
        d,
        "restart-pod.json",
        &format!(
            r#"{{"metadata":{{"name":"restart","namespace":"default","uid":"restart-uid","attempt":0}},"hostname":"restart","log_directory":"{}","linux":{{"cgroup_parent":"{}"}}}}"#,
            logs.display(),
            pod_cgroup("restart")
        ),
    )?;
    let ctr = json_file(
        d,
        "restart-ctr.json",
        r#"{"metadata":{"name":"tick"},"image":{"image":"docker.io/podvisor/busybox:latest"},"command":["sh","-c","trap 'echo stopped; exit 0' TERM; i=0; while :; do i=$((i+1)); echo tick-$i; sleep 1 & wait; done"],"log_path":"tick.log","linux":{}}"#,
    )?;
    let sandbox = ok(&mut c.crictl(&["runp", "--runtime", "podvisor", &pod]), 180)?
        .trim()
        .to_string();
    let result = (|| -> Result<()> {
        let id = ok(&mut c.crictl(&["create", &sandbox, &ctr, &pod]), 120)?
            .trim()
            .to_string();
        ok(&mut c.crictl(&["start", &id]), 120)?;
        let boot = |c: &Containerd| -> Result<String> {
            Ok(ok(
                &mut c.crictl(&["exec", &id, "cat", "/proc/sys/kernel/random/boot_id"]),
                60,
            )?
            .trim()
            .to_string())
        };
        let ticks = |c: &Containerd| -> Result<usize> {
            Ok(ok(&mut c.crictl(&["logs", &id]), 60)?
                .lines()
                .filter(|l| l.starts_with("tick-"))
                .count())
        };
        let guest = boot(c)?;
        let vm: Vec<u64> = sandbox_state(&sandbox)?["processes"]
            .as_array()
            .context("no processes in the sandbox's state")?
            .iter()
            .filter_map(|p| p["pid"].as_u64())
            .collect();
        ensure!(!vm.is_empty(), "no VM processes recorded");
        let old = c.pid()?;
        c.restart()?;
        ensure!(c.pid()? != old, "containerd was not restarted");
        ensure!(
            vm.iter().all(|p| Path::new(&format!("/proc/{p}")).exists()),
            "the VM's processes {vm:?} did not outlive containerd's restart"
        );
        let before = ticks(c)?;
        ensure!(
            boot(c)? == guest,
            "after the restart, exec answers from another guest"
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while ticks(c)? <= before + 2 {
            ensure!(
                Instant::now() < deadline,
                "the container stopped logging after containerd's restart"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let ps = ok(&mut c.crictl(&["ps", "-q"]), 60)?;
        ensure!(ps.contains(&id), "crictl ps lost the container: {ps:?}");
        ok(&mut c.crictl(&["stop", "--timeout", "30", &id]), 120)?;
        let info: serde_json::Value =
            serde_json::from_str(&ok(&mut c.crictl(&["inspect", "-o", "json", &id]), 60)?)?;
        let code = info.pointer("/status/exitCode").and_then(|v| v.as_i64());
        ensure!(code == Some(0), "the container ended {code:?} on TERM");
        let log = ok(&mut c.crictl(&["logs", &id]), 60)?;
        ensure!(
            log.lines().last() == Some("stopped"),
            "its log does not end with its TERM handler's line:\n{log}"
        );
        ok(&mut c.crictl(&["rm", &id]), 60)?;
        Ok(())
    })();
    let stopped = stop_pod(c, &sandbox);
    result.and(stopped)
}

/// CreateContainer and StartContainer in `sandbox` of each spec file:
/// their ids.
fn start_containers(
    c: &Containerd,
    sandbox: &str,
    pod: &str,
    specs: &[&str],
) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for spec in specs {
        let id = ok(&mut c.crictl(&["create", sandbox, spec, pod]), 120)?
            .trim()
            .to_string();
        ok(&mut c.crictl(&["start", &id]), 120)?;
        ids.push(id);
    }
    Ok(ids)
}

/// StopContainer (1 s grace) and RemoveContainer of each of `ids`.
fn remove_containers(c: &Containerd, ids: &[String]) -> Result<()> {
    for id in ids {
        ok(&mut c.crictl(&["stop", "--timeout", "1", id]), 120)?;
        ok(&mut c.crictl(&["rm", id]), 60)?;
    }
    Ok(())
}

/// A volume whose host filesystem fills up (a 4 MiB tmpfs, shared into
/// the guest through virtio-fs like every volume): the writer gets ENOSPC,
/// by write or at the latest by fsync, as on the host; the container, its
/// neighbour in the pod and the pod carry on, and the space is usable
/// again once freed.
fn a_full_volume_gives_enospc_and_the_pod_carries_on(c: &Containerd) -> Result<()> {
    /// Unmounts the volume whatever happens.
    struct Mounted(std::path::PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            if let Ok(p) = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()) {
                // SAFETY: a NUL-terminated path; umount2 touches no memory of ours.
                unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
    let d = c.dir();
    let small = d.join("small-volume");
    std::fs::create_dir_all(&small)?;
    ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "podvisor-test-small"])
            .arg(&small),
        30,
    )?;
    let _mounted = Mounted(small.clone());
    let pod = pod_file(d, "full")?;
    let ctr = |name: &str, volume: bool| {
        let mounts = if volume {
            format!(
                r#","mounts":[{{"container_path":"/data","host_path":"{}"}}]"#,
                small.display()
            )
        } else {
            String::new()
        };
        json_file(
            d,
            &format!("full-{name}.json"),
            &format!(
                r#"{{"metadata":{{"name":"{name}"}},"image":{{"image":"docker.io/podvisor/busybox:latest"}},"command":["sleep","600"]{mounts},"linux":{{}}}}"#
            ),
        )
    };
    let (writer, neighbour) = (ctr("writer", true)?, ctr("neighbour", false)?);
    let sandbox = ok(&mut c.crictl(&["runp", "--runtime", "podvisor", &pod]), 180)?
        .trim()
        .to_string();
    let result = (|| -> Result<()> {
        let ids = start_containers(c, &sandbox, &pod, &[writer.as_str(), neighbour.as_str()])?;
        let exec =
            |id: &str, script: &str| ok(&mut c.crictl(&["exec", id, "sh", "-c", script]), 120);
        let out = exec(
            &ids[0],
            "dd if=/dev/zero of=/data/big bs=64k count=128 conv=fsync 2>&1; echo rc=$?",
        )?;
        ensure!(
            out.contains("No space left on device") && out.trim_end().ends_with("rc=1"),
            "writing 8 MiB to a 4 MiB volume: {out:?}"
        );
        let host = std::fs::metadata(small.join("big"))?.len();
        ensure!(host <= 4 << 20, "the host holds {host} bytes of the file");
        // The writer, its neighbour and the pod carry on.
        ensure!(
            exec(&ids[0], "echo alive")?.trim() == "alive",
            "the writer no longer answers"
        );
        let n = exec(
            &ids[1],
            "dd if=/dev/zero of=/tmp/f bs=64k count=16 conv=fsync 2>&1 && echo ok",
        )?;
        ensure!(
            n.trim_end().ends_with("ok"),
            "the neighbour cannot write: {n:?}"
        );
        let again = exec(
            &ids[0],
            "rm /data/big && echo fine > /data/after && cat /data/after",
        )?;
        ensure!(
            again.trim() == "fine",
            "after freeing the volume: {again:?}"
        );
        ensure!(
            std::fs::read_to_string(small.join("after"))?.trim() == "fine",
            "the host does not see the write after the space was freed"
        );
        remove_containers(c, &ids)
    })();
    let stopped = stop_pod(c, &sandbox);
    let unmounted = ok(Command::new("umount").arg(&small), 30);
    result.and(stopped).and(unmounted.map(|_| ()))
}

/// A container with no memory limit of its own eats all it can (`tail
/// /dev/zero` keeps growing its buffer): the cap the agent keeps on the
/// containers' parent stops it with a memory cgroup OOM kill (its end:
/// 137, OOMKilled), not the guest-wide OOM killer; its neighbour in the
/// pod and the agent serve on.
fn a_memory_hog_is_oom_killed_and_the_pod_carries_on(c: &Containerd) -> Result<()> {
    let d = c.dir();
    let pod = pod_file(d, "hog")?;
    let ctr = |name: &str, cmd: &str| busybox_container(d, "hog", name, cmd);
    let (neighbour, hog) = (
        ctr("neighbour", r#"["sleep","600"]"#)?,
        ctr("hog", r#"["tail","/dev/zero"]"#)?,
    );
    let sandbox = ok(&mut c.crictl(&["runp", "--runtime", "podvisor", &pod]), 180)?
        .trim()
        .to_string();
    let result = (|| -> Result<()> {
        let ids = start_containers(c, &sandbox, &pod, &[neighbour.as_str(), hog.as_str()])?;
        let status = wait_exited(c, &ids[1], 300).context("the hog")?;
        let (code, reason) = (
            status.pointer("/status/exitCode").and_then(|v| v.as_i64()),
            status.pointer("/status/reason").and_then(|v| v.as_str()),
        );
        ensure!(
            code == Some(137) && reason == Some("OOMKilled"),
            "the hog ended {code:?} ({reason:?}), not 137 (OOMKilled)"
        );
        let alive = ok(&mut c.crictl(&["exec", &ids[0], "echo", "alive"]), 60)?;
        ensure!(alive.trim() == "alive", "the neighbour answers {alive:?}");
        let log = console(&sandbox);
        ensure!(
            log.contains("Memory cgroup out of memory"),
            "the guest's console shows no memory cgroup OOM kill:\n{}",
            log.lines()
                .filter(|l| l.contains("memory") || l.contains("oom"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        remove_containers(c, &ids)
    })();
    let stopped = stop_pod(c, &sandbox);
    result.and(stopped)
}

/// A CRI container config of the busybox image running `cmd` (a JSON
/// array), in `d` as `<prefix>-<name>.json`.
fn busybox_container(d: &Path, prefix: &str, name: &str, cmd: &str) -> Result<String> {
    json_file(
        d,
        &format!("{prefix}-{name}.json"),
        &format!(
            r#"{{"metadata":{{"name":"{name}"}},"image":{{"image":"docker.io/podvisor/busybox:latest"}},"command":{cmd},"linux":{{}}}}"#
        ),
    )
}

/// Waits up to `secs` for CRI container `id` to have exited; its
/// `crictl inspect`.
fn wait_exited(c: &Containerd, id: &str, secs: u64) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let info: serde_json::Value =
            serde_json::from_str(&ok(&mut c.crictl(&["inspect", "-o", "json", id]), 60)?)?;
        if info.pointer("/status/state").and_then(|v| v.as_str()) == Some("CONTAINER_EXITED") {
            return Ok(info);
        }
        ensure!(Instant::now() < deadline, "still runs after {secs} s");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether a sandbox's virtiofsd (or a child of it) holds the file
/// `(dev, ino)` open.
fn virtiofsd_holds(sandbox: &str, (dev, ino): (u64, u64)) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let state = sandbox_state(sandbox)?;
    let pid = state["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "virtiofsd")
        .and_then(|p| p["pid"].as_u64())
        .and_then(|p| u32::try_from(p).ok())
        .context("no virtiofsd in the sandbox's state")?;
    for pid in with_descendants(pid) {
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
            if std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// A container's rootfs (a host mount in the sandbox's shared directory)
/// is a virtio-fs submount in the guest, which the agent holds until the
/// container is removed (so that no release of its files outlives the
/// submount's superblock: the guest kernel panics then) and then lets go
/// of. Seen from the host: virtiofsd holds the running container's rootfs
/// (its root directory, the submount's root) and lets go of it once the
/// container that ran and exited is removed; the pod's other container
/// carries on.
fn an_exited_container_lets_go_of_its_share_when_removed(c: &Containerd) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let d = c.dir();
    let pod = pod_file(d, "share")?;
    let ctr = |name: &str, cmd: &str| busybox_container(d, "share", name, cmd);
    let (keeper, short) = (
        ctr("keeper", r#"["sleep","600"]"#)?,
        ctr(
            "short",
            r#"["sh","-c","cat /bin/busybox >/dev/null; exit 3"]"#,
        )?,
    );
    let sandbox = ok(&mut c.crictl(&["runp", "--runtime", "podvisor", &pod]), 180)?
        .trim()
        .to_string();
    let result = (|| -> Result<()> {
        let ids = start_containers(c, &sandbox, &pod, &[keeper.as_str(), short.as_str()])?;
        let rootfs = Path::new(podvisor_names::paths::STATE_ROOT)
            .join(&sandbox)
            .join("shared")
            .join(&ids[1])
            .join("rootfs");
        let meta = std::fs::metadata(&rootfs).with_context(|| format!("{}", rootfs.display()))?;
        let root = (meta.dev(), meta.ino());
        ensure!(
            virtiofsd_holds(&sandbox, root)?,
            "virtiofsd does not hold the running container's rootfs"
        );
        let info = wait_exited(c, &ids[1], 120).context("the short container")?;
        let code = info.pointer("/status/exitCode").and_then(|v| v.as_i64());
        ensure!(code == Some(3), "the short container ended {code:?}, not 3");
        ok(&mut c.crictl(&["rm", &ids[1]]), 60)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while virtiofsd_holds(&sandbox, root)? {
            ensure!(
                Instant::now() < deadline,
                "virtiofsd still holds the removed container's rootfs after 20 s"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let alive = ok(&mut c.crictl(&["exec", &ids[0], "echo", "alive"]), 60)?;
        ensure!(alive.trim() == "alive", "the keeper answers {alive:?}");
        remove_containers(c, &ids[..1])
    })();
    let stopped = stop_pod(c, &sandbox);
    result.and(stopped)
}

/// A fork bomb: a container forks until the guest refuses. It takes the
/// task slots the agent leaves to containers (the cap on their parent
/// cgroup) and no more: its next fork fails ("can't fork"), while the
/// agent still forks from the slots it kept for itself, so an exec into
/// the neighbour and into the bomb's own container answer as the bomb
/// holds every slot it could get; memory never runs out (a task slot per
/// 256 KiB). The pod is the smallest (128 MiB) and the bomb forks waiting
/// shells in a loop rather than `:(){ :|:& };:`: the same exhaustion,
/// without hundreds of runnable shells that TCG could not run in a test's
/// time.
fn a_fork_bomb_meets_the_task_cap_and_the_agent_keeps_serving(c: &Containerd) -> Result<()> {
    let d = c.dir();
    let logs = d.join("logs-bomb");
    std::fs::create_dir_all(&logs)?;
    let pod = json_file(
        d,
        "bomb-pod.json",
        &format!(
            r#"{{"metadata":{{"name":"bomb","namespace":"default","uid":"bomb-uid","attempt":0}},"annotations":{{"{}":"128"}},"log_directory":"{}","linux":{{"cgroup_parent":"{}"}}}}"#,
            podvisor_names::annotations::MEMORY_MIB,
            logs.display(),
            pod_cgroup("bomb")
        ),
    )?;
    let ctr = |name: &str, cmd: &str| {
        json_file(
            d,
            &format!("bomb-{name}.json"),
            &format!(
                r#"{{"metadata":{{"name":"{name}"}},"image":{{"image":"docker.io/podvisor/busybox:latest"}},"command":{cmd},"log_path":"{name}.log","linux":{{}}}}"#
            ),
        )
    };
    let (neighbour, bomb) = (
        ctr("neighbour", r#"["sleep","600"]"#)?,
        // The forking subshell ends at the first refused fork; its
        // children (forked shells waiting to open a FIFO: no exec) stay,
        // held by the container's init, which then waits on the FIFO too.
        ctr(
            "bomb",
            r#"["sh","-c","mkfifo /tmp/hold; (while :; do read x < /tmp/hold & done) 2>&1; echo bomb stopped; read x < /tmp/hold"]"#,
        )?,
    );
    let sandbox = ok(&mut c.crictl(&["runp", "--runtime", "podvisor", &pod]), 180)?
        .trim()
        .to_string();
    let result = (|| -> Result<()> {
        let ids = start_containers(c, &sandbox, &pod, &[neighbour.as_str(), bomb.as_str()])?;
        let deadline = Instant::now() + Duration::from_secs(600);
        let log = loop {
            let log = ok(&mut c.crictl(&["logs", &ids[1]]), 60)?;
            if log.contains("bomb stopped") {
                break log;
            }
            ensure!(
                Instant::now() < deadline,
                "the bomb still forks after 600 s:\n{log}"
            );
            std::thread::sleep(Duration::from_secs(2));
        };
        ensure!(
            log.contains("can't fork: Resource temporarily unavailable"),
            "the bomb stopped, but not on a refused fork:\n{log}"
        );
        let alive = ok(&mut c.crictl(&["exec", &ids[0], "echo", "alive"]), 120)?;
        ensure!(alive.trim() == "alive", "the neighbour answers {alive:?}");
        // The bomb's own cgroup, seen from inside it: its sleepers, and
        // the exec itself.
        let tasks: u64 = ok(
            &mut c.crictl(&["exec", &ids[1], "cat", "/sys/fs/cgroup/pids.current"]),
            120,
        )?
        .trim()
        .parse()?;
        ensure!(
            tasks > 100,
            "the bomb holds {tasks} tasks: it stopped before the cap"
        );
        let log = console(&sandbox);
        ensure!(
            !log.contains("out of memory"),
            "the bomb ran the memory out before the task cap:\n{}",
            log.lines()
                .filter(|l| l.contains("memory"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        println!("    the bomb got {tasks} tasks; the agent and the neighbour answered");
        remove_containers(c, &ids)
    })();
    let stopped = stop_pod(c, &sandbox);
    result.and(stopped)
}

/// A host restart that kept /run/podvisor (not a tmpfs): a sandbox
/// directory whose state names another boot is removed when the next pod
/// starts, and the pid it records, now some other process's (with the
/// very start time), is not killed; a directory with no state yet (a pod
/// starting) is left alone. containerd's `delete` of such a sandbox kills
/// nothing either.
fn state_of_another_boot_is_removed_killing_nothing(c: &Containerd) -> Result<()> {
    let root = Path::new(podvisor_names::paths::STATE_ROOT);
    let tag = std::process::id();
    let (stale, deleted, starting) = (
        root.join(format!("stale-{tag}")),
        root.join(format!("deleted-{tag}")),
        root.join(format!("starting-{tag}")),
    );
    let mut sleeper = Command::new("sleep").arg("600").spawn()?;
    let pid = sleeper.id();
    // As the shim writes it, in a boot that is not this one.
    let left_by_another_boot = |dir: &Path, start_time: u64| -> Result<()> {
        std::fs::create_dir_all(dir.join("vm"))?;
        std::fs::create_dir_all(dir.join("shared/c1/rootfs"))?;
        std::fs::write(dir.join("vm/console.log"), "another boot's console\n")?;
        std::fs::write(
            dir.join("state.json"),
            serde_json::json!({
                "sandbox_id": dir.file_name().unwrap().to_string_lossy(),
                "hypervisor": "qemu",
                "processes": [{"name": "qemu-system-x86_64", "pid": pid, "start_time": start_time}],
                "boot_id": "00000000-0000-4000-8000-000000000000",
            })
            .to_string(),
        )?;
        Ok(())
    };
    let result = (|| -> Result<()> {
        let start_time = podvisor_hypervisor::process::process_start_time(pid)
            .context("the sleeper's start time")?;
        left_by_another_boot(&stale, start_time)?;
        left_by_another_boot(&deleted, start_time)?;
        std::fs::create_dir_all(&starting)?;
        ok(c.ctr_run(&["--rm"], "next-boot", &["true"]), 180)?;
        ensure!(
            !stale.exists() && !deleted.exists(),
            "another boot's sandbox directories were kept"
        );
        ensure!(
            starting.exists(),
            "a directory with no state yet was removed"
        );
        ensure!(
            sleeper.try_wait()?.is_none(),
            "pid {pid}, recorded by another boot, was killed"
        );
        // containerd's cleanup of a sandbox another boot recorded.
        left_by_another_boot(&deleted, start_time)?;
        let shim = podvisor_testkit::containerd::shim_dir()?.join("containerd-shim-podvisor-v2");
        let empty = tempfile::tempdir()?;
        let id = format!("deleted-{tag}");
        let address = c.address.display().to_string();
        // As containerd runs it: in the bundle (here none), with its
        // ttrpc address in the environment.
        ok(
            Command::new(shim)
                .current_dir(empty.path())
                .env("TTRPC_ADDRESS", format!("{address}.ttrpc"))
                .args([
                    "-namespace",
                    podvisor_testkit::containerd::NAMESPACE,
                    "-address",
                    &address,
                    "-id",
                    &id,
                    "delete",
                ]),
            60,
        )?;
        ensure!(!deleted.exists(), "delete kept {}", deleted.display());
        ensure!(
            sleeper.try_wait()?.is_none(),
            "delete killed pid {pid}, recorded by another boot"
        );
        Ok(())
    })();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let _ = std::fs::remove_dir_all(&starting);
    let _ = std::fs::remove_dir_all(&stale);
    let _ = std::fs::remove_dir_all(&deleted);
    result
}

fn twenty_create_delete_cycles_leave_nothing(c: &Containerd) -> Result<()> {
    let log_before = c.log().len();
    for i in 0..20 {
        let out = run(c.ctr_run(&["--rm"], &format!("cycle-{i}"), &["true"]), 180)?;
        ensure!(out.status.success(), "cycle {i}: {}", text(&out));
        wait_clean().with_context(|| format!("after cycle {i}"))?;
    }
    let cs = ok(&mut c.ctr(&["containers", "ls", "-q"]), 30)?;
    ensure!(cs.trim().is_empty(), "containers left: {cs}");
    // Helpers end with their VM on every poweroff: none is blamed for it.
    let log = c.log().get(log_before..).unwrap_or_default().to_string();
    ensure!(
        !log.contains("under a running VM"),
        "a helper was blamed for a VM's poweroff:\n{}",
        log.lines()
            .filter(|l| l.contains("under a running VM"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

fn pod_file(d: &Path, name: &str) -> Result<String> {
    json_file(
        d,
        &format!("{name}-pod.json"),
        &format!(
            r#"{{"metadata":{{"name":"{name}","namespace":"default","uid":"{name}-uid","attempt":0}},"hostname":"{name}","dns_config":{{"servers":["10.88.77.53"],"searches":["podvisor.test"]}},"linux":{{"cgroup_parent":"{}"}}}}"#,
            pod_cgroup(name)
        ),
    )
}

/// A busybox httpd on port 8080 serving `body`.
fn web_file(d: &Path, body: &str) -> Result<String> {
    json_file(
        d,
        "web.json",
        &format!(
            r#"{{"metadata":{{"name":"web"}},"image":{{"image":"docker.io/podvisor/busybox:latest"}},"command":["sh","-c","mkdir -p /www && echo {body} > /www/index.html && exec httpd -f -p 8080 -h /www"],"linux":{{}}}}"#
        ),
    )
}

/// A podvisor pod running the web container: (sandbox id, container id, pod IP, netns path).
fn web_pod(c: &Containerd, name: &str, body: &str) -> Result<(String, String, String, String)> {
    let pod = pod_file(c.dir(), name)?;
    let web = web_file(c.dir(), body)?;
    let sandbox = ok(&mut c.crictl(&["runp", "--runtime", "podvisor", &pod]), 180)?
        .trim()
        .to_string();
    let id = ok(&mut c.crictl(&["create", &sandbox, &web, &pod]), 120)?
        .trim()
        .to_string();
    ok(&mut c.crictl(&["start", &id]), 120)?;
    let info: serde_json::Value = serde_json::from_str(&ok(
        &mut c.crictl(&["inspectp", "-o", "json", &sandbox]),
        60,
    )?)?;
    let ip = info
        .pointer("/status/network/ip")
        .and_then(|v| v.as_str())
        .context("no pod IP in inspectp")?
        .to_string();
    let netns = info
        .pointer("/info/runtimeSpec/linux/namespaces")
        .and_then(|v| v.as_array())
        .and_then(|a| a.iter().find(|n| n["type"] == "network"))
        .and_then(|n| n["path"].as_str())
        .context("no network namespace in inspectp")?
        .to_string();
    Ok((sandbox, id, ip, netns))
}

/// GET / from `ip:8080` until it answers (the guest may still be starting httpd).
fn http_get(ip: &str) -> Result<String> {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let addr: std::net::SocketAddr = format!("{ip}:8080")
                .parse()
                .map_err(std::io::Error::other)?;
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match attempt {
            Ok(body) if body.starts_with("HTTP/1") => return Ok(body),
            _ if Instant::now() > deadline => bail!("no HTTP answer from {ip}:8080: {attempt:?}"),
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// StopPodSandbox, then RemovePodSandbox once the pod reads NotReady.
/// containerd 2.x's CRI store learns of the sandbox's exit from an event
/// that may come after StopPodSandbox returns (for runc's pods too), and
/// crictl refuses to remove a pod it still reads Ready; kubelet polls the
/// status the same way.
fn stop_pod(c: &Containerd, sandbox: &str) -> Result<()> {
    ok(&mut c.crictl(&["stopp", sandbox]), 120)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info: serde_json::Value = serde_json::from_str(&ok(
            &mut c.crictl(&["inspectp", "-o", "json", sandbox]),
            60,
        )?)?;
        let state = info
            .pointer("/status/state")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        if state == "SANDBOX_NOTREADY" {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{sandbox} still reads {state:?} 30 s after StopPodSandbox"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    ok(&mut c.crictl(&["rmp", sandbox]), 120)?;
    Ok(())
}

fn network_pod_serves_http_reaches_host_and_peer(c: &Containerd) -> Result<()> {
    let (a, web_a, ip_a, netns_a) = web_pod(c, "neta", "hello-from-pod-a")?;
    let body = http_get(&ip_a)?;
    ensure!(
        body.contains("hello-from-pod-a"),
        "host GET {ip_a}:8080 answered {body:?}"
    );

    // The guest NIC has CNI's address and the veth's MAC.
    let veth: serde_json::Value = serde_json::from_str(&ok(
        Command::new("nsenter")
            .arg(format!("--net={netns_a}"))
            .args(["ip", "-j", "link", "show", "eth0"]),
        30,
    )?)?;
    let mac = veth[0]["address"].as_str().context("veth MAC")?.to_string();
    let guest = ok(
        &mut c.crictl(&["exec", "-s", &web_a, "ip", "addr", "show", "eth0"]),
        60,
    )?;
    ensure!(
        guest.contains(&format!("inet {ip_a}/24")) && guest.contains(&mac),
        "guest eth0 lacks {ip_a} or {mac}:\n{guest}"
    );

    // DNS and hostname from the pod's CRI config reach the container.
    let etc = ok(
        &mut c.crictl(&[
            "exec",
            "-s",
            &web_a,
            "sh",
            "-c",
            "cat /etc/resolv.conf; hostname",
        ]),
        60,
    )?;
    ensure!(
        etc.contains("nameserver 10.88.77.53")
            && etc.contains("search podvisor.test")
            && etc.lines().any(|l| l.trim() == "neta"),
        "resolv.conf and hostname in the pod:\n{etc}"
    );

    // The host's bridge answers the pod.
    ok(
        &mut c.crictl(&[
            "exec",
            "-s",
            &web_a,
            "ping",
            "-c",
            "1",
            "-W",
            "20",
            "10.88.77.1",
        ]),
        60,
    )?;

    // A second pod is reachable from the first by IP.
    let (b, _, ip_b, netns_b) = web_pod(c, "netb", "hello-from-pod-b")?;
    let from_a = ok(
        &mut c.crictl(&[
            "exec",
            "-s",
            &web_a,
            "sh",
            "-c",
            &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 20 {ip_b} 8080"),
        ]),
        60,
    )?;
    ensure!(
        from_a.contains("hello-from-pod-b"),
        "pod A got {from_a:?} from pod B"
    );
    // Each VM attached to its taps as its own unprivileged id.
    distinct_vm_ids(&[&a, &b])?;

    stop_pod(c, &a)?;
    stop_pod(c, &b)?;
    for ns in [&netns_a, &netns_b] {
        ensure!(
            !Path::new(ns).exists(),
            "network namespace {ns} left behind"
        );
    }
    Ok(())
}

/// `crictl port-forward` (what `kubectl port-forward` does through the
/// kubelet) reaches a server in the guest; a port nothing serves in the
/// guest gets its connection closed.
fn network_port_forward_reaches_the_guest(c: &Containerd) -> Result<()> {
    use std::io::Read;
    let (sandbox, _, _, _) = web_pod(c, "fwd", "hello-through-port-forward")?;
    let mut forward = c
        .crictl(&["port-forward", &sandbox, "18080:8080", "18081:8081"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let get = |port: u16| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    let result = (|| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let body = loop {
            match get(18080) {
                Ok(b) if b.starts_with("HTTP/1") => break b,
                other if Instant::now() > deadline => {
                    bail!("no answer through port-forward: {other:?}")
                }
                _ => std::thread::sleep(Duration::from_millis(500)),
            }
        };
        ensure!(
            body.contains("hello-through-port-forward"),
            "through port-forward: {body:?}"
        );
        let nothing = get(18081);
        ensure!(
            !matches!(&nothing, Ok(b) if !b.is_empty()),
            "port 8081 (nothing listens in the guest) answered {nothing:?}"
        );
        Ok(())
    })();
    let _ = forward.kill();
    let _ = forward.wait();
    stop_pod(c, &sandbox)?;
    result
}

fn netns_count() -> usize {
    std::fs::read_dir("/var/run/netns")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn network_ten_pod_cycles_leave_nothing(c: &Containerd) -> Result<()> {
    let before = netns_count();
    let pod = pod_file(c.dir(), "cycle")?;
    for i in 0..10 {
        let sandbox = ok(&mut c.crictl(&["runp", "--runtime", "podvisor", &pod]), 180)
            .with_context(|| format!("cycle {i}"))?
            .trim()
            .to_string();
        stop_pod(c, &sandbox).with_context(|| format!("cycle {i}"))?;
    }
    wait_clean()?;
    ensure!(
        netns_count() == before,
        "{} network namespaces before, {} after",
        before,
        netns_count()
    );
    Ok(())
}

/// Ten pods started at once (RunPodSandbox, CreateContainer and
/// StartContainer from ten threads) all run, each in a VM of its own: each
/// container sees its own hostname, pod IP and guest boot id (not the
/// host's), its log holds its own lines and no other pod's, and the VMs
/// run as ten different ids.
fn network_ten_pods_started_at_once_are_distinct(c: &Containerd) -> Result<()> {
    const PODS: usize = 10;
    let d = c.dir();
    let start = |i: usize| -> Result<(String, String, String)> {
        let name = format!("many{i}");
        let logs = d.join(format!("logs-{name}"));
        std::fs::create_dir_all(&logs)?;
        let pod = json_file(
            d,
            &format!("{name}-pod.json"),
            &format!(
                r#"{{"metadata":{{"name":"{name}","namespace":"default","uid":"{name}-uid","attempt":0}},"hostname":"{name}","log_directory":"{}","linux":{{"cgroup_parent":"{}"}}}}"#,
                logs.display(),
                pod_cgroup(&name)
            ),
        )?;
        let script = format!(
            "hostname; cat /proc/sys/kernel/random/boot_id; ip addr show eth0; \
             for i in 1 2 3 4 5 6 7 8; do echo {name}-says-$i; done; exec sleep 600"
        );
        let ctr = json_file(
            d,
            &format!("{name}-ctr.json"),
            &format!(
                r#"{{"metadata":{{"name":"say"}},"image":{{"image":"docker.io/podvisor/busybox:latest"}},"command":["sh","-c","{script}"],"log_path":"say.log","linux":{{}}}}"#
            ),
        )?;
        let sandbox = ok(&mut c.crictl(&["runp", "--runtime", "podvisor", &pod]), 300)
            .with_context(|| format!("{name}: RunPodSandbox"))?
            .trim()
            .to_string();
        let id = ok(&mut c.crictl(&["create", &sandbox, &ctr, &pod]), 180)
            .with_context(|| format!("{name}: CreateContainer"))?
            .trim()
            .to_string();
        ok(&mut c.crictl(&["start", &id]), 180)
            .with_context(|| format!("{name}: StartContainer"))?;
        Ok((name, sandbox, id))
    };
    let started: Vec<Result<(String, String, String)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PODS).map(|i| s.spawn(move || start(i))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a starter panicked")))
            })
            .collect()
    });
    let sandboxes: Vec<String> = ok(&mut c.crictl(&["pods", "-q"]), 60)?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let result = (|| -> Result<()> {
        let pods = started.into_iter().collect::<Result<Vec<_>>>()?;
        let host_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
        let (mut boots, mut ips) = (Vec::new(), Vec::new());
        for (name, _, id) in &pods {
            // All its lines, then the sleep.
            let deadline = Instant::now() + Duration::from_secs(60);
            let log = loop {
                let log = ok(&mut c.crictl(&["logs", id]), 60)?;
                if log.contains(&format!("{name}-says-8")) || Instant::now() > deadline {
                    break log;
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            let lines: Vec<&str> = log.lines().collect();
            ensure!(lines.len() >= 2, "{name}'s log: {log:?}");
            ensure!(
                lines[0].trim() == name,
                "{name}'s hostname is {:?}",
                lines[0]
            );
            let boot = lines[1].trim().to_string();
            ensure!(
                !boot.is_empty() && boot != host_boot.trim(),
                "{name}'s boot id {boot:?}"
            );
            boots.push(boot);
            let ip = lines
                .iter()
                .find_map(|l| l.trim().strip_prefix("inet "))
                .and_then(|a| a.split('/').next())
                .with_context(|| format!("{name}: no address on eth0:\n{log}"))?;
            ips.push(ip.to_string());
            let own = (1..=8)
                .filter(|i| lines.contains(&format!("{name}-says-{i}").as_str()))
                .count();
            ensure!(own == 8, "{name}'s log has {own} of its 8 lines:\n{log}");
            for (other, _, _) in &pods {
                ensure!(
                    other == name || !log.contains(&format!("{other}-says-")),
                    "{name}'s log carries {other}'s output:\n{log}"
                );
            }
        }
        for (what, mut v) in [("boot ids", boots), ("pod IPs", ips)] {
            v.sort();
            v.dedup();
            ensure!(
                v.len() == PODS,
                "{} distinct {what} for {PODS} pods",
                v.len()
            );
        }
        let ids: Vec<&str> = pods.iter().map(|(_, s, _)| s.as_str()).collect();
        distinct_vm_ids(&ids)
    })();
    // Stopped at once too.
    let stopped: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = sandboxes
            .iter()
            .map(|sb| s.spawn(move || stop_pod(c, sb)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a stopper panicked")))
            })
            .collect()
    });
    result?;
    stopped.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(())
}

/// A sandbox's state.json, as the shim wrote it.
fn sandbox_state(sandbox: &str) -> Result<serde_json::Value> {
    let path = Path::new(podvisor_names::paths::STATE_ROOT)
        .join(sandbox)
        .join("state.json");
    Ok(serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )?)
}

/// The hypervisor a sandbox's state records ("qemu/tcg (from template)").
fn sandbox_hypervisor(sandbox: &str) -> Result<String> {
    Ok(sandbox_state(sandbox)?["hypervisor"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// The id each sandbox's VM runs as, from outside: its VM process and
/// vsock helper (as state.json records them) share one uid, never root's,
/// and no two of `sandboxes` share one.
fn distinct_vm_ids(sandboxes: &[&str]) -> Result<()> {
    let mut ids = Vec::new();
    for sandbox in sandboxes {
        let state = sandbox_state(sandbox)?;
        let mut uids = Vec::new();
        for p in state["processes"].as_array().into_iter().flatten() {
            let name = p["name"].as_str().unwrap_or_default();
            if name == "virtiofsd" {
                continue;
            }
            let pid = p["pid"].as_u64().unwrap_or_default();
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
            let uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().next())
                .unwrap_or_default()
                .to_string();
            uids.push((name.to_string(), uid));
        }
        ensure!(
            !uids.is_empty() && uids.iter().all(|(_, u)| u != "0" && *u == uids[0].1),
            "sandbox {sandbox}: its VM's processes run as {uids:?}"
        );
        ids.push(uids[0].1.clone());
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    ensure!(
        unique.len() == ids.len(),
        "sandboxes {sandboxes:?} share ids: {ids:?}"
    );
    Ok(())
}

fn console(sandbox: &str) -> String {
    std::fs::read_to_string(
        Path::new(podvisor_names::paths::STATE_ROOT)
            .join(sandbox)
            .join(podvisor_hypervisor::VM_DIR)
            .join("console.log"),
    )
    .unwrap_or_default()
}

fn warm_clones_are_distinct_guests(c: &Containerd) -> Result<()> {
    let release = manifest("kernel_release")?;
    let (a, web_a, ip_a, _) = web_pod(c, "warma", "hello-from-clone-a")?;
    let (b, web_b, ip_b, _) = web_pod(c, "warmb", "hello-from-clone-b")?;
    let result = (|| -> Result<()> {
        let exec = |ctr: &str, script: &str| -> Result<String> {
            ok(&mut c.crictl(&["exec", ctr, "sh", "-c", script]), 60)
        };
        let mut random = Vec::new();
        for (sandbox, ctr, ip, name) in [(&a, &web_a, &ip_a, "warma"), (&b, &web_b, &ip_b, "warmb")]
        {
            let hv = sandbox_hypervisor(sandbox)?;
            ensure!(hv.ends_with("(from template)"), "{name} booted cold: {hv}");
            let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
            let out = exec(
                ctr,
                "uname -r; hostname; date +%s; head -c 16 /dev/urandom | od -An -tx1",
            )?;
            let after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
            let lines: Vec<&str> = out.lines().collect();
            ensure!(lines.len() >= 4, "{name}: {out}");
            ensure!(
                lines[0].trim() == release,
                "{name} runs kernel {:?}, not the guest's {release}",
                lines[0]
            );
            ensure!(
                lines[1].trim() == name,
                "{name}'s hostname is {:?}",
                lines[1]
            );
            let guest: u64 = lines[2].trim().parse().context("guest date")?;
            ensure!(
                guest + 1 >= before.as_secs() && guest <= after.as_secs() + 1,
                "{name}'s clock says {guest}, the host's was {}..{}",
                before.as_secs(),
                after.as_secs()
            );
            random.push(lines[3..].join(" "));
            let con = console(sandbox);
            ensure!(
                con.contains("the kernel reseeded its RNG"),
                "{name}: no RNG reseed reported on the console:\n{con}"
            );
            let body = http_get(ip)?;
            ensure!(
                body.contains(&format!("hello-from-clone-{}", &name[4..])),
                "GET {ip}: {body:?}"
            );
        }
        ensure!(
            random[0] != random[1],
            "both clones read the same /dev/urandom bytes: {random:?}"
        );
        distinct_vm_ids(&[&a, &b])?;
        exec(&web_a, "echo only-a > /clone-a-file")?;
        let seen = exec(&web_b, "ls /clone-a-file 2>&1 || true")?;
        ensure!(
            seen.contains("No such file"),
            "a file written in clone a shows in clone b: {seen}"
        );
        ensure!(ip_a != ip_b, "both clones have IP {ip_a}");
        Ok(())
    })();
    stop_pod(c, &a)?;
    stop_pod(c, &b)?;
    result
}

/// The template directories in `c`'s template store.
fn templates(c: &Containerd) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(c.dir().join("templates"))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Runs a pod with one container to its start; returns how its VM started
/// (see `sandbox_hypervisor`) and stops it.
fn pod_start_kind(c: &Containerd, name: &str) -> Result<String> {
    let (sandbox, ctr, _, _) = web_pod(c, name, name)?;
    let kind = sandbox_hypervisor(&sandbox);
    let ran = ok(&mut c.crictl(&["exec", &ctr, "echo", "ran"]), 60);
    stop_pod(c, &sandbox)?;
    ensure!(ran?.trim() == "ran", "{name}: exec did not run");
    kind
}

fn warm_changed_or_damaged_templates(c: &Containerd) -> Result<()> {
    let warm = |k: &str| k.ends_with("(from template)");
    ensure!(
        warm(&pod_start_kind(c, "warm1")?),
        "a pod of the default shape did not start warm"
    );
    let before = templates(c);
    ensure!(
        !before.is_empty(),
        "no template in {}",
        c.dir().join("templates").display()
    );

    // A changed input (the node's default memory) makes a new template.
    let config = std::fs::read_to_string(&c.podvisor_config)?;
    std::fs::write(
        &c.podvisor_config,
        format!("default_memory_mib = 320\n{config}"),
    )?;
    let changed = pod_start_kind(c, "warm2");
    std::fs::write(&c.podvisor_config, &config)?;
    ensure!(warm(&changed?), "a pod of the new shape did not start warm");
    let after = templates(c);
    ensure!(
        after.len() == before.len() + 1,
        "templates before {before:?}, after {after:?}"
    );

    // A damaged template of the default shape: the pod starts cold, the
    // shim says why and removes it; the next pod rebuilds it.
    let default_shape = before
        .iter()
        .find(|t| {
            std::fs::read(t.join("manifest.json"))
                .ok()
                .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m).ok())
                .is_some_and(|m| m["vcpus"] == 1 && m["memory_mib"] == 512)
        })
        .context("no template of the default shape (1 vCPU, 512 MiB)")?
        .clone();
    let flip = |t: &Path| -> Result<()> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(t.join("memory"))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 1u64 << 20;
        loop {
            let n = f.read_at(&mut buf, off)?;
            ensure!(n > 0, "no data in {}", t.display());
            if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                f.write_all_at(&[buf[i] ^ 0x40], off + i as u64)?;
                return Ok(());
            }
            off += n as u64;
        }
    };
    for (what, damage) in [
        (
            "a flipped byte in its memory",
            Box::new(|t: &Path| flip(t)) as Box<dyn Fn(&Path) -> Result<()>>,
        ),
        (
            "its state truncated",
            Box::new(|t: &Path| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(t.join("state"))?;
                f.set_len(f.metadata()?.len() / 2)?;
                Ok(())
            }),
        ),
    ] {
        damage(&default_shape)?;
        let mark = c.log().len();
        let kind = pod_start_kind(c, "warm3")?;
        ensure!(
            !warm(&kind),
            "a pod started from a template with {what}: {kind}"
        );
        let log = c.log();
        ensure!(
            log.get(mark..)
                .is_some_and(|l| l.contains("cold boot") && l.contains("unusable, removed")),
            "the shim did not say why the pod booted cold ({what})"
        );
        ensure!(!default_shape.exists(), "the template with {what} was kept");
        ensure!(
            warm(&pod_start_kind(c, "warm4")?),
            "the template was not rebuilt after {what}"
        );
        ensure!(default_shape.exists(), "the rebuilt template is elsewhere");
    }
    Ok(())
}

fn warm_concurrent_first_pods_build_one_template(c: &Containerd) -> Result<()> {
    for t in templates(c) {
        std::fs::remove_dir_all(&t)?;
    }
    let mark = c.log().len();
    let kinds: Vec<Result<String>> = std::thread::scope(|s| {
        let pods: Vec<_> = (0..3)
            .map(|i| s.spawn(move || pod_start_kind(c, &format!("first{i}"))))
            .collect();
        pods.into_iter()
            .map(|p| p.join().unwrap_or_else(|_| bail!("pod thread panicked")))
            .collect()
    });
    for k in kinds {
        let k = k?;
        ensure!(
            k.ends_with("(from template)"),
            "a first pod did not start warm: {k}"
        );
    }
    let built = templates(c);
    ensure!(built.len() == 1, "three first pods built {built:?}");
    let log = c.log();
    let builds = log.get(mark..).map_or(0, |l| l.matches("built in").count());
    ensure!(builds == 1, "the template was built {builds} times");
    Ok(())
}

/// The pool VMs ready now (`/run/podvisor/_pool/<shape>/<id>/`).
fn pool_vms() -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for shape in std::fs::read_dir(podvisor_names::paths::POOL_ROOT)
        .into_iter()
        .flatten()
        .flatten()
    {
        for vm in std::fs::read_dir(shape.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = vm.path();
            // Ready ones are named by their id alone (no suffix).
            if p.is_dir() && !vm.file_name().to_string_lossy().contains('.') {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Waits for `n` ready pool VMs, none of them one of `old`.
fn wait_pool(n: usize, old: &[std::path::PathBuf]) -> Result<Vec<std::path::PathBuf>> {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let vms = pool_vms();
        if vms.len() >= n && vms.iter().all(|v| !old.contains(v)) {
            return Ok(vms);
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(
                Path::new(podvisor_names::paths::POOL_ROOT).join(podvisor_names::pool::FILL_LOG),
            )
            .unwrap_or_default();
            bail!("the pool holds {vms:?}, not {n} new VM(s); fill.log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The pids a pool VM's or a sandbox's record names (its `pool.json` or
/// `state.json`), the VM process first.
fn recorded_pids(file: &Path) -> Result<Vec<u32>> {
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(file).with_context(|| format!("reading {}", file.display()))?,
    )?;
    Ok(v["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["pid"].as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect())
}

fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or_default()
            .trim_start()
            .starts_with('Z')
    })
}

fn warm_pool_hands_out_and_refills(c: &Containerd) -> Result<()> {
    let config = std::fs::read_to_string(&c.podvisor_config)?;
    // Room for one 512 MiB VM: the second of pool_size 2 would pass it.
    std::fs::write(
        &c.podvisor_config,
        config.replace("[warm]\n", "[warm]\npool_size = 2\npool_max_mib = 800\n"),
    )?;
    let mut sleeper = Command::new("sleep").arg("600").spawn()?;
    let result = (|| -> Result<()> {
        // The first pod of the shape starts the filler.
        pod_start_kind(c, "pool0")?;
        let ready = wait_pool(1, &[])?;
        let pool_pids = recorded_pids(&ready[0].join(podvisor_names::pool::RECORD))?;
        ensure!(
            pool_pids.len() == 3 && pool_pids.iter().all(|p| running(*p)),
            "pool VM processes {pool_pids:?}"
        );
        // A record of another host boot: removed, its pid left alone.
        let stale = ready[0].with_file_name("0000stale");
        std::fs::create_dir_all(stale.join("shared"))?;
        let start = std::fs::read_to_string(format!("/proc/{}/stat", sleeper.id()))?;
        let start_time: u64 = start
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(19))
            .and_then(|t| t.parse().ok())
            .context("start time")?;
        std::fs::write(
            stale.join(podvisor_names::pool::RECORD),
            serde_json::json!({"boot_id": "another-boot", "memory_mib": 512,
                "processes": [{"name": "qemu", "pid": sleeper.id(), "start_time": start_time}]})
            .to_string(),
        )?;

        // The next pod takes the pool VM: same processes, now its VM.
        let fill_log =
            Path::new(podvisor_names::paths::POOL_ROOT).join(podvisor_names::pool::FILL_LOG);
        let mark = std::fs::read_to_string(&fill_log)?.len();
        let (sandbox, ctr, ip, _) = web_pod(c, "pool1", "hello-from-pool")?;
        let hv = sandbox_hypervisor(&sandbox)?;
        ensure!(
            hv.ends_with("(from pool)"),
            "the pod did not start from the pool: {hv}"
        );
        let state = Path::new(podvisor_names::paths::STATE_ROOT)
            .join(&sandbox)
            .join("state.json");
        ensure!(
            recorded_pids(&state)? == pool_pids,
            "the sandbox's processes are not the pool VM's {pool_pids:?}"
        );
        ensure!(!ready[0].exists(), "the pool VM taken is still in the pool");
        // Moved into the pod's cgroup, helpers' children too.
        let leaf = format!("{}/{sandbox}", pod_cgroup("pool1"));
        let taken: Vec<u32> = pool_pids
            .iter()
            .flat_map(|&p| with_descendants(p))
            .collect();
        all_in_cgroup(&taken, &leaf)?;
        let out = ok(
            &mut c.crictl(&["exec", &ctr, "sh", "-c", "uname -r; hostname"]),
            60,
        )?;
        let release = manifest("kernel_release")?;
        ensure!(
            out.lines().collect::<Vec<_>>() == [release.as_str(), "pool1"],
            "the pooled pod says {out:?} (kernel {release}, hostname pool1 expected)"
        );
        let body = http_get(&ip)?;
        ensure!(body.contains("hello-from-pool"), "GET {ip}: {body:?}");

        // Refilled with a new VM, and only one: the memory bound holds
        // (checked once the filler has finished).
        let refilled = wait_pool(1, &ready)?;
        // The pool outlives pods: not in one's cgroup.
        for pid in recorded_pids(&refilled[0].join(podvisor_names::pool::RECORD))? {
            for (controllers, path) in cgroups_of(pid)? {
                ensure!(
                    !path.starts_with(&format!("/{}", test_cgroup_root())),
                    "pool VM process {pid} is in a pod's cgroup {controllers}:{path}"
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let log = loop {
            let log = std::fs::read_to_string(&fill_log)?;
            let since = log.get(mark..).unwrap_or_default().to_string();
            if since.contains("VM(s) added") {
                break since;
            }
            ensure!(
                Instant::now() < deadline,
                "the filler did not finish:\n{since}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        ensure!(
            pool_vms().len() == 1,
            "pool_max_mib 800 admits one 512 MiB VM; the pool holds {:?}",
            pool_vms()
        );
        ensure!(
            log.contains("pool_max_mib") && log.contains("1 VM(s) added"),
            "the filler did not stop at the memory bound:\n{log}"
        );
        ensure!(!stale.exists(), "a pool record of another boot was kept");

        // containerd restarts: the pooled pod and the pool run on.
        c.restart()?;
        let out = ok(&mut c.crictl(&["exec", &ctr, "hostname"]), 60)?;
        ensure!(out.trim() == "pool1", "after a containerd restart: {out:?}");
        ensure!(
            pool_vms() == refilled
                && refilled
                    .iter()
                    .flat_map(|v| recorded_pids(&v.join(podvisor_names::pool::RECORD))
                        .unwrap_or_default())
                    .all(running),
            "the pool changed across a containerd restart: {:?} -> {:?}",
            refilled,
            pool_vms()
        );
        ensure!(
            sleeper.try_wait()?.is_none(),
            "a pid recorded in another boot's pool record was killed"
        );

        // The pooled pod's shim dies: containerd's cleanup ends its VM.
        let shim: Vec<u32> = leftover_processes()
            .iter()
            .filter(|p| p.contains("containerd-shim-podvisor-v2") && p.contains(&sandbox))
            .filter_map(|p| p.split(' ').next()?.parse().ok())
            .collect();
        ensure!(
            shim.len() == 1,
            "expected one shim for {sandbox}, found {shim:?}"
        );
        // SAFETY: kill(2) on the shim just found.
        unsafe { libc::kill(i32::try_from(shim[0])?, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while pool_pids.iter().any(|p| running(*p)) || state.exists() {
            ensure!(
                Instant::now() < deadline,
                "the pooled VM {pool_pids:?} or {} outlived its killed shim",
                state.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = run(&mut c.crictl(&["stopp", &sandbox]), 120);
        let _ = run(&mut c.crictl(&["rmp", &sandbox]), 120);
        ensure!(
            refilled.iter().all(|v| v.exists()),
            "the refilled VM went away"
        );

        // A pool VM whose QEMU died while idle is not handed out: the pod
        // is restored from the template, and the filler it starts removes
        // the dead VM (its helpers killed).
        let dead = recorded_pids(&refilled[0].join(podvisor_names::pool::RECORD))?;
        // SAFETY: kill(2) on the pool VM's QEMU, recorded by the filler.
        unsafe { libc::kill(i32::try_from(dead[0])?, libc::SIGKILL) };
        let kind = pod_start_kind(c, "pool2")?;
        ensure!(
            kind.ends_with("(from template)"),
            "a pod next to a dead pool VM started {kind}"
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        while refilled[0].exists() || dead.iter().any(|p| running(*p)) {
            ensure!(
                Instant::now() < deadline,
                "the dead pool VM {} or its processes {dead:?} were kept",
                refilled[0].display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })();
    // Drained: every pool VM killed, the pool gone.
    let pids: Vec<u32> = pool_vms()
        .iter()
        .flat_map(|v| recorded_pids(&v.join(podvisor_names::pool::RECORD)).unwrap_or_default())
        .collect();
    let shim = podvisor_testkit::containerd::shim_dir()?.join("containerd-shim-podvisor-v2");
    let drained = ok(
        Command::new(shim).args([
            podvisor_names::pool::SUBCOMMAND,
            podvisor_names::pool::DRAIN,
        ]),
        60,
    );
    std::fs::write(&c.podvisor_config, &config)?;
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    result?;
    drained?;
    ensure!(
        pids.iter().all(|p| !running(*p)),
        "pool VM processes {pids:?} outlived the drain"
    );
    ensure!(
        !Path::new(podvisor_names::paths::POOL_ROOT).exists(),
        "the drain left {}",
        podvisor_names::paths::POOL_ROOT
    );
    Ok(())
}
