//! One vsock connection: a guest port joined to a host unix stream, with virtio-vsock's
//! credit-based flow control in both directions and bounded buffers.
//!
//! Guest to host: the device advertises [`CONN_BUF`] bytes of buffer (`buf_alloc`) and counts
//! what it has written to the host stream (`fwd_cnt`). Data the host stream does not take at
//! once waits in `to_host`, which never holds more than [`CONN_BUF`]: a guest that sends past
//! its credit breaks the protocol and gets a RST. Credit updates go out when enough space has
//! been freed ([`CREDIT_THRESHOLD`]) or the guest's view of the free space runs low.
//!
//! Host to guest: the device reads the host stream only as far as the guest's credit
//! (`buf_alloc - (tx_cnt - fwd_cnt)` from the guest's last header) allows, at most
//! [`STAGE_LEN`] at a time into `from_host`, and hands it out in packets as the guest
//! provides receive buffers. A host peer that stops reading, or a guest that stops reading,
//! stalls only its own connection.
//!
//! Host streams are non-blocking and registered edge-triggered: the flags
//! `host_readable`/`host_writable` remember an edge until a read or write meets EAGAIN.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::packet::{
    op, Header, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::{CONN_BUF, CREDIT_THRESHOLD, STAGE_LEN};

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST to send or sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows.
    Established,
    /// Ending: the last bytes are flushed or the peer's RST is awaited, until the deadline.
    Closing,
}

/// Why a connection must end with a RST to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    /// The guest sent more data than its credit allowed.
    #[error("guest sent past its credit")]
    Credit,
    /// The guest's `fwd_cnt` claims bytes the device never sent.
    #[error("guest acknowledged bytes never sent")]
    FwdCnt,
    /// A packet that does not fit the connection's state.
    #[error("unexpected operation {0}")]
    Unexpected(u16),
    /// The host stream failed.
    #[error("host stream failed")]
    Host,
}

/// What the connection does after the packet it just produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Carries on.
    Keep,
    /// Ends (a RST was the packet).
    Remove,
}

/// One connection.
#[derive(Debug)]
pub struct Conn {
    /// The host-side port (allocated for host-initiated connections; the port the guest
    /// connected to for guest-initiated ones).
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// The host stream.
    pub stream: UnixStream,
    /// State.
    pub state: State,
    /// When a Connecting or Closing connection is given up.
    pub deadline: Option<Instant>,
    /// In the device's receive list.
    pub queued: bool,

    // Guest -> host.
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_sent: Wrapping<u32>,
    to_host: Vec<u8>,
    to_host_off: usize,
    // Host -> guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,
    from_host: Vec<u8>,
    from_host_off: usize,
    // Host stream.
    host_readable: bool,
    host_writable: bool,
    host_eof: bool,
    host_gone: bool,
    host_hup: bool,
    host_wr_shut: bool,
    // Guest side.
    peer_shut: u32,
    shut_sent: u32,
    pend_request: bool,
    pend_response: bool,
    pend_rst: bool,
    pend_credit_update: bool,
    pend_credit_request: bool,
    credit_requested: bool,
}

impl Conn {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Self {
        Self {
            local_port,
            peer_port,
            stream,
            state,
            deadline: None,
            queued: false,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_sent: Wrapping(0),
            to_host: Vec::new(),
            to_host_off: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            from_host: Vec::new(),
            from_host_off: 0,
            host_readable: true,
            host_writable: true,
            host_eof: false,
            host_gone: false,
            host_hup: false,
            host_wr_shut: false,
            peer_shut: 0,
            shut_sent: 0,
            pend_request: false,
            pend_response: false,
            pend_rst: false,
            pend_credit_update: false,
            pend_credit_request: false,
            credit_requested: false,
        }
    }

