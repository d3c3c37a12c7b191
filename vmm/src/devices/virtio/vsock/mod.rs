//! virtio-vsock with Firecracker's hybrid-vsock host side: one Unix socket
//! stands for the host (CID 2).
//!
//! - Host to guest: a client connects to `<uds>` and writes
//!   `CONNECT <port>\n`; once the guest accepts, it reads `OK <host-port>\n`
//!   and the stream carries the connection's bytes.
//! - Guest to host: a guest connection to host port P is a connection to
//!   `<uds>_P`; if nothing listens there, the guest gets a reset.
//!
//! Flow control follows the virtio-vsock credit scheme: the guest never has
//! more in flight than our buffer allowance, and we send to the guest only
//! as much as it has room for. All sockets are non-blocking and watched by
//! the device's own epoll descriptor, which the VMM's event loop polls.
//!
//! - [`packet`]: the header codec;
//! - [`connection`]: one stream and its credit;
//! - [`muxer`]: the host sockets and the CONNECT handshake;
//! - this module: the device and its queues.

mod connection;
mod muxer;
mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use virtio_queue::{QueueOwnedT, QueueT};

use super::{
    complete, pop_chain, used_bytes, with_active, Active, DeviceError, VirtioDevice, F_VERSION_1,
    TYPE_VSOCK,
};
use connection::{header, Conn, State};
pub use muxer::connect_port;
use muxer::{Pending, FIRST_LOCAL_PORT, LISTENER};
pub use packet::Header;
use packet::*;

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: the driver drops its connections
/// and reads the guest CID again.
const EVENT_TRANSPORT_RESET: u32 = 0;

pub const HOST_CID: u64 = 2;
/// Largest payload per packet to the guest.
const MAX_PKT: usize = 64 * 1024;

#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    /// Connections by epoll token; `ports` finds them by (local, peer).
    conns: HashMap<u64, Conn>,
    ports: HashMap<(u32, u32), u64>,
    pending: HashMap<u64, Pending>,
    /// Control packets waiting for an RX buffer.
    control: VecDeque<Header>,
    next_token: u64,
    next_local_port: u32,
    /// Reused for every packet to the guest.
    rx_buf: Vec<u8>,
    active: Option<Active>,
}

impl Vsock {
    /// Listens on `uds` (which must not exist) for host-initiated connections.
    pub fn new(cid: u64, uds: &Path) -> Result<Vsock, std::io::Error> {
        let listener = UnixListener::bind(uds)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        Ok(Vsock {
            cid,
            uds: uds.to_owned(),
            listener,
            epoll,
            conns: HashMap::new(),
            ports: HashMap::new(),
            pending: HashMap::new(),
            control: VecDeque::new(),
            next_token: LISTENER + 1,
            next_local_port: FIRST_LOCAL_PORT,
            rx_buf: Vec::new(),
            active: None,
        })
    }

    /// Drains the TX queue (guest to host).
    fn process_tx(&mut self) -> Result<(), DeviceError> {
        with_active(self, |v| &mut v.active, Vsock::drain_tx)?;
        self.process_rx()
    }

    fn drain_tx(&mut self, a: &mut Active) -> Result<(), DeviceError> {
        {
            while let Some(chain) = pop_chain(&mut a.queues[TX], &a.mem)? {
                let head = chain.head_index();
                let mut r = chain
                    .reader(&a.mem)
                    .map_err(|e| DeviceError::Chain(format!("vsock tx: {e}")))?;
                let mut hb = [0u8; HDR_LEN];
                r.read_exact(&mut hb).map_err(|_| {
                    DeviceError::Chain("vsock tx: packet shorter than its header".into())
                })?;
                let h = Header::decode(&hb);
                let len = h.len as usize;
                if len > MAX_PKT {
                    return Err(DeviceError::Chain(format!(
                        "vsock tx: packet of {len} bytes; at most {MAX_PKT}"
                    )));
                }
                if len > r.available_bytes() {
                    return Err(DeviceError::Chain(format!(
                        "vsock tx: header claims {} bytes, buffer holds {}",
                        h.len,
                        r.available_bytes()
                    )));
                }
                let mut payload = vec![0u8; len];
                r.read_exact(&mut payload)?;
                complete(&mut a.queues[TX], &a.mem, &a.irq, head, 0)?;
                self.guest_packet(h, &payload);
            }
            Ok(())
        }
    }

