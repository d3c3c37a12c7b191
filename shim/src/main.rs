//! containerd-shim-podvisor-v2: see the `podvisor_shim` library.

use std::time::Duration;

fn main() {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}: tokio runtime: {e}", podvisor_shim::RUNTIME_ID);
            std::process::exit(1);
        }
    };
    rt.block_on(containerd_shim::asynchronous::run::<podvisor_shim::Shim>(
        podvisor_shim::RUNTIME_ID,
        Some(podvisor_shim::shim_config()),
    ));
    // A FIFO open nobody answers must not keep the shim alive.
    rt.shutdown_timeout(Duration::from_secs(1));
}
