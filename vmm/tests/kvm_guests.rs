//! The VMM under /dev/kvm with small purpose-built guests (assembled from
//! `tests/guests/*.S` with binutils). They run wherever /dev/kvm exists,
//! even a nested one that emulates guest code: each is a few thousand
//! instructions. Without /dev/kvm every test is reported as ignored, with
//! the reason.
//!
//! What they prove: the VMM's own boot path reaches 64-bit mode with the
//! zero page, E820 map and command line it wrote; the serial port prints;
//! every virtio-mmio window the DSDT names answers with the right magic,
//! version and device id; an i8042 reset, an ACPI power-off, a triple
//! fault and the control socket each end the VM with their own status; a
//! second vCPU starts through INIT/SIPI; a hostile guest leaves the VMM
//! running and its device marked DEVICE_NEEDS_RESET; a guest vsock driver
//! (in assembly) answers a host connection over the hybrid-vsock socket
//! and echoes its data.

// An integration-test crate: every function here is test code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::tests_outside_test_module
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use podvisor_vmm::snapshot::VmState;
use podvisor_vmm::{ExitReason, Vm, VmConfig};
use podvisor_vmm_config::{BlockConfig, FsConfig, NetConfig, VsockConfig};
use vm_memory::{Bytes, GuestAddress};

type Result = std::result::Result<(), Failed>;
type TestFn = fn() -> Result;

fn check(cond: bool, msg: impl Into<String>) -> Result {
    if cond {
        Ok(())
    } else {
        Err(msg.into().into())
    }
}

/// A scratch directory for this run (assembled guests, consoles, sockets).
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("tempdir"))
        .path()
}

