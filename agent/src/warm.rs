//! A guest booted as a warm-start template (the kernel parameter
//! `PODVISOR_TEMPLATE=1`) and restored as clones. The template leaves out
//! what each clone gets hot-plugged after restore (the shared directory's
//! virtio-fs device, the NICs), tells the builder on the console when it
//! is ready to be saved, and each clone redoes, before its sandbox, what
//! must not be the template's: the clock and the RNG (the kernel reseeds
//! on the VM generation ID change; the host's entropy is mixed in too).

use std::io::Read;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use podvisor_names::template;

/// What the kernel logs when vmgenid reports a new VM generation.
const RESEED_LINE: &str = "crng reseeded due to virtual machine fork";
/// How long a clone waits for the kernel's vmgenid reseed and for its
/// hot-plugged devices.
const RESTORE_WAIT: Duration = Duration::from_secs(10);
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Whether this guest was booted as a template (and so, once serving a
/// sandbox, is a clone restored from it).
pub fn is_template() -> bool {
    std::env::var_os(template::ENV).is_some_and(|v| v == "1")
}

/// Tells the builder on the console that the template serves and is idle.
pub fn announce_ready() {
    eprintln!("{}", template::READY_LINE);
}

/// How long a clone waits after its vsock driver bound before it reports.
const SETTLE: Duration = Duration::from_millis(100);
/// Where a probed vsock device shows as bound to its driver.
const VSOCK_DRIVER: &str = "/sys/bus/virtio/drivers/vmw_vsock_virtio_transport";

/// Waits until a clone's hot-plugged vsock device is bound to its driver
/// (its probe done, its receive queue filled; the template waits here
/// from the start), then reports ready as a cold boot does: the host
/// makes no connection before it, since vhost-device-vsock 0.3.0's worker
/// thread ends for good on a queue event it gets before its queues are set
/// up (an error from its event handler ends its epoll loop).
pub async fn report_ready_once_plugged() {
    while !std::fs::read_dir(VSOCK_DRIVER).is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("virtio"))
    }) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // vhost-device-vsock 0.3.0's worker dies on a queue event it sees
    // before it has finished setting up the queues (the guest's driver
    // is bound by then); a cold boot reports a second later, a clone
    // waits a little. (The host boots cold a clone that does not report.)
    tokio::time::sleep(SETTLE).await;
    crate::server::report_ready().await;
}

/// Sets the guest clock to the host's (`host_time_ns` since the epoch;
/// 0: the host did not say).
pub fn set_clock(host_time_ns: u64) -> std::io::Result<()> {
    if host_time_ns == 0 {
        return Ok(());
    }
    let ts = nix::sys::time::TimeSpec::from_duration(Duration::from_nanos(host_time_ns));
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)?;
    Ok(())
}

/// Mixes the host's entropy into the guest's pool and reseeds the CRNG
/// from it at once.
pub fn mix_host_entropy(entropy: &[u8]) -> std::io::Result<()> {
    if entropy.is_empty() {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    std::io::Write::write_all(&mut f, entropy)?;
    // SAFETY: an argument-less ioctl on a descriptor this function owns.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Waits for the kernel's vmgenid reseed after a restore; says whether
/// it was seen.
pub async fn kernel_reseeded() -> bool {
    let start = Instant::now();
    while start.elapsed() < RESTORE_WAIT {
        if kmsg_contains(RESEED_LINE) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// Whether the kernel log holds `needle` (read without blocking).
fn kmsg_contains(needle: &str) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return false;
    };
    // One record per read; EAGAIN at the end.
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                if String::from_utf8_lossy(&buf[..n]).contains(needle) {
                    return true;
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => return false,
        }
    }
}

/// Retries `f` while it fails with an error `missing` says a device
/// hot-plugged into a clone explains (it binds a moment after the clone
/// resumes), up to the restore wait; any other error at once.
pub async fn retry<T, E: std::fmt::Display>(
    what: &str,
    missing: impl Fn(&E) -> bool,
    mut f: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if !missing(&e) => return Err(e),
            Err(e) if start.elapsed() >= RESTORE_WAIT => {
                tracing::warn!("{what}: gave up after {RESTORE_WAIT:?}: {e}");
                return Err(e);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}
