//! The filesystem a jailed VM process sees: its own mount namespace whose
//! root is an empty, read-only tmpfs holding only what it needs, each at
//! its host path so that its command line stays valid:
//!
//! ```text
//! /usr, /etc/ld.so.cache       read-only: the program, its libraries, firmware
//! /lib, /lib64, ...            as on the host (symlinks into /usr, or read-only)
//! <the program>                read-only, when it lives outside /usr
//! <kernel>, <initramfs>        read-only
//! <the VM's directory>         read-write: its sockets, logs, template files
//! /dev/{null,zero,full,random,urandom,kvm,net/tun}   those the host has
//! /proc                        a proc of its own, read-only, processes only
//!                              (/proc/self/fd for templates)
//! ```
//!
//! The host's other files, other VMs' directories and the pod's container
//! mounts (made later, under the VM's `shared/`, and not propagated) are
//! not there. Everything is decided in the shim ([`plan`]); the child only
//! runs the prepared system calls ([`JailRoot::enter`]) between fork and
//! exec, while it still has the privileges to mount.

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::VmSpec;

/// Where the new root is built before it becomes `/`: any directory of
/// the host would do, covered only in the child's own namespace; /proc
/// always exists and nothing is bound from it.
const BUILD_AT: &str = "/proc";

/// Device nodes a VM process may open, if the host has them.
const DEVICES: [&str; 7] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/kvm",
    "/dev/net/tun",
];
/// Top-level directories that are (merged /usr) symlinks into /usr, or
/// hold libraries themselves.
const LIBRARY_LINKS: [&str; 6] = ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];

#[derive(Debug)]
enum Op {
    Mkdir(CString),
    /// An empty file to bind a file onto.
    Touch(CString),
    Bind {
        from: CString,
        to: CString,
        read_only: bool,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    Proc(CString),
}

/// The prepared steps; see the module comment.
#[derive(Debug)]
pub struct JailRoot {
    ops: Vec<Op>,
    /// The child's working directory, if it was given one (re-entered in
    /// the new root).
    cwd: Option<CString>,
}

fn c(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a path"))
}

/// `p` inside the root being built.
fn inside(p: &Path) -> PathBuf {
    Path::new(BUILD_AT).join(p.strip_prefix("/").unwrap_or(p))
}

/// The root for `program` running the VM of `spec`.
pub fn plan(program: &Path, cwd: Option<&Path>, spec: &VmSpec) -> std::io::Result<JailRoot> {
    let mut root = Builder::default();
    root.bind_dir(Path::new("/usr"), true)?;
    for top in LIBRARY_LINKS {
        let p = Path::new(top);
        match std::fs::read_link(p) {
            Ok(target) => root.symlink(&target, p)?,
            Err(_) if p.is_dir() => root.bind_dir(p, true)?,
            Err(_) => {}
        }
    }
    root.bind_file(Path::new("/etc/ld.so.cache"), true)?;
    root.bind_file(program, true)?;
    for f in [
        Some(&spec.kernel),
        Some(&spec.initramfs),
        spec.vmlinux.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        root.bind_file(f, true)?;
    }
    root.bind_dir(&spec.dir, false)?;
    if let Some(d) = spec.vsock.parent() {
        root.bind_dir(d, false)?;
    }
    for d in DEVICES {
        root.bind_file(Path::new(d), false)?;
    }
    let proc_dir = Path::new("/proc");
    root.mkdir(proc_dir)?;
    root.ops.push(Op::Proc(c(&inside(proc_dir))?));
    Ok(JailRoot {
        ops: root.ops,
        cwd: cwd.map(c).transpose()?,
    })
}

#[derive(Default)]
struct Builder {
    ops: Vec<Op>,
    /// Directories made or bound in the root, by host path.
    dirs: BTreeSet<PathBuf>,
    /// What is bound (or linked), by host path: nothing goes below it.
    bound: Vec<PathBuf>,
}

impl Builder {
    /// Whether `p` is already visible: under a bound directory, as given
    /// or resolved (a program in /usr/local/bin through a link).
    fn visible(&self, p: &Path) -> bool {
        let real = std::fs::canonicalize(p).ok();
        self.bound
            .iter()
            .any(|b| p.starts_with(b) || real.as_ref().is_some_and(|r| r.starts_with(b)))
    }

    fn mkdir(&mut self, dir: &Path) -> std::io::Result<()> {
        for a in dir.ancestors().collect::<Vec<_>>().into_iter().rev() {
            if a == Path::new("/") || self.dirs.contains(a) {
                continue;
            }
            self.ops.push(Op::Mkdir(c(&inside(a))?));
            self.dirs.insert(a.to_owned());
        }
        Ok(())
    }

    fn bind_dir(&mut self, dir: &Path, read_only: bool) -> std::io::Result<()> {
        if self.visible(dir) {
            return Ok(());
        }
        self.mkdir(dir)?;
        self.ops.push(Op::Bind {
            from: c(dir)?,
            to: c(&inside(dir))?,
            read_only,
        });
        self.bound.push(dir.to_owned());
        Ok(())
    }

