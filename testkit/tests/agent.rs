//! The guest image and agent, end to end: a real VM (QEMU, TCG here, KVM
//! where the probe finds it fast), the agent over hybrid vsock, containers
//! from a busybox rootfs on virtio-fs.
//!
//! One VM serves most tests (a boot under TCG takes seconds); tests that
//! end their VM boot their own. Run with `make test-guest`.

// An integration-test crate: every function here is test code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::tests_outside_test_module
)]

use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use libtest_mimic::{Arguments, Failed, Trial};
use podvisor_protocol::api;
use podvisor_testkit::spec::{container, process};
use podvisor_testkit::{ctx, detect_accel, vm::manifest, Accel, StdioReq, TestVm, VmConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type BoxFut<'a> = Pin<Box<dyn Future<Output = Result<()>> + 'a>>;
type TestFn = for<'a> fn(&'a TestVm) -> BoxFut<'a>;

struct Shared {
    rt: tokio::runtime::Runtime,
    cfg: VmConfig,
    vm: Mutex<Option<Result<Arc<TestVm>, String>>>,
}

impl Shared {
    fn vm(&self) -> Result<Arc<TestVm>> {
        let mut slot = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            let booted = self.rt.block_on(TestVm::boot(&self.cfg));
            *slot = Some(booted.map(Arc::new).map_err(|e| format!("{e:#}")));
        }
        match slot.as_ref() {
            Some(Ok(vm)) => Ok(vm.clone()),
            Some(Err(e)) => Err(anyhow!("the shared VM did not boot: {e}")),
            None => unreachable!(),
        }
    }
}

fn main() {
    let args = Arguments::from_args();
    let (accel, why) = detect_accel();
    eprintln!("guest tests: QEMU accel {} ({why})", accel.name());
    let shared = Arc::new(Shared {
        rt: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime"),
        cfg: VmConfig::new(accel),
        vm: Mutex::new(None),
    });

    let shared_tests: Vec<(&str, TestFn)> = vec![
        (
            "stdout_stderr_and_exit_status",
            stdout_stderr_and_exit_status,
        ),
        ("stdin_bytes_then_eof", stdin_bytes_then_eof),
        (
            "stdin_closed_without_a_connection",
            stdin_closed_without_a_connection,
        ),
        (
            "ten_megabytes_of_output_in_order",
            ten_megabytes_of_output_in_order,
        ),
        (
            "exec_shares_rootfs_and_pid_namespace",
            exec_shares_rootfs_and_pid_namespace,
        ),
        ("sigterm_143_and_sigkill_137", sigterm_143_and_sigkill_137),
        ("oom_kill_is_reported", oom_kill_is_reported),
        ("uname_is_the_guest_kernel", uname_is_the_guest_kernel),
        (
            "guest_kernel_oops_ends_the_vm",
            guest_kernel_oops_ends_the_vm,
        ),
        (
            "env_cwd_user_hostname_from_spec",
            env_cwd_user_hostname_from_spec,
        ),
        (
            "username_resolves_in_container_passwd",
            username_resolves_in_container_passwd,
        ),
        (
            "containers_do_not_see_each_other",
            containers_do_not_see_each_other,
        ),
        (
            "capabilities_rlimits_no_new_privs",
            capabilities_rlimits_no_new_privs,
        ),
        (
            "cgroup_limits_stats_update_and_pids",
            cgroup_limits_stats_update_and_pids,
        ),
        ("terminal_with_resize", terminal_with_resize),
        (
            "guest_details_match_the_container_view",
            guest_details_match_the_container_view,
        ),
        (
            "create_sandbox_sets_hostname_dns_sysctls",
            create_sandbox_sets_hostname_dns_sysctls,
        ),
        (
            "pod_namespaces_are_joined_by_their_guest_paths",
            pod_namespaces_are_joined_by_their_guest_paths,
        ),
        (
            "sysctls_are_set_before_proc_sys_turns_read_only",
            sysctls_are_set_before_proc_sys_turns_read_only,
        ),
        (
            "seccomp_profile_holds_for_init_and_exec",
            seccomp_profile_holds_for_init_and_exec,
        ),
        (
            "read_only_mounts_recursive_and_not",
            read_only_mounts_recursive_and_not,
        ),
        (
            "privileged_container_builds_networks",
            privileged_container_builds_networks,
        ),
        (
            "bad_spec_json_and_missing_process",
            bad_spec_json_and_missing_process,
        ),
        ("unknown_ids_are_not_found", unknown_ids_are_not_found),
        ("bad_and_duplicate_ids", bad_and_duplicate_ids),
        ("missing_rootfs", missing_rootfs),
        ("unknown_user", unknown_user),
        ("missing_executable", missing_executable),
        ("exec_into_stopped_container", exec_into_stopped_container),
        (
            "remove_refuses_running_container",
            remove_refuses_running_container,
        ),
        (
            "invalid_signal_and_resize_without_tty",
            invalid_signal_and_resize_without_tty,
        ),
        ("oversized_message", oversized_message),
        ("garbage_on_the_api_port", garbage_on_the_api_port),
    ];
    let mut trials: Vec<Trial> = shared_tests
        .into_iter()
        .map(|(name, f)| {
            let s = shared.clone();
            Trial::test(name, move || {
                let vm = s.vm().map_err(failed)?;
                s.rt.block_on(async {
                    let r = f(&vm).await;
                    // Whatever the test did, the agent must still serve.
                    let alive = vm
                        .agent
                        .check(ctx(), &api::CheckRequest::new())
                        .await
                        .map_err(|e| anyhow!("agent stopped answering after the test: {e}"));
                    r.and(alive.map(drop))
                })
                .map_err(|e| {
                    format!(
                        "{e:#}\n--- guest console (last lines)\n{}",
                        tail(&vm.console())
                    )
                    .into()
                })
            })
        })
        .collect();
    {
        let s = shared.clone();
        trials.push(Trial::test(
            "destroy_sandbox_powers_off_and_leaves_nothing",
            move || {
                s.rt.block_on(destroy_sandbox_powers_off(&s.cfg))
                    .map_err(failed)
            },
        ));
    }

    {
        let s = shared.clone();
        trials.push(Trial::test(
            "network_configured_by_the_agent_reaches_the_host",
            move || {
                s.rt.block_on(network_reaches_the_host(&s.cfg))
                    .map_err(failed)
            },
        ));
    }

    let conclusion = libtest_mimic::run(&args, trials);
    let vm = shared.vm.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(Ok(vm)) = vm {
        match Arc::try_unwrap(vm) {
            Ok(vm) => shared.rt.block_on(vm.shutdown()),
            Err(_) => eprintln!("shared VM still referenced at exit"),
        }
    }
    conclusion.exit();
}

