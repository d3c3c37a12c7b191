//! Forking a container process, and the little protocol that tells the
//! agent how its setup went.
//!
//! ```text
//! agent ──fork──> intermediate ── enters the spec's namespaces (init)
//!                   │              or the init's (exec)
//!                   └─fork──> container process (an init is pid 1 of its
//!                              own pid ns, unless it joins the pod's) ──
//!                              joins the cgroup, builds its view, waits,
//!                              execs
//! ```
//! Both forks happen outside the container's cgroup, in the agent's task
//! slots: a container that took all of its own (a fork bomb) cannot keep
//! the agent from starting an exec in it or a neighbour.
//!
//! The intermediate reports the container process's pid and exits; as
//! PID 1 (or a subreaper) the agent becomes that process's parent, so the
//! [`Reaper`](crate::reaper::Reaper) sees its exit.
//!
//! A close-on-exec SEQPACKET pair carries one message per packet:
//! `P<pid>` (intermediate), `T` + a pty master fd, `R` ready, `E<text>`
//! failure, and from the agent `S` start. After `S`, end of stream means
//! execve succeeded.

use std::convert::Infallible;
use std::ffi::CString;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::unistd::{fork, ForkResult};
use oci_spec::runtime::Spec;

use super::namespaces::{Namespaces, EXEC_NAMESPACES};
use super::process::{ChildStdio, ProcessPlan};
use super::{rootfs, sysctl, ChildError};
use crate::error::{internal, AgentError, Result};

/// How long a child may take to build its container (virtio-fs under TCG
/// is slow) and to exec once told to.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Error texts stay below PIPE_BUF so a packet always fits.
const MAX_ERROR: usize = 3000;

/// Where the process goes.
pub enum Target {
    /// A new container: the spec's namespaces, rootfs, mounts and sysctls.
    Init {
        spec: Box<Spec>,
        rootfs: PathBuf,
        namespaces: Namespaces,
    },
    /// Into the namespaces of the running init `init_pid`.
    Exec { init_pid: i32 },
}

pub struct LaunchPlan {
    pub target: Target,
    /// `<cgroup>/cgroup.procs` of the container.
    pub cgroup_procs: PathBuf,
    pub process: ProcessPlan,
}

/// The standard streams the child gets.
pub enum LaunchStdio {
    /// stdin, stdout, stderr, already opened by the agent.
    Fds([OwnedFd; 3]),
    /// A new pty that the child opens in the container and passes back.
    Terminal,
}

/// A process that is set up and waits for [`Launched::start`].
pub struct Launched {
    pub pid: i32,
    /// The pty master, when the process has a terminal.
    pub tty_master: Option<OwnedFd>,
    sync: OwnedFd,
}

/// Forks the process of `plan` with `stdio` and waits until it is ready to
/// exec (or failed). Blocking: call from a blocking thread.
///
/// `on_fork` learns the intermediate's pid at once, so the caller can
/// watch it before it can be reaped unseen.
pub fn launch(plan: &LaunchPlan, stdio: LaunchStdio, on_fork: impl Fn(i32)) -> Result<Launched> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| internal!("socketpair: {e}"))?;

    // SAFETY: the child only runs `intermediate`, which execs or _exits;
    // musl's fork leaves the allocator usable in the child.
    match unsafe { fork() }.map_err(|e| internal!("fork: {e}"))? {
        ForkResult::Child => {
            drop(ours);
            intermediate(plan, stdio, theirs)
        }
        ForkResult::Parent { child } => {
            on_fork(child.as_raw());
            drop(theirs);
            drop(stdio);
            let deadline = Instant::now() + SETUP_TIMEOUT;
            let mut pid = None;
            let mut tty_master = None;
            let mut ready = false;
            // The intermediate's pid and the process's ready come in
            // either order.
            while !(ready && pid.is_some()) {
                match recv(&ours, deadline)? {
                    Msg::Pid(p) => pid = Some(p),
                    Msg::Tty(fd) => tty_master = Some(fd),
                    Msg::Ready => ready = true,
                    Msg::Error(text) => return Err(child_error(text)),
                    Msg::Eof => return Err(internal!("container process died during setup")),
                    Msg::Start => return Err(internal!("unexpected start message from child")),
                }
            }
            let pid = pid.ok_or_else(|| internal!("container process reported no pid"))?;
            Ok(Launched {
                pid,
                tty_master,
                sync: ours,
            })
        }
    }
}

