//! The host side of the device: the hybrid-vsock muxer. It accepts clients
//! on `<uds>` and reads their `CONNECT <port>\n` line, dials `<uds>_<port>`
//! for guest-initiated connections, keeps the connections by epoll token
//! and by port pair, and turns guest packets into socket I/O and socket
//! readiness into control packets for the guest.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::connection::{header, Conn, State, BUF_ALLOC};
use super::packet::*;
use super::{DeviceError, Vsock, HOST_CID};

/// Host ports we assign to host-initiated connections start here.
pub(super) const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Open connections a guest may hold; more are refused with a reset.
pub(super) const MAX_CONNS: usize = 1024;
/// A connecting client has this many bytes to say `CONNECT <port>\n`.
pub(super) const MAX_CONNECT_LINE: usize = 32;

/// Tokens in the device's epoll: the listener, then connections by id.
pub(super) const LISTENER: u64 = 0;

/// The guest port a host client's line asks for: `CONNECT <port>` (the
/// line without its newline; spaces around it and the port allowed);
/// none for anything else.
pub fn connect_port(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim();
    line.strip_prefix("CONNECT ")?.trim().parse::<u32>().ok()
}

/// A client on `<uds>` that has not finished its CONNECT line.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) stream: UnixStream,
    line: Vec<u8>,
}

impl Vsock {
    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn watch(&self, fd: RawFd, token: u64, events: EventSet) {
        let op = ControlOperation::Add;
        if let Err(e) = self.epoll.ctl(op, fd, EpollEvent::new(events, token)) {
            tracing::warn!("vsock: watching a socket: {e}");
        }
    }

