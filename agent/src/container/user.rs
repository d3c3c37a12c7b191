//! Resolving a user name against the container's own /etc/passwd and
//! /etc/group (the OCI `process.user.username` field).

use std::path::Path;

use crate::container::rootfs::secure_join;
use crate::error::{invalid, Result};

#[derive(Debug, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Groups that list the user as a member.
    pub groups: Vec<u32>,
}

/// Looks `name` up in `<rootfs>/etc/passwd` (a numeric name is taken as a
/// uid), and its supplementary groups in `<rootfs>/etc/group`.
pub fn resolve(rootfs: &Path, name: &str) -> Result<ResolvedUser> {
    let passwd =
        std::fs::read_to_string(secure_join(rootfs, Path::new("/etc/passwd"))).unwrap_or_default();
    let group =
        std::fs::read_to_string(secure_join(rootfs, Path::new("/etc/group"))).unwrap_or_default();
    resolve_in(&passwd, &group, name)
}

pub fn resolve_in(passwd: &str, group: &str, name: &str) -> Result<ResolvedUser> {
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .find(|f| f[0] == name || (name.parse::<u32>().is_ok() && f[2] == name));
    let (user, uid, gid) = match entry {
        Some(f) => {
            let uid = f[2]
                .parse()
                .map_err(|_| invalid!("bad uid {:?} for user {name} in /etc/passwd", f[2]))?;
            let gid = f[3]
                .parse()
                .map_err(|_| invalid!("bad gid {:?} for user {name} in /etc/passwd", f[3]))?;
            (f[0].to_string(), uid, gid)
        }
        None => match name.parse::<u32>() {
            Ok(uid) => (String::new(), uid, uid),
            Err(_) => {
                return Err(invalid!(
                    "unknown user {name:?}: no such entry in the container's /etc/passwd"
                ))
            }
        },
    };
    let groups = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4 && !user.is_empty())
        .filter(|f| f[3].split(',').any(|m| m == user))
        .filter_map(|f| f[2].parse().ok())
        .collect();
    Ok(ResolvedUser { uid, gid, groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:user,other\naudio:x:29:other\nuser:x:1000:\n";

    #[test]
    fn name_resolves_with_groups() {
        assert_eq!(
            resolve_in(PASSWD, GROUP, "user").unwrap(),
            ResolvedUser {
                uid: 1000,
                gid: 1000,
                groups: vec![10]
            }
        );
    }

    #[test]
    fn numeric_without_entry_is_its_own_gid() {
        let u = resolve_in(PASSWD, GROUP, "4242").unwrap();
        assert_eq!((u.uid, u.gid), (4242, 4242));
    }

    #[test]
    fn unknown_name_is_a_clear_error() {
        let err = resolve_in(PASSWD, GROUP, "nosuchuser").unwrap_err();
        assert!(
            err.to_string().contains("unknown user \"nosuchuser\""),
            "{err}"
        );
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let u = resolve_in("garbage\nroot:x:0:0::/:/bin/sh\n", "", "root").unwrap();
        assert_eq!((u.uid, u.gid), (0, 0));
    }
}
