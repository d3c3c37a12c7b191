//! The QEMU backend: `qemu-system-x86_64 -M q35` with guest RAM in a
//! shared memfd, vsock through `vhost-user-vsock-pci` served by
//! `vhost-device-vsock` (whose UDS speaks the same hybrid-vsock protocol as
//! the in-tree VMM), and the shared directory through `vhost-user-fs-pci`
//! served by virtiofsd. KVM where the probe finds it fast, TCG elsewhere.
//!
//! Warm start: a template VM has empty PCIe root ports, a vmgenid device
//! and its RAM in a shared file; it is saved by migrating to a file with
//! `x-ignore-shared` (RAM stays in the file). A clone gets the template's
//! RAM copied into its own memfd, loads the state paused, has its
//! vhost-user devices and NICs hot-plugged into the root ports (QEMU 7.2
//! cannot migrate vhost-user devices) and resumes; its new vmgenid tells
//! the guest kernel to reseed.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use podvisor_names::{template as names_template, SHARED_FS_TAG};
use serde_json::json;
use tokio::process::Command;

use crate::process::{place_vm, wait_for_socket, wait_until, Supervised, HELPER_READY};
use crate::qmp::Qmp;
use crate::template::{self, Template};
use crate::{
    jail, virtiofsd, Hypervisor, HypervisorError, Jail, Paths, RunningVm, VmSpec, GUEST_CID,
    GUEST_PARAMS,
};

/// TCG translation cache per VM, MiB.
const TCG_TB_MIB: u32 = 64;
/// PCIe root ports a template keeps free for a clone's devices: vsock,
/// virtio-fs, and the NICs.
const HOTPLUG_PORTS: usize = 4;
/// Slots of those ports taken before the NICs.
const FIRST_NIC_PORT: usize = 2;
/// How long a template VM may take to boot to its agent.
const TEMPLATE_BOOT: Duration = Duration::from_secs(120);
/// How long saving or loading a template's state may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

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
    jail: Jail,
}

/// The helpers a VM's vhost-user devices are served by, and their sockets.
struct Helpers {
    vsock: Supervised,
    fs: Supervised,
    vsock_sock: std::path::PathBuf,
    fs_sock: std::path::PathBuf,
}

impl Helpers {
    async fn kill(mut self) {
        self.vsock.kill().await;
        self.fs.kill().await;
    }
}

impl Qemu {
    pub fn new(paths: Paths, accel: Accel, jail: Jail) -> Qemu {
        Qemu { paths, accel, jail }
    }

    /// Starts vhost-device-vsock and virtiofsd for `spec`; returns once
    /// both sockets exist.
    async fn helpers(&self, spec: &VmSpec) -> Result<Helpers, HypervisorError> {
        let vsock_sock = spec.vm_dir().join("vhost-vsock.sock");
        let vsock_log = spec.dir.join("vhost-device-vsock.log");
        // A VM that came before in this directory (a clone that did not
        // come up) may have left its sockets: a stale one would pass for
        // the new helper's.
        for stale in [&vsock_sock, &spec.vsock] {
            let _ = std::fs::remove_file(stale);
        }
        let mut cmd = Command::new(&self.paths.vhost_device_vsock);
        cmd.arg("--vm").arg(format!(
            "guest-cid={GUEST_CID},socket={},uds-path={}",
            vsock_sock.display(),
            spec.vsock.display()
        ));
        let mut vsock = self
            .jail
            .confine_vsock_helper(&mut cmd, spec)?
            .spawn("vhost-device-vsock", &mut cmd, &vsock_log)
            .await?;
        let (mut fs, fs_sock) = match virtiofsd::start(&self.paths, self.jail, spec).await {
            Ok(fs) => fs,
            Err(e) => {
                vsock.kill().await;
                return Err(e);
            }
        };
        if let Err(e) = wait_for_socket(&vsock_sock, &vsock, &vsock_log, HELPER_READY).await {
            vsock.kill().await;
            fs.kill().await;
            return Err(e);
        }
        Ok(Helpers {
            vsock,
            fs,
            vsock_sock,
            fs_sock,
        })
    }