fn failed(e: anyhow::Error) -> Failed {
    format!("{e:#}").into()
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// "CODE: message" of a failed call's ttrpc status.
fn rpc_error<T>(r: Result<T>) -> Result<String> {
    let e = match r {
        Ok(_) => bail!("expected an error, the call succeeded"),
        Err(e) => e,
    };
    match e.downcast_ref::<ttrpc::Error>() {
        Some(ttrpc::Error::RpcStatus(st)) => Ok(format!("{:?}: {}", st.code(), st.message())),
        _ => bail!("expected an error status from the agent, got: {e:#}"),
    }
}

fn sh(script: &str) -> Value {
    container(&["sh", "-c", script])
}

// --- pod namespaces, sysctls, seccomp, mounts, modules -----------------------

/// The namespace links of an exec in `cid`: pid, ipc, uts.
async fn namespace_links(vm: &TestVm, cid: &str) -> Result<String> {
    let s = vm
        .exec(
            cid,
            "nslinks",
            &process(&[
                "sh",
                "-c",
                "for n in pid ipc uts; do readlink /proc/self/ns/$n; done",
            ]),
            StdioReq::OUT,
        )
        .await?;
    let out = vm.finish(cid, "nslinks", s).await?;
    vm.remove_exec(cid, "nslinks").await?;
    Ok(out.stdout)
}

fn pod_namespaces_are_joined_by_their_guest_paths(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let mut sandbox = container(&["sleep", "1003"]);
        sandbox["hostname"] = json!("pod-host");
        let sb = vm.create("ns-sb", &sandbox, StdioReq::OUT).await?;
        vm.start("ns-sb", "").await?;
        let dir = podvisor_protocol::GUEST_NAMESPACE_DIR;
        let mut member = sh("tr '\\0' ' ' < /proc/1/cmdline; echo; hostname");
        member["linux"]["namespaces"] = json!([
            {"type": "pid", "path": format!("{dir}/ns-sb/pid")},
            {"type": "ipc", "path": format!("{dir}/ns-sb/ipc")},
            {"type": "uts", "path": format!("{dir}/ns-sb/uts")},
            {"type": "mount"}
        ]);
        // Kept running, to compare its namespaces with the sandbox's.
        let mut sleeper = member.clone();
        sleeper["process"]["args"] = json!(["sleep", "1004"]);
        let c = vm.create("ns-c1", &sleeper, StdioReq::OUT).await?;
        vm.start("ns-c1", "").await?;
        let (a, b) = (
            namespace_links(vm, "ns-sb").await?,
            namespace_links(vm, "ns-c1").await?,
        );
        ensure!(
            a == b && a.lines().count() == 3,
            "sandbox {a:?}, member {b:?}"
        );
        let out = vm.run("ns-c2", &member).await?;
        ensure!(
            out.stdout == "sleep 1003 \npod-host\n",
            "in a member, PID 1 and the hostname are {:?}",
            out.stdout
        );
        // An isolated container has namespaces of its own.
        let lone = vm.start_sleeper("ns-lone").await?;
        let l = namespace_links(vm, "ns-lone").await?;
        ensure!(
            l.lines().zip(a.lines()).all(|(x, y)| x != y),
            "isolated {l:?}, sandbox {a:?}"
        );
        vm.kill_and_remove("ns-lone", lone).await?;
        vm.kill_and_remove("ns-c1", c).await?;
        vm.kill_and_remove("ns-sb", sb).await?;

        // Naming a container that does not run fails create, by name.
        vm.add_rootfs("ns-c3")?;
        let e = rpc_error(
            vm.create_raw("ns-c3", member.to_string().as_bytes(), StdioReq::OUT)
                .await,
        )?;
        ensure!(
            e.starts_with("FAILED_PRECONDITION") && e.contains("ns-sb"),
            "{e}"
        );
        Ok(())
    })
}

fn sysctls_are_set_before_proc_sys_turns_read_only(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let mut spec = sh(
            "cat /proc/sys/kernel/shm_rmid_forced /proc/sys/net/ipv4/ping_group_range; \
             echo 0 > /proc/sys/kernel/shm_rmid_forced && echo writable",
        );
        spec["linux"]["sysctl"] = json!({
            "kernel.shm_rmid_forced": "1",
            "net.ipv4.ping_group_range": "0 2147483647"
        });
        let out = vm.run("sysctl-ok", &spec).await?;
        ensure!(
            out.stdout == "1\n0\t2147483647\n" && out.stderr.contains("Read-only"),
            "stdout {:?} stderr {:?}",
            out.stdout,
            out.stderr
        );
        // Only the container's IPC namespace changed.
        let outside = vm
            .run("sysctl-other", &sh("cat /proc/sys/kernel/shm_rmid_forced"))
            .await?;
        ensure!(
            outside.stdout == "0\n",
            "another container sees {:?}",
            outside.stdout
        );

        let mut bad = sh("true");
        bad["linux"]["sysctl"] = json!({"kernel.podvisor_no_such_parameter": "1"});
        vm.add_rootfs("sysctl-bad")?;
        let e = rpc_error(
            vm.create_raw("sysctl-bad", bad.to_string().as_bytes(), StdioReq::OUT)
                .await,
        )?;
        ensure!(
            e.contains("kernel.podvisor_no_such_parameter") && e.contains("no such parameter"),
            "{e}"
        );
        let mut bad = sh("true");
        bad["linux"]["sysctl"] = json!({"../../etc/passwd": "1"});
        let e = rpc_error(
            vm.create_raw("sysctl-bad", bad.to_string().as_bytes(), StdioReq::OUT)
                .await,
        )?;
        ensure!(
            e.starts_with("INVALID_ARGUMENT") && e.contains("bad sysctl name"),
            "{e}"
        );
        Ok(())
    })
}

fn seccomp_profile_holds_for_init_and_exec(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let profile = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": ["chmod", "fchmod", "fchmodat", "fchmodat2"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
            ]
        });
        let mut spec = container(&["sleep", "1005"]);
        spec["linux"]["seccomp"] = profile.clone();
        let streams = vm.create("seccomp", &spec, StdioReq::OUT).await?;
        vm.start("seccomp", "").await?;
        let s = vm
            .exec(
                "seccomp",
                "x",
                &process(&[
                    "sh",
                    "-c",
                    "grep Seccomp: /proc/self/status; grep Seccomp: /proc/1/status; \
                     chmod 600 /tmp || echo chmod-denied; touch /tmp/f && echo touch-ok",
                ]),
                StdioReq::OUT,
            )
            .await?;
        let out = vm.finish("seccomp", "x", s).await?;
        ensure!(
            out.stdout == "Seccomp:\t2\nSeccomp:\t2\nchmod-denied\ntouch-ok\n"
                && out.stderr.contains("Operation not permitted"),
            "stdout {:?} stderr {:?}",
            out.stdout,
            out.stderr
        );
        vm.kill_and_remove("seccomp", streams).await?;

        // With no_new_privs the filter goes on last; without a profile there
        // is no filter.
        let mut nnp = sh("grep Seccomp: /proc/self/status; hostname x || echo denied");
        nnp["linux"]["seccomp"] = profile;
        nnp["process"]["noNewPrivileges"] = json!(true);
        nnp["process"]["capabilities"]["bounding"] = json!(["CAP_SYS_ADMIN"]);
        nnp["process"]["capabilities"]["effective"] = json!(["CAP_SYS_ADMIN"]);
        nnp["process"]["capabilities"]["permitted"] = json!(["CAP_SYS_ADMIN"]);
        let out = vm.run("seccomp-nnp", &nnp).await?;
        ensure!(
            out.stdout == "Seccomp:\t2\ndenied\n" && out.stderr.contains("not implemented"),
            "stdout {:?} stderr {:?}",
            out.stdout,
            out.stderr
        );
        let out = vm
            .run("seccomp-none", &sh("grep Seccomp: /proc/self/status"))
            .await?;
        ensure!(out.stdout == "Seccomp:\t0\n", "{:?}", out.stdout);
        Ok(())
    })
}

