//! The virtio-vsock device (virtio 1.2 §5.10, device type 19) on Firecracker's host
//! side: a listening UNIX socket for host-initiated connections and `<uds>_<port>`
//! sockets for guest-initiated ones.
//!
//! Queues: rx (0, packets for the guest), tx (1, packets from the guest), event (2,
//! TRANSPORT_RESET). Everything runs on the event loop: the device exposes one fd, an
//! inner epoll instance holding the listening socket, every host socket (all
//! non-blocking) and a timer for the handshake and close timeouts. Host sockets are
//! registered edge-triggered, as the TAP of virtio-net is: an event sets a flag
//! (`readable`, `writable`), and the device reads or writes until EAGAIN, or leaves
//! the flag set while it may not go on (the guest's credit is zero, the rx ring is
//! empty) and goes on when that changes (a credit update on the tx queue, an rx
//! notification) — so nothing is read that the guest cannot take, and nothing spins.
//!
//! The protocol is [`super::muxer`]'s and [`super::conn`]'s; this file carries out
//! their actions. Bounds (docs/DESIGN.md, "vsock"):
//! - guest → host bytes held per connection: at most [`CONN_BUF_ALLOC`] (the credit
//!   we advertise; a guest sending more is reset), plus an `OK <port>\n` line;
//! - connections: [`VsockConfig::max_connections`]; host clients still writing their
//!   `CONNECT` line: as many again, each for at most [`HANDSHAKE_TIMEOUT_MS`];
//!   closed connections whose last bytes the host reader has not taken yet
//!   ("lingering"): as many again, each given up after [`CLOSE_TIMEOUT_MS`] without
//!   progress. So at most
//!   `3 * max_connections` host sockets plus the listener, the epoll and the timer.
//! - host → guest bytes are read only into the guest's rx buffers, up to its credit;
//!   headers without data wait in a queue: the tx queue and new host clients are not
//!   served while it holds [`CONTROL_SOFT_MAX`] headers, so it holds at most that
//!   plus a few per connection (each host-side event of a connection adds at most
//!   one).
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::config::VsockConfig;
use super::conn::{
    Action, Conn, ConnKey, State, CLOSE_TIMEOUT_MS, CONN_BUF_ALLOC, REQUEST_TIMEOUT_MS,
};
use super::muxer::{parse_connect, ConnectLine, MuxAction, MuxError, Muxer};
use super::packet::{Header, Op, HEADER_LEN, HOST_CID, MAX_PAYLOAD};
use super::sys;
use crate::devices::virtio::{pop_chain, ActivateError, Interrupt, RateLimit, VirtioDevice};
use crate::memory::GuestMemory;

/// virtio device type of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// rx, tx, event.
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];
const RX: usize = 0;
const TX: usize = 1;
const EVQ: usize = 2;

/// The event queue's only event: the host side was reset, every connection is gone.
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

/// Headers waiting for rx buffers at which the device stops taking packets from the
/// tx queue and new host clients (until the guest offers rx buffers).
pub const CONTROL_SOFT_MAX: usize = 256;

/// How long a host client has to write its `CONNECT <port>\n` line.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5000;

/// Inner epoll payloads: the listener, the timer, then one id per host socket.
const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const TOKEN_KICK: u64 = 2;
const FIRST_ID: u64 = 3;

/// Packets taken from the tx queue, or put in the rx queue, per event at most: then
/// the device hands the event loop back (other devices' turn, and the guest's
/// interrupt) and goes on at its next turn, through an eventfd it writes to itself.
/// (A guest refilling its rings as fast as they are served would otherwise keep the
/// loop here.)
const BUDGET: usize = 256;

/// Buffers remembered per rx chain at most (Linux offers one per chain).
const MAX_RX_SEGS: usize = 16;

/// Rounds of `epoll_wait` per event at most: every round's events are handled until
/// EAGAIN, so the inner epoll is empty long before; this only guards against a bug.
const DRAIN_ROUNDS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vsock socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vsock socket {path} is in use by a running process")]
    InUse { path: PathBuf },
    #[error("vsock socket path {path} exists and is a {kind}, not a socket: left alone")]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("vsock socket {path}: checking for a stale socket")]
    Stale {
        path: PathBuf,
        #[source]
        source: crate::stale_socket::Error,
    },
    #[error("vsock: creating its {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("vsock configuration")]
    Config(#[source] MuxError),
}

/// Counters and gauges ([`Vsock::stats`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VsockStats {
    /// Connections in the table (any state).
    pub connections: usize,
    /// Host clients that have not finished their `CONNECT` line.
    pub handshakes: usize,
    /// Closed connections still writing their last bytes to the host.
    pub lingering: usize,
    /// Guest → host bytes held by the device, all connections.
    pub buffered_to_host: usize,
    /// Headers waiting for rx buffers.
    pub control_queued: usize,
    /// Guest → host bytes written to host sockets.
    pub bytes_to_host: u64,
    /// Host → guest payload bytes put in rx buffers.
    pub bytes_to_guest: u64,
    /// Malformed packets from the guest (answered with RST).
    pub bad_packets: u64,
    /// Host clients turned away (bad `CONNECT` line, timeout, too many) and guest
    /// connects nobody on the host accepted.
    pub refused: u64,
}

/// The host side of one connection.
struct HostConn {
    id: u64,
    /// `None` once the host side is gone (the connection waits for the guest's RST).
    stream: Option<UnixStream>,
    /// Guest → host bytes the socket has not taken yet; `prefix` leading bytes are
    /// the `OK` line, not guest data.
    to_host: VecDeque<u8>,
    prefix: usize,
    /// The socket may have data (an edge was seen and no read said EAGAIN since).
    readable: bool,
    /// The socket may take data.
    writable: bool,
    /// The host peer hung up (or the socket reported an error).
    hup: bool,
    /// A read returned end of file.
    eof: bool,
    /// The guest sends no more: shut the socket's write half once `to_host` is empty.
    shut_write: bool,
    shut_write_done: bool,
    /// The guest receives no more: the socket is not read.
    no_read: bool,
    /// LocalInit (waiting for RESPONSE) or Closing (waiting for RST) ends here.
    deadline: Option<Instant>,
}

