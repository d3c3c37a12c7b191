//! What `podvisor-vmm` is told and what it answers, apart from the VMM
//! itself (Firecracker keeps its API types apart the same way), so the
//! hypervisor layer that drives the VMM links none of its KVM code:
//!
//! - [`VmConfig`]: the JSON description of a VM, as `podvisor-vmm --config
//!   <file>` reads it, and its validation: every mistake a user can make in
//!   it is reported before anything is built;
//! - [`limits`]: the VMM's limits that validation checks;
//! - [`control`]: the client side of the VMM's control socket;
//! - [`sparse`]: walking a snapshot's sparse memory file;
//! - [`probe::Verdict`]: what `podvisor-vmm --probe` prints.
//!
//! ```json
//! { "vcpus": 2, "memory_mib": 512,
//!   "kernel": "/opt/podvisor/share/guest/kernel",
//!   "initramfs": "/opt/podvisor/share/guest/initramfs",
//!   "cmdline": "console=ttyS0",
//!   "console": "/run/podvisor/x/console.log",
//!   "control_socket": "/run/podvisor/x/vmm.sock",
//!   "vsock": { "cid": 3, "uds": "/run/podvisor/x/vsock" },
//!   "fs": [ { "socket": "/run/podvisor/x/virtiofs.sock", "tag": "podvisor" } ],
//!   "block": [ { "path": "disk.img", "read_only": true } ],
//!   "net": [ { "tap": "tap0", "mac": "02:00:00:00:00:01" } ],
//!   "rng": true, "mmio_on_cmdline": false,
//!   "cpuid_hide": [ { "leaf": 7, "subleaf": 0, "register": "ebx", "bits": 65536 } ],
//!   "restore": { "memory": "/var/lib/x/memory", "state": "/var/lib/x/state" } }
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub mod control;
pub mod limits;
pub mod probe;
pub mod sparse;

use limits::{
    CMDLINE_MAX, FS_TAG_MAX, IFNAMSIZ, MAX_CPUID_HIDE, MAX_CPUS, MAX_MEMORY_MIB,
    MAX_VIRTIO_DEVICES, MIN_MEMORY_MIB,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    /// Where the serial console goes; none: discarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fs: Vec<FsConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub block: Vec<BlockConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetConfig>,
    #[serde(default)]
    pub rng: bool,
    /// Also name each virtio-mmio device on the command line
    /// (`virtio_mmio.device=4K@<addr>:<irq>`), for kernels built without
    /// ACPI but with VIRTIO_MMIO_CMDLINE_DEVICES. ACPI kernels (Debian's)
    /// find the devices in the DSDT and must not get both.
    #[serde(default)]
    pub mmio_on_cmdline: bool,
    /// CPUID bits cleared on top of KVM's supported set, so that the guest
    /// does not see (and use) those features: the same CPU on every node
    /// of a mixed fleet, or a feature kept from untrusted guests
    /// (Firecracker's CPU templates do the same).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpuid_hide: Vec<CpuidBits>,
    /// Resume a snapshot instead of booting `kernel` (which is then not
    /// read): the guest memory and the vCPU and device state a paused VM
    /// saved (control op `snapshot`). The config must describe the same
    /// VM (vCPUs, memory, the same devices in the same order); its paths
    /// (console, sockets, taps) are the new VM's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreConfig>,
}

/// A snapshot to resume: its files, as the control op `snapshot` wrote
/// them. Both are only read: each VM restored from them gets its own copy
/// of guest memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// Guest memory (a sparse file: holes are zero pages).
    pub memory: PathBuf,
    /// vCPU, interrupt controller, clock and device state (JSON).
    pub state: PathBuf,
}

/// Bits of one CPUID register to clear: `bits` of `register` in leaf
/// `leaf`, subleaf `subleaf` (ignored for leaves without subleaves).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidBits {
    pub leaf: u32,
    #[serde(default)]
    pub subleaf: u32,
    pub register: CpuidRegister,
    pub bits: u32,
}