    /// Fills RX buffers: control packets first, then data from host sockets.
    fn process_rx(&mut self) -> Result<(), DeviceError> {
        with_active(self, |v| &mut v.active, Vsock::fill_rx)
    }

    fn fill_rx(&mut self, a: &mut Active) -> Result<(), DeviceError> {
        let mut buf = std::mem::take(&mut self.rx_buf);
        buf.resize(MAX_PKT, 0);
        let r = self.fill_rx_with(a, &mut buf);
        self.rx_buf = buf;
        r
    }

    fn fill_rx_with(&mut self, a: &mut Active, buf: &mut [u8]) -> Result<(), DeviceError> {
        let mut ready: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == State::Established && !c.host_eof && c.peer_credit() > 0)
            .map(|(t, _)| *t)
            .collect();
        ready.sort_unstable();
        loop {
            if self.control.is_empty() && ready.is_empty() {
                return Ok(());
            }
            let Some(chain) = pop_chain(&mut a.queues[RX], &a.mem)? else {
                // Out of buffers: the guest kicks RX when it adds some.
                return Ok(());
            };
            let head = chain.head_index();
            let mut w = chain
                .writer(&a.mem)
                .map_err(|e| DeviceError::Chain(format!("vsock rx: {e}")))?;
            let room = w.available_bytes().checked_sub(HDR_LEN).ok_or_else(|| {
                DeviceError::Chain(format!(
                    "vsock rx: buffer of {} bytes cannot hold a header",
                    w.available_bytes()
                ))
            })?;
            let (hdr, data_len) = if let Some(h) = self.control.pop_front() {
                (h, 0)
            } else {
                let Some(&token) = ready.last() else {
                    return Ok(());
                };
                let Some(c) = self.conns.get_mut(&token) else {
                    ready.pop();
                    a.queues[RX].go_to_previous_position();
                    continue;
                };
                let want = (c.peer_credit() as usize).min(MAX_PKT).min(room);
                match c.stream.read(&mut buf[..want]) {
                    Ok(n) if n > 0 => {
                        let mut h = header(self.cid, c, OP_RW);
                        h.len = used_bytes(n);
                        c.tx_cnt = c.tx_cnt.wrapping_add(used_bytes(n));
                        c.last_fwd_cnt_sent = c.fwd_cnt;
                        if c.peer_credit() == 0 {
                            ready.pop();
                        }
                        (h, n)
                    }
                    Ok(_) => {
                        // EOF from the host: tell the guest it is over.
                        c.host_eof = true;
                        ready.pop();
                        let mut h = header(self.cid, c, OP_SHUTDOWN);
                        h.flags = SHUT_RCV | SHUT_SEND;
                        let c = &self.conns[&token];
                        self.rewatch(c, token);
                        (h, 0)
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {
                        a.queues[RX].go_to_previous_position();
                        continue;
                    }
                    Err(e) => {
                        ready.pop();
                        a.queues[RX].go_to_previous_position();
                        if e.kind() != ErrorKind::WouldBlock {
                            let (l, p) = (c.local_port, c.peer_port);
                            self.reset(l, p);
                        }
                        continue;
                    }
                }
            };
            w.write_all(&hdr.encode())?;
            w.write_all(&buf[..data_len])?;
            complete(
                &mut a.queues[RX],
                &a.mem,
                &a.irq,
                head,
                used_bytes(HDR_LEN + data_len),
            )?;
        }
    }
}

