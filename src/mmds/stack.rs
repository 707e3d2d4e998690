//! The MMDS responder on a virtio-net TX path: a minimal TCP/IPv4 endpoint for the MMDS
//! address, built on smoltcp.
//!
//! The device hands the responder every guest frame [`Responder::claims`] (an ARP
//! packet asking for the MMDS address, or an IPv4 packet to it) instead of sending it
//! to the back-end; the responder's answers wait in a bounded queue
//! ([`Responder::pop_frame`]) until the device puts them in the guest's receive ring.
//!
//! - ARP is answered here (a request for the MMDS address gets a reply from
//!   [`MMDS_MAC`]), and smoltcp's interface runs on the IP medium: every answer goes,
//!   in an Ethernet frame written here, to the MAC the guest last sent from. On the
//!   Ethernet medium smoltcp would fill its neighbour cache only from ARP packets whose
//!   sender is inside the interface's subnet (IP frames only refresh an existing
//!   entry), and reach other addresses only through a route: a guest at 10.0.2.2
//!   asking for 169.254.169.254/16 would never be answered. On the IP medium it sends
//!   with no route or neighbour lookup, so a guest on any subnet is answered (the
//!   address is a /32: no subnet, no subnet broadcast address).
//! - TCP port 80 only: one smoltcp socket listens at a time; when it takes a SYN it
//!   becomes a connection and another starts listening, up to [`MAX_CONNECTIONS`]. With
//!   that many open, and on any other port, a SYN gets an RST (smoltcp answers segments
//!   no socket accepts with an RST). Other IP protocols get ICMP protocol-unreachable.
//! - Offloads: a frame with `VIRTIO_NET_HDR_F_NEEDS_CSUM` has its checksum completed
//!   here (over the IP packet from `csum_start`), so smoltcp verifies every checksum
//!   as usual. A TSO frame (`gso_type` TCPV4) is taken as the one large segment it
//!   stands for: smoltcp keeps what fits its receive window and acknowledges that, and
//!   the guest sends the rest again. IP fragments are dropped (smoltcp is built without
//!   reassembly; a guest's HTTP request never needs it).
//!
//! Bounds (a hostile guest can exhaust only its own metadata service):
//! - [`MAX_CONNECTIONS`] connections (half-open ones included), each with a
//!   [`RX_BUFFER`]-byte receive and a [`TX_BUFFER`]-byte send buffer in smoltcp, a
//!   request buffer of at most [`MAX_REQUEST`] bytes (the HTTP layer answers a full
//!   buffer without a complete request with its 413 and a close; should it ask for
//!   more, the connection is reset) and one response at a time. After a response that
//!   closes, what the guest still sends is read and dropped.
//! - Time: a handshake has [`HANDSHAKE_TIMEOUT`], an open connection [`IDLE_TIMEOUT`]
//!   from the guest's last segment on it and [`LIFETIME`] in all; then an idle one is
//!   closed with a FIN (given [`CLOSE_GRACE`] to finish) and any other reset.
//! - At most [`MAX_PENDING`] answer frames wait for the guest's receive buffers; when
//!   the queue is full smoltcp is told the link is busy and sends later (TCP
//!   retransmits; an ARP reply is dropped and the guest asks again).
//! - Work per call: one guest frame, then smoltcp's egress (bounded by the queue), and
//!   per connection at most [`SERVES_PER_STEP`] requests served.
//!
//! Time: smoltcp needs polling for retransmissions, and the connection limits need
//! checking without guest traffic, so the responder owns a timerfd (watched by the
//! device, [`Responder::timer_fd`]), armed for the earliest of smoltcp's `poll_at` and
//! the connection deadlines. Every entry point takes `now`, so tests inject time.

use super::http::MAX_REQUEST;
use super::{Served, SharedMmds};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Address};
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};
use vmm_sys_util::timerfd::TimerFd;

/// The virtio-net header in front of every frame, both ways.
pub const HDR: usize = 12;
const ETH: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
const NEEDS_CSUM: u8 = 1;

/// The MMDS side's MAC: locally administered, unicast ("FERMDS").
pub const MMDS_MAC: [u8; 6] = [0x46, 0x45, 0x52, 0x4d, 0x44, 0x53];
/// The only port answered.
pub const PORT: u16 = 80;
/// Open connections at most, half-open ones included; a SYN beyond gets an RST.
pub const MAX_CONNECTIONS: usize = 32;
/// smoltcp's receive buffer per connection (the window offered); drained into the
/// request buffer on every step.
pub const RX_BUFFER: usize = 4096;
/// smoltcp's send buffer per connection; a larger response is fed in as it drains.
pub const TX_BUFFER: usize = 16 * 1024;
/// Answer frames waiting for the guest's receive buffers, at most.
pub const MAX_PENDING: usize = 64;
/// The IP MTU of the link (the guest's frames to the MMDS may be larger: TSO).
const MTU: usize = 1500;
/// A connection not established within this is reset.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection the guest sent nothing on for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection is closed this long after it opened, whatever it does.
pub const LIFETIME: Duration = Duration::from_secs(300);
/// A connection closed for its time is reset if not gone after this.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Requests served per connection per step (pipelined requests wait for the next).
const SERVES_PER_STEP: usize = 4;
/// The timer is never armed closer than this: should smoltcp keep asking to be polled
/// "now", the timer fires at most 100 times a second (its own timers are far longer:
/// no delayed ACKs, retransmissions after 100s of ms).
const MIN_TIMER: Duration = Duration::from_millis(10);

/// One guest connection to port 80.
struct Conn {
    handle: SocketHandle,
    /// The guest's end (the 4-tuple's remote half).
    remote: Option<IpEndpoint>,
    /// Request bytes received and not yet answered (at most `MAX_REQUEST`).
    request: Vec<u8>,
    /// The response being sent and how much of it smoltcp has taken.
    response: Vec<u8>,
    sent: usize,
    /// Close once the response is sent.
    close_after: bool,
    opened: Instant,
    /// The guest's last segment on this connection.
    last_seen: Instant,
    /// Closed for its time at.
    closing: Option<Instant>,
}

impl Conn {
    fn deadline(&self, state: tcp::State) -> Instant {
        if let Some(t) = self.closing {
            return t + CLOSE_GRACE;
        }
        let idle = if state == tcp::State::SynReceived {
            HANDSHAKE_TIMEOUT
        } else {
            IDLE_TIMEOUT
        };
        (self.last_seen + idle).min(self.opened + LIFETIME)
    }
}

/// The responder's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Guest frames taken.
    pub frames_in: u64,
    /// Guest frames dropped before smoltcp: malformed, fragmented, bad offload header.
    pub frames_bad: u64,
    /// Answer frames queued for the guest.
    pub frames_out: u64,
    /// Answer frames dropped because the queue was full.
    pub frames_dropped: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Connections ended by a time limit.
    pub timed_out: u64,
}