fn read_only_mounts_recursive_and_not(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let data = format!(
            "{}/ro-mounts/rootfs/data",
            podvisor_protocol::GUEST_SHARED_DIR
        );
        let mut spec = sh("touch /data/sub/a && echo sub-rw; \
             touch /nr/sub/b && echo nonrecursive-sub-rw; \
             touch /nr/c 2>/dev/null || echo nonrecursive-top-ro; \
             touch /rro/sub/d 2>/dev/null || echo recursive-sub-ro");
        let mounts = spec["mounts"].as_array_mut().context("mounts")?;
        mounts.push(json!({"destination": "/data", "type": "tmpfs", "source": "tmpfs"}));
        mounts.push(json!({"destination": "/data/sub", "type": "tmpfs", "source": "tmpfs"}));
        mounts.push(json!({"destination": "/nr", "type": "bind", "source": data, "options": ["rbind", "ro"]}));
        mounts.push(json!({"destination": "/rro", "type": "bind", "source": data, "options": ["rbind", "rro", "rprivate"]}));
        let out = vm.run("ro-mounts", &spec).await?;
        ensure!(
            out.stdout == "sub-rw\nnonrecursive-sub-rw\nnonrecursive-top-ro\nrecursive-sub-ro\n",
            "stdout {:?} stderr {:?}",
            out.stdout,
            out.stderr
        );
        Ok(())
    })
}

/// Copies a host program with its shared libraries (as `ldd` lists them)
/// into `rootfs` at the same paths.
fn add_host_program(rootfs: &std::path::Path, program: &str) -> Result<()> {
    let ldd = std::process::Command::new("ldd").arg(program).output()?;
    ensure!(ldd.status.success(), "ldd {program} failed");
    let mut files = vec![program.to_string()];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push(p.to_string());
        }
    }
    for f in files {
        let dest = rootfs.join(f.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().context("no parent")?)?;
        std::fs::copy(&f, &dest).with_context(|| format!("copying {f}"))?;
    }
    Ok(())
}

/// A rootfs for `cid` with the host's iptables (Debian's, both backends)
/// beside busybox.
fn add_iptables(vm: &TestVm, cid: &str) -> Result<()> {
    vm.add_rootfs(cid)?;
    let rootfs = vm.shared().join(cid).join("rootfs");
    for (multi, name) in [
        ("xtables-nft-multi", "iptables-nft"),
        ("xtables-legacy-multi", "iptables-legacy"),
    ] {
        add_host_program(&rootfs, &format!("/usr/sbin/{multi}"))?;
        let link = rootfs.join("usr/sbin").join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(multi, link)?;
        }
    }
    let ext = "usr/lib/x86_64-linux-gnu/xtables";
    std::fs::create_dir_all(rootfs.join(ext))?;
    for e in std::fs::read_dir(std::path::Path::new("/").join(ext))? {
        let e = e?;
        std::fs::copy(e.path(), rootfs.join(ext).join(e.file_name()))?;
    }
    Ok(())
}

fn privileged_container_builds_networks(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let all: Vec<String> = [
            "CAP_NET_ADMIN",
            "CAP_SYS_ADMIN",
            "CAP_NET_RAW",
            "CAP_SYS_MODULE",
        ]
        .iter()
        .map(|c| c.to_string())
        .collect();
        // A modular kernel (Debian's) loads these on demand, through the
        // agent as /sbin/modprobe; podvisor's has them built in.
        let modular = manifest("modules_on_demand").is_ok();
        let mut script = "brctl addbr pvbr0 && ip link show pvbr0 >/dev/null && echo bridge; \
             ip link add dummy0 type dummy && echo dummy; \
             ip link add pvveth0 type veth peer name pvveth1 && echo veth; \
             ip link del dummy0; ip link del pvveth0; brctl delbr pvbr0"
            .to_string();
        let mut want = "bridge\ndummy\nveth\n".to_string();
        if modular {
            script.push_str("; grep -o '^bridge\\|^veth\\|^dummy' /proc/modules | sort");
            want = want.repeat(2);
        }
        let mut spec = sh(&script);
        for set in ["bounding", "effective", "permitted"] {
            spec["process"]["capabilities"][set] = json!(all);
        }
        let out = vm.run("modules", &spec).await?;
        ensure!(
            out.stdout == want,
            "stdout {:?} stderr {:?}",
            out.stdout,
            out.stderr
        );

        // iptables with either backend, as an Istio-style init container
        // runs it: a NAT redirect added, listed and flushed.
        add_iptables(vm, "iptables")?;
        let mut spec = sh("for t in nft legacy; do \
               iptables-$t -t nat -A OUTPUT -p tcp --dport 15001 -j REDIRECT --to-ports 15006 && \
               iptables-$t -t nat -S OUTPUT | grep -q 'REDIRECT --to-ports 15006' && echo $t; \
               iptables-$t -t nat -F OUTPUT; \
             done");
        for set in ["bounding", "effective", "permitted"] {
            spec["process"]["capabilities"][set] = json!(all);
        }
        let out = vm.run("iptables", &spec).await?;
        ensure!(
            out.stdout == "nft\nlegacy\n",
            "stdout {:?} stderr {:?}",
            out.stdout,
            out.stderr
        );
        Ok(())
    })
}

// --- processes and their streams ------------------------------------------

fn stdout_stderr_and_exit_status(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let out = vm
            .run("echo-exit", &sh("echo hi; echo oops >&2; exit 3"))
            .await?;
        ensure!(out.stdout == "hi\n", "stdout {:?}", out.stdout);
        ensure!(out.stderr == "oops\n", "stderr {:?}", out.stderr);
        ensure!(out.status == 3, "status {}", out.status);
        ensure!(!out.oom_killed);
        Ok(())
    })
}

