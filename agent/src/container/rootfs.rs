//! The container's filesystem view, built by its init inside the new mount
//! namespace before it execs: the rootfs bound onto itself, the spec's
//! mounts (with recursive attributes such as `rro` applied through
//! mount_setattr), the standard /dev nodes, pivot_root ([`enter`]); then
//! read-only root, masked and read-only paths ([`lock_down`]).
//!
//! Mount destinations are resolved with [`secure_join`], so a symlink in the
//! image cannot point a mount outside the rootfs.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{symlink, FileTypeExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chdir, pivot_root};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount, Spec};

use super::ChildError;

/// `root.join(path)` with every symlink on the way resolved as if `root`
/// were `/`: the result never leaves `root`. Missing components are kept
/// as written.
pub fn secure_join(root: &Path, path: &Path) -> PathBuf {
    let mut resolved = PathBuf::new();
    let mut pending: VecDeque<OsString> = parts(path);
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = root.join(&resolved).join(&part);
        let target = match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() && links < 255 => fs::read_link(&candidate).ok(),
            _ => None,
        };
        match target {
            Some(target) => {
                links += 1;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                for p in parts(&target).into_iter().rev() {
                    pending.push_front(p);
                }
            }
            None => resolved.push(part),
        }
    }
    root.join(resolved)
}

fn parts(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// Mount options split into flags, propagation and filesystem data.
#[derive(Debug, PartialEq)]
struct MountOptions {
    flags: MsFlags,
    propagation: MsFlags,
    bind: bool,
    /// Recursive attributes (`rro`, `rnosuid`, ...): set and cleared on
    /// the mount and every mount below it.
    attr_set: u64,
    attr_clr: u64,
    data: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            flags: MsFlags::empty(),
            propagation: MsFlags::empty(),
            bind: false,
            attr_set: 0,
            attr_clr: 0,
            data: Vec::new(),
        }
    }
}

/// The mount_setattr attributes of a recursive option (runc's names), as
/// (set, clear).
fn recursive_attr(opt: &str) -> Option<(u64, u64)> {
    use libc::{
        MOUNT_ATTR_NOATIME, MOUNT_ATTR_NODEV, MOUNT_ATTR_NODIRATIME, MOUNT_ATTR_NOEXEC,
        MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY, MOUNT_ATTR_RELATIME, MOUNT_ATTR_STRICTATIME,
        MOUNT_ATTR__ATIME,
    };
    Some(match opt {
        "rro" => (MOUNT_ATTR_RDONLY, 0),
        "rrw" => (0, MOUNT_ATTR_RDONLY),
        "rnosuid" => (MOUNT_ATTR_NOSUID, 0),
        "rsuid" => (0, MOUNT_ATTR_NOSUID),
        "rnodev" => (MOUNT_ATTR_NODEV, 0),
        "rdev" => (0, MOUNT_ATTR_NODEV),
        "rnoexec" => (MOUNT_ATTR_NOEXEC, 0),
        "rexec" => (0, MOUNT_ATTR_NOEXEC),
        "rnodiratime" => (MOUNT_ATTR_NODIRATIME, 0),
        "rdiratime" => (0, MOUNT_ATTR_NODIRATIME),
        "rrelatime" => (MOUNT_ATTR_RELATIME, MOUNT_ATTR__ATIME),
        "rnorelatime" => (0, MOUNT_ATTR_RELATIME),
        "rnoatime" => (MOUNT_ATTR_NOATIME, MOUNT_ATTR__ATIME),
        "ratime" => (0, MOUNT_ATTR_NOATIME),
        "rstrictatime" => (MOUNT_ATTR_STRICTATIME, MOUNT_ATTR__ATIME),
        _ => return None,
    })
}

