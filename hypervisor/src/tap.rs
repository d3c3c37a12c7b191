//! The taps a VM's NICs attach to, in the pod's network namespace (the
//! shim makes them): opened here for a backend that is handed a NIC's
//! descriptor, or given to the VM's id for one that opens its own.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use crate::{HypervisorError, VmSpec};

/// Opens the tap `name` in `netns` (a thread enters it; the process stays
/// where it is), as QEMU opens one by name: no packet info, virtio-net
/// headers.
pub fn open(netns: Option<&Path>, name: &str) -> Result<OwnedFd, HypervisorError> {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    // linux/if_tun.h.
    const FLAGS: libc::c_short = 0x0002 | 0x1000 | 0x4000; // TAP | NO_PI | VNET_HDR
    let io = |what: String| move |source| HypervisorError::Io { what, source };
    if name.len() >= libc::IFNAMSIZ {
        return Err(io(format!("tap {name}"))(
            std::io::ErrorKind::InvalidInput.into(),
        ));
    }
    let netns = netns
        .map(std::fs::File::open)
        .transpose()
        .map_err(io(format!(
            "opening network namespace {}",
            netns.map(|p| p.display().to_string()).unwrap_or_default()
        )))?;
    let name = name.to_string();
    std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<OwnedFd> {
            if let Some(ns) = &netns {
                // SAFETY: setns(2) on this thread only, with an open fd.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let tun: OwnedFd = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")?
                .into();
            let mut req = IfReq {
                name: [0; libc::IFNAMSIZ],
                flags: FLAGS,
                _pad: [0; 22],
            };
            req.name[..name.len()].copy_from_slice(name.as_bytes());
            // SAFETY: TUNSETIFF reads and writes an ifreq-sized struct we own.
            if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(tun)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("tap thread panicked")))
    })
    .map_err(io(format!("opening tap {name}")))
}

/// Makes each of `spec`'s taps the VM's id's (`TUNSETOWNER`), so that
/// the VM process, without CAP_NET_ADMIN, may attach to it by name.
pub fn give(spec: &VmSpec) -> Result<(), HypervisorError> {
    let Some(owner) = &spec.owner else {
        return Ok(());
    };
    for n in &spec.net {
        let tap = open(spec.netns.as_deref(), &n.tap)?;
        // SAFETY: TUNSETOWNER takes the uid by value.
        if unsafe {
            libc::ioctl(
                tap.as_raw_fd(),
                libc::TUNSETOWNER,
                libc::c_ulong::from(owner.id),
            )
        } != 0
        {
            return Err(HypervisorError::Io {
                what: format!("giving tap {} to id {}", n.tap, owner.id),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}