impl Launched {
    /// Lets the process exec; returns once execve succeeded or failed.
    pub fn start(self) -> Result<()> {
        send(self.sync.as_fd(), b"S", None).map_err(|e| internal!("signalling start: {e}"))?;
        match recv(&self.sync, Instant::now() + SETUP_TIMEOUT)? {
            Msg::Eof => Ok(()),
            Msg::Error(text) => Err(child_error(text)),
            _ => Err(internal!("unexpected message from container process")),
        }
    }
}

/// Setup failures inside the container are the caller's to fix (missing
/// executable, bad mount), so they come back as FailedPrecondition.
fn child_error(text: String) -> AgentError {
    AgentError::FailedPrecondition(text)
}

enum Msg {
    Pid(i32),
    Tty(OwnedFd),
    Ready,
    Start,
    Error(String),
    Eof,
}

fn recv(sock: &OwnedFd, deadline: Instant) -> Result<Msg> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(internal!(
                "container process did not report within {SETUP_TIMEOUT:?}"
            ));
        }
        let ms = PollTimeout::try_from(i32::try_from(left.as_millis()).unwrap_or(i32::MAX))
            .unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => break,
            Err(e) => return Err(internal!("poll: {e}")),
        }
    }
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| internal!("reading from container process: {e}"))?;
    let mut fd = None;
    for c in msg.cmsgs().map_err(|e| internal!("control message: {e}"))? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // SAFETY: the kernel just gave us this descriptor.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                fd.get_or_insert(owned);
            }
        }
    }
    let n = msg.bytes;
    let data = &buf[..n];
    Ok(match data.first() {
        None => Msg::Eof,
        Some(b'P') => Msg::Pid(
            std::str::from_utf8(&data[1..])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| internal!("bad pid message"))?,
        ),
        Some(b'T') => Msg::Tty(fd.ok_or_else(|| internal!("terminal message without fd"))?),
        Some(b'R') => Msg::Ready,
        Some(b'S') => Msg::Start,
        Some(b'E') => Msg::Error(String::from_utf8_lossy(&data[1..]).into_owned()),
        Some(_) => return Err(internal!("unknown message from container process")),
    })
}

fn send(sock: BorrowedFd<'_>, data: &[u8], fd: Option<RawFd>) -> nix::Result<()> {
    let iov = [IoSlice::new(data)];
    let fds;
    let cmsgs: &[ControlMessage] = match fd {
        Some(f) => {
            fds = [f];
            &[ControlMessage::ScmRights(&fds)]
        }
        None => &[],
    };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).map(drop)
}

/// Reports `e` to the agent and ends the child.
fn die(sock: &OwnedFd, e: ChildError) -> ! {
    let mut text = format!("E{}", e.0);
    text.truncate(MAX_ERROR);
    let _ = send(sock.as_fd(), text.as_bytes(), None);
    // SAFETY: _exit never returns and runs no destructors of the parent's state.
    unsafe { libc::_exit(1) }
}

fn intermediate(plan: &LaunchPlan, stdio: LaunchStdio, sock: OwnedFd) -> ! {
    // The container's cgroup is joined by the container process itself,
    // once forked: a fork in it could find its task slots all taken (a
    // fork bomb), while joining is never refused. Opened here, in the
    // agent's view of the cgroup tree.
    let procs = match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&plan.cgroup_procs)
    {
        Ok(f) => f,
        Err(e) => die(
            &sock,
            ChildError(format!("opening {}: {e}", plan.cgroup_procs.display())),
        ),
    };
    if let Err(e) = enter_namespaces(plan) {
        die(&sock, e)
    }
    // SAFETY: as in `launch`; the child execs or _exits.
    match unsafe { fork() } {
        Err(e) => die(&sock, ChildError(format!("fork: {e}"))),
        Ok(ForkResult::Child) => {
            match join_cgroup(plan, &procs).and_then(|()| container_process(plan, stdio, &sock)) {
                Err(e) => die(&sock, e),
                Ok(never) => match never {},
            }
        }
        Ok(ForkResult::Parent { child }) => {
            let _ = send(
                sock.as_fd(),
                format!("P{}", child.as_raw()).as_bytes(),
                None,
            );
            // SAFETY: see `die`.
            unsafe { libc::_exit(0) }
        }
    }
}

/// Moves the calling process into the container's cgroup (`procs`, its
/// open `cgroup.procs`), then makes the init's new cgroup namespace, rooted
/// there.
fn join_cgroup(plan: &LaunchPlan, mut procs: &std::fs::File) -> Result<(), ChildError> {
    use std::io::Write;
    procs.write_all(b"0").map_err(|e| {
        ChildError(format!(
            "joining cgroup {}: {e}",
            plan.cgroup_procs.display()
        ))
    })?;
    match &plan.target {
        Target::Init { namespaces, .. } => namespaces.enter_cgroup(),
        Target::Exec { .. } => Ok(()),
    }
}