impl CpuidBits {
    /// Whether `list` is a filter the VMM applies: each entry clears some
    /// bits, and there are not too many.
    pub fn check_all(list: &[CpuidBits]) -> Result<(), String> {
        if list.len() > MAX_CPUID_HIDE {
            return Err(format!(
                "cpuid_hide has {} entries; at most {MAX_CPUID_HIDE}",
                list.len()
            ));
        }
        match list.iter().find(|c| c.bits == 0) {
            Some(c) => Err(format!(
                "cpuid_hide: leaf {:#x} {:?} hides no bits (bits is 0)",
                c.leaf, c.register
            )),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuidRegister {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub cid: u32,
    /// The hybrid-vsock socket; `<uds>_<port>` for guest-initiated ones.
    pub uds: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
    pub tag: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// An existing tap device, by name.
    pub tap: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("VM config is not valid JSON for this VMM: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("{0}")]
    Invalid(String),
}

impl VmConfig {
    pub fn from_json(s: &str) -> Result<VmConfig, ConfigError> {
        let c: VmConfig = serde_json::from_str(s)?;
        c.validate()?;
        Ok(c)
    }

    /// Virtio devices in the order they get MMIO slots.
    pub fn virtio_device_count(&self) -> usize {
        usize::from(self.vsock.is_some())
            + self.fs.len()
            + self.block.len()
            + self.net.len()
            + usize::from(self.rng)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.vcpus == 0 || self.vcpus > MAX_CPUS {
            return bad(format!("vcpus must be 1..={MAX_CPUS}, not {}", self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return bad(format!(
                "memory_mib must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}, not {}",
                self.memory_mib
            ));
        }
        if self.cmdline.len() >= CMDLINE_MAX {
            return bad(format!(
                "cmdline is {} bytes; at most {}",
                self.cmdline.len(),
                CMDLINE_MAX - 1
            ));
        }
        if let Some(v) = &self.vsock {
            if v.cid < 3 || v.cid == u32::MAX {
                return bad(format!("vsock cid {} is reserved; use 3 or more", v.cid));
            }
        }
        for f in &self.fs {
            if f.tag.is_empty() || f.tag.len() > FS_TAG_MAX {
                return bad(format!("fs tag {:?} must be 1..={FS_TAG_MAX} bytes", f.tag));
            }
        }
        for n in &self.net {
            if n.tap.is_empty() || n.tap.len() >= IFNAMSIZ {
                return bad(format!("tap name {:?} must be 1..{IFNAMSIZ} bytes", n.tap));
            }
            if let Some(m) = &n.mac {
                parse_mac(m).map_err(ConfigError::Invalid)?;
            }
        }
        CpuidBits::check_all(&self.cpuid_hide).map_err(ConfigError::Invalid)?;
        let n = self.virtio_device_count();
        if n > MAX_VIRTIO_DEVICES {
            return bad(format!("{n} virtio devices; at most {MAX_VIRTIO_DEVICES}"));
        }
        Ok(())
    }
}

/// `02:00:00:00:00:01` to bytes.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("MAC {s:?} is not six hex octets"));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| format!("MAC {s:?} is not six hex octets"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("MAC {s:?} is a multicast address"));
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({"vcpus": 1, "memory_mib": 128, "kernel": "/k"})
    }

    fn parse(v: serde_json::Value) -> Result<VmConfig, ConfigError> {
        VmConfig::from_json(&v.to_string())
    }

    #[test]
    fn minimal_and_full_configs_parse() {
        let c = parse(base()).unwrap();
        assert_eq!((c.vcpus, c.memory_mib, c.rng), (1, 128, false));
        let mut v = base();
        v["vsock"] = serde_json::json!({"cid": 3, "uds": "/v"});
        v["fs"] = serde_json::json!([{"socket": "/s", "tag": "podvisor"}]);
        v["net"] = serde_json::json!([{"tap": "tap0", "mac": "02:00:00:00:00:01"}]);
        v["rng"] = serde_json::json!(true);
        v["cpuid_hide"] = serde_json::json!([{"leaf": 7, "register": "ebx", "bits": 65536}]);
        v["restore"] = serde_json::json!({"memory": "/m", "state": "/s"});
        let c = parse(v).unwrap();
        assert_eq!(c.restore.as_ref().unwrap().state, PathBuf::from("/s"));
        assert_eq!(c.virtio_device_count(), 4);
        assert_eq!(
            c.cpuid_hide,
            vec![CpuidBits {
                leaf: 7,
                subleaf: 0,
                register: CpuidRegister::Ebx,
                bits: 1 << 16
            }]
        );
        let round = VmConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(round, c);
    }

    #[test]
    fn mistakes_are_named() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                serde_json::json!({"vcpus": 0, "memory_mib": 128, "kernel": "/k"}),
                "vcpus",
            ),
            (
                serde_json::json!({"vcpus": 64, "memory_mib": 128, "kernel": "/k"}),
                "vcpus",
            ),
            (
                serde_json::json!({"vcpus": 1, "memory_mib": 1, "kernel": "/k"}),
                "memory_mib",
            ),
            (serde_json::json!({"vcpus": 1, "memory_mib": 128}), "kernel"),
            (
                serde_json::json!({"vcpus": 1, "memory_mib": 128, "kernel": "/k", "cpus": 2}),
                "cpus",
            ),
            (
                serde_json::json!({"vcpus": 1, "memory_mib": 128, "kernel": "/k", "vsock": {"cid": 2, "uds": "/v"}}),
                "cid",
            ),
            (
                serde_json::json!({"vcpus": 1, "memory_mib": 128, "kernel": "/k", "fs": [{"socket": "/s", "tag": ""}]}),
                "tag",
            ),
            (
                serde_json::json!({"vcpus": 1, "memory_mib": 128, "kernel": "/k", "net": [{"tap": "t", "mac": "zz"}]}),
                "MAC",
            ),
            (
                serde_json::json!({"vcpus": 1, "memory_mib": 128, "kernel": "/k", "net": [{"tap": "t", "mac": "01:00:00:00:00:01"}]}),
                "multicast",
            ),
            (
                serde_json::json!({"vcpus": -1, "memory_mib": 128, "kernel": "/k"}),
                "-1",
            ),
            (
                serde_json::json!({"vcpus": 1, "memory_mib": 128, "kernel": "/k", "cpuid_hide": [{"leaf": 7, "register": "esp", "bits": 1}]}),
                "esp",
            ),
            (
                serde_json::json!({"vcpus": 1, "memory_mib": 128, "kernel": "/k", "cpuid_hide": [{"leaf": 7, "register": "ebx", "bits": 0}]}),
                "hides no bits",
            ),
        ];
        for (v, word) in cases {
            let e = parse(v.clone()).unwrap_err().to_string();
            assert!(e.contains(word), "{v}: {e}");
        }
        let mut v = base();
        v["block"] = serde_json::json!((0..20)
            .map(|_| serde_json::json!({"path": "/d"}))
            .collect::<Vec<_>>());
        assert!(parse(v).unwrap_err().to_string().contains("virtio devices"));
        assert!(VmConfig::from_json("{not json").is_err());
    }
}