    /// The machine every VM of `spec` gets: board, accelerator, CPU,
    /// memory from `memory_backend`, console, kernel; no devices.
    fn machine(&self, spec: &VmSpec, memory_backend: &str, extra_params: &str) -> Command {
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
            .args(if self.jail.enabled {
                &["-sandbox", jail::QEMU_SANDBOX][..]
            } else {
                &[]
            })
            .args([
                "-object",
                &format!("{memory_backend},id=mem,size={mem}M,share=on"),
            ])
            .args(["-numa", "node,memdev=mem"])
            .args(["-serial", &format!("file:{}", spec.console().display())])
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&spec.initramfs)
            .arg("-append")
            .arg(
                format!("{GUEST_PARAMS} {} {extra_params}", spec.kernel_params)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        qemu
    }

    /// What a template and its clones add to the machine: the root ports
    /// the clone's devices are plugged into, vmgenid, the monitor.
    fn warm_devices(qemu: &mut Command, spec: &VmSpec) {
        for i in 0..HOTPLUG_PORTS {
            qemu.args([
                "-device",
                &format!(
                    "pcie-root-port,id=rp{i},bus=pcie.0,chassis={},addr=0x{:x}",
                    i + 1,
                    i + 8
                ),
            ]);
        }
        qemu.args(["-device", "vmgenid,guid=auto"]).args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp_socket(spec).display()),
        ]);
    }

    async fn spawn_vm(
        &self,
        qemu: &mut Command,
        spec: &VmSpec,
        helpers: Helpers,
    ) -> Result<(Supervised, Helpers), HypervisorError> {
        let started = match place_vm(qemu, spec).and_then(|()| self.jail.confine(qemu, spec)) {
            Ok(confined) => {
                confined
                    .spawn("qemu", qemu, &spec.dir.join("qemu.log"))
                    .await
            }
            Err(e) => Err(e),
        };
        match started {
            Ok(vm) => Ok((vm, helpers)),
            Err(e) => {
                helpers.kill().await;
                Err(e)
            }
        }
    }

    fn running(&self, spec: &VmSpec, vm: Supervised, helpers: Helpers) -> RunningVm {
        RunningVm {
            vm,
            helpers: vec![helpers.vsock, helpers.fs],
            vsock: spec.vsock.clone(),
            describe: self.describe(),
        }
    }

    /// Whether a clone has root ports for `spec`'s NICs.
    fn check_nics(spec: &VmSpec) -> Result<(), HypervisorError> {
        if spec.net.len() > HOTPLUG_PORTS - FIRST_NIC_PORT {
            return Err(HypervisorError::Unavailable(format!(
                "{} NICs; a template has ports for {}",
                spec.net.len(),
                HOTPLUG_PORTS - FIRST_NIC_PORT
            )));
        }
        Ok(())
    }

    /// Hot-plugs a clone's devices (it is paused, its state loaded) and
    /// resumes it.
    async fn plug_and_resume(
        qmp: &mut Qmp,
        spec: &VmSpec,
        helpers: &Helpers,
    ) -> Result<(), HypervisorError> {
        for (id, path) in [("vsock", &helpers.vsock_sock), ("fs", &helpers.fs_sock)] {
            qmp.execute(
                "chardev-add",
                json!({"id": id, "backend": {"type": "socket", "data": {
                    "addr": {"type": "unix", "data": {"path": path}}, "server": false}}}),
            )
            .await?;
        }
        qmp.execute(
            "device_add",
            json!({"driver": "vhost-user-vsock-pci", "id": "vsock0", "chardev": "vsock", "bus": "rp0"}),
        )
        .await?;
        qmp.execute(
            "device_add",
            json!({"driver": "vhost-user-fs-pci", "id": "fs0", "chardev": "fs",
                   "tag": SHARED_FS_TAG, "bus": "rp1"}),
        )
        .await?;
        Self::plug_nics(qmp, spec).await?;
        qmp.execute("cont", json!({})).await?;
        Ok(())
    }

    /// Hot-plugs `spec`'s NICs, each on its tap opened here (in the pod's
    /// network namespace) and handed to QEMU, which may run outside it (a
    /// pool VM).
    async fn plug_nics(qmp: &mut Qmp, spec: &VmSpec) -> Result<(), HypervisorError> {
        for (i, n) in spec.net.iter().enumerate() {
            let id = format!("net{i}");
            let tap = crate::tap::open(spec.netns.as_deref(), &n.tap)?;
            qmp.getfd(&id, tap.as_fd()).await?;
            qmp.execute(
                "netdev_add",
                json!({"type": "tap", "id": id, "fd": id, "vhost": false}),
            )
            .await?;
            qmp.execute(
                "device_add",
                json!({"driver": "virtio-net-pci", "id": format!("nic{i}"), "netdev": id,
                       "mac": n.mac, "bus": format!("rp{}", FIRST_NIC_PORT + i)}),
            )
            .await?;
        }
        Ok(())
    }
}