impl HostConn {
    fn new(id: u64, stream: UnixStream) -> Self {
        HostConn {
            id,
            stream: Some(stream),
            to_host: VecDeque::new(),
            prefix: 0,
            readable: true,
            writable: true,
            hup: false,
            eof: false,
            shut_write: false,
            shut_write_done: false,
            no_read: false,
            deadline: None,
        }
    }
}

/// A host client that has not finished its `CONNECT <port>\n` line.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// A connection the guest closed whose last bytes the host reader has not taken.
struct Linger {
    stream: UnixStream,
    buf: VecDeque<u8>,
    deadline: Instant,
}

/// An rx chain taken from the ring and checked.
struct RxChain {
    head: u16,
    segs: Vec<(GuestAddress, usize)>,
    cap: usize,
}

struct Active {
    mem: GuestMemory,
    queues: [Queue; 3],
    interrupt: Arc<Interrupt>,
    /// Used entries added since the last interrupt decision, per queue.
    used: [bool; 3],
}

pub struct Vsock {
    cfg: VsockConfig,
    name: String,
    listener: UnixListener,
    /// The socket file we bound (`O_PATH`): removed on drop while the path still
    /// names it.
    bound: std::fs::File,
    epoll: Epoll,
    timer: TimerFd,
    /// Written when a budget ran out with work left: the next event goes on.
    kick: EventFd,
    budget: usize,
    /// The tx queue was left with packets in it (budget).
    tx_more: bool,
    /// Data and headers were left waiting while rx buffers remained (budget).
    rx_more: bool,
    /// When the timer is armed for.
    timer_at: Option<Instant>,
    acked: u64,
    active: Option<Active>,
    /// The device reported DEVICE_NEEDS_RESET: its queues are not touched until reset.
    broken: bool,
    muxer: Muxer,
    conns: HashMap<ConnKey, HostConn>,
    by_id: HashMap<u64, ConnKey>,
    pending: HashMap<u64, Pending>,
    lingering: HashMap<u64, Linger>,
    next_id: u64,
    /// Headers for the guest that wait for rx buffers.
    control: VecDeque<Header>,
    /// An rx chain taken and not used yet.
    rx_held: Option<RxChain>,
    listener_readable: bool,
    /// The tx queue was left because `control` is full.
    tx_blocked: bool,
    /// A TRANSPORT_RESET waits for an event buffer.
    event_pending: bool,
    tx_buf: Box<[u8]>,
    rx_buf: Box<[u8]>,
    stats: VsockStats,
    log: RateLimit,
}

