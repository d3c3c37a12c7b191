//! One process to run in a container: what the OCI `process` object asks
//! for, checked and prepared by the agent ([`ProcessPlan::from_oci`]), and
//! applied by the child just before it execs ([`ProcessPlan::exec`]):
//! rlimits, stdio, capabilities, uid/gid/groups, no_new_privs, cwd, umask,
//! and the container's seccomp filter (installed where runc installs it:
//! before the privileges go without no_new_privs, last thing with it).

use std::convert::Infallible;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use caps::{CapSet, Capability, CapsHashSet};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::{execve, setresgid, setresuid, setsid, Gid, Uid};
use oci_spec::runtime::{Capabilities, LinuxCapabilities, PosixRlimitType, Process};

use super::seccomp::Filter;
use super::user;
use super::ChildError;
use crate::error::{invalid, Result};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug)]
pub struct ProcessPlan {
    pub args: Vec<CString>,
    pub env: Vec<CString>,
    search_path: String,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    umask: Option<u32>,
    rlimits: Vec<(libc::c_int, u64, u64)>,
    caps: Option<CapPlan>,
    no_new_privs: bool,
    oom_score_adj: Option<i32>,
    pub terminal: bool,
    /// The container's filter, for its init and every exec.
    pub seccomp: Option<Arc<Filter>>,
}

#[derive(Debug)]
struct CapPlan {
    bounding: CapsHashSet,
    effective: CapsHashSet,
    permitted: CapsHashSet,
    inheritable: CapsHashSet,
    ambient: CapsHashSet,
}

/// The child's standard streams: three fds for a pipe setup, or a pty
/// slave for all three.
pub enum ChildStdio {
    Fds([OwnedFd; 3]),
    Terminal(OwnedFd),
}

impl ProcessPlan {
    /// Checks `p` and prepares everything that needs no access to the
    /// container's filesystem. `rootfs` resolves `user.username`.
    pub fn from_oci(p: &Process, rootfs: Option<&Path>) -> Result<ProcessPlan> {
        let args = p.args().as_deref().unwrap_or_default();
        if args.is_empty() || args[0].is_empty() {
            return Err(invalid!("process.args is empty: nothing to run"));
        }
        let cstrings = |v: &[String], what: &str| -> Result<Vec<CString>> {
            v.iter()
                .map(|s| {
                    CString::new(s.as_str()).map_err(|_| invalid!("{what} {s:?} contains NUL"))
                })
                .collect()
        };
        let env_list = p.env().as_deref().unwrap_or_default();
        let search_path = env_list
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH)
            .to_string();
        if !p.cwd().is_absolute() {
            return Err(invalid!(
                "process.cwd {:?} must be an absolute path",
                p.cwd().display()
            ));
        }

        let u = p.user();
        let (mut uid, mut gid) = (u.uid(), u.gid());
        let mut groups = u.additional_gids().clone().unwrap_or_default();
        if let Some(name) = u.username().as_deref().filter(|n| !n.is_empty()) {
            let root = rootfs.ok_or_else(|| invalid!("user.username needs a rootfs"))?;
            let r = user::resolve(root, name)?;
            (uid, gid) = (r.uid, r.gid);
            groups.extend(r.groups);
        }

        let mut rlimits = Vec::new();
        for r in p.rlimits().iter().flatten() {
            if r.soft() > r.hard() {
                return Err(invalid!(
                    "rlimit {:?}: soft {} above hard {}",
                    r.typ(),
                    r.soft(),
                    r.hard()
                ));
            }
            rlimits.push((rlimit_resource(r.typ()), r.soft(), r.hard()));
        }