/// The MMDS endpoint of one net interface.
pub struct Responder {
    mmds: SharedMmds,
    ipv4: Ipv4Addr,
    iface: Interface,
    sockets: SocketSet<'static>,
    /// The socket waiting for a SYN, while there is room for a connection.
    listener: Option<SocketHandle>,
    conns: Vec<Conn>,
    /// Frames for the guest, virtio-net header (zeroed) first.
    out: VecDeque<Vec<u8>>,
    /// smoltcp found the queue full: poll again once it drains.
    starved: bool,
    /// Where answers go: the source MAC of the guest's last frame to the MMDS.
    guest_mac: [u8; 6],
    /// smoltcp's clock counts from here.
    epoch: Instant,
    timer: Option<TimerFd>,
    timer_at: Option<Instant>,
    counters: Counters,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("ipv4", &self.ipv4)
            .field("connections", &self.conns.len())
            .field("pending", &self.out.len())
            .finish_non_exhaustive()
    }
}

impl Responder {
    /// A responder answering for `ipv4` with the document in `mmds`.
    pub fn new(mmds: SharedMmds, ipv4: Ipv4Addr) -> Responder {
        let epoch = Instant::now();
        let mut config = Config::new(HardwareAddress::Ip);
        // Initial sequence numbers; a guest guessing them gains nothing (it can only
        // disturb its own connections), so a failure to get entropy is no error.
        config.random_seed = getrandom::u64().unwrap_or(0x6d6d_6473_5f73_6565);
        let (mut out, mut starved, mut counters) = (VecDeque::new(), false, Counters::default());
        let mut link = Link {
            packet: None,
            out: &mut out,
            guest_mac: [0; 6],
            starved: &mut starved,
            counters: &mut counters,
        };
        let mut iface = Interface::new(config, &mut link, stamp(epoch, epoch));
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(ipv4), 32));
        });
        let timer = match crate::timer::nonblocking() {
            Ok(t) => Some(t),
            Err(e) => {
                log::warn!(
                    "MMDS {ipv4}: cannot create its timer ({e}): retransmissions and \
                     time limits only advance with guest frames"
                );
                None
            }
        };
        let mut r = Responder {
            mmds,
            ipv4,
            iface,
            sockets: SocketSet::new(Vec::new()),
            listener: None,
            conns: Vec::new(),
            out: VecDeque::new(),
            starved: false,
            guest_mac: [0xff; 6],
            epoch,
            timer,
            timer_at: None,
            counters: Counters::default(),
        };
        r.ensure_listener();
        r
    }

    /// The address answered for.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    /// Whether `frame` (virtio-net header first) is for the MMDS: an ARP packet whose
    /// target protocol address is the MMDS address, or an IPv4 packet to it. A few
    /// byte comparisons, no lock, no allocation: this runs on every transmitted frame.
    pub fn claims(&self, frame: &[u8]) -> bool {
        claims(self.ipv4.octets(), frame)
    }

    /// Takes one guest frame (virtio-net header first) that [`Self::claims`] accepted
    /// and answers it as far as it can now. `frame` may be changed (its checksum is
    /// completed in place).
    pub fn handle_frame(&mut self, frame: &mut [u8], now: Instant) {
        self.counters.frames_in += 1;
        if frame.len() < HDR + ETH {
            self.counters.frames_bad += 1;
            return;
        }
        match [frame[HDR + 12], frame[HDR + 13]] {
            ETHERTYPE_ARP => self.answer_arp(&frame[HDR..]),
            ETHERTYPE_IPV4 => {
                let Some((start, end)) = self.check_ipv4(frame) else {
                    self.counters.frames_bad += 1;
                    return;
                };
                self.guest_mac.copy_from_slice(&frame[HDR + 6..HDR + 12]);
                self.step(Some(&frame[start..end]), now);
            }
            _ => self.counters.frames_bad += 1,
        }
    }

    /// The timer fired (or may have): advance smoltcp and the time limits.
    pub fn on_timer(&mut self, now: Instant) {
        if let Some(t) = self.timer.as_mut() {
            // Non-blocking: EAGAIN when a re-arm already cleared the expiry.
            let _ = t.wait();
        }
        self.timer_at = None;
        self.step(None, now);
    }

    /// The next answer frame for the guest (virtio-net header first, zeroed). When the
    /// queue drains after smoltcp found it full, smoltcp is polled for more (the only
    /// case that reads the clock, `now`).
    pub fn pop_frame(&mut self, now: impl FnOnce() -> Instant) -> Option<Vec<u8>> {
        if self.out.is_empty() && self.starved {
            self.starved = false;
            self.step(None, now());
        }
        self.out.pop_front()
    }

    /// Whether answer frames wait for the guest.
    pub fn has_frames(&self) -> bool {
        !self.out.is_empty() || self.starved
    }

    /// The timer's fd, to be watched (edge-triggered) while the device is active.
    pub fn timer_fd(&self) -> Option<RawFd> {
        self.timer.as_ref().map(|t| t.as_raw_fd())
    }

    /// The guest's driver reset the device: every connection and waiting frame is
    /// dropped silently (the guest's stack starts over with the link).
    pub fn reset(&mut self) {
        for c in self.conns.drain(..) {
            self.sockets.remove(c.handle);
        }
        self.out.clear();
        self.starved = false;
        self.ensure_listener();
        self.disarm();
    }

    /// Open connections (half-open ones included).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Answer frames waiting for the guest.
    pub fn pending(&self) -> usize {
        self.out.len()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    // ----- frames ------------------------------------------------------------------

    /// Replies to an ARP request for the MMDS address (anything else is ignored).
    fn answer_arp(&mut self, eth: &[u8]) {
        let Some(arp) = eth.get(ETH..ETH + 28) else {
            self.counters.frames_bad += 1;
            return;
        };
        // Ethernet/IPv4, request.
        if arp[..8] != [0, 1, 8, 0, 6, 4, 0, 1] || arp[24..28] != self.ipv4.octets() {
            return;
        }
        let requester_mac = &eth[6..12];
        let mut f = vec![0u8; HDR + ETH + 28];
        let e = &mut f[HDR..];
        e[..6].copy_from_slice(requester_mac);
        e[6..12].copy_from_slice(&MMDS_MAC);
        e[12..14].copy_from_slice(&ETHERTYPE_ARP);
        let a = &mut e[ETH..];
        a[..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        a[8..14].copy_from_slice(&MMDS_MAC);
        a[14..18].copy_from_slice(&self.ipv4.octets());
        a[18..28].copy_from_slice(&arp[8..18]);
        self.guest_mac.copy_from_slice(requester_mac);
        push_frame(&mut self.out, &mut self.counters, f);
    }

    /// Checks an IPv4 frame before smoltcp sees it and completes a partial checksum.
    /// The IP packet's range in `frame`, or None to drop it.
    fn check_ipv4(&self, frame: &mut [u8]) -> Option<(usize, usize)> {
        let start = HDR + ETH;
        let ip = frame.get(start..start + 20)?;
        if ip[0] >> 4 != 4 {
            return None;
        }
        // More fragments, or a fragment offset: no reassembly here.
        if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
            return None;
        }
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let end = start.checked_add(total)?;
        if end > frame.len() || total < 20 {
            return None;
        }
        if frame[0] & NEEDS_CSUM != 0 {
            let csum_start = HDR + usize::from(u16::from_le_bytes([frame[6], frame[7]]));
            let field = csum_start + usize::from(u16::from_le_bytes([frame[8], frame[9]]));
            // The checksummed part lies inside the IP packet's payload.
            if csum_start < start + 20 || field + 2 > end {
                return None;
            }
            let sum = !fold(ones_sum(&frame[csum_start..end]));
            frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
            frame[0] &= !NEEDS_CSUM;
        }
        Some((start, end))
    }

    // ----- smoltcp -----------------------------------------------------------------

    /// One round: time limits, the guest's packet (if any) and smoltcp's answers, the
    /// HTTP exchanges, smoltcp's answers to those, clean-up and the timer.
    fn step(&mut self, packet: Option<&[u8]>, now: Instant) {
        self.expire(now);
        let t = stamp(self.epoch, now);
        // A pure SYN for a connection that exists (a retransmission) is that
        // connection's: the listener is out of the set while it is processed, so it
        // cannot take the SYN a second time.
        let mut hidden = None;
        if let Some(p) = packet {
            if let Some((remote, pure_syn)) = tcp_source(p) {
                let mut known = false;
                for c in self.conns.iter_mut().filter(|c| c.remote == Some(remote)) {
                    c.last_seen = now;
                    known = true;
                }
                if known && pure_syn {
                    hidden = self.listener.take().map(|h| self.sockets.remove(h));
                }
            }
        }
        let mut link = Link {
            packet,
            out: &mut self.out,
            guest_mac: self.guest_mac,
            starved: &mut self.starved,
            counters: &mut self.counters,
        };
        self.iface.poll(t, &mut link, &mut self.sockets);
        if let Some(smoltcp::socket::Socket::Tcp(s)) = hidden {
            self.listener = Some(self.sockets.add(s));
        }
        self.adopt(now);
        if self.serve(now) {
            let mut link = Link {
                packet: None,
                out: &mut self.out,
                guest_mac: self.guest_mac,
                starved: &mut self.starved,
                counters: &mut self.counters,
            };
            self.iface.poll(t, &mut link, &mut self.sockets);
        }
        self.reap();
        self.ensure_listener();
        self.arm_timer(now);
    }

    /// The listener took a SYN: it is a connection now.
    fn adopt(&mut self, now: Instant) {
        let Some(h) = self.listener else {
            return;
        };
        let s = self.sockets.get::<tcp::Socket>(h);
        if s.state() == tcp::State::Listen {
            return;
        }
        let remote = s.remote_endpoint();
        self.listener = None;
        self.counters.accepted += 1;
        self.conns.push(Conn {
            handle: h,
            remote,
            request: Vec::new(),
            response: Vec::new(),
            sent: 0,
            close_after: false,
            opened: now,
            last_seen: now,
            closing: None,
        });
    }

    /// A socket listens on port 80 while there is room for another connection.
    fn ensure_listener(&mut self) {
        if self.listener.is_some() || self.conns.len() >= MAX_CONNECTIONS {
            return;
        }
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; RX_BUFFER]),
            tcp::SocketBuffer::new(vec![0u8; TX_BUFFER]),
        );
        // Answer at once: no delayed ACKs, no Nagle (a response is written whole).
        s.set_ack_delay(None);
        s.set_nagle_enabled(false);
        if s.listen(IpEndpoint::new(IpAddress::Ipv4(self.ipv4), PORT))
            .is_ok()
        {
            self.listener = Some(self.sockets.add(s));
        }
    }

    /// Moves request bytes from smoltcp to the HTTP layer and responses back. True when
    /// smoltcp was given something to send (or a close).
    fn serve(&mut self, now: Instant) -> bool {
        let mut moved = false;
        for c in &mut self.conns {
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            for _ in 0..SERVES_PER_STEP {
                // What the guest sent, up to the request limit; dropped once the
                // connection is closing.
                if c.close_after || c.closing.is_some() {
                    let _ = s.recv(|d| (d.len(), ()));
                    c.request.clear();
                }
                let room = MAX_REQUEST.saturating_sub(c.request.len());
                if room > 0 && s.can_recv() {
                    let _ = s.recv(|d| {
                        let n = d.len().min(room);
                        c.request.extend_from_slice(&d[..n]);
                        (n, ())
                    });
                }
                // The response in hand goes first.
                if c.sent < c.response.len() {
                    if let Ok(n) = s.send_slice(&c.response[c.sent..]) {
                        c.sent += n;
                        moved |= n > 0;
                    }
                    if c.sent < c.response.len() {
                        break;
                    }
                    c.response = Vec::new();
                    c.sent = 0;
                }
                if c.close_after || c.closing.is_some() {
                    use tcp::State::*;
                    if matches!(s.state(), SynReceived | Established | CloseWait) {
                        s.close();
                        moved = true;
                    }
                    break;
                }
                if c.request.is_empty() || !s.may_send() {
                    break;
                }
                let served = {
                    let mut mmds = self.mmds.lock().unwrap_or_else(|p| p.into_inner());
                    mmds.serve(&c.request, now)
                };
                match served {
                    Served::NeedMore => {
                        if c.request.len() >= MAX_REQUEST {
                            // The HTTP layer gave no answer to a full buffer (its
                            // contract is a 413): the connection cannot go on.
                            s.abort();
                            moved = true;
                        }
                        break;
                    }
                    Served::Reply {
                        consumed,
                        response,
                        close,
                    } => {
                        c.request.drain(..consumed.min(c.request.len()));
                        c.response = response;
                        c.sent = 0;
                        c.close_after = close;
                    }
                }
            }
            // The guest closed its half and nothing is left to answer: close ours.
            if s.state() == tcp::State::CloseWait && c.response.is_empty() && !s.can_recv() {
                s.close();
                moved = true;
            }
        }
        moved
    }

    /// Ends connections past their time: an idle one with a FIN, any other (or one
    /// that did not finish closing) with an RST.
    fn expire(&mut self, now: Instant) {
        for c in &mut self.conns {
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            if now < c.deadline(s.state()) {
                continue;
            }
            if c.closing.is_none() {
                self.counters.timed_out += 1;
            }
            let quiet = c.request.is_empty() && c.response.is_empty();
            if c.closing.is_none() && quiet && s.state() == tcp::State::Established {
                s.close();
                c.closing = Some(now);
            } else {
                // Closed now: an RST goes out with the next poll, and the clean-up
                // after it drops the connection.
                s.abort();
            }
        }
    }

    /// Drops the connections smoltcp is done with (closed, or in TIME-WAIT: a late
    /// retransmission of the guest's FIN then gets an RST, which ends its side too).
    fn reap(&mut self) {
        let sockets = &mut self.sockets;
        self.conns.retain(|c| {
            let open = sockets.get::<tcp::Socket>(c.handle).is_open();
            if !open {
                sockets.remove(c.handle);
            }
            open
        });
    }

    // ----- timer -------------------------------------------------------------------

    /// Arms the timer for the earliest of smoltcp's next poll and the connection
    /// deadlines. While the queue is full, smoltcp's "now" is left to the guest's
    /// receive buffers ([`Self::pop_frame`]) so that a guest which never takes its
    /// frames cannot make the timer spin.
    fn arm_timer(&mut self, now: Instant) {
        let mut first = self
            .conns
            .iter()
            .map(|c| c.deadline(self.sockets.get::<tcp::Socket>(c.handle).state()))
            .min();
        if !self.starved {
            let t = stamp(self.epoch, now);
            if let Some(at) = self.iface.poll_at(t, &self.sockets) {
                let at = self.epoch + Duration::from_micros(at.total_micros().max(0) as u64);
                first = Some(first.map_or(at, |f| f.min(at)));
            }
        }
        if first == self.timer_at {
            return;
        }
        let Some(timer) = self.timer.as_mut() else {
            return;
        };
        let r = match first {
            Some(at) => timer.reset(at.saturating_duration_since(now).max(MIN_TIMER), None),
            None => timer.reset(Duration::ZERO, None),
        };
        match r {
            Ok(()) => self.timer_at = first,
            Err(e) => log::warn!("MMDS {}: arming its timer: {e}", self.ipv4),
        }
    }

    fn disarm(&mut self) {
        if let Some(t) = self.timer.as_mut() {
            let _ = t.reset(Duration::ZERO, None);
        }
        self.timer_at = None;
    }
}

