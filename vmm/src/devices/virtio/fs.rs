//! virtio-fs as a vhost-user frontend: the queues are served by an
//! external virtiofsd, which maps guest RAM (a memfd) and is given the
//! queues' addresses, their kick eventfds (KVM ioeventfds, so a guest
//! notification goes straight to virtiofsd) and a call eventfd per queue.
//! We relay calls into the transport's interrupt, because virtio-mmio's
//! interrupt status register must say why the interrupt came.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{Active, DeviceError, VirtioDevice, F_VERSION_1, TYPE_FS};
use podvisor_vmm_config::limits::FS_TAG_MAX;

const QUEUE_SIZE: u16 = 1024;
/// One high-priority queue and one request queue.
const NUM_QUEUES: usize = 2;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;

pub struct Fs {
    frontend: Frontend,
    tag: String,
    backend_features: u64,
    protocol: bool,
    calls: Vec<EventFd>,
    active: Option<Active>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("tag", &self.tag)
            .field("backend_features", &self.backend_features)
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

fn backend(e: vhost::Error) -> DeviceError {
    DeviceError::Backend(format!("virtiofsd: {e}"))
}

impl Fs {
    /// Connects to virtiofsd at `socket` and learns what it supports.
    pub fn connect(socket: &Path, tag: &str) -> Result<Fs, DeviceError> {
        if tag.is_empty() || tag.len() > FS_TAG_MAX {
            return Err(DeviceError::Backend(format!(
                "fs tag {tag:?} must be 1..={FS_TAG_MAX} bytes"
            )));
        }
        let mut frontend = Frontend::connect(socket, NUM_QUEUES as u64).map_err(backend)?;
        frontend.set_owner().map_err(backend)?;
        let backend_features = frontend.get_features().map_err(backend)?;
        if backend_features & F_VERSION_1 == 0 {
            return Err(DeviceError::Backend(
                "virtiofsd does not offer VIRTIO_F_VERSION_1".into(),
            ));
        }
        let protocol = backend_features & F_PROTOCOL_FEATURES != 0;
        if protocol {
            let offered = frontend.get_protocol_features().map_err(backend)?;
            frontend
                .set_protocol_features(offered & VhostUserProtocolFeatures::MQ)
                .map_err(backend)?;
        }
        let calls = (0..NUM_QUEUES)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<_, _>>()?;
        Ok(Fs {
            frontend,
            tag: tag.to_owned(),
            backend_features,
            protocol,
            calls,
            active: None,
        })
    }

    fn host_addr(a: &Active, gpa: u64) -> Result<u64, DeviceError> {
        a.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(DeviceError::Memory)
    }

