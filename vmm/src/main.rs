//! `podvisor-vmm`: runs one microVM described by a JSON config, until the
//! guest powers off (exit 0), reboots (3) or fails (2); 1 is an error
//! before the VM ran. SIGTERM or SIGINT stop it (exit 0).
//!
//! ```text
//! podvisor-vmm --config vm.json
//! podvisor-vmm --config-json '{"vcpus":1,"memory_mib":128,"kernel":"vmlinux"}'
//! podvisor-vmm --no-seccomp --config vm.json   # without the seccomp filters
//! podvisor-vmm --probe        # does /dev/kvm run guests at hardware speed?
//!                             # (one JSON line on stdout, the sentence on stderr)
//! ```

use anyhow::{bail, Context, Result};
use podvisor_vmm::seccomp::{self, ThreadKind};
use podvisor_vmm::{ExitReason, Vm, VmConfig};

fn usage() -> &'static str {
    "usage: podvisor-vmm [--no-seccomp] --config <file> | --config-json <json> | --probe"
}

/// What the command line asks for: a VM to run, and whether under the
/// seccomp filters.
struct Args {
    config: VmConfig,
    seccomp: bool,
}

fn config_from_args() -> Result<Option<Args>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let before = args.len();
    args.retain(|a| a != "--no-seccomp");
    let seccomp = args.len() == before;
    let text = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--config", path] => {
            std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
        }
        ["--config-json", json] => json.to_string(),
        ["--probe"] => {
            let v = podvisor_vmm::probe::probe();
            println!("{}", serde_json::to_string(&v)?);
            eprintln!("{v}");
            return Ok(None);
        }
        ["--help"] | ["-h"] => {
            println!("{}", usage());
            return Ok(None);
        }
        _ => bail!("{}", usage()),
    };
    Ok(Some(Args {
        config: VmConfig::from_json(&text)?,
        seccomp,
    }))
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: plain signal-set calls on a zeroed set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM and SIGINT in this thread and every thread started
/// after it, so that only the waiter of [`handle_signals`] takes them.
fn block_signals() -> Result<()> {
    let set = stop_signals();
    // SAFETY: changes this thread's mask only.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
        bail!("blocking SIGTERM/SIGINT");
    }
    Ok(())
}

/// One thread takes SIGTERM/SIGINT and stops the VM in order. Returns once
/// that thread runs under its seccomp filter (when filters are on), so that
/// no thread of the VMM is ever unfiltered while the guest runs.
fn handle_signals(vm: &Vm) -> Result<()> {
    let set = stop_signals();
    let exit = vm.exit_signal();
    let (filtered_tx, filtered) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let applied = seccomp::apply(ThreadKind::Vmm).map_err(|e| e.to_string());
            let failed = applied.is_err();
            let _ = filtered_tx.send(applied);
            if failed {
                return;
            }
            let mut sig = 0;
            // SAFETY: sigwait on a valid set from a thread that blocks it.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                tracing::info!("signal {sig}: stopping the VM");
                exit.trigger(ExitReason::Stopped);
            }
        })?;
    match filtered.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => bail!("the signal thread's seccomp filter: {e}"),
        Err(_) => bail!("the signal thread ended before its seccomp filter"),
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PODVISOR_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let Args { config, seccomp } = match config_from_args() {
        Ok(Some(a)) => a,
        Ok(None) => return,
        Err(e) => {
            eprintln!("podvisor-vmm: {e:#}");
            std::process::exit(1);
        }
    };
    if let Err(e) = block_signals() {
        eprintln!("podvisor-vmm: {e:#}");
        std::process::exit(1);
    }
    if seccomp {
        if let Err(e) = seccomp::enable() {
            eprintln!("podvisor-vmm: {e}");
            std::process::exit(1);
        }
    }
    let vm = match Vm::build(&config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("podvisor-vmm: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = handle_signals(&vm) {
        eprintln!("podvisor-vmm: {e:#}");
        std::process::exit(1);
    }
    let reason = vm.run();
    tracing::info!("VM ended: {reason}");
    std::process::exit(reason.exit_code());
}
