//! The VMM's seccomp filters: one per kind of thread, compiled with
//! seccompiler from the committed rules (`vmm/seccomp/x86_64.json`).
//! `main` enables them before the VM is built; from then on each thread
//! installs its kind's filter as it starts (a vCPU before its first
//! `KVM_RUN`, the event loop once the vCPUs run), and a system call outside
//! it kills the whole process with SIGSYS. `vmm/seccomp/README.md` says how
//! to list the system calls a real run makes, to keep the rules tight.

use std::sync::OnceLock;

use seccompiler::{BpfMap, TargetArch};

/// The committed rules.
const RULES: &str = include_str!("../seccomp/x86_64.json");

/// A kind of VMM thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread's event loop (device I/O) and the signal waiter.
    Vmm,
    /// A vCPU: `KVM_RUN` and the exits it serves.
    Vcpu,
    /// The control socket: status, pause, snapshot, resume.
    Control,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Control];

    /// Its filter's name in the rules.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Control => "control",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("compiling the seccomp rules: {0}")]
    Compile(String),
    #[error("the seccomp rules have no filter for {0} threads")]
    Missing(&'static str),
    #[error("installing the seccomp filter of {kind} threads: {reason}")]
    Apply { kind: &'static str, reason: String },
}

/// The compiled filters; unset: this process runs without seccomp (the
/// library in tests, `--no-seccomp`).
static FILTERS: OnceLock<BpfMap> = OnceLock::new();

/// Compiles the rules and checks that every thread kind has its filter;
/// threads started after this install theirs.
pub fn enable() -> Result<(), SeccompError> {
    let filters = compile()?;
    let _ = FILTERS.set(filters);
    Ok(())
}

fn compile() -> Result<BpfMap, SeccompError> {
    let filters = seccompiler::compile_from_json(RULES.as_bytes(), TargetArch::x86_64)
        .map_err(|e| SeccompError::Compile(e.to_string()))?;
    for kind in ThreadKind::ALL {
        if !filters.contains_key(kind.name()) {
            return Err(SeccompError::Missing(kind.name()));
        }
    }
    Ok(filters)
}

/// Installs `kind`'s filter on the calling thread (and no_new_privs with
/// it), if filters are enabled.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    let program = filters
        .get(kind.name())
        .ok_or(SeccompError::Missing(kind.name()))?;
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Apply {
        kind: kind.name(),
        reason: e.to_string(),
    })?;
    test_hooks::after_filter(kind);
    Ok(())
}

/// Test builds only (feature `test-hooks`): `PODVISOR_VMM_TEST_SIGSYS=<kind>`
/// makes the first thread of that kind issue a system call no filter
/// allows, right after installing its filter: the process must die of
/// SIGSYS.
#[cfg(feature = "test-hooks")]
mod test_hooks {
    pub fn after_filter(kind: super::ThreadKind) {
        if std::env::var("PODVISOR_VMM_TEST_SIGSYS").as_deref() == Ok(kind.name()) {
            tracing::warn!("test hook: a {} thread calls ptrace(2)", kind.name());
            // SAFETY: PTRACE_TRACEME with no pointers; the filter kills the
            // process before it runs.
            unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
        }
    }
}

#[cfg(not(feature = "test-hooks"))]
mod test_hooks {
    pub fn after_filter(_: super::ThreadKind) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_rules_compile_for_every_thread_kind() {
        let filters = compile().unwrap();
        for kind in ThreadKind::ALL {
            assert!(!filters[kind.name()].is_empty(), "{}", kind.name());
        }
    }
}