fn stdin_bytes_then_eof(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        // 256 KiB of every byte value: more than any pipe buffer.
        let input: Vec<u8> = (0..256 * 1024u32)
            .map(|i| (i * 7 + i / 256).to_le_bytes()[0])
            .collect();
        let mut streams = vm
            .create("stdin", &sh("wc -c; echo eof >&2"), StdioReq::ALL)
            .await?;
        vm.start("stdin", "").await?;
        let mut stdin = streams.stdin.take().context("no stdin stream")?;
        stdin.write_all(&input).await?;
        stdin.shutdown().await?;
        vm.agent
            .close_stdin(
                ctx(),
                &api::CloseStdinRequest {
                    container_id: "stdin".into(),
                    ..Default::default()
                },
            )
            .await?;
        let out = vm.finish("stdin", "", streams).await?;
        ensure!(
            out.stdout.trim() == input.len().to_string(),
            "wc -c said {:?}",
            out.stdout
        );
        ensure!(out.stderr == "eof\n", "stderr {:?}", out.stderr);
        ensure!(out.status == 0, "status {}", out.status);
        vm.remove("stdin").await?;

        // Byte for byte: cat echoes the input back exactly.
        let mut streams = vm
            .create("stdin-cat", &container(&["cat"]), StdioReq::ALL)
            .await?;
        vm.start("stdin-cat", "").await?;
        let mut stdin = streams.stdin.take().context("no stdin stream")?;
        stdin.write_all(&input).await?;
        drop(stdin);
        let (out, _) = streams.output().await?;
        ensure!(out == input, "cat returned {} bytes, differing", out.len());
        ensure!(vm.wait("stdin-cat", "").await?.exit_status == 0);
        vm.remove("stdin-cat").await
    })
}

fn stdin_closed_without_a_connection(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        // stdin requested, but the host closes it instead of connecting:
        // the agent cannot start the process without its stream...
        vm.add_rootfs("stdin-unused")?;
        let resp = vm
            .agent
            .create_container(
                ctx(),
                &api::CreateContainerRequest {
                    container_id: "stdin-unused".into(),
                    oci_spec_json: container(&["cat"]).to_string().into_bytes(),
                    stdio: Some(api::StdioRequest {
                        stdin: true,
                        stdout: true,
                        ..Default::default()
                    })
                    .into(),
                    ..Default::default()
                },
            )
            .await?;
        vm.agent
            .close_stdin(
                ctx(),
                &api::CloseStdinRequest {
                    container_id: "stdin-unused".into(),
                    ..Default::default()
                },
            )
            .await?;
        let ports = resp.ports.into_option().context("no ports")?;
        let mut stdout = podvisor_protocol::hybrid_vsock::dial_within(
            &vm.vsock_path(),
            ports.stdout,
            Duration::from_secs(30),
        )
        .await?;
        // ...yet with stdin closed it starts, and cat sees EOF at once.
        vm.start("stdin-unused", "").await?;
        let mut out = Vec::new();
        stdout.read_to_end(&mut out).await?;
        ensure!(out.is_empty(), "cat printed {out:?}");
        ensure!(vm.wait("stdin-unused", "").await?.exit_status == 0);
        vm.remove("stdin-unused").await
    })
}

fn ten_megabytes_of_output_in_order(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        const N: u32 = 1_500_000;
        let out = vm
            .run("bulk", &container(&["seq", "1", &N.to_string()]))
            .await?;
        ensure!(out.status == 0, "status {}", out.status);
        let mut expected = String::with_capacity(11 << 20);
        for i in 1..=N {
            expected.push_str(&i.to_string());
            expected.push('\n');
        }
        ensure!(
            expected.len() > 10 << 20,
            "test too small: {}",
            expected.len()
        );
        if out.stdout != expected {
            let at = out
                .stdout
                .bytes()
                .zip(expected.bytes())
                .position(|(a, b)| a != b)
                .unwrap_or(out.stdout.len().min(expected.len()));
            bail!(
                "output differs at byte {at}: got {} bytes, expected {}",
                out.stdout.len(),
                expected.len()
            );
        }
        Ok(())
    })
}

fn exec_shares_rootfs_and_pid_namespace(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let c = "exec-target";
        let init = vm
            .create(
                c,
                &sh("readlink /proc/self/ns/pid > /tmp/init-pidns; echo marker > /tmp/m; exec sleep 1000"),
                StdioReq::OUT,
            )
            .await?;
        vm.start(c, "").await?;
        // The exec waits for the init's files, then reports what it sees.
        let script = "while [ ! -s /tmp/m ]; do sleep 0.05; done; \
                      cat /tmp/m /tmp/init-pidns; readlink /proc/self/ns/pid; cat /proc/1/cmdline";
        let s = vm
            .exec(c, "probe", &process(&["sh", "-c", script]), StdioReq::OUT)
            .await?;
        let out = vm.finish(c, "probe", s).await?;
        ensure!(out.status == 0, "exec failed: {out:?}");
        let lines: Vec<&str> = out.stdout.lines().collect();
        ensure!(lines.len() == 4, "exec output {:?}", out.stdout);
        ensure!(
            lines[0] == "marker",
            "exec does not see the init's /tmp: {:?}",
            lines[0]
        );
        ensure!(
            lines[1] == lines[2],
            "pid namespaces differ: init {} exec {}",
            lines[1],
            lines[2]
        );
        ensure!(
            lines[3].starts_with("sleep"),
            "pid 1 of the exec's namespace is {:?}",
            lines[3]
        );

        vm.kill_and_remove(c, init).await.map(drop)
    })
}

fn sigterm_143_and_sigkill_137(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let c = "signals";
        let init = vm.start_sleeper(c).await?;
        // `sleep` as an exec is an ordinary process (the container's pid 1
        // ignores signals it has no handler for, as on any Linux).
        let s = vm
            .exec(c, "term", &process(&["sleep", "1000"]), StdioReq::OUT)
            .await?;
        let msg = rpc_error(vm.remove_exec(c, "term").await)?;
        ensure!(
            msg.starts_with("FAILED_PRECONDITION") && msg.contains("still running"),
            "{msg}"
        );
        vm.signal(c, "term", libc::SIGTERM).await?;
        let out = vm.finish(c, "term", s).await?;
        ensure!(out.status == 143, "SIGTERM gave {}", out.status);
        // An exited exec is forgotten on request, and its id is free again.
        vm.remove_exec(c, "term").await?;
        let msg = rpc_error(vm.wait(c, "term").await)?;
        ensure!(msg.starts_with("NOT_FOUND"), "{msg}");

        let s = vm
            .exec(c, "kill", &process(&["sleep", "1000"]), StdioReq::OUT)
            .await?;
        vm.signal(c, "kill", libc::SIGKILL).await?;
        let out = vm.finish(c, "kill", s).await?;
        ensure!(out.status == 137, "SIGKILL gave {}", out.status);
        ensure!(!out.oom_killed);

        // Signalling an exited process is an error, not a crash.
        let msg = rpc_error(vm.signal(c, "kill", libc::SIGKILL).await)?;
        ensure!(msg.contains("already exited"), "{msg}");

        vm.signal(c, "", libc::SIGKILL).await?;
        let out = vm.finish(c, "", init).await?;
        ensure!(out.status == 137, "init SIGKILL gave {}", out.status);
        vm.remove(c).await
    })
}

