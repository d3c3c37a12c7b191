//! The shim's configuration (`/etc/podvisor/config.toml`, or the file the
//! containerd runtime option `ConfigPath` names) and the sizing of one VM
//! from it, the pod's allow-listed annotations and the CRI sizing
//! annotations.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use podvisor_hypervisor::{CpuidBits, HypervisorKind, Jail, Paths, VmSpec};
use podvisor_names::annotations::{
    self, HYPERVISOR as ANNOTATION_HYPERVISOR, KERNEL_PARAMS as ANNOTATION_KERNEL_PARAMS,
    MEMORY_MIB as ANNOTATION_MEMORY, VCPUS as ANNOTATION_VCPUS,
};
use podvisor_names::{paths, MIN_GUEST_MEMORY_MIB as MIN_MEMORY_MIB};
use serde::Deserialize;

/// What containerd's CRI plugin sets on a sandbox (containerd 1.7+).
const CRI_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const CRI_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
const CRI_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("config {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("annotation {key}: {reason}")]
    Annotation { key: String, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub hypervisor: HypervisorKind,
    /// Guest kernel (bzImage) and initramfs.
    pub kernel: PathBuf,
    /// The kernel uncompressed (vmlinux), for the in-tree VMM; when the
    /// file is absent (Debian's kernel has none) the VMM boots `kernel`.
    pub vmm_kernel: PathBuf,
    pub initramfs: PathBuf,
    pub default_vcpus: u32,
    pub default_memory_mib: u32,
    pub max_vcpus: u32,
    pub max_memory_mib: u32,
    /// Appended to every guest's kernel command line.
    pub kernel_params: String,
    /// The `podvisor.io/*` annotations pods may set; others fail create.
    pub allowed_annotations: Vec<String>,
    /// Whether a pod asking for the node's namespaces (hostNetwork,
    /// hostPID, hostIPC) runs with the VM's instead. Off: such a pod fails
    /// to start, naming the setting.
    pub allow_host_namespaces: bool,
    /// CPUID bits every guest on the in-tree VMM is kept from seeing
    /// (`[[cpuid_hide]]` tables: leaf, subleaf, register, bits).
    pub cpuid_hide: Vec<CpuidBits>,
    pub paths: Paths,
    /// `[jail]`: how the VM's processes are confined on the host.
    pub jail: Jail,
    pub warm: Warm,
    /// The file this was read from, if one was named (a pool filler the
    /// shim starts reads the same).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[warm]`: warm start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Warm {
    /// Restore each VM from the saved template of its shape (built on the
    /// first need) instead of booting it; cold boot where none can serve.
    pub templates: bool,
    pub template_dir: PathBuf,
    /// Templates kept on disk (each holds the guest memory its VM used,
    /// sparse); a new one removes those used least recently.
    pub max_templates: usize,
    /// The warm pool: clones of each shape pods have started kept running
    /// (idle) ahead, handed to the next pod of that shape; 0: none.
    pub pool_size: usize,
    /// The most guest memory all pool VMs together may have, MiB.
    pub pool_max_mib: u64,
}

impl Default for Warm {
    fn default() -> Self {
        Warm {
            templates: true,
            template_dir: paths::TEMPLATE_ROOT.into(),
            max_templates: 4,
            pool_size: 0,
            pool_max_mib: 2048,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hypervisor: HypervisorKind::Auto,
            kernel: paths::GUEST_KERNEL.into(),
            vmm_kernel: paths::GUEST_VMLINUX.into(),
            initramfs: paths::GUEST_INITRAMFS.into(),
            default_vcpus: 1,
            default_memory_mib: 512,
            max_vcpus: 16,
            max_memory_mib: 16384,
            kernel_params: String::new(),
            allowed_annotations: Vec::new(),
            allow_host_namespaces: false,
            cpuid_hide: Vec::new(),
            paths: Paths::default(),
            jail: Jail::default(),
            warm: Warm::default(),
            source: None,
        }
    }
}

impl Config {
    /// Reads `path`; the default path may be absent (defaults apply), a
    /// path given explicitly may not.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_owned(), true),
            None => (PathBuf::from(paths::NODE_CONFIG), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let mut cfg = Self::parse(&path, &text)?;
        cfg.source = explicit.then_some(path);
        Ok(cfg)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        };
        if cfg.default_vcpus == 0 || cfg.default_vcpus > cfg.max_vcpus {
            return Err(invalid(format!(
                "default_vcpus {} must be within 1..={}",
                cfg.default_vcpus, cfg.max_vcpus
            )));
        }
        if cfg.default_memory_mib < MIN_MEMORY_MIB || cfg.default_memory_mib > cfg.max_memory_mib {
            return Err(invalid(format!(
                "default_memory_mib {} must be within {MIN_MEMORY_MIB}..={}",
                cfg.default_memory_mib, cfg.max_memory_mib
            )));
        }
        if cfg.warm.pool_size > 0 && !cfg.warm.templates {
            return Err(invalid(
                "[warm] pool_size needs templates = true (pool VMs are clones of a template)"
                    .into(),
            ));
        }
        if cfg.warm.max_templates == 0 {
            return Err(invalid(
                "[warm] max_templates must be at least 1 (templates = false turns warm start off)"
                    .into(),
            ));
        }
        CpuidBits::check_all(&cfg.cpuid_hide).map_err(invalid)?;
        cfg.jail.check().map_err(invalid)?;
        for a in &cfg.allowed_annotations {
            if !annotations::ALL.contains(&a.as_str()) {
                return Err(invalid(format!(
                    "allowed_annotations: unknown annotation {a:?}"
                )));
            }
        }
        Ok(cfg)
    }

    /// The VM of `sizing`, its sockets and logs in `dir` (its shared
    /// directory `dir/shared`), without a network.
    pub fn vm_spec(&self, sizing: &VmSizing, dir: &Path) -> VmSpec {
        VmSpec {
            kernel: self.kernel.clone(),
            vmlinux: Some(self.vmm_kernel.clone()).filter(|k| k.exists()),
            initramfs: self.initramfs.clone(),
            vcpus: sizing.vcpus,
            memory_mib: sizing.memory_mib,
            kernel_params: sizing.kernel_params.clone(),
            dir: dir.to_owned(),
            vsock: VmSpec::vsock_in(dir),
            shared_dir: dir.join("shared"),
            net: Vec::new(),
            netns: None,
            cpuid_hide: self.cpuid_hide.clone(),
            owner: None,
        }
    }

    /// The VM for a pod with `annotations`.
    pub fn vm_sizing(
        &self,
        annotations: &HashMap<String, String>,
    ) -> Result<VmSizing, ConfigError> {
        let bad = |key: &str, reason: String| ConfigError::Annotation {
            key: key.to_string(),
            reason,
        };
        let mut sizing = VmSizing {
            vcpus: self.default_vcpus,
            memory_mib: self.default_memory_mib,
            kernel_params: self.kernel_params.clone(),
            hypervisor: self.hypervisor,
        };

        // Kubernetes limits add to the guest's own share (Kata's model).
        let quota =
            parse_num::<i64>(annotations, CRI_CPU_QUOTA).map_err(|r| bad(CRI_CPU_QUOTA, r))?;
        let period =
            parse_num::<u64>(annotations, CRI_CPU_PERIOD).map_err(|r| bad(CRI_CPU_PERIOD, r))?;
        if let (Some(q), Some(p)) = (quota, period) {
            if let (Ok(q), true) = (u64::try_from(q), p > 0) {
                // Saturating: an absurd quota fails the range check below.
                let more = u32::try_from(q.div_ceil(p)).unwrap_or(u32::MAX);
                sizing.vcpus = sizing.vcpus.saturating_add(more);
            }
        }
        if let Some(bytes) =
            parse_num::<u64>(annotations, CRI_MEMORY).map_err(|r| bad(CRI_MEMORY, r))?
        {
            let more = u32::try_from(bytes.div_ceil(1 << 20)).unwrap_or(u32::MAX);
            sizing.memory_mib = sizing.memory_mib.saturating_add(more);
        }

        let mut keys: Vec<&String> = annotations
            .keys()
            .filter(|k| k.starts_with(annotations::PREFIX))
            .collect();
        keys.sort();
        for key in keys {
            let value = &annotations[key];
            if !self.allowed_annotations.iter().any(|a| a == key) {
                return Err(bad(
                    key,
                    "not allowed by this node's podvisor config (allowed_annotations)".into(),
                ));
            }
            match key.as_str() {
                ANNOTATION_VCPUS => {
                    let n: u32 = value
                        .parse()
                        .map_err(|_| bad(key, format!("{value:?} is not a number")))?;
                    sizing.vcpus = n;
                }
                ANNOTATION_MEMORY => {
                    let n: u32 = value
                        .parse()
                        .map_err(|_| bad(key, format!("{value:?} is not a number")))?;
                    sizing.memory_mib = n;
                }
                ANNOTATION_KERNEL_PARAMS => {
                    if value.chars().any(|c| c.is_control()) {
                        return Err(bad(key, "control characters are not allowed".into()));
                    }
                    if !sizing.kernel_params.is_empty() {
                        sizing.kernel_params.push(' ');
                    }
                    sizing.kernel_params.push_str(value);
                }
                ANNOTATION_HYPERVISOR => {
                    sizing.hypervisor = value.parse().map_err(|e| bad(key, e))?;
                }
                _ => return Err(bad(key, "unknown podvisor annotation".into())),
            }
        }
        if sizing.vcpus == 0 || sizing.vcpus > self.max_vcpus {
            return Err(bad(
                ANNOTATION_VCPUS,
                format!("{} vCPUs is outside 1..={}", sizing.vcpus, self.max_vcpus),
            ));
        }
        if sizing.memory_mib < MIN_MEMORY_MIB || sizing.memory_mib > self.max_memory_mib {
            return Err(bad(
                ANNOTATION_MEMORY,
                format!(
                    "{} MiB is outside {MIN_MEMORY_MIB}..={} MiB",
                    sizing.memory_mib, self.max_memory_mib
                ),
            ));
        }
        Ok(sizing)
    }
}

