//! Loading the kernel modules the guest needs, dependencies first.
//!
//! The guest image carries the modules, the `modules.dep` and
//! `modules.alias` that `depmod -b` wrote for them, and
//! `/etc/podvisor/modules`, the list to load at boot. Each module's
//! dependencies are loaded (depth first) before the module, so the order in
//! the list does not matter. The rest are loaded when the kernel asks for
//! them: the agent is also the guest's `/sbin/modprobe` ([`modprobe`]),
//! which resolves what the kernel names (`bridge`, `net-pf-16-proto-12`,
//! `nft-chain-2-nat`) through the aliases.

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

/// `modules.dep` parsed: module name -> (path, dependency paths), and
/// `modules.alias`: (pattern, module name).
pub struct ModuleIndex {
    dir: PathBuf,
    by_name: HashMap<String, String>,
    deps: HashMap<String, Vec<String>>,
    builtin: HashSet<String>,
    aliases: Vec<(String, String)>,
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
        let alias = read("modules.alias").unwrap_or_default();
        let mut index = Self::parse(dir, &dep, &builtin);
        index.aliases = parse_aliases(&alias);
        Ok(index)
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
            aliases: Vec::new(),
        }
    }

    /// The modules `name` stands for: itself, or what its aliases name.
    fn resolve(&self, name: &str) -> Vec<String> {
        let c = canonical(name);
        if self.by_name.contains_key(&c) || self.builtin.contains(&c) {
            return vec![c];
        }
        let mut found: Vec<String> = self
            .aliases
            .iter()
            .filter(|(pattern, _)| glob_match(pattern.as_bytes(), name.as_bytes()))
            .map(|(_, m)| canonical(m))
            .collect();
        found.dedup();
        found
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
    load_files(&index.order(names)?)
}

/// The agent run by the kernel as `/sbin/modprobe -q -- NAME`: loads the
/// module NAME names (directly or by alias) from `dir`.
pub fn modprobe(dir: &Path, args: &[String]) -> Result<usize, ModuleError> {
    let index = ModuleIndex::load(dir)?;
    let mut total = 0;
    for name in args.iter().filter(|a| !a.starts_with('-')) {
        let modules = index.resolve(name);
        if modules.is_empty() {
            return Err(ModuleError::Unknown(name.clone()));
        }
        let names: Vec<&str> = modules.iter().map(String::as_str).collect();
        total += load_files(&index.order(&names)?)?;
    }
    Ok(total)
}

fn load_files(files: &[PathBuf]) -> Result<usize, ModuleError> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for path in files {
        let file = File::open(path).map_err(|source| ModuleError::Read {
            path: path.clone(),
            source,
        })?;
        let module = canonical(&path.to_string_lossy());
        // A parameter cannot hold a NUL: one that does is not passed.
        let params = CString::new(cmdline_params(&cmdline, &module)).unwrap_or_default();
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

/// The parameters the kernel command line gives `module` (`MODULE.PARAM=VALUE`
/// or `MODULE.FLAG`, `-` and `_` alike in the module's name, as modprobe
/// reads them), as
/// `finit_module` takes them: a built-in driver reads the same words
/// itself (`dummy.numdummies=0` on podvisor's kernel and Debian's alike).
fn cmdline_params(cmdline: &str, module: &str) -> String {
    cmdline
        .split_whitespace()
        .filter_map(|word| {
            // The dot that counts is in the key: `initrd=/boot/x.img` is no
            // module's.
            let key = word.split_once('=').map_or(word, |(k, _)| k);
            let (name, _) = key.split_once('.')?;
            let param = &word[name.len() + 1..];
            (name.replace('-', "_") == module && !param.is_empty()).then_some(param)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `alias PATTERN MODULE` lines.
fn parse_aliases(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            match (f.next(), f.next(), f.next()) {
                (Some("alias"), Some(p), Some(m)) => Some((p.to_string(), m.to_string())),
                _ => None,
            }
        })
        .collect()
}

/// fnmatch(3) without flags: `*`, `?` and `[...]` classes (with ranges and
/// `!`/`^` negation), as modules.alias patterns use them.
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some(b'*') => (0..=s.len()).any(|i| glob_match(&p[1..], &s[i..])),
        Some(b'?') => !s.is_empty() && glob_match(&p[1..], &s[1..]),
        Some(b'[') => {
            let Some(c) = s.first() else { return false };
            let Some(end) = p.iter().skip(2).position(|b| *b == b']').map(|i| i + 2) else {
                return p[0] == *c && glob_match(&p[1..], &s[1..]);
            };
            let mut class = &p[1..end];
            let negate = matches!(class.first(), Some(b'!' | b'^'));
            if negate {
                class = &class[1..];
            }
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == b'-' {
                    hit |= (class[i]..=class[i + 2]).contains(c);
                    i += 3;
                } else {
                    hit |= class[i] == *c;
                    i += 1;
                }
            }
            hit != negate && glob_match(&p[end + 1..], &s[1..])
        }
        Some(b) => s.first() == Some(b) && glob_match(&p[1..], &s[1..]),
    }
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
    fn aliases_resolve_with_globs() {
        let mut idx = ModuleIndex::parse(Path::new("/m"), DEP, "kernel/fs/ext4/ext4.ko\n");
        idx.aliases = parse_aliases(
            "# Aliases extracted from modules themselves.\n\
             alias net-pf-40 vsock\n\
             alias virtio:d00000013v* vmw_vsock_virtio_transport\n\
             alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci\n",
        );
        assert_eq!(idx.resolve("net-pf-40"), vec!["vsock"]);
        assert_eq!(
            idx.resolve("virtio:d00000013v00001AF4"),
            vec!["vmw_vsock_virtio_transport"]
        );
        assert_eq!(idx.resolve("virtio-pci"), vec!["virtio_pci"]);
        assert_eq!(idx.resolve("ext4"), vec!["ext4"]);
        assert!(idx.resolve("net-pf-41").is_empty());
        assert!(glob_match(b"a[0-9]b", b"a5b"));
        assert!(!glob_match(b"a[!0-9]b", b"a5b"));
        assert!(glob_match(b"x*y*z", b"xyyyz"));
        assert!(!glob_match(b"x?z", b"xz"));
    }

    #[test]
    fn module_parameters_come_from_the_kernel_command_line() {
        let cmdline = "console=ttyS0 dummy.numdummies=0 nf-conntrack.hashsize=4096 \
                       dummy.x=1 dummy_extra.y=2 dummy.flag panic=-1 initrd=/boot/dummy.img \
                       a/dummy.z=3";
        assert_eq!(cmdline_params(cmdline, "dummy"), "numdummies=0 x=1 flag");
        assert_eq!(cmdline_params(cmdline, "nf_conntrack"), "hashsize=4096");
        assert_eq!(cmdline_params(cmdline, "veth"), "");
    }

    #[test]
    fn unknown_module_is_named() {
        let idx = ModuleIndex::parse(Path::new("/m"), DEP, "");
        let e = idx.order(&["no_such_mod"]).unwrap_err();
        assert!(e.to_string().contains("no_such_mod"), "{e}");
    }
}
