//! The filesystem a jailed VM process sees: its own mount namespace whose
//! root is an empty, read-only tmpfs holding only what it needs, each at
//! its host path so that its command line stays valid:
//!
//! ```text
//! /usr, /etc/ld.so.cache       read-only: the program, its libraries, firmware
//! /lib, /lib64, ...            as on the host (symlinks into /usr, or read-only)
//! <the program>                read-only, when it lives outside /usr
//! <kernel>, <initramfs>        read-only
//! <the VM's own directory>     read-write, noexec: its console, sockets, template memory
//! /dev/{null,zero,full,random,urandom,kvm,net/tun}   those the host has,
//!                              nodes of a read-only tmpfs of their own; kvm
//!                              and net/tun owned by the VM's id, private
//! /proc                        a proc of its own, read-only, processes only
//!                              (/proc/self/fd for templates)
//! ```
//!
//! Each is bound alone (mounts below it do not come along). The host's
//! other files, other VMs' directories and the pod's container mounts
//! (made later, under the VM's `shared/`, and not propagated) are not
//! there by any path. The proc is mounted inside the process's own PID
//! namespace ([`super::pid`]): it lists that process alone, so no other
//! VM's `/proc/<pid>/root` or descriptors are there to open.
//!
//! Everything is decided in the shim ([`plan`]); the child only runs the
//! prepared system calls ([`JailRoot::enter`]) between fork and exec,
//! while it still has the privileges to mount.

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::VmSpec;

/// Where the new root is built before it becomes `/`: any directory of
/// the host would do, covered only in the child's own namespace; /proc
/// always exists and nothing is bound from it.
const BUILD_AT: &str = "/proc";

/// Device nodes a VM process may open, if the host has them, and whether
/// they are the VM's alone (owned by its id, mode 0600; else root's,
/// 0666, as on any host).
const DEVICES: [(&str, bool); 7] = [
    ("/dev/null", false),
    ("/dev/zero", false),
    ("/dev/full", false),
    ("/dev/random", false),
    ("/dev/urandom", false),
    ("/dev/kvm", true),
    ("/dev/net/tun", true),
];
/// Top-level directories that are (merged /usr) symlinks into /usr, or
/// hold libraries themselves.
const LIBRARY_LINKS: [&str; 6] = ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];

/// Flags a bind is remounted with: read-only (programs, libraries, the
/// guest image), data (the VM's directory: nothing in it runs), a device.
const READ_ONLY: libc::c_ulong = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
const DATA: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
/// The device tmpfs: nodes work there (no nodev), nothing else does.
const DEVICES_FS: libc::c_ulong = libc::MS_NOSUID | libc::MS_NOEXEC;