fn parse_options(options: &[String]) -> MountOptions {
    let mut o = MountOptions::default();
    for opt in options {
        if let Some((set, clr)) = recursive_attr(opt) {
            o.attr_set = (o.attr_set & !clr) | set;
            o.attr_clr = (o.attr_clr & !set) | clr;
            continue;
        }
        let (set, clear) = match opt.as_str() {
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "bind" => {
                o.bind = true;
                (MsFlags::empty(), MsFlags::empty())
            }
            "rbind" => {
                o.bind = true;
                (MsFlags::MS_REC, MsFlags::empty())
            }
            "private" => prop(&mut o, MsFlags::MS_PRIVATE),
            "rprivate" => prop(&mut o, MsFlags::MS_PRIVATE | MsFlags::MS_REC),
            "shared" => prop(&mut o, MsFlags::MS_SHARED),
            "rshared" => prop(&mut o, MsFlags::MS_SHARED | MsFlags::MS_REC),
            "slave" => prop(&mut o, MsFlags::MS_SLAVE),
            "rslave" => prop(&mut o, MsFlags::MS_SLAVE | MsFlags::MS_REC),
            "unbindable" => prop(&mut o, MsFlags::MS_UNBINDABLE),
            "runbindable" => prop(&mut o, MsFlags::MS_UNBINDABLE | MsFlags::MS_REC),
            _ => {
                o.data.push(opt.clone());
                (MsFlags::empty(), MsFlags::empty())
            }
        };
        o.flags.insert(set);
        o.flags.remove(clear);
    }
    o
}

fn prop(o: &mut MountOptions, p: MsFlags) -> (MsFlags, MsFlags) {
    o.propagation = p;
    (MsFlags::empty(), MsFlags::empty())
}

fn err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> ChildError {
    ChildError(format!("{what}: {e}"))
}

/// Builds the container's root at `rootfs` and pivots into it. Runs in the
/// container's init, in its fresh mount namespace.
pub fn enter(spec: &Spec, rootfs: &Path) -> Result<(), ChildError> {
    // Nothing we mount may propagate back to the guest.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| err("making / a slave mount", e))?;
    mount(
        Some(rootfs),
        rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| err(format!("binding rootfs {}", rootfs.display()), e))?;

    for m in spec.mounts().iter().flatten() {
        mount_one(rootfs, m)?;
    }
    let linux = spec.linux().as_ref();
    create_devices(rootfs, linux.and_then(|l| l.devices().as_ref()))?;

    chdir(rootfs).map_err(|e| err("chdir to rootfs", e))?;
    pivot_root(".", ".").map_err(|e| err("pivot_root", e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| err("detaching the old root", e))?;
    chdir("/").map_err(|e| err("chdir /", e))?;
    Ok(())
}

/// After [`enter`] (and the sysctls, which need a writable /proc/sys):
/// root propagation, read-only root, read-only and masked paths.
pub fn lock_down(spec: &Spec) -> Result<(), ChildError> {
    let linux = spec.linux().as_ref();
    if let Some(p) = linux.and_then(|l| l.rootfs_propagation().as_deref()) {
        let o = parse_options(&[p.to_string()]);
        mount(None::<&str>, "/", None::<&str>, o.propagation, None::<&str>)
            .map_err(|e| err(format!("rootfsPropagation {p}"), e))?;
    }
    if spec.root().as_ref().and_then(|r| r.readonly()) == Some(true) {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| err("remounting / read-only", e))?;
    }
    if let Some(l) = linux {
        for p in l.readonly_paths().iter().flatten() {
            readonly_path(p)?;
        }
        for p in l.masked_paths().iter().flatten() {
            mask_path(p)?;
        }
    }
    Ok(())
}