fn oom_kill_is_reported(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let mut spec = sh("echo start; tail /dev/zero");
        spec["linux"]["resources"]["memory"] = json!({"limit": 32 << 20, "swap": 32 << 20});
        let out = vm.run("oom", &spec).await?;
        ensure!(out.stdout == "start\n", "stdout {:?}", out.stdout);
        ensure!(out.status == 137, "status {}", out.status);
        ensure!(out.oom_killed, "not reported as OOM-killed: {out:?}");
        Ok(())
    })
}

fn uname_is_the_guest_kernel(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let out = vm.run("uname", &container(&["uname", "-r"])).await?;
        let guest = manifest("kernel_release")?;
        let host = nix_uname_release();
        ensure!(
            out.stdout.trim() == guest,
            "uname -r {:?}, image has {guest}",
            out.stdout
        );
        ensure!(out.stdout.trim() != host, "uname -r is the host's ({host})");
        Ok(())
    })
}

/// A guest kernel that oopses panics, and a panic ends the VM (so its
/// containers are reported dead rather than left hanging).
fn guest_kernel_oops_ends_the_vm(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let out = vm
            .run(
                "oops",
                &container(&[
                    "cat",
                    "/proc/sys/kernel/panic_on_oops",
                    "/proc/sys/kernel/panic",
                ]),
            )
            .await?;
        ensure!(
            out.stdout == "1\n-1\n",
            "panic_on_oops, panic: {:?}",
            out.stdout
        );
        Ok(())
    })
}

fn nix_uname_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn env_cwd_user_hostname_from_spec(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let mut spec = sh("echo $GREETING; pwd; id -u; id -g; id -G; hostname;");
        spec["process"]["env"] = json!(["PATH=/bin", "GREETING=hello from the spec"]);
        spec["process"]["cwd"] = json!("/home/user/work");
        spec["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 29]});
        spec["hostname"] = json!("pod-under-test");
        let out = vm.run("identity", &spec).await?;
        let lines: Vec<&str> = out.stdout.lines().collect();
        ensure!(
            out.status == 0,
            "status {} stderr {:?}",
            out.status,
            out.stderr
        );
        ensure!(lines[0] == "hello from the spec", "env: {:?}", lines[0]);
        ensure!(lines[1] == "/home/user/work", "cwd: {:?}", lines[1]);
        ensure!(lines[2] == "1000", "uid: {:?}", lines[2]);
        ensure!(lines[3] == "1000", "gid: {:?}", lines[3]);
        let mut groups: Vec<&str> = lines[4].split(' ').collect();
        groups.sort();
        ensure!(groups == ["10", "1000", "29"], "groups: {:?}", lines[4]);
        ensure!(lines[5] == "pod-under-test", "hostname: {:?}", lines[5]);
        Ok(())
    })
}

fn username_resolves_in_container_passwd(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let mut spec = sh("id -u; id -g; id -G");
        spec["process"]["user"] = json!({"uid": 0, "gid": 0, "username": "user"});
        let out = vm.run("by-name", &spec).await?;
        ensure!(
            out.stdout == "1000\n1000\n1000 10\n",
            "id said {:?}",
            out.stdout
        );
        Ok(())
    })
}

fn containers_do_not_see_each_other(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let a = vm
            .create("iso-a", &sh("exec sleep 1001"), StdioReq::OUT)
            .await?;
        vm.start("iso-a", "").await?;
        let b = vm
            .create("iso-b", &sh("exec sleep 1002"), StdioReq::OUT)
            .await?;
        vm.start("iso-b", "").await?;
        let s = vm
            .exec(
                "iso-a",
                "ps",
                &process(&["ps", "-o", "pid,args"]),
                StdioReq::OUT,
            )
            .await?;
        let out = vm.finish("iso-a", "ps", s).await?;
        ensure!(
            out.stdout.contains("sleep 1001"),
            "A does not see itself: {}",
            out.stdout
        );
        ensure!(
            !out.stdout.contains("sleep 1002"),
            "A sees B's process: {}",
            out.stdout
        );
        let s = vm
            .exec(
                "iso-b",
                "ps",
                &process(&["ps", "-o", "pid,args"]),
                StdioReq::OUT,
            )
            .await?;
        let out = vm.finish("iso-b", "ps", s).await?;
        ensure!(
            out.stdout.contains("sleep 1002") && !out.stdout.contains("sleep 1001"),
            "B sees {}",
            out.stdout
        );
        // Not the agent either.
        ensure!(
            !out.stdout.contains("init"),
            "B sees the guest's init: {}",
            out.stdout
        );
        for (c, s) in [("iso-a", a), ("iso-b", b)] {
            vm.signal(c, "", libc::SIGKILL).await?;
            vm.finish(c, "", s).await?;
            vm.remove(c).await?;
        }
        Ok(())
    })
}

fn capabilities_rlimits_no_new_privs(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let mut spec = sh("grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; ulimit -n; mknod /tmp/n c 1 3 && echo mknod-ok; hostname other 2>&1 || echo sethostname-denied");
        spec["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 321, "soft": 123}]);
        let out = vm.run("caps", &spec).await?;
        let field = |k: &str| {
            out.stdout
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        // containerd's default set: CHOWN..SETFCAP, 0x a80425fb.
        ensure!(
            field("CapEff:") == "00000000a80425fb",
            "CapEff {:?}",
            field("CapEff:")
        );
        ensure!(
            field("CapBnd:") == "00000000a80425fb",
            "CapBnd {:?}",
            field("CapBnd:")
        );
        ensure!(
            field("NoNewPrivs:") == "1",
            "NoNewPrivs {:?}",
            field("NoNewPrivs:")
        );
        ensure!(out.stdout.contains("\n123\n"), "ulimit -n: {}", out.stdout);
        ensure!(
            out.stdout.contains("mknod-ok"),
            "CAP_MKNOD missing: {}",
            out.stdout
        );
        ensure!(
            out.stdout.contains("sethostname-denied"),
            "CAP_SYS_ADMIN present: {}",
            out.stdout
        );
        Ok(())
    })
}