/// The socket a guest connection to host port `port` reaches: `<uds>_<port>`.
pub fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(uds.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Binds `path`: a stale socket there (nobody accepts) is replaced, a live one or any
/// other file refused (`stale_socket::remove`, the one place Ferrite
/// unlinks a socket it did not bind in this run). The listener and the `O_PATH` hold
/// on the socket file (so that drop removes it only while the path still names it).
fn bind_uds(path: &Path) -> Result<(UnixListener, std::fs::File), Error> {
    use crate::stale_socket;
    match stale_socket::remove(path) {
        Ok(true) => log::info!("vsock: replaced the stale socket {}", path.display()),
        Ok(false) => {}
        Err(stale_socket::Error::Live { .. }) => return Err(Error::InUse { path: path.into() }),
        Err(stale_socket::Error::NotASocket { kind, .. }) => {
            return Err(Error::NotASocket {
                path: path.into(),
                kind,
            })
        }
        Err(source) => {
            return Err(Error::Stale {
                path: path.into(),
                source,
            })
        }
    }
    let sock_err = |source| Error::Socket {
        path: path.to_owned(),
        source,
    };
    let l = UnixListener::bind(path).map_err(sock_err)?;
    let hold = || {
        l.set_nonblocking(true)?;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
    };
    match hold() {
        Ok(f) => Ok((l, f)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(sock_err(e))
        }
    }
}

fn epoll_add(epoll: &Epoll, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
    epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
}

/// Host sockets: readable, writable, hung up; edge-triggered.
fn sock_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

/// Writes as much of `data` as the socket takes now: (bytes written, whether the
/// socket said EAGAIN).
fn write_some(stream: &mut UnixStream, data: &[u8]) -> io::Result<(usize, bool)> {
    let mut done = 0;
    while done < data.len() {
        match stream.write(&data[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((done, true)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((done, false))
}

/// Writes from the front of `buf` until it is empty or the socket says EAGAIN:
/// (bytes written, EAGAIN seen).
fn write_deque(stream: &mut UnixStream, buf: &mut VecDeque<u8>) -> io::Result<(usize, bool)> {
    let mut total = 0;
    while !buf.is_empty() {
        let (n, blocked) = {
            let (a, _) = buf.as_slices();
            write_some(stream, a)?
        };
        buf.drain(..n);
        total += n;
        if blocked {
            return Ok((total, true));
        }
    }
    if buf.capacity() > 2 * MAX_PAYLOAD as usize {
        buf.shrink_to(0);
    }
    Ok((total, false))
}

/// Checks an rx (or event) chain: device-writable buffers inside guest memory, at
/// least `min` bytes in all.
fn parse_rx_chain(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    min: usize,
) -> Result<RxChain, String> {
    let head = chain.head_index();
    let mut segs = Vec::new();
    let mut cap = 0usize;
    let want = HEADER_LEN + MAX_PAYLOAD as usize;
    for d in chain {
        if !d.is_write_only() {
            return Err(format!("device-readable buffer at {:#x}", d.addr().0));
        }
        let n = d.len() as usize;
        if n == 0 {
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), n) {
            return Err(format!(
                "buffer {:#x}+{n:#x} outside guest memory",
                d.addr().0
            ));
        }
        if cap < want && segs.len() < MAX_RX_SEGS {
            let n = n.min(want - cap);
            segs.push((d.addr(), n));
            cap += n;
        }
    }
    if cap < min {
        return Err(format!("chain {head}: {cap} bytes, at least {min} needed"));
    }
    Ok(RxChain { head, segs, cap })
}

/// Writes `parts` one after the other into the chain's buffers; the bytes written.
fn write_chain(mem: &GuestMemory, c: &RxChain, parts: &[&[u8]]) -> Result<u32, String> {
    let mut segs = c.segs.iter().copied();
    let mut cur: Option<(GuestAddress, usize)> = segs.next();
    let mut total = 0usize;
    for part in parts {
        let mut p: &[u8] = part;
        while !p.is_empty() {
            let Some((addr, room)) = cur else {
                return Err(format!("chain {}: {} bytes do not fit", c.head, p.len()));
            };
            let k = room.min(p.len());
            mem.write_slice(&p[..k], addr)
                .map_err(|e| format!("rx buffer {:#x}+{k:#x}: {e}", addr.0))?;
            total += k;
            p = &p[k..];
            cur = if k == room {
                segs.next()
            } else {
                Some((GuestAddress(addr.0 + k as u64), room - k))
            };
        }
    }
    Ok(total as u32)
}

/// Copies one tx chain (header and payload) into `buf`; the length, or why the chain
/// is broken.
fn gather_tx(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    buf: &mut [u8],
) -> Result<usize, String> {
    let mut len = 0usize;
    for d in chain {
        if d.is_write_only() {
            return Err(format!("device-writable buffer at {:#x}", d.addr().0));
        }
        let n = d.len() as usize;
        if n > buf.len() - len {
            return Err(format!(
                "packet longer than a header and {MAX_PAYLOAD} payload bytes"
            ));
        }
        mem.read_slice(&mut buf[len..len + n], d.addr())
            .map_err(|e| format!("tx buffer {:#x}+{n:#x}: {e}", d.addr().0))?;
        len += n;
    }
    if len < HEADER_LEN {
        return Err(format!("{len} bytes, shorter than a header"));
    }
    Ok(len)
}

impl Vsock {
    /// Creates the host side: binds and listens on `cfg.uds` (a stale socket there is
    /// replaced, a live one refused). The path is removed when the device is dropped.
    pub fn new(cfg: &VsockConfig) -> Result<Vsock, Error> {
        let muxer = Muxer::new(cfg.cid, cfg.max_connections).map_err(Error::Config)?;
        let setup = |what| move |source| Error::Setup { what, source };
        let epoll = Epoll::new().map_err(setup("epoll instance"))?;
        let timer = crate::timer::nonblocking().map_err(setup("timer"))?;
        epoll_add(
            &epoll,
            timer.as_raw_fd(),
            EventSet::IN | EventSet::EDGE_TRIGGERED,
            TOKEN_TIMER,
        )
        .map_err(setup("timer watch"))?;
        let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(setup("eventfd"))?;
        epoll_add(
            &epoll,
            kick.as_raw_fd(),
            EventSet::IN | EventSet::EDGE_TRIGGERED,
            TOKEN_KICK,
        )
        .map_err(setup("eventfd watch"))?;
        let (listener, bound) = bind_uds(&cfg.uds)?;
        if let Err(e) = epoll_add(
            &epoll,
            listener.as_raw_fd(),
            EventSet::IN | EventSet::EDGE_TRIGGERED,
            TOKEN_LISTENER,
        ) {
            let _ = std::fs::remove_file(&cfg.uds);
            return Err(Error::Socket {
                path: cfg.uds.clone(),
                source: e,
            });
        }
        Ok(Vsock {
            cfg: cfg.clone(),
            name: format!("virtio-vsock cid {}", cfg.cid),
            listener,
            bound,
            epoll,
            timer,
            kick,
            budget: BUDGET,
            tx_more: false,
            rx_more: false,
            timer_at: None,
            acked: 0,
            active: None,
            broken: false,
            muxer,
            conns: HashMap::new(),
            by_id: HashMap::new(),
            pending: HashMap::new(),
            lingering: HashMap::new(),
            next_id: FIRST_ID,
            control: VecDeque::new(),
            rx_held: None,
            listener_readable: true,
            tx_blocked: false,
            event_pending: false,
            tx_buf: vec![0u8; HEADER_LEN + MAX_PAYLOAD as usize].into_boxed_slice(),
            rx_buf: vec![0u8; MAX_PAYLOAD as usize].into_boxed_slice(),
            stats: VsockStats::default(),
            log: RateLimit::default(),
        })
    }

    pub fn config(&self) -> &VsockConfig {
        &self.cfg
    }

    /// Counters and the current bounds' gauges.
    pub fn stats(&self) -> VsockStats {
        VsockStats {
            connections: self.muxer.len(),
            handshakes: self.pending.len(),
            lingering: self.lingering.len(),
            buffered_to_host: self.conns.values().map(|c| c.to_host.len()).sum::<usize>()
                + self.lingering.values().map(|l| l.buf.len()).sum::<usize>(),
            control_queued: self.control.len(),
            ..self.stats
        }
    }

    /// The host side was reset (e.g. after a snapshot is restored): every connection
    /// and host client is closed, and the guest is told with
    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue (as soon as it offers
    /// an event buffer).
    pub fn transport_reset(&mut self) {
        self.close_all();
        self.event_pending = true;
        self.pump(false);
    }

    fn warn(&mut self, what: std::fmt::Arguments<'_>) {
        self.log.warn(&self.name, what);
    }

    /// The guest broke a ring: DEVICE_NEEDS_RESET; its queues are left alone until the
    /// driver resets the device.
    fn fatal(&mut self, what: std::fmt::Arguments<'_>) {
        self.log.warn(&self.name, what);
        if let Some(a) = &self.active {
            a.interrupt.device_error();
        }
        self.broken = true;
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn close_all(&mut self) {
        self.muxer.reset();
        self.conns.clear();
        self.by_id.clear();
        self.pending.clear();
        self.lingering.clear();
        self.control.clear();
        self.tx_blocked = false;
        self.tx_more = false;
        self.rx_more = false;
    }

    // ----- host events -------------------------------------------------------------

    /// Handles every event the inner epoll holds.
    fn drain_epoll(&mut self) {
        let mut evs = [EpollEvent::default(); 32];
        for _ in 0..DRAIN_ROUNDS {
            let n = match self.epoll.wait(0, &mut evs) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.warn(format_args!("waiting on its sockets: {e}"));
                    return;
                }
            };
            if n == 0 {
                return;
            }
            for ev in &evs[..n] {
                self.handle_fd(ev.data(), ev.event_set());
            }
        }
        self.warn(format_args!(
            "host sockets still ready after {DRAIN_ROUNDS} rounds"
        ));
    }

    fn handle_fd(&mut self, token: u64, ev: EventSet) {
        match token {
            TOKEN_LISTENER => self.listener_readable = true,
            TOKEN_KICK => {
                let _ = self.kick.read();
            }
            TOKEN_TIMER => {
                // Non-blocking; EAGAIN when a re-arm cleared the expiry already.
                let _ = self.timer.wait();
                self.timer_at = None;
            }
            id => {
                if self.pending.contains_key(&id) {
                    self.read_handshake(id);
                } else if let Some(&key) = self.by_id.get(&id) {
                    self.conn_event(key, ev);
                } else if self.lingering.contains_key(&id) {
                    self.flush_linger(id);
                }
            }
        }
    }

    fn conn_event(&mut self, key: ConnKey, ev: EventSet) {
        let Some(hc) = self.conns.get_mut(&key) else {
            return;
        };
        if hc.stream.is_none() {
            return;
        }
        if ev.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::ERROR) {
            hc.readable = true;
        }
        if ev.contains(EventSet::OUT) {
            hc.writable = true;
        }
        if ev.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            hc.hup = true;
            hc.writable = true;
        }
        self.flush(key);
        self.check_hangup(key);
    }

    /// A host socket that hung up is gone once nothing more can be read from it.
    fn check_hangup(&mut self, key: ConnKey) {
        let Some(hc) = self.conns.get(&key) else {
            return;
        };
        if !hc.hup || hc.stream.is_none() {
            return;
        }
        let open = self.muxer.conn(key).is_some_and(|c| {
            !matches!(
                c.state(),
                State::LocalInit | State::PeerInit | State::Closed
            )
        });
        if !open || hc.eof || hc.no_read {
            self.host_gone(key);
        }
    }

    /// The host socket is gone (hang-up, error): its buffered bytes are dropped and
    /// the guest is told.
    fn host_gone(&mut self, key: ConnKey) {
        if let Some(hc) = self.conns.get_mut(&key) {
            hc.stream = None;
            hc.to_host = VecDeque::new();
            hc.prefix = 0;
        }
        self.host_event(key, |c| c.host_closed());
    }

    /// Runs a host-side event on connection `key` and carries out its actions.
    fn host_event(&mut self, key: ConnKey, f: impl FnOnce(&mut Conn) -> Vec<Action>) {
        let Some(c) = self.muxer.conn_mut(key) else {
            self.close_conn(key, false);
            return;
        };
        let actions = f(c);
        self.muxer.forget_if_closed(key);
        for a in actions {
            self.apply(key, a, &[]);
        }
        if self.muxer.conn(key).is_none() {
            self.close_conn(key, false);
        }
    }

    fn apply(&mut self, key: ConnKey, action: Action, payload: &[u8]) {
        match action {
            Action::Send(h) => self.control.push_back(h),
            Action::Deliver(n) => {
                let n = (n as usize).min(payload.len());
                self.deliver(key, &payload[..n]);
            }
            Action::Connected => {
                if let Some(hc) = self.conns.get_mut(&key) {
                    let ok = super::muxer::ok_line(key.local_port);
                    hc.prefix += ok.len();
                    hc.to_host.extend(ok.as_bytes());
                    // The client may have written past its CONNECT line already.
                    hc.readable = true;
                }
                self.flush(key);
            }
            Action::HostShutWrite => {
                if let Some(hc) = self.conns.get_mut(&key) {
                    hc.shut_write = true;
                }
                self.flush(key);
            }
            Action::HostShutRead => {
                if let Some(hc) = self.conns.get_mut(&key) {
                    hc.no_read = true;
                }
                self.check_hangup(key);
            }
            Action::Close => self.close_conn(key, true),
            Action::Abort => self.close_conn(key, false),
        }
    }

    /// Forgets the host side of `key`; `graceful`: bytes the host has not taken yet
    /// are still written (lingering, until [`CLOSE_TIMEOUT_MS`] pass without progress).
    fn close_conn(&mut self, key: ConnKey, graceful: bool) {
        let Some(mut hc) = self.conns.remove(&key) else {
            return;
        };
        self.by_id.remove(&hc.id);
        let Some(mut stream) = hc.stream.take() else {
            return;
        };
        if !graceful || hc.to_host.is_empty() {
            return;
        }
        match write_deque(&mut stream, &mut hc.to_host) {
            Ok((n, _)) => self.stats.bytes_to_host += n.saturating_sub(hc.prefix) as u64,
            Err(_) => return,
        }
        if hc.to_host.is_empty() {
            return;
        }
        if self.lingering.len() >= self.cfg.max_connections {
            self.warn(format_args!(
                "dropping {} bytes of a closed connection to host port {}: {} others still being written",
                hc.to_host.len(),
                key.local_port,
                self.lingering.len()
            ));
            return;
        }
        self.lingering.insert(
            hc.id,
            Linger {
                stream,
                buf: hc.to_host,
                deadline: Instant::now() + Duration::from_millis(CLOSE_TIMEOUT_MS),
            },
        );
    }

    fn flush_linger(&mut self, id: u64) {
        let Some(l) = self.lingering.get_mut(&id) else {
            return;
        };
        match write_deque(&mut l.stream, &mut l.buf) {
            Ok((n, _)) => {
                self.stats.bytes_to_host += n as u64;
                if n > 0 {
                    // A reader that keeps taking bytes keeps its connection.
                    l.deadline = Instant::now() + Duration::from_millis(CLOSE_TIMEOUT_MS);
                }
                if l.buf.is_empty() {
                    self.lingering.remove(&id);
                }
            }
            Err(_) => {
                self.lingering.remove(&id);
            }
        }
    }

    /// Guest bytes for the host socket of `key`: written now as far as it takes them,
    /// the rest buffered (within the credit the guest was given).
    fn deliver(&mut self, key: ConnKey, data: &[u8]) {
        let Some(hc) = self.conns.get_mut(&key) else {
            return;
        };
        let mut written = 0;
        if hc.stream.is_none() {
            // The host side is gone; the guest was told. Nothing to take the bytes.
            return;
        }
        if hc.to_host.is_empty() && hc.writable {
            let Some(stream) = hc.stream.as_mut() else {
                return;
            };
            match write_some(stream, data) {
                Ok((n, blocked)) => {
                    written = n;
                    if blocked {
                        hc.writable = false;
                    }
                }
                Err(e) => {
                    log::debug!("{}: host port {}: {e}", self.name, key.local_port);
                    self.host_gone(key);
                    return;
                }
            }
        }
        let rest = &data[written..];
        let need = hc.to_host.len() + rest.len();
        if need > hc.to_host.capacity() {
            // Grow by doubling but never past the credit (plus the OK line), so the
            // allocation stays within the bound, not twice it.
            let cap = (hc.to_host.capacity() * 2).min(CONN_BUF_ALLOC as usize + 32);
            hc.to_host.reserve_exact(cap.max(need) - hc.to_host.len());
        }
        hc.to_host.extend(rest);
        self.stats.bytes_to_host += written as u64;
        self.consumed(key, written);
    }

    /// The host side took `n` guest bytes of `key`.
    fn consumed(&mut self, key: ConnKey, n: usize) {
        if n == 0 {
            return;
        }
        let Some(c) = self.muxer.conn_mut(key) else {
            return;
        };
        match c.host_consumed(n as u32) {
            Ok(Some(h)) => self.control.push_back(h),
            Ok(None) => {}
            Err(e) => self.warn(format_args!("{e}")),
        }
    }

    /// Writes what `key` holds for its host socket, then shuts the write half if the
    /// guest sends no more.
    fn flush(&mut self, key: ConnKey) {
        let Some(hc) = self.conns.get_mut(&key) else {
            return;
        };
        let Some(stream) = hc.stream.as_mut() else {
            return;
        };
        let mut guest_bytes = 0;
        if hc.writable && !hc.to_host.is_empty() {
            match write_deque(stream, &mut hc.to_host) {
                Ok((n, blocked)) => {
                    let from_prefix = n.min(hc.prefix);
                    hc.prefix -= from_prefix;
                    guest_bytes = n - from_prefix;
                    if blocked {
                        hc.writable = false;
                    }
                }
                Err(e) => {
                    log::debug!("{}: host port {}: {e}", self.name, key.local_port);
                    self.host_gone(key);
                    return;
                }
            }
        }
        if hc.to_host.is_empty() && hc.shut_write && !hc.shut_write_done {
            hc.shut_write_done = true;
            let _ = stream.shutdown(Shutdown::Write);
        }
        self.stats.bytes_to_host += guest_bytes as u64;
        self.consumed(key, guest_bytes);
    }

    /// New host clients, while there is room for them.
    fn accept_clients(&mut self) {
        if self.active.is_none() {
            return;
        }
        while self.listener_readable
            && self.pending.len() < self.cfg.max_connections
            && self.control.len() < CONTROL_SOFT_MAX
        {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.muxer.len() >= self.muxer.max_connections() {
                        self.stats.refused += 1;
                        self.warn(format_args!(
                            "host client refused: {} connections open",
                            self.muxer.len()
                        ));
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        self.warn(format_args!("host client: {e}"));
                        continue;
                    }
                    let id = self.new_id();
                    if let Err(e) = epoll_add(&self.epoll, stream.as_raw_fd(), sock_events(), id) {
                        self.warn(format_args!("host client: watching it: {e}"));
                        continue;
                    }
                    self.pending.insert(
                        id,
                        Pending {
                            stream,
                            line: Vec::new(),
                            deadline: Instant::now() + Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
                        },
                    );
                    self.read_handshake(id);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.listener_readable = false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. out of fds: the client waits in the backlog until the next
                    // one connects.
                    self.listener_readable = false;
                    self.warn(format_args!("accepting a host client: {e}"));
                }
            }
        }
    }

    /// Reads a host client's `CONNECT <port>\n` one byte at a time (so whatever it
    /// sends after the line stays in the socket for the guest, as with Firecracker).
    fn read_handshake(&mut self, id: u64) {
        let Some(p) = self.pending.get_mut(&id) else {
            return;
        };
        let port = loop {
            match parse_connect(&p.line) {
                Ok(ConnectLine::Port { port, .. }) => break Ok(port),
                Ok(ConnectLine::Incomplete) => {}
                Err(e) => break Err(e.to_string()),
            }
            let mut b = [0u8; 1];
            match p.stream.read(&mut b) {
                Ok(0) => break Err("closed before its CONNECT line".to_string()),
                Ok(_) => p.line.push(b[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e.to_string()),
            }
        };
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        let port = match port {
            Ok(port) => port,
            Err(why) => {
                self.stats.refused += 1;
                log::debug!("{}: host client refused: {why}", self.name);
                return;
            }
        };
        match self.muxer.host_connect(port) {
            Ok((key, request)) => {
                self.control.push_back(request);
                let mut hc = HostConn::new(id, p.stream);
                hc.readable = false;
                self.conns.insert(key, hc);
                self.by_id.insert(id, key);
            }
            Err(e) => {
                self.stats.refused += 1;
                self.warn(format_args!("host client for guest port {port}: {e}"));
            }
        }
    }

    /// A guest connect to host port `key.local_port`: `<uds>_<port>`, without waiting.
    fn connect_host(&mut self, key: ConnKey) {
        let path = port_path(&self.cfg.uds, key.local_port);
        let connected = sys::connect_nonblocking(&path).and_then(|s| {
            let id = self.next_id;
            epoll_add(&self.epoll, s.as_raw_fd(), sock_events(), id).map(|()| s)
        });
        match connected {
            Ok(stream) => {
                let id = self.new_id();
                match self.muxer.host_accepted(key) {
                    Ok(h) => {
                        self.control.push_back(h);
                        self.conns.insert(key, HostConn::new(id, stream));
                        self.by_id.insert(id, key);
                    }
                    Err(e) => self.warn(format_args!("{e}")),
                }
            }
            Err(e) => {
                self.stats.refused += 1;
                log::debug!("{}: guest connect to {}: {e}", self.name, path.display());
                match self.muxer.host_refused(key) {
                    Ok(h) => self.control.push_back(h),
                    Err(e) => self.warn(format_args!("{e}")),
                }
            }
        }
    }

    // ----- guest packets -----------------------------------------------------------

    fn handle_packet(&mut self, bytes: &[u8]) {
        let h = match Header::parse(bytes) {
            Ok(h) if (h.len as usize) <= bytes.len() - HEADER_LEN => h,
            Ok(h) => {
                self.stats.bad_packets += 1;
                self.warn(format_args!(
                    "packet announces {} payload bytes, carries {}",
                    h.len,
                    bytes.len() - HEADER_LEN
                ));
                self.reject(bytes);
                return;
            }
            Err(e) => {
                self.stats.bad_packets += 1;
                self.warn(format_args!("{e}"));
                self.reject(bytes);
                return;
            }
        };
        let payload = &bytes[HEADER_LEN..HEADER_LEN + h.len as usize];
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        for a in self.muxer.on_packet(&h) {
            match a {
                // Linux answers our SHUTDOWN of both halves with RST as the normal end
                // of a connection (and ends an unread one with it): the bytes it sent
                // before are still the host's.
                MuxAction::Conn(k, Action::Abort) if h.op == Op::Rst => self.close_conn(k, true),
                MuxAction::Conn(k, a) => self.apply(k, a, payload),
                MuxAction::ConnectHost(k) => self.connect_host(k),
                MuxAction::Send(r) => self.control.push_back(r),
            }
        }
        if self.muxer.conn(key).is_none() {
            self.close_conn(key, false);
        }
    }

    /// A malformed packet: its connection (if any) is reset, else it is answered with
    /// RST (unless it was an RST or not addressed from the guest to the host).
    fn reject(&mut self, bytes: &[u8]) {
        let Some(raw) = bytes.get(..HEADER_LEN) else {
            return;
        };
        let mut b = [0u8; HEADER_LEN];
        b.copy_from_slice(raw);
        let op = u16::from_le_bytes([b[30], b[31]]);
        b[24..28].fill(0);
        b[30..32].copy_from_slice(&Op::Rst.to_u16().to_le_bytes());
        let Ok(h) = Header::parse(&b) else {
            return;
        };
        if h.src_cid != self.muxer.guest_cid() || h.dst_cid != HOST_CID {
            return;
        }
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if self.muxer.conn(key).is_some() {
            self.host_event(key, |c| c.abort());
        } else if op != Op::Rst.to_u16() {
            self.control.push_back(Header::rst_reply(&h));
        }
    }

    /// Takes packets from the tx queue until it is empty or the control queue full.
    fn process_tx(&mut self) {
        if self.broken {
            return;
        }
        let mut buf = std::mem::take(&mut self.tx_buf);
        let mut fatal = None;
        let mut taken = 0;
        self.tx_more = false;
        'outer: while let Some(a) = self.active.as_mut() {
            if let Err(e) = a.queues[TX].disable_notification(&a.mem) {
                fatal = Some(format!("tx ring: {e:?}"));
                break;
            }
            loop {
                if self.control.len() >= CONTROL_SOFT_MAX {
                    self.tx_blocked = true;
                    break 'outer;
                }
                if taken >= self.budget {
                    self.tx_more = true;
                    break 'outer;
                }
                let Some(a) = self.active.as_mut() else {
                    break 'outer;
                };
                let mem = a.mem.clone();
                let chain = match pop_chain(&mut a.queues[TX], &mem) {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(what) => {
                        fatal = Some(format!("tx ring: {what}"));
                        break 'outer;
                    }
                };
                let head = chain.head_index();
                let len = match gather_tx(&mem, chain, &mut buf) {
                    Ok(len) => len,
                    Err(what) => {
                        fatal = Some(format!("tx chain {head}: {what}"));
                        break 'outer;
                    }
                };
                if let Err(e) = a.queues[TX].add_used(&mem, head, 0) {
                    fatal = Some(format!("tx chain {head}: {e:?}"));
                    break 'outer;
                }
                a.used[TX] = true;
                taken += 1;
                self.handle_packet(&buf[..len]);
            }
            let Some(a) = self.active.as_mut() else {
                break;
            };
            match a.queues[TX].enable_notification(&a.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    fatal = Some(format!("tx ring: {e:?}"));
                    break;
                }
            }
        }
        self.tx_buf = buf;
        if let Some(what) = fatal {
            self.fatal(format_args!("{what}"));
        }
    }

    // ----- packets for the guest ---------------------------------------------------

    /// An rx chain to fill: the held one, or the next from the ring. `Ok(None)` when
    /// the ring is empty (a notification is asked for).
    fn take_rx_chain(&mut self) -> Result<Option<RxChain>, String> {
        if let Some(c) = self.rx_held.take() {
            return Ok(Some(c));
        }
        let Some(a) = self.active.as_mut() else {
            return Ok(None);
        };
        loop {
            match pop_chain(&mut a.queues[RX], &a.mem)? {
                Some(chain) => return parse_rx_chain(&a.mem, chain, HEADER_LEN).map(Some),
                None => match a.queues[RX].enable_notification(&a.mem) {
                    Ok(true) => {
                        a.queues[RX]
                            .disable_notification(&a.mem)
                            .map_err(|e| format!("{e:?}"))?;
                    }
                    Ok(false) => return Ok(None),
                    Err(e) => return Err(format!("{e:?}")),
                },
            }
        }
    }

    fn put_rx(&mut self, c: &RxChain, parts: &[&[u8]]) -> Result<(), String> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let n = write_chain(&a.mem, c, parts)?;
        a.queues[RX]
            .add_used(&a.mem, c.head, n)
            .map_err(|e| format!("{e:?}"))?;
        a.used[RX] = true;
        Ok(())
    }

    /// Fills rx buffers: waiting headers first, then data read from host sockets
    /// (round robin, one packet per connection per pass, up to each one's credit).
    fn fill_rx(&mut self) {
        if self.broken || self.active.is_none() {
            return;
        }
        if let Err(what) = self.fill_rx_inner() {
            self.fatal(format_args!("rx ring: {what}"));
        }
    }

    fn fill_rx_inner(&mut self) -> Result<(), String> {
        if let Some(a) = self.active.as_mut() {
            a.queues[RX]
                .disable_notification(&a.mem)
                .map_err(|e| format!("{e:?}"))?;
        }
        self.rx_more = false;
        let mut put = 0;
        loop {
            while let Some(h) = self.control.front().copied() {
                if put >= self.budget {
                    self.rx_more = true;
                    return Ok(());
                }
                let Some(c) = self.take_rx_chain()? else {
                    return Ok(());
                };
                self.put_rx(&c, &[&h.to_bytes()])?;
                self.control.pop_front();
                put += 1;
            }
            let mut keys: Vec<ConnKey> = self
                .conns
                .iter()
                .filter(|(_, hc)| hc.readable && !hc.eof && !hc.no_read && hc.stream.is_some())
                .map(|(&k, _)| k)
                .collect();
            keys.sort_unstable();
            let mut progress = false;
            for key in keys {
                let credit = self.muxer.conn(key).map_or(0, |c| c.tx_credit());
                if credit == 0 {
                    // Data waits; ask once for the guest's credit (nothing before the
                    // connection is open).
                    if let Some(h) = self.muxer.conn_mut(key).and_then(|c| c.credit_request()) {
                        self.control.push_back(h);
                        progress = true;
                    }
                    continue;
                }
                if put >= self.budget {
                    self.rx_more = true;
                    return Ok(());
                }
                let Some(c) = self.take_rx_chain()? else {
                    return Ok(());
                };
                if self.read_into(key, credit, c)? {
                    progress = true;
                    put += 1;
                }
                if !self.control.is_empty() {
                    // Headers (a SHUTDOWN after EOF, ...) go first.
                    break;
                }
            }
            if !progress && self.control.is_empty() {
                return Ok(());
            }
        }
    }

    /// Reads one packet's worth from `key`'s socket into chain `c`; true if anything
    /// happened (data moved, EOF, hang-up). The chain is held again if unused.
    fn read_into(&mut self, key: ConnKey, credit: u32, c: RxChain) -> Result<bool, String> {
        let room = c.cap - HEADER_LEN;
        if room == 0 {
            // Only fit for a header: given back empty so the ring moves on.
            self.stats.bad_packets += 1;
            self.put_rx(&c, &[])?;
            return Ok(true);
        }
        let n = room.min(credit as usize).min(MAX_PAYLOAD as usize);
        let Some(hc) = self.conns.get_mut(&key) else {
            self.rx_held = Some(c);
            return Ok(false);
        };
        let Some(stream) = hc.stream.as_mut() else {
            self.rx_held = Some(c);
            return Ok(false);
        };
        let r = loop {
            match stream.read(&mut self.rx_buf[..n]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        match r {
            Ok(0) => {
                hc.eof = true;
                hc.readable = false;
                let hup = hc.hup;
                self.rx_held = Some(c);
                if hup {
                    self.host_gone(key);
                } else {
                    self.host_event(key, |c| match c.host_eof() {
                        Ok(h) => h.map(Action::Send).into_iter().collect(),
                        Err(_) => Vec::new(),
                    });
                }
                Ok(true)
            }
            Ok(k) => {
                let h = match self.muxer.conn_mut(key).map(|conn| conn.send_rw(k as u32)) {
                    Some(Ok(h)) => h,
                    _ => {
                        // Cannot happen (k is within the credit); drop the bytes.
                        self.rx_held = Some(c);
                        self.warn(format_args!(
                            "{k} bytes from host port {} lost",
                            key.local_port
                        ));
                        return Ok(true);
                    }
                };
                let buf = std::mem::take(&mut self.rx_buf);
                let r = self.put_rx(&c, &[&h.to_bytes(), &buf[..k]]);
                self.rx_buf = buf;
                r?;
                self.stats.bytes_to_guest += k as u64;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                hc.readable = false;
                self.rx_held = Some(c);
                Ok(false)
            }
            Err(e) => {
                self.rx_held = Some(c);
                log::debug!("{}: host port {}: {e}", self.name, key.local_port);
                self.host_gone(key);
                Ok(true)
            }
        }
    }

    /// TRANSPORT_RESET into an event buffer, if one waits and the guest offers one.
    fn deliver_event(&mut self) {
        if !self.event_pending || self.broken {
            return;
        }
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let r = (|| -> Result<bool, String> {
            let Some(chain) = pop_chain(&mut a.queues[EVQ], &a.mem)? else {
                return Ok(false);
            };
            let c = parse_rx_chain(&a.mem, chain, 4)?;
            let n = write_chain(
                &a.mem,
                &c,
                &[&VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes()],
            )?;
            a.queues[EVQ]
                .add_used(&a.mem, c.head, n)
                .map_err(|e| format!("{e:?}"))?;
            a.used[EVQ] = true;
            Ok(true)
        })();
        match r {
            Ok(true) => self.event_pending = false,
            Ok(false) => {}
            Err(what) => self.fatal(format_args!("event ring: {what}")),
        }
    }

    // ----- timers ------------------------------------------------------------------

    fn expire(&mut self, now: Instant) {
        let before = self.pending.len();
        self.pending.retain(|_, p| p.deadline > now);
        self.stats.refused += (before - self.pending.len()) as u64;
        self.lingering.retain(|_, l| l.deadline > now);
        let late: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, hc)| hc.deadline.is_some_and(|d| d <= now))
            .map(|(&k, _)| k)
            .collect();
        for key in late {
            log::debug!("{}: connection {key:?} timed out", self.name);
            self.host_event(key, |c| c.abort());
        }
    }

    /// Deadlines for connections waiting on the guest, and the timer for the first.
    fn arm_timer(&mut self, now: Instant) {
        for (key, hc) in self.conns.iter_mut() {
            let wait = match self.muxer.conn(*key).map(|c| c.state()) {
                Some(State::LocalInit) => Some(REQUEST_TIMEOUT_MS),
                // While the host reader still takes the guest's last bytes, the guest's
                // RST is not waited for yet (an abort would drop them).
                Some(State::Closing) if hc.to_host.is_empty() || hc.stream.is_none() => {
                    Some(CLOSE_TIMEOUT_MS)
                }
                _ => None,
            };
            match wait {
                None => hc.deadline = None,
                Some(ms) if hc.deadline.is_none() => {
                    hc.deadline = Some(now + Duration::from_millis(ms))
                }
                Some(_) => {}
            }
        }
        let first = self
            .conns
            .values()
            .filter_map(|c| c.deadline)
            .chain(self.pending.values().map(|p| p.deadline))
            .chain(self.lingering.values().map(|l| l.deadline))
            .min();
        if first == self.timer_at {
            return;
        }
        let r = match first {
            Some(t) => self.timer.reset(
                t.saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
                None,
            ),
            None => self.timer.reset(Duration::ZERO, None),
        };
        match r {
            Ok(()) => self.timer_at = first,
            Err(e) => self.warn(format_args!("arming its timer: {e}")),
        }
    }

    /// After any event: everything that can move, moves; then the timer and the
    /// guest's interrupt.
    fn pump(&mut self, tx: bool) {
        let now = Instant::now();
        self.expire(now);
        let mut tx = tx;
        for _ in 0..8 {
            self.accept_clients();
            if tx || self.tx_blocked || self.tx_more {
                self.tx_blocked = false;
                self.process_tx();
            }
            self.fill_rx();
            self.deliver_event();
            if !(self.tx_blocked && self.control.len() < CONTROL_SOFT_MAX) {
                break;
            }
            tx = true;
        }
        if self.tx_more || self.rx_more {
            if let Err(e) = self.kick.write(1) {
                self.warn(format_args!("waking itself: {e}"));
            }
        }
        self.arm_timer(now);
        self.notify_guest();
    }

    fn notify_guest(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut signal = false;
        let mut err = None;
        for q in 0..3 {
            if !std::mem::take(&mut a.used[q]) {
                continue;
            }
            match a.queues[q].needs_notification(&a.mem) {
                Ok(true) => signal = true,
                Ok(false) => {}
                Err(e) => err = Some(format!("queue {q}: {e:?}")),
            }
        }
        if signal {
            a.interrupt.signal_used();
        }
        if let Some(what) = err {
            self.fatal(format_args!("{what}"));
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // Only the socket we bound: another process may have replaced it since (the
        // held descriptor keeps our inode from being reused meanwhile).
        let ours = match (
            std::fs::symlink_metadata(&self.cfg.uds),
            self.bound.metadata(),
        ) {
            (Ok(now), Ok(ours)) => now.dev() == ours.dev() && now.ino() == ours.ino(),
            _ => false,
        };
        if ours {
            let _ = std::fs::remove_file(&self.cfg.uds);
        }
    }
}