/// smoltcp's time for `now`.
fn stamp(epoch: Instant, now: Instant) -> smoltcp::time::Instant {
    let us = now.saturating_duration_since(epoch).as_micros();
    smoltcp::time::Instant::from_micros(i64::try_from(us).unwrap_or(i64::MAX))
}

/// See [`Responder::claims`].
fn claims(ip: [u8; 4], frame: &[u8]) -> bool {
    let Some(eth) = frame.get(HDR..) else {
        return false;
    };
    match eth.get(12..14) {
        Some(t) if t == ETHERTYPE_IPV4 => eth.get(ETH + 16..ETH + 20) == Some(&ip[..]),
        Some(t) if t == ETHERTYPE_ARP => eth.get(ETH + 24..ETH + 28) == Some(&ip[..]),
        _ => false,
    }
}

/// The source (address, port) of a TCP segment in an IPv4 packet, and whether it is
/// a SYN without ACK.
fn tcp_source(ip: &[u8]) -> Option<(IpEndpoint, bool)> {
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if *ip.get(9)? != 6 {
        return None;
    }
    let s = ip.get(12..16)?;
    let src = Ipv4Address::new(s[0], s[1], s[2], s[3]);
    let tcp = ip.get(ihl..ihl + 20)?;
    let port = u16::from_be_bytes([tcp[0], tcp[1]]);
    let flags = tcp[13];
    Some((
        IpEndpoint::new(IpAddress::Ipv4(src), port),
        flags & 0x12 == 0x02,
    ))
}