    /// A host-initiated connection to guest port `peer_port`: a REQUEST to send, then the
    /// guest's RESPONSE to wait for until `deadline`.
    pub fn host_initiated(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
    ) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, State::Connecting);
        c.pend_request = true;
        c.deadline = Some(deadline);
        c
    }

    /// A guest-initiated connection (its REQUEST in `req`) joined to `stream`: a RESPONSE to
    /// send.
    pub fn guest_initiated(stream: UnixStream, req: &Header) -> Self {
        let mut c = Self::new(stream, req.dst_port, req.src_port, State::Established);
        c.peer_buf_alloc = req.buf_alloc;
        // The guest's counter is the baseline: nothing is in flight yet.
        c.peer_fwd_cnt = Wrapping(req.fwd_cnt);
        c.tx_cnt = Wrapping(req.fwd_cnt);
        c.pend_response = true;
        c
    }

    /// The header of a packet to the guest (`guest_cid`) on this connection.
    #[must_use]
    pub fn header(&self, guest_cid: u64, op: u16, flags: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Bytes the guest may still receive (its credit).
    #[must_use]
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes from the guest waiting for the host stream.
    #[must_use]
    pub fn buffered_to_host(&self) -> usize {
        self.to_host.len() - self.to_host_off
    }

    /// Takes the guest's buffer space from any packet's header. A `fwd_cnt` beyond what was
    /// sent, or behind what it said before, is refused.
    pub fn update_peer_credit(&mut self, h: &Header) -> Result<(), ConnError> {
        let fwd = Wrapping(h.fwd_cnt);
        if (fwd - self.peer_fwd_cnt).0 > (self.tx_cnt - self.peer_fwd_cnt).0 {
            return Err(ConnError::FwdCnt);
        }
        self.peer_fwd_cnt = fwd;
        self.peer_buf_alloc = h.buf_alloc;
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
        Ok(())
    }

    /// Handles a packet from the guest (header checked by the device, credit fields already
    /// taken); `payload` is the RW data.
    pub fn recv(&mut self, h: &Header, payload: &[u8], now: Instant) -> Result<(), ConnError> {
        match (self.state, h.op) {
            (State::Connecting, op::RESPONSE) => {
                // The hybrid handshake's answer to the host: "OK <host port>\n". The stream is
                // fresh and empty, so a few bytes always fit.
                let line = format!("OK {}\n", self.local_port);
                match self.stream.write(line.as_bytes()) {
                    Ok(n) if n == line.len() => {}
                    _ => return Err(ConnError::Host),
                }
                self.state = State::Established;
                self.deadline = None;
                Ok(())
            }
            (State::Connecting, o) => Err(ConnError::Unexpected(o)),
            (_, op::RW) => {
                if self.peer_shut & SHUTDOWN_SEND != 0 {
                    return Err(ConnError::Unexpected(op::RW));
                }
                let held = (self.rx_cnt - self.fwd_cnt).0 as usize;
                if held + payload.len() > CONN_BUF as usize {
                    return Err(ConnError::Credit);
                }
                self.rx_cnt += Wrapping(u32::try_from(payload.len()).unwrap_or(u32::MAX));
                if self.host_gone {
                    // Nowhere to deliver: dropped, and not credited, so the guest stops once
                    // its credit is spent (rather than sending at full speed into nothing)
                    // until the SHUTDOWN reaches it.
                    return Ok(());
                }
                if self.buffered_to_host() == 0 {
                    self.to_host.clear();
                    self.to_host_off = 0;
                }
                self.to_host.extend_from_slice(payload);
                self.flush(now);
                Ok(())
            }
            (_, op::CREDIT_UPDATE) => Ok(()),
            (_, op::CREDIT_REQUEST) => {
                self.pend_credit_update = true;
                Ok(())
            }
            (_, op::SHUTDOWN) => {
                self.peer_shut |= h.flags & SHUTDOWN_BOTH;
                self.after_peer_shutdown(now);
                Ok(())
            }
            (_, o) => Err(ConnError::Unexpected(o)),
        }
    }

    fn after_peer_shutdown(&mut self, now: Instant) {
        if self.peer_shut & SHUTDOWN_SEND != 0 && self.buffered_to_host() == 0 && !self.host_wr_shut
        {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_wr_shut = true;
        }
        if self.peer_shut == SHUTDOWN_BOTH {
            // The guest closed: once its last bytes reached the host, it gets its RST (which
            // ends the close on its side); a host that takes nothing for CLOSE_TIMEOUT loses
            // them.
            if self.buffered_to_host() == 0 {
                self.pend_rst = true;
            } else if self.state != State::Closing {
                self.state = State::Closing;
                self.deadline = Some(now + super::CLOSE_TIMEOUT);
            }
        }
    }

    /// Writes buffered guest data to the host stream while it takes it.
    pub fn flush(&mut self, now: Instant) {
        while self.buffered_to_host() > 0 && self.host_writable && !self.host_gone {
            match self.stream.write(&self.to_host[self.to_host_off..]) {
                Ok(0) => self.host_gone = true,
                Ok(n) => {
                    self.to_host_off += n;
                    self.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
                    if self.state == State::Closing {
                        // A host that keeps reading keeps its bytes: the close deadline
                        // bounds a stall, not the whole drain (a slow reader of a guest's
                        // last 256 KiB lost the end of its output before).
                        self.deadline = Some(now + super::CLOSE_TIMEOUT);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.host_writable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => self.host_gone = true,
            }
        }
        if self.host_gone {
            // Undeliverable: dropped (not credited: see `recv`). What the host sent before
            // it went is still delivered: read on to the end.
            self.to_host_off = self.to_host.len();
            self.host_readable = true;
            self.linger(now);
        }
        if self.buffered_to_host() == 0 {
            self.to_host.clear();
            self.to_host_off = 0;
            if self.to_host.capacity() > 2 * STAGE_LEN {
                self.to_host.shrink_to(STAGE_LEN);
            }
            if self.peer_shut != 0 {
                self.after_peer_shutdown(now);
            }
        }
        let freed = (self.fwd_cnt - self.last_fwd_sent).0;
        let guest_view_free = CONN_BUF.saturating_sub((self.rx_cnt - self.last_fwd_sent).0);
        if freed >= CREDIT_THRESHOLD || (freed > 0 && guest_view_free < CREDIT_THRESHOLD) {
            self.pend_credit_update = true;
        }
    }

    /// The host stream is readable (an edge, a hang-up or an error).
    pub fn host_readable(&mut self) {
        self.host_readable = true;
    }

    /// The host stream is writable again.
    pub fn host_writable(&mut self, now: Instant) {
        self.host_writable = true;
        self.flush(now);
    }

    /// The host peer is gone in both directions (hang-up or error).
    pub fn host_hung_up(&mut self, now: Instant) {
        self.host_readable = true;
        self.host_hup = true;
        self.linger(now);
    }

    /// The host peer is gone: what it sent last still goes to the guest, then the
    /// connection ends with a SHUTDOWN; a guest that does not take that data within
    /// [`super::LINGER_TIMEOUT`] gets a RST instead.
    fn linger(&mut self, now: Instant) {
        if self.state == State::Established && self.deadline.is_none() {
            self.deadline = Some(now + super::LINGER_TIMEOUT);
        }
    }

    /// Reads from the host stream into `from_host`, as far as the guest's credit allows.
    fn fill(&mut self) {
        if self.from_host_off < self.from_host.len() {
            return;
        }
        self.from_host.clear();
        self.from_host_off = 0;
        let credit = self.peer_credit() as usize;
        if !self.host_readable || self.host_eof || self.peer_shut & SHUTDOWN_RCV != 0 || credit == 0
        {
            return;
        }
        let want = credit.min(STAGE_LEN);
        self.from_host.resize(want, 0);
        loop {
            match self.stream.read(&mut self.from_host) {
                Ok(0) => {
                    self.host_eof = true;
                    self.from_host.clear();
                }
                Ok(n) => self.from_host.truncate(n),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    self.from_host.clear();
                }
                Err(_) => {
                    self.host_eof = true;
                    self.host_gone = true;
                    self.from_host.clear();
                }
            }
            break;
        }
    }

    fn data_ready(&self) -> bool {
        self.from_host_off < self.from_host.len()
            || (self.host_readable && !self.host_eof && self.peer_shut & SHUTDOWN_RCV == 0)
    }

    fn shutdown_due(&self) -> Option<u32> {
        if self.state != State::Established && self.state != State::Closing {
            return None;
        }
        if !self.host_eof || self.from_host_off < self.from_host.len() {
            return None;
        }
        let want = if self.host_gone || self.host_hup { SHUTDOWN_BOTH } else { SHUTDOWN_SEND };
        (want & !self.shut_sent != 0).then_some(want)
    }

    /// Whether the connection has a packet for the guest.
    #[must_use]
    pub fn wants_rx(&self) -> bool {
        self.pend_rst
            || (self.state == State::Connecting && self.pend_request)
            || self.pend_response
            || self.pend_credit_update
            || self.pend_credit_request
            || (self.state == State::Established && self.data_ready() && self.peer_credit() > 0)
            || (self.state == State::Established && self.data_ready() && !self.credit_requested)
            || self.shutdown_due().is_some()
    }

    /// The next packet for the guest: its header (with `len` of the payload put in `out`,
    /// at most `room` bytes), and what becomes of the connection.
    pub fn next_packet(
        &mut self,
        guest_cid: u64,
        room: usize,
        out: &mut Vec<u8>,
        now: Instant,
    ) -> Option<(Header, After)> {
        out.clear();
        let (op, flags, after) = if self.pend_rst {
            self.pend_rst = false;
            (op::RST, 0, After::Remove)
        } else if self.state == State::Connecting {
            if !self.pend_request {
                return None;
            }
            self.pend_request = false;
            (op::REQUEST, 0, After::Keep)
        } else if self.pend_response {
            self.pend_response = false;
            (op::RESPONSE, 0, After::Keep)
        } else if let Some(n) = self.take_data(room, out) {
            self.tx_cnt += Wrapping(n);
            (op::RW, 0, After::Keep)
        } else if let Some(flags) = self.shutdown_due() {
            self.shut_sent |= flags;
            if flags == SHUTDOWN_BOTH && self.state != State::Closing {
                // The guest answers with a RST (or its own full SHUTDOWN); until then, or
                // the deadline, the connection stays.
                self.state = State::Closing;
                self.deadline = Some(now + super::CLOSE_TIMEOUT);
            }
            (op::SHUTDOWN, flags, After::Keep)
        } else if self.pend_credit_request {
            self.pend_credit_request = false;
            (op::CREDIT_REQUEST, 0, After::Keep)
        } else if self.pend_credit_update {
            self.pend_credit_update = false;
            (op::CREDIT_UPDATE, 0, After::Keep)
        } else {
            return None;
        };
        let mut h = self.header(guest_cid, op, flags);
        h.len = u32::try_from(out.len()).unwrap_or(0);
        // Every packet carries fwd_cnt: a separate credit update is no longer due.
        self.last_fwd_sent = self.fwd_cnt;
        self.pend_credit_update = false;
        Some((h, after))
    }

    /// Moves up to `room` bytes the guest has credit for into `out`.
    fn take_data(&mut self, room: usize, out: &mut Vec<u8>) -> Option<u32> {
        if self.state != State::Established || self.peer_shut & SHUTDOWN_RCV != 0 {
            return None;
        }
        self.fill();
        let avail = self.from_host.len() - self.from_host_off;
        let credit = self.peer_credit() as usize;
        let more = avail > 0 || (self.host_readable && !self.host_eof);
        if more && credit == 0 && !self.credit_requested {
            self.pend_credit_request = true;
            self.credit_requested = true;
        }
        let n = avail.min(credit).min(room);
        if n == 0 {
            return None;
        }
        out.extend_from_slice(&self.from_host[self.from_host_off..self.from_host_off + n]);
        self.from_host_off += n;
        u32::try_from(n).ok()
    }

    /// Marks the connection for a RST to the guest (and removal once it is sent).
    pub fn reset(&mut self) {
        self.pend_rst = true;
    }
}
