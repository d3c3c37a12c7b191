//! What the agent does as PID 1 before it serves: the guest's base mounts,
//! kernel modules, a switch from the initramfs to a tmpfs root (pivot_root,
//! which containers need, refuses to run from the initramfs itself) that
//! keeps the image's modules for loading on demand with the agent as
//! `/sbin/modprobe`, cgroups, loopback, and the shared directory from the
//! host (a warm-start template's clones mount theirs later). Also the power-off at the end.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result};
use nix::mount::{mount, MsFlags};
use podvisor_names::SHARED_FS_TAG;
use podvisor_protocol::GUEST_SHARED_DIR;

use crate::container::cgroup;
use crate::modules;

/// The list of modules to load, written by the guest image build for a
/// modular kernel (Debian's); podvisor's own kernel has everything built in
/// and its image has no list.
const MODULE_LIST: &str = "/etc/podvisor/modules";

/// Brings the guest up. Errors on the way that leave the agent able to
/// serve (no shared directory, say) are logged, not returned.
pub fn boot() -> Result<()> {
    mount_fs("proc", "/proc", "proc", MsFlags::empty(), None)?;
    mount_fs("sysfs", "/sys", "sysfs", MsFlags::empty(), None)?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::empty(), None)?;

    load_modules();
    switch_root().context("switching from the initramfs to a tmpfs root")?;

    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    mount_fs("shm", "/dev/shm", "tmpfs", nosuid, Some("mode=1777"))?;
    mount_fs("cgroup2", cgroup::CGROUP_ROOT, "cgroup2", nosuid, None)?;
    cgroup::init_hierarchy(Path::new(cgroup::CGROUP_ROOT)).context("setting up cgroups")?;
    for dir in ["/tmp", "/run", "/etc"] {
        fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
    }
    fs::write("/etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost\n").context("/etc/hosts")?;
    if let Err(e) = loopback_up() {
        tracing::warn!("bringing lo up: {e}");
    }
    // A template has no shared directory: each clone gets its own
    // hot-plugged, mounted at its CreateSandbox.
    if !crate::warm::is_template() {
        if let Err(e) = mount_shared() {
            tracing::warn!("no shared directory from the host, containers cannot start: {e:#}");
        }
    }
    Ok(())
}

/// Mounts the host's shared directory (virtio-fs tag `podvisor`).
pub fn mount_shared() -> Result<()> {
    mount_fs(
        SHARED_FS_TAG,
        GUEST_SHARED_DIR,
        "virtiofs",
        MsFlags::empty(),
        None,
    )
}

fn mount_fs(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    fs::create_dir_all(target).with_context(|| format!("creating {target}"))?;
    mount(Some(src), target, Some(fstype), flags, data)
        .with_context(|| format!("mounting {fstype} on {target}"))
}

fn load_modules() {
    let list = match fs::read_to_string(MODULE_LIST) {
        Ok(list) => list,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => return tracing::warn!("reading {MODULE_LIST}: {e}"),
    };
    let release = match nix::sys::utsname::uname() {
        Ok(u) => u.release().to_string_lossy().into_owned(),
        Err(e) => return tracing::warn!("uname: {e}"),
    };
    let names: Vec<&str> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let dir = Path::new("/lib/modules").join(&release);
    match modules::load(&dir, &names) {
        Ok(n) => tracing::info!("loaded {n} kernel modules"),
        Err(e) => tracing::warn!("kernel modules: {e}"),
    }
}

/// Where the image keeps its kernel modules.
const MODULES: &str = "lib/modules";

/// Moves the base mounts onto a new tmpfs, frees the initramfs but its
/// modules (bound into the new root, for the kernel's on-demand loads) and
/// makes the tmpfs `/` (busybox switch_root, minus the exec). The agent
/// stays reachable as `/sbin/modprobe` through `/proc/1/exe`.
fn switch_root() -> Result<()> {
    const NEW: &str = "/newroot";
    mount_fs("tmpfs", NEW, "tmpfs", MsFlags::empty(), Some("mode=0755"))?;
    let modules = Path::new("/").join(MODULES);
    if modules.is_dir() {
        let target = Path::new(NEW).join(MODULES);
        fs::create_dir_all(&target)?;
        mount(
            Some(modules.as_path()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .context("binding the kernel modules")?;
    }
    fs::create_dir_all(format!("{NEW}/sbin"))?;
    std::os::unix::fs::symlink("/proc/1/exe", format!("{NEW}/sbin/modprobe"))
        .context("linking /sbin/modprobe")?;
    for dir in ["proc", "sys", "dev"] {
        let target = format!("{NEW}/{dir}");
        fs::create_dir_all(&target)?;
        mount(
            Some(Path::new("/").join(dir).as_path()),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .with_context(|| format!("moving /{dir}"))?;
    }
    let root_dev = fs::metadata("/")?.dev();
    delete_tree(Path::new("/"), root_dev, &modules);
    nix::unistd::chdir(NEW)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("moving the new root to /")?;
    nix::unistd::chroot(".").context("chroot")?;
    nix::unistd::chdir("/")?;
    Ok(())
}

/// Removes what is on the initramfs but `keep`, without crossing into
/// mounts.
fn delete_tree(dir: &Path, dev: u64, keep: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev || path == keep {
            continue;
        }
        if meta.is_dir() {
            delete_tree(&path, dev, keep);
            let _ = fs::remove_dir(&path);
        } else {
            let _ = fs::remove_file(&path);
        }
    }
}

fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // SAFETY: ifreq is plain data; the ioctls read and write it in place.
    unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            ifr.ifr_name[i] = crate::network::c_char(*b);
        }
        if libc::ioctl(raw, libc::SIOCGIFFLAGS as _, &mut ifr) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= crate::network::IFF_UP;
        if libc::ioctl(raw, libc::SIOCSIFFLAGS as _, &ifr) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Flushes filesystems and powers the machine off.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    tracing::error!("power off failed: {e:?}");
    // Nothing else sensible is left for PID 1.
    std::process::abort()
}