impl VirtioDevice for Vsock {
    fn active(&self) -> Option<&Active> {
        self.active.as_ref()
    }
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }
    fn features(&self) -> u64 {
        F_VERSION_1
    }
    fn config(&self) -> Vec<u8> {
        self.cid.to_le_bytes().to_vec()
    }
    fn activate(&mut self, active: Active) -> Result<(), DeviceError> {
        self.active = Some(active);
        // Host clients that came before the driver was ready: the VMM's
        // loop saw their sockets' edge while the device was inactive and
        // will not see it again.
        self.sockets_ready()
    }
    fn reset(&mut self) {
        self.active = None;
        let tokens: Vec<u64> = self.conns.keys().copied().collect();
        for t in tokens {
            self.remove(t);
        }
        self.control.clear();
    }
    fn queue_event(&mut self, index: usize) -> Result<(), DeviceError> {
        match index {
            TX => self.process_tx(),
            RX => self.process_rx(),
            _ => Ok(()),
        }
    }
    fn fds(&self) -> Vec<RawFd> {
        vec![self.epoll.as_raw_fd()]
    }
    fn fd_event(&mut self, _index: usize) -> Result<(), DeviceError> {
        self.sockets_ready()
    }
    fn snapshot_blocker(&self) -> Option<String> {
        let open = self.conns.len() + self.pending.len();
        (open > 0).then(|| format!("{open} vsock connections are open; close them first"))
    }
    fn restored(&mut self) -> Result<(), DeviceError> {
        with_active(
            self,
            |v| &mut v.active,
            |_, a| {
                if !a.queues[EVENT].ready() {
                    return Ok(());
                }
                let Some(chain) = pop_chain(&mut a.queues[EVENT], &a.mem)? else {
                    tracing::debug!("vsock: no event buffer for the transport reset");
                    return Ok(());
                };
                let head = chain.head_index();
                let mut w = chain
                    .writer(&a.mem)
                    .map_err(|e| DeviceError::Chain(format!("vsock event: {e}")))?;
                w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes())
                    .map_err(|e| DeviceError::Chain(format!("vsock event: {e}")))?;
                complete(&mut a.queues[EVENT], &a.mem, &a.irq, head, 4)
            },
        )
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::*;
    use crate::memory::GuestMemoryMmap;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    const GUEST_CID: u64 = 3;
    const RX_BUF: u64 = 0x100000;
    const TX_BUF: u64 = 0x200000;

    struct Rig {
        mem: GuestMemoryMmap,
        dev: Vsock,
        uds: PathBuf,
        _dir: tempfile::TempDir,
        rx_used: u16,
        next_desc: u16,
    }

    impl Rig {
        fn new() -> Rig {
            let mut r = Rig::inactive();
            r.activate();
            r
        }

        /// The device before the driver sets DRIVER_OK.
        fn inactive() -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let uds = dir.path().join("v.sock");
            let mem = mem();
            let dev = Vsock::new(GUEST_CID, &uds).unwrap();
            Rig {
                mem,
                dev,
                uds,
                _dir: dir,
                rx_used: 0,
                next_desc: 0,
            }
        }

        fn activate(&mut self) {
            let queues = (0..3)
                .map(|i| mock(&self.mem, i).create_queue().unwrap())
                .collect();
            self.dev
                .activate(active(&self.mem, queues, F_VERSION_1).0)
                .unwrap();
        }

        fn q(&self, i: u64) -> Mock<'_> {
            mock(&self.mem, i)
        }

        fn desc_index(&mut self) -> u16 {
            let d = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QSIZE;
            d
        }

        /// Offers one RX buffer and returns the packet the device put there.
        fn rx(&mut self) -> Option<(Header, Vec<u8>)> {
            let d = self.desc_index();
            let addr = RX_BUF + u64::from(d) * 0x20000;
            let q = self.q(0);
            add_chain(&q, &[(d, desc(addr, 0x11000, F_WRITE, 0))], d);
            self.dev.queue_event(RX).unwrap();
            let q = self.q(0);
            if used_count(&q) == self.rx_used {
                return None;
            }
            let len = used_len(&q, self.rx_used) as usize;
            self.rx_used += 1;
            let b = read(&self.mem, addr, len);
            let h = Header::decode(b[..HDR_LEN].try_into().unwrap());
            Some((h, b[HDR_LEN..].to_vec()))
        }

        fn tx(&mut self, h: Header, payload: &[u8]) -> Result<(), DeviceError> {
            let d = self.desc_index();
            let addr = TX_BUF + u64::from(d) * 0x20000;
            let mut b = h.encode().to_vec();
            b.extend_from_slice(payload);
            write(&self.mem, addr, &b);
            let q = self.q(1);
            add_chain(
                &q,
                &[(d, desc(addr, u32::try_from(b.len()).unwrap(), 0, 0))],
                d,
            );
            self.dev.queue_event(TX)
        }

        fn sockets(&mut self) {
            std::thread::sleep(Duration::from_millis(20));
            self.dev.fd_event(0).unwrap();
        }
    }

    fn guest(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
            flags: 0,
        }
    }

    fn read_line(s: &mut UnixStream) -> String {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        let mut b = [0u8];
        while s.read(&mut b).unwrap() == 1 {
            if b[0] == b'\n' {
                break;
            }
            out.push(b[0]);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_host_client_before_the_driver_is_ready_is_served_once_it_is() {
        let mut r = Rig::inactive();
        let mut client = UnixStream::connect(&r.uds).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        r.activate();
        let (req, _) = r.rx().expect("REQUEST for the guest after activation");
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, 1024));
    }

    #[test]
    fn header_round_trips() {
        let h = guest(OP_RW, 5, 6, 7);
        assert_eq!(Header::decode(&h.encode()), h);
    }

    #[test]
    fn host_connects_to_a_guest_port_and_bytes_flow_both_ways() {
        let mut r = Rig::new();
        let mut client = UnixStream::connect(&r.uds).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        r.sockets();
        r.sockets();
        let (req, _) = r.rx().expect("REQUEST for the guest");
        assert_eq!(
            (req.op, req.dst_port, req.dst_cid),
            (OP_REQUEST, 1024, GUEST_CID)
        );
        let host_port = req.src_port;
        assert!(host_port >= FIRST_LOCAL_PORT);

        r.tx(guest(OP_RESPONSE, 1024, host_port, 0), &[]).unwrap();
        assert_eq!(read_line(&mut client), format!("OK {host_port}"));

        client.write_all(b"ping").unwrap();
        r.sockets();
        let (rw, data) = r.rx().expect("data for the guest");
        assert_eq!((rw.op, rw.len, data.as_slice()), (OP_RW, 4, &b"ping"[..]));

        r.tx(guest(OP_RW, 1024, host_port, 4), b"pong").unwrap();
        let mut b = [0u8; 4];
        client.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"pong");

        drop(client);
        r.sockets();
        let (sd, _) = r.rx().expect("SHUTDOWN for the guest");
        assert_eq!((sd.op, sd.flags), (OP_SHUTDOWN, SHUT_RCV | SHUT_SEND));
        r.tx(guest(OP_RST, 1024, host_port, 0), &[]).unwrap();
        assert!(r.dev.conns.is_empty());
    }

    #[test]
    fn guest_connects_to_a_host_listener_or_gets_a_reset() {
        let mut r = Rig::new();
        let listener = UnixListener::bind(format!("{}_1025", r.uds.display())).unwrap();
        r.tx(guest(OP_REQUEST, 50000, 1025, 0), &[]).unwrap();
        let (resp, _) = r.rx().unwrap();
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port),
            (OP_RESPONSE, 1025, 50000)
        );
        let (mut s, _) = listener.accept().unwrap();
        r.tx(guest(OP_RW, 50000, 1025, 5), b"ready").unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ready");

        r.tx(guest(OP_REQUEST, 50001, 999, 0), &[]).unwrap();
        let (rst, _) = r.rx().unwrap();
        assert_eq!((rst.op, rst.dst_port), (OP_RST, 50001));
    }

    #[test]
    fn bad_connect_lines_are_dropped() {
        let mut r = Rig::new();
        let mut c = UnixStream::connect(&r.uds).unwrap();
        c.write_all(b"HELLO 5\n").unwrap();
        let mut c2 = UnixStream::connect(&r.uds).unwrap();
        c2.write_all(&[b'x'; 40]).unwrap();
        r.sockets();
        r.sockets();
        assert!(r.rx().is_none(), "nothing for the guest");
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert_eq!(c.read(&mut [0u8; 4]).unwrap(), 0, "closed");
        assert!(r.dev.pending.is_empty());
    }

    #[test]
    fn hostile_packets_never_panic() {
        let mut r = Rig::new();
        // Not from the guest's CID: dropped.
        let mut h = guest(OP_REQUEST, 1, 2, 0);
        h.src_cid = 77;
        r.tx(h, &[]).unwrap();
        // Datagram type: reset.
        let mut h = guest(OP_REQUEST, 1, 2, 0);
        h.type_ = 2;
        r.tx(h, &[]).unwrap();
        let (rst, _) = r.rx().unwrap();
        assert_eq!(rst.op, OP_RST);
        // Data for a connection that does not exist: reset.
        r.tx(guest(OP_RW, 1, 2, 3), b"abc").unwrap();
        assert_eq!(r.rx().unwrap().0.op, OP_RST);
        // A header claiming more than the buffer holds fails the device.
        assert!(r.tx(guest(OP_RW, 1, 2, 1_000), b"abc").is_err());
    }

    #[test]
    fn oversized_packet_fails_the_device_without_allocating_it() {
        let mut r = Rig::new();
        // 4 GiB claimed, backed by a long chain of real buffers.
        let h = guest(OP_RW, 1, 2, u32::MAX);
        write(&r.mem, TX_BUF, &h.encode());
        let q = r.q(1);
        add_chain(
            &q,
            &[
                (0, desc(TX_BUF, 0x10_0000, F_NEXT, 1)),
                (1, desc(0x40_0000, 0x80_0000, 0, 0)),
            ],
            0,
        );
        let e = r.dev.queue_event(TX).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
    }

    #[test]
    fn short_packet_fails_the_device() {
        let mut r = Rig::new();
        write(&r.mem, TX_BUF, &[0u8; 10]);
        let q = r.q(1);
        add_chain(&q, &[(0, desc(TX_BUF, 10, 0, 0))], 0);
        assert!(r.dev.queue_event(TX).is_err());
    }

    #[test]
    fn guest_overrunning_its_credit_is_reset() {
        let mut r = Rig::new();
        let listener = UnixListener::bind(format!("{}_7", r.uds.display())).unwrap();
        r.tx(guest(OP_REQUEST, 40000, 7, 0), &[]).unwrap();
        assert_eq!(r.rx().unwrap().0.op, OP_RESPONSE);
        let (_s, _) = listener.accept().unwrap(); // never reads
        let chunk = vec![0u8; 0x10000];
        let mut reset = false;
        for _ in 0..64 {
            r.tx(
                guest(OP_RW, 40000, 7, u32::try_from(chunk.len()).unwrap()),
                &chunk,
            )
            .unwrap();
            if r.dev.conns.is_empty() {
                reset = true;
                break;
            }
        }
        assert!(reset, "connection over its credit must be reset");
        let mut saw_rst = false;
        while let Some((h, _)) = r.rx() {
            saw_rst |= h.op == OP_RST;
        }
        assert!(saw_rst);
    }
}