/// A vsock device in a snapshot: the guest's CID (which it knows) and the socket path
/// it had (a restore may use another: Firecracker's `vsock_override`). Connections are
/// not saved: a restore resets the transport.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    pub cid: u64,
    pub uds: PathBuf,
}

impl VirtioDevice for Vsock {
    fn name(&self) -> &str {
        &self.name
    }
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn device_features(&self) -> u64 {
        1 << VIRTIO_RING_F_EVENT_IDX
    }
    fn set_acked_features(&mut self, acked: u64) {
        self.acked = acked;
    }
    /// `guest_cid`, le64.
    fn config_space(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Owned(self.cfg.cid.to_le_bytes().to_vec())
    }
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let queues: [Queue; 3] = super::super::take_queues(&self.name, queues, self.acked)?;
        self.close_all();
        self.rx_held = None;
        self.broken = false;
        self.event_pending = false;
        // Clients that connected while the device was inactive wait in the backlog.
        self.listener_readable = true;
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
            used: [false; 3],
        });
        Ok(())
    }
    fn queue_notify(&mut self, index: usize) {
        if self.active.is_none() {
            return;
        }
        self.pump(index == TX);
    }
    fn save_state(&self) -> Result<crate::devices::virtio::BackendState, String> {
        Ok(crate::devices::virtio::BackendState::Vsock(VsockState {
            cid: self.cfg.cid,
            uds: self.cfg.uds.clone(),
        }))
    }
    fn restore_state(
        &mut self,
        state: &crate::devices::virtio::BackendState,
    ) -> Result<(), String> {
        let crate::devices::virtio::BackendState::Vsock(saved) = state else {
            return Err(format!("the snapshot holds the state of {}", state.kind()));
        };
        if saved.cid != self.cfg.cid {
            return Err(format!(
                "CID changed from {} to {}",
                saved.cid, self.cfg.cid
            ));
        }
        if saved.uds != self.cfg.uds {
            log::info!(
                "{}: restored on {} (was {})",
                self.name,
                self.cfg.uds.display(),
                saved.uds.display()
            );
        }
        Ok(())
    }
    /// The guest's connections ended with the old process: TRANSPORT_RESET tells it.
    fn restored(&mut self) {
        self.transport_reset();
    }
    fn watched_fds(&self) -> Vec<(RawFd, u32)> {
        vec![(self.epoll.as_raw_fd(), 0)]
    }
    fn event(&mut self, _data: u32) {
        self.drain_epoll();
        if self.active.is_some() {
            self.pump(false);
        }
    }
    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
        self.close_all();
        self.rx_held = None;
        self.broken = false;
        self.event_pending = false;
        self.arm_timer(Instant::now());
    }
}

#[cfg(test)]
mod tests;