fn ones_sum(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn push_frame(out: &mut VecDeque<Vec<u8>>, counters: &mut Counters, frame: Vec<u8>) {
    if out.len() < MAX_PENDING {
        out.push_back(frame);
        counters.frames_out += 1;
    } else {
        counters.frames_dropped += 1;
    }
}

/// smoltcp's view of the link for one step: at most one packet in, answers out to
/// the bounded queue.
struct Link<'a> {
    packet: Option<&'a [u8]>,
    out: &'a mut VecDeque<Vec<u8>>,
    guest_mac: [u8; 6],
    starved: &'a mut bool,
    counters: &'a mut Counters,
}

struct RxToken<'a>(&'a [u8]);

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

struct TxToken<'a> {
    out: &'a mut VecDeque<Vec<u8>>,
    guest_mac: [u8; 6],
    counters: &'a mut Counters,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; HDR + ETH + len];
        frame[HDR..HDR + 6].copy_from_slice(&self.guest_mac);
        frame[HDR + 6..HDR + 12].copy_from_slice(&MMDS_MAC);
        frame[HDR + 12..HDR + 14].copy_from_slice(&ETHERTYPE_IPV4);
        let r = f(&mut frame[HDR + ETH..]);
        push_frame(self.out, self.counters, frame);
        r
    }
}

