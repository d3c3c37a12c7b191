//! `podvisor-agent`: PID 1 of a podvisor guest, as a library. The binary
//! (`main.rs`) only calls [`main`]; the fuzz targets (`fuzz/`) drive the
//! checks every request passes before the agent acts ([`check`]).
//!
//! It brings the guest up ([`init`]), then serves the agent API on vsock
//! port 1024 ([`server`]), running each container it is asked for
//! ([`container`]) and reaping every process of the guest ([`reaper`]),
//! and forwards the host's port-forward streams ([`port_forward`]).
//! Run as anything but PID 1 (a test, a debug session) it skips the boot
//! steps, becomes a subreaper and only serves.
//!
//! Log level: `PODVISOR_LOG` (the kernel passes `PODVISOR_LOG=debug` on its
//! command line to init as an environment variable); default `info`.

pub mod check;
mod container;
mod error;
mod init;
mod modules;
mod network;
mod port_forward;
mod reaper;
mod sandbox;
mod server;
mod warm;

use std::sync::{Arc, Mutex, MutexGuard};

use podvisor_protocol::AGENT_PORT;

pub use error::AgentError;

/// The agent's process: it never returns.
pub fn main() -> ! {
    // The kernel runs the agent as /sbin/modprobe to load a module on
    // demand (see `modules`).
    let args: Vec<String> = std::env::args().collect();
    if args.first().is_some_and(|a| a.ends_with("/modprobe")) {
        std::process::exit(modprobe(&args[1..]));
    }
    let filter = std::env::var("PODVISOR_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();

    let pid1 = std::process::id() == 1;
    if pid1 {
        if let Err(e) = init::boot() {
            tracing::error!("guest setup failed: {e:#}");
        }
    } else {
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }

    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(pid1)));
    if let Err(e) = result {
        tracing::error!("agent failed: {e:#}");
    }
    if pid1 {
        // PID 1 must not return: the kernel would panic.
        init::power_off();
    }
    std::process::exit(1);
}

async fn run(pid1: bool) -> anyhow::Result<()> {
    let reaper = reaper::Reaper::start()?;
    let sandbox = Arc::new(sandbox::Sandbox::new(reaper, pid1));
    tokio::spawn(async {
        if let Err(e) = port_forward::serve().await {
            tracing::error!("port forwarding: {e:#}");
        }
    });
    server::serve(sandbox, AGENT_PORT).await
}

/// `modprobe [-q] [--] NAME...` for the kernel; the answer is the exit
/// status (the kernel logs a failure).
fn modprobe(args: &[String]) -> i32 {
    let release = match nix::sys::utsname::uname() {
        Ok(u) => u.release().to_string_lossy().into_owned(),
        Err(e) => {
            eprintln!("modprobe: uname: {e}");
            return 1;
        }
    };
    let dir = std::path::Path::new("/lib/modules").join(release);
    match modules::modprobe(&dir, args) {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("modprobe: {e}");
            1
        }
    }
}

/// Locks `m`; a panic elsewhere while holding it leaves nothing half-done
/// in the agent's maps, so poisoning is ignored.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
