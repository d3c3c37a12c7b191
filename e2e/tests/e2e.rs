//! podvisor through Kubernetes, as a user meets it: the RuntimeClass, pods
//! with `runtimeClassName: podvisor`, kubectl exec/logs/attach/cp, pod
//! overhead and limits, deletion, failures. Runs against `KUBECONFIG` (see
//! podvisor_e2e); `make test-e2e` brings up the local cluster for it.

// An integration-test crate: every function here is test code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::tests_outside_test_module
)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use libtest_mimic::{Arguments, Failed, Trial};
use podvisor_e2e::{field, Cluster, NAMESPACE, RUNTIME_CLASS, SLEEP};
use serde_json::{json, Value};

type Test = fn(&Cluster) -> Result<()>;

const TESTS: &[(&str, Test)] = &[
    ("runtime_class_pod_runs_in_the_guest_kernel", runs_in_guest),
    ("pod_overhead_comes_from_the_runtime_class", overhead),
    ("exec_logs_attach_and_cp", exec_logs_attach_cp),
    ("two_containers_share_one_vm", two_containers_one_vm),
    ("limits_size_the_vm", limits_size_the_vm),
    (
        "delete_removes_the_vm_within_the_grace_period",
        delete_removes_vm,
    ),
    (
        "bad_command_is_reported_and_restarts_follow_policy",
        failures,
    ),
    (
        "a_killed_vm_restarts_the_pod_per_its_policy",
        killed_vm_restarts,
    ),
    (
        "memory_empty_dir_and_dev_shm_are_guest_tmpfs",
        memory_volumes,
    ),
    (
        "a_privileged_container_creates_a_dummy_link",
        privileged_dummy_link,
    ),
    ("udp_and_icmp_between_node_and_pods", udp_and_icmp),
    (
        "namespace_deletion_leaves_nothing_on_the_node",
        nothing_left,
    ),
];

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // One VM at a time: the node may be small, and TCG guests are CPU-bound.
    args.test_threads.get_or_insert(1);
    let cluster = Cluster::from_env();
    if let Err(why) = &cluster {
        eprintln!("e2e: every test ignored: {why}");
    }
    if let Ok(c) = &cluster {
        if !args.list {
            if let Err(e) = c.create_namespace() {
                eprintln!("e2e: cannot create namespace {NAMESPACE}: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    let cluster = std::sync::Arc::new(cluster);
    let trials = TESTS
        .iter()
        .map(|&(name, test)| {
            let ignored = cluster.is_err();
            let cluster = cluster.clone();
            Trial::test(name, move || match cluster.as_ref() {
                Ok(c) => test(c).map_err(|e| Failed::from(format!("{e:#}"))),
                Err(_) => Ok(()),
            })
            .with_ignored_flag(ignored)
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if let Ok(c) = cluster.as_ref() {
        if !args.list {
            let _ = c.delete_namespace();
        }
    }
    conclusion.exit_code()
}

/// The guest kernel release the node's podvisor installation boots.
fn guest_kernel(c: &Cluster) -> Result<String> {
    let r = c.node_sh("sed -n 's/^kernel_release //p' /opt/podvisor/share/guest/manifest")?;
    ensure!(
        !r.trim().is_empty(),
        "no kernel_release in the guest image manifest"
    );
    Ok(r.trim().to_string())
}

/// Deletes a test's pods and waits, so that the next test has the node's
/// CPUs (each pod also holds the RuntimeClass overhead).
fn delete_pods(c: &Cluster, pods: &[&str]) -> Result<()> {
    c.kubectl(
        &[
            &["delete", "pod", "--ignore-not-found", "--timeout=120s"],
            pods,
        ]
        .concat(),
    )
    .map(drop)
}

fn runs_in_guest(c: &Cluster) -> Result<()> {
    let rc = c.get("runtimeclass", RUNTIME_CLASS)?;
    ensure!(field(&rc, "handler") == "podvisor", "handler: {rc}");
    ensure!(
        rc["scheduling"]["nodeSelector"]["podvisor.io/runtime"] == "true",
        "RuntimeClass nodeSelector: {}",
        rc["scheduling"]
    );

    let script = "echo \"guest kernel $(uname -r)\"; echo ready; \
                  trap 'exit 0' TERM; sleep 3600 & wait";
    c.apply(&c.pod("hello", "Always", &[("main", &["sh", "-c", script])]))?;
    c.wait_ready("hello")?;
    let pod = c.get("pod", "hello")?;
    ensure!(
        field(&pod, "status/phase") == "Running",
        "phase: {}",
        pod["status"]
    );
    ensure!(field(&pod, "spec/runtimeClassName") == RUNTIME_CLASS);

    let guest = c.exec("hello", "main", &["uname", "-r"])?;
    let node = c.node_sh("uname -r")?;
    let want = guest_kernel(c)?;
    ensure!(
        guest == want,
        "uname -r in the pod: {guest:?}, guest image: {want:?}"
    );
    ensure!(
        guest != node.trim(),
        "the pod sees the node's kernel {guest:?}"
    );

    let logs = c.kubectl(&["logs", "hello", "-c", "main"])?;
    ensure!(
        logs == format!("guest kernel {want}\nready\n"),
        "kubectl logs: {logs:?}"
    );
    delete_pods(c, &["hello"])
}

fn overhead(c: &Cluster) -> Result<()> {
    let rc = c.get("runtimeclass", RUNTIME_CLASS)?;
    let fixed = &rc["overhead"]["podFixed"];
    ensure!(
        fixed.is_object(),
        "RuntimeClass has no overhead.podFixed: {rc}"
    );
    c.apply(&c.pod("overhead", "Always", &[("main", SLEEP)]))?;
    let pod = c.get("pod", "overhead")?;
    ensure!(
        &pod["spec"]["overhead"] == fixed,
        "pod overhead {} != RuntimeClass podFixed {fixed}",
        pod["spec"]["overhead"]
    );
    c.wait_ready("overhead")?;
    delete_pods(c, &["overhead"])
}

fn exec_logs_attach_cp(c: &Cluster) -> Result<()> {
    // attach: the container waits for a line on its stdin and answers it.
    let mut attach = c.pod(
        "attach",
        "Never",
        &[("main", &["sh", "-c", "read line; echo \"attached: $line\""])],
    );
    attach["spec"]["containers"][0]["stdin"] = json!(true);
    attach["spec"]["containers"][0]["stdinOnce"] = json!(true);
    c.apply(&attach)?;
    c.wait_ready("attach")?;
    let out = podvisor_e2e::run(
        &mut c.kubectl_cmd(&["-n", NAMESPACE, "attach", "-i", "attach", "-c", "main"]),
        Some(b"hello over attach\n"),
        120,
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        stdout.contains("attached: hello over attach"),
        "kubectl attach: {:?} / {:?}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let done = c.wait_for("attach container exits 0", 60, || {
        let pod = c.get("pod", "attach")?;
        let t = &pod["status"]["containerStatuses"][0]["state"]["terminated"];
        Ok(t.is_object().then(|| t.clone()))
    })?;
    ensure!(done["exitCode"] == 0, "attach container ended: {done}");
    let logs = c.kubectl(&["logs", "attach"])?;
    ensure!(logs == "attached: hello over attach\n", "logs: {logs:?}");

    // exec with stdin and an exit code; cp both ways.
    c.apply(&c.pod("files", "Always", &[("main", SLEEP)]))?;
    c.wait_ready("files")?;
    let out = podvisor_e2e::run(
        &mut c.kubectl_cmd(&[
            "-n",
            NAMESPACE,
            "exec",
            "-i",
            "files",
            "--",
            "sh",
            "-c",
            "tr a-z A-Z; exit 7",
        ]),
        Some(b"through exec\n"),
        60,
    )?;
    ensure!(
        String::from_utf8_lossy(&out.stdout) == "THROUGH EXEC\n" && out.status.code() == Some(7),
        "exec -i: {:?} {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );

    let dir = std::env::temp_dir().join(format!("podvisor-e2e-cp-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let data: Vec<u8> = (0..200_000u32)
        .map(|i| (i * 7 + i / 251).to_le_bytes()[0])
        .collect();
    let local = dir.join("data.bin");
    std::fs::write(&local, &data)?;
    let local_s = local.to_string_lossy().into_owned();
    c.kubectl(&["cp", &local_s, "files:/tmp/data.bin", "-c", "main"])?;
    let size = c.exec("files", "main", &["wc", "-c", "/tmp/data.bin"])?;
    ensure!(
        size.split_whitespace().next() == Some("200000"),
        "in the pod: {size}"
    );
    let back = dir.join("back.bin");
    c.kubectl(&[
        "cp",
        "files:/tmp/data.bin",
        &back.to_string_lossy(),
        "-c",
        "main",
    ])?;
    let got = std::fs::read(&back).context("kubectl cp from the pod wrote nothing")?;
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(got == data, "kubectl cp round trip changed the bytes");
    delete_pods(c, &["attach", "files"])
}

fn boot_id(c: &Cluster, pod: &str, container: &str) -> Result<String> {
    c.exec(pod, container, &["cat", "/proc/sys/kernel/random/boot_id"])
}

fn two_containers_one_vm(c: &Cluster) -> Result<()> {
    c.apply(&c.pod("pair", "Always", &[("a", SLEEP), ("b", SLEEP)]))?;
    c.apply(&c.pod("other", "Always", &[("main", SLEEP)]))?;
    c.wait_ready("pair")?;
    c.wait_ready("other")?;
    let a = boot_id(c, "pair", "a")?;
    let b = boot_id(c, "pair", "b")?;
    let other = boot_id(c, "other", "main")?;
    let node = c.node_sh("cat /proc/sys/kernel/random/boot_id")?;
    ensure!(a == b, "containers of one pod in different VMs: {a} / {b}");
    ensure!(a != node.trim(), "pod shares the node's boot id");
    ensure!(a != other, "two pods share one VM ({a})");
    // One NIC, the pod's: both containers see the same one.
    let mac = "cat /sys/class/net/eth0/address";
    let mac_a = c.exec("pair", "a", &["sh", "-c", mac])?;
    let mac_b = c.exec("pair", "b", &["sh", "-c", mac])?;
    ensure!(
        mac_a == mac_b,
        "containers see different NICs: {mac_a} / {mac_b}"
    );
    delete_pods(c, &["pair", "other"])
}

/// (vCPUs, MemTotal in KiB) inside `pod`.
fn guest_size(c: &Cluster, pod: &str) -> Result<(u32, u64)> {
    let cpus = c.exec(pod, "main", &["nproc"])?;
    let mem = c.exec(
        pod,
        "main",
        &["sh", "-c", "awk '/MemTotal/ {print $2}' /proc/meminfo"],
    )?;
    Ok((
        cpus.parse().with_context(|| format!("nproc: {cpus:?}"))?,
        mem.parse().with_context(|| format!("MemTotal: {mem:?}"))?,
    ))
}

fn limits_size_the_vm(c: &Cluster) -> Result<()> {
    c.apply(&c.pod("unsized", "Always", &[("main", SLEEP)]))?;
    let mut sized = c.pod("sized", "Always", &[("main", SLEEP)]);
    sized["spec"]["containers"][0]["resources"] =
        json!({"limits": {"cpu": "1", "memory": "256Mi"}});
    c.apply(&sized)?;
    c.wait_ready("unsized")?;
    c.wait_ready("sized")?;
    let (cpus0, mem0) = guest_size(c, "unsized")?;
    let (cpus1, mem1) = guest_size(c, "sized")?;
    ensure!(
        cpus1 == cpus0 + 1,
        "a 1-CPU limit should add one vCPU: {cpus0} without limits, {cpus1} with"
    );
    let added_mib = (i64::try_from(mem1)? - i64::try_from(mem0)?) / 1024;
    ensure!(
        (240..=260).contains(&added_mib),
        "a 256Mi limit should add 256 MiB of guest memory: {mem0} KiB without, {mem1} KiB with"
    );
    vm_is_held_to_the_pods_limit(c, "sized", 256)?;
    delete_pods(c, &["unsized", "sized"])
}

/// The pid of sandbox `id`'s VM process (QEMU or podvisor-vmm) on the node.
fn vm_pid(c: &Cluster, id: &str) -> Result<u32> {
    c.processes_naming(id)?
        .into_iter()
        .find(|(_, cmd)| {
            let program = cmd.split(' ').next().unwrap_or("");
            program.ends_with("qemu-system-x86_64") || program.ends_with("podvisor-vmm")
        })
        .map(|(pid, _)| pid)
        .with_context(|| format!("no VM process names sandbox {id}"))
}

/// A quantity in Mi ("160Mi").
fn mebibytes(q: &str) -> Result<u64> {
    q.strip_suffix("Mi")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{q:?} is not in Mi"))
}

/// The VM process of `pod` (memory limit `limit_mib`) on the node sits in
/// the sandbox's cgroup below kubelet's pod cgroup, which kubelet limits
/// to the limit plus the RuntimeClass overhead, and whose use covers the
/// VM's anonymous memory and the guest RAM it touched.
fn vm_is_held_to_the_pods_limit(c: &Cluster, pod: &str, limit_mib: u64) -> Result<()> {
    let id = c.sandbox_id(pod)?;
    let uid = field(&c.get("pod", pod)?, "metadata.uid");
    let rc = c.get("runtimeclass", RUNTIME_CLASS)?;
    let overhead = mebibytes(rc["overhead"]["podFixed"]["memory"].as_str().unwrap_or(""))?;
    let vm = vm_pid(c, &id)?;
    let v2 = c
        .node_sh("test -e /sys/fs/cgroup/cgroup.controllers && echo v2; true")?
        .contains("v2");
    let cgroups = c.node_sh(&format!("cat /proc/{vm}/cgroup"))?;
    let leaf = cgroups
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':').skip(1);
            f.next().zip(f.next())
        })
        .find(|(controllers, _)| {
            if v2 {
                controllers.is_empty()
            } else {
                controllers.split(',').any(|c| c == "memory")
            }
        })
        .map(|(_, path)| path.to_string())
        .with_context(|| format!("no memory cgroup for the VM (pid {vm}): {cgroups}"))?;
    let pod_cgroup = leaf.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
    ensure!(
        leaf.ends_with(&format!("/{id}"))
            && (pod_cgroup.contains(&uid) || pod_cgroup.contains(&uid.replace('-', "_"))),
        "the VM (pid {vm}) is in {leaf}, not the sandbox's cgroup in pod {uid}'s"
    );
    let (dir, limit_file, usage_file) = if v2 {
        ("/sys/fs/cgroup".to_string(), "memory.max", "memory.current")
    } else {
        (
            "/sys/fs/cgroup/memory".to_string(),
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
        )
    };
    let read = |path: String| -> Result<u64> {
        let v = c.node_sh(&format!("cat {path}"))?;
        v.trim().parse().with_context(|| format!("{path}: {v:?}"))
    };
    let limit = read(format!("{dir}{pod_cgroup}/{limit_file}"))?;
    ensure!(
        limit == (limit_mib + overhead) << 20,
        "pod cgroup {pod_cgroup} limited to {limit} bytes, not {limit_mib} MiB + {overhead} MiB overhead"
    );
    let usage = read(format!("{dir}{leaf}/{usage_file}"))?;
    // Guest RAM is shared memory (QEMU's memfd), the VMM's own anonymous.
    let status = c.node_sh(&format!("cat /proc/{vm}/status"))?;
    let kib = |key: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {key} for the VM"))
    };
    let (anon_kib, shmem_kib) = (kib("RssAnon:")?, kib("RssShmem:")?);
    ensure!(
        usage >= (anon_kib + shmem_kib) * 1024,
        "{leaf}: {usage} bytes in use, less than the VM's {anon_kib} KiB anonymous and {shmem_kib} KiB guest RAM"
    );
    Ok(())
}

/// What the node still holds of sandbox `id`: its state directory,
/// processes naming it (shim, VMM/QEMU, virtiofsd, vsock helper), mounts.
fn node_leftovers(c: &Cluster, id: &str) -> Result<String> {
    let mut left = c.node_sh(&format!(
        "test -e /run/podvisor/{id} && echo \"dir /run/podvisor/{id}\"; \
         grep -F -- '{id}' /proc/self/mounts | sed 's/^/mount /'; true"
    ))?;
    for (pid, cmd) in c.processes_naming(id)? {
        left.push_str(&format!("process {pid}: {cmd:.120}\n"));
    }
    Ok(left)
}

fn delete_removes_vm(c: &Cluster) -> Result<()> {
    c.apply(&c.pod("doomed", "Always", &[("main", SLEEP)]))?;
    c.wait_ready("doomed")?;
    let pod = c.get("pod", "doomed")?;
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .context("no grace period")?;
    let id = c.sandbox_id("doomed")?;
    let before = node_leftovers(c, &id)?;
    ensure!(
        before.contains("dir /run/podvisor/") && before.contains("process "),
        "the running pod's VM is not visible on the node: {before:?}"
    );
    let started = Instant::now();
    c.kubectl(&["delete", "pod", "doomed", "--wait=true", "--timeout=120s"])?;
    let left = c.wait_for("the VM and its helpers gone", 120, || {
        let left = node_leftovers(c, &id)?;
        Ok(left.trim().is_empty().then_some(()))
    });
    let took = started.elapsed();
    if let Err(e) = left {
        bail!("{e}; still there: {}", node_leftovers(c, &id)?);
    }
    ensure!(
        took <= Duration::from_secs(grace),
        "pod {id} took {took:.1?} to disappear from the node, grace period {grace}s"
    );
    Ok(())
}

fn container_status(c: &Cluster, pod: &str) -> Result<Value> {
    let p = c.get("pod", pod)?;
    Ok(p["status"]["containerStatuses"][0].clone())
}

fn failures(c: &Cluster) -> Result<()> {
    // A command that does not exist: the start fails in the VM, kubelet
    // says why; restartPolicy Never leaves the pod Failed.
    c.apply(&c.pod("badcmd", "Never", &[("main", &["/no/such/command"])]))?;
    let term = c.wait_for("badcmd terminated", 180, || {
        let t = container_status(c, "badcmd")?["state"]["terminated"].clone();
        Ok(t.is_object().then_some(t))
    })?;
    let message = field(&term, "message");
    ensure!(
        message.contains("/no/such/command"),
        "kubelet's message does not name the missing command: {term}"
    );
    ensure!(
        ["StartError", "ContainerCannotRun", "Error"].contains(&field(&term, "reason").as_str()),
        "reason: {term}"
    );
    ensure!(
        term["exitCode"] != 0,
        "exit code 0 for a failed start: {term}"
    );
    let phase = c.wait_for("badcmd phase Failed", 60, || {
        let p = c.get("pod", "badcmd")?;
        let phase = field(&p, "status/phase");
        Ok((phase == "Failed").then_some(phase))
    })?;
    ensure!(phase == "Failed");
    let events = c.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=badcmd",
        "-o",
        "json",
    ])?;
    ensure!(
        events.contains("/no/such/command"),
        "no event names the missing command: {events}"
    );

    // A container that exits 3 under restartPolicy Always is restarted
    // and backs off (CrashLoopBackOff); its previous run's exit code and
    // logs stay readable.
    c.apply(&c.pod(
        "crash",
        "Always",
        &[(
            "main",
            &["sh", "-c", "echo \"crashing in $(uname -r)\"; exit 3"],
        )],
    ))?;
    let status = c.wait_for("crash restarted twice, in CrashLoopBackOff", 180, || {
        let s = container_status(c, "crash")?;
        let backing_off = field(&s, "state/waiting/reason") == "CrashLoopBackOff";
        Ok((backing_off && s["restartCount"].as_u64().unwrap_or(0) >= 2).then_some(s))
    })?;
    let last = &status["lastState"]["terminated"];
    ensure!(
        last["exitCode"] == 3 && field(last, "reason") == "Error",
        "last state: {status}"
    );
    let previous = c.kubectl(&["logs", "crash", "--previous"])?;
    ensure!(
        previous == format!("crashing in {}\n", guest_kernel(c)?),
        "logs --previous: {previous:?}"
    );

    // restartPolicy OnFailure and exit 0: Succeeded, never restarted.
    c.apply(&c.pod("once", "OnFailure", &[("main", &["sh", "-c", "exit 0"])]))?;
    let pod = c.wait_for("once Succeeded", 180, || {
        let p = c.get("pod", "once")?;
        Ok((field(&p, "status/phase") == "Succeeded").then_some(p))
    })?;
    ensure!(
        pod["status"]["containerStatuses"][0]["restartCount"] == 0,
        "restarted: {}",
        pod["status"]
    );
    delete_pods(c, &["badcmd", "crash", "once"])
}

/// kill -9 of a pod's VM on the node: its container ends with exit code 255
/// (the VM's death), kubelet sees the sandbox die and, per restartPolicy
/// Always, starts the pod again in a new sandbox: a new VM with another boot
/// id. Nothing of the old sandbox stays running.
fn killed_vm_restarts(c: &Cluster) -> Result<()> {
    c.apply(&c.pod("victim", "Always", &[("main", SLEEP)]))?;
    c.wait_ready("victim")?;
    let old_id = c.sandbox_id("victim")?;
    let old_boot = boot_id(c, "victim", "main")?;
    let vm = vm_pid(c, &old_id)?;
    c.node_sh(&format!("kill -9 {vm}"))?;
    let status = c.wait_for("victim restarted after its VM was killed", 180, || {
        let s = container_status(c, "victim")?;
        let restarted = s["restartCount"].as_u64().unwrap_or(0) >= 1 && s["ready"] == true;
        Ok(restarted.then_some(s))
    })?;
    let last = &status["lastState"]["terminated"];
    ensure!(
        last["exitCode"] == 255,
        "the killed VM's container should have ended with 255: {status}"
    );
    let new_id = c.sandbox_id("victim")?;
    ensure!(
        new_id != old_id,
        "the pod restarted in its old sandbox {old_id}"
    );
    let new_boot = boot_id(c, "victim", "main")?;
    ensure!(
        new_boot != old_boot,
        "the restarted pod runs in the old VM (boot id {old_boot})"
    );
    let left = c.wait_for("nothing of the killed sandbox running", 60, || {
        Ok(c.processes_naming(&old_id)?.is_empty().then_some(()))
    });
    if let Err(e) = left {
        bail!("{e}; still there: {}", node_leftovers(c, &old_id)?);
    }
    delete_pods(c, &["victim"])?;
    let left = c.wait_for("neither sandbox left on the node", 120, || {
        let left = node_leftovers(c, &old_id)? + &node_leftovers(c, &new_id)?;
        Ok(left.trim().is_empty().then_some(()))
    });
    if let Err(e) = left {
        bail!(
            "{e}; still there: {}{}",
            node_leftovers(c, &old_id)?,
            node_leftovers(c, &new_id)?
        );
    }
    Ok(())
}

/// The line of the container's /proc/mounts for `dir`.
fn mount_line(c: &Cluster, pod: &str, container: &str, dir: &str) -> Result<String> {
    c.exec(
        pod,
        container,
        &["sh", "-c", &format!("grep ' {dir} ' /proc/mounts")],
    )
}

/// A memory-backed emptyDir is a tmpfs in the guest, as Kubernetes
/// promises: its sizeLimit holds (writing past it fails with ENOSPC), and
/// the pod's containers share it. The pod's /dev/shm is a guest tmpfs too.
fn memory_volumes(c: &Cluster) -> Result<()> {
    let mut pod = c.pod("memvol", "Always", &[("a", SLEEP), ("b", SLEEP)]);
    pod["spec"]["volumes"] = json!([
        {"name": "cache", "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}},
        {"name": "scratch", "emptyDir": {}}
    ]);
    for n in 0..2 {
        pod["spec"]["containers"][n]["volumeMounts"] = json!([
            {"name": "cache", "mountPath": "/cache"},
            {"name": "scratch", "mountPath": "/scratch"},
            {"name": "cache", "mountPath": "/sub", "subPath": "part"}
        ]);
    }
    c.apply(&pod)?;
    c.wait_ready("memvol")?;
    let cache = mount_line(c, "memvol", "a", "/cache")?;
    ensure!(
        cache.split_whitespace().nth(2) == Some("tmpfs") && cache.contains("size=8192k"),
        "/cache should be an 8 MiB tmpfs: {cache}"
    );
    let scratch = mount_line(c, "memvol", "a", "/scratch")?;
    ensure!(
        scratch.split_whitespace().nth(2) == Some("virtiofs"),
        "a disk-backed emptyDir stays on the node (virtio-fs): {scratch}"
    );
    let shm = mount_line(c, "memvol", "a", "/dev/shm")?;
    ensure!(
        shm.split_whitespace().nth(2) == Some("tmpfs") && shm.contains("size=65536k"),
        "/dev/shm should be containerd's 64 MiB tmpfs: {shm}"
    );
    c.exec("memvol", "a", &["sh", "-c", "echo from-a > /cache/note"])?;
    let note = c.exec("memvol", "b", &["cat", "/cache/note"])?;
    ensure!(note == "from-a", "container b reads {note:?} from /cache");
    // A subPath is the same volume's directory, in every container.
    c.exec("memvol", "b", &["sh", "-c", "echo via-subpath > /sub/note"])?;
    let note = c.exec("memvol", "a", &["cat", "/cache/part/note"])?;
    ensure!(
        note == "via-subpath",
        "container a reads {note:?} from /cache/part"
    );
    let sub = mount_line(c, "memvol", "b", "/sub")?;
    ensure!(
        sub.split_whitespace().nth(2) == Some("tmpfs"),
        "the subPath should be on the guest tmpfs: {sub}"
    );
    let full = c.exec(
        "memvol",
        "b",
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/cache/big bs=1M count=16 2>&1; echo rc=$?",
        ],
    )?;
    ensure!(
        full.contains("No space left on device") && !full.ends_with("rc=0"),
        "writing 16 MiB into an 8 MiB emptyDir: {full}"
    );
    // The guest's memory holds it: the node's tmpfs (wherever the
    // kubelet's root is) stays empty.
    let uid = field(&c.get("pod", "memvol")?, "metadata/uid");
    let dir = c.node_sh(&format!(
        "grep -o '[^ ]*/pods/{uid}/volumes/kubernetes.io~empty-dir/cache' /proc/self/mounts"
    ))?;
    ensure!(
        !dir.trim().is_empty(),
        "no tmpfs of the emptyDir on the node"
    );
    // kubelet made the subPath's directory there; nothing else is.
    let on_node = c.node_sh(&format!("cd {} && find . -mindepth 1", dir.trim()))?;
    ensure!(
        on_node.trim() == "./part",
        "the emptyDir's files are on the node: {on_node}"
    );
    delete_pods(c, &["memvol"])
}

/// A privileged container may build networks in its guest: it creates
/// and deletes a dummy link by the name a host would give it.
fn privileged_dummy_link(c: &Cluster) -> Result<()> {
    let script = "ip link add dummy0 type dummy && ip link show dummy0 >/dev/null && \
                  ip link del dummy0 && echo made-and-deleted; \
                  trap 'exit 0' TERM; sleep 3600 & wait";
    let mut pod = c.pod("netadmin", "Never", &[("main", &["sh", "-c", script])]);
    pod["spec"]["containers"][0]["securityContext"] = json!({"privileged": true});
    c.apply(&pod)?;
    c.wait_ready("netadmin")?;
    let out = c.wait_for("the privileged container's output", 60, || {
        let log = c.kubectl(&["logs", "netadmin", "-c", "main"])?;
        Ok((!log.trim().is_empty()).then_some(log))
    })?;
    ensure!(
        out.trim() == "made-and-deleted",
        "ip link add/del dummy0 in a privileged container: {out}"
    );
    delete_pods(c, &["netadmin"])
}

/// UDP echoes round trip node -> pod, pod -> node and pod -> pod, and
/// pings reach a pod from the node and from another pod. "The node" is a
/// hostNetwork pod under the default runtime (runc): the node's own network
/// namespace, on the local cluster and on kind alike. The test image's
/// `udp-echo` serves and asks (busybox's `nc` has no UDP).
fn udp_and_icmp(c: &Cluster) -> Result<()> {
    let serve = |port: u16| format!("trap 'exit 0' TERM; udp-echo serve {port} & wait");
    let server = serve(9000);
    c.apply(&c.pod("udpsrv", "Always", &[("main", &["sh", "-c", &server])]))?;
    c.apply(&c.pod("udppeer", "Always", &[("main", SLEEP)]))?;
    let on_node = serve(9001);
    let mut node = c.pod("nodenet", "Always", &[("main", &["sh", "-c", &on_node])]);
    let spec = node["spec"].as_object_mut().context("pod spec")?;
    spec.remove("runtimeClassName");
    spec.insert("hostNetwork".into(), json!(true));
    c.apply(&node)?;
    for pod in ["udpsrv", "udppeer", "nodenet"] {
        c.wait_ready(pod)?;
    }
    let ip = |pod: &str| -> Result<String> { Ok(field(&c.get("pod", pod)?, "status/podIP")) };
    let (srv, node_ip) = (ip("udpsrv")?, ip("nodenet")?);
    let ask = |from: &str, to: &str, message: &str| -> Result<()> {
        let answer = c.exec(from, "main", &["udp-echo", "ask", to, message])?;
        ensure!(
            answer == message,
            "UDP {message}: {from} asked {to}, got {answer:?}"
        );
        Ok(())
    };
    ask("nodenet", &format!("{srv}:9000"), "node-to-pod")?;
    ask("udppeer", &format!("{node_ip}:9001"), "pod-to-node")?;
    ask("udppeer", &format!("{srv}:9000"), "pod-to-pod")?;
    for from in ["nodenet", "udppeer"] {
        let ping = c.exec(from, "main", &["ping", "-c", "1", "-W", "10", &srv])?;
        ensure!(
            ping.contains("1 packets received"),
            "ping {srv} from {from}: {ping}"
        );
    }
    delete_pods(c, &["udpsrv", "udppeer", "nodenet"])
}

fn nothing_left(c: &Cluster) -> Result<()> {
    c.delete_namespace()?;
    let left = c.wait_for("no pod VM left on the node", 120, || {
        let left = c.node_sh(
            "find /run/podvisor -mindepth 1 -maxdepth 1 -type d ! -name _jail-ids 2>/dev/null; \
             pgrep -a -f '[q]emu-system|[p]odvisor-vmm|[v]irtiofsd|[v]host-device-vsock|[c]ontainerd-shim-podvisor' \
               || true",
        )?;
        Ok(left.trim().is_empty().then_some(()))
    });
    if let Err(e) = left {
        bail!("{e}");
    }
    Ok(())
}
