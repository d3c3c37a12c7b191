//! The in-tree VMM backend: one `podvisor-vmm` process per VM, described
//! by a JSON config written next to the VM's other files (`vmm.json`),
//! with virtio-vsock served in the VMM itself (hybrid-vsock UDS) and
//! virtio-fs through virtiofsd.

use std::time::Duration;

use async_trait::async_trait;
use podvisor_names::SHARED_FS_TAG;
use podvisor_vmm_config::{FsConfig, NetConfig, VmConfig, VsockConfig};
use tokio::process::Command;

use crate::process::{place_vm, wait_for_socket};
use crate::{
    virtiofsd, Hypervisor, HypervisorError, Jail, Paths, RunningVm, VmSpec, GUEST_CID, GUEST_PARAMS,
};

/// How long the VMM may take to build the VM (it binds the vsock socket
/// when the VM is built, before any vCPU runs).
const VMM_READY: Duration = Duration::from_secs(10);

/// Kernel parameters for a podvisor guest on this VMM: the common ones,
/// reboot through the i8042 (which ends the VMM), no PS/2 probing beyond
/// what the VMM emulates.
const BASE_PARAMS: &str = "reboot=k i8042.noaux i8042.nomux i8042.dumbkbd";

#[derive(Debug)]
pub struct Vmm {
    paths: Paths,
    jail: Jail,
}

impl Vmm {
    pub fn new(paths: Paths, jail: Jail) -> Vmm {
        Vmm { paths, jail }
    }

    /// The VMM's config for `spec`, with virtiofsd at `fs_socket`.
    pub fn config(spec: &VmSpec, fs_socket: &std::path::Path) -> Result<VmConfig, HypervisorError> {
        let unavailable = |what: &str| HypervisorError::Unavailable(what.to_string());
        Ok(VmConfig {
            vcpus: u8::try_from(spec.vcpus)
                .map_err(|_| unavailable("more vCPUs than the VMM supports"))?,
            memory_mib: u64::from(spec.memory_mib),
            kernel: spec.vmlinux.clone().unwrap_or_else(|| spec.kernel.clone()),
            initramfs: Some(spec.initramfs.clone()),
            cmdline: format!("{GUEST_PARAMS} {BASE_PARAMS} {}", spec.kernel_params)
                .trim_end()
                .to_string(),
            console: Some(spec.console()),
            // The pod's VM ends when its guest powers off, or by SIGKILL
            // through its supervisor: nothing would use a control socket.
            control_socket: None,
            vsock: Some(VsockConfig {
                cid: GUEST_CID,
                uds: spec.vsock.clone(),
            }),
            fs: vec![FsConfig {
                socket: fs_socket.to_owned(),
                tag: SHARED_FS_TAG.to_string(),
            }],
            block: vec![],
            net: spec
                .net
                .iter()
                .map(|n| NetConfig {
                    tap: n.tap.clone(),
                    mac: Some(n.mac.clone()),
                })
                .collect(),
            rng: true,
            mmio_on_cmdline: false,
            cpuid_hide: spec.cpuid_hide.clone(),
            restore: None,
        })
    }
}

#[async_trait]
impl Hypervisor for Vmm {
    fn describe(&self) -> String {
        "vmm/kvm".into()
    }

    fn program(&self) -> &std::path::Path {
        &self.paths.vmm
    }

    async fn launch(&self, spec: &VmSpec) -> Result<RunningVm, HypervisorError> {
        let spec = &self.jail.prepare(spec)?;
        let (mut fs_helper, fs_sock) = virtiofsd::start(&self.paths, self.jail, spec).await?;
        let io = |what: String| move |source| HypervisorError::Io { what, source };
        let written = Self::config(spec, &fs_sock).and_then(|c| {
            c.validate()
                .map_err(|e| HypervisorError::Unavailable(e.to_string()))?;
            let json = serde_json::to_vec_pretty(&c)
                .map_err(|e| HypervisorError::Unavailable(e.to_string()))?;
            // Read by the VMM: in its own directory, made anew (no link
            // left there is followed).
            let path = spec.vm_dir().join("vmm.json");
            let writing = io(format!("writing {}", path.display()));
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(writing(e)),
                _ => {}
            }
            std::fs::File::options()
                .write(true)
                .create_new(true)
                .open(&path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, &json))
                .map_err(writing)?;
            Ok(path)
        });
        let config = match written {
            Ok(p) => p,
            Err(e) => {
                fs_helper.kill().await;
                return Err(e);
            }
        };
        let log = spec.dir.join("vmm.log");
        let mut cmd = Command::new(&self.paths.vmm);
        if !self.jail.enabled {
            cmd.arg("--no-seccomp");
        }
        cmd.arg("--config").arg(&config);
        let started =
            match place_vm(&mut cmd, spec).and_then(|()| self.jail.confine(&mut cmd, spec)) {
                Ok(confined) => confined.spawn("podvisor-vmm", &mut cmd, &log).await,
                Err(e) => Err(e),
            };
        let vm = match started {
            Ok(vm) => vm,
            Err(e) => {
                fs_helper.kill().await;
                return Err(e);
            }
        };
        let mut vm = vm;
        if let Err(e) = wait_for_socket(&spec.vsock, &vm, &log, VMM_READY).await {
            vm.kill().await;
            fs_helper.kill().await;
            return Err(e);
        }
        Ok(RunningVm {
            vm,
            helpers: vec![fs_helper],
            vsock: spec.vsock.clone(),
            describe: self.describe(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_carries_the_spec() {
        let spec = VmSpec {
            kernel: "/k".into(),
            vmlinux: None,
            initramfs: "/i".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel_params: "foo=1".into(),
            dir: "/run/podvisor/x".into(),
            vsock: VmSpec::vsock_in(std::path::Path::new("/run/podvisor/x")),
            shared_dir: "/run/podvisor/x/shared".into(),
            net: vec![crate::NetDevice {
                tap: "tap0".into(),
                mac: "02:00:00:00:00:07".into(),
            }],
            netns: None,
            cpuid_hide: vec![],
            owner: None,
        };
        let c = Vmm::config(&spec, std::path::Path::new("/run/podvisor/x/virtiofs.sock")).unwrap();
        c.validate().unwrap();
        assert_eq!((c.vcpus, c.memory_mib), (2, 512));
        assert_eq!(c.kernel, spec.kernel, "no vmlinux: the bzImage");
        let elf = VmSpec {
            vmlinux: Some("/vmlinux".into()),
            ..spec.clone()
        };
        let c2 = Vmm::config(&elf, std::path::Path::new("/s")).unwrap();
        assert_eq!(c2.kernel, std::path::Path::new("/vmlinux"));
        assert!(c.cmdline.starts_with(GUEST_PARAMS) && c.cmdline.ends_with(" foo=1"));
        assert!(c.cmdline.contains(" reboot=k "));
        assert_eq!(c.vsock.as_ref().unwrap().uds, spec.vsock);
        assert_eq!(c.fs[0].tag, "podvisor");
        assert_eq!(c.net[0].tap, "tap0");
        assert_eq!(c.net[0].mac.as_deref(), Some("02:00:00:00:00:07"));
        assert_eq!(
            c.console.as_deref(),
            Some(std::path::Path::new("/run/podvisor/x/vm/console.log"))
        );
        let too_many = VmSpec {
            vcpus: 1000,
            ..spec
        };
        assert!(Vmm::config(&too_many, std::path::Path::new("/s")).is_err());
    }
}
