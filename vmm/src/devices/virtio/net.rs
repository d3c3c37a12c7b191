//! virtio-net on a tap device. The tap is opened with a virtio-net header
//! (IFF_VNET_HDR, 12 bytes), so frames pass between the guest's buffers and
//! the tap unchanged. No offloads are offered: the guest sends and expects
//! plain frames up to the MTU.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{
    complete, pop_chain, used_bytes, with_active, Active, DeviceError, VirtioDevice, F_VERSION_1,
    TYPE_NET,
};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const F_MAC: u64 = 1 << 5;
/// virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers.
pub const HDR_LEN: usize = 12;
/// Header plus the largest frame a tap hands us.
const MAX_PACKET: usize = HDR_LEN + 65535 + 14;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[derive(Debug)]
pub struct Net {
    tap: File,
    mac: Option<[u8; 6]>,
    /// A frame read from the tap that found no guest buffer yet.
    held: Option<Vec<u8>>,
    /// Reused for every packet.
    buf: Vec<u8>,
    active: Option<Active>,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Net {
    /// Opens the existing tap `name` (as created by the caller, who also
    /// puts it in the right namespace and bridges or redirects it).
    pub fn open_tap(name: &str, mac: Option<[u8; 6]>) -> std::io::Result<Net> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(std::io::Error::new(ErrorKind::InvalidInput, "bad tap name"));
        }
        let tap = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is.
        if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let size = libc::c_int::try_from(HDR_LEN).unwrap_or(libc::c_int::MAX);
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Net::from_file(tap, mac))
    }

    /// Any non-blocking descriptor that keeps packet boundaries will do
    /// (tests use a SOCK_SEQPACKET pair).
    pub fn from_file(tap: File, mac: Option<[u8; 6]>) -> Net {
        Net {
            tap,
            mac,
            held: None,
            buf: Vec::new(),
            active: None,
        }
    }

    fn process_tx(&mut self, a: &mut Active, buf: &mut [u8]) -> Result<(), DeviceError> {
        while let Some(chain) = pop_chain(&mut a.queues[TX], &a.mem)? {
            let head = chain.head_index();
            let mut r = chain
                .reader(&a.mem)
                .map_err(|e| DeviceError::Chain(format!("net tx: {e}")))?;
            let len = r.available_bytes();
            if !(HDR_LEN..=MAX_PACKET).contains(&len) {
                return Err(DeviceError::Chain(format!("net tx: packet of {len} bytes")));
            }
            r.read_exact(&mut buf[..len])?;
            match self.tap.write(&buf[..len]) {
                Ok(_) => {}
                // A full tap queue drops the frame, as a NIC would.
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => tracing::debug!("net tx: {e}"),
            }
            complete(&mut a.queues[TX], &a.mem, &a.irq, head, 0)?;
        }
        Ok(())
    }

    fn process_rx(&mut self, a: &mut Active, buf: &mut [u8]) -> Result<(), DeviceError> {
        loop {
            let frame = match self.held.take() {
                Some(f) => f,
                None => match self.tap.read(buf) {
                    Ok(n) if n >= HDR_LEN => buf[..n].to_vec(),
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.into()),
                },
            };
            let Some(chain) = pop_chain(&mut a.queues[RX], &a.mem)? else {
                // The guest kicks RX when it adds buffers.
                self.held = Some(frame);
                return Ok(());
            };
            let head = chain.head_index();
            let mut w = chain
                .writer(&a.mem)
                .map_err(|e| DeviceError::Chain(format!("net rx: {e}")))?;
            if w.available_bytes() < frame.len() {
                tracing::debug!(
                    "net rx: {}-byte frame for a {}-byte buffer dropped",
                    frame.len(),
                    w.available_bytes()
                );
                complete(&mut a.queues[RX], &a.mem, &a.irq, head, 0)?;
                continue;
            }
            let mut frame = frame;
            frame[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
            w.write_all(&frame)?;
            complete(
                &mut a.queues[RX],
                &a.mem,
                &a.irq,
                head,
                used_bytes(frame.len()),
            )?;
        }
    }

    /// Runs `f` with the active queues and the packet buffer, both taken
    /// out of `self` for the call.
    fn with_active(
        &mut self,
        f: fn(&mut Net, &mut Active, &mut [u8]) -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(MAX_PACKET, 0);
        let r = with_active(self, |n| &mut n.active, |n, a| f(n, a, &mut buf));
        self.buf = buf;
        r
    }
}