fn cgroup_limits_stats_update_and_pids(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let c = "cgroups";
        let mut spec = sh("exec sleep 1000");
        spec["linux"]["resources"] = json!({
            "memory": {"limit": 64 << 20},
            "cpu": {"quota": 50000, "period": 100000},
            "pids": {"limit": 20}
        });
        let init = vm.create(c, &spec, StdioReq::OUT).await?;
        vm.start(c, "").await?;
        let read = |file: &'static str| {
            let id = format!("read-{}", file.replace('.', "-"));
            async move {
                let s = vm
                    .exec(
                        c,
                        &id,
                        &process(&["cat", &format!("/sys/fs/cgroup/{file}")]),
                        StdioReq::OUT,
                    )
                    .await?;
                let o = vm.finish(c, &id, s).await?;
                ensure!(o.status == 0, "cat {file}: {o:?}");
                Ok::<_, anyhow::Error>(o.stdout.trim().to_string())
            }
        };
        ensure!(read("memory.max").await? == (64u64 << 20).to_string());
        ensure!(read("cpu.max").await? == "50000 100000");
        ensure!(read("pids.max").await? == "20");

        let stats = vm
            .agent
            .stats_container(
                ctx(),
                &api::StatsContainerRequest {
                    container_id: c.into(),
                    ..Default::default()
                },
            )
            .await?;
        let mem = stats
            .memory
            .clone()
            .into_option()
            .context("no memory stats")?;
        let pids = stats.pids.clone().into_option().context("no pids stats")?;
        let cpu = stats.cpu.clone().into_option().context("no cpu stats")?;
        ensure!(
            mem.usage_bytes > 0 && mem.limit_bytes == 64 << 20,
            "{mem:?}"
        );
        ensure!(pids.current >= 1 && pids.limit == 20, "{pids:?}");
        ensure!(cpu.usage_usec > 0, "{cpu:?}");

        vm.agent
            .update_container(
                ctx(),
                &api::UpdateContainerRequest {
                    container_id: c.into(),
                    resources_json: json!({"pids": {"limit": 7}}).to_string().into_bytes(),
                    ..Default::default()
                },
            )
            .await?;
        let s = vm
            .exec(
                c,
                "after-update",
                &process(&["cat", "/sys/fs/cgroup/pids.max"]),
                StdioReq::OUT,
            )
            .await?;
        let o = vm.finish(c, "after-update", s).await?;
        ensure!(
            o.stdout.trim() == "7",
            "pids.max after update {:?}",
            o.stdout
        );

        let bad = vm
            .agent
            .update_container(
                ctx(),
                &api::UpdateContainerRequest {
                    container_id: c.into(),
                    resources_json: b"{not json".to_vec(),
                    ..Default::default()
                },
            )
            .await;
        let msg = rpc_error(bad.map_err(anyhow::Error::from))?;
        ensure!(msg.contains("invalid linux.resources"), "{msg}");

        let listed = vm
            .agent
            .list_processes(
                ctx(),
                &api::ListProcessesRequest {
                    container_id: c.into(),
                    ..Default::default()
                },
            )
            .await?;
        ensure!(listed.pids.len() == 1, "processes {:?}", listed.pids);

        vm.kill_and_remove(c, init).await.map(drop)
    })
}

fn terminal_with_resize(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let c = "tty";
        let mut spec = sh("read line; echo \"got:$line\"; tty; stty size");
        spec["process"]["terminal"] = json!(true);
        let mut streams = vm.create(c, &spec, StdioReq::TTY).await?;
        vm.agent
            .tty_win_resize(
                ctx(),
                &api::TtyWinResizeRequest {
                    container_id: c.into(),
                    rows: 40,
                    columns: 100,
                    ..Default::default()
                },
            )
            .await?;
        vm.start(c, "").await?;
        let mut stdin = streams.stdin.take().context("no tty input")?;
        stdin.write_all(b"typed\n").await?;
        let out = vm.finish(c, "", streams).await?;
        ensure!(out.status == 0, "status {}", out.status);
        // The terminal echoes the input and turns \n into \r\n.
        ensure!(
            out.stdout.contains("typed\r\n"),
            "no echo: {:?}",
            out.stdout
        );
        ensure!(out.stdout.contains("got:typed\r\n"), "{:?}", out.stdout);
        ensure!(
            out.stdout.contains("/dev/pts/0\r\n"),
            "tty: {:?}",
            out.stdout
        );
        ensure!(
            out.stdout.contains("40 100\r\n"),
            "stty size: {:?}",
            out.stdout
        );
        vm.remove(c).await
    })
}

fn guest_details_match_the_container_view(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let d = vm
            .agent
            .get_guest_details(ctx(), &api::GuestDetailsRequest::new())
            .await?;
        let out = vm
            .run(
                "bootid",
                &container(&["cat", "/proc/sys/kernel/random/boot_id"]),
            )
            .await?;
        ensure!(
            !d.boot_id.is_empty() && out.stdout.trim() == d.boot_id,
            "boot id {:?} vs {:?}",
            out.stdout,
            d.boot_id
        );
        let host_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
        ensure!(
            host_boot.trim() != d.boot_id,
            "the container reports the host's boot id"
        );
        ensure!(d.kernel_release == manifest("kernel_release")?);
        ensure!(d.online_cpus == vm_cpus(), "cpus {}", d.online_cpus);
        ensure!(
            d.memory_total_bytes > 400 << 20 && d.memory_total_bytes <= 512 << 20,
            "memory {}",
            d.memory_total_bytes
        );
        ensure!(d.agent_rss_bytes > 0, "rss {}", d.agent_rss_bytes);
        let v = vm.agent.version(ctx(), &api::VersionRequest::new()).await?;
        ensure!(v.api_version == podvisor_protocol::API_VERSION);
        Ok(())
    })
}

fn vm_cpus() -> u32 {
    VmConfig::new(Accel::Tcg).vcpus
}

fn create_sandbox_sets_hostname_dns_sysctls(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        vm.agent
            .create_sandbox(
                ctx(),
                &api::CreateSandboxRequest {
                    sandbox_id: "sb".into(),
                    hostname: "sandbox-host".into(),
                    dns_servers: vec!["10.0.0.10".into()],
                    dns_searches: vec!["svc.cluster.local".into()],
                    sysctls: [("net.ipv4.ip_forward".to_string(), "1".to_string())].into(),
                    ..Default::default()
                },
            )
            .await?;
        // A container without a hostname of its own shares the guest's UTS
        // settings at creation; its /proc/sys shows the guest sysctl.
        let mut spec = sh("hostname; cat /proc/sys/net/ipv4/ip_forward");
        spec.as_object_mut().context("spec")?.remove("hostname");
        let out = vm.run("sb-view", &spec).await?;
        ensure!(out.stdout == "sandbox-host\n1\n", "{:?}", out.stdout);

        let bad = vm
            .agent
            .create_sandbox(
                ctx(),
                &api::CreateSandboxRequest {
                    dns_servers: vec!["not-an-ip".into()],
                    ..Default::default()
                },
            )
            .await;
        let msg = rpc_error(bad.map_err(anyhow::Error::from))?;
        ensure!(msg.contains("not-an-ip"), "{msg}");
        Ok(())
    })
}

// --- bad input ------------------------------------------------------------