    /// Binds `file` if the host has it.
    fn bind_file(&mut self, file: &Path, read_only: bool) -> std::io::Result<()> {
        if !file.exists() || self.visible(file) {
            return Ok(());
        }
        if let Some(parent) = file.parent() {
            self.mkdir(parent)?;
        }
        self.ops.push(Op::Touch(c(&inside(file))?));
        self.ops.push(Op::Bind {
            from: c(file)?,
            to: c(&inside(file))?,
            read_only,
        });
        self.bound.push(file.to_owned());
        Ok(())
    }

    fn symlink(&mut self, target: &Path, link: &Path) -> std::io::Result<()> {
        self.ops.push(Op::Symlink {
            target: c(target)?,
            link: c(&inside(link))?,
        });
        self.bound.push(link.to_owned());
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
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(failed(c"unshare", c"mount namespace"));
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
                // Already there: a path's `..` (the test image's
                // `testkit/../build`) names a directory made before.
                Op::Mkdir(p) => {
                    if libc::mkdir(p.as_ptr(), 0o755) != 0
                        && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                    {
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
                Op::Bind {
                    from,
                    to,
                    read_only,
                } => {
                    if libc::mount(
                        from.as_ptr(),
                        to.as_ptr(),
                        none,
                        libc::MS_BIND | libc::MS_REC,
                        none.cast(),
                    ) != 0
                    {
                        return Err(failed(c"binding", from));
                    }
                    if *read_only
                        && libc::mount(
                            none,
                            to.as_ptr(),
                            none,
                            libc::MS_BIND
                                | libc::MS_REMOUNT
                                | libc::MS_RDONLY
                                | libc::MS_NOSUID
                                | libc::MS_NODEV,
                            none.cast(),
                        ) != 0
                    {
                        return Err(failed(c"making read-only", to));
                    }
                }
                Op::Symlink { target, link } => {
                    if libc::symlink(target.as_ptr(), link.as_ptr()) != 0 {
                        return Err(failed(c"symlink", link));
                    }
                }
                // Read-only: a process that is still uid 0 writes no
                // sysctl (core_pattern) and no other process's files; and
                // only processes' directories where the kernel can (5.8).
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
        let cwd = self.cwd.as_deref().unwrap_or(c"/");
        if libc::chdir(cwd.as_ptr()) != 0 {
            return Err(failed(c"chdir", cwd));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_holds_the_vms_files_at_their_host_paths() {
        let d = tempfile::tempdir().unwrap();
        let kernel = d.path().join("kernel");
        std::fs::write(&kernel, "k").unwrap();
        let spec = VmSpec {
            kernel: kernel.clone(),
            vmlinux: None,
            initramfs: "/usr/share/doc".into(),
            vcpus: 1,
            memory_mib: 256,
            kernel_params: String::new(),
            dir: d.path().join("vm"),
            vsock: d.path().join("vm").join("vm.vsock"),
            shared_dir: d.path().join("vm").join("shared"),
            net: vec![],
            netns: None,
            cpuid_hide: vec![],
        };
        let r = plan(Path::new("/usr/bin/true"), None, &spec).unwrap();
        let text: Vec<String> = r
            .ops
            .iter()
            .map(|o| match o {
                Op::Mkdir(p) => format!("mkdir {}", p.to_string_lossy()),
                Op::Touch(p) => format!("touch {}", p.to_string_lossy()),
                Op::Bind {
                    from,
                    to,
                    read_only,
                } => format!(
                    "bind {} {} {}",
                    from.to_string_lossy(),
                    to.to_string_lossy(),
                    if *read_only { "ro" } else { "rw" }
                ),
                Op::Symlink { target, link } => {
                    format!(
                        "symlink {} {}",
                        target.to_string_lossy(),
                        link.to_string_lossy()
                    )
                }
                Op::Proc(p) => format!("proc {}", p.to_string_lossy()),
            })
            .collect();
        let has = |s: &str| text.iter().any(|t| t == s);
        assert!(has("bind /usr /proc/usr ro"), "{text:#?}");
        let k = kernel.display();
        assert!(has(&format!("bind {k} /proc{k} ro")), "{text:#?}");
        let vm = spec.dir.display();
        assert!(has(&format!("bind {vm} /proc{vm} rw")), "{text:#?}");
        assert_eq!(
            text.iter()
                .filter(|t| t.contains(&format!("/proc{vm}")))
                .count(),
            2,
            "the VM's directory made and bound once (the vsock's is the same): {text:#?}"
        );
        assert!(has("proc /proc/proc"), "{text:#?}");
        // Under /usr already: neither the program nor the "initramfs".
        assert!(
            !text
                .iter()
                .any(|t| t.contains("/usr/bin/true") || t.contains("doc")),
            "{text:#?}"
        );
        if Path::new("/dev/null").exists() {
            assert!(has("bind /dev/null /proc/dev/null rw"), "{text:#?}");
        }
    }
}