fn mount_one(rootfs: &Path, m: &Mount) -> Result<(), ChildError> {
    let dest = secure_join(rootfs, m.destination());
    let opts = parse_options(m.options().as_deref().unwrap_or_default());
    let typ = m.typ().as_deref().unwrap_or("");
    let what = || format!("mount {} on {}", typ, m.destination().display());

    if opts.bind || typ == "bind" {
        let src = m
            .source()
            .as_deref()
            .ok_or_else(|| ChildError(format!("{}: bind mount without a source", what())))?;
        let meta = fs::metadata(src)
            .map_err(|e| err(format!("bind source {} of {}", src.display(), what()), e))?;
        ensure_target(&dest, meta.is_dir()).map_err(|e| err(what(), e))?;
        mount(
            Some(src),
            &dest,
            None::<&str>,
            MsFlags::MS_BIND | (opts.flags & MsFlags::MS_REC),
            None::<&str>,
        )
        .map_err(|e| err(what(), e))?;
        let extra = opts.flags - MsFlags::MS_REC;
        if !extra.is_empty() {
            mount(
                None::<&str>,
                &dest,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
                None::<&str>,
            )
            .map_err(|e| err(format!("{} (remount {extra:?})", what()), e))?;
        }
    } else {
        // The guest is cgroup-v2 only.
        let fstype = if typ == "cgroup" { "cgroup2" } else { typ };
        ensure_target(&dest, true).map_err(|e| err(what(), e))?;
        let source = m
            .source()
            .as_deref()
            .map(|s| s.as_os_str().to_os_string())
            .unwrap_or_else(|| fstype.into());
        let data = opts.data.join(",");
        mount(
            Some(source.as_os_str()),
            &dest,
            Some(fstype),
            opts.flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(|e| err(what(), e))?;
    }
    if !opts.propagation.is_empty() {
        mount(
            None::<&str>,
            &dest,
            None::<&str>,
            opts.propagation,
            None::<&str>,
        )
        .map_err(|e| err(format!("{} (propagation)", what()), e))?;
    }
    if opts.attr_set != 0 || opts.attr_clr != 0 {
        set_recursive_attrs(&dest, opts.attr_set, opts.attr_clr)
            .map_err(|e| err(format!("{} (recursive attributes)", what()), e))?;
    }
    Ok(())
}

/// mount_setattr(2) on `dest` and every mount below it.
fn set_recursive_attrs(dest: &Path, set: u64, clr: u64) -> std::io::Result<()> {
    let path = std::ffi::CString::new(dest.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let attr = libc::mount_attr {
        attr_set: set,
        attr_clr: clr,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: a NUL-terminated path and a mount_attr of the size passed,
    // both alive for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Creates a mount point: a directory, or an empty file for a file bind.
fn ensure_target(dest: &Path, dir: bool) -> std::io::Result<()> {
    if dir {
        return fs::create_dir_all(dest);
    }
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    if !dest.exists() {
        fs::File::create(dest)?;
    }
    Ok(())
}

/// The nodes every container gets (OCI "default devices"), then the
/// spec's own.
fn create_devices(rootfs: &Path, extra: Option<&Vec<LinuxDevice>>) -> Result<(), ChildError> {
    const DEFAULT: [(&str, u64, u64); 6] = [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ];
    let dev = secure_join(rootfs, Path::new("/dev"));
    fs::create_dir_all(&dev).map_err(|e| err("creating /dev", e))?;
    let old = nix::sys::stat::umask(Mode::empty());
    let result = (|| {
        for (name, major, minor) in DEFAULT {
            make_node(&dev.join(name), SFlag::S_IFCHR, major, minor, 0o666)?;
        }
        for d in extra.into_iter().flatten() {
            let kind = match d.typ() {
                LinuxDeviceType::B => SFlag::S_IFBLK,
                LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
                LinuxDeviceType::P => SFlag::S_IFIFO,
                LinuxDeviceType::A => {
                    return Err(ChildError(format!(
                        "device {}: type \"a\" is only valid in cgroup rules",
                        d.path().display()
                    )))
                }
            };
            let path = secure_join(rootfs, d.path());
            let mode = d.file_mode().unwrap_or(0o666);
            let number = |n: i64| {
                u64::try_from(n).map_err(|_| {
                    ChildError(format!(
                        "device {}: number {n} is negative",
                        d.path().display()
                    ))
                })
            };
            make_node(&path, kind, number(d.major())?, number(d.minor())?, mode)?;
            let uid = d.uid().map(nix::unistd::Uid::from_raw);
            let gid = d.gid().map(nix::unistd::Gid::from_raw);
            nix::unistd::chown(&path, uid, gid)
                .map_err(|e| err(format!("chown {}", d.path().display()), e))?;
        }
        for (link, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("ptmx", "pts/ptmx"),
        ] {
            let path = dev.join(link);
            if fs::symlink_metadata(&path).is_err() {
                symlink(target, &path).map_err(|e| err(format!("symlink /dev/{link}"), e))?;
            }
        }
        Ok(())
    })();
    nix::sys::stat::umask(old);
    result
}

/// mknod, or, where the filesystem refuses device nodes, a bind mount of
/// the guest's own node.
fn make_node(
    path: &Path,
    kind: SFlag,
    major: u64,
    minor: u64,
    mode: u32,
) -> Result<(), ChildError> {
    if let Ok(m) = fs::symlink_metadata(path) {
        let ft = m.file_type();
        if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            return Ok(());
        }
    }
    let perm = Mode::from_bits_truncate(mode & 0o7777);
    match mknod(path, kind, perm, makedev(major, minor)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let host = format!(
                "/dev/{}",
                path.file_name().unwrap_or_default().to_string_lossy()
            );
            if kind == SFlag::S_IFIFO || !Path::new(&host).exists() {
                return Err(err(format!("mknod {}", path.display()), e));
            }
            ensure_target(path, false)
                .map_err(|e| err(format!("creating {}", path.display()), e))?;
            mount(
                Some(host.as_str()),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| err(format!("binding {host}"), e))
        }
    }
}

fn readonly_path(p: &str) -> Result<(), ChildError> {
    match mount(
        Some(p),
        p,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    ) {
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        r => r.map_err(|e| err(format!("read-only path {p}"), e))?,
    }
    mount(
        None::<&str>,
        p,
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| err(format!("read-only path {p}"), e))
}

fn mask_path(p: &str) -> Result<(), ChildError> {
    let meta = match fs::metadata(p) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    let r = if meta.is_dir() {
        mount(
            Some("tmpfs"),
            p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            p,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    r.map_err(|e| err(format!("masking {p}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_join_stays_inside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        symlink("/etc", root.join("abs")).unwrap();
        symlink("../../../../etc", root.join("up")).unwrap();
        symlink("loop", root.join("loop")).unwrap();

        assert_eq!(
            secure_join(root, Path::new("/abs/passwd")),
            root.join("etc/passwd")
        );
        assert_eq!(
            secure_join(root, Path::new("/up/passwd")),
            root.join("etc/passwd")
        );
        assert_eq!(secure_join(root, Path::new("../../x")), root.join("x"));
        assert_eq!(
            secure_join(root, Path::new("/a/./b/../c")),
            root.join("a/c")
        );
        // A symlink loop ends instead of spinning.
        assert!(secure_join(root, Path::new("/loop/x")).starts_with(root));
    }

    #[test]
    fn every_mount_option_the_shim_announces_is_implemented() {
        use podvisor_protocol::guest_features::{MOUNT_OPTIONS, RECURSIVE_MOUNT_OPTIONS};
        for opt in RECURSIVE_MOUNT_OPTIONS {
            assert!(recursive_attr(opt).is_some(), "{opt}");
        }
        for opt in MOUNT_OPTIONS {
            let o = parse_options(&[opt.to_string()]);
            assert!(
                o.data.is_empty(),
                "{opt} would be passed as filesystem data"
            );
        }
        let o = parse_options(&["rro".into(), "rnosuid".into(), "rrw".into()]);
        assert_eq!(o.attr_set, libc::MOUNT_ATTR_NOSUID);
        assert_eq!(o.attr_clr, libc::MOUNT_ATTR_RDONLY);
        assert!(o.data.is_empty());
    }

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let o = parse_options(&[
            "nosuid".into(),
            "noexec".into(),
            "ro".into(),
            "rslave".into(),
            "mode=755".into(),
            "size=65536k".into(),
        ]);
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY
        );
        assert_eq!(o.propagation, MsFlags::MS_SLAVE | MsFlags::MS_REC);
        assert_eq!(o.data, vec!["mode=755", "size=65536k"]);
        assert!(!o.bind);

        let b = parse_options(&["rbind".into(), "ro".into(), "rw".into()]);
        assert!(b.bind);
        assert_eq!(b.flags, MsFlags::MS_REC);
    }
}
