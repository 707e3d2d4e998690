//! One vsock stream connection between the host side (local) and the guest (peer), as
//! a state machine that does no I/O.
//!
//! The adapter feeds it the guest's packets ([`Conn::on_packet`]) and the host
//! socket's events ([`Conn::host_accepted`], [`Conn::host_eof`], [`Conn::host_closed`],
//! [`Conn::host_consumed`]) and carries out the [`Action`]s it returns. Every header
//! it returns must reach the guest (the credit it carries is counted as told).
//!
//! Flow control (virtio 1.2 §5.10.6.3), all counters `u32` wrapping:
//! - guest → host: we advertise [`CONN_BUF_ALLOC`] and `fwd_cnt` (bytes the host side
//!   has taken). The guest may have `buf_alloc - (rx_cnt - fwd_cnt as last told)` bytes
//!   in flight; an RW beyond that is a credit lie and ends the connection with RST. So
//!   the adapter never holds more than [`CONN_BUF_ALLOC`] bytes for a connection.
//!   A CREDIT_UPDATE goes out once the host side has taken
//!   [`CREDIT_UPDATE_THRESHOLD`] bytes the guest has not been told about, or when the
//!   guest asks (CREDIT_REQUEST).
//! - host → guest: we may send `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes
//!   ([`Conn::tx_credit`]). A `fwd_cnt` that goes back or past what we sent is a lie:
//!   RST.
#![forbid(unsafe_code)]

use super::packet::HOST_CID;
use super::packet::{
    Header, Op, MAX_PAYLOAD, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Receive buffer advertised to the guest per connection: the most guest → host bytes
/// the adapter ever holds for one connection.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

/// Bytes taken by the host side, untold to the guest, that trigger a CREDIT_UPDATE.
/// At most [`CONN_BUF_ALLOC`], so a guest out of credit always gets one once the host
/// side drains.
pub const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;

/// How long the adapter waits for the guest's RST after the host side closed (the
/// state [`State::Closing`]) before it calls [`Conn::abort`].
pub const CLOSE_TIMEOUT_MS: u64 = 2000;

/// How long the adapter waits for the guest's RESPONSE to a host-initiated REQUEST
/// ([`State::LocalInit`]) before it calls [`Conn::abort`] (and closes the host client).
/// Firecracker waits 2 s; a guest busy streaming on many connections (seen with an
/// emulated guest kernel) can take longer to answer, and a client only waits longer.
pub const REQUEST_TIMEOUT_MS: u64 = 5000;

/// A connection's identity: the host-side port and the guest's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

/// Where a connection is, as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent to the guest, waiting for its RESPONSE.
    LocalInit,
    /// Guest-initiated: the guest's REQUEST is waiting for the host side's connect.
    PeerInit,
    /// Data flows both ways.
    Established,
    /// No more guest → host data (the guest shut SEND, or we shut RCV).
    GuestToHostClosed,
    /// No more host → guest data (we shut SEND, or the guest shut RCV).
    HostToGuestClosed,
    /// No data either way any more; waiting for the guest's RST (the host side shut
    /// both halves) or for the guest's last SHUTDOWN (then we send RST). The adapter
    /// arms its [`CLOSE_TIMEOUT_MS`] timer here.
    Closing,
    /// Over; the connection can be forgotten.
    Closed,
}

/// What the adapter does after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Put this header (no payload) on the guest's receive queue.
    Send(Header),
    /// The RW packet just handled carries this many bytes for the host side.
    Deliver(u32),
    /// The guest accepted a host-initiated connection (the muxer answers `OK`).
    Connected,
    /// The guest sends no more: once delivered bytes are written, shut the host
    /// socket's write half.
    HostShutWrite,
    /// The guest receives no more: stop reading the host socket.
    HostShutRead,
    /// Over, gracefully: write the bytes already delivered (best effort, without
    /// blocking), then close the host socket.
    Close,
    /// Over, abortively: drop buffered bytes and close the host socket now.
    Abort,
}

/// A host-side event that does not fit the connection's state (an adapter bug, never
/// caused by the guest).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    #[error("vsock connection {key:?}: {event} in state {state:?}")]
    WrongState {
        key: ConnKey,
        event: &'static str,
        state: State,
    },
    #[error("vsock connection {key:?}: host side took {n} bytes, only {pending} were delivered")]
    ConsumedTooMuch { key: ConnKey, n: u32, pending: u32 },
    #[error("vsock connection {key:?}: {n} bytes to send, credit is {credit} (packets at most {MAX_PAYLOAD})")]
    NoCredit { key: ConnKey, n: u32, credit: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    LocalInit,
    PeerInit,
    Open,
    Closed,
}

