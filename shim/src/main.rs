//! containerd-shim-podvisor-v2: see the `podvisor_shim` library.

#[tokio::main]
async fn main() {
    containerd_shim::asynchronous::run::<podvisor_shim::Shim>(
        podvisor_shim::RUNTIME_ID,
        Some(podvisor_shim::shim_config()),
    )
    .await;
}