fn parse_num<T: std::str::FromStr>(
    annotations: &HashMap<String, String>,
    key: &str,
) -> Result<Option<T>, String> {
    match annotations.get(key) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| format!("{v:?} is not a number")),
    }
}

/// One VM's size and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSizing {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel_params: String,
    pub hypervisor: HypervisorKind,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::parse(Path::new("test.toml"), text).unwrap()
    }

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_file_means_defaults() {
        let c = cfg("");
        assert_eq!(c.default_vcpus, 1);
        assert_eq!(c.hypervisor, HypervisorKind::Auto);
    }

    /// The example config shipped for `make install` states the defaults.
    #[test]
    fn shipped_config_is_the_defaults() {
        let shipped = cfg(include_str!("../config.toml"));
        let d = Config::default();
        assert_eq!(shipped.hypervisor, d.hypervisor);
        assert_eq!(
            (shipped.kernel, shipped.vmm_kernel, shipped.initramfs),
            (d.kernel, d.vmm_kernel, d.initramfs)
        );
        assert_eq!(
            (
                shipped.default_vcpus,
                shipped.default_memory_mib,
                shipped.max_vcpus,
                shipped.max_memory_mib
            ),
            (
                d.default_vcpus,
                d.default_memory_mib,
                d.max_vcpus,
                d.max_memory_mib
            )
        );
        assert_eq!(shipped.allowed_annotations, d.allowed_annotations);
        assert_eq!(shipped.paths.vhost_device_vsock, d.paths.vhost_device_vsock);
        assert_eq!(shipped.paths.virtiofsd, d.paths.virtiofsd);
        assert_eq!(shipped.paths.vmm, d.paths.vmm);
        assert_eq!(shipped.cpuid_hide, d.cpuid_hide);
        assert_eq!(
            (
                shipped.warm.templates,
                shipped.warm.template_dir,
                shipped.warm.max_templates,
                shipped.warm.pool_size,
                shipped.warm.pool_max_mib
            ),
            (
                d.warm.templates,
                d.warm.template_dir,
                d.warm.max_templates,
                d.warm.pool_size,
                d.warm.pool_max_mib
            )
        );
    }

    #[test]
    fn cpuid_filter_is_read_and_checked() {
        let c = cfg("[[cpuid_hide]]\nleaf = 7\nregister = \"ebx\"\nbits = 0x10000\n");
        assert_eq!(c.cpuid_hide.len(), 1);
        assert_eq!((c.cpuid_hide[0].leaf, c.cpuid_hide[0].bits), (7, 1 << 16));
        for (text, word) in [
            (
                "[[cpuid_hide]]\nleaf = 7\nregister = \"ebx\"\nbits = 0\n",
                "hides no bits",
            ),
            (
                "[[cpuid_hide]]\nleaf = 7\nregister = \"rip\"\nbits = 1\n",
                "rip",
            ),
            ("[[cpuid_hide]]\nleaf = 7\nregister = \"ebx\"\n", "bits"),
        ] {
            let e = Config::parse(Path::new("c.toml"), text).unwrap_err();
            assert!(e.to_string().contains(word), "{text}: {e}");
        }
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let e = Config::load(Some(Path::new("/nonexistent/podvisor.toml"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/podvisor.toml"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let e = Config::parse(Path::new("c.toml"), "vcpus = 2").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = Config::parse(Path::new("c.toml"), "hypervisor = \"xen\"").unwrap_err();
        assert!(e.to_string().contains("c.toml"), "{e}");
        let e = Config::parse(Path::new("c.toml"), "[warm]\nmax_templates = 0").unwrap_err();
        assert!(e.to_string().contains("max_templates"), "{e}");
        let e = Config::parse(Path::new("c.toml"), "[warm]\npool = 3").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = Config::parse(
            Path::new("c.toml"),
            "[warm]\ntemplates = false\npool_size = 2",
        )
        .unwrap_err();
        assert!(e.to_string().contains("pool_size"), "{e}");
        let e = Config::parse(Path::new("c.toml"), "default_memory_mib = 64").unwrap_err();
        assert!(e.to_string().contains("default_memory_mib 64"), "{e}");
        let e = Config::parse(
            Path::new("c.toml"),
            "allowed_annotations = [\"podvisor.io/x\"]",
        )
        .unwrap_err();
        assert!(e.to_string().contains("podvisor.io/x"), "{e}");
    }

    #[test]
    fn allowed_annotations_size_the_vm() {
        let c = cfg(
            r#"allowed_annotations = ["podvisor.io/vcpus", "podvisor.io/memory-mib", "podvisor.io/kernel-params"]
                      kernel_params = "quiet""#,
        );
        let s = c
            .vm_sizing(&ann(&[
                ("podvisor.io/vcpus", "2"),
                ("podvisor.io/memory-mib", "1024"),
                ("podvisor.io/kernel-params", "loglevel=7"),
            ]))
            .unwrap();
        assert_eq!((s.vcpus, s.memory_mib), (2, 1024));
        assert_eq!(s.kernel_params, "quiet loglevel=7");
    }

    #[test]
    fn annotation_not_allowed_fails() {
        let c = cfg("");
        let e = c
            .vm_sizing(&ann(&[("podvisor.io/vcpus", "2")]))
            .unwrap_err();
        assert!(
            e.to_string().contains("podvisor.io/vcpus: not allowed"),
            "{e}"
        );
        // Other annotations are not ours to judge.
        assert!(c.vm_sizing(&ann(&[("example.com/x", "y")])).is_ok());
    }

    #[test]
    fn out_of_range_values_fail() {
        let c = cfg(
            r#"allowed_annotations = ["podvisor.io/vcpus", "podvisor.io/memory-mib", "podvisor.io/hypervisor"]
                      max_vcpus = 4"#,
        );
        for (k, v, msg) in [
            ("podvisor.io/vcpus", "0", "outside 1..=4"),
            ("podvisor.io/vcpus", "5", "outside 1..=4"),
            ("podvisor.io/vcpus", "two", "not a number"),
            ("podvisor.io/memory-mib", "64", "outside 128"),
            ("podvisor.io/hypervisor", "xen", "unknown hypervisor"),
        ] {
            let e = c.vm_sizing(&ann(&[(k, v)])).unwrap_err();
            assert!(e.to_string().contains(msg), "{k}={v}: {e}");
        }
    }

    #[test]
    fn cri_sizing_adds_to_the_defaults() {
        let c = cfg("");
        let s = c
            .vm_sizing(&ann(&[
                (CRI_CPU_QUOTA, "150000"),
                (CRI_CPU_PERIOD, "100000"),
                (CRI_MEMORY, "268435456"),
            ]))
            .unwrap();
        assert_eq!((s.vcpus, s.memory_mib), (3, 768));
    }
}