    pub(super) fn rewatch(&self, c: &Conn, token: u64) {
        let mut ev = EventSet::IN | EventSet::EDGE_TRIGGERED;
        if !c.pending.is_empty() {
            ev |= EventSet::OUT;
        }
        if c.host_eof {
            ev = if c.pending.is_empty() {
                EventSet::empty()
            } else {
                EventSet::OUT | EventSet::EDGE_TRIGGERED
            };
        }
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            c.stream.as_raw_fd(),
            EpollEvent::new(ev, token),
        );
    }

    pub(super) fn remove(&mut self, token: u64) {
        if let Some(c) = self.conns.remove(&token) {
            self.ports.remove(&(c.local_port, c.peer_port));
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Sends RST for (local, peer) and forgets the connection.
    pub(super) fn reset(&mut self, local_port: u32, peer_port: u32) {
        if let Some(t) = self.ports.get(&(local_port, peer_port)).copied() {
            self.remove(t);
        }
        self.control.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: local_port,
            dst_port: peer_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            buf_alloc: BUF_ALLOC,
            ..Default::default()
        });
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let t = self.token();
                    self.watch(s.as_raw_fd(), t, EventSet::IN);
                    self.pending.insert(
                        t,
                        Pending {
                            stream: s,
                            line: Vec::new(),
                        },
                    );
                    // Its CONNECT line may be there already.
                    self.pending_readable(t);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("vsock: accept on {}: {e}", self.uds.display());
                    return;
                }
            }
        }
    }

    /// Reads a client's CONNECT line; on a full line asks the guest.
    fn pending_readable(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut b = [0u8; MAX_CONNECT_LINE];
        let n = match p.stream.read(&mut b[..MAX_CONNECT_LINE - p.line.len()]) {
            Ok(0) => 0,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => 0,
        };
        let drop_it = |me: &mut Vsock, why: &str| {
            if let Some(p) = me.pending.remove(&token) {
                tracing::debug!("vsock: dropping host client: {why}");
                let _ = me.epoll.ctl(
                    ControlOperation::Delete,
                    p.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        };
        if n == 0 {
            return drop_it(self, "closed before CONNECT");
        }
        p.line.extend_from_slice(&b[..n]);
        let Some(end) = p.line.iter().position(|&c| c == b'\n') else {
            if p.line.len() >= MAX_CONNECT_LINE {
                drop_it(self, "CONNECT line too long");
            }
            return;
        };
        let extra = p.line[end + 1..].to_vec();
        let Some(peer_port) = connect_port(&p.line[..end]) else {
            let line = String::from_utf8_lossy(&p.line[..end]).into_owned();
            return drop_it(self, &format!("bad request {line:?}"));
        };
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let local_port = self.next_local_port;
        self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
        let c = Conn::new(p.stream, State::Connecting, (local_port, peer_port), (0, 0));
        if !extra.is_empty() {
            tracing::debug!("vsock: {} bytes after CONNECT dropped", extra.len());
        }
        // Not readable until the guest answers.
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            c.stream.as_raw_fd(),
            EpollEvent::new(EventSet::empty(), token),
        );
        self.control.push_back(header(self.cid, &c, OP_REQUEST));
        self.ports.insert((local_port, peer_port), token);
        self.conns.insert(token, c);
    }

    /// A guest connection to host port `port`: dial `<uds>_<port>`.
    fn guest_connect(&mut self, h: &Header) {
        if self.conns.len() >= MAX_CONNS {
            tracing::warn!("vsock: guest holds {MAX_CONNS} connections; refusing more");
            return self.reset(h.dst_port, h.src_port);
        }
        let path = PathBuf::from(format!("{}_{}", self.uds.display(), h.dst_port));
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => {
                tracing::debug!(
                    "vsock: guest port {} -> {}: nothing listening",
                    h.src_port,
                    path.display()
                );
                return self.reset(h.dst_port, h.src_port);
            }
        };
        let t = self.token();
        let c = Conn::new(
            stream,
            State::Established,
            (h.dst_port, h.src_port),
            (h.buf_alloc, h.fwd_cnt),
        );
        self.watch(
            c.stream.as_raw_fd(),
            t,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        );
        self.control.push_back(header(self.cid, &c, OP_RESPONSE));
        self.ports.insert((c.local_port, c.peer_port), t);
        self.conns.insert(t, c);
    }

    /// Tells the guest how much room it has, when it has used half of it.
    fn maybe_credit_update(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= BUF_ALLOC / 2 {
            c.last_fwd_cnt_sent = c.fwd_cnt;
            let h = header(self.cid, &self.conns[&token], OP_CREDIT_UPDATE);
            self.control.push_back(h);
        }
    }

    /// One packet from the guest.
    pub(super) fn guest_packet(&mut self, h: Header, payload: &[u8]) {
        if h.dst_cid != HOST_CID || h.src_cid != self.cid {
            tracing::debug!(
                "vsock: packet {}->{} not for the host; dropped",
                h.src_cid,
                h.dst_cid
            );
            return;
        }
        if h.type_ != TYPE_STREAM {
            return self.reset(h.dst_port, h.src_port);
        }
        let key = (h.dst_port, h.src_port);
        let Some(token) = self.ports.get(&key).copied() else {
            match h.op {
                OP_REQUEST => self.guest_connect(&h),
                OP_RST => {}
                _ => self.reset(h.dst_port, h.src_port),
            }
            return;
        };
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match (h.op, c.state) {
            (OP_RESPONSE, State::Connecting) => {
                c.state = State::Established;
                let ok = format!("OK {}\n", c.local_port);
                // A fresh socket takes a few bytes; if not, the client is gone.
                if c.stream.write_all(ok.as_bytes()).is_err() {
                    return self.reset(h.dst_port, h.src_port);
                }
                let c = &self.conns[&token];
                self.rewatch(c, token);
            }
            (OP_RW, State::Established) => {
                if c.pending.len() + payload.len() > BUF_ALLOC as usize {
                    tracing::warn!("vsock: guest port {} overran its credit; reset", h.src_port);
                    return self.reset(h.dst_port, h.src_port);
                }
                c.pending.extend_from_slice(payload);
                if c.flush().is_err() {
                    return self.reset(h.dst_port, h.src_port);
                }
                let c = &self.conns[&token];
                self.rewatch(c, token);
                self.maybe_credit_update(token);
            }
            (OP_CREDIT_UPDATE, _) => {
                // More room in the guest: the socket may be read again.
                let c = &self.conns[&token];
                self.rewatch(c, token);
            }
            (OP_CREDIT_REQUEST, _) => {
                let h = header(self.cid, c, OP_CREDIT_UPDATE);
                self.control.push_back(h);
            }
            (OP_SHUTDOWN, _) => {
                if h.flags & SHUT_SEND != 0 {
                    c.peer_done_sending = true;
                    let _ = c.flush();
                }
                if h.flags & (SHUT_SEND | SHUT_RCV) == SHUT_SEND | SHUT_RCV {
                    self.reset(h.dst_port, h.src_port);
                }
            }
            (OP_RST, _) => self.remove(token),
            (op, state) => {
                tracing::debug!("vsock: op {op} in state {state:?}; reset");
                self.reset(h.dst_port, h.src_port);
            }
        }
    }

    /// Host sockets became ready.
    pub(super) fn sockets_ready(&mut self) -> Result<(), DeviceError> {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = self.epoll.wait(0, &mut events)?;
            self.socket_events(&events[..n]);
            // The VMM polls this epoll edge-triggered: drain it.
            if n < events.len() {
                break;
            }
        }
        self.process_rx()
    }

    fn socket_events(&mut self, events: &[EpollEvent]) {
        for ev in events {
            let token = ev.data();
            if token == LISTENER {
                self.accept();
            } else if self.pending.contains_key(&token) {
                self.pending_readable(token);
            } else if let Some(c) = self.conns.get_mut(&token) {
                if ev.event_set().contains(EventSet::OUT) {
                    if c.flush().is_err() {
                        let (l, p) = (c.local_port, c.peer_port);
                        self.reset(l, p);
                        continue;
                    }
                    let c = &self.conns[&token];
                    self.rewatch(c, token);
                    self.maybe_credit_update(token);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::connect_port;

    #[test]
    fn connect_lines_are_read_strictly() {
        assert_eq!(connect_port(b"CONNECT 1024"), Some(1024));
        assert_eq!(connect_port(b"  CONNECT  7 \r"), Some(7));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT 4294967296",
            b"connect 5",
            b"CONNECT 5 6",
            b"CONNECT 5\xff",
            b"",
        ] {
            assert_eq!(
                connect_port(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