impl VirtioDevice for Net {
    fn active(&self) -> Option<&Active> {
        self.active.as_ref()
    }
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | if self.mac.is_some() { F_MAC } else { 0 }
    }
    fn config(&self) -> Vec<u8> {
        let mut c = self.mac.unwrap_or_default().to_vec();
        c.extend_from_slice(&1u16.to_le_bytes()); // status: link up
        c
    }
    fn activate(&mut self, active: Active) -> Result<(), DeviceError> {
        self.active = Some(active);
        self.with_active(Net::process_rx)
    }
    fn reset(&mut self) {
        self.active = None;
        self.held = None;
    }
    fn queue_event(&mut self, index: usize) -> Result<(), DeviceError> {
        match index {
            RX => self.with_active(Net::process_rx),
            TX => self.with_active(Net::process_tx),
            _ => Ok(()),
        }
    }
    fn fds(&self) -> Vec<RawFd> {
        vec![self.tap.as_raw_fd()]
    }
    fn fd_event(&mut self, _index: usize) -> Result<(), DeviceError> {
        self.with_active(Net::process_rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::*;
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixDatagram;

    fn pair() -> (Net, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        // SAFETY: the fd is owned by `a`, which is forgotten: File takes it.
        let f = unsafe { File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(a)) };
        (Net::from_file(f, Some([2, 0, 0, 0, 0, 9])), b)
    }

    fn frame(tag: u8, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; HDR_LEN];
        f.extend((0..len).map(|i| tag.wrapping_add(i.to_le_bytes()[0])));
        f
    }

    #[test]
    fn frames_pass_both_ways_and_wait_for_buffers() {
        let mem = mem();
        let (mut n, peer) = pair();
        assert_eq!(&n.config()[..6], &[2, 0, 0, 0, 0, 9]);
        let queues = vec![
            mock(&mem, 0).create_queue().unwrap(),
            mock(&mem, 1).create_queue().unwrap(),
        ];
        n.activate(active(&mem, queues, F_VERSION_1 | F_MAC).0)
            .unwrap();

        // Guest -> tap.
        let out = frame(1, 60);
        write(&mem, 0x200000, &out);
        add_chain(
            &mock(&mem, 1),
            &[
                (0, desc(0x200000, 12, F_NEXT, 1)),
                (1, desc(0x200000 + 12, 60, 0, 0)),
            ],
            0,
        );
        n.queue_event(TX).unwrap();
        let mut got = vec![0u8; 200];
        assert_eq!(peer.recv(&mut got).unwrap(), 72);
        assert_eq!(&got[..72], &out[..]);

        // Tap -> guest: no buffer yet, the frame waits.
        let inbound = frame(7, 100);
        peer.send(&inbound).unwrap();
        n.fd_event(0).unwrap();
        assert!(n.held.is_some());
        let rxq = mock(&mem, 0);
        add_chain(&rxq, &[(0, desc(0x300000, 2048, F_WRITE, 0))], 0);
        n.queue_event(RX).unwrap();
        assert_eq!(used_count(&rxq), 1);
        assert_eq!(used_len(&rxq, 0), 112);
        let landed = read(&mem, 0x300000, 112);
        assert_eq!(&landed[HDR_LEN..], &inbound[HDR_LEN..]);
        assert_eq!(&landed[10..12], &[1, 0], "num_buffers");

        // Too small a buffer: the frame is dropped, the device goes on.
        peer.send(&frame(3, 500)).unwrap();
        add_chain(&rxq, &[(1, desc(0x300000, 64, F_WRITE, 0))], 1);
        n.fd_event(0).unwrap();
        assert_eq!(used_count(&rxq), 2);
        assert_eq!(used_len(&rxq, 1), 0);
    }

    #[test]
    fn malformed_tx_fails_the_device() {
        let mem = mem();
        let (mut n, _peer) = pair();
        let queues = vec![
            mock(&mem, 0).create_queue().unwrap(),
            mock(&mem, 1).create_queue().unwrap(),
        ];
        n.activate(active(&mem, queues, F_VERSION_1).0).unwrap();
        add_chain(&mock(&mem, 1), &[(0, desc(0x200000, 4, 0, 0))], 0);
        assert!(n.queue_event(TX).is_err(), "shorter than the header");
    }

    #[test]
    fn missing_tap_is_a_clear_error() {
        assert!(Net::open_tap("", None).is_err());
        assert!(Net::open_tap("a-name-that-is-far-too-long", None).is_err());
    }
}