    fn start(&mut self, a: &Active) -> Result<(), DeviceError> {
        self.frontend
            .set_features(a.features | (self.backend_features & F_PROTOCOL_FEATURES))
            .map_err(backend)?;
        let regions = a
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        self.frontend.set_mem_table(&regions).map_err(backend)?;
        for (i, q) in a.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let config = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: Self::host_addr(a, q.desc_table())?,
                used_ring_addr: Self::host_addr(a, q.used_ring())?,
                avail_ring_addr: Self::host_addr(a, q.avail_ring())?,
                log_addr: None,
            };
            self.frontend.set_vring_num(i, q.size()).map_err(backend)?;
            self.frontend.set_vring_addr(i, &config).map_err(backend)?;
            self.frontend.set_vring_base(i, 0).map_err(backend)?;
            self.frontend
                .set_vring_call(i, &self.calls[i])
                .map_err(backend)?;
            self.frontend
                .set_vring_kick(i, &a.kicks[i])
                .map_err(backend)?;
            if self.protocol {
                self.frontend.set_vring_enable(i, true).map_err(backend)?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Fs {
    fn active(&self) -> Option<&Active> {
        self.active.as_ref()
    }
    fn device_type(&self) -> u32 {
        TYPE_FS
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; NUM_QUEUES]
    }
    fn features(&self) -> u64 {
        self.backend_features & !F_PROTOCOL_FEATURES
    }
    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; FS_TAG_MAX + 4];
        c[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        c[FS_TAG_MAX..].copy_from_slice(&1u32.to_le_bytes());
        c
    }
    fn activate(&mut self, active: Active) -> Result<(), DeviceError> {
        let r = self.start(&active);
        self.active = Some(active);
        r
    }
    fn reset(&mut self) {
        if let Some(a) = self.active.take() {
            // GET_VRING_BASE stops the backend's ring.
            for (i, q) in a.queues.iter().enumerate() {
                if q.ready() {
                    if let Err(e) = self.frontend.get_vring_base(i) {
                        tracing::warn!("virtiofsd: stopping queue {i}: {e}");
                    }
                }
            }
        }
    }
    fn queue_event(&mut self, _index: usize) -> Result<(), DeviceError> {
        Ok(())
    }
    fn snapshot_blocker(&self) -> Option<String> {
        Some(
            "virtio-fs keeps its state in its vhost-user backend (virtiofsd), which cannot save it"
                .into(),
        )
    }
    fn handles_kicks(&self) -> bool {
        false
    }
    fn fds(&self) -> Vec<RawFd> {
        self.calls.iter().map(|c| c.as_raw_fd()).collect()
    }
    fn fd_event(&mut self, index: usize) -> Result<(), DeviceError> {
        if let Some(c) = self.calls.get(index) {
            let _ = c.read();
        }
        if let Some(a) = &self.active {
            a.irq.signal_used();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::*;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";

    struct Daemon(std::process::Child);
    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn virtiofsd(dir: &Path) -> (Daemon, std::path::PathBuf) {
        let shared = dir.join("shared");
        std::fs::create_dir(&shared).unwrap();
        let sock = dir.join("fs.sock");
        let child = Command::new(VIRTIOFSD)
            .arg(format!("--socket-path={}", sock.display()))
            .arg("-o")
            .arg(format!("source={}", shared.display()))
            .args(["-o", "cache=none"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{VIRTIOFSD} (qemu-system-common, `make deps`): {e}"));
        let d = Daemon(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "virtiofsd did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        (d, sock)
    }

    fn wait_readable(fd: RawFd, within: Duration) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe {
            libc::poll(
                &mut p,
                1,
                i32::try_from(within.as_millis()).unwrap_or(i32::MAX),
            ) == 1
        }
    }

    /// A FUSE_INIT request from "the guest" reaches the real virtiofsd
    /// through the rings this frontend set up, and its answer comes back
    /// in guest memory with a call.
    #[test]
    fn fuse_init_round_trips_through_virtiofsd() {
        let dir = tempfile::tempdir().unwrap();
        let (_d, sock) = virtiofsd(dir.path());
        let mut fs = Fs::connect(&sock, "podvisor").unwrap();
        assert_ne!(fs.features() & F_VERSION_1, 0);
        assert_eq!(&fs.config()[..8], b"podvisor");
        assert!(!fs.handles_kicks());

        let mem = mem();
        let queues = vec![
            mock(&mem, 0).create_queue().unwrap(),
            mock(&mem, 1).create_queue().unwrap(),
        ];
        let (a, irq) = active(&mem, queues, F_VERSION_1);
        let kick = a.kicks[1].try_clone().unwrap();
        fs.activate(a).unwrap();

        // fuse_in_header (40 bytes) + fuse_init_in (major 7, minor 31).
        let unique = 0x1234u64;
        let mut req = Vec::new();
        req.extend_from_slice(&56u32.to_le_bytes());
        req.extend_from_slice(&26u32.to_le_bytes()); // FUSE_INIT
        req.extend_from_slice(&unique.to_le_bytes());
        req.extend_from_slice(&[0u8; 24]); // nodeid, uid, gid, pid, padding
        req.extend_from_slice(&7u32.to_le_bytes());
        req.extend_from_slice(&31u32.to_le_bytes());
        req.extend_from_slice(&[0u8; 8]);
        write(&mem, 0x200000, &req);
        let q = mock(&mem, 1);
        add_chain(
            &q,
            &[
                (0, desc(0x200000, 56, F_NEXT, 1)),
                (1, desc(0x300000, 4096, F_WRITE, 0)),
            ],
            0,
        );
        kick.write(1).unwrap();

        let call = fs.fds()[1];
        let deadline = Instant::now() + Duration::from_secs(10);
        while used_count(&q) == 0 {
            assert!(Instant::now() < deadline, "virtiofsd never answered");
            if wait_readable(call, Duration::from_millis(100)) {
                fs.fd_event(1).unwrap();
            }
        }
        // The call for this answer may still be pending.
        if irq.status() & 1 == 0 && wait_readable(call, Duration::from_secs(5)) {
            fs.fd_event(1).unwrap();
        }
        assert_ne!(
            irq.status() & 1,
            0,
            "the call became a used-buffer interrupt"
        );
        assert_eq!(used_count(&q), 1);
        let out = read(&mem, 0x300000, 24);
        let len = u32::from_le_bytes(out[0..4].try_into().unwrap());
        let error = i32::from_le_bytes(out[4..8].try_into().unwrap());
        let uniq = u64::from_le_bytes(out[8..16].try_into().unwrap());
        let major = u32::from_le_bytes(out[16..20].try_into().unwrap());
        assert_eq!((error, uniq, major), (0, unique, 7), "reply of {len} bytes");
        assert_eq!(used_len(&q, 0), len);

        fs.reset();
    }

    #[test]
    fn missing_backend_and_bad_tag_are_clear_errors() {
        let err = Fs::connect(Path::new("/nonexistent/fs.sock"), "podvisor")
            .err()
            .unwrap();
        assert!(err.to_string().contains("virtiofsd"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let long = "x".repeat(FS_TAG_MAX + 1);
        assert!(Fs::connect(&dir.path().join("s"), &long).is_err());
    }
}