/// One connection.
#[derive(Debug, Clone)]
pub struct Conn {
    key: ConnKey,
    guest_cid: u64,
    phase: Phase,
    /// SHUTDOWN flags the guest sent (sticky).
    peer_shut: u32,
    /// SHUTDOWN flags we sent (sticky).
    local_shut: u32,
    /// Guest → host bytes accepted.
    rx_cnt: u32,
    /// Guest → host bytes the host side has taken.
    fwd_cnt: u32,
    /// The `fwd_cnt` in the last header we built.
    fwd_cnt_told: u32,
    /// Host → guest bytes sent.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// A CREDIT_REQUEST is out and no credit has come since.
    credit_requested: bool,
}

impl Conn {
    fn new(guest_cid: u64, key: ConnKey, phase: Phase) -> Self {
        Self {
            key,
            guest_cid,
            phase,
            peer_shut: 0,
            local_shut: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
        }
    }

    /// A host-initiated connection and the REQUEST to send to the guest.
    pub fn connect(guest_cid: u64, key: ConnKey) -> (Self, Header) {
        let mut c = Self::new(guest_cid, key, Phase::LocalInit);
        let h = c.header(Op::Request, 0, 0);
        (c, h)
    }

    /// A guest-initiated connection from its REQUEST (addressed to this key); the
    /// adapter connects the host side, then calls [`Self::host_accepted`] or
    /// [`Self::host_refused`].
    pub fn from_request(guest_cid: u64, request: &Header) -> Self {
        let key = ConnKey {
            local_port: request.dst_port,
            peer_port: request.src_port,
        };
        let mut c = Self::new(guest_cid, key, Phase::PeerInit);
        c.take_baseline(request);
        c
    }

    pub fn key(&self) -> ConnKey {
        self.key
    }

    pub fn state(&self) -> State {
        match self.phase {
            Phase::LocalInit => State::LocalInit,
            Phase::PeerInit => State::PeerInit,
            Phase::Closed => State::Closed,
            Phase::Open => match (self.to_host_closed(), self.to_guest_closed()) {
                (false, false) => State::Established,
                (true, false) => State::GuestToHostClosed,
                (false, true) => State::HostToGuestClosed,
                (true, true) => State::Closing,
            },
        }
    }

    fn to_host_closed(&self) -> bool {
        self.peer_shut & SHUTDOWN_SEND != 0 || self.local_shut & SHUTDOWN_RCV != 0
    }

    fn to_guest_closed(&self) -> bool {
        self.local_shut & SHUTDOWN_SEND != 0 || self.peer_shut & SHUTDOWN_RCV != 0
    }

    /// Guest → host bytes delivered and not yet taken by the host side (what the
    /// adapter buffers; at most [`CONN_BUF_ALLOC`]).
    pub fn pending_to_host(&self) -> u32 {
        self.rx_cnt.wrapping_sub(self.fwd_cnt)
    }