        Ok(ProcessPlan {
            args: cstrings(args, "argument")?,
            env: cstrings(env_list, "environment entry")?,
            search_path,
            cwd: p.cwd().clone(),
            uid,
            gid,
            groups,
            umask: u.umask(),
            rlimits,
            caps: p.capabilities().as_ref().map(cap_plan).transpose()?,
            no_new_privs: p.no_new_privileges().unwrap_or(false),
            oom_score_adj: p.oom_score_adj(),
            terminal: p.terminal().unwrap_or(false),
            seccomp: None,
        })
    }

    /// The executable args[0] names, searched in the process's PATH. Runs
    /// in the child, inside the container's filesystem.
    pub fn find_executable(&self) -> Result<CString, ChildError> {
        let name = self.args[0].to_string_lossy().into_owned();
        let candidates: Vec<PathBuf> = if name.contains('/') {
            vec![self.cwd.join(&name)]
        } else {
            self.search_path
                .split(':')
                .filter(|d| !d.is_empty())
                .map(|d| Path::new(d).join(&name))
                .collect()
        };
        for c in candidates {
            if let Ok(m) = std::fs::metadata(&c) {
                if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                    return CString::new(c.into_os_string().into_encoded_bytes())
                        .map_err(|_| ChildError(format!("bad executable path for {name}")));
                }
            }
        }
        Err(ChildError(if name.contains('/') {
            format!("executable {name} not found in the container")
        } else {
            format!(
                "executable file {name:?} not found in $PATH ({})",
                self.search_path
            )
        }))
    }

    /// Applies the plan to the calling process and execs `exe`. Returns only
    /// on failure.
    pub fn exec(&self, exe: &CString, stdio: ChildStdio) -> Result<Infallible, ChildError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| ChildError(format!("{what}: {e}"));
        for &(res, soft, hard) in &self.rlimits {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // glibc and musl type the resource differently; the RLIMIT_*
            // values are small and non-negative.
            #[allow(clippy::cast_sign_loss)]
            let res = res as _;
            // SAFETY: setrlimit with a valid pointer to a local struct.
            if unsafe { libc::setrlimit(res, &lim) } != 0 {
                return Err(fail("setrlimit", &std::io::Error::last_os_error()));
            }
        }
        if let Some(adj) = self.oom_score_adj {
            std::fs::write("/proc/self/oom_score_adj", adj.to_string())
                .map_err(|e| fail("oom_score_adj", &e))?;
        }

        setsid().map_err(|e| fail("setsid", &e))?;
        match stdio {
            ChildStdio::Terminal(slave) => {
                // SAFETY: TIOCSCTTY on an fd we own.
                if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } != 0 {
                    return Err(fail("TIOCSCTTY", &std::io::Error::last_os_error()));
                }
                for target in 0..3 {
                    dup2_raw(&slave, target).map_err(|e| fail("dup2 terminal", &e))?;
                }
            }
            ChildStdio::Fds(fds) => {
                for (target, fd) in fds.iter().enumerate() {
                    let target = i32::try_from(target).map_err(|e| fail("stdio fd", &e))?;
                    dup2_raw(fd, target).map_err(|e| fail("dup2 stdio", &e))?;
                }
            }
        }

        if !self.cwd.exists() {
            let _ = std::fs::create_dir_all(&self.cwd);
        }
        nix::unistd::chdir(&self.cwd)
            .map_err(|e| fail(&format!("cwd {}", self.cwd.display()), &e))?;

        // Without no_new_privs, installing a filter takes CAP_SYS_ADMIN,
        // which the steps below may drop.
        if let Some(f) = self.seccomp.as_ref().filter(|_| !self.no_new_privs) {
            f.install()?;
        }

        if let Some(c) = &self.caps {
            for cap in caps::all() {
                if !c.bounding.contains(&cap) {
                    // Capabilities this kernel lacks fail with EINVAL.
                    let _ = caps::drop(None, CapSet::Bounding, cap);
                }
            }
        }
        // Keep the permitted set across the uid change; the sets are set
        // exactly below.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
        let groups: Vec<Gid> = self.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        nix::unistd::setgroups(&groups).map_err(|e| fail("setgroups", &e))?;
        let gid = Gid::from_raw(self.gid);
        setresgid(gid, gid, gid).map_err(|e| fail(&format!("setgid {}", self.gid), &e))?;
        let uid = Uid::from_raw(self.uid);
        setresuid(uid, uid, uid).map_err(|e| fail(&format!("setuid {}", self.uid), &e))?;
        // SAFETY: as above.
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
        if let Some(c) = &self.caps {
            // Each capset must keep effective within permitted, and may
            // raise inheritable only within the old permitted: so
            // inheritable, effective, then permitted.
            caps::set(None, CapSet::Inheritable, &c.inheritable)
                .map_err(|e| fail("inheritable capabilities", &e))?;
            caps::set(None, CapSet::Effective, &c.effective)
                .map_err(|e| fail("effective capabilities", &e))?;
            caps::set(None, CapSet::Permitted, &c.permitted)
                .map_err(|e| fail("permitted capabilities (effective must be a subset)", &e))?;
            caps::set(None, CapSet::Ambient, &c.ambient)
                .map_err(|e| fail("ambient capabilities", &e))?;
        }
        if self.no_new_privs {
            // SAFETY: prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return Err(fail("no_new_privs", &std::io::Error::last_os_error()));
            }
        }
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
            self.umask.unwrap_or(0o022),
        ));
        reset_signals();
        if let Some(f) = self.seccomp.as_ref().filter(|_| self.no_new_privs) {
            f.install()?;
        }
        match execve(exe, &self.args, &self.env) {
            Err(e) => Err(fail(&format!("exec {}", exe.to_string_lossy()), &e)),
            Ok(never) => match never {},
        }
    }
}