fn bad_spec_json_and_missing_process(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        vm.add_rootfs("bad-spec")?;
        let msg = rpc_error(
            vm.create_raw("bad-spec", b"{\"ociVersion\": ", StdioReq::OUT)
                .await,
        )?;
        ensure!(msg.contains("invalid OCI spec"), "{msg}");
        let mut spec = container(&["true"]);
        spec.as_object_mut().context("spec")?.remove("process");
        let msg = rpc_error(vm.create("bad-spec", &spec, StdioReq::OUT).await)?;
        ensure!(msg.contains("has no process"), "{msg}");
        let msg = rpc_error(vm.create("bad-spec", &container(&[]), StdioReq::OUT).await)?;
        ensure!(msg.contains("process.args is empty"), "{msg}");
        // Nothing of the failed attempts is left: the id is free again.
        let out = vm.run("bad-spec", &container(&["true"])).await?;
        ensure!(out.status == 0);
        Ok(())
    })
}

fn unknown_ids_are_not_found(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let msg = rpc_error(vm.start("nope", "").await)?;
        ensure!(
            msg.starts_with("NOT_FOUND") && msg.contains("\"nope\""),
            "{msg}"
        );
        ensure!(rpc_error(vm.wait("nope", "").await)?.contains("not found"));
        ensure!(rpc_error(vm.signal("nope", "", 9).await)?.contains("not found"));
        ensure!(rpc_error(vm.remove("nope").await)?.contains("not found"));
        let c = "known";
        let s = vm.start_sleeper(c).await?;
        let msg = rpc_error(vm.wait(c, "no-such-exec").await)?;
        ensure!(msg.contains("no exec no-such-exec"), "{msg}");
        vm.kill_and_remove(c, s).await.map(drop)
    })
}

fn bad_and_duplicate_ids(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let msg = rpc_error(
            vm.create_raw(
                "../escape",
                container(&["true"]).to_string().as_bytes(),
                StdioReq::OUT,
            )
            .await,
        )?;
        ensure!(msg.contains("invalid container id"), "{msg}");
        let c = "dup";
        let s = vm
            .create(c, &container(&["sleep", "1000"]), StdioReq::OUT)
            .await?;
        let msg = rpc_error(vm.create(c, &container(&["true"]), StdioReq::OUT).await)?;
        ensure!(msg.starts_with("ALREADY_EXISTS"), "{msg}");
        vm.start(c, "").await?;
        let e = vm.exec(c, "x", &process(&["true"]), StdioReq::OUT).await?;
        vm.finish(c, "x", e).await?;
        let msg = rpc_error(vm.exec(c, "x", &process(&["true"]), StdioReq::OUT).await)?;
        ensure!(msg.contains("exec x already exists"), "{msg}");
        let msg = rpc_error(
            vm.exec(c, "bad/id", &process(&["true"]), StdioReq::OUT)
                .await,
        )?;
        ensure!(msg.contains("invalid exec id"), "{msg}");
        vm.kill_and_remove(c, s).await.map(drop)
    })
}

fn missing_rootfs(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        // No add_rootfs: the shared directory has nothing for this id.
        let msg = rpc_error(
            vm.create_raw(
                "no-rootfs",
                container(&["true"]).to_string().as_bytes(),
                StdioReq::OUT,
            )
            .await,
        )?;
        ensure!(
            msg.contains("rootfs /run/podvisor/shared/no-rootfs/rootfs")
                && msg.contains("does not exist"),
            "{msg}"
        );
        // A rootfs outside the shared directory (the guest's own root) is refused.
        vm.add_rootfs("guest-root")?;
        let mut spec = container(&["true"]);
        spec["root"]["path"] = json!("../../..");
        let msg = rpc_error(vm.create("guest-root", &spec, StdioReq::OUT).await)?;
        ensure!(
            msg.starts_with("INVALID_ARGUMENT")
                && msg.contains("not a directory under /run/podvisor/shared"),
            "{msg}"
        );
        Ok(())
    })
}

fn unknown_user(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let mut spec = container(&["id"]);
        spec["process"]["user"] = json!({"uid": 0, "gid": 0, "username": "nosuchuser"});
        let msg = rpc_error(vm.create("who", &spec, StdioReq::OUT).await)?;
        ensure!(
            msg.starts_with("INVALID_ARGUMENT: unknown user \"nosuchuser\""),
            "{msg}"
        );
        Ok(())
    })
}

fn missing_executable(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let msg = rpc_error(
            vm.create("noexe", &container(&["no-such-binary"]), StdioReq::OUT)
                .await,
        )?;
        ensure!(
            msg.contains("no-such-binary") && msg.contains("not found in $PATH"),
            "{msg}"
        );
        // The failed container left no cgroup behind: the id can be reused.
        let out = vm.run("noexe", &container(&["true"])).await?;
        ensure!(out.status == 0);
        Ok(())
    })
}

fn exec_into_stopped_container(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let c = "stopped";
        let s = vm.create(c, &container(&["true"]), StdioReq::OUT).await?;
        vm.start(c, "").await?;
        vm.finish(c, "", s).await?;
        let msg = rpc_error(vm.exec(c, "late", &process(&["true"]), StdioReq::OUT).await)?;
        ensure!(
            msg.starts_with("FAILED_PRECONDITION") && msg.contains("not running"),
            "{msg}"
        );
        let msg = rpc_error(vm.start(c, "").await)?;
        ensure!(msg.contains("already"), "{msg}");
        vm.remove(c).await
    })
}

fn remove_refuses_running_container(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let c = "busy";
        let s = vm.start_sleeper(c).await?;
        let msg = rpc_error(vm.remove(c).await)?;
        ensure!(msg.contains("still running"), "{msg}");
        vm.signal(c, "", libc::SIGKILL).await?;
        vm.finish(c, "", s).await?;
        vm.remove(c).await?;
        // A container created but never started may be removed at once.
        let _unused = vm
            .create("never-started", &container(&["true"]), StdioReq::OUT)
            .await?;
        vm.remove("never-started").await
    })
}

fn invalid_signal_and_resize_without_tty(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let c = "sig-bad";
        let s = vm.start_sleeper(c).await?;
        let msg = rpc_error(vm.signal(c, "", 99).await)?;
        ensure!(msg.contains("invalid signal 99"), "{msg}");
        let r = vm
            .agent
            .tty_win_resize(
                ctx(),
                &api::TtyWinResizeRequest {
                    container_id: c.into(),
                    rows: 1,
                    columns: 1,
                    ..Default::default()
                },
            )
            .await;
        let msg = rpc_error(r.map_err(anyhow::Error::from))?;
        ensure!(msg.contains("no terminal"), "{msg}");
        vm.kill_and_remove(c, s).await.map(drop)
    })
}

/// A ttrpc request frame with the given payload length claim.
fn frame(len: u32, stream_id: u32, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(10 + body.len());
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&stream_id.to_be_bytes());
    f.push(1); // request
    f.push(0);
    f.extend_from_slice(body);
    f
}

