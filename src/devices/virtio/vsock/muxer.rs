//! The table of connections of one vsock device, and the host side's handshake.
//!
//! Host-initiated: a client of the device's UNIX socket writes `CONNECT <port>\n`
//! ([`parse_connect`]); [`Muxer::host_connect`] gives the connection a host port from
//! [`HOST_PORT_BASE`] upward and the REQUEST for the guest; when the guest answers
//! RESPONSE the connection's [`Action::Connected`] tells the adapter to write
//! [`ok_line`]. Guest-initiated: a REQUEST for host port P is answered by
//! [`MuxAction::ConnectHost`]; the adapter connects to `PATH_P` and reports with
//! [`Muxer::host_accepted`] or [`Muxer::host_refused`] (RST: nobody listens).
//!
//! Packets for no known connection are answered with RST (an RST itself is never
//! answered); REQUESTs beyond the table's maximum too. A packet not from the guest's
//! CID or not to the host's is dropped. A guest reset forgets every connection.
#![forbid(unsafe_code)]

use std::collections::HashMap;

use super::conn::{Action, Conn, ConnError, ConnKey, State, CONN_BUF_ALLOC};
use super::packet::{Header, Op, HOST_CID, TYPE_STREAM};

/// The first host port given to host-initiated connections (as Firecracker does);
/// after `u32::MAX` allocation starts again here.
pub const HOST_PORT_BASE: u32 = 1 << 30;

/// Connections per device unless configured otherwise: with [`CONN_BUF_ALLOC`] this
/// bounds the guest → host bytes held for a device to 32 MiB.
pub const DEFAULT_MAX_CONNECTIONS: usize = 128;

/// The longest `CONNECT <port>\n` line read (the longest valid one is 19 bytes).
pub const MAX_CONNECT_LINE: usize = 32;

/// Worst-case guest → host bytes a device with `max_connections` buffers.
pub const fn max_buffered(max_connections: usize) -> usize {
    max_connections.saturating_mul(CONN_BUF_ALLOC as usize)
}

/// Why a muxer operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    #[error("vsock guest CID {cid} is reserved or too large (3..=4294967294)")]
    BadCid { cid: u64 },
    #[error("vsock maximum of connections must be at least 1")]
    NoConnectionsAllowed,
    #[error("vsock: {max} connections already open")]
    TooManyConnections { max: usize },
    #[error("vsock: no connection {key:?}")]
    UnknownConnection { key: ConnKey },
    #[error("vsock handshake line {line:?} is not `CONNECT <port>`")]
    BadConnectLine { line: String },
    #[error(transparent)]
    Conn(#[from] ConnError),
}

/// The result of reading a host client's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectLine {
    /// No newline yet (and fewer than [`MAX_CONNECT_LINE`] bytes): read more.
    Incomplete,
    /// The guest port asked for; `consumed` bytes (through the newline) were the line,
    /// anything after them is data for the guest.
    Port { port: u32, consumed: usize },
}

/// Parses `CONNECT <port>\n` at the start of `buf` (the word in any case, blanks
/// around the words allowed, as Firecracker's clients send it).
pub fn parse_connect(buf: &[u8]) -> Result<ConnectLine, MuxError> {
    let window = &buf[..buf.len().min(MAX_CONNECT_LINE)];
    let Some(nl) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() >= MAX_CONNECT_LINE {
            return Err(MuxError::BadConnectLine {
                line: String::from_utf8_lossy(window).into_owned(),
            });
        }
        return Ok(ConnectLine::Incomplete);
    };
    let bad = || MuxError::BadConnectLine {
        line: String::from_utf8_lossy(&window[..nl]).into_owned(),
    };
    let line = std::str::from_utf8(&window[..nl]).map_err(|_| bad())?;
    let mut words = line.split_ascii_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(w), Some(p), None)
            if w.eq_ignore_ascii_case("connect") && p.bytes().all(|b| b.is_ascii_digit()) =>
        {
            let port = p.parse::<u32>().map_err(|_| bad())?;
            Ok(ConnectLine::Port {
                port,
                consumed: nl + 1,
            })
        }
        _ => Err(bad()),
    }
}

