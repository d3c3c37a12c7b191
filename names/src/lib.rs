//! The names every part of podvisor agrees on, declared once (Kata's
//! `kata-types` is the model): the shim, the agent, the hypervisor layer,
//! the controller and the node installer import them, so the controller
//! can never emit an annotation the shim rejects, nor the installer
//! register a runtime type the shim does not answer to. No dependencies.

/// containerd's runtime type for the shim (`runtime_type` in its config;
/// containerd derives the binary name from it).
pub const RUNTIME_TYPE: &str = "io.containerd.podvisor.v2";
/// The shim binary containerd runs for [`RUNTIME_TYPE`].
pub const SHIM_BINARY: &str = "containerd-shim-podvisor-v2";
/// The CRI runtime handler the node installer registers.
pub const HANDLER: &str = "podvisor";
/// The RuntimeClass pods name (`runtimeClassName`); its handler is
/// [`HANDLER`].
pub const RUNTIME_CLASS: &str = "podvisor";

/// Pod annotations the shim reads (when the node config allows each).
pub mod annotations {
    /// Every podvisor annotation starts so; the installer passes them
    /// through containerd as [`PASSED`].
    pub const PREFIX: &str = "podvisor.io/";
    /// containerd's `pod_annotations` pattern for them.
    pub const PASSED: &str = "podvisor.io/*";
    pub const VCPUS: &str = "podvisor.io/vcpus";
    pub const MEMORY_MIB: &str = "podvisor.io/memory-mib";
    pub const KERNEL_PARAMS: &str = "podvisor.io/kernel-params";
    pub const HYPERVISOR: &str = "podvisor.io/hypervisor";
    /// Every annotation above that sizes or shapes a VM.
    pub const ALL: [&str; 4] = [VCPUS, MEMORY_MIB, KERNEL_PARAMS, HYPERVISOR];
}

/// Where podvisor lives on a node.
pub mod paths {
    /// Binaries (`bin/`) and the guest image (`share/guest/`).
    pub const INSTALL_PREFIX: &str = "/opt/podvisor";
    pub const VMM: &str = "/opt/podvisor/bin/podvisor-vmm";
    pub const VHOST_DEVICE_VSOCK: &str = "/opt/podvisor/bin/vhost-device-vsock";
    /// The guest kernel QEMU boots (a bzImage).
    pub const GUEST_KERNEL: &str = "/opt/podvisor/share/guest/kernel";
    /// The same kernel uncompressed (ELF), which podvisor-vmm boots
    /// without running the bzImage's decompressor; only podvisor's own
    /// kernel has one.
    pub const GUEST_VMLINUX: &str = "/opt/podvisor/share/guest/vmlinux";
    pub const GUEST_INITRAMFS: &str = "/opt/podvisor/share/guest/initramfs";
    /// The files a node's install holds under INSTALL_PREFIX (`make
    /// install`'s layout, the node image's tree, what the installer copies).
    pub const INSTALLED_FILES: &[&str] = &[
        "bin/containerd-shim-podvisor-v2",
        "bin/podvisor-vmm",
        "bin/vhost-device-vsock",
        "share/guest/kernel",
        "share/guest/vmlinux",
        "share/guest/initramfs",
        "share/guest/manifest",
    ];
    /// The node's podvisor configuration.
    pub const NODE_CONFIG: &str = "/etc/podvisor/config.toml";
    /// Runtime state: one directory per sandbox, and host-wide caches.
    pub const STATE_ROOT: &str = "/run/podvisor";
    /// Warm-start templates: one directory per VM shape, kept across host
    /// restarts (a template is rebuilt only when its inputs change).
    pub const TEMPLATE_ROOT: &str = "/var/lib/podvisor/templates";
    /// The warm pool: VMs restored ahead, one directory per shape. Under
    /// STATE_ROOT (one filesystem: a VM handed out is renamed into its
    /// sandbox's directory); the leading `_` keeps it apart from sandbox
    /// ids, which containerd starts with a letter or digit.
    pub const POOL_ROOT: &str = "/run/podvisor/_pool";
    /// Leases of the ids VMs run as on the host, one file per id (the
    /// hypervisor layer's jail). Under STATE_ROOT: gone with a host
    /// restart, as every VM is.
    pub const JAIL_IDS: &str = "/run/podvisor/_jail-ids";
}

/// virtio-fs tag of a sandbox's shared directory (the hypervisor layer
/// exports it, the agent mounts it).
pub const SHARED_FS_TAG: &str = "podvisor";

/// Warm start: the kernel parameter that boots a guest as a template (the
/// kernel hands it to the agent as an environment variable), and the
/// console line the agent writes once it serves and is idle, which tells
/// the template builder to save the VM.
pub mod template {
    pub const ENV: &str = "PODVISOR_TEMPLATE";
    pub const KERNEL_PARAM: &str = "PODVISOR_TEMPLATE=1";
    pub const READY_LINE: &str = "podvisor-agent: template ready to save";
}

/// The warm pool's files under `paths::POOL_ROOT` and the shim's
/// subcommand that keeps it (`containerd-shim-podvisor-v2 pool
/// fill|drain`), for the installer, tests and figures too.
pub mod pool {
    pub const SUBCOMMAND: &str = "pool";
    pub const FILL: &str = "fill";
    pub const DRAIN: &str = "drain";
    /// A pool VM's record, in its directory (`<shape>/<id>/`: a ready
    /// VM's is named by its id alone, one being restored or removed has a
    /// suffix after a `.`).
    pub const RECORD: &str = "pool.json";
    /// The fillers' output.
    pub const FILL_LOG: &str = "fill.log";
}

/// Smallest guest that boots the image and runs a container, MiB.
pub const MIN_GUEST_MEMORY_MIB: u32 = 128;

/// The exit status of every process of a pod whose VM ended under it (the
/// VM died, or the agent could not say how the process ended).
pub const VM_DIED_EXIT_STATUS: u8 = 255;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_agree_with_each_other() {
        // containerd runs containerd-shim-<name>-<version> for io.containerd.<name>.<version>.
        let parts: Vec<&str> = RUNTIME_TYPE.split('.').collect();
        assert_eq!(parts.len(), 4, "{RUNTIME_TYPE}");
        assert_eq!(
            SHIM_BINARY,
            format!("containerd-shim-{}-{}", parts[2], parts[3])
        );
        for a in annotations::ALL {
            assert!(a.starts_with(annotations::PREFIX), "{a}");
        }
        assert_eq!(annotations::PASSED, format!("{}*", annotations::PREFIX));
        for p in [
            paths::VMM,
            paths::VHOST_DEVICE_VSOCK,
            paths::GUEST_KERNEL,
            paths::GUEST_VMLINUX,
            paths::GUEST_INITRAMFS,
        ] {
            assert!(p.starts_with(paths::INSTALL_PREFIX), "{p}");
        }
    }
}
