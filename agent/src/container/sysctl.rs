//! Kernel parameters (`linux.sysctl` of a spec, and the sandbox-wide ones
//! of CreateSandbox): names checked by the agent, values written through
//! `/proc/sys`, a parameter the guest kernel lacks named as such.

use std::path::PathBuf;

use super::ChildError;
use crate::error::{invalid, Result};

/// The `/proc/sys` file of `key`. Dots separate the levels; a key that
/// holds a `/` uses slashes instead and dots within a level (an interface
/// name such as `eth0.100`), as sysctl(8) does.
pub fn path(key: &str) -> Result<PathBuf> {
    let rel = if key.contains('/') {
        key.to_string()
    } else {
        key.replace('.', "/")
    };
    let ok = !rel.is_empty()
        && rel
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..");
    if !ok {
        return Err(invalid!("bad sysctl name {key:?}"));
    }
    Ok(PathBuf::from("/proc/sys").join(rel))
}

/// Checks every name of `sysctls` before anything runs.
pub fn check<'a>(sysctls: impl IntoIterator<Item = &'a String>) -> Result<()> {
    sysctls.into_iter().try_for_each(|k| path(k).map(drop))
}

/// Sets `key` to `value` in the caller's namespaces.
pub fn write(key: &str, value: &str) -> Result<(), ChildError> {
    let path = path(key).map_err(|e| ChildError(e.to_string()))?;
    std::fs::write(&path, value).map_err(|e| {
        ChildError(if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "sysctl {key}: the guest kernel has no such parameter ({} does not exist)",
                path.display()
            )
        } else {
            format!("sysctl {key}={value}: {e}")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_proc_sys() {
        assert_eq!(
            path("net.ipv4.ip_unprivileged_port_start").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        );
        assert_eq!(
            path("net/ipv4/conf/eth0.100/forwarding").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.100/forwarding")
        );
        for bad in ["", "net..ipv4", "../etc/passwd", "net/../../x", "a/./b"] {
            let e = path(bad).unwrap_err();
            assert!(e.to_string().contains("bad sysctl name"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_missing_parameter_is_named() {
        let e = write("podvisor.no_such_parameter", "1").unwrap_err();
        assert!(
            e.0.contains("podvisor.no_such_parameter") && e.0.contains("no such parameter"),
            "{}",
            e.0
        );
    }
}