    /// Host → guest bytes we may send now.
    pub fn tx_credit(&self) -> u32 {
        if self.phase != Phase::Open || self.to_guest_closed() {
            return 0;
        }
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn header(&mut self, op: Op, flags: u32, len: u32) -> Header {
        self.fwd_cnt_told = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            ty: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The peer's counters start wherever its first packet says.
    fn take_baseline(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
        self.tx_cnt = h.fwd_cnt;
    }

    /// RST to the guest and abort the host side.
    fn reset(&mut self) -> Vec<Action> {
        let h = self.header(Op::Rst, 0, 0);
        self.phase = Phase::Closed;
        vec![Action::Send(h), Action::Abort]
    }

    /// Takes the peer's credit information; false if it lies (its `fwd_cnt` went
    /// back, or past what we sent).
    fn update_peer_credit(&mut self, h: &Header) -> bool {
        let advance = h.fwd_cnt.wrapping_sub(self.peer_fwd_cnt);
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        if advance > in_flight {
            return false;
        }
        self.peer_fwd_cnt = h.fwd_cnt;
        self.peer_buf_alloc = h.buf_alloc;
        if self.tx_credit() > 0 {
            self.credit_requested = false;
        }
        true
    }

    /// A packet from the guest for this connection.
    pub fn on_packet(&mut self, h: &Header) -> Vec<Action> {
        if self.phase == Phase::Closed {
            return Vec::new();
        }
        if h.op == Op::Rst {
            self.phase = Phase::Closed;
            return vec![Action::Abort];
        }
        if h.ty != TYPE_STREAM {
            return self.reset();
        }
        match (self.phase, h.op) {
            (Phase::LocalInit, Op::Response) => {
                self.take_baseline(h);
                self.phase = Phase::Open;
                vec![Action::Connected]
            }
            (Phase::LocalInit | Phase::PeerInit, _) => self.reset(),
            (Phase::Open, _) if !self.update_peer_credit(h) => self.reset(),
            (Phase::Open, Op::Rw) => self.on_rw(h.len),
            (Phase::Open, Op::Shutdown) => self.on_shutdown(h.flags),
            (Phase::Open, Op::CreditUpdate) => Vec::new(),
            (Phase::Open, Op::CreditRequest) => {
                vec![Action::Send(self.header(Op::CreditUpdate, 0, 0))]
            }
            (Phase::Open, Op::Request | Op::Response) => self.reset(),
            (Phase::Open, Op::Rst) | (Phase::Closed, _) => Vec::new(),
        }
    }

    fn on_rw(&mut self, len: u32) -> Vec<Action> {
        if self.to_host_closed() {
            return self.reset();
        }
        // What the guest was told it may have in flight.
        let used = self.rx_cnt.wrapping_sub(self.fwd_cnt_told);
        if len > CONN_BUF_ALLOC.saturating_sub(used) {
            return self.reset();
        }
        if len == 0 {
            return Vec::new();
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(len);
        vec![Action::Deliver(len)]
    }

    fn on_shutdown(&mut self, flags: u32) -> Vec<Action> {
        let new = flags & !self.peer_shut;
        self.peer_shut |= flags;
        let mut out = Vec::new();
        if new & SHUTDOWN_RCV != 0 {
            out.push(Action::HostShutRead);
        }
        if new & SHUTDOWN_SEND != 0 {
            out.push(Action::HostShutWrite);
        }
        if self.peer_shut == SHUTDOWN_BOTH {
            // The guest closed its socket: it waits for our RST.
            let h = self.header(Op::Rst, 0, 0);
            self.phase = Phase::Closed;
            out.push(Action::Send(h));
            out.push(Action::Close);
        }
        out
    }

    fn wrong(&self, event: &'static str) -> ConnError {
        ConnError::WrongState {
            key: self.key,
            event,
            state: self.state(),
        }
    }

    /// The host side of a guest-initiated connection is connected: RESPONSE.
    pub fn host_accepted(&mut self) -> Result<Header, ConnError> {
        if self.phase != Phase::PeerInit {
            return Err(self.wrong("host accepted"));
        }
        self.phase = Phase::Open;
        Ok(self.header(Op::Response, 0, 0))
    }

    /// Nobody listens on the host side of a guest-initiated connection: RST.
    pub fn host_refused(&mut self) -> Result<Header, ConnError> {
        if self.phase != Phase::PeerInit {
            return Err(self.wrong("host refused"));
        }
        let h = self.header(Op::Rst, 0, 0);
        self.phase = Phase::Closed;
        Ok(h)
    }

    fn shutdown_local(&mut self, flags: u32) -> Option<Header> {
        let new = flags & !self.local_shut;
        if new == 0 {
            return None;
        }
        self.local_shut |= new;
        Some(self.header(Op::Shutdown, self.local_shut, 0))
    }

    /// The host socket reached end of file (the host side sends no more): SHUTDOWN
    /// SEND, and RCV too if the guest has no more to send either.
    pub fn host_eof(&mut self) -> Result<Option<Header>, ConnError> {
        if self.phase != Phase::Open {
            return Err(self.wrong("host EOF"));
        }
        let flags = if self.peer_shut & SHUTDOWN_SEND != 0 {
            SHUTDOWN_BOTH
        } else {
            SHUTDOWN_SEND
        };
        Ok(self.shutdown_local(flags))
    }

    /// The host socket is gone both ways (hang-up, error). Established: SHUTDOWN both
    /// and wait for the guest's RST ([`State::Closing`]); before that: RST.
    pub fn host_closed(&mut self) -> Vec<Action> {
        match self.phase {
            Phase::Closed => Vec::new(),
            Phase::LocalInit | Phase::PeerInit => {
                let h = self.header(Op::Rst, 0, 0);
                self.phase = Phase::Closed;
                vec![Action::Send(h), Action::Abort]
            }
            Phase::Open => self
                .shutdown_local(SHUTDOWN_BOTH)
                .map(Action::Send)
                .into_iter()
                .collect(),
        }
    }

    /// The adapter gives up (the guest did not answer within [`CLOSE_TIMEOUT_MS`] or
    /// [`REQUEST_TIMEOUT_MS`], or a
    /// host error): RST and abort. Nothing if already closed.
    pub fn abort(&mut self) -> Vec<Action> {
        if self.phase == Phase::Closed {
            return Vec::new();
        }
        self.reset()
    }

    /// The host side took `n` delivered bytes; a CREDIT_UPDATE to send when the guest
    /// should hear about it.
    pub fn host_consumed(&mut self, n: u32) -> Result<Option<Header>, ConnError> {
        let pending = self.pending_to_host();
        if n > pending {
            return Err(ConnError::ConsumedTooMuch {
                key: self.key,
                n,
                pending,
            });
        }
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
        let untold = self.fwd_cnt.wrapping_sub(self.fwd_cnt_told);
        if self.phase == Phase::Open && !self.to_host_closed() && untold >= CREDIT_UPDATE_THRESHOLD
        {
            return Ok(Some(self.header(Op::CreditUpdate, 0, 0)));
        }
        Ok(None)
    }

    /// The header of an RW packet carrying `n` host → guest bytes (1..=min(credit,
    /// [`MAX_PAYLOAD`])); counts them as sent.
    pub fn send_rw(&mut self, n: u32) -> Result<Header, ConnError> {
        let credit = self.tx_credit();
        if n == 0 || n > credit || n > MAX_PAYLOAD {
            return Err(ConnError::NoCredit {
                key: self.key,
                n,
                credit,
            });
        }
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
        Ok(self.header(Op::Rw, 0, n))
    }

    /// A CREDIT_REQUEST when the host side has data but no credit, once until credit
    /// comes back (a guest that never answers gets no flood).
    pub fn credit_request(&mut self) -> Option<Header> {
        if self.phase != Phase::Open
            || self.to_guest_closed()
            || self.tx_credit() > 0
            || self.credit_requested
        {
            return None;
        }
        self.credit_requested = true;
        Some(self.header(Op::CreditRequest, 0, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: u64 = 3;
    const KEY: ConnKey = ConnKey {
        local_port: 1 << 30,
        peer_port: 5000,
    };

    /// A packet from the guest for KEY.
    fn pkt(op: Op) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: KEY.peer_port,
            dst_port: KEY.local_port,
            len: 0,
            ty: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    fn rw(len: u32) -> Header {
        Header { len, ..pkt(Op::Rw) }
    }

    fn shutdown(flags: u32) -> Header {
        Header {
            flags,
            ..pkt(Op::Shutdown)
        }
    }

    fn sent(actions: &[Action]) -> Vec<Op> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(h) => Some(h.op),
                _ => None,
            })
            .collect()
    }

    fn is_rst_abort(actions: &[Action]) -> bool {
        matches!(actions, [Action::Send(h), Action::Abort] if h.op == Op::Rst)
    }

    /// A guest-initiated connection, accepted by the host side.
    fn established() -> Conn {
        let mut c = Conn::from_request(CID, &pkt(Op::Request));
        c.host_accepted().expect("accept");
        c
    }

    #[test]
    fn host_connect_sends_request_and_response_establishes() {
        let (mut c, req) = Conn::connect(CID, KEY);
        assert_eq!(c.state(), State::LocalInit);
        assert_eq!(req.op, Op::Request);
        assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, CID));
        assert_eq!((req.src_port, req.dst_port), (1 << 30, 5000));
        assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
        assert_eq!(c.tx_credit(), 0);
        assert_eq!(c.on_packet(&pkt(Op::Response)), vec![Action::Connected]);
        assert_eq!(c.state(), State::Established);
        assert_eq!(c.tx_credit(), 64 * 1024);
    }

    #[test]
    fn host_connect_refused_by_guest_rst_closes_without_reply() {
        let (mut c, _) = Conn::connect(CID, KEY);
        assert_eq!(c.on_packet(&pkt(Op::Rst)), vec![Action::Abort]);
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn data_before_response_is_answered_with_rst() {
        for op in [Op::Rw, Op::Request, Op::Shutdown, Op::CreditUpdate] {
            let (mut c, _) = Conn::connect(CID, KEY);
            assert!(is_rst_abort(&c.on_packet(&pkt(op))), "{op:?}");
            assert_eq!(c.state(), State::Closed);
        }
    }

    #[test]
    fn guest_connect_waits_for_host_then_responds() {
        let mut c = Conn::from_request(CID, &pkt(Op::Request));
        assert_eq!(c.key(), KEY);
        assert_eq!(c.state(), State::PeerInit);
        let h = c.host_accepted().expect("accept");
        assert_eq!(h.op, Op::Response);
        assert_eq!((h.src_port, h.dst_port), (KEY.local_port, KEY.peer_port));
        assert_eq!(c.state(), State::Established);
        assert!(c.host_accepted().is_err());
        assert!(c.host_refused().is_err());
    }

    #[test]
    fn guest_connect_to_port_nobody_listens_on_gets_rst() {
        let mut c = Conn::from_request(CID, &pkt(Op::Request));
        assert_eq!(c.host_refused().map(|h| h.op), Ok(Op::Rst));
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn guest_packet_while_host_connects_is_answered_with_rst() {
        let mut c = Conn::from_request(CID, &pkt(Op::Request));
        assert!(is_rst_abort(&c.on_packet(&rw(10))));
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn rw_is_delivered_and_counted() {
        let mut c = established();
        assert_eq!(c.on_packet(&rw(100)), vec![Action::Deliver(100)]);
        assert_eq!(c.pending_to_host(), 100);
        assert_eq!(c.host_consumed(100), Ok(None));
        assert_eq!(c.pending_to_host(), 0);
    }

    #[test]
    fn zero_length_rw_delivers_nothing_and_keeps_the_connection() {
        let mut c = established();
        assert_eq!(c.on_packet(&rw(0)), vec![]);
        assert_eq!(c.state(), State::Established);
        assert_eq!(c.pending_to_host(), 0);
    }

    #[test]
    fn guest_may_fill_exactly_the_advertised_buffer() {
        let mut c = established();
        let mut total = 0;
        while total < CONN_BUF_ALLOC {
            assert_eq!(
                c.on_packet(&rw(MAX_PAYLOAD)),
                vec![Action::Deliver(MAX_PAYLOAD)]
            );
            total += MAX_PAYLOAD;
        }
        assert_eq!(c.pending_to_host(), CONN_BUF_ALLOC);
        assert_eq!(c.state(), State::Established);
    }

    #[test]
    fn guest_sending_beyond_credit_is_reset() {
        let mut c = established();
        for _ in 0..CONN_BUF_ALLOC / MAX_PAYLOAD {
            c.on_packet(&rw(MAX_PAYLOAD));
        }
        assert!(is_rst_abort(&c.on_packet(&rw(1))));
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn credit_the_guest_was_not_told_about_does_not_count() {
        // The host side took bytes, but below the threshold: no CREDIT_UPDATE went
        // out, so the guest's credit is still what it was told.
        let mut c = established();
        for _ in 0..CONN_BUF_ALLOC / MAX_PAYLOAD {
            c.on_packet(&rw(MAX_PAYLOAD));
        }
        assert_eq!(c.host_consumed(100), Ok(None));
        assert!(is_rst_abort(&c.on_packet(&rw(1))));
    }

    #[test]
    fn credit_update_after_threshold_then_guest_may_send_more() {
        let mut c = established();
        for _ in 0..CONN_BUF_ALLOC / MAX_PAYLOAD {
            c.on_packet(&rw(MAX_PAYLOAD));
        }
        assert_eq!(c.host_consumed(CREDIT_UPDATE_THRESHOLD - 1), Ok(None));
        let up = c
            .host_consumed(1)
            .expect("consumed")
            .expect("credit update");
        assert_eq!(up.op, Op::CreditUpdate);
        assert_eq!(up.fwd_cnt, CREDIT_UPDATE_THRESHOLD);
        assert_eq!(up.buf_alloc, CONN_BUF_ALLOC);
        assert_eq!(
            c.on_packet(&rw(CREDIT_UPDATE_THRESHOLD)),
            vec![Action::Deliver(CREDIT_UPDATE_THRESHOLD)]
        );
        assert!(is_rst_abort(&c.on_packet(&rw(1))));
    }

    #[test]
    fn host_consuming_more_than_delivered_is_an_error() {
        let mut c = established();
        c.on_packet(&rw(10));
        assert_eq!(
            c.host_consumed(11),
            Err(ConnError::ConsumedTooMuch {
                key: KEY,
                n: 11,
                pending: 10
            })
        );
        assert_eq!(c.pending_to_host(), 10);
    }

    #[test]
    fn credit_request_is_answered_with_credit_update() {
        let mut c = established();
        c.on_packet(&rw(10));
        c.host_consumed(10).expect("consumed");
        let a = c.on_packet(&pkt(Op::CreditRequest));
        assert!(
            matches!(a.as_slice(), [Action::Send(h)] if h.op == Op::CreditUpdate && h.fwd_cnt == 10)
        );
    }

    #[test]
    fn tx_credit_follows_peer_buf_alloc_and_fwd_cnt() {
        let mut c = established();
        assert_eq!(c.tx_credit(), 64 * 1024);
        let h = c.send_rw(40_000).expect("send");
        assert_eq!((h.op, h.len), (Op::Rw, 40_000));
        assert_eq!(c.tx_credit(), 64 * 1024 - 40_000);
        assert!(c.send_rw(64 * 1024 - 40_000 + 1).is_err());
        // The guest took 30000 bytes and says so.
        let up = Header {
            fwd_cnt: 30_000,
            ..pkt(Op::CreditUpdate)
        };
        assert_eq!(c.on_packet(&up), vec![]);
        assert_eq!(c.tx_credit(), 64 * 1024 - 10_000);
        // The guest shrinks its buffer below what is in flight: no credit, no panic.
        let shrink = Header {
            fwd_cnt: 30_000,
            buf_alloc: 5_000,
            ..pkt(Op::CreditUpdate)
        };
        c.on_packet(&shrink);
        assert_eq!(c.tx_credit(), 0);
        assert_eq!(c.state(), State::Established);
    }

    #[test]
    fn send_rw_rejects_zero_and_oversized_packets() {
        let mut c = established();
        let big = Header {
            buf_alloc: u32::MAX,
            ..pkt(Op::CreditUpdate)
        };
        c.on_packet(&big);
        assert!(c.send_rw(0).is_err());
        assert!(c.send_rw(MAX_PAYLOAD + 1).is_err());
        assert!(c.send_rw(MAX_PAYLOAD).is_ok());
    }

    #[test]
    fn peer_fwd_cnt_past_what_we_sent_is_a_lie_and_resets() {
        let mut c = established();
        c.send_rw(100).expect("send");
        let lie = Header {
            fwd_cnt: 101,
            ..pkt(Op::CreditUpdate)
        };
        assert!(is_rst_abort(&c.on_packet(&lie)));
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn peer_fwd_cnt_going_back_is_a_lie_and_resets() {
        let mut c = established();
        c.send_rw(100).expect("send");
        c.on_packet(&Header {
            fwd_cnt: 60,
            ..pkt(Op::CreditUpdate)
        });
        let back = Header {
            fwd_cnt: 59,
            ..pkt(Op::CreditUpdate)
        };
        assert!(is_rst_abort(&c.on_packet(&back)));
    }

    #[test]
    fn credit_request_sent_once_until_credit_returns() {
        let mut c = established();
        c.send_rw(MAX_PAYLOAD).expect("send");
        assert_eq!(c.tx_credit(), 0);
        assert_eq!(c.credit_request().map(|h| h.op), Some(Op::CreditRequest));
        assert_eq!(c.credit_request(), None);
        c.on_packet(&Header {
            fwd_cnt: 1,
            ..pkt(Op::CreditUpdate)
        });
        assert_eq!(c.tx_credit(), 1);
        assert_eq!(c.credit_request(), None);
        c.send_rw(1).expect("send");
        assert_eq!(c.credit_request().map(|h| h.op), Some(Op::CreditRequest));
    }

    #[test]
    fn counters_wrap_around_u32_without_false_lies() {
        // The guest's counters start near u32::MAX; ours cross it while sending.
        let start = u32::MAX - 1000;
        let req = Header {
            fwd_cnt: start,
            ..pkt(Op::Request)
        };
        let mut c = Conn::from_request(CID, &req);
        c.host_accepted().expect("accept");
        let mut peer_fwd = start;
        for _ in 0..10 {
            c.send_rw(MAX_PAYLOAD).expect("send");
            peer_fwd = peer_fwd.wrapping_add(MAX_PAYLOAD);
            let up = Header {
                fwd_cnt: peer_fwd,
                ..pkt(Op::CreditUpdate)
            };
            assert_eq!(c.on_packet(&up), vec![]);
            assert_eq!(c.tx_credit(), 64 * 1024);
        }
        // Our receive counters wrap too: 2^32 bytes through in MAX_PAYLOAD steps
        // would be slow, so start them near the top.
        c.rx_cnt = u32::MAX - 10;
        c.fwd_cnt = c.rx_cnt;
        c.fwd_cnt_told = c.rx_cnt;
        for _ in 0..8 {
            // Every guest packet carries its (wrapped) fwd_cnt.
            let data = Header {
                fwd_cnt: peer_fwd,
                ..rw(MAX_PAYLOAD)
            };
            assert_eq!(c.on_packet(&data), vec![Action::Deliver(MAX_PAYLOAD)]);
            c.host_consumed(MAX_PAYLOAD).expect("consume");
        }
        assert_eq!(c.pending_to_host(), 0);
        assert!(c.rx_cnt < 8 * MAX_PAYLOAD);
        assert_eq!(c.state(), State::Established);
    }

    #[test]
    fn guest_shutdown_send_closes_host_write_half_and_later_rw_resets() {
        let mut c = established();
        assert_eq!(
            c.on_packet(&shutdown(SHUTDOWN_SEND)),
            vec![Action::HostShutWrite]
        );
        assert_eq!(c.state(), State::GuestToHostClosed);
        // We may still send to the guest.
        assert!(c.tx_credit() > 0);
        assert!(is_rst_abort(&c.on_packet(&rw(1))));
    }

    #[test]
    fn guest_shutdown_rcv_stops_host_reads_and_our_credit() {
        let mut c = established();
        assert_eq!(
            c.on_packet(&shutdown(SHUTDOWN_RCV)),
            vec![Action::HostShutRead]
        );
        assert_eq!(c.state(), State::HostToGuestClosed);
        assert_eq!(c.tx_credit(), 0);
        assert!(c.send_rw(1).is_err());
        assert_eq!(c.credit_request(), None);
        // The guest may still send.
        assert_eq!(c.on_packet(&rw(5)), vec![Action::Deliver(5)]);
    }

    #[test]
    fn guest_shutdown_both_halves_gets_rst_and_graceful_close() {
        let mut c = established();
        let a = c.on_packet(&shutdown(SHUTDOWN_BOTH));
        assert_eq!(a.len(), 4);
        assert_eq!(&a[..2], &[Action::HostShutRead, Action::HostShutWrite]);
        assert_eq!(sent(&a), vec![Op::Rst]);
        assert_eq!(a[3], Action::Close);
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn guest_shutdown_halves_one_at_a_time_then_rst() {
        let mut c = established();
        c.on_packet(&shutdown(SHUTDOWN_SEND));
        // Repeating a half is harmless.
        assert_eq!(c.on_packet(&shutdown(SHUTDOWN_SEND)), vec![]);
        assert_eq!(c.on_packet(&shutdown(0)), vec![]);
        let a = c.on_packet(&shutdown(SHUTDOWN_RCV));
        assert_eq!(a[0], Action::HostShutRead);
        assert_eq!(sent(&a), vec![Op::Rst]);
        assert_eq!(a.last(), Some(&Action::Close));
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn host_eof_sends_shutdown_send_and_guest_may_still_send() {
        let mut c = established();
        let h = c.host_eof().expect("eof").expect("shutdown");
        assert_eq!((h.op, h.flags), (Op::Shutdown, SHUTDOWN_SEND));
        assert_eq!(c.state(), State::HostToGuestClosed);
        assert_eq!(c.tx_credit(), 0);
        assert_eq!(c.on_packet(&rw(3)), vec![Action::Deliver(3)]);
        // A second EOF sends nothing more.
        assert_eq!(c.host_eof(), Ok(None));
    }

    #[test]
    fn host_eof_after_guest_shut_send_closes_both_and_waits_for_rst() {
        let mut c = established();
        c.on_packet(&shutdown(SHUTDOWN_SEND));
        let h = c.host_eof().expect("eof").expect("shutdown");
        assert_eq!(h.flags, SHUTDOWN_BOTH);
        assert_eq!(c.state(), State::Closing);
        assert_eq!(c.on_packet(&pkt(Op::Rst)), vec![Action::Abort]);
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn host_eof_then_guest_shut_send_is_closing_and_guest_close_gets_rst() {
        let mut c = established();
        c.host_eof().expect("eof");
        assert_eq!(
            c.on_packet(&shutdown(SHUTDOWN_SEND)),
            vec![Action::HostShutWrite]
        );
        assert_eq!(c.state(), State::Closing);
        let a = c.on_packet(&shutdown(SHUTDOWN_BOTH));
        assert_eq!(sent(&a), vec![Op::Rst]);
        assert_eq!(a.last(), Some(&Action::Close));
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn host_close_established_sends_shutdown_both_then_timeout_resets() {
        let mut c = established();
        let a = c.host_closed();
        assert!(
            matches!(a.as_slice(), [Action::Send(h)] if h.op == Op::Shutdown && h.flags == SHUTDOWN_BOTH)
        );
        assert_eq!(c.state(), State::Closing);
        assert_eq!(c.host_closed(), vec![]);
        // The guest never answers: the adapter's timer fires.
        assert!(is_rst_abort(&c.abort()));
        assert_eq!(c.state(), State::Closed);
        assert_eq!(c.abort(), vec![]);
    }

    #[test]
    fn host_close_then_guest_full_shutdown_gets_rst() {
        let mut c = established();
        c.host_closed();
        let a = c.on_packet(&shutdown(SHUTDOWN_BOTH));
        assert_eq!(sent(&a), vec![Op::Rst]);
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn host_close_before_established_resets() {
        let (mut c, _) = Conn::connect(CID, KEY);
        assert!(is_rst_abort(&c.host_closed()));
        assert_eq!(c.state(), State::Closed);
        let mut c = Conn::from_request(CID, &pkt(Op::Request));
        assert!(is_rst_abort(&c.host_closed()));
    }

    #[test]
    fn host_events_in_the_wrong_state_are_errors_not_panics() {
        let (mut c, _) = Conn::connect(CID, KEY);
        assert!(matches!(
            c.host_eof(),
            Err(ConnError::WrongState {
                state: State::LocalInit,
                ..
            })
        ));
        assert!(c.host_accepted().is_err());
        assert!(c.send_rw(1).is_err());
        assert_eq!(c.credit_request(), None);
    }

    #[test]
    fn duplicate_request_or_response_on_established_resets() {
        for op in [Op::Request, Op::Response] {
            let mut c = established();
            assert!(is_rst_abort(&c.on_packet(&pkt(op))), "{op:?}");
        }
    }

    #[test]
    fn non_stream_packet_on_a_connection_resets() {
        let mut c = established();
        let h = Header { ty: 2, ..rw(1) };
        assert!(is_rst_abort(&c.on_packet(&h)));
    }

    #[test]
    fn guest_rst_on_established_aborts_without_reply() {
        let mut c = established();
        assert_eq!(c.on_packet(&pkt(Op::Rst)), vec![Action::Abort]);
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn packets_after_close_are_ignored() {
        let mut c = established();
        c.on_packet(&pkt(Op::Rst));
        for op in [Op::Rw, Op::Request, Op::Rst, Op::CreditRequest] {
            assert_eq!(c.on_packet(&pkt(op)), vec![]);
        }
    }

    #[test]
    fn every_header_we_send_carries_our_credit() {
        let mut c = established();
        c.on_packet(&rw(7));
        c.host_consumed(7).expect("consume");
        let h = c.send_rw(1).expect("send");
        assert_eq!((h.buf_alloc, h.fwd_cnt), (CONN_BUF_ALLOC, 7));
        assert_eq!((h.src_cid, h.dst_cid, h.ty), (HOST_CID, CID, TYPE_STREAM));
    }
}
