//! Loading the kernel modules the guest needs, dependencies first.
//!
//! The guest image carries the modules, the `modules.dep` that `depmod -b`
//! wrote for them, and `/etc/podvisor/modules`, the list to load. Each
//! module's dependencies are loaded (depth first) before the module, so the
//! order in the list does not matter.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("module {0} is not in modules.dep and not built in")]
    Unknown(String),
    #[error("loading {path}: {errno}")]
    Load { path: PathBuf, errno: Errno },
}

/// `modules.dep` parsed: module name -> (path, dependency paths).
pub struct ModuleIndex {
    dir: PathBuf,
    by_name: HashMap<String, String>,
    deps: HashMap<String, Vec<String>>,
    builtin: HashSet<String>,
}

/// `virtio-pci`, `virtio_pci` and `virtio_pci.ko` all name one module.
fn canonical(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

impl ModuleIndex {
    pub fn load(dir: &Path) -> Result<ModuleIndex, ModuleError> {
        let read = |f: &str| {
            let path = dir.join(f);
            std::fs::read_to_string(&path).map_err(|source| ModuleError::Read { path, source })
        };
        let dep = read("modules.dep")?;
        let builtin = read("modules.builtin").unwrap_or_default();
        Ok(Self::parse(dir, &dep, &builtin))
    }

    fn parse(dir: &Path, dep: &str, builtin: &str) -> ModuleIndex {
        let mut by_name = HashMap::new();
        let mut deps = HashMap::new();
        for line in dep.lines() {
            let Some((module, rest)) = line.split_once(':') else {
                continue;
            };
            by_name.insert(canonical(module), module.to_string());
            deps.insert(
                module.to_string(),
                rest.split_whitespace().map(str::to_string).collect(),
            );
        }
        ModuleIndex {
            dir: dir.to_owned(),
            by_name,
            deps,
            builtin: builtin.lines().map(canonical).collect(),
        }
    }

    /// The files to load for `names`, in a valid order, each once.
    pub fn order(&self, names: &[&str]) -> Result<Vec<PathBuf>, ModuleError> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for name in names {
            let c = canonical(name);
            match self.by_name.get(&c) {
                Some(path) => self.visit(path, &mut seen, &mut out),
                None if self.builtin.contains(&c) => {}
                None => return Err(ModuleError::Unknown(name.to_string())),
            }
        }
        Ok(out)
    }

    fn visit(&self, path: &str, seen: &mut HashSet<String>, out: &mut Vec<PathBuf>) {
        if !seen.insert(path.to_string()) {
            return;
        }
        for d in self.deps.get(path).into_iter().flatten() {
            self.visit(d, seen, out);
        }
        out.push(self.dir.join(path));
    }
}

/// Loads `names` and their dependencies from `dir`. A module already
/// loaded (or built in) is not an error.
pub fn load(dir: &Path, names: &[&str]) -> Result<usize, ModuleError> {
    let index = ModuleIndex::load(dir)?;
    let files = index.order(names)?;
    let params = CString::default();
    for path in &files {
        let file = File::open(path).map_err(|source| ModuleError::Read {
            path: path.clone(),
            source,
        })?;
        match finit_module(&file, &params, ModuleInitFlags::empty()) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(errno) => {
                return Err(ModuleError::Load {
                    path: path.clone(),
                    errno,
                })
            }
        }
    }
    Ok(files.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vsock.ko:
";

    fn names(v: &[PathBuf]) -> Vec<String> {
        v.iter()
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    fn pos(v: &[String], n: &str) -> usize {
        v.iter().position(|x| x == n).unwrap()
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let idx = ModuleIndex::parse(Path::new("/m"), DEP, "kernel/fs/ext4/ext4.ko\n");
        let order = names(
            &idx.order(&["vmw-vsock-virtio-transport", "virtio_pci", "ext4"])
                .unwrap(),
        );
        assert_eq!(order.len(), 8, "{order:?}");
        assert!(pos(&order, "virtio_ring") < pos(&order, "virtio"));
        assert!(pos(&order, "virtio") < pos(&order, "virtio_pci"));
        assert!(pos(&order, "vsock") < pos(&order, "vmw_vsock_virtio_transport_common"));
        assert!(
            pos(&order, "vmw_vsock_virtio_transport_common")
                < pos(&order, "vmw_vsock_virtio_transport")
        );
    }

    #[test]
    fn unknown_module_is_named() {
        let idx = ModuleIndex::parse(Path::new("/m"), DEP, "");
        let e = idx.order(&["no_such_mod"]).unwrap_err();
        assert!(e.to_string().contains("no_such_mod"), "{e}");
    }
}