#[derive(Debug)]
enum Op {
    Mkdir(CString),
    /// An empty file to bind a file onto.
    Touch(CString),
    /// A bind of `from` alone (no mounts below it come along), remounted
    /// with `flags`.
    Bind {
        from: CString,
        to: CString,
        flags: libc::c_ulong,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    Proc(CString),
    /// A tmpfs at `dir` holding `nodes`, then read-only.
    Devices {
        dir: CString,
        nodes: Vec<Node>,
    },
}

/// A character device node made in the root.
#[derive(Debug)]
struct Node {
    path: CString,
    rdev: libc::dev_t,
    mode: libc::mode_t,
    owner: libc::uid_t,
}

/// The prepared steps; see the module comment.
#[derive(Debug)]
pub struct JailRoot {
    ops: Vec<Op>,
}

fn c(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a path"))
}

/// `p` without `.` and `..` (resolved by name; `/..` is `/`), absolute.
fn normal(p: &Path) -> PathBuf {
    let mut n = PathBuf::from("/");
    for part in p.components() {
        match part {
            Component::Normal(x) => n.push(x),
            Component::ParentDir => {
                n.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    n
}

/// Normalised `p` inside the root being built (never above it).
fn inside(p: &Path) -> PathBuf {
    let n = normal(p);
    Path::new(BUILD_AT).join(n.strip_prefix("/").unwrap_or(&n))
}

/// The root for `program` running the VM of `spec` as `id`.
pub fn plan(program: &Path, spec: &VmSpec, id: u32) -> std::io::Result<JailRoot> {
    let mut root = Builder::default();
    root.bind(Path::new("/usr"), READ_ONLY, false)?;
    for top in LIBRARY_LINKS {
        let p = Path::new(top);
        match std::fs::read_link(p) {
            Ok(target) => root.symlink(&target, p)?,
            Err(_) if p.is_dir() => root.bind(p, READ_ONLY, false)?,
            Err(_) => {}
        }
    }
    root.bind(Path::new("/etc/ld.so.cache"), READ_ONLY, true)?;
    root.bind(program, READ_ONLY, true)?;
    for f in [
        Some(&spec.kernel),
        Some(&spec.initramfs),
        spec.vmlinux.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        root.bind(f, READ_ONLY, true)?;
    }
    root.bind(&spec.vm_dir(), DATA, false)?;
    let dev = Path::new("/dev");
    root.mkdir(dev)?;
    let mut nodes = Vec::new();
    for (d, private) in DEVICES {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let Ok(meta) = std::fs::metadata(d) else {
            continue;
        };
        if !meta.file_type().is_char_device() {
            continue;
        }
        let path = Path::new(d);
        if let Some(parent) = path.parent().filter(|p| *p != dev) {
            nodes.push(Node {
                path: c(&inside(parent))?,
                rdev: 0,
                mode: 0o755,
                owner: 0,
            });
        }
        nodes.push(Node {
            path: c(&inside(path))?,
            rdev: meta.rdev(),
            mode: if private { 0o600 } else { 0o666 },
            owner: if private { id } else { 0 },
        });
    }
    root.ops.push(Op::Devices {
        dir: c(&inside(dev))?,
        nodes,
    });
    let proc_dir = Path::new("/proc");
    root.mkdir(proc_dir)?;
    root.ops.push(Op::Proc(c(&inside(proc_dir))?));
    Ok(JailRoot { ops: root.ops })
}

#[derive(Default)]
struct Builder {
    ops: Vec<Op>,
    /// Directories made in the root, normalised.
    dirs: BTreeSet<PathBuf>,
    /// What is bound (or linked), normalised: nothing goes below it.
    bound: Vec<PathBuf>,
}

impl Builder {
    fn visible(&self, p: &Path) -> bool {
        self.bound.iter().any(|b| p.starts_with(b))
    }

    /// Makes the directories `dir` names, each as its path reads (so that
    /// a `..` in it resolves in the root as on the host).
    fn mkdir(&mut self, dir: &Path) -> std::io::Result<()> {
        let mut at = PathBuf::from("/");
        for part in dir.components() {
            match part {
                Component::Normal(x) => {
                    at.push(x);
                    if !self.dirs.contains(&at) && !self.visible(&at) {
                        self.ops.push(Op::Mkdir(c(&inside(&at))?));
                        self.dirs.insert(at.clone());
                    }
                }
                Component::ParentDir => {
                    at.pop();
                }
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            }
        }
        Ok(())
    }

    /// Binds `path` (a file if `file`, else a directory) at its host path
    /// if the host has it and the root does not show it yet; and, if it is
    /// a link to somewhere the root does not show (a program in /usr
    /// linking to /opt), its target at the target's path.
    fn bind(&mut self, path: &Path, flags: libc::c_ulong, file: bool) -> std::io::Result<()> {
        if !path.exists() {
            return Ok(());
        }
        let at = normal(path);
        if !self.visible(&at) {
            self.bind_at(path, &at, flags, file)?;
        }
        if let Ok(real) = std::fs::canonicalize(path) {
            if real != at && !self.visible(&real) {
                self.bind_at(&real, &real, flags, file)?;
            }
        }
        Ok(())
    }

    fn bind_at(
        &mut self,
        from: &Path,
        at: &Path,
        flags: libc::c_ulong,
        file: bool,
    ) -> std::io::Result<()> {
        if file {
            if let Some(parent) = from.parent() {
                self.mkdir(parent)?;
            }
            self.ops.push(Op::Touch(c(&inside(at))?));
        } else {
            self.mkdir(from)?;
        }
        self.ops.push(Op::Bind {
            from: c(from)?,
            to: c(&inside(at))?,
            flags,
        });
        self.bound.push(at.to_owned());
        Ok(())
    }

    fn symlink(&mut self, target: &Path, link: &Path) -> std::io::Result<()> {
        self.ops.push(Op::Symlink {
            target: c(target)?,
            link: c(&inside(link))?,
        });
        self.bound.push(normal(link));
        Ok(())
    }
}

/// The last OS error, after telling the child's log which step failed.
fn failed(what: &CStr, path: &CStr) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    // SAFETY: write(2) of whole, live buffers; async-signal-safe.
    unsafe {
        for part in [
            c"podvisor jail: ".to_bytes(),
            what.to_bytes(),
            b" ",
            path.to_bytes(),
            b"\n",
        ] {
            libc::write(2, part.as_ptr().cast(), part.len());
        }
    }
    e
}

impl JailRoot {
    /// Runs in the child between fork and exec: a mount namespace of its
    /// own, the root built and pivoted into, the host's detached.
    ///
    /// # Safety
    /// Only in a forked child before exec: it changes the process's
    /// namespace and root.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        let none: *const libc::c_char = std::ptr::null();
        let build_at = c"/proc";
        // And an IPC namespace: no System V object or message queue is
        // shared with the host or outlives the VM for the next VM of its id.
        if libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC) != 0 {
            return Err(failed(c"unshare", c"mount and IPC namespaces"));
        }
        // Nothing of this namespace goes back to the host's, nor comes in.
        if libc::mount(
            none,
            c"/".as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            none.cast(),
        ) != 0
        {
            return Err(failed(c"making private", c"/"));
        }
        if libc::mount(
            c"tmpfs".as_ptr(),
            build_at.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"mode=0755".as_ptr().cast(),
        ) != 0
        {
            return Err(failed(c"mounting tmpfs at", build_at));
        }
        for op in &self.ops {
            match op {
                Op::Mkdir(p) => {
                    if libc::mkdir(p.as_ptr(), 0o755) != 0 {
                        return Err(failed(c"mkdir", p));
                    }
                }
                Op::Touch(p) => {
                    let fd = libc::open(
                        p.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o600,
                    );
                    if fd < 0 {
                        return Err(failed(c"creating", p));
                    }
                    libc::close(fd);
                }
                Op::Bind { from, to, flags } => {
                    if libc::mount(from.as_ptr(), to.as_ptr(), none, libc::MS_BIND, none.cast())
                        != 0
                    {
                        return Err(failed(c"binding", from));
                    }
                    if libc::mount(
                        none,
                        to.as_ptr(),
                        none,
                        libc::MS_BIND | libc::MS_REMOUNT | flags,
                        none.cast(),
                    ) != 0
                    {
                        return Err(failed(c"remounting", to));
                    }
                }
                Op::Symlink { target, link } => {
                    if libc::symlink(target.as_ptr(), link.as_ptr()) != 0 {
                        return Err(failed(c"symlink", link));
                    }
                }
                Op::Devices { dir, nodes } => {
                    if libc::mount(
                        c"tmpfs".as_ptr(),
                        dir.as_ptr(),
                        c"tmpfs".as_ptr(),
                        DEVICES_FS,
                        c"mode=0755".as_ptr().cast(),
                    ) != 0
                    {
                        return Err(failed(c"mounting tmpfs at", dir));
                    }
                    for n in nodes {
                        // A node of rdev 0 is a directory (/dev/net).
                        let made = if n.rdev == 0 {
                            libc::mkdir(n.path.as_ptr(), n.mode)
                        } else {
                            libc::mknod(n.path.as_ptr(), libc::S_IFCHR | n.mode, n.rdev)
                        };
                        if made != 0 {
                            return Err(failed(c"making", &n.path));
                        }
                        // Exactly its mode (the umask), and its owner.
                        if libc::chmod(n.path.as_ptr(), n.mode) != 0
                            || libc::chown(n.path.as_ptr(), n.owner, n.owner) != 0
                        {
                            return Err(failed(c"giving", &n.path));
                        }
                    }
                    if libc::mount(
                        none,
                        dir.as_ptr(),
                        none,
                        libc::MS_REMOUNT | libc::MS_RDONLY | DEVICES_FS,
                        c"mode=0755".as_ptr().cast(),
                    ) != 0
                    {
                        return Err(failed(c"making read-only", dir));
                    }
                }
                // Read-only: a process that is still uid 0 writes no
                // sysctl (core_pattern) and no other process's proc files
                // (oom_score_adj); and only processes' directories where
                // the kernel can (5.8).
                Op::Proc(p) => {
                    let flags =
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY;
                    let proc_fs = c"proc".as_ptr();
                    if libc::mount(
                        proc_fs,
                        p.as_ptr(),
                        proc_fs,
                        flags,
                        c"subset=pid".as_ptr().cast(),
                    ) != 0
                        && libc::mount(proc_fs, p.as_ptr(), proc_fs, flags, none.cast()) != 0
                    {
                        return Err(failed(c"mounting proc at", p));
                    }
                }
            }
        }
        // The new root over the old, then the old (every host mount) gone.
        if libc::chdir(build_at.as_ptr()) != 0
            || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0
        {
            return Err(failed(c"pivot_root to", build_at));
        }
        if libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(failed(c"detaching", c"the host's root"));
        }
        if libc::mount(
            none,
            c"/".as_ptr(),
            none,
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            c"mode=0755".as_ptr().cast(),
        ) != 0
        {
            return Err(failed(c"making read-only", c"/"));
        }
        // The VM process starts in `/` (its command line names every path
        // in full).
        if libc::chdir(c"/".as_ptr()) != 0 {
            return Err(failed(c"chdir", c"/"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &JailRoot) -> Vec<String> {
        r.ops
            .iter()
            .map(|o| match o {
                Op::Mkdir(p) => format!("mkdir {}", p.to_string_lossy()),
                Op::Touch(p) => format!("touch {}", p.to_string_lossy()),
                Op::Bind { from, to, flags } => format!(
                    "bind {} {} {}",
                    from.to_string_lossy(),
                    to.to_string_lossy(),
                    match *flags {
                        READ_ONLY => "ro",
                        DATA => "data",
                        _ => "?",
                    }
                ),
                Op::Symlink { target, link } => {
                    format!(
                        "symlink {} {}",
                        target.to_string_lossy(),
                        link.to_string_lossy()
                    )
                }
                Op::Proc(p) => format!("proc {}", p.to_string_lossy()),
                Op::Devices { dir, nodes } => format!(
                    "devices {} {}",
                    dir.to_string_lossy(),
                    nodes
                        .iter()
                        .map(|n| format!("{}:{:o}:{}", n.path.to_string_lossy(), n.mode, n.owner))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            })
            .collect()
    }

    /// Where in the root a step acts.
    fn place(t: &str) -> &str {
        let w: Vec<&str> = t.split(' ').collect();
        match w[0] {
            "devices" => w[1],
            "bind" | "symlink" => w[2],
            _ => w[1],
        }
    }

    #[test]
    fn the_root_holds_the_vms_files_at_their_host_paths() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("image/sub")).unwrap();
        let kernel = d.path().join("image/kernel");
        std::fs::write(&kernel, "k").unwrap();
        let spec = VmSpec {
            // Through `..`, as the test image's path reads.
            kernel: d.path().join("image/sub/../kernel"),
            vmlinux: None,
            initramfs: "/usr/share/doc".into(),
            vcpus: 1,
            memory_mib: 256,
            kernel_params: String::new(),
            dir: d.path().join("sandbox"),
            vsock: VmSpec::vsock_in(&d.path().join("sandbox")),
            shared_dir: d.path().join("sandbox").join("shared"),
            net: vec![],
            netns: None,
            cpuid_hide: vec![],
            owner: None,
        };
        std::fs::create_dir_all(spec.vm_dir()).unwrap();
        let text = text(&plan(Path::new("/usr/bin/true"), &spec, 1234).unwrap());
        let has = |s: &str| text.iter().any(|t| t == s);
        assert!(has("bind /usr /proc/usr ro"), "{text:#?}");
        // At the path's normal form, bound from the path as given; the
        // directory before `..` is made, so the path resolves inside too.
        let k = kernel.display();
        assert!(
            has(&format!("bind {} /proc{k} ro", spec.kernel.display())),
            "{text:#?}"
        );
        let sub = d.path().join("image/sub");
        assert!(has(&format!("mkdir /proc{}", sub.display())), "{text:#?}");
        let vm = spec.vm_dir();
        let vm = vm.display();
        assert!(has(&format!("bind {vm} /proc{vm} data")), "{text:#?}");
        assert_eq!(
            text.iter()
                .filter(|t| place(t) == format!("/proc{vm}"))
                .count(),
            2,
            "the VM's own directory made and bound once (the vsock's is the same): {text:#?}"
        );
        // Not the rest of its directory (the shared one, root's logs).
        let sandbox = spec.dir.display();
        assert!(
            !text
                .iter()
                .any(|t| t.starts_with("bind") && place(t) == format!("/proc{sandbox}")),
            "{text:#?}"
        );
        assert!(has("proc /proc/proc"), "{text:#?}");
        // Under /usr already: neither the program nor the "initramfs".
        assert!(
            !text
                .iter()
                .any(|t| t.contains("/usr/bin/true") || t.contains("doc")),
            "{text:#?}"
        );
        let devices = text.iter().find(|t| t.starts_with("devices")).unwrap();
        if Path::new("/dev/null").exists() {
            assert!(devices.contains("/proc/dev/null:666:0"), "{devices}");
        }
        if Path::new("/dev/kvm").exists() {
            assert!(devices.contains("/proc/dev/kvm:600:1234"), "{devices}");
        }
        // Every place in the root is below it.
        for t in &text {
            assert!(
                place(t).starts_with("/proc/") && !place(t).contains(".."),
                "{t}"
            );
        }
    }

    #[test]
    fn paths_are_normalised_and_never_climb_out() {
        assert_eq!(normal(Path::new("/a/b/../c/./d")), PathBuf::from("/a/c/d"));
        assert_eq!(normal(Path::new("/../../etc")), PathBuf::from("/etc"));
        assert_eq!(inside(Path::new("/../x")), PathBuf::from("/proc/x"));
    }
}
