//! One stream between a host socket and a guest port: its state and the
//! virtio-vsock credit accounting (the guest never has more in flight than
//! [`BUF_ALLOC`]; we send it only as much as it has room for).

use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;

use super::packet::{Header, TYPE_STREAM};
use super::HOST_CID;
use crate::devices::virtio::used_bytes;

/// What we let the guest have in flight per connection.
pub(super) const BUF_ALLOC: u32 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Host-initiated; waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

#[derive(Debug)]
pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) state: State,
    /// Host side port (ours) and guest side port.
    pub(super) local_port: u32,
    pub(super) peer_port: u32,
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub(super) tx_cnt: u32,
    /// Bytes from the guest written to the host socket.
    pub(super) fwd_cnt: u32,
    pub(super) last_fwd_cnt_sent: u32,
    /// Guest bytes the host socket did not take yet.
    pub(super) pending: Vec<u8>,
    /// The guest will send no more: shut the socket's write side once
    /// `pending` is flushed.
    pub(super) peer_done_sending: bool,
    /// The host socket reached EOF.
    pub(super) host_eof: bool,
}

impl Conn {
    /// A connection between `local_port` (ours) and the guest's
    /// `peer_port`, with the credit the guest has announced so far.
    pub(super) fn new(
        stream: UnixStream,
        state: State,
        (local_port, peer_port): (u32, u32),
        (peer_buf_alloc, peer_fwd_cnt): (u32, u32),
    ) -> Conn {
        Conn {
            stream,
            state,
            local_port,
            peer_port,
            peer_buf_alloc,
            peer_fwd_cnt,
            tx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            pending: Vec::new(),
            peer_done_sending: false,
            host_eof: false,
        }
    }

    pub(super) fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Writes what the host socket takes of `c.pending`.
    pub(super) fn flush(&mut self) -> std::io::Result<()> {
        let c = self;
        while !c.pending.is_empty() {
            match c.stream.write(&c.pending) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    c.pending.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(used_bytes(n));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if c.pending.is_empty() && c.peer_done_sending {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }
}

/// A packet header from the host side of `c`.
pub(super) fn header(cid: u64, c: &Conn, op: u16) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: cid,
        src_port: c.local_port,
        dst_port: c.peer_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: c.fwd_cnt,
        ..Default::default()
    }
}