fn oversized_message(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let mut s = podvisor_protocol::hybrid_vsock::dial_within(
            &vm.vsock_path(),
            podvisor_protocol::AGENT_PORT,
            Duration::from_secs(10),
        )
        .await?;
        // 5 MiB claimed and sent: beyond ttrpc's 4 MiB limit.
        let len = 5 << 20;
        let body = vec![0xAB; len as usize];
        let mut msg = frame(len, 1, &[]);
        msg.extend_from_slice(&body);
        s.write_all(&msg).await?;
        // The agent answers with an error status for stream 1, or closes.
        let mut header = [0u8; 10];
        let got = tokio::time::timeout(Duration::from_secs(60), s.read_exact(&mut header)).await;
        match got {
            Ok(Ok(_)) => {
                ensure!(u32::from_be_bytes([header[4], header[5], header[6], header[7]]) == 1);
                ensure!(
                    header[8] == 2,
                    "expected a response frame, got type {}",
                    header[8]
                );
            }
            Ok(Err(_)) => {} // connection closed: also acceptable
            Err(_) => bail!("no answer to an oversized frame within 60s"),
        }
        // A normal call still works (checked after every test too).
        Ok(())
    })
}

fn garbage_on_the_api_port(vm: &TestVm) -> BoxFut<'_> {
    Box::pin(async move {
        let mut s = podvisor_protocol::hybrid_vsock::dial_within(
            &vm.vsock_path(),
            podvisor_protocol::AGENT_PORT,
            Duration::from_secs(10),
        )
        .await?;
        // A well-formed frame with a body that is not protobuf, then noise.
        s.write_all(&frame(16, 3, &[0xFF; 16])).await?;
        s.write_all(b"this is not ttrpc at all\n\x00\x01\x02")
            .await?;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut sink)).await;
        std::io::stderr().flush().ok();
        Ok(())
    })
}

// --- the end of a sandbox -------------------------------------------------

async fn destroy_sandbox_powers_off(cfg: &VmConfig) -> Result<()> {
    let vm = TestVm::boot(cfg).await?;
    let s = vm
        .create("doomed", &container(&["sleep", "1000"]), StdioReq::OUT)
        .await?;
    vm.start("doomed", "").await?;
    drop(s);
    vm.power_off(Duration::from_secs(60)).await?;
    Ok(())
}

/// A host tap with an address, deleted on drop.
struct HostTap(String);

impl HostTap {
    fn create(name: &str, cidr: &str) -> Result<HostTap> {
        use podvisor_testkit::vm::ip;
        // Owned by root, as the shim makes them: QEMU has no capabilities.
        ip(&["tuntap", "add", "dev", name, "mode", "tap", "user", "0"])?;
        let tap = HostTap(name.to_string());
        ip(&["addr", "add", cidr, "dev", name])?;
        ip(&["link", "set", name, "up"])?;
        Ok(tap)
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .output();
    }
}

/// The agent configures a NIC the VM got on a host tap: the container sees
/// the address and MAC, the host reaches the guest (ping) and the guest the
/// host (TCP), and bad requests fail with a reason and change nothing.
async fn network_reaches_the_host(cfg: &VmConfig) -> Result<()> {
    let name = format!("pvt{}", std::process::id() % 100_000);
    let tap = HostTap::create(&name, "10.99.7.1/24")?;
    let mac = "02:00:0a:63:07:02";
    let mut cfg = cfg.clone();
    cfg.net = vec![podvisor_hypervisor::NetDevice {
        tap: tap.0.clone(),
        mac: mac.into(),
    }];
    let vm = TestVm::boot(&cfg).await?;

    let mut iface = api::NetInterface::new();
    iface.mac = mac.into();
    iface.name = "eth0".into();
    iface.mtu = 1400;
    let mut addr = api::IpAddress::new();
    addr.address = "10.99.7.2".into();
    addr.prefix = 24;
    iface.addresses.push(addr);
    let mut route = api::NetRoute::new();
    route.gateway = "10.99.7.1".into();
    route.device = "eth0".into();
    let mut req = api::ConfigureNetworkRequest::new();
    req.interfaces.push(iface.clone());
    req.routes.push(route);

    // Wrong first: an unknown MAC and a bad address change nothing.
    let mut bad = req.clone();
    bad.interfaces[0].mac = "02:00:00:00:00:99".into();
    let e = rpc_error(
        vm.agent
            .configure_network(ctx(), &bad)
            .await
            .map_err(Into::into),
    )?;
    ensure!(
        e.starts_with("NOT_FOUND") && e.contains("02:00:00:00:00:99"),
        "{e}"
    );
    let mut bad = req.clone();
    bad.interfaces[0].addresses[0].address = "10.99.7.300".into();
    let e = rpc_error(
        vm.agent
            .configure_network(ctx(), &bad)
            .await
            .map_err(Into::into),
    )?;
    ensure!(
        e.starts_with("INVALID_ARGUMENT") && e.contains("10.99.7.300"),
        "{e}"
    );

    let done = vm.agent.configure_network(ctx(), &req).await?;
    ensure!(
        done.interfaces == ["eth0"],
        "configured {:?}",
        done.interfaces
    );

    let show = vm
        .run(
            "ipaddr",
            &container(&["sh", "-c", "ip addr show eth0; ip route"]),
        )
        .await?;
    ensure!(
        show.stdout.contains("inet 10.99.7.2/24")
            && show.stdout.contains(mac)
            && show.stdout.contains("mtu 1400")
            && show.stdout.contains("default via 10.99.7.1"),
        "in the guest:\n{}",
        show.stdout
    );

    let ping = tokio::process::Command::new(podvisor_testkit::vm::tool("BUSYBOX", "busybox"))
        .args(["ping", "-c", "1", "-W", "20", "10.99.7.2"])
        .output()
        .await?;
    ensure!(
        ping.status.success(),
        "host cannot ping the guest: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );

    let listener = tokio::net::TcpListener::bind("10.99.7.1:0").await?;
    let port = listener.local_addr()?.port();
    let accept = tokio::spawn(async move {
        let (mut s, peer) = listener.accept().await?;
        let mut got = String::new();
        s.read_to_string(&mut got).await?;
        Ok::<_, std::io::Error>((peer, got))
    });
    let send = vm
        .run(
            "nc",
            &container(&[
                "sh",
                "-c",
                &format!("echo hello from the guest | nc 10.99.7.1 {port}"),
            ]),
        )
        .await?;
    ensure!(
        send.status == 0,
        "nc exited {}: {}",
        send.status,
        send.stderr
    );
    let (peer, got) = tokio::time::timeout(Duration::from_secs(30), accept).await???;
    ensure!(got == "hello from the guest\n", "host got {got:?}");
    ensure!(peer.ip().to_string() == "10.99.7.2", "from {peer}");

    vm.shutdown().await;
    drop(tap);
    let left = std::process::Command::new("ip")
        .args(["link", "show", &name])
        .output()?;
    ensure!(!left.status.success(), "tap {name} left behind");
    Ok(())
}
