//! Snapshots: what a paused VM is, apart from its memory, in one JSON
//! state file (vCPUs, interrupt controllers, PIT and clock, the serial
//! port and i8042, each virtio transport with its queues), and how a
//! snapshot is checked against the config of the VM that resumes it.
//! Guest memory goes to its own sparse file ([`crate::memory::save`]).
//! The control op `snapshot` writes both; a config's `restore` reads them.
//!
//! Devices whose state lives elsewhere cannot be saved and say why
//! (virtio-fs: its vhost-user backend; vsock: open connections). The
//! vsock driver is told its transport was reset when a VM resumes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::state::{PlatformState, VcpuState};
use crate::devices::i8042::I8042Snapshot;
use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::mmio::TransportSnapshot;
use podvisor_vmm_config::VmConfig;

/// Bumped when what the state file holds changes.
pub const FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub format: u32,
    pub memory_mib: u64,
    pub vcpus: Vec<VcpuState>,
    pub platform: PlatformState,
    pub serial: SerialSnapshot,
    pub i8042: I8042Snapshot,
    /// The virtio transports, in slot order.
    pub devices: Vec<TransportSnapshot>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a podvisor-vmm snapshot state: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: snapshot format {found}; this VMM reads format {FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("the snapshot is not of the VM the config describes: {0}")]
    Mismatch(String),
    #[error("this host cannot take snapshots: {0}")]
    Host(String),
}

/// Where a snapshot file is written before it is renamed into place.
pub fn partial(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".partial");
    path.with_file_name(name)
}

impl VmState {
    /// Writes the state file (to a temporary name first: a reader never
    /// sees half of it).
    pub fn write(&self, path: &Path) -> Result<(), SnapshotError> {
        let io = |what| {
            move |source| SnapshotError::Io {
                what,
                path: path.to_owned(),
                source,
            }
        };
        let json = serde_json::to_vec(self).map_err(|source| SnapshotError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let tmp = partial(path);
        std::fs::write(&tmp, json).map_err(io("writing"))?;
        std::fs::rename(&tmp, path).map_err(io("renaming into"))
    }

    pub fn read(path: &Path) -> Result<VmState, SnapshotError> {
        let text = std::fs::read(path).map_err(|source| SnapshotError::Io {
            what: "reading",
            path: path.to_owned(),
            source,
        })?;
        // The format first, so an old or new snapshot says so rather than
        // failing on a field it lacks.
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        let parse = |source| SnapshotError::Parse {
            path: path.to_owned(),
            source,
        };
        let head: Head = serde_json::from_slice(&text).map_err(parse)?;
        if head.format != FORMAT {
            return Err(SnapshotError::Format {
                path: path.to_owned(),
                found: head.format,
            });
        }
        serde_json::from_slice(&text).map_err(parse)
    }

    /// The config describes the VM this state was saved from: as many
    /// vCPUs, as much memory, as many virtio devices (their types are
    /// checked slot by slot when the transports are restored).
    pub fn check_shape(&self, config: &VmConfig) -> Result<(), SnapshotError> {
        let mismatch = |what: &str, saved: String, config: String| {
            Err(SnapshotError::Mismatch(format!(
                "{what}: {saved} in the snapshot, {config} in the config"
            )))
        };
        if self.vcpus.len() != usize::from(config.vcpus) {
            return mismatch(
                "vcpus",
                self.vcpus.len().to_string(),
                config.vcpus.to_string(),
            );
        }
        if self.memory_mib != config.memory_mib {
            return mismatch(
                "memory_mib",
                self.memory_mib.to_string(),
                config.memory_mib.to_string(),
            );
        }
        if self.devices.len() != config.virtio_device_count() {
            let names: Vec<&str> = self.devices.iter().map(|d| d.name.as_str()).collect();
            return mismatch(
                "virtio devices",
                format!("{} ({})", names.len(), names.join(", ")),
                config.virtio_device_count().to_string(),
            );
        }
        Ok(())
    }
}