/// The answer to a host client once the guest accepted its connection.
pub fn ok_line(host_port: u32) -> String {
    format!("OK {host_port}\n")
}

/// What the adapter does after a guest packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MuxAction {
    /// An action of connection `key` (see [`Action`]).
    Conn(ConnKey, Action),
    /// A new guest-initiated connection: connect to the host socket for
    /// `key.local_port`, then call [`Muxer::host_accepted`] or [`Muxer::host_refused`].
    ConnectHost(ConnKey),
    /// A header for the guest that belongs to no connection (an RST).
    Send(Header),
}

/// The connections of one device.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    max_connections: usize,
    conns: HashMap<ConnKey, Conn>,
    next_host_port: u32,
    /// Packets dropped because they were not from the guest's CID to the host's.
    pub misaddressed: u64,
}

impl Muxer {
    pub fn new(guest_cid: u64, max_connections: usize) -> Result<Self, MuxError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(MuxError::BadCid { cid: guest_cid });
        }
        if max_connections == 0 {
            return Err(MuxError::NoConnectionsAllowed);
        }
        Ok(Self {
            guest_cid,
            max_connections,
            conns: HashMap::new(),
            next_host_port: HOST_PORT_BASE,
            misaddressed: 0,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Open connections (in any state but closed).
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn conn(&self, key: ConnKey) -> Option<&Conn> {
        self.conns.get(&key)
    }

    /// For host-side events ([`Conn::host_eof`], [`Conn::host_consumed`],
    /// [`Conn::send_rw`], ...); call [`Self::forget_if_closed`] afterwards.
    pub fn conn_mut(&mut self, key: ConnKey) -> Option<&mut Conn> {
        self.conns.get_mut(&key)
    }

    /// Drops `key` from the table if it is closed; true if it was.
    pub fn forget_if_closed(&mut self, key: ConnKey) -> bool {
        let closed = self
            .conns
            .get(&key)
            .is_some_and(|c| c.state() == State::Closed);
        if closed {
            self.conns.remove(&key);
        }
        closed
    }

    /// A host client asked for guest port `guest_port`: a new connection with a free
    /// host port, and the REQUEST to send to the guest.
    pub fn host_connect(&mut self, guest_port: u32) -> Result<(ConnKey, Header), MuxError> {
        if self.conns.len() >= self.max_connections {
            return Err(MuxError::TooManyConnections {
                max: self.max_connections,
            });
        }
        // The next port whose key is free: at most `len` keys are taken, so this
        // ends within len + 1 tries.
        let key = loop {
            let key = ConnKey {
                local_port: self.next_host_port,
                peer_port: guest_port,
            };
            self.next_host_port = key.local_port.checked_add(1).unwrap_or(HOST_PORT_BASE);
            if !self.conns.contains_key(&key) {
                break key;
            }
        };
        let (conn, request) = Conn::connect(self.guest_cid, key);
        self.conns.insert(key, conn);
        Ok((key, request))
    }

    /// The host side of guest-initiated `key` is connected: the RESPONSE to send.
    pub fn host_accepted(&mut self, key: ConnKey) -> Result<Header, MuxError> {
        let conn = self
            .conns
            .get_mut(&key)
            .ok_or(MuxError::UnknownConnection { key })?;
        Ok(conn.host_accepted()?)
    }

    /// Nobody listens for guest-initiated `key`: the RST to send; the connection is
    /// forgotten.
    pub fn host_refused(&mut self, key: ConnKey) -> Result<Header, MuxError> {
        let conn = self
            .conns
            .get_mut(&key)
            .ok_or(MuxError::UnknownConnection { key })?;
        let rst = conn.host_refused()?;
        self.conns.remove(&key);
        Ok(rst)
    }

    /// A packet from the guest (header already parsed and validated).
    pub fn on_packet(&mut self, h: &Header) -> Vec<MuxAction> {
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            self.misaddressed += 1;
            return Vec::new();
        }
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            let actions = conn.on_packet(h);
            self.forget_if_closed(key);
            return actions
                .into_iter()
                .map(|a| MuxAction::Conn(key, a))
                .collect();
        }
        match h.op {
            Op::Rst => Vec::new(),
            Op::Request if h.ty == TYPE_STREAM && self.conns.len() < self.max_connections => {
                self.conns
                    .insert(key, Conn::from_request(self.guest_cid, h));
                vec![MuxAction::ConnectHost(key)]
            }
            _ => vec![MuxAction::Send(Header::rst_reply(h))],
        }
    }

    /// The guest reset the device (or rebooted): every connection is forgotten; the
    /// keys returned are the host sockets to close at once.
    pub fn reset(&mut self) -> Vec<ConnKey> {
        let mut keys: Vec<ConnKey> = self.conns.drain().map(|(k, _)| k).collect();
        keys.sort_unstable();
        self.next_host_port = HOST_PORT_BASE;
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::super::packet::{MAX_PAYLOAD, SHUTDOWN_BOTH, SHUTDOWN_SEND};
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;

    const CID: u64 = 3;

    fn from_guest(op: Op, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            ty: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    fn muxer(max: usize) -> Muxer {
        Muxer::new(CID, max).expect("muxer")
    }

    fn key(local_port: u32, peer_port: u32) -> ConnKey {
        ConnKey {
            local_port,
            peer_port,
        }
    }

    fn is_rst(a: &[MuxAction]) -> bool {
        matches!(a, [MuxAction::Send(h)] if h.op == Op::Rst)
    }

    #[test]
    fn reserved_or_oversized_guest_cids_are_rejected() {
        for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 32, u64::MAX] {
            assert_eq!(
                Muxer::new(cid, 1).map(|_| ()),
                Err(MuxError::BadCid { cid })
            );
        }
        assert!(Muxer::new(3, 1).is_ok());
        assert!(Muxer::new(u64::from(u32::MAX) - 1, 1).is_ok());
        assert_eq!(
            Muxer::new(3, 0).map(|_| ()),
            Err(MuxError::NoConnectionsAllowed)
        );
    }

    #[test]
    fn bound_on_buffered_bytes_is_stated() {
        assert_eq!(max_buffered(DEFAULT_MAX_CONNECTIONS), 32 << 20);
        assert_eq!(max_buffered(usize::MAX), usize::MAX);
    }

    #[test]
    fn connect_line_is_parsed_with_its_length() {
        assert_eq!(
            parse_connect(b"CONNECT 52\n"),
            Ok(ConnectLine::Port {
                port: 52,
                consumed: 11
            })
        );
        assert_eq!(
            parse_connect(b"connect   4294967295 \nhello"),
            Ok(ConnectLine::Port {
                port: u32::MAX,
                consumed: 22
            })
        );
    }

    #[test]
    fn connect_line_without_newline_waits_for_more() {
        assert_eq!(parse_connect(b""), Ok(ConnectLine::Incomplete));
        assert_eq!(parse_connect(b"CONNECT 52"), Ok(ConnectLine::Incomplete));
    }

    #[test]
    fn connect_line_too_long_is_refused_without_waiting() {
        let long = [b'C'; MAX_CONNECT_LINE];
        assert!(matches!(
            parse_connect(&long),
            Err(MuxError::BadConnectLine { .. })
        ));
        let mut padded = b"CONNECT".to_vec();
        padded.resize(MAX_CONNECT_LINE, b' ');
        padded.extend_from_slice(b"5\n");
        assert!(parse_connect(&padded).is_err());
    }

    #[test]
    fn malformed_connect_lines_are_refused() {
        for line in [
            &b"\n"[..],
            b"CONNECT\n",
            b"CONNECT x\n",
            b"CONNECT -1\n",
            b"CONNECT +5\n",
            b"CONNECT 4294967296\n",
            b"CONNECT 5 6\n",
            b"CONNEC 5\n",
            b"LISTEN 5\n",
            b"CONNECT \xff\n",
        ] {
            assert!(
                matches!(parse_connect(line), Err(MuxError::BadConnectLine { .. })),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn ok_line_names_the_host_port() {
        assert_eq!(ok_line(1 << 30), "OK 1073741824\n");
    }

    #[test]
    fn host_connect_allocates_ports_from_2_pow_30_and_completes_on_response() {
        let mut m = muxer(4);
        let (k1, req) = m.host_connect(52).expect("connect");
        assert_eq!(k1, key(HOST_PORT_BASE, 52));
        assert_eq!(
            (req.op, req.src_port, req.dst_port, req.dst_cid),
            (Op::Request, HOST_PORT_BASE, 52, CID)
        );
        let (k2, _) = m.host_connect(52).expect("connect");
        assert_eq!(k2.local_port, HOST_PORT_BASE + 1);
        let a = m.on_packet(&from_guest(Op::Response, 52, HOST_PORT_BASE));
        assert_eq!(a, vec![MuxAction::Conn(k1, Action::Connected)]);
        assert_eq!(m.conn(k1).map(Conn::state), Some(State::Established));
        assert_eq!(m.conn(k2).map(Conn::state), Some(State::LocalInit));
    }

    #[test]
    fn host_port_allocation_wraps_and_skips_ports_in_use() {
        let mut m = muxer(4);
        let (k0, _) = m.host_connect(1).expect("connect");
        m.next_host_port = u32::MAX;
        let (k1, _) = m.host_connect(1).expect("connect");
        assert_eq!(k1.local_port, u32::MAX);
        // Wraps to the base, which k0 holds: the next one is taken instead.
        let (k2, _) = m.host_connect(1).expect("connect");
        assert_eq!(k0.local_port, HOST_PORT_BASE);
        assert_eq!(k2.local_port, HOST_PORT_BASE + 1);
    }

    #[test]
    fn host_connect_beyond_max_is_refused() {
        let mut m = muxer(2);
        m.host_connect(1).expect("connect");
        m.host_connect(2).expect("connect");
        assert_eq!(
            m.host_connect(3).map(|_| ()),
            Err(MuxError::TooManyConnections { max: 2 })
        );
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn guest_refusing_host_connect_forgets_the_connection() {
        let mut m = muxer(2);
        let (k, _) = m.host_connect(52).expect("connect");
        let a = m.on_packet(&from_guest(Op::Rst, 52, k.local_port));
        assert_eq!(a, vec![MuxAction::Conn(k, Action::Abort)]);
        assert!(m.is_empty());
    }

    #[test]
    fn guest_request_asks_for_host_connect_then_response() {
        let mut m = muxer(2);
        let a = m.on_packet(&from_guest(Op::Request, 40000, 1234));
        let k = key(1234, 40000);
        assert_eq!(a, vec![MuxAction::ConnectHost(k)]);
        assert_eq!(m.conn(k).map(Conn::state), Some(State::PeerInit));
        let resp = m.host_accepted(k).expect("accept");
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port),
            (Op::Response, 1234, 40000)
        );
        assert_eq!(m.conn(k).map(Conn::state), Some(State::Established));
    }

    #[test]
    fn guest_request_to_port_nobody_listens_on_gets_rst_and_is_forgotten() {
        let mut m = muxer(2);
        m.on_packet(&from_guest(Op::Request, 40000, 1234));
        let k = key(1234, 40000);
        let rst = m.host_refused(k).expect("refuse");
        assert_eq!((rst.op, rst.dst_port), (Op::Rst, 40000));
        assert!(m.is_empty());
        assert_eq!(
            m.host_refused(k),
            Err(MuxError::UnknownConnection { key: k })
        );
        assert!(matches!(
            m.host_accepted(k),
            Err(MuxError::UnknownConnection { .. })
        ));
    }

    #[test]
    fn host_accept_in_wrong_state_is_an_error() {
        let mut m = muxer(2);
        let (k, _) = m.host_connect(52).expect("connect");
        assert!(matches!(m.host_accepted(k), Err(MuxError::Conn(_))));
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn flood_of_requests_beyond_max_gets_rst_and_table_stays_bounded() {
        let mut m = muxer(8);
        for port in 0..1000u32 {
            let a = m.on_packet(&from_guest(Op::Request, port, 1234));
            if port < 8 {
                assert_eq!(a, vec![MuxAction::ConnectHost(key(1234, port))]);
            } else {
                assert!(is_rst(&a), "request {port}");
            }
        }
        assert_eq!(m.len(), 8);
        // Host clients are refused too while the table is full.
        assert!(m.host_connect(1).is_err());
    }

    #[test]
    fn packets_for_unknown_connections_get_rst() {
        let mut m = muxer(2);
        for op in [
            Op::Response,
            Op::Rw,
            Op::Shutdown,
            Op::CreditUpdate,
            Op::CreditRequest,
        ] {
            let a = m.on_packet(&from_guest(op, 7, 8));
            assert!(
                matches!(a.as_slice(), [MuxAction::Send(h)] if h.op == Op::Rst && h.src_port == 8 && h.dst_port == 7),
                "{op:?}"
            );
        }
        assert!(m.is_empty());
    }

    #[test]
    fn rst_for_unknown_connection_is_not_answered() {
        let mut m = muxer(2);
        assert_eq!(m.on_packet(&from_guest(Op::Rst, 7, 8)), vec![]);
    }

    #[test]
    fn non_stream_request_gets_rst_with_its_type() {
        let mut m = muxer(2);
        let h = Header {
            ty: 2,
            ..from_guest(Op::Request, 7, 8)
        };
        let a = m.on_packet(&h);
        assert!(matches!(a.as_slice(), [MuxAction::Send(r)] if r.op == Op::Rst && r.ty == 2));
        assert!(m.is_empty());
    }

    #[test]
    fn misaddressed_packets_are_dropped_and_counted() {
        let mut m = muxer(2);
        let wrong_src = Header {
            src_cid: 4,
            ..from_guest(Op::Request, 7, 8)
        };
        let wrong_dst = Header {
            dst_cid: 5,
            ..from_guest(Op::Request, 7, 8)
        };
        assert_eq!(m.on_packet(&wrong_src), vec![]);
        assert_eq!(m.on_packet(&wrong_dst), vec![]);
        assert_eq!(m.misaddressed, 2);
        assert!(m.is_empty());
    }

    #[test]
    fn duplicate_request_resets_and_forgets_the_connection() {
        let mut m = muxer(2);
        m.on_packet(&from_guest(Op::Request, 7, 8));
        let k = key(8, 7);
        m.host_accepted(k).expect("accept");
        let a = m.on_packet(&from_guest(Op::Request, 7, 8));
        assert!(matches!(
            a.as_slice(),
            [MuxAction::Conn(_, Action::Send(h)), MuxAction::Conn(_, Action::Abort)] if h.op == Op::Rst
        ));
        assert!(m.is_empty());
    }

    #[test]
    fn closed_connections_are_forgotten_and_free_their_slot() {
        let mut m = muxer(1);
        m.on_packet(&from_guest(Op::Request, 7, 8));
        let k = key(8, 7);
        m.host_accepted(k).expect("accept");
        let sd = Header {
            flags: SHUTDOWN_BOTH,
            ..from_guest(Op::Shutdown, 7, 8)
        };
        let a = m.on_packet(&sd);
        assert_eq!(a.last(), Some(&MuxAction::Conn(k, Action::Close)));
        assert!(m.is_empty());
        // The slot is free again.
        assert!(m.host_connect(9).is_ok());
    }

    #[test]
    fn host_side_events_then_forget_if_closed() {
        let mut m = muxer(2);
        m.on_packet(&from_guest(Op::Request, 7, 8));
        let k = key(8, 7);
        m.host_accepted(k).expect("accept");
        let c = m.conn_mut(k).expect("conn");
        let sd = c.host_eof().expect("eof").expect("shutdown");
        assert_eq!(sd.flags, SHUTDOWN_SEND);
        assert!(!m.forget_if_closed(k));
        let c = m.conn_mut(k).expect("conn");
        c.abort();
        assert!(m.forget_if_closed(k));
        assert!(m.conn(k).is_none());
    }

    #[test]
    fn guest_reset_closes_every_connection() {
        let mut m = muxer(8);
        let (k1, _) = m.host_connect(1).expect("connect");
        m.on_packet(&from_guest(Op::Request, 7, 8));
        m.host_accepted(key(8, 7)).expect("accept");
        m.on_packet(&from_guest(Op::Request, 9, 8));
        let mut keys = m.reset();
        keys.sort();
        assert_eq!(keys, vec![key(8, 7), key(8, 9), k1]);
        assert!(m.is_empty());
        // After the reset, old connections are unknown: their packets get RST.
        assert!(is_rst(&m.on_packet(&from_guest(Op::Rw, 7, 8))));
        assert_eq!(
            m.host_connect(1).map(|(k, _)| k.local_port),
            Ok(HOST_PORT_BASE)
        );
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Guest {
            op: u16,
            ty: u16,
            src_port: u32,
            dst_port: u32,
            len: u32,
            flags: u32,
            buf_alloc: u32,
            fwd_cnt: u32,
        },
        /// A guest REQUEST the host side accepts at once.
        Open(u32, u32),
        HostConnect(u32),
        Accept(usize),
        Refuse(usize),
        Consume(usize, u32),
        Send(usize, u32),
        Eof(usize),
        Closed(usize),
        Abort(usize),
        CreditRequest(usize),
        Reset,
    }

    fn any_ev() -> impl Strategy<Value = Ev> {
        let port = prop_oneof![3 => 0u32..2, 1 => HOST_PORT_BASE..HOST_PORT_BASE + 2];
        let guest = (
            // RW most of the time, so connections fill up.
            prop_oneof![12 => Just(Op::Rw.to_u16()), 2 => 1u16..=7],
            prop_oneof![30 => Just(TYPE_STREAM), 1 => Just(2u16)],
            0u32..2,
            port,
            prop_oneof![1 => Just(0u32), 1 => 1u32..4096, 6 => Just(MAX_PAYLOAD)],
            0u32..4,
            prop_oneof![Just(0u32), Just(64 * 1024), any::<u32>()],
            // Mostly honest (nothing sent yet), sometimes a lie.
            prop_oneof![8 => Just(0u32), 1 => 0u32..70_000, 1 => any::<u32>()],
        )
            .prop_map(
                |(op, ty, src_port, dst_port, len, flags, buf_alloc, fwd_cnt)| Ev::Guest {
                    op,
                    ty,
                    src_port,
                    dst_port,
                    len,
                    flags,
                    buf_alloc,
                    fwd_cnt,
                },
            );
        prop_oneof![
            16 => guest,
            2 => (0u32..2, 0u32..2).prop_map(|(s, d)| Ev::Open(s, d)),
            1 => (0u32..3).prop_map(Ev::HostConnect),
            1 => (0usize..8).prop_map(Ev::Accept),
            1 => (0usize..8).prop_map(Ev::Refuse),
            1 => (0usize..8, 0u32..200_000).prop_map(|(i, n)| Ev::Consume(i, n)),
            2 => (0usize..8, 0u32..70_000).prop_map(|(i, n)| Ev::Send(i, n)),
            1 => (0usize..8).prop_map(Ev::Eof),
            1 => (0usize..8).prop_map(Ev::Closed),
            1 => (0usize..8).prop_map(Ev::Abort),
            1 => (0usize..8).prop_map(Ev::CreditRequest),
            1 => Just(Ev::Reset),
        ]
    }

    /// The model of one connection's guest → host stream.
    #[derive(Debug, Default, Clone, Copy)]
    struct Model {
        delivered: u64,
        consumed: u64,
        /// `consumed` as of the last header sent (what the guest was told).
        told: u64,
    }

    /// Checks one connection action against the model and updates it.
    fn check(
        key: ConnKey,
        a: &Action,
        held: &mut HashMap<ConnKey, Model>,
    ) -> Result<(), TestCaseError> {
        let model = held.entry(key).or_default();
        match a {
            Action::Send(h) => {
                // Every header tells the guest how much the host side took.
                prop_assert_eq!(h.fwd_cnt, model.consumed as u32);
                model.told = model.consumed;
                prop_assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, CID));
                prop_assert_eq!((h.src_port, h.dst_port), (key.local_port, key.peer_port));
                prop_assert_ne!(h.op, Op::Rw);
                prop_assert_eq!(Header::parse(&h.to_bytes()), Ok(*h));
            }
            Action::Deliver(n) => {
                prop_assert!(*n > 0 && *n <= MAX_PAYLOAD);
                // Never more than the credit the guest was told about.
                prop_assert!(
                    model.delivered + u64::from(*n) - model.told <= u64::from(CONN_BUF_ALLOC)
                );
                model.delivered += u64::from(*n);
            }
            _ => {}
        }
        Ok(())
    }

    /// One random event against the table; checks what it returns.
    fn apply(
        m: &mut Muxer,
        ev: Ev,
        held: &mut HashMap<ConnKey, Model>,
    ) -> Result<(), TestCaseError> {
        let mut keys: Vec<ConnKey> = m.conns.keys().copied().collect();
        keys.sort_unstable();
        let pick = |i: usize| keys.get(i).copied();
        match ev {
            Ev::Guest {
                op,
                ty,
                src_port,
                dst_port,
                len,
                flags,
                buf_alloc,
                fwd_cnt,
            } => {
                let mut raw = from_guest(Op::Rw, src_port, dst_port).to_bytes();
                raw[24..28].copy_from_slice(&len.to_le_bytes());
                raw[28..30].copy_from_slice(&ty.to_le_bytes());
                raw[30..32].copy_from_slice(&op.to_le_bytes());
                raw[32..36].copy_from_slice(&flags.to_le_bytes());
                raw[36..40].copy_from_slice(&buf_alloc.to_le_bytes());
                raw[40..44].copy_from_slice(&fwd_cnt.to_le_bytes());
                let Ok(h) = Header::parse(&raw) else {
                    return Ok(());
                };
                for a in m.on_packet(&h) {
                    match a {
                        MuxAction::Conn(k, a) => check(k, &a, held)?,
                        MuxAction::Send(r) => prop_assert_eq!(r.op, Op::Rst),
                        MuxAction::ConnectHost(k) => {
                            prop_assert_eq!(m.conn(k).map(Conn::state), Some(State::PeerInit));
                        }
                    }
                }
            }
            Ev::Open(src_port, dst_port) => {
                let k = key(dst_port, src_port);
                let a = m.on_packet(&from_guest(Op::Request, src_port, dst_port));
                if a == vec![MuxAction::ConnectHost(k)] {
                    let h = m.host_accepted(k).expect("accept");
                    check(k, &Action::Send(h), held)?;
                } else {
                    for a in a {
                        match a {
                            MuxAction::Conn(k, a) => check(k, &a, held)?,
                            MuxAction::Send(r) => prop_assert_eq!(r.op, Op::Rst),
                            MuxAction::ConnectHost(_) => prop_assert!(false, "{:?}", a),
                        }
                    }
                }
            }
            Ev::HostConnect(p) => {
                let before = m.len();
                match m.host_connect(p) {
                    Ok((k, req)) => {
                        prop_assert!(k.local_port >= HOST_PORT_BASE);
                        prop_assert_eq!(req.op, Op::Request);
                    }
                    Err(e) => {
                        prop_assert_eq!(e, MuxError::TooManyConnections { max: 4 });
                        prop_assert_eq!(before, 4);
                    }
                }
            }
            Ev::Accept(i) => {
                if let Some(k) = pick(i) {
                    if let Ok(h) = m.host_accepted(k) {
                        check(k, &Action::Send(h), held)?;
                    }
                }
            }
            Ev::Refuse(i) => {
                if let Some(k) = pick(i) {
                    if let Ok(h) = m.host_refused(k) {
                        check(k, &Action::Send(h), held)?;
                        prop_assert!(m.conn(k).is_none());
                    }
                }
            }
            Ev::Consume(i, n) => {
                if let Some(k) = pick(i) {
                    let c = m.conn_mut(k).expect("picked");
                    if let Ok(up) = c.host_consumed(n) {
                        held.entry(k).or_default().consumed += u64::from(n);
                        if let Some(h) = up {
                            check(k, &Action::Send(h), held)?;
                        }
                    }
                }
            }
            Ev::Send(i, n) => {
                if let Some(k) = pick(i) {
                    let c = m.conn_mut(k).expect("picked");
                    let credit = c.tx_credit();
                    match c.send_rw(n) {
                        Ok(h) => {
                            prop_assert!(n > 0 && n <= credit && n <= MAX_PAYLOAD);
                            held.entry(k).or_default().told = held.entry(k).or_default().consumed;
                            prop_assert_eq!(h.fwd_cnt, held[&k].consumed as u32);
                            prop_assert_eq!((h.op, h.len), (Op::Rw, n));
                            prop_assert_eq!(Header::parse(&h.to_bytes()), Ok(h));
                        }
                        Err(_) => prop_assert!(n == 0 || n > credit.min(MAX_PAYLOAD)),
                    }
                }
            }
            Ev::Eof(i) => {
                if let Some(k) = pick(i) {
                    if let Ok(Some(h)) = m.conn_mut(k).expect("picked").host_eof() {
                        check(k, &Action::Send(h), held)?;
                    }
                }
            }
            Ev::Closed(i) => {
                if let Some(k) = pick(i) {
                    for a in m.conn_mut(k).expect("picked").host_closed() {
                        check(k, &a, held)?;
                    }
                }
            }
            Ev::Abort(i) => {
                if let Some(k) = pick(i) {
                    for a in m.conn_mut(k).expect("picked").abort() {
                        check(k, &a, held)?;
                    }
                }
            }
            Ev::CreditRequest(i) => {
                if let Some(k) = pick(i) {
                    let c = m.conn_mut(k).expect("picked");
                    if let Some(h) = c.credit_request() {
                        prop_assert_eq!(c.tx_credit(), 0);
                        check(k, &Action::Send(h), held)?;
                    }
                }
            }
            Ev::Reset => {
                m.reset();
            }
        }
        for k in keys {
            m.forget_if_closed(k);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            crate::test_util::cases(500)
        ))]
        /// A model of the table: random guest packets and host events never panic,
        /// the table never exceeds its maximum nor keeps a closed connection, every
        /// header we produce is valid and addressed to its connection, and the bytes
        /// held for the host side match the model and stay within CONN_BUF_ALLOC.
        #[test]
        fn random_packets_and_host_events_keep_the_table_bounded_and_consistent(
            evs in proptest::collection::vec(any_ev(), 1..300)
        ) {
            let mut m = muxer(4);
            let mut held: HashMap<ConnKey, Model> = HashMap::new();
            for ev in evs {
                apply(&mut m, ev, &mut held)?;
                held.retain(|k, _| m.conns.contains_key(k));
                prop_assert!(m.len() <= 4);
                for (k, c) in &m.conns {
                    prop_assert_ne!(c.state(), State::Closed);
                    prop_assert!(c.pending_to_host() <= CONN_BUF_ALLOC);
                    prop_assert_eq!(
                        u64::from(c.pending_to_host()),
                        held.get(k).map_or(0, |md| md.delivered - md.consumed)
                    );
                }
            }
        }
    }
}