/// Enters the namespaces of `plan`, but for an init's new cgroup
/// namespace ([`join_cgroup`]).
fn enter_namespaces(plan: &LaunchPlan) -> Result<(), ChildError> {
    match &plan.target {
        Target::Init { namespaces, .. } => namespaces.enter(),
        Target::Exec { init_pid } => {
            let mut files = Vec::new();
            for ns in EXEC_NAMESPACES {
                let path = format!("/proc/{init_pid}/ns/{ns}");
                let f = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    // A kind this kernel lacks (time namespaces, say).
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(ChildError(format!("opening {path}: {e}"))),
                };
                if same_file(&f, &format!("/proc/self/ns/{ns}")) {
                    continue;
                }
                files.push((ns, f));
            }
            for (ns, f) in files {
                setns(f.as_fd(), CloneFlags::empty()).map_err(|e| {
                    ChildError(format!("entering the container's {ns} namespace: {e}"))
                })?;
            }
            Ok(())
        }
    }
}

/// Whether `f` is the file at `path` (a namespace we are in already).
fn same_file(f: &std::fs::File, path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn container_process(
    plan: &LaunchPlan,
    stdio: LaunchStdio,
    sock: &OwnedFd,
) -> Result<Infallible, ChildError> {
    if let Target::Init {
        spec,
        rootfs,
        namespaces,
    } = &plan.target
    {
        // A joined UTS namespace keeps the hostname its owner set.
        if let Some(h) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
            if namespaces.own_uts {
                nix::unistd::sethostname(h)
                    .map_err(|e| ChildError(format!("sethostname {h:?}: {e}")))?;
            }
        }
        rootfs::enter(spec, rootfs)?;
        // In the container's /proc, before /proc/sys turns read-only.
        let sysctls = spec.linux().as_ref().and_then(|l| l.sysctl().as_ref());
        for (key, value) in sysctls.into_iter().flatten() {
            sysctl::write(key, value)?;
        }
        rootfs::lock_down(spec)?;
    }
    let stdio = match stdio {
        LaunchStdio::Fds(fds) => ChildStdio::Fds(fds),
        LaunchStdio::Terminal => {
            let (master, slave) = open_pty()?;
            send(sock.as_fd(), b"T", Some(master.as_raw_fd()))
                .map_err(|e| ChildError(format!("passing the terminal: {e}")))?;
            drop(master);
            if matches!(plan.target, Target::Init { .. }) {
                bind_console(&slave);
            }
            ChildStdio::Terminal(slave)
        }
    };
    let exe: CString = plan.process.find_executable()?;
    send(sock.as_fd(), b"R", None).map_err(|e| ChildError(format!("reporting ready: {e}")))?;
    loop {
        let mut buf = [0u8; 16];
        match nix::sys::socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(0) => {
                // The agent gave up on this container.
                // SAFETY: see `die`.
                unsafe { libc::_exit(1) }
            }
            Ok(_) if buf[0] == b'S' => break,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ChildError(format!("waiting for start: {e}"))),
        }
    }
    plan.process.exec(&exe, stdio)
}

/// A pty from the container's own devpts, so `tty` names a node the
/// container can see.
fn open_pty() -> Result<(OwnedFd, OwnedFd), ChildError> {
    use nix::fcntl::OFlag;
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| ChildError(format!("opening /dev/ptmx in the container: {e}")))?;
    grantpt(&master).map_err(|e| ChildError(format!("grantpt: {e}")))?;
    unlockpt(&master).map_err(|e| ChildError(format!("unlockpt: {e}")))?;
    let name = ptsname_r(&master).map_err(|e| ChildError(format!("ptsname: {e}")))?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&name)
        .map_err(|e| ChildError(format!("opening {name}: {e}")))?;
    // SAFETY: into_raw_fd hands over ownership.
    let master = unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(master)) };
    Ok((master, slave.into()))
}

/// /dev/console of a container with a terminal is that terminal.
fn bind_console(slave: &OwnedFd) {
    let console = std::path::Path::new("/dev/console");
    if !console.exists() {
        let _ = std::fs::File::create(console);
    }
    let src = format!("/proc/self/fd/{}", slave.as_raw_fd());
    let _ = nix::mount::mount(
        Some(src.as_str()),
        console,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    );
}
