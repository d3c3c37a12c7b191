//! The QEMU backend: `qemu-system-x86_64 -M q35` with guest RAM in a
//! shared memfd, vsock through `vhost-user-vsock-pci` served by
//! `vhost-device-vsock` (whose UDS speaks the same hybrid-vsock protocol as
//! the in-tree VMM), and the shared directory through `vhost-user-fs-pci`
//! served by virtiofsd. KVM where the probe finds it fast, TCG elsewhere.

use async_trait::async_trait;
use tokio::process::Command;

use podvisor_names::SHARED_FS_TAG;

use crate::process::{run_in_netns, wait_for_socket, Supervised, HELPER_READY};
use crate::{
    virtiofsd, Hypervisor, HypervisorError, Paths, RunningVm, VmSpec, GUEST_CID, GUEST_PARAMS,
};

/// TCG translation cache per VM, MiB.
const TCG_TB_MIB: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

#[derive(Debug)]
pub struct Qemu {
    paths: Paths,
    accel: Accel,
}

impl Qemu {
    pub fn new(paths: Paths, accel: Accel) -> Qemu {
        Qemu { paths, accel }
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    fn describe(&self) -> String {
        format!("qemu/{}", self.accel.name())
    }

    async fn launch(&self, spec: &VmSpec) -> Result<RunningVm, HypervisorError> {
        if !spec.cpuid_hide.is_empty() {
            tracing::warn!(
                "cpuid_hide is applied by the in-tree VMM only; this VM runs on QEMU and sees KVM's (or TCG's) CPUID"
            );
        }
        let d = &spec.dir;
        let vhost_sock = d.join("vhost-vsock.sock");
        let vsock = spec.vsock.clone();

        let vsock_log = d.join("vhost-device-vsock.log");
        let mut vsock_helper = Supervised::spawn(
            "vhost-device-vsock",
            Command::new(&self.paths.vhost_device_vsock)
                .arg("--vm")
                .arg(format!(
                    "guest-cid={GUEST_CID},socket={},uds-path={}",
                    vhost_sock.display(),
                    vsock.display()
                )),
            &vsock_log,
        )?;
        let (mut fs_helper, fs_sock) = match virtiofsd::start(&self.paths, spec).await {
            Ok(fs) => fs,
            Err(e) => {
                vsock_helper.kill().await;
                return Err(e);
            }
        };
        if let Err(e) = wait_for_socket(&vhost_sock, &vsock_helper, &vsock_log, HELPER_READY).await
        {
            vsock_helper.kill().await;
            fs_helper.kill().await;
            return Err(e);
        }

        let mem = spec.memory_mib;
        let mut qemu = Command::new(&self.paths.qemu);
        // TCG's translation cache defaults to 1 GiB of host memory per VM;
        // a guest running containers needs a fraction of it.
        let accel = match self.accel {
            Accel::Kvm => "kvm".to_string(),
            Accel::Tcg => format!("tcg,tb-size={TCG_TB_MIB}"),
        };
        qemu.args(["-M", "q35", "-accel", &accel])
            .args([
                "-cpu",
                if self.accel == Accel::Kvm {
                    "host"
                } else {
                    "max"
                },
            ])
            .args(["-m", &format!("{mem}M"), "-smp", &spec.vcpus.to_string()])
            .args(["-nodefaults", "-nographic", "-no-reboot"])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            ])
            .args(["-numa", "node,memdev=mem"])
            .args([
                "-chardev",
                &format!("socket,id=vsock,path={}", vhost_sock.display()),
            ])
            .args(["-device", "vhost-user-vsock-pci,chardev=vsock"])
            .args([
                "-chardev",
                &format!("socket,id=fs,path={}", fs_sock.display()),
            ])
            .args([
                "-device",
                &format!("vhost-user-fs-pci,chardev=fs,tag={SHARED_FS_TAG}"),
            ]);
        for (i, n) in spec.net.iter().enumerate() {
            qemu.args([
                "-netdev",
                &format!("tap,id=net{i},ifname={},script=no,downscript=no", n.tap),
            ])
            .args([
                "-device",
                &format!("virtio-net-pci,netdev=net{i},mac={}", n.mac),
            ]);
        }
        qemu.args([
            "-serial",
            &format!("file:{}", d.join("console.log").display()),
        ])
        .arg("-kernel")
        .arg(&spec.kernel)
        .arg("-initrd")
        .arg(&spec.initramfs)
        .arg("-append")
        .arg(format!("{GUEST_PARAMS} {}", spec.kernel_params).trim_end());
        let vm = match run_in_netns(&mut qemu, spec.netns.as_deref())
            .and_then(|()| Supervised::spawn("qemu", &mut qemu, &d.join("qemu.log")))
        {
            Ok(vm) => vm,
            Err(e) => {
                vsock_helper.kill().await;
                fs_helper.kill().await;
                return Err(e);
            }
        };
        Ok(RunningVm {
            vm,
            helpers: vec![vsock_helper, fs_helper],
            vsock,
            describe: self.describe(),
        })
    }
}