/// `tests/guests/<name>.S` assembled by `tests/guests/build.sh`, once:
/// tests run in parallel, and one must not read a guest another is
/// still writing.
fn guest(name: &str) -> std::result::Result<PathBuf, Failed> {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let elf = scratch().join(format!("{name}.elf"));
    if built.iter().any(|b| b == name) {
        return Ok(elf);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests/build.sh");
    let out = Command::new(&script)
        .arg(name)
        .arg(scratch())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    check(
        out.status.success(),
        format!(
            "assembling {name} (binutils): {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    )?;
    built.push(name.to_string());
    Ok(elf)
}

fn config(kernel: PathBuf, name: &str) -> VmConfig {
    VmConfig {
        vcpus: 1,
        memory_mib: 32,
        kernel,
        initramfs: None,
        cmdline: "hello podvisor".into(),
        console: Some(scratch().join(format!("{name}.console"))),
        control_socket: None,
        vsock: None,
        fs: vec![],
        block: vec![],
        net: vec![],
        rng: false,
        mmio_on_cmdline: false,
        cpuid_hide: vec![],
        restore: None,
    }
}

fn console(c: &VmConfig) -> String {
    c.console
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default()
}

fn hex(line: &str, word: usize) -> std::result::Result<u64, Failed> {
    let w = line
        .split_whitespace()
        .nth(word)
        .ok_or_else(|| format!("no word {word} in {line:?}"))?;
    u64::from_str_radix(w, 16).map_err(|e| format!("{w:?}: {e}").into())
}

/// Where the test guests find what the test tells them (see their .S).
const GUEST_PARAMS: u64 = 0x180000;

/// Writes `words` at [`GUEST_PARAMS`] in the guest.
fn hand_to_guest(vm: &Vm, words: &[u64]) -> Result {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    vm.memory()
        .write_slice(&bytes, GuestAddress(GUEST_PARAMS))
        .map_err(|e| e.to_string().into())
}

/// Runs the VM to its end and checks it ended as `expected`; returns the
/// guest's console.
fn run_expecting(
    vm: Vm,
    c: &VmConfig,
    expected: ExitReason,
) -> std::result::Result<String, Failed> {
    let reason = run(vm, Duration::from_secs(60))?;
    let out = console(c);
    check(
        reason == expected,
        format!("{reason}, not {expected}; console:\n{out}"),
    )?;
    Ok(out)
}

/// Runs a VM on a thread, failing if it has not ended within `within`.
fn run(vm: Vm, within: Duration) -> std::result::Result<ExitReason, Failed> {
    let exit = vm.exit_signal();
    let t = std::thread::spawn(move || vm.run());
    let deadline = Instant::now() + within;
    while !t.is_finished() {
        if Instant::now() > deadline {
            exit.trigger(ExitReason::Stopped);
            let _ = t.join();
            return Err(format!("the VM did not end within {within:?}").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    t.join().map_err(|_| "the VM thread panicked".into())
}

fn boot_path() -> Result {
    let mut c = config(guest("boot")?, "boot");
    c.rng = true;
    c.mmio_on_cmdline = true;
    let vm = Vm::build(&c).map_err(|e| e.to_string())?;
    let out = run_expecting(vm, &c, ExitReason::PowerOff)?;
    let lines: Vec<&str> = out.lines().collect();
    check(lines.len() >= 6, format!("console:\n{out}"))?;
    let efer = hex(lines[0], 3)?;
    check(
        efer & 0x500 == 0x500,
        format!("EFER {efer:#x}: LME and LMA expected"),
    )?;
    check(hex(lines[1], 2)? == 2, format!("two E820 entries: {out}"))?;
    check(
        (hex(lines[2], 0)?, hex(lines[2], 1)?, hex(lines[2], 2)?) == (0, 0x9fc00, 1),
        format!("low RAM entry: {}", lines[2]),
    )?;
    check(
        (hex(lines[3], 0)?, hex(lines[3], 1)?, hex(lines[3], 2)?)
            == (0x100000, (32 << 20) - 0x100000, 1),
        format!("high RAM entry: {}", lines[3]),
    )?;
    check(
        lines[4] == "cmdline hello podvisor virtio_mmio.device=4K@0xd0000000:5",
        format!("cmdline: {:?}", lines[4]),
    )?;
    check(hex(lines[5], 1)? == 0xe0000, format!("RSDP: {}", lines[5]))
}

/// The virtio-mmio windows the DSDT declares (Memory32Fixed descriptors
/// of `LNRO0005` devices), found from the RSDP as a kernel would.
fn dsdt_windows(vm: &Vm) -> std::result::Result<Vec<u64>, Failed> {
    let mem = vm.memory();
    let rd = |a: u64, n: usize| -> std::result::Result<Vec<u8>, Failed> {
        let mut v = vec![0u8; n];
        mem.read_slice(&mut v, GuestAddress(a))
            .map_err(|e| e.to_string())?;
        Ok(v)
    };
    let u64_at =
        |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
    let table = |a: u64| -> std::result::Result<Vec<u8>, Failed> {
        let len = u32::from_le_bytes(rd(a + 4, 4)?.try_into().unwrap_or_default());
        rd(a, len as usize)
    };
    let rsdp = rd(0xe0000, 36)?;
    check(&rsdp[..8] == b"RSD PTR ", "no RSDP at 0xe0000")?;
    let xsdt = table(u64_at(&rsdp, 24))?;
    let fadt = table(u64_at(&xsdt, 36))?;
    check(&fadt[..4] == b"FACP", "first XSDT entry is not the FADT")?;
    let dsdt = table(u64_at(&fadt, 140))?;
    let mut out = Vec::new();
    for (i, w) in dsdt.windows(12).enumerate() {
        // Memory32Fixed: tag 0x86, length 9, then rw, base, size 0x1000.
        if w[0] == 0x86
            && w[1] == 9
            && w[2] == 0
            && u32::from_le_bytes([w[8], w[9], w[10], w[11]]) == 0x1000
        {
            let hid_before = dsdt[..i].windows(8).rev().any(|h| h == b"LNRO0005");
            if hid_before {
                out.push(u64::from(u32::from_le_bytes([w[4], w[5], w[6], w[7]])));
            }
        }
    }
    Ok(out)
}

/// virtiofsd on a scratch directory, killed on drop.
struct Virtiofsd(std::process::Child, PathBuf);

impl Virtiofsd {
    fn start(name: &str) -> std::result::Result<Virtiofsd, Failed> {
        let dir = scratch().join(format!("{name}-shared"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let sock = scratch().join(format!("{name}-fs.sock"));
        let child = Command::new("/usr/lib/qemu/virtiofsd")
            .arg(format!("--socket-path={}", sock.display()))
            .arg("-o")
            .arg(format!("source={}", dir.display()))
            .args(["-o", "cache=none"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting /usr/lib/qemu/virtiofsd (make deps): {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            check(
                Instant::now() < deadline,
                "virtiofsd did not create its socket",
            )?;
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Virtiofsd(child, sock))
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mmio_windows_and_i8042_reset() -> Result {
    let fsd = Virtiofsd::start("mmio")?;
    let disk = scratch().join("mmio-disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).map_err(|e| e.to_string())?;
    let mut c = config(guest("mmio")?, "mmio");
    c.vsock = Some(VsockConfig {
        cid: 3,
        uds: scratch().join("mmio-vsock"),
    });
    c.fs = vec![FsConfig {
        socket: fsd.1.clone(),
        tag: "podvisor".into(),
    }];
    c.block = vec![BlockConfig {
        path: disk,
        read_only: true,
    }];
    // A tap named here is created by TUNSETIFF and gone when the VM closes it.
    c.net = vec![NetConfig {
        tap: format!("pvt{}", std::process::id()),
        mac: Some("02:00:00:00:00:01".into()),
    }];
    c.rng = true;
    let vm = Vm::build(&c).map_err(|e| e.to_string())?;
    let windows = dsdt_windows(&vm)?;
    let built: Vec<u64> = vm.mmio_devices().iter().map(|d| d.addr).collect();
    check(
        windows == built,
        format!("DSDT names {windows:x?}, the VM built {built:x?}"),
    )?;
    let mut list = vec![windows.len() as u64];
    list.extend(&windows);
    hand_to_guest(&vm, &list)?;
    let out = run_expecting(vm, &c, ExitReason::Reboot)?;
    let lines: Vec<&str> = out.lines().collect();
    // vsock, fs, block, net, rng: in slot order.
    let ids = [19u64, 26, 2, 1, 4];
    check(lines.len() == ids.len() + 1, format!("console:\n{out}"))?;
    for (i, id) in ids.iter().enumerate() {
        let l = lines[i];
        check(hex(l, 0)? == windows[i], format!("{l}: address"))?;
        check(hex(l, 1)? == 0x7472_6976, format!("{l}: magic \"virt\""))?;
        check(hex(l, 2)? == 2, format!("{l}: version 2"))?;
        check(hex(l, 3)? == *id, format!("{l}: device id {id}"))?;
    }
    check(lines[ids.len()] == "resetting", format!("console:\n{out}"))?;
    check(
        !c.vsock.as_ref().is_some_and(|v| v.uds.exists()),
        "vsock socket left behind",
    )
}

fn two_vcpus() -> Result {
    let mut c = config(guest("smp")?, "smp");
    c.vcpus = 2;
    let vm = Vm::build(&c).map_err(|e| e.to_string())?;
    let out = run_expecting(vm, &c, ExitReason::PowerOff)?;
    check(
        out.lines().any(|l| l == "1"),
        format!("CPU 1 did not print: {out}"),
    )?;
    check(out.contains("CPU 0 saw CPU 1"), format!("console:\n{out}"))
}

fn hostile_guest() -> Result {
    let mut c = config(guest("hostile")?, "hostile");
    c.rng = true;
    let vm = Vm::build(&c).map_err(|e| e.to_string())?;
    hand_to_guest(&vm, &[1, vm.mmio_devices()[0].addr])?;
    let out = run_expecting(vm, &c, ExitReason::PowerOff)?;
    let line = |w: &str| {
        out.lines()
            .find(|l| l.starts_with(w))
            .unwrap_or("")
            .to_string()
    };
    let status = hex(&line("status"), 1)?;
    check(
        status & 0x40 != 0,
        format!("device status {status:#x}: DEVICE_NEEDS_RESET expected"),
    )?;
    check(
        hex(&line("port"), 1)? & 0xffff_ffff == 0xffff_ffff,
        format!("unclaimed port: {out}"),
    )?;
    check(
        hex(&line("mmio"), 1)? & 0xffff_ffff == 0xffff_ffff,
        format!("unclaimed MMIO: {out}"),
    )
}

fn control_socket_stops_a_halted_guest() -> Result {
    let mut c = config(guest("spin")?, "spin");
    let sock = scratch().join("spin-control.sock");
    c.control_socket = Some(sock.clone());
    let vm = Vm::build(&c).map_err(|e| e.to_string())?;
    let t = std::thread::spawn(move || vm.run());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !console(&c).contains("spinning") {
        check(Instant::now() < deadline, "guest never printed")?;
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = podvisor_vmm_config::control::request(&sock, "status").map_err(|e| e.to_string())?;
    check(
        st["state"] == "running" && st["vcpus"] == 1,
        format!("status: {st}"),
    )?;
    let ok = podvisor_vmm_config::control::request(&sock, "shutdown").map_err(|e| e.to_string())?;
    check(ok["ok"] == true, format!("shutdown: {ok}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.is_finished() {
        check(Instant::now() < deadline, "VM did not stop after shutdown")?;
        std::thread::sleep(Duration::from_millis(10));
    }
    let reason = t.join().map_err(|_| "VM thread panicked")?;
    check(reason == ExitReason::Stopped, format!("{reason}"))?;
    check(!sock.exists(), "control socket left behind")
}

/// A guest-side vsock driver answers a host CONNECT and echoes data: the
/// whole path through KVM ioeventfds, the event loop, the device, the
/// hybrid-vsock socket, and the device's interrupt status.
fn vsock_echo_through_a_guest_driver() -> Result {
    let mut c = config(guest("vsock")?, "vsock");
    let uds = scratch().join("echo-vsock");
    c.vsock = Some(VsockConfig {
        cid: 3,
        uds: uds.clone(),
    });
    let vm = Vm::build(&c).map_err(|e| e.to_string())?;
    hand_to_guest(&vm, &[vm.mmio_devices()[0].addr])?;
    let exit = vm.exit_signal();
    let t = std::thread::spawn(move || vm.run());
    let talk = || -> std::result::Result<String, Failed> {
        wait_for_console(&c, "ready")?;
        echo_over_vsock(&c, &uds, b"ping")
    };
    let echoed = talk();
    let reason = join(t, &exit, Duration::from_secs(30))?;
    let out = console(&c);
    let echoed = echoed.map_err(|e| format!("{:?}; VM ended: {reason}", e.message()))?;
    check(
        echoed == "ping",
        format!("echo {echoed:?}; console:\n{out}"),
    )?;
    check(
        reason == ExitReason::PowerOff,
        format!("{reason}; console:\n{out}"),
    )?;
    check(
        out.contains("request for port 0000000000000400"),
        format!("console:\n{out}"),
    )?;
    check(out.contains("got ping"), format!("console:\n{out}"))?;
    let seen = out
        .lines()
        .find(|l| l.starts_with("interrupt status seen "))
        .map(|l| hex(l, 3))
        .transpose()?
        .unwrap_or(0);
    check(
        seen & 1 == 1,
        format!("no used-buffer interrupt seen; console:\n{out}"),
    )?;
    check(!uds.exists(), "vsock socket left behind")
}

/// Waits until the guest has printed `needle`.
fn wait_for_console(c: &VmConfig, needle: &str) -> Result {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !console(c).contains(needle) {
        check(
            Instant::now() < deadline,
            format!("no {needle:?} on the console: {}", console(c)),
        )?;
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Connects to the vsock guest's port 1024 through the hybrid-vsock
/// socket `uds` and returns what it echoes of `payload`.
fn echo_over_vsock(
    c: &VmConfig,
    uds: &Path,
    payload: &[u8],
) -> std::result::Result<String, Failed> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(uds).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"CONNECT 1024\n").map_err(|e| e.to_string())?;
    let mut ok = String::new();
    BufReader::new(&s)
        .read_line(&mut ok)
        .map_err(|e| format!("reading OK: {e}"))?;
    check(
        ok.starts_with("OK "),
        format!("answer to CONNECT: {ok:?}; console: {}", console(c)),
    )?;
    s.write_all(payload).map_err(|e| e.to_string())?;
    let mut echo = vec![0u8; payload.len()];
    s.read_exact(&mut echo)
        .map_err(|e| format!("reading the echo: {e}; console: {}", console(c)))?;
    Ok(String::from_utf8_lossy(&echo).into_owned())
}

/// Waits for a VM thread to end (stopping it after `within`).
fn join(
    t: std::thread::JoinHandle<ExitReason>,
    exit: &podvisor_vmm::exit::ExitSignal,
    within: Duration,
) -> std::result::Result<ExitReason, Failed> {
    let deadline = Instant::now() + within;
    while !t.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !t.is_finished() {
        exit.trigger(ExitReason::Stopped);
    }
    t.join().map_err(|_| "VM thread panicked".into())
}

/// The vsock guest with a control socket, running on a thread once its
/// driver is ready: its config, hybrid-vsock socket, control socket, exit
/// signal and thread.
struct ControlledVsockGuest {
    c: VmConfig,
    uds: PathBuf,
    ctl: PathBuf,
    exit: std::sync::Arc<podvisor_vmm::exit::ExitSignal>,
    thread: std::thread::JoinHandle<ExitReason>,
}

fn controlled_vsock_guest(name: &str) -> std::result::Result<ControlledVsockGuest, Failed> {
    let mut c = config(guest("vsock")?, name);
    let uds = scratch().join(format!("{name}-vsock"));
    let ctl = scratch().join(format!("{name}.sock"));
    c.vsock = Some(VsockConfig {
        cid: 3,
        uds: uds.clone(),
    });
    c.control_socket = Some(ctl.clone());
    let vm = Vm::build(&c).map_err(|e| e.to_string())?;
    hand_to_guest(&vm, &[vm.mmio_devices()[0].addr])?;
    let exit = vm.exit_signal();
    let thread = std::thread::spawn(move || vm.run());
    wait_for_console(&c, "ready")?;
    Ok(ControlledVsockGuest {
        c,
        uds,
        ctl,
        exit,
        thread,
    })
}

/// The vsock guest, its driver up and waiting for a host connection, is
/// paused and saved; the original resumes and two VMs restored from the
/// snapshot (each its own console, socket and copy of memory) go on from
/// that very point: each answers its own connection, echoes its own
/// bytes and powers off, none printing what the guest printed before.
fn snapshot_resumes_and_restores_two_clones() -> Result {
    let ControlledVsockGuest {
        c,
        uds,
        ctl,
        exit,
        thread: t,
    } = controlled_vsock_guest("snap-orig")?;
    let ask = |req: serde_json::Value| -> std::result::Result<serde_json::Value, Failed> {
        podvisor_vmm_config::control::send(&ctl, &req).map_err(|e| format!("{req}: {e}").into())
    };
    let (memory, state) = (scratch().join("snap.memory"), scratch().join("snap.state"));
    let snap = serde_json::json!({"op": "snapshot", "memory": memory, "state": state});
    let running = ask(snap.clone())?;
    check(
        running["error"]
            .as_str()
            .is_some_and(|e| e.contains("pause it first")),
        format!("snapshot of a running VM: {running}"),
    )?;
    check(
        ask(serde_json::json!({"op": "pause"}))?["ok"] == true,
        "pause",
    )?;
    let st = ask(serde_json::json!({"op": "status"}))?;
    check(st["state"] == "paused", format!("status: {st}"))?;
    let saved = ask(snap)?;
    check(saved["ok"] == true, format!("snapshot: {saved}"))?;
    let pages = saved["memory_pages"].as_u64().unwrap_or(0);
    check(
        pages > 0 && pages < 2048,
        format!("{pages} pages saved of a guest that touches a few"),
    )?;
    check(
        ask(serde_json::json!({"op": "resume"}))?["ok"] == true,
        "resume",
    )?;
    let echoed = echo_over_vsock(&c, &uds, b"orig");
    let reason = join(t, &exit, Duration::from_secs(30))?;
    check(
        echoed.as_deref().ok() == Some("orig") && reason == ExitReason::PowerOff,
        format!(
            "original after resume: {echoed:?}, {reason}; console:\n{}",
            console(&c)
        ),
    )?;

    let state_bytes = std::fs::read(&state).map_err(|e| e.to_string())?;
    let memory_bytes = std::fs::read(&memory).map_err(|e| e.to_string())?;
    let mut clones = Vec::new();
    for name in ["snap-a", "snap-b"] {
        let mut cc = config(guest("vsock")?, name);
        let u = scratch().join(format!("{name}-vsock"));
        cc.vsock = Some(VsockConfig {
            cid: 3,
            uds: u.clone(),
        });
        cc.restore = Some(podvisor_vmm_config::RestoreConfig {
            memory: memory.clone(),
            state: state.clone(),
        });
        let vm = Vm::build(&cc).map_err(|e| format!("restoring {name}: {e}"))?;
        let exit = vm.exit_signal();
        clones.push((name, cc, u, exit, std::thread::spawn(move || vm.run())));
    }
    for (name, cc, u, exit, t) in clones {
        let echoed = echo_over_vsock(&cc, &u, name.as_bytes());
        let reason = join(t, &exit, Duration::from_secs(30))?;
        let out = console(&cc);
        check(
            echoed.as_deref().ok() == Some(name),
            format!("{name}: echo {echoed:?}; {reason}; console:\n{out}"),
        )?;
        check(
            reason == ExitReason::PowerOff,
            format!("{name}: {reason}; console:\n{out}"),
        )?;
        check(
            !out.contains("ready") && out.contains(&format!("got {name}")),
            format!("{name} did not go on from the snapshot; console:\n{out}"),
        )?;
        check(!u.exists(), format!("{name}: vsock socket left behind"))?;
    }
    // The snapshot's files are only read.
    check(
        std::fs::read(&state).ok() == Some(state_bytes)
            && std::fs::read(&memory).ok() == Some(memory_bytes),
        "restoring changed the snapshot's files",
    )?;
    let again = VmState::read(&state).map_err(|e| e.to_string())?;
    check(again.vcpus.len() == 1, "state file unreadable")
}

/// A snapshot that does not fit the config, or a damaged one, is refused
/// before anything runs, naming what is wrong; a device that cannot be
/// saved now says why.
fn snapshot_and_restore_refuse_what_does_not_fit() -> Result {
    let ControlledVsockGuest {
        uds,
        ctl,
        exit,
        thread: t,
        ..
    } = controlled_vsock_guest("snap-bad")?;
    let dir = scratch().join("snap-bad");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (memory, state) = (dir.join("memory"), dir.join("state"));
    let snap = serde_json::json!({"op": "snapshot", "memory": memory, "state": state});
    let ask = |req: &serde_json::Value| {
        podvisor_vmm_config::control::send(&ctl, req).map_err(|e| Failed::from(e.to_string()))
    };
    // A host connection held open: vsock cannot be saved with it.
    let held = std::os::unix::net::UnixStream::connect(&uds).map_err(|e| e.to_string())?;
    std::io::Write::write_all(&mut &held, b"CONNECT 1024\n").map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(200));
    ask(&serde_json::json!({"op": "pause"}))?;
    let refused = ask(&snap)?;
    check(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("vsock connections are open")),
        format!("snapshot with an open connection: {refused}"),
    )?;
    check(!state.exists(), "a refused snapshot wrote its state")?;
    drop(held);
    exit.trigger(ExitReason::Stopped);
    let _ = t.join();

    // A good snapshot to damage: a guest with no device at all.
    let mut spin = config(guest("spin")?, "snap-spin");
    let sctl = scratch().join("snap-spin.sock");
    spin.control_socket = Some(sctl.clone());
    let vm = Vm::build(&spin).map_err(|e| e.to_string())?;
    let exit = vm.exit_signal();
    let t = std::thread::spawn(move || vm.run());
    wait_for_console(&spin, "spinning")?;
    podvisor_vmm_config::control::request(&sctl, "pause").map_err(|e| e.to_string())?;
    let same = serde_json::json!({"op": "snapshot", "memory": state, "state": state});
    let refused = podvisor_vmm_config::control::send(&sctl, &same).map_err(|e| e.to_string())?;
    check(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("are both")),
        format!("memory and state at one path: {refused}"),
    )?;
    let saved = podvisor_vmm_config::control::send(&sctl, &snap).map_err(|e| e.to_string())?;
    check(saved["ok"] == true, format!("snapshot: {saved}"))?;
    exit.trigger(ExitReason::Stopped);
    let _ = t.join();

    let restoring = |edit: &dyn Fn(&mut VmConfig)| -> String {
        let mut r = config(spin.kernel.clone(), "snap-restored");
        r.restore = Some(podvisor_vmm_config::RestoreConfig {
            memory: memory.clone(),
            state: state.clone(),
        });
        edit(&mut r);
        match Vm::build(&r) {
            Ok(_) => "built".into(),
            Err(e) => e.to_string(),
        }
    };
    type Edit = fn(&mut VmConfig);
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("as saved", |_| {}, "built"),
        (
            "more memory",
            |r| r.memory_mib = 64,
            "memory_mib: 32 in the snapshot, 64 in the config",
        ),
        (
            "two vCPUs",
            |r| r.vcpus = 2,
            "vcpus: 1 in the snapshot, 2 in the config",
        ),
        (
            "a device added",
            |r| r.rng = true,
            "virtio devices: 0 () in the snapshot, 1 in the config",
        ),
        (
            "another CPU (a feature hidden)",
            |r| {
                r.cpuid_hide = vec![podvisor_vmm_config::CpuidBits {
                    leaf: 0x4000_0001,
                    subleaf: 0,
                    register: podvisor_vmm_config::CpuidRegister::Eax,
                    bits: 1 << 3, // KVM_FEATURE_CLOCKSOURCE2
                }]
            },
            "CPUID leaf 0x40000001 subleaf 0x0 differs from the snapshot's",
        ),
        (
            "no state file",
            |r| {
                if let Some(x) = r.restore.as_mut() {
                    x.state = scratch().join("no-such-state");
                }
            },
            "no-such-state",
        ),
    ];
    for (what, edit, want) in cases {
        let got = restoring(&edit);
        check(
            got.contains(want),
            format!("{what}: {got:?}, wanted {want:?}"),
        )?;
    }
    // Damaged files: a truncated memory file, a state that is not JSON,
    // a state of another format.
    let len = std::fs::metadata(&memory).map_err(|e| e.to_string())?.len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .map_err(|e| e.to_string())?;
    f.set_len(len / 2).map_err(|e| e.to_string())?;
    let got = restoring(&|_| {});
    check(
        got.contains("memory file") && got.contains("16777216 bytes"),
        format!("truncated memory: {got}"),
    )?;
    f.set_len(len).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(&state).map_err(|e| e.to_string())?;
    std::fs::write(&state, &text[..text.len() / 2]).map_err(|e| e.to_string())?;
    let got = restoring(&|_| {});
    check(
        got.contains("is not a podvisor-vmm snapshot state"),
        format!("truncated state: {got}"),
    )?;
    std::fs::write(&state, text.replacen("\"format\":1", "\"format\":99", 1))
        .map_err(|e| e.to_string())?;
    let got = restoring(&|_| {});
    check(
        got.contains("snapshot format 99"),
        format!("other format: {got}"),
    )
}

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_podvisor-vmm"))
}

/// The binary's exit status tells power-off (0), reboot (3), guest failure
/// (2) and bad input (1) apart, and SIGTERM stops it (0).
fn binary_exit_statuses() -> Result {
    let cases = [
        ("boot", 0, "powered off"),
        ("mmio", 3, "rebooted"),
        ("triple", 2, "failed"),
    ];
    for (g, code, word) in cases {
        let c = config(guest(g)?, &format!("bin-{g}"));
        let json = serde_json::to_string(&c).map_err(|e| e.to_string())?;
        let out = Command::new(binary())
            .args(["--config-json", &json])
            .output()
            .map_err(|e| e.to_string())?;
        let err = String::from_utf8_lossy(&out.stderr);
        check(
            out.status.code() == Some(code),
            format!("{g}: {:?}\n{err}", out.status),
        )?;
        check(
            err.contains(word),
            format!("{g}: stderr lacks {word:?}:\n{err}"),
        )?;
        if g == "triple" {
            // The failure explains itself: why (a triple fault on hardware;
            // a nested KVM that emulates may give up with an internal error
            // and its data), the vCPU's registers and the code at RIP (the
            // guest's `int3; hlt; jmp`), as QEMU shows.
            check(
                err.contains("triple fault")
                    || err
                        .contains("KVM internal error 1 (instruction emulation failed); data [0x"),
                format!("triple: no reason in\n{err}"),
            )?;
            for want in [
                "RIP=0x",
                "CPL=0",
                "CR0=0x",
                "CR3=0x",
                "EFER=0x",
                "RSP=",
                "IDT=0x0/0x0",
            ] {
                check(err.contains(want), format!("triple: no {want:?} in\n{err}"))?;
            }
            let code = err
                .lines()
                .find(|l| l.starts_with("Code at "))
                .unwrap_or("");
            check(
                code.contains("cc f4 eb fd") || code.contains("f4 eb fd"),
                format!("triple: no guest code bytes at RIP in\n{err}"),
            )?;
        }
    }
    // SIGTERM ends a guest that would never end by itself.
    let (child, _) = spin_binary("bin-spin", &[])?;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    check(
        out.status.code() == Some(0),
        format!("SIGTERM: {:?}", out.status),
    )?;
    check(
        String::from_utf8_lossy(&out.stderr).contains("stopped"),
        "SIGTERM: not logged as stopped",
    )
}

/// The spin guest on the binary, with a control socket; returns the child
/// once the guest has printed.
fn spin_binary(
    name: &str,
    extra: &[&str],
) -> std::result::Result<(std::process::Child, PathBuf), Failed> {
    let mut c = config(guest("spin")?, name);
    c.vcpus = 2;
    let sock = scratch().join(format!("{name}.sock"));
    c.control_socket = Some(sock.clone());
    let json = serde_json::to_string(&c).map_err(|e| e.to_string())?;
    let mut child = Command::new(binary())
        .args(extra)
        .args(["--config-json", &json])
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !console(&c).contains("spinning") {
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            return Err(format!(
                "{name}: the spin guest never printed ({:?}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((child, sock))
}

/// Each of the VMM's own threads (not KVM's kernel workers), with its
/// `Seccomp:` and `NoNewPrivs:` values from /proc.
fn thread_seccomp(pid: u32) -> std::result::Result<Vec<(String, String, String)>, Failed> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| e.to_string())? {
        let t = t.map_err(|e| e.to_string())?.path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        let comm = comm.trim().to_string();
        if comm.starts_with("kvm-") {
            continue;
        }
        let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or("")
                .trim()
                .to_string()
        };
        out.push((comm, field("Seccomp:"), field("NoNewPrivs:")));
    }
    out.sort();
    Ok(out)
}

/// Every thread of a running podvisor-vmm (main, signals, control, each
/// vCPU) runs under its seccomp filter with no_new_privs, and the work of
/// each (guest exits, pause, snapshot, resume, shutdown) fits its filter;
/// `--no-seccomp` runs without. A test build's hook makes a thread of
/// each kind issue a call outside its filter: the process dies of SIGSYS.
fn seccomp_filters_every_thread() -> Result {
    let (mut child, sock) = spin_binary("seccomp", &[])?;
    let threads = thread_seccomp(child.id())?;
    let names: Vec<&str> = threads.iter().map(|t| t.0.as_str()).collect();
    let all_filtered = threads.iter().all(|t| t.1 == "2" && t.2 == "1");
    let snapshot = (|| -> std::io::Result<Vec<serde_json::Value>> {
        use podvisor_vmm_config::control::{request, send};
        Ok(vec![
            request(&sock, "pause")?,
            send(
                &sock,
                &serde_json::json!({"op": "snapshot",
                    "memory": scratch().join("seccomp.mem"),
                    "state": scratch().join("seccomp.state")}),
            )?,
            request(&sock, "resume")?,
            request(&sock, "status")?,
            request(&sock, "shutdown")?,
        ])
    })();
    if snapshot.is_err() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&out.stderr);
    check(
        names == ["control", "podvisor-vmm", "signals", "vcpu0", "vcpu1"],
        format!("threads: {threads:?}"),
    )?;
    check(all_filtered, format!("Seccomp and NoNewPrivs: {threads:?}"))?;
    let answers = snapshot.map_err(|e| format!("control ops: {e}\n{err}"))?;
    check(
        answers.iter().all(|a| a.get("error").is_none())
            && answers[1]["memory_pages"].as_u64().is_some_and(|n| n > 0)
            && answers[3]["state"] == "running",
        format!("control ops under the filters: {answers:?}\n{err}"),
    )?;
    check(
        out.status.code() == Some(0),
        format!("shutdown: {:?}\n{err}", out.status),
    )?;

    let (mut child, _) = spin_binary("no-seccomp", &["--no-seccomp"])?;
    let threads = thread_seccomp(child.id())?;
    let _ = child.kill();
    let _ = child.wait();
    check(
        threads.iter().all(|t| t.1 == "0"),
        format!("--no-seccomp: {threads:?}"),
    )?;

    if !cfg!(feature = "test-hooks") {
        return Err(
            "built without the test-hooks feature, so the SIGSYS hook is missing: \
                    cargo test -p podvisor-vmm --features test-hooks --test kvm_guests"
                .into(),
        );
    }
    for kind in podvisor_vmm::seccomp::ThreadKind::ALL {
        let mut c = config(guest("spin")?, &format!("sigsys-{}", kind.name()));
        c.control_socket = Some(scratch().join(format!("sigsys-{}.sock", kind.name())));
        let json = serde_json::to_string(&c).map_err(|e| e.to_string())?;
        let log = scratch().join(format!("sigsys-{}.log", kind.name()));
        let mut child = Command::new(binary())
            .args(["--config-json", &json])
            .env("PODVISOR_VMM_TEST_SIGSYS", kind.name())
            .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().map_err(|e| e.to_string())?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!("{}: still running after its stray call", kind.name()).into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = child.wait().map_err(|e| e.to_string())?;
        let err = std::fs::read_to_string(&log).unwrap_or_default();
        use std::os::unix::process::ExitStatusExt;
        check(
            status.signal() == Some(libc::SIGSYS),
            format!("{}: {status:?}\n{err}", kind.name()),
        )?;
        check(
            err.contains(&format!("a {} thread calls ptrace", kind.name())),
            format!("{}: the hook did not run:\n{err}", kind.name()),
        )?;
    }
    Ok(())
}

fn bad_input_is_refused_before_the_vm_runs() -> Result {
    let boot = guest("boot")?;
    let garbage = scratch().join("garbage.bin");
    std::fs::write(&garbage, vec![0x42u8; 4096]).map_err(|e| e.to_string())?;
    let big = scratch().join("big-initramfs");
    std::fs::write(&big, vec![0u8; 40 << 20]).map_err(|e| e.to_string())?;
    let cases: Vec<(String, &str)> = vec![
        (
            r#"{"vcpus":1,"memory_mib":32,"kernel":"/nonexistent/vmlinux"}"#.into(),
            "/nonexistent/vmlinux",
        ),
        (
            format!(
                r#"{{"vcpus":1,"memory_mib":32,"kernel":"{}"}}"#,
                garbage.display()
            ),
            "neither a vmlinux ELF nor a bzImage",
        ),
        (
            format!(
                r#"{{"vcpus":1,"memory_mib":32,"kernel":"{}","initramfs":"{}"}}"#,
                boot.display(),
                big.display()
            ),
            "does not fit",
        ),
        (
            format!(
                r#"{{"vcpus":1,"memory_mib":4,"kernel":"{}"}}"#,
                boot.display()
            ),
            "memory_mib",
        ),
        (
            format!(
                r#"{{"vcpus":200,"memory_mib":32,"kernel":"{}"}}"#,
                boot.display()
            ),
            "vcpus",
        ),
        (
            format!(
                r#"{{"vcpus":1,"memory_mib":32,"kernel":"{}","block":[{{"path":"/nonexistent.img"}}]}}"#,
                boot.display()
            ),
            "/nonexistent.img",
        ),
        (
            format!(
                r#"{{"vcpus":1,"memory_mib":32,"kernel":"{}","fs":[{{"socket":"/nonexistent.sock","tag":"x"}}]}}"#,
                boot.display()
            ),
            "/nonexistent.sock",
        ),
        ("{\"vcpus\":1".into(), "not valid JSON"),
    ];
    for (json, word) in cases {
        let out = Command::new(binary())
            .args(["--config-json", &json])
            .output()
            .map_err(|e| e.to_string())?;
        let err = String::from_utf8_lossy(&out.stderr);
        check(
            out.status.code() == Some(1),
            format!("{json}: {:?} {err}", out.status),
        )?;
        check(
            err.contains(word),
            format!("{json}: stderr lacks {word:?}: {err}"),
        )?;
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let no_kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .err()
        .map(|e| format!("/dev/kvm: {e}"));
    if let Some(why) = &no_kvm {
        eprintln!("SKIPPING every KVM guest test: {why}");
    }
    let tests: Vec<(&str, TestFn)> = vec![
        (
            "boot_path_reaches_long_mode_with_zero_page_e820_cmdline",
            boot_path,
        ),
        (
            "mmio_windows_named_by_dsdt_answer_and_i8042_resets",
            mmio_windows_and_i8042_reset,
        ),
        ("two_vcpus_second_started_by_init_sipi", two_vcpus),
        (
            "vsock_echo_through_a_guest_driver",
            vsock_echo_through_a_guest_driver,
        ),
        (
            "hostile_guest_leaves_vmm_running_device_needs_reset",
            hostile_guest,
        ),
        (
            "control_socket_stops_a_halted_guest",
            control_socket_stops_a_halted_guest,
        ),
        ("binary_exit_statuses_and_sigterm", binary_exit_statuses),
        (
            "seccomp_filters_every_thread_and_sigsys_ends_a_stray_call",
            seccomp_filters_every_thread,
        ),
        (
            "snapshot_resumes_and_restores_two_clones",
            snapshot_resumes_and_restores_two_clones,
        ),
        (
            "snapshot_and_restore_refuse_what_does_not_fit",
            snapshot_and_restore_refuse_what_does_not_fit,
        ),
        (
            "bad_input_refused_before_the_vm_runs",
            bad_input_is_refused_before_the_vm_runs,
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| Trial::test(name, f).with_ignored_flag(no_kvm.is_some()))
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let _ = std::fs::remove_dir_all(scratch());
    conclusion.exit();
}
