//! `podvisor-agent`: PID 1 of a podvisor guest.
//!
//! It brings the guest up ([`init`]), then serves the agent API on vsock
//! port 1024 ([`server`]), running each container it is asked for
//! ([`container`]) and reaping every process of the guest ([`reaper`]).
//! Run as anything but PID 1 (a test, a debug session) it skips the boot
//! steps, becomes a subreaper and only serves.
//!
//! Log level: `PODVISOR_LOG` (the kernel passes `PODVISOR_LOG=debug` on its
//! command line to init as an environment variable); default `info`.

mod container;
mod error;
mod init;
mod modules;
mod network;
mod reaper;
mod sandbox;
mod server;

use std::sync::{Arc, Mutex, MutexGuard};

use podvisor_protocol::AGENT_PORT;

fn main() {
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
    server::serve(sandbox, AGENT_PORT).await
}

/// Locks `m`; a panic elsewhere while holding it leaves nothing half-done
/// in the agent's maps, so poisoning is ignored.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
