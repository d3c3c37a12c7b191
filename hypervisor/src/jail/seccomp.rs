//! The seccomp filter of vhost-device-vsock, which has none of its own:
//! compiled with seccompiler from the committed rules
//! (`hypervisor/seccomp/vhost-device-vsock.json`) in the shim, installed
//! by the jail as the last step before exec. Any other system call kills
//! the helper with SIGSYS (the VM then loses vsock, and the shim reports
//! the helper's death). `hypervisor/seccomp/README.md` says how to list
//! the calls a real run makes.

use std::sync::OnceLock;

use seccompiler::{BpfProgram, TargetArch};

use crate::HypervisorError;

/// The committed rules.
const RULES: &str = include_str!("../../seccomp/vhost-device-vsock.json");
/// Their one filter's name.
const FILTER: &str = "vhost-device-vsock";

/// The compiled filter (compiled once per shim).
static COMPILED: OnceLock<Result<BpfProgram, String>> = OnceLock::new();

fn compile() -> Result<BpfProgram, String> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())?;
    let mut filters =
        seccompiler::compile_from_json(RULES.as_bytes(), arch).map_err(|e| e.to_string())?;
    filters
        .remove(FILTER)
        .ok_or_else(|| format!("the rules have no filter named {FILTER}"))
}

/// vhost-device-vsock's filter, as BPF.
pub fn vsock_helper() -> Result<&'static BpfProgram, HypervisorError> {
    COMPILED.get_or_init(compile).as_ref().map_err(|e| {
        HypervisorError::Unavailable(format!("vhost-device-vsock's seccomp rules: {e}"))
    })
}

/// Installs `filter` on the calling process (with no_new_privs).
///
/// Meant for a child between fork and exec: seccompiler only issues the
/// two system calls and allocates nothing.
pub fn install(filter: &[seccompiler::sock_filter]) -> std::io::Result<()> {
    seccompiler::apply_filter(filter).map_err(|_| std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_rules_compile() {
        let filter = super::vsock_helper().unwrap();
        assert!(!filter.is_empty());
    }
}