/// Runs `command` ("migrate" or "migrate-incoming") to completion on
/// `file`, a template's device state, with `x-ignore-shared` (RAM stays
/// in its shared file). The file goes over QMP as a descriptor: the
/// sandboxed QEMU may not spawn a helper to read or write it.
async fn migrate(qmp: &mut Qmp, command: &str, file: std::fs::File) -> Result<(), HypervisorError> {
    qmp.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
    )
    .await?;
    qmp.getfd("state", file.as_fd()).await?;
    drop(file);
    qmp.execute(command, json!({"uri": "fd:state"})).await?;
    qmp.wait_migration(MIGRATION_TIMEOUT).await
}

/// QEMU's monitor socket (a template's, a clone's).
fn qmp_socket(spec: &VmSpec) -> PathBuf {
    spec.vm_dir().join("qmp.sock")
}

#[async_trait]
impl Hypervisor for Qemu {
    fn describe(&self) -> String {
        format!("qemu/{}", self.accel.name())
    }

    fn program(&self) -> &Path {
        &self.paths.qemu
    }

    async fn launch(&self, spec: &VmSpec) -> Result<RunningVm, HypervisorError> {
        let spec = &self.jail.prepare(spec)?;
        if !spec.cpuid_hide.is_empty() {
            tracing::warn!(
                "cpuid_hide is applied by the in-tree VMM only; this VM runs on QEMU and sees KVM's (or TCG's) CPUID"
            );
        }
        let helpers = self.helpers(spec).await?;
        let mut qemu = self.machine(spec, "memory-backend-memfd", "");
        qemu.args([
            "-chardev",
            &format!("socket,id=vsock,path={}", helpers.vsock_sock.display()),
        ])
        .args(["-device", "vhost-user-vsock-pci,chardev=vsock"])
        .args([
            "-chardev",
            &format!("socket,id=fs,path={}", helpers.fs_sock.display()),
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
        let (vm, helpers) = self.spawn_vm(&mut qemu, spec, helpers).await?;
        Ok(self.running(spec, vm, helpers))
    }

    async fn save_template(&self, spec: &VmSpec) -> Result<(), HypervisorError> {
        let spec = &self.jail.prepare(spec)?;
        let d = &spec.dir;
        let memory = spec.vm_dir().join(template::MEMORY);
        let mut qemu = self.machine(
            spec,
            &format!("memory-backend-file,mem-path={}", memory.display()),
            names_template::KERNEL_PARAM,
        );
        Self::warm_devices(&mut qemu, spec);
        place_vm(&mut qemu, spec)?;
        let mut vm = self
            .jail
            .confine(&mut qemu, spec)?
            .spawn("qemu", &mut qemu, &d.join("qemu.log"))
            .await?;
        let saved = async {
            let console = spec.console();
            wait_until(
                || {
                    std::fs::read_to_string(&console)
                        .is_ok_and(|t| t.contains(names_template::READY_LINE))
                },
                &console,
                &vm,
                &console,
                TEMPLATE_BOOT,
            )
            .await?;
            let mut qmp = Qmp::connect(&qmp_socket(spec), HELPER_READY).await?;
            qmp.execute("stop", json!({})).await?;
            let state = d.join(template::STATE);
            let out = std::fs::File::create(&state).map_err(|source| HypervisorError::Io {
                what: format!("creating {}", state.display()),
                source,
            })?;
            migrate(&mut qmp, "migrate", out).await?;
            let _ = qmp.execute("quit", json!({})).await;
            Ok::<_, HypervisorError>(())
        }
        .await;
        if tokio::time::timeout(Duration::from_secs(5), vm.wait())
            .await
            .is_err()
        {
            vm.kill().await;
        }
        saved
            .and_then(|()| template::keep_memory(&memory, &d.join(template::MEMORY)))
            .map_err(|e| HypervisorError::Template {
                dir: d.clone(),
                reason: format!("saving: {e}; logs:\n{}", crate::log_tails(d, 20)),
            })
    }

    fn has_warm_start(&self) -> bool {
        true
    }

    async fn adopt(
        &self,
        spec: &VmSpec,
        mut processes: Vec<Supervised>,
    ) -> Result<RunningVm, HypervisorError> {
        if processes.is_empty() {
            return Err(HypervisorError::Unavailable(
                "no VM process to adopt".into(),
            ));
        }
        let mut vm = RunningVm {
            vm: processes.remove(0),
            helpers: processes,
            vsock: spec.vsock.clone(),
            describe: self.describe(),
        };
        let plugged = async {
            Self::check_nics(spec)?;
            let mut qmp = Qmp::connect(&qmp_socket(spec), HELPER_READY).await?;
            Self::plug_nics(&mut qmp, spec).await
        }
        .await;
        match plugged {
            Ok(()) => Ok(vm),
            Err(e) => {
                vm.stop(Duration::ZERO).await;
                Err(e)
            }
        }
    }

    async fn restore(
        &self,
        spec: &VmSpec,
        template: &Template,
    ) -> Result<RunningVm, HypervisorError> {
        Self::check_nics(spec)?;
        let spec = &self.jail.prepare(spec)?;
        let state = template::read_state(template)?;
        let memfd = template::clone_memory(template)?;
        let state_file = spec.dir.join("template-state");
        std::fs::write(&state_file, &state).map_err(|source| HypervisorError::Io {
            what: format!("writing {}", state_file.display()),
            source,
        })?;
        let helpers = self.helpers(spec).await?;
        let fd = memfd.as_raw_fd();
        let mut qemu = self.machine(
            spec,
            &format!("memory-backend-file,mem-path=/proc/self/fd/{fd}"),
            names_template::KERNEL_PARAM,
        );
        Self::warm_devices(&mut qemu, spec);
        qemu.args(["-S", "-incoming", "defer"]);
        // SAFETY: fcntl on a descriptor the closure keeps open.
        unsafe {
            qemu.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (mut vm, helpers) = self.spawn_vm(&mut qemu, spec, helpers).await?;
        drop(memfd);
        let resumed = async {
            let mut qmp = Qmp::connect(&qmp_socket(spec), HELPER_READY).await?;
            let state = std::fs::File::open(&state_file).map_err(|source| HypervisorError::Io {
                what: format!("opening {}", state_file.display()),
                source,
            })?;
            migrate(&mut qmp, "migrate-incoming", state).await?;
            Self::plug_and_resume(&mut qmp, spec, &helpers).await
        }
        .await;
        let _ = std::fs::remove_file(&state_file);
        match resumed {
            Ok(()) => Ok(self.running(spec, vm, helpers)),
            Err(e) => {
                vm.kill().await;
                helpers.kill().await;
                // Not the template's fault (its checksums held): kept.
                Err(HypervisorError::Unavailable(format!(
                    "restoring a clone of {}: {e}; logs:\n{}",
                    template.dir.display(),
                    crate::log_tails(&spec.dir, 20)
                )))
            }
        }
    }
}