fn dup2_raw(fd: &OwnedFd, target: i32) -> nix::Result<()> {
    if fd.as_raw_fd() == target {
        // dup2 onto itself would leave FD_CLOEXEC set.
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(target, libc::F_SETFD, 0) };
        return Ok(());
    }
    // SAFETY: dup2 of an fd we own onto a standard stream number.
    nix::errno::Errno::result(unsafe { libc::dup2(fd.as_raw_fd(), target) }).map(drop)
}

/// Signal dispositions the agent set (SIGPIPE ignored by Rust, handlers of
/// the runtime) must not leak into the container.
fn reset_signals() {
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator() {
        if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
            // SAFETY: installing SIG_DFL is always sound.
            let _ = unsafe { sigaction(sig, &dfl) };
        }
    }
    let _ = SigSet::all().thread_unblock();
}

// glibc types the RLIMIT_* values u32, musl c_int; they are small.
#[allow(clippy::cast_possible_wrap)]
fn rlimit_resource(t: PosixRlimitType) -> libc::c_int {
    (match t {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }) as libc::c_int
}

fn cap_plan(c: &LinuxCapabilities) -> Result<CapPlan> {
    let conv = |set: &Option<Capabilities>| -> Result<CapsHashSet> {
        set.iter()
            .flatten()
            .map(|cap| {
                let name = format!("CAP_{cap}");
                name.parse::<Capability>()
                    .map_err(|_| invalid!("unknown capability {name}"))
            })
            .collect()
    };
    Ok(CapPlan {
        bounding: conv(c.bounding())?,
        effective: conv(c.effective())?,
        permitted: conv(c.permitted())?,
        inheritable: conv(c.inheritable())?,
        ambient: conv(c.ambient())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(json: &str) -> Process {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn plan_takes_path_from_env() {
        let p = ProcessPlan::from_oci(
            &process(r#"{"args":["sh"],"env":["A=1","PATH=/bin"],"cwd":"/","user":{"uid":5,"gid":6,"additionalGids":[7]}}"#),
            None,
        )
        .unwrap();
        assert_eq!(p.search_path, "/bin");
        assert_eq!((p.uid, p.gid, p.groups.clone()), (5, 6, vec![7]));
        assert_eq!(p.env.len(), 2);
    }

    #[test]
    fn empty_args_and_relative_cwd_are_refused() {
        let e = ProcessPlan::from_oci(
            &process(r#"{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}"#),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("process.args is empty"), "{e}");
        let e = ProcessPlan::from_oci(
            &process(r#"{"args":["sh"],"cwd":"tmp","user":{"uid":0,"gid":0}}"#),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
    }

    #[test]
    fn nul_in_argument_is_refused() {
        let e = ProcessPlan::from_oci(
            &process(r#"{"args":["sh","a\u0000b"],"cwd":"/","user":{"uid":0,"gid":0}}"#),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("NUL"), "{e}");
    }

    #[test]
    fn capabilities_convert() {
        let p = ProcessPlan::from_oci(
            &process(
                r#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0},
              "capabilities":{"bounding":["CAP_CHOWN","CAP_KILL"],"effective":["CAP_KILL"]}}"#,
            ),
            None,
        )
        .unwrap();
        let c = p.caps.unwrap();
        assert!(c.bounding.contains(&Capability::CAP_CHOWN));
        assert!(c.effective.contains(&Capability::CAP_KILL));
        assert!(c.ambient.is_empty());
    }

    #[test]
    fn soft_above_hard_is_refused() {
        let e = ProcessPlan::from_oci(
            &process(
                r#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0},
              "rlimits":[{"type":"RLIMIT_NOFILE","soft":10,"hard":5}]}"#,
            ),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("soft 10 above hard 5"), "{e}");
    }
}