impl Device for Link<'_> {
    type RxToken<'b>
        = RxToken<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b>
    where
        Self: 'b;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.packet.take()?;
        // The answer to this packet (an ACK, an RST) is built even with the queue
        // full, and then dropped: TCP recovers.
        Some((
            RxToken(packet),
            TxToken {
                out: self.out,
                guest_mac: self.guest_mac,
                counters: self.counters,
            },
        ))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        if self.out.len() >= MAX_PENDING {
            *self.starved = true;
            return None;
        }
        Some(TxToken {
            out: self.out,
            guest_mac: self.guest_mac,
            counters: self.counters,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        caps
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::mmds::Mmds;
    use proptest::prelude::*;
    use std::sync::{Arc, Mutex};

    pub(crate) const MMDS_IP: [u8; 4] = [169, 254, 169, 254];
    /// A guest off the link-local subnet (Firecracker's usual example network).
    pub(crate) const GUEST_IP: [u8; 4] = [10, 0, 2, 2];
    pub(crate) const GUEST_MAC: [u8; 6] = [0x46, 0x45, 0x52, 0, 0, 1];
    pub(crate) const SYN: u8 = 0x02;
    pub(crate) const RST: u8 = 0x04;
    const PSH: u8 = 0x08;
    pub(crate) const ACK: u8 = 0x10;
    const FIN: u8 = 0x01;

    fn responder() -> Responder {
        let mmds = Arc::new(Mutex::new(Mmds::default()));
        Responder::new(mmds, Ipv4Addr::from(MMDS_IP))
    }

    fn eth(ethertype: [u8; 2], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; HDR];
        f.extend_from_slice(&MMDS_MAC);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&ethertype);
        f.extend_from_slice(payload);
        f
    }

    pub(crate) fn arp_request(target: [u8; 4]) -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
        a.extend_from_slice(&GUEST_MAC);
        a.extend_from_slice(&GUEST_IP);
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&target);
        let mut f = eth(ETHERTYPE_ARP, &a);
        f[HDR..HDR + 6].copy_from_slice(&[0xff; 6]);
        f
    }

    /// A TCP segment from the guest, checksums right.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn segment(
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&window.to_be_bytes());
        t.extend_from_slice(payload);
        let sum = pseudo_sum(GUEST_IP, MMDS_IP, t.len()) + ones_sum(&t);
        let c = !fold(sum);
        t[16..18].copy_from_slice(&c.to_be_bytes());
        eth(ETHERTYPE_IPV4, &ipv4(GUEST_IP, MMDS_IP, 6, &t))
    }

    fn pseudo_sum(src: [u8; 4], dst: [u8; 4], len: usize) -> u32 {
        ones_sum(&src) + ones_sum(&dst) + 6 + len as u32
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
        ip[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let c = !fold(ones_sum(&ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(payload);
        ip
    }

    /// A TCP segment to the guest, as parsed from an answer frame.
    #[derive(Debug)]
    struct Seg {
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: Vec<u8>,
    }

    /// Parses an answer frame as an IPv4/TCP segment to the guest, checking the
    /// virtio-net header, the MACs and both checksums on the way.
    fn parse(f: &[u8]) -> Seg {
        assert_eq!(f[HDR..HDR + 6], GUEST_MAC);
        let ip = &f[HDR + ETH..];
        assert_eq!(ip[16..20], GUEST_IP);
        parse_any(f).expect("a TCP segment")
    }

    /// Parses an answer frame as an IPv4/TCP segment to anyone (None for another
    /// protocol), checking the header, the source MAC and the checksums.
    fn parse_any(f: &[u8]) -> Option<Seg> {
        assert_eq!(f[..HDR], [0; HDR], "zeroed virtio-net header");
        assert_eq!(f[HDR + 6..HDR + 12], MMDS_MAC);
        if f[HDR + 12..HDR + 14] != ETHERTYPE_IPV4 {
            return None;
        }
        let ip = &f[HDR + ETH..];
        let ihl = usize::from(ip[0] & 15) * 4;
        assert_eq!(fold(ones_sum(&ip[..ihl])), 0xffff, "IP checksum");
        assert_eq!(ip[12..16], MMDS_IP);
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        assert_eq!(total, ip.len());
        if ip[9] != 6 {
            return None;
        }
        let dst = [ip[16], ip[17], ip[18], ip[19]];
        let t = &ip[ihl..total];
        assert_eq!(
            fold(pseudo_sum(MMDS_IP, dst, t.len()) + ones_sum(t)),
            0xffff,
            "TCP checksum"
        );
        let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let off = usize::from(t[12] >> 4) * 4;
        Some(Seg {
            dst,
            sport: u16::from_be_bytes([t[0], t[1]]),
            dport: u16::from_be_bytes([t[2], t[3]]),
            seq: be32(&t[4..8]),
            ack: be32(&t[8..12]),
            flags: t[13],
            payload: t[off..].to_vec(),
        })
    }

    fn drain(r: &mut Responder, now: Instant) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| r.pop_frame(|| now)).collect()
    }

    fn send(r: &mut Responder, mut f: Vec<u8>, now: Instant) -> Vec<Seg> {
        assert!(r.claims(&f));
        r.handle_frame(&mut f, now);
        drain(r, now).iter().map(|f| parse(f)).collect()
    }

    /// The guest's side of one connection.
    struct Client {
        port: u16,
        /// Next sequence number to send, and the next one expected from the MMDS.
        seq: u32,
        ack: u32,
    }

    impl Client {
        fn connect(r: &mut Responder, port: u16, now: Instant) -> Client {
            let segs = send(r, segment(port, PORT, 1000, 0, SYN, 64240, &[]), now);
            assert_eq!(segs.len(), 1, "{segs:?}");
            let s = &segs[0];
            assert_eq!(s.flags & (SYN | ACK | RST), SYN | ACK, "{s:?}");
            assert_eq!((s.sport, s.dport, s.ack), (PORT, port, 1001));
            let c = Client {
                port,
                seq: 1001,
                ack: s.seq.wrapping_add(1),
            };
            assert!(send(r, c.seg(ACK, &[]), now).is_empty());
            c
        }

        fn seg(&self, flags: u8, payload: &[u8]) -> Vec<u8> {
            segment(self.port, PORT, self.seq, self.ack, flags, 64240, payload)
        }

        /// Sends `data`, then acknowledges everything until the MMDS closes or stops
        /// sending; what it sent, and whether it closed (FIN).
        fn exchange(&mut self, r: &mut Responder, data: &[u8], now: Instant) -> (Vec<u8>, bool) {
            let mut segs = send(r, self.seg(ACK | PSH, data), now);
            self.seq = self.seq.wrapping_add(data.len() as u32);
            let mut got = Vec::new();
            let mut fin = false;
            for _ in 0..1000 {
                if segs.is_empty() {
                    break;
                }
                for s in &segs {
                    assert_eq!(s.flags & RST, 0, "reset: {s:?}");
                    if s.seq == self.ack {
                        got.extend_from_slice(&s.payload);
                        self.ack = self.ack.wrapping_add(s.payload.len() as u32);
                        if s.flags & FIN != 0 {
                            self.ack = self.ack.wrapping_add(1);
                            fin = true;
                        }
                    }
                }
                segs = send(r, self.seg(ACK, &[]), now);
            }
            (got, fin)
        }
    }

    #[test]
    fn an_arp_request_for_the_mmds_address_gets_a_reply_from_its_mac() {
        let mut r = responder();
        let now = Instant::now();
        let mut req = arp_request(MMDS_IP);
        assert!(r.claims(&req));
        r.handle_frame(&mut req, now);
        let out = drain(&mut r, now);
        assert_eq!(out.len(), 1);
        let f = &out[0];
        assert_eq!(f[..HDR], [0; HDR]);
        let e = &f[HDR..];
        assert_eq!(e[..6], GUEST_MAC, "to the asker");
        assert_eq!(e[6..12], MMDS_MAC);
        assert_eq!(e[12..14], ETHERTYPE_ARP);
        let a = &e[ETH..];
        assert_eq!(a[..8], [0, 1, 8, 0, 6, 4, 0, 2], "Ethernet/IPv4 reply");
        assert_eq!(a[8..14], MMDS_MAC);
        assert_eq!(a[14..18], MMDS_IP);
        assert_eq!(a[18..24], GUEST_MAC);
        assert_eq!(a[24..28], GUEST_IP);
        // ARP for another address is not the MMDS's; an ARP reply to it is ignored.
        assert!(!r.claims(&arp_request([10, 0, 2, 1])));
        let mut reply = arp_request(MMDS_IP);
        reply[HDR + ETH + 7] = 2;
        r.handle_frame(&mut reply, now);
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn a_syn_from_a_guest_off_the_link_local_subnet_gets_a_syn_ack() {
        let mut r = responder();
        let now = Instant::now();
        Client::connect(&mut r, 40000, now);
        assert_eq!(r.connections(), 1);
    }

    /// A responder over a document with `{"latest": {"meta-data": {"ami-id": ...}}}`
    /// and a leaf big enough to take several segments.
    fn responder_with_document() -> Responder {
        let mut mmds = Mmds::default();
        let big = "x".repeat(20_000);
        mmds.store
            .put(serde_json::json!({
                "latest": {"meta-data": {"ami-id": "ami-12345678", "big": big}}
            }))
            .unwrap();
        Responder::new(Arc::new(Mutex::new(mmds)), Ipv4Addr::from(MMDS_IP))
    }

    fn body(response: &[u8]) -> String {
        let text = String::from_utf8_lossy(response);
        let (_, body) = text.split_once("\r\n\r\n").expect("a complete head");
        body.to_string()
    }

    #[test]
    fn a_get_reaches_the_guest_as_an_http_response() {
        let mut r = responder_with_document();
        let now = Instant::now();
        let mut c = Client::connect(&mut r, 40001, now);
        // Keep-alive: requests on one connection, a leaf and a listing.
        let (got, fin) = c.exchange(
            &mut r,
            b"GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
            now,
        );
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
        assert_eq!(body(&got), "ami-12345678");
        assert!(!fin);
        let (got, _) = c.exchange(&mut r, b"GET /latest/meta-data/ HTTP/1.1\r\n\r\n", now);
        assert_eq!(body(&got), "ami-id\nbig");
        // A response larger than smoltcp's send buffer arrives whole, then the close
        // the request asked for.
        let (got, fin) = c.exchange(
            &mut r,
            b"GET /latest/meta-data/big HTTP/1.1\r\nConnection: close\r\n\r\n",
            now,
        );
        assert_eq!(body(&got), "x".repeat(20_000));
        assert!(fin, "Connection: close");
        // The guest closes its side too: the connection is gone.
        assert!(send(&mut r, c.seg(FIN | ACK, &[]), now)
            .iter()
            .all(|s| s.flags & RST == 0));
        assert_eq!(r.connections(), 0);
    }

    #[test]
    fn a_request_over_max_request_gets_the_http_error_and_a_close() {
        let mut r = responder_with_document();
        let now = Instant::now();
        let mut c = Client::connect(&mut r, 40012, now);
        let mut request = b"GET /".to_vec();
        request.resize(MAX_REQUEST + 100, b'a');
        let (head, tail) = request.split_at(MAX_REQUEST - 1000);
        for chunk in head.chunks(1000) {
            send(&mut r, c.seg(ACK, chunk), now);
            c.seq = c.seq.wrapping_add(chunk.len() as u32);
        }
        assert_eq!(r.connections(), 1);
        let (got, fin) = c.exchange(&mut r, &tail[..1000], now);
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 413"), "{text:?}");
        assert!(fin);
        // What the guest still sends is taken and dropped.
        let segs = send(&mut r, c.seg(ACK, &tail[1000..]), now);
        assert!(segs.iter().all(|s| s.flags & RST == 0), "{segs:?}");
        assert!(r.conns.iter().all(|c| c.request.is_empty()));
    }

    #[test]
    fn a_syn_to_another_port_gets_a_reset() {
        let mut r = responder();
        let now = Instant::now();
        let segs = send(&mut r, segment(40002, 22, 5, 0, SYN, 1000, &[]), now);
        assert_eq!(segs.len(), 1);
        assert_eq!(segs[0].flags & (RST | ACK), RST | ACK, "{:?}", segs[0]);
        assert_eq!(segs[0].ack, 6);
        assert_eq!(r.connections(), 0);
    }

    #[test]
    fn the_connection_after_the_limit_is_refused_with_a_reset() {
        let mut r = responder();
        let now = Instant::now();
        for i in 0..MAX_CONNECTIONS as u16 {
            Client::connect(&mut r, 41000 + i, now);
        }
        assert_eq!(r.connections(), MAX_CONNECTIONS);
        let segs = send(&mut r, segment(42000, PORT, 5, 0, SYN, 1000, &[]), now);
        assert_eq!(segs.len(), 1);
        assert_ne!(segs[0].flags & RST, 0, "{:?}", segs[0]);
        assert_eq!(r.connections(), MAX_CONNECTIONS);
        // Half-open connections count too.
        let mut r = responder();
        for i in 0..MAX_CONNECTIONS as u16 {
            let segs = send(&mut r, segment(41000 + i, PORT, 5, 0, SYN, 1000, &[]), now);
            assert_eq!(segs[0].flags & (SYN | ACK), SYN | ACK);
        }
        let segs = send(&mut r, segment(42000, PORT, 5, 0, SYN, 1000, &[]), now);
        assert_ne!(segs[0].flags & RST, 0, "{:?}", segs[0]);
    }

    #[test]
    fn an_idle_connection_is_reclaimed_after_its_timeout() {
        let mut r = responder();
        let t0 = Instant::now();
        let c = Client::connect(&mut r, 40003, t0);
        // Half-open: reset after the handshake timeout.
        assert_eq!(
            send(&mut r, segment(40004, PORT, 9, 0, SYN, 1000, &[]), t0).len(),
            1
        );
        assert_eq!(r.connections(), 2);
        let t1 = t0 + HANDSHAKE_TIMEOUT;
        r.on_timer(t1);
        let segs: Vec<Seg> = drain(&mut r, t1).iter().map(|f| parse(f)).collect();
        assert!(
            segs.iter().any(|s| s.dport == 40004 && s.flags & RST != 0),
            "{segs:?}"
        );
        assert_eq!(r.connections(), 1);
        // Established and idle: a FIN after the idle timeout...
        let t2 = t0 + IDLE_TIMEOUT;
        r.on_timer(t2);
        let segs: Vec<Seg> = drain(&mut r, t2).iter().map(|f| parse(f)).collect();
        assert!(
            segs.iter().any(|s| s.dport == 40003 && s.flags & FIN != 0),
            "{segs:?}"
        );
        assert_eq!(r.connections(), 1);
        // ...and, the guest not answering, an RST after the grace.
        let t3 = t2 + CLOSE_GRACE;
        r.on_timer(t3);
        let segs: Vec<Seg> = drain(&mut r, t3).iter().map(|f| parse(f)).collect();
        assert!(
            segs.iter().any(|s| s.dport == 40003 && s.flags & RST != 0),
            "{segs:?}"
        );
        assert_eq!(r.connections(), 0);
        // The slot is free again.
        let _ = c;
        Client::connect(&mut r, 40005, t3);
        assert_eq!(r.counters().timed_out, 2);
    }

    #[test]
    fn a_busy_connection_is_closed_at_its_lifetime() {
        let mut r = responder();
        let t0 = Instant::now();
        let c = Client::connect(&mut r, 40006, t0);
        // The guest keeps the connection alive (never idle) without a request.
        let mut t = t0;
        while t + IDLE_TIMEOUT / 2 < t0 + LIFETIME {
            t += IDLE_TIMEOUT / 2;
            send(&mut r, c.seg(ACK, &[]), t);
            assert_eq!(r.connections(), 1);
        }
        // At its lifetime: a FIN, then (the guest not closing) an RST.
        let t1 = t0 + LIFETIME;
        r.on_timer(t1);
        let segs: Vec<Seg> = drain(&mut r, t1).iter().map(|f| parse(f)).collect();
        assert!(segs.iter().any(|s| s.flags & FIN != 0), "{segs:?}");
        send(&mut r, c.seg(ACK, &[]), t1);
        r.on_timer(t1 + CLOSE_GRACE);
        let segs: Vec<Seg> = drain(&mut r, t1).iter().map(|f| parse(f)).collect();
        assert!(segs.iter().any(|s| s.flags & RST != 0), "{segs:?}");
        assert_eq!(r.connections(), 0);
    }

    #[test]
    fn partial_checksums_are_completed() {
        let mut r = responder();
        let now = Instant::now();
        // A SYN as a guest with checksum offload sends it: the TCP checksum field
        // holds the pseudo-header sum only.
        let mut f = segment(40007, PORT, 1, 0, SYN, 1000, &[]);
        let t = HDR + ETH + 20;
        let partial = fold(pseudo_sum(GUEST_IP, MMDS_IP, 20));
        f[t + 16..t + 18].copy_from_slice(&partial.to_be_bytes());
        f[0] = NEEDS_CSUM;
        f[6..8].copy_from_slice(&((ETH + 20) as u16).to_le_bytes());
        f[8..10].copy_from_slice(&16u16.to_le_bytes());
        let segs = send(&mut r, f.clone(), now);
        assert_eq!(segs.len(), 1);
        assert_eq!(segs[0].flags & (SYN | ACK), SYN | ACK);
        // A checksum offset outside the packet: dropped, no answer.
        f[8..10].copy_from_slice(&4000u16.to_le_bytes());
        f[t..t + 2].copy_from_slice(&40008u16.to_be_bytes());
        assert!(send(&mut r, f, now).is_empty());
        assert_eq!(r.counters().frames_bad, 1);
    }

    #[test]
    fn a_tso_frame_with_a_partial_checksum_is_one_segment() {
        let mut r = responder_with_document();
        let now = Instant::now();
        let mut c = Client::connect(&mut r, 40013, now);
        // A request longer than an MSS, sent by a guest with TSO and checksum offload:
        // one frame, gso_type TCPV4, the TCP checksum field holding the pseudo-header
        // sum only.
        let mut request = b"GET /latest/meta-data/ami-id HTTP/1.1\r\nX-Pad: ".to_vec();
        request.resize(3000, b'p');
        request.extend_from_slice(b"\r\n\r\n");
        let mut f = c.seg(ACK | PSH, &request);
        let t = HDR + ETH + 20;
        let partial = fold(pseudo_sum(GUEST_IP, MMDS_IP, 20 + request.len()));
        f[t + 16..t + 18].copy_from_slice(&partial.to_be_bytes());
        f[0] = NEEDS_CSUM;
        f[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
        f[2..4].copy_from_slice(&((ETH + 40) as u16).to_le_bytes());
        f[4..6].copy_from_slice(&1448u16.to_le_bytes());
        f[6..8].copy_from_slice(&((ETH + 20) as u16).to_le_bytes());
        f[8..10].copy_from_slice(&16u16.to_le_bytes());
        let segs = send(&mut r, f, now);
        c.seq = c.seq.wrapping_add(request.len() as u32);
        let acked = segs.iter().map(|s| s.ack).max();
        assert_eq!(acked, Some(c.seq), "all of it taken: {segs:?}");
        let got: Vec<u8> = segs.iter().flat_map(|s| s.payload.clone()).collect();
        assert_eq!(body(&got), "ami-12345678");
    }

    #[test]
    fn a_retransmitted_syn_does_not_open_a_second_connection() {
        let mut r = responder();
        let now = Instant::now();
        // A freed socket slot before the listener's: the next listener takes it and
        // would come first when smoltcp looks for the socket of a segment.
        let x = Client::connect(&mut r, 40020, now);
        send(&mut r, segment(40021, PORT, 5, 0, SYN, 1000, &[]), now);
        send(&mut r, x.seg(RST, &[]), now);
        assert_eq!(r.connections(), 1);
        let syn = segment(40009, PORT, 77, 0, SYN, 1000, &[]);
        let a = send(&mut r, syn.clone(), now);
        assert_eq!(a.len(), 1);
        let b = send(&mut r, syn, now);
        assert_eq!(r.connections(), 2);
        assert!(b.iter().all(|s| s.flags & RST == 0), "{b:?}");
    }

    #[test]
    fn frames_not_for_the_mmds_are_not_claimed() {
        let r = responder();
        let other = segment(1, 80, 0, 0, SYN, 0, &[]);
        let mut to_other = other.clone();
        to_other[HDR + ETH + 16..HDR + ETH + 20].copy_from_slice(&[169, 254, 169, 253]);
        assert!(r.claims(&other));
        assert!(!r.claims(&to_other));
        // The MMDS address as the source, not the destination.
        let from = eth(ETHERTYPE_IPV4, &ipv4(MMDS_IP, GUEST_IP, 6, &[0; 20]));
        assert!(!r.claims(&from));
        // VLAN-tagged, IPv6, short frames.
        let mut vlan = other.clone();
        vlan[HDR + 12..HDR + 14].copy_from_slice(&[0x81, 0]);
        assert!(!r.claims(&vlan));
        assert!(!r.claims(&other[..HDR + ETH + 19]));
        assert!(!r.claims(&[]));
    }

    #[test]
    fn answers_wait_in_a_bounded_queue() {
        let mut r = responder();
        let now = Instant::now();
        for i in 0..(MAX_PENDING as u16 + 10) {
            let mut f = arp_request(MMDS_IP);
            f[HDR + ETH + 14] = i as u8;
            r.handle_frame(&mut f, now);
        }
        assert_eq!(r.pending(), MAX_PENDING);
        assert_eq!(r.counters().frames_dropped, 10);
        // TCP answers beyond the queue wait in smoltcp and come once it drains.
        let mut r = responder();
        let c = Client::connect(&mut r, 40010, now);
        for i in 0..MAX_PENDING as u16 {
            let mut f = arp_request(MMDS_IP);
            f[HDR + ETH + 14] = i as u8;
            r.handle_frame(&mut f, now);
        }
        let mut get = c.seg(ACK | PSH, b"GET / HTTP/1.1\r\n\r\n");
        r.handle_frame(&mut get, now);
        assert_eq!(r.pending(), MAX_PENDING);
        assert!(r.has_frames());
        let all = drain(&mut r, now);
        assert!(
            all.len() > MAX_PENDING,
            "smoltcp was polled again once the queue drained"
        );
        let tcp: Vec<Seg> = all[MAX_PENDING..].iter().map(|f| parse(f)).collect();
        assert!(tcp.iter().any(|s| !s.payload.is_empty()), "{tcp:?}");
    }

    #[test]
    fn reset_forgets_connections_and_answers() {
        let mut r = responder();
        let now = Instant::now();
        Client::connect(&mut r, 40011, now);
        let mut f = arp_request(MMDS_IP);
        r.handle_frame(&mut f, now);
        r.reset();
        assert_eq!((r.connections(), r.pending()), (0, 0));
        Client::connect(&mut r, 40011, now);
    }

    fn reference_claims(f: &[u8]) -> bool {
        if f.len() < HDR + ETH {
            return false;
        }
        let e = &f[HDR..];
        (e[12..14] == ETHERTYPE_IPV4 && e.len() >= 34 && e[30..34] == MMDS_IP)
            || (e[12..14] == ETHERTYPE_ARP && e.len() >= 42 && e[38..42] == MMDS_IP)
    }

    /// A random guest frame: anything, or shaped like an IPv4/ARP frame for the MMDS
    /// with random contents.
    fn any_frame() -> impl Strategy<Value = Vec<u8>> {
        let bytes = proptest::collection::vec(any::<u8>(), 0..200);
        (0u8..4, bytes, any::<u16>()).prop_map(|(kind, mut b, hdr)| {
            let mut f = vec![0u8; HDR];
            f[0] = (hdr & 3) as u8;
            f[1] = (hdr >> 2) as u8 & 0x81;
            f[6..8].copy_from_slice(&(hdr % 120).to_le_bytes());
            f[8..10].copy_from_slice(&(hdr % 40).to_le_bytes());
            match kind {
                0 => {}
                1 | 2 => {
                    b.resize(b.len().max(ETH + 40), 0);
                    b[12..14].copy_from_slice(&ETHERTYPE_IPV4);
                    b[ETH] = 0x45;
                    b[ETH + 16..ETH + 20].copy_from_slice(&MMDS_IP);
                    if kind == 2 {
                        // Plausible header: right length, no fragment, TCP.
                        let len = (b.len() - ETH) as u16;
                        b[ETH + 2..ETH + 4].copy_from_slice(&len.to_be_bytes());
                        b[ETH + 6] &= 0x40;
                        b[ETH + 7] = 0;
                        b[ETH + 9] = 6;
                    }
                }
                _ => {
                    b.resize(b.len().max(ETH + 28), 0);
                    b[12..14].copy_from_slice(&ETHERTYPE_ARP);
                    b[ETH + 24..ETH + 28].copy_from_slice(&MMDS_IP);
                }
            }
            f.extend_from_slice(&b);
            f
        })
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A full handshake from this port.
        Connect(u16),
        /// A segment with anything in it; seq/ack near the connection's if it has one.
        Segment {
            port: u16,
            dport: u16,
            flags: u8,
            seq: i32,
            ack: i32,
            window: u16,
            payload: Vec<u8>,
        },
        /// Time passes and the timer fires.
        Wait(u32),
        /// The guest takes this many answer frames.
        Take(u8),
        Frame(Vec<u8>),
        Request(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        let port = 50000u16..50040;
        prop_oneof![
            2 => port.clone().prop_map(Op::Connect),
            6 => (
                port.clone(),
                prop_oneof![8 => Just(PORT), 1 => any::<u16>()],
                any::<u8>(),
                prop_oneof![3 => -3000i32..3000, 1 => any::<i32>()],
                prop_oneof![3 => -3000i32..3000, 1 => any::<i32>()],
                any::<u16>(),
                proptest::collection::vec(any::<u8>(), 0..600),
            )
                .prop_map(|(port, dport, flags, seq, ack, window, payload)| Op::Segment {
                    port,
                    dport,
                    flags,
                    seq,
                    ack,
                    window,
                    payload
                }),
            1 => (0u32..400_000).prop_map(Op::Wait),
            2 => any::<u8>().prop_map(Op::Take),
            1 => any_frame().prop_map(Op::Frame),
            2 => port.prop_map(Op::Request),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::test_util::cases(256)))]

        #[test]
        fn random_frames_are_harmless(frames in proptest::collection::vec(any_frame(), 1..40)) {
            let mut r = responder();
            let now = Instant::now();
            for mut f in frames {
                let claimed = r.claims(&f);
                prop_assert_eq!(claimed, reference_claims(&f));
                if claimed {
                    r.handle_frame(&mut f, now);
                }
                prop_assert!(r.pending() <= MAX_PENDING);
                prop_assert!(r.connections() <= MAX_CONNECTIONS);
            }
            for f in drain(&mut r, now) {
                prop_assert!(f.len() <= HDR + ETH + MTU);
            }
        }

        #[test]
        fn random_segment_sequences_are_harmless(ops in proptest::collection::vec(op(), 1..60)) {
            let mut r = responder();
            let t0 = Instant::now();
            let mut now = t0;
            // Per port: (next seq, next ack) as the guest knows them.
            let mut known: std::collections::HashMap<u16, (u32, u32)> = Default::default();
            let learn = |r: &mut Responder, now: Instant, take: usize, known: &mut std::collections::HashMap<u16, (u32, u32)>| {
                for _ in 0..take {
                    let Some(f) = r.pop_frame(|| now) else { break };
                    if let Some(s) = parse_any(&f).filter(|s| s.dst == GUEST_IP) {
                        if s.flags & SYN != 0 {
                            known.insert(s.dport, (s.ack, s.seq.wrapping_add(1)));
                        } else if let Some(k) = known.get_mut(&s.dport) {
                            k.1 = s.seq.wrapping_add(s.payload.len() as u32);
                        }
                    }
                }
            };
            for op in ops {
                match op {
                    Op::Connect(port) => {
                        let mut syn = segment(port, PORT, 1000, 0, SYN, 64240, &[]);
                        r.handle_frame(&mut syn, now);
                        learn(&mut r, now, usize::MAX, &mut known);
                        if let Some(&(seq, ack)) = known.get(&port) {
                            let mut f = segment(port, PORT, seq, ack, ACK, 64240, &[]);
                            r.handle_frame(&mut f, now);
                        }
                    }
                    Op::Segment { port, dport, flags, seq, ack, window, payload } => {
                        let (s0, a0) = known.get(&port).copied().unwrap_or((1000, 0));
                        let mut f = segment(
                            port, dport, s0.wrapping_add(seq as u32), a0.wrapping_add(ack as u32),
                            flags, window, &payload,
                        );
                        r.handle_frame(&mut f, now);
                    }
                    Op::Request(port) => {
                        if let Some(&(seq, ack)) = known.get(&port) {
                            let req = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n";
                            let mut f = segment(port, PORT, seq, ack, ACK | PSH, 64240, req);
                            r.handle_frame(&mut f, now);
                            if let Some(k) = known.get_mut(&port) {
                                k.0 = k.0.wrapping_add(req.len() as u32);
                            }
                        }
                    }
                    Op::Wait(ms) => {
                        now += Duration::from_millis(u64::from(ms));
                        r.on_timer(now);
                    }
                    Op::Take(n) => learn(&mut r, now, usize::from(n), &mut known),
                    Op::Frame(mut f) => {
                        if r.claims(&f) {
                            r.handle_frame(&mut f, now);
                        }
                    }
                }
                prop_assert!(r.pending() <= MAX_PENDING);
                prop_assert!(r.connections() <= MAX_CONNECTIONS);
                for c in &r.conns {
                    prop_assert!(c.request.len() <= MAX_REQUEST);
                }
            }
            // Every connection ends within its lifetime (plus the close grace) once the
            // guest goes quiet.
            let end = now + LIFETIME + CLOSE_GRACE + Duration::from_secs(1);
            r.on_timer(end);
            r.on_timer(end + CLOSE_GRACE);
            drain(&mut r, end);
            prop_assert_eq!(r.connections(), 0);
        }
    }
}
