//! virtio-net (device type 1) on a host TAP device: one receive queue (0) and one
//! transmit queue (1), virtio 1.x (12-byte `virtio_net_hdr_v1` in front of every frame).
//!
//! The header passes between the guest and the TAP unchanged (the TAP is opened with a
//! 12-byte vnet header), so checksum and segmentation offloads cost nothing here: the
//! guest's offloads (CSUM, HOST_TSO4/6/UFO) go to the host kernel, and the offloads the
//! guest accepts (GUEST_CSUM, GUEST_TSO4/6/UFO) are told to the TAP (TUNSETOFFLOAD) on
//! activation, so the kernel only hands us frames the guest can take.
//!
//! Transmit (queue 1, on the driver's notification): each chain's readable buffers are
//! gathered into one bounded buffer and written to the TAP as one frame.
//!
//! Receive: the TAP fd is watched edge-triggered. On its event, and when the driver
//! offers buffers (queue 0 notification), frames are read from the TAP while there are
//! buffers to put them in. A frame read when the ring has no (or too few) buffers
//! waits in the device, together with the chains already taken from the ring; the
//! device stops reading, asks the driver for a notification and carries on when it
//! comes. With VIRTIO_NET_F_MRG_RXBUF a frame may span several chains (`num_buffers`);
//! without it each frame takes one chain.
//!
//! The device does no I/O that can block: the TAP is non-blocking.
//!
//! MMDS: on an interface that answers for the metadata service ([`Net::set_mmds`]),
//! each transmitted frame is first looked at (a few byte comparisons: an ARP packet
//! for the MMDS address, or an IPv4 packet to it); such frames go to the responder
//! ([`crate::mmds::stack`]) and never to the back-end, every other frame goes on
//! unchanged. The responder's answers (virtio-net header zeroed) are put in the
//! receive ring before the back-end's frames, right after the transmit pass that
//! produced them, on its timer, and when the driver adds receive buffers; while the
//! ring has none they wait in the responder's bounded queue.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::tap::{self, Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO, VNET_HDR_LEN};
use super::RateLimit;
use super::{pop_chain, ActivateError, Interrupt, VirtioDevice};
use crate::memory::GuestMemory;

const VIRTIO_ID_NET: u32 = 1;
const QUEUE_SIZES: [u16; 2] = [256, 256];
const RX: usize = 0;
const TX: usize = 1;
/// The virtio 1.x net header.
const HDR: usize = VNET_HDR_LEN;
/// Largest frame after the header, either way: a 64 KiB GSO packet plus its link-layer
/// header (and a VLAN tag) with room to spare. A transmit chain holding more is
/// dropped; a receive buffer is never filled beyond it.
pub const MAX_FRAME: usize = 64 * 1024 + 256;
/// Smallest frame handed to the guest: an Ethernet header.
const MIN_FRAME: usize = 14;
/// [`VirtioDevice::event`] payloads: the back-end's fd, the MMDS responder's timer.
const EVENT_TAP: u32 = 0;
const EVENT_MMDS_TIMER: u32 = 1;
/// Buffers (descriptors with data) remembered per receive chain at most: Linux uses
/// one for mergeable buffers and about 19 for "big packets"; a hostile chain of tiny
/// buffers is cut off here (its capacity is what was remembered).
const MAX_RX_SEGS: usize = 64;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// What a network back-end does for the device: whole frames, each preceded by a
/// 12-byte `virtio_net_hdr_v1`, never blocking. [`Tap`] is the real one; tests use a
/// double.
pub trait NetBackend: Send {
    /// Reads one frame into `buf`; `WouldBlock` when none is queued.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame; `WouldBlock` when the back-end cannot take it now.
    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// The offloads the reader accepts (TUN_F_* flags).
    fn set_offloads(&mut self, tun_flags: u32) -> io::Result<()>;
    /// The fd to watch for incoming frames (edge-triggered), if there is one.
    fn fd(&self) -> Option<RawFd>;
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Tap::read_frame(self, buf)
    }
    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        Tap::write_frame(self, buf)
    }
    fn set_offloads(&mut self, tun_flags: u32) -> io::Result<()> {
        Tap::set_offloads(self, tun_flags).map_err(io::Error::other)
    }
    fn fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

/// `--net` settings: `tap=NAME[,mac=aa:bb:cc:dd:ee:ff]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
}

impl NetConfig {
    pub fn parse(s: &str) -> Result<NetConfig, String> {
        let mut tap = None;
        let mut mac = None;
        for part in s.split(',') {
            let Some((key, value)) = part.split_once('=') else {
                return Err(format!(
                    "network option {part:?} is not key=value (expected tap=NAME[,mac=MAC])"
                ));
            };
            match key {
                "tap" => {
                    if tap.is_some() {
                        return Err("tap= given twice".into());
                    }
                    tap::check_name(value)
                        .map_err(|why| format!("tap={value:?}: invalid interface name: {why}"))?;
                    tap = Some(value.to_owned());
                }
                "mac" => {
                    if mac.is_some() {
                        return Err("mac= given twice".into());
                    }
                    mac = Some(parse_mac(value)?);
                }
                _ => {
                    return Err(format!(
                        "unknown network option {key:?} (expected tap=NAME[,mac=MAC])"
                    ))
                }
            }
        }
        let tap = tap.ok_or_else(|| "tap=NAME is required (e.g. tap=tap0)".to_string())?;
        Ok(NetConfig { tap, mac })
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("mac={s:?}: expected six hex bytes like 52:54:00:12:34:56");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "mac={s}: a multicast address cannot be a NIC's address"
        ));
    }
    if mac == [0; 6] {
        return Err(format!("mac={s}: the all-zero address is not valid"));
    }
    Ok(mac)
}

/// The MAC of device `index` when none is given: 46:45:52:00:HI:LO, where 46:45:52
/// ("FER") is a locally administered unicast prefix and HI:LO is the index. Fixed, so
/// a guest sees the same address every boot; give `mac=` to tell apart several VMs on
/// one bridge.
pub fn default_mac(index: usize) -> [u8; 6] {
    let i = (index & 0xffff) as u16;
    let [hi, lo] = i.to_be_bytes();
    [0x46, 0x45, 0x52, 0x00, hi, lo]
}

/// Why a network device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tap(#[from] tap::Error),
}

/// Counters, shared with whoever wants to read them ([`Net::stats`]) while the device
/// sits behind the transport's mutex.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames (and bytes, headers excluded) handed to the guest.
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames from the TAP that were dropped: larger than the guest's buffers (or
    /// than a full ring of them), shorter than a header, or left over at reset.
    pub rx_dropped: AtomicU64,
    /// Times a frame had to wait because the receive ring ran out of buffers.
    pub rx_stalls: AtomicU64,
    /// Frames (and bytes, headers excluded) written to the TAP.
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Transmit chains completed without sending: malformed, too large, or refused
    /// by the TAP (including EAGAIN, also counted in `tx_eagain`).
    pub tx_dropped: AtomicU64,
    pub tx_eagain: AtomicU64,
    /// Chains refused as malformed (wrong direction, outside guest memory, too
    /// small), either queue.
    pub bad_chains: AtomicU64,
    /// Guest frames taken by the MMDS responder instead of the back-end, and its
    /// answer frames handed to the receive path (also counted in `rx_frames` once
    /// delivered).
    pub mmds_tx_frames: AtomicU64,
    pub mmds_rx_frames: AtomicU64,
}

/// A plain copy of [`NetStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub rx_stalls: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub tx_eagain: u64,
    pub bad_chains: u64,
    pub mmds_tx_frames: u64,
    pub mmds_rx_frames: u64,
}

impl NetStats {
    pub fn snapshot(&self) -> NetCounters {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetCounters {
            rx_frames: r(&self.rx_frames),
            rx_bytes: r(&self.rx_bytes),
            rx_dropped: r(&self.rx_dropped),
            rx_stalls: r(&self.rx_stalls),
            tx_frames: r(&self.tx_frames),
            tx_bytes: r(&self.tx_bytes),
            tx_dropped: r(&self.tx_dropped),
            tx_eagain: r(&self.tx_eagain),
            bad_chains: r(&self.bad_chains),
            mmds_tx_frames: r(&self.mmds_tx_frames),
            mmds_rx_frames: r(&self.mmds_rx_frames),
        }
    }
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct Active {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
    /// The receive used index at the last interrupt decision.
    rx_signalled: u16,
}

/// A receive chain taken from the ring and checked: its device-writable buffers, all
/// inside guest memory.
struct RxChain {
    head: u16,
    segs: Vec<(GuestAddress, usize)>,
    cap: usize,
    descs: usize,
}

/// Receive state that survives between calls.
struct RxState {
    /// Chains taken from the ring, not yet used (the device may hold buffers).
    held: VecDeque<RxChain>,
    held_cap: usize,
    held_descs: usize,
    /// One frame (header first) read from the back-end.
    buf: Box<[u8]>,
    /// The frame in `buf` that waits for buffers, by length.
    pending: Option<usize>,
    /// The back-end may have frames: set by its fd's event (and at activation),
    /// cleared when a read says EAGAIN.
    readable: bool,
}

enum Gather {
    /// The first `n` held chains take the frame.
    Ready(usize),
    /// The frame can never fit: drop it.
    TooBig,
    /// Not enough buffers yet.
    Wait,
    /// The ring is broken (reported to the driver).
    Fatal,
}

/// The network device.
pub struct Net<B: NetBackend = Tap> {
    name: String,
    backend: B,
    mac: [u8; 6],
    features: u64,
    acked: u64,
    active: Option<Active>,
    rx: RxState,
    tx_buf: Box<[u8]>,
    stats: Arc<NetStats>,
    log: RateLimit,
    /// The MMDS endpoint when this interface answers for it.
    mmds: Option<crate::mmds::stack::Responder>,
}

impl Net<Tap> {
    /// Device `index` (for its default MAC) on the TAP device `cfg.tap`.
    pub fn new(index: usize, cfg: &NetConfig) -> Result<Net<Tap>, Error> {
        let tap = Tap::open(&cfg.tap)?;
        let name = format!("virtio-net {}", cfg.tap);
        Ok(Net::with_backend(
            name,
            tap,
            cfg.mac.unwrap_or_else(|| default_mac(index)),
        ))
    }
}

impl<B: NetBackend> Net<B> {
    /// A device on any back-end. The guest offloads offered depend on what the
    /// back-end accepts (probed here).
    pub fn with_backend(name: String, mut backend: B, mac: [u8; 6]) -> Net<B> {
        let mut features = bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            // A TAP with a vnet header takes partial checksums and GSO frames from us.
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_HOST_UFO);
        // What the guest may receive depends on what TUNSETOFFLOAD accepts.
        let all = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO;
        if backend.set_offloads(all).is_ok() {
            features |= bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_TSO6)
                | bit(VIRTIO_NET_F_GUEST_UFO);
        } else if backend.set_offloads(TUN_F_CSUM).is_ok() {
            features |= bit(VIRTIO_NET_F_GUEST_CSUM);
        }
        if let Err(e) = backend.set_offloads(0) {
            log::warn!(
                "{name}: cannot clear offloads: {}",
                crate::errors::chain(&e)
            );
        }
        Net {
            name,
            backend,
            mac,
            features,
            acked: 0,
            active: None,
            rx: RxState {
                held: VecDeque::new(),
                held_cap: 0,
                held_descs: 0,
                buf: vec![0u8; HDR + MAX_FRAME].into_boxed_slice(),
                pending: None,
                readable: true,
            },
            tx_buf: vec![0u8; HDR + MAX_FRAME].into_boxed_slice(),
            stats: Arc::new(NetStats::default()),
            log: RateLimit::default(),
            mmds: None,
        }
    }

    /// Makes this interface answer for the MMDS: the guest's frames for its address are
    /// answered by `responder` instead of going to the back-end.
    pub fn set_mmds(&mut self, responder: crate::mmds::stack::Responder) {
        self.mmds = Some(responder);
    }

    /// The device's counters (readable at any time from any thread).
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn acked(&self, f: u32) -> bool {
        self.acked & bit(f) != 0
    }

    /// TUN_F_* flags for the offloads the guest accepted. TSO and UFO need CSUM (the
    /// spec's dependency, and the TAP's).
    fn tun_offloads(&self) -> u32 {
        if !self.acked(VIRTIO_NET_F_GUEST_CSUM) {
            return 0;
        }
        let mut f = TUN_F_CSUM;
        if self.acked(VIRTIO_NET_F_GUEST_TSO4) {
            f |= TUN_F_TSO4;
        }
        if self.acked(VIRTIO_NET_F_GUEST_TSO6) {
            f |= TUN_F_TSO6;
        }
        if self.acked(VIRTIO_NET_F_GUEST_UFO) {
            f |= TUN_F_UFO;
        }
        f
    }

    fn warn(log: &mut RateLimit, name: &str, what: std::fmt::Arguments<'_>) {
        log.warn(name, what);
    }

    fn notify_guest(&mut self, q: usize) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let queue = if q == RX { &mut a.rx } else { &mut a.tx };
        match queue.needs_notification(&a.mem) {
            Ok(true) => a.interrupt.signal_used(),
            Ok(false) => {}
            Err(e) => {
                Self::warn(&mut self.log, &self.name, format_args!("queue {q}: {e:?}"));
                a.interrupt.device_error();
            }
        }
    }

    /// Sends every frame the driver has queued.
    fn transmit(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut completed = false;
        'outer: loop {
            if let Err(e) = a.tx.disable_notification(&a.mem) {
                Self::warn(&mut self.log, &self.name, format_args!("tx ring: {e:?}"));
                a.interrupt.device_error();
                break;
            }
            loop {
                let chain = match pop_chain(&mut a.tx, &a.mem) {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(what) => {
                        Self::warn(&mut self.log, &self.name, format_args!("tx ring: {what}"));
                        a.interrupt.device_error();
                        break 'outer;
                    }
                };
                let head = chain.head_index();
                match gather_tx(&a.mem, chain, &mut self.tx_buf) {
                    Ok(len)
                        if self
                            .mmds
                            .as_ref()
                            .is_some_and(|m| m.claims(&self.tx_buf[..len])) =>
                    {
                        // For the metadata service: answered here, never sent on.
                        if let Some(m) = self.mmds.as_mut() {
                            m.handle_frame(&mut self.tx_buf[..len], Instant::now());
                        }
                        inc(&self.stats.mmds_tx_frames, 1);
                    }
                    Ok(len) => {
                        // EAGAIN from the TAP: the frame is dropped and counted, as a
                        // NIC drops on a full link. Keeping the chain would need a
                        // writability watch to retry (the device only gets EPOLLIN
                        // events), and a guest waiting for that chain would stall. A
                        // TAP write only says EAGAIN when its socket send buffer is
                        // full (TUNSETSNDBUF; unlimited by default).
                        match self.backend.write_frame(&self.tx_buf[..len]) {
                            Ok(_) => {
                                inc(&self.stats.tx_frames, 1);
                                inc(&self.stats.tx_bytes, (len - HDR) as u64);
                            }
                            Err(e) => {
                                inc(&self.stats.tx_dropped, 1);
                                if e.kind() == io::ErrorKind::WouldBlock {
                                    inc(&self.stats.tx_eagain, 1);
                                } else {
                                    Self::warn(
                                        &mut self.log,
                                        &self.name,
                                        format_args!("writing a frame to the TAP: {e}"),
                                    );
                                }
                            }
                        }
                    }
                    Err(what) => {
                        inc(&self.stats.tx_dropped, 1);
                        inc(&self.stats.bad_chains, 1);
                        Self::warn(
                            &mut self.log,
                            &self.name,
                            format_args!("transmit chain {head} dropped: {what}"),
                        );
                    }
                }
                if let Err(e) = a.tx.add_used(&a.mem, head, 0) {
                    Self::warn(
                        &mut self.log,
                        &self.name,
                        format_args!("cannot complete transmit chain {head}: {e:?}"),
                    );
                    a.interrupt.device_error();
                    break 'outer;
                }
                completed = true;
            }
            // Ask for a notification when the driver queues more, then look once more
            // for chains queued meanwhile.
            match a.tx.enable_notification(&a.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    Self::warn(&mut self.log, &self.name, format_args!("tx ring: {e:?}"));
                    a.interrupt.device_error();
                    break;
                }
            }
        }
        if completed {
            self.notify_guest(TX);
        }
        // The metadata service's answers go to the guest now, whether or not the
        // back-end has frames to read.
        if self.mmds.as_ref().is_some_and(|m| m.has_frames()) {
            self.receive();
        }
    }

    /// Moves frames from the back-end into the guest's receive buffers until either
    /// runs out.
    fn receive(&mut self) {
        let mrg = self.acked(VIRTIO_NET_F_MRG_RXBUF);
        let guest_csum = self.acked(VIRTIO_NET_F_GUEST_CSUM);
        let gso_ok = self.tun_offloads();
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let rx = &mut self.rx;
        let mut out = Out {
            stats: &self.stats,
            log: &mut self.log,
            name: &self.name,
            used: false,
        };
        if let Err(e) = a.rx.disable_notification(&a.mem) {
            out.fatal(a, format_args!("rx ring: {e:?}"));
            return;
        }
        loop {
            let len = match rx.pending {
                Some(n) => n,
                None => {
                    // The metadata service's answers go before the back-end's frames.
                    if let Some(f) = self.mmds.as_mut().and_then(|m| m.pop_frame(Instant::now)) {
                        inc(&out.stats.mmds_rx_frames, 1);
                        let n = f.len().min(rx.buf.len());
                        rx.buf[..n].copy_from_slice(&f[..n]);
                        n
                    } else if !rx.readable {
                        break;
                    } else {
                        match self.backend.read_frame(&mut rx.buf) {
                            Ok(n) if n < HDR + MIN_FRAME => {
                                inc(&out.stats.rx_dropped, 1);
                                continue;
                            }
                            Ok(n) => n.min(rx.buf.len()),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                rx.readable = false;
                                break;
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                // Not retried until the fd signals again: no spinning on a
                                // broken back-end.
                                rx.readable = false;
                                out.warn(format_args!("reading from the TAP: {e}"));
                                break;
                            }
                        }
                    }
                }
            };
            if rx.pending.is_none() && !fix_rx_header(&mut rx.buf[..HDR], guest_csum, gso_ok) {
                // A segmentation type the guest did not accept (the TAP was told
                // otherwise): it cannot be delivered.
                inc(&out.stats.rx_dropped, 1);
                continue;
            }
            rx.pending = Some(len);
            match gather_rx(a, rx, len, mrg, &mut out) {
                Gather::Ready(n) => {
                    if !deliver(a, rx, len, n, mrg, &mut out) {
                        break;
                    }
                    rx.pending = None;
                    inc(&out.stats.rx_frames, 1);
                    inc(&out.stats.rx_bytes, (len - HDR) as u64);
                }
                Gather::TooBig => {
                    rx.pending = None;
                    inc(&out.stats.rx_dropped, 1);
                    out.warn(format_args!(
                        "dropped a {}-byte frame larger than the receive buffers",
                        len - HDR
                    ));
                }
                Gather::Wait => {
                    // Out of buffers: the frame (and any chains taken for it) waits.
                    // Ask for a notification when the driver adds buffers, then look
                    // once more for buffers added meanwhile.
                    match a.rx.enable_notification(&a.mem) {
                        Ok(true) => {
                            if let Err(e) = a.rx.disable_notification(&a.mem) {
                                out.fatal(a, format_args!("rx ring: {e:?}"));
                                break;
                            }
                        }
                        Ok(false) => {
                            inc(&out.stats.rx_stalls, 1);
                            break;
                        }
                        Err(e) => {
                            out.fatal(a, format_args!("rx ring: {e:?}"));
                            break;
                        }
                    }
                }
                Gather::Fatal => break,
            }
        }
        if out.used {
            match rx_needs_notification(a) {
                Ok(true) => a.interrupt.signal_used(),
                Ok(false) => {}
                Err(e) => out.fatal(a, format_args!("rx ring: {e:?}")),
            }
        }
    }
}

/// Where the receive helpers report: counters, the rate-limited log, and whether any
/// used entry was added.
struct Out<'a> {
    stats: &'a NetStats,
    log: &'a mut RateLimit,
    name: &'a str,
    used: bool,
}

impl Out<'_> {
    fn warn(&mut self, what: std::fmt::Arguments<'_>) {
        self.log.warn(self.name, what);
    }

    /// The ring is broken: tell the driver (DEVICE_NEEDS_RESET).
    fn fatal(&mut self, a: &Active, what: std::fmt::Arguments<'_>) {
        self.warn(what);
        a.interrupt.device_error();
    }
}

/// Makes the kernel's header right for this guest: `num_buffers` is set later; flags
/// only as far as the guest accepted checksum offload (none without GUEST_CSUM, as the
/// spec requires). Returns false for a segmentation type the guest did not accept.
fn fix_rx_header(hdr: &mut [u8], guest_csum: bool, tun_offloads: u32) -> bool {
    let allowed = if guest_csum {
        (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) as u8
    } else {
        0
    };
    hdr[0] &= allowed;
    let gso = u32::from(hdr[1]);
    let needed = match gso {
        VIRTIO_NET_HDR_GSO_NONE => 0,
        VIRTIO_NET_HDR_GSO_TCPV4 => TUN_F_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6 => TUN_F_TSO6,
        VIRTIO_NET_HDR_GSO_UDP => TUN_F_UFO,
        // ECN (never asked of the TAP) and anything newer.
        _ => return false,
    };
    tun_offloads & needed == needed
}

/// Copies one transmit chain (header and frame) into `buf`; the length, or why the
/// chain is refused.
fn gather_tx(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    buf: &mut [u8],
) -> Result<usize, String> {
    let mut len = 0usize;
    // The chain ends by itself after at most the queue size (or an indirect table's
    // size) of descriptors, and when its lengths would add up beyond 4 GiB; the
    // buffer's size stops it much earlier.
    for d in chain {
        if d.is_write_only() {
            return Err(format!("device-writable buffer at {:#x}", d.addr().0));
        }
        let n = d.len() as usize;
        if n > buf.len() - len {
            return Err(format!("frame larger than {MAX_FRAME} bytes"));
        }
        mem.read_slice(&mut buf[len..len + n], d.addr())
            .map_err(|e| format!("buffer {:#x}+{n:#x}: {e}", d.addr().0))?;
        len += n;
    }
    if len < HDR + MIN_FRAME {
        return Err(format!("{len} bytes: shorter than the headers"));
    }
    Ok(len)
}

/// Checks one receive chain: device-writable buffers only, all inside guest memory, at
/// least a header's worth in all.
fn parse_rx_chain(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
) -> Result<RxChain, String> {
    let head = chain.head_index();
    let mut segs = Vec::new();
    let mut cap = 0usize;
    let mut descs = 0usize;
    for d in chain {
        descs += 1;
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
        // Enough for the largest frame, or enough pieces: the rest is not used.
        if cap < HDR + MAX_FRAME && segs.len() < MAX_RX_SEGS {
            let n = n.min(HDR + MAX_FRAME - cap);
            segs.push((d.addr(), n));
            cap += n;
        }
    }
    if cap < HDR {
        return Err(format!("{cap} bytes: smaller than a header"));
    }
    Ok(RxChain {
        head,
        segs,
        cap,
        descs,
    })
}

/// Takes chains from the ring until the held ones can take a `len`-byte frame (one
/// chain, or with mergeable buffers several). Refused chains are completed at once,
/// empty: they come before the frame's chains in the used ring, so a frame's chains
/// stay together.
fn gather_rx(a: &mut Active, rx: &mut RxState, len: usize, mrg: bool, out: &mut Out<'_>) -> Gather {
    let size = usize::from(a.rx.size());
    loop {
        if mrg {
            if rx.held_cap >= len {
                let mut got = 0;
                let n = rx
                    .held
                    .iter()
                    .take_while(|c| {
                        let more = got < len;
                        got += c.cap;
                        more
                    })
                    .count();
                return Gather::Ready(n);
            }
            // A ring's worth of buffers cannot take it: it never will.
            if rx.held.len() >= size || rx.held_descs >= size {
                return Gather::TooBig;
            }
        } else if let Some(c) = rx.held.front() {
            return if c.cap >= len {
                Gather::Ready(1)
            } else {
                Gather::TooBig
            };
        }
        let chain = match pop_chain(&mut a.rx, &a.mem) {
            Ok(Some(c)) => c,
            Ok(None) => return Gather::Wait,
            Err(what) => {
                out.fatal(a, format_args!("rx ring: {what}"));
                return Gather::Fatal;
            }
        };
        let head = chain.head_index();
        match parse_rx_chain(&a.mem, chain) {
            Ok(c) => {
                rx.held_cap += c.cap;
                rx.held_descs += c.descs;
                rx.held.push_back(c);
            }
            Err(what) => {
                inc(&out.stats.bad_chains, 1);
                out.warn(format_args!("receive chain {head} refused: {what}"));
                if let Err(e) = add_used_rx(a, &[(head, 0)]) {
                    out.fatal(a, format_args!("cannot complete receive chain {head}: {e}"));
                    return Gather::Fatal;
                }
                out.used = true;
            }
        }
    }
}

/// Writes the frame in `rx.buf[..len]` into the first `n` held chains and puts them in
/// the used ring together. False when the ring is broken.
fn deliver(
    a: &mut Active,
    rx: &mut RxState,
    len: usize,
    n: usize,
    mrg: bool,
    out: &mut Out<'_>,
) -> bool {
    let num_buffers = if mrg { n as u16 } else { 1 };
    rx.buf[HDR - 2..HDR].copy_from_slice(&num_buffers.to_le_bytes());
    let mut done = Vec::with_capacity(n);
    let mut off = 0usize;
    for c in rx.held.iter().take(n) {
        let mut written = 0usize;
        for &(addr, seg) in &c.segs {
            if off == len {
                break;
            }
            let k = seg.min(len - off);
            // The range was checked when the chain was taken; the write is checked
            // again by vm-memory.
            if let Err(e) = a.mem.write_slice(&rx.buf[off..off + k], addr) {
                out.fatal(a, format_args!("receive buffer {:#x}+{k:#x}: {e}", addr.0));
                return false;
            }
            off += k;
            written += k;
        }
        done.push((c.head, written as u32));
    }
    for c in rx.held.drain(..n) {
        rx.held_cap -= c.cap;
        rx.held_descs -= c.descs;
    }
    if let Err(e) = add_used_rx(a, &done) {
        out.fatal(a, format_args!("cannot complete receive chains: {e}"));
        return false;
    }
    out.used = true;
    true
}

/// Puts `entries` (head, length) in the receive queue's used ring and then publishes
/// them with one index update, so the driver never sees part of a frame's chains.
/// (virtio-queue's `add_used` publishes each entry by itself.)
fn add_used_rx(a: &mut Active, entries: &[(u16, u32)]) -> Result<(), String> {
    let q = &mut a.rx;
    let size = q.size();
    let ring = GuestAddress(q.used_ring());
    let mut next = q.next_used();
    for &(head, len) in entries {
        if head >= size {
            return Err(format!(
                "descriptor index {head} beyond the queue size {size}"
            ));
        }
        let slot = 4 + u64::from(next % size) * 8;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        let addr = ring
            .0
            .checked_add(slot)
            .ok_or_else(|| "used ring address overflows".to_string())?;
        a.mem
            .write_slice(&elem, GuestAddress(addr))
            .map_err(|e| format!("used ring: {e}"))?;
        next = next.wrapping_add(1);
    }
    let idx = ring
        .0
        .checked_add(2)
        .ok_or_else(|| "used ring address overflows".to_string())?;
    a.mem
        .store(next.to_le(), GuestAddress(idx), Ordering::Release)
        .map_err(|e| format!("used ring: {e}"))?;
    q.set_next_used(next);
    Ok(())
}

/// Whether the driver wants an interrupt for the receive entries added since the last
/// check (virtio 1.2, 2.7.10: with EVENT_IDX, when `used_event` lies in what was added;
/// without, always — the NO_INTERRUPT flag is a hint virtio-queue ignores as well).
/// Own code because [`add_used_rx`] bypasses the counter `Queue::needs_notification`
/// keeps.
fn rx_needs_notification(a: &mut Active) -> Result<bool, String> {
    let new = a.rx.next_used();
    let old = std::mem::replace(&mut a.rx_signalled, new);
    if !a.rx.event_idx_enabled() {
        return Ok(true);
    }
    // The used entries are visible before `used_event` is read.
    std::sync::atomic::fence(Ordering::SeqCst);
    let addr =
        a.rx.avail_ring()
            .checked_add(4 + 2 * u64::from(a.rx.size()))
            .ok_or_else(|| "available ring address overflows".to_string())?;
    let used_event = u16::from_le(
        a.mem
            .load::<u16>(GuestAddress(addr), Ordering::Acquire)
            .map_err(|e| format!("used_event: {e}"))?,
    );
    Ok(new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old))
}

/// A network device in a snapshot: what the guest knows of it (its MAC) and the TAP
/// it was on (a restore may put it on another: Firecracker's `network_overrides`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    pub tap: String,
    pub mac: [u8; 6],
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn name(&self) -> &str {
        &self.name
    }
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn device_features(&self) -> u64 {
        self.features
    }
    fn set_acked_features(&mut self, acked: u64) {
        self.acked = acked & (self.features | super::mmio::VIRTIO_F_VERSION_1);
    }
    /// `mac` (6 bytes), `status` (link up; VIRTIO_NET_F_STATUS is not offered, so the
    /// driver does not read it), `max_virtqueue_pairs` (1); the rest reads as zeros.
    /// mac, status (link up), max_virtqueue_pairs (1). Read-only in virtio 1.x (no
    /// VIRTIO_NET_F_CTRL_MAC_ADDR): the default `write_config` ignores writes.
    fn config_space(&self) -> std::borrow::Cow<'_, [u8]> {
        let mut space = vec![0u8; 12];
        space[..6].copy_from_slice(&self.mac);
        space[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        space[8..10].copy_from_slice(&1u16.to_le_bytes());
        std::borrow::Cow::Owned(space)
    }
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let [rx, tx] = super::take_queues(&self.name, queues, self.acked)?;
        let flags = self.tun_offloads();
        self.backend
            .set_offloads(flags)
            .map_err(|e| ActivateError::Failed {
                device: self.name.clone(),
                what: format!("setting the TAP's offloads to {flags:#x}: {e}"),
            })?;
        let rx_signalled = rx.next_used();
        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
            rx_signalled,
        });
        self.rx.held.clear();
        self.rx.held_cap = 0;
        self.rx.held_descs = 0;
        // Frames may have queued up before the driver was ready.
        self.rx.readable = true;
        Ok(())
    }
    fn queue_notify(&mut self, index: usize) {
        match index {
            RX => self.receive(),
            TX => self.transmit(),
            _ => {}
        }
    }
    fn save_state(&self) -> Result<super::BackendState, String> {
        let tap = self
            .name
            .strip_prefix("virtio-net ")
            .unwrap_or(&self.name)
            .to_owned();
        Ok(super::BackendState::Net(NetState { tap, mac: self.mac }))
    }
    /// The MAC must be the one the guest knows; the TAP may be another.
    fn restore_state(&mut self, state: &super::BackendState) -> Result<(), String> {
        let super::BackendState::Net(saved) = state else {
            return Err(format!("the snapshot holds the state of {}", state.kind()));
        };
        if saved.mac != self.mac {
            let hex = |m: &[u8; 6]| {
                m.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            };
            return Err(format!(
                "MAC changed from {} to {}",
                hex(&saved.mac),
                hex(&self.mac)
            ));
        }
        log::info!("{}: restored (was on TAP {})", self.name, saved.tap);
        Ok(())
    }
    fn watched_fds(&self) -> Vec<(RawFd, u32)> {
        let tap = self.backend.fd().map(|fd| (fd, EVENT_TAP));
        let timer = self
            .mmds
            .as_ref()
            .and_then(|m| m.timer_fd())
            .map(|fd| (fd, EVENT_MMDS_TIMER));
        tap.into_iter().chain(timer).collect()
    }
    fn event(&mut self, data: u32) {
        if data == EVENT_MMDS_TIMER {
            if let Some(m) = self.mmds.as_mut() {
                m.on_timer(Instant::now());
            }
        } else {
            self.rx.readable = true;
        }
        self.receive();
    }
    fn reset(&mut self) {
        self.active = None;
        if let Some(m) = self.mmds.as_mut() {
            m.reset();
        }
        self.acked = 0;
        self.rx.held.clear();
        self.rx.held_cap = 0;
        self.rx.held_descs = 0;
        if self.rx.pending.take().is_some() {
            inc(&self.stats.rx_dropped, 1);
        }
        // Back to plain frames until a driver accepts offloads again; the TAP stays open.
        if let Err(e) = self.backend.set_offloads(0) {
            Self::warn(
                &mut self.log,
                &self.name,
                format_args!("clearing the TAP's offloads: {e}"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use vm_memory::GuestMemoryMmap;
    use vmm_sys_util::eventfd::EventFd;

    use crate::devices::virtio::mmio::VIRTIO_F_VERSION_1;
    use crate::devices::virtio::INT_USED_RING;

    #[derive(Default)]
    struct FakeState {
        rx: VecDeque<Vec<u8>>,
        tx: Vec<Vec<u8>>,
        tx_error: Option<io::ErrorKind>,
        refuse_offloads: bool,
        offloads: u32,
        reads: usize,
    }

    /// The test double for a TAP: frames to hand out, frames written.
    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<FakeState>>);

    impl Fake {
        fn push(&self, frame: Vec<u8>) {
            self.0.lock().unwrap().rx.push_back(frame);
        }
        fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
            self.0.lock().unwrap()
        }
    }

    impl NetBackend for Fake {
        fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let mut s = self.0.lock().unwrap();
            s.reads += 1;
            let f = s.rx.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
            let n = f.len().min(buf.len());
            buf[..n].copy_from_slice(&f[..n]);
            Ok(n)
        }
        fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut s = self.0.lock().unwrap();
            if let Some(k) = s.tx_error {
                return Err(k.into());
            }
            s.tx.push(buf.to_vec());
            Ok(buf.len())
        }
        fn set_offloads(&mut self, flags: u32) -> io::Result<()> {
            let mut s = self.0.lock().unwrap();
            if s.refuse_offloads && flags != 0 {
                return Err(io::ErrorKind::InvalidInput.into());
            }
            s.offloads = flags;
            Ok(())
        }
        fn fd(&self) -> Option<RawFd> {
            Some(7)
        }
    }

    /// A frame: header (with `flags`, `gso` and junk in num_buffers) and `len` bytes.
    fn frame(len: usize, seed: u8, flags: u8, gso: u8) -> Vec<u8> {
        let mut f = vec![0u8; HDR + len];
        f[0] = flags;
        f[1] = gso;
        f[10] = 0xaa;
        f[11] = 0xbb;
        for (i, b) in f[HDR..].iter_mut().enumerate() {
            *b = seed.wrapping_add(i as u8);
        }
        f
    }

    const DATA: u64 = 0x10_0000;

    /// The driver's side of one split queue: descriptor table, available ring and used
    /// ring at 4 KiB-aligned places of their own.
    /// (`virtio_queue::mock::MockSplitQueue::create` lays the used ring over the tail of
    /// the available ring, its `used_event` included, so it cannot test interrupt
    /// suppression.)
    struct Driver {
        mem: GuestMemory,
        desc: u64,
        avail: u64,
        used: u64,
        size: u16,
        next_desc: u16,
        avail_idx: u16,
    }

    impl Driver {
        fn new(mem: &GuestMemory, base: u64, size: u16) -> Driver {
            let d = Driver {
                mem: mem.clone(),
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                size,
                next_desc: 0,
                avail_idx: 0,
            };
            d.mem
                .write_slice(&[0u8; 0x3000], GuestAddress(base))
                .unwrap();
            d
        }

        fn queue(&self) -> Queue {
            let mut q = Queue::new(256).unwrap();
            q.try_set_size(self.size).unwrap();
            q.try_set_desc_table_address(GuestAddress(self.desc))
                .unwrap();
            q.try_set_avail_ring_address(GuestAddress(self.avail))
                .unwrap();
            q.try_set_used_ring_address(GuestAddress(self.used))
                .unwrap();
            q.set_ready(true);
            q
        }

        fn set_desc(&self, index: u16, d: Descriptor) {
            self.mem
                .write_obj(
                    RawDescriptor::from(d),
                    GuestAddress(self.desc + 16 * u64::from(index)),
                )
                .unwrap();
        }

        /// Makes `head` available.
        fn offer(&mut self, head: u16) {
            let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.mem
                .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
                .unwrap();
        }

        /// Offers a chain of (address, length, device-writable) buffers.
        fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
            let start = self.next_desc;
            for (i, &(addr, len, write)) in bufs.iter().enumerate() {
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let index = (start + i as u16) % self.size;
                let next = (index + 1) % self.size;
                self.set_desc(index, Descriptor::new(addr, len, flags, next));
            }
            self.next_desc = (start + bufs.len() as u16) % self.size;
            self.offer(start);
            start
        }

        /// Used entries (head, length) so far.
        fn used(&self) -> Vec<(u32, u32)> {
            let n: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
            (0..n)
                .map(|i| {
                    let at = self.used + 4 + 8 * u64::from(i % self.size);
                    let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
                    let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
                    (id, len)
                })
                .collect()
        }

        fn set_used_event(&self, v: u16) {
            let at = self.avail + 4 + 2 * u64::from(self.size);
            self.mem.write_obj(v, GuestAddress(at)).unwrap();
        }

        fn avail_event(&self) -> u16 {
            let at = self.used + 4 + 8 * u64::from(self.size);
            self.mem.read_obj(GuestAddress(at)).unwrap()
        }
    }

    struct Rig {
        mem: GuestMemory,
        net: Net<Fake>,
        fake: Fake,
        irq: Arc<Interrupt>,
        q: [Driver; 2],
    }

    fn mem() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn rig_with(features: u64, size: u16, fake: Fake) -> Rig {
        let mem = mem();
        let mut net = Net::with_backend("virtio-net test".into(), fake.clone(), default_mac(0));
        net.set_acked_features(features | VIRTIO_F_VERSION_1);
        let q = [Driver::new(&mem, 0, size), Driver::new(&mem, 0x8000, size)];
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        net.activate(mem.clone(), vec![q[0].queue(), q[1].queue()], irq.clone())
            .unwrap();
        Rig {
            mem,
            net,
            fake,
            irq,
            q,
        }
    }

    fn rig(features: u64) -> Rig {
        rig_with(features, 16, Fake::default())
    }

    const W: bool = true;
    const R: bool = false;

    impl Rig {
        fn add_chain(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
            self.q[q].add_chain(bufs)
        }

        fn used(&self, q: usize) -> Vec<(u32, u32)> {
            self.q[q].used()
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }

        fn stats(&self) -> NetCounters {
            self.net.stats().snapshot()
        }

        fn take_irq(&self) -> bool {
            let s = self.irq.status() & INT_USED_RING != 0;
            self.irq.ack(INT_USED_RING);
            s
        }
    }

    #[test]
    fn transmit_passes_header_and_frame_to_the_backend() {
        let mut r = rig(bit(VIRTIO_RING_F_EVENT_IDX));
        let f = frame(60, 1, VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0);
        r.mem.write_slice(&f[..HDR], GuestAddress(DATA)).unwrap();
        r.mem
            .write_slice(&f[HDR..], GuestAddress(DATA + 0x1000))
            .unwrap();
        let head = r.add_chain(TX, &[(DATA, HDR as u32, R), (DATA + 0x1000, 60, R)]);
        r.net.queue_notify(TX);
        assert_eq!(r.fake.state().tx, vec![f]);
        assert_eq!(r.used(TX), vec![(u32::from(head), 0)]);
        assert!(r.take_irq());
        let s = r.stats();
        assert_eq!((s.tx_frames, s.tx_bytes, s.tx_dropped), (1, 60, 0));
        // EVENT_IDX: the device asked to be notified for the next chain.
        assert_eq!(r.q[TX].avail_event(), 1);
    }

    #[test]
    fn malformed_transmit_chains_are_completed_and_counted() {
        let mut r = rig(0);
        let f = frame(100, 0, 0, 0);
        r.mem.write_slice(&f, GuestAddress(DATA)).unwrap();
        let n = f.len() as u32;
        r.add_chain(TX, &[(DATA, n, W)]); // device-writable
        r.add_chain(TX, &[(0x40_0000 - 8, n, R)]); // runs off the end of memory
        r.add_chain(TX, &[(u64::MAX - 4, n, R)]); // address overflow
        r.add_chain(TX, &[(DATA, 40_000, R), (DATA, 40_000, R)]); // beyond MAX_FRAME
        r.add_chain(TX, &[(DATA, 10, R)]); // shorter than the headers
        r.add_chain(TX, &[(DATA, u32::MAX, R), (DATA, u32::MAX, R)]); // huge lengths
        r.add_chain(TX, &[(DATA, n, R)]); // fine
        r.net.queue_notify(TX);
        assert_eq!(r.fake.state().tx, vec![f]);
        assert_eq!(r.used(TX).len(), 7);
        assert!(r.used(TX).iter().all(|&(_, len)| len == 0));
        let s = r.stats();
        assert_eq!((s.tx_frames, s.tx_dropped, s.bad_chains), (1, 6, 6));
    }

    #[test]
    fn transmit_eagain_drops_counts_and_completes() {
        let mut r = rig(0);
        r.fake.state().tx_error = Some(io::ErrorKind::WouldBlock);
        let f = frame(100, 0, 0, 0);
        r.mem.write_slice(&f, GuestAddress(DATA)).unwrap();
        r.add_chain(TX, &[(DATA, f.len() as u32, R)]);
        r.net.queue_notify(TX);
        assert_eq!(r.used(TX).len(), 1);
        let s = r.stats();
        assert_eq!((s.tx_frames, s.tx_dropped, s.tx_eagain), (0, 1, 1));
        // The next frame goes once the TAP takes frames again.
        r.fake.state().tx_error = None;
        r.add_chain(TX, &[(DATA, f.len() as u32, R)]);
        r.net.queue_notify(TX);
        assert_eq!(r.fake.state().tx.len(), 1);
    }

    #[test]
    fn receive_one_chain_per_frame() {
        let mut r = rig(0);
        let head = r.add_chain(RX, &[(DATA, 8, W), (DATA + 0x1000, 2040, W)]);
        // The TAP's flags are cleared for a guest without GUEST_CSUM.
        r.fake
            .push(frame(100, 5, VIRTIO_NET_HDR_F_DATA_VALID as u8, 0));
        r.net.event(0);
        assert_eq!(r.used(RX), vec![(u32::from(head), (HDR + 100) as u32)]);
        let mut want = frame(100, 5, 0, 0);
        want[10] = 1; // num_buffers
        want[11] = 0;
        let mut got = r.read(DATA, 8);
        got.extend(r.read(DATA + 0x1000, HDR + 100 - 8));
        assert_eq!(got, want);
        assert!(r.take_irq());
        let s = r.stats();
        assert_eq!((s.rx_frames, s.rx_bytes, s.rx_dropped), (1, 100, 0));
        assert!(!r.net.rx.readable, "read until EAGAIN");
    }

    #[test]
    fn receive_keeps_checksum_flags_the_guest_accepted() {
        let mut r = rig(bit(VIRTIO_NET_F_GUEST_CSUM));
        r.add_chain(RX, &[(DATA, 2048, W)]);
        r.fake
            .push(frame(100, 5, VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 | 0x80, 0));
        r.net.event(0);
        assert_eq!(r.read(DATA, 1), [VIRTIO_NET_HDR_F_NEEDS_CSUM as u8]);
    }

    #[test]
    fn receive_drops_segmentation_the_guest_did_not_accept() {
        let mut r = rig(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4));
        r.add_chain(RX, &[(DATA, 2048, W)]);
        r.fake
            .push(frame(100, 0, 1, VIRTIO_NET_HDR_GSO_TCPV6 as u8));
        r.fake
            .push(frame(100, 0, 1, VIRTIO_NET_HDR_GSO_TCPV4 as u8 | 0x80)); // ECN
        r.fake
            .push(frame(100, 0, 1, VIRTIO_NET_HDR_GSO_TCPV4 as u8));
        r.net.event(0);
        assert_eq!(r.used(RX).len(), 1);
        assert_eq!(r.read(DATA + 1, 1), [VIRTIO_NET_HDR_GSO_TCPV4 as u8]);
        assert_eq!(r.stats().rx_dropped, 2);
    }

    #[test]
    fn mergeable_frames_span_chains_with_num_buffers() {
        let mut r = rig(bit(VIRTIO_NET_F_MRG_RXBUF));
        let a = r.add_chain(RX, &[(DATA, 1536, W)]);
        let b = r.add_chain(RX, &[(DATA + 0x1000, 1536, W)]);
        let c = r.add_chain(RX, &[(DATA + 0x2000, 1536, W)]);
        let big = frame(3000, 9, 0, 0);
        r.fake.push(big.clone());
        r.fake.push(frame(50, 3, 0, 0));
        r.net.event(0);
        assert_eq!(
            r.used(RX),
            vec![
                (u32::from(a), 1536),
                (u32::from(b), (HDR + 3000 - 1536) as u32),
                (u32::from(c), (HDR + 50) as u32)
            ]
        );
        let mut got = r.read(DATA, 1536);
        got.extend(r.read(DATA + 0x1000, HDR + 3000 - 1536));
        let mut want = big;
        want[10] = 2;
        want[11] = 0;
        assert_eq!(got, want);
        assert_eq!(r.read(DATA + 0x2000 + 10, 2), [1, 0]);
        assert_eq!(r.stats().rx_frames, 2);
    }

    #[test]
    fn frames_wait_for_buffers_and_the_tap_is_not_read_meanwhile() {
        let mut r = rig(bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_RING_F_EVENT_IDX));
        for i in 0..3 {
            r.fake.push(frame(1000, i, 0, 0));
        }
        r.net.event(0);
        assert_eq!(
            r.fake.state().reads,
            1,
            "one frame read, then the device waits"
        );
        assert_eq!(r.stats().rx_stalls, 1);
        assert!(r.used(RX).is_empty());
        assert!(!r.take_irq());
        // More TAP events while there are no buffers: nothing more is read.
        r.net.event(0);
        r.net.event(0);
        assert_eq!(r.fake.state().reads, 1);
        // EVENT_IDX: the device asked for a notification at the next buffer.
        assert_eq!(r.q[RX].avail_event(), 0);

        // A buffer too small for the frame is taken and held; the frame still waits.
        r.add_chain(RX, &[(DATA, 600, W)]);
        r.net.queue_notify(RX);
        assert!(r.used(RX).is_empty());
        assert_eq!(r.fake.state().reads, 1);
        assert_eq!(r.q[RX].avail_event(), 1);

        // Enough buffers: the waiting frame and the rest go in, until EAGAIN.
        for i in 0..5 {
            r.add_chain(RX, &[(DATA + 0x1000 * (i + 1), 600, W)]);
        }
        r.net.queue_notify(RX);
        let used = r.used(RX);
        assert_eq!(used.len(), 6);
        assert_eq!(r.stats().rx_frames, 3);
        assert_eq!(r.fake.state().reads, 4, "three frames and one EAGAIN");
        assert!(r.take_irq());
        // Nothing left: a notification does not read again until the fd signals.
        r.net.queue_notify(RX);
        assert_eq!(r.fake.state().reads, 4);
        r.add_chain(RX, &[(DATA, 600, W)]);
        r.fake.push(frame(20, 0, 0, 0));
        r.net.event(0);
        assert_eq!(r.fake.state().reads, 6);
        assert_eq!(r.stats().rx_frames, 4);
    }

    #[test]
    fn a_frame_too_big_for_its_chain_is_dropped_and_the_chain_reused() {
        let mut r = rig(0);
        let head = r.add_chain(RX, &[(DATA, 200, W)]);
        r.fake.push(frame(500, 0, 0, 0));
        r.fake.push(frame(50, 0, 0, 0));
        r.net.event(0);
        assert_eq!(r.used(RX), vec![(u32::from(head), (HDR + 50) as u32)]);
        assert_eq!(r.stats().rx_dropped, 1);
    }

    #[test]
    fn a_mergeable_frame_bigger_than_a_full_ring_is_dropped() {
        let mut r = rig_with(bit(VIRTIO_NET_F_MRG_RXBUF), 4, Fake::default());
        for i in 0..4 {
            r.add_chain(RX, &[(DATA + 0x1000 * i, 64, W)]);
        }
        r.fake.push(frame(1000, 0, 0, 0));
        r.fake.push(frame(40, 0, 0, 0));
        r.net.event(0);
        assert_eq!(r.stats().rx_dropped, 1);
        assert_eq!(r.used(RX), vec![(0, (HDR + 40) as u32)]);
    }

    #[test]
    fn malformed_receive_chains_are_completed_empty() {
        let mut r = rig(bit(VIRTIO_NET_F_MRG_RXBUF));
        r.add_chain(RX, &[(DATA, 100, W), (DATA + 0x100, 100, R)]); // readable
        r.add_chain(RX, &[(0x40_0000 - 10, 100, W)]); // off the end of memory
        r.add_chain(RX, &[(u64::MAX - 10, 100, W)]); // overflowing address
        r.add_chain(RX, &[(DATA, 4, W)]); // smaller than a header
        let good = r.add_chain(RX, &[(DATA + 0x1000, 2048, W)]);
        r.fake.push(frame(100, 0, 0, 0));
        r.net.event(0);
        let used = r.used(RX);
        assert_eq!(used.len(), 5);
        assert!(used[..4].iter().all(|&(_, len)| len == 0));
        assert_eq!(used[4], (u32::from(good), (HDR + 100) as u32));
        assert_eq!(r.stats().bad_chains, 4);
        // Nothing was written outside the good buffer.
        assert_eq!(r.read(DATA, 0x200), vec![0u8; 0x200]);
    }

    #[test]
    fn chain_loops_end() {
        let mut r = rig(0);
        // Descriptor 0 points to itself: virtio-queue ends the chain after the queue
        // size (16) of descriptors.
        let f = (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16;
        r.q[RX].set_desc(0, Descriptor::new(DATA, 100, f, 0));
        r.q[RX].offer(0);
        r.fake.push(frame(100, 0, 0, 0));
        r.net.event(0);
        assert_eq!(r.used(RX), vec![(0, (HDR + 100) as u32)]);
        r.q[TX].set_desc(0, Descriptor::new(DATA, 100, VRING_DESC_F_NEXT as u16, 0));
        r.q[TX].offer(0);
        r.net.queue_notify(TX);
        assert_eq!(r.used(TX), vec![(0, 0)]);
        assert_eq!(r.fake.state().tx.len(), 1);
        assert_eq!(r.fake.state().tx[0].len(), 1600);
        // A head beyond the queue size cannot be completed: DEVICE_NEEDS_RESET.
        r.q[TX].offer(99);
        r.net.queue_notify(TX);
        assert!(r.irq.needs_reset());
    }

    #[test]
    fn an_available_index_far_ahead_is_an_error_not_a_spin() {
        for q in [RX, TX] {
            let mut r = rig(bit(VIRTIO_RING_F_EVENT_IDX));
            r.add_chain(RX, &[(DATA, 2048, W)]);
            r.add_chain(TX, &[(DATA, 100, R)]);
            r.fake.push(frame(100, 0, 0, 0));
            r.fake.push(frame(100, 0, 0, 0));
            r.net.event(0);
            r.net.queue_notify(TX);
            // The driver claims 1000 more chains in a 16-entry ring.
            let avail = r.q[q].avail;
            r.mem.write_obj(1001u16, GuestAddress(avail + 2)).unwrap();
            r.net.queue_notify(q);
            r.net.event(0);
            assert!(r.irq.needs_reset(), "queue {q}");
        }
    }

    #[test]
    fn indirect_chains_are_followed() {
        let mut r = rig(0);
        let table = DATA + 0x8000;
        let descs = [
            Descriptor::new(DATA, 20, (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16, 1),
            Descriptor::new(DATA + 0x1000, 200, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, d) in descs.iter().enumerate() {
            r.mem
                .write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        r.q[RX].set_desc(
            0,
            Descriptor::new(table, 32, VRING_DESC_F_INDIRECT as u16, 0),
        );
        r.q[RX].offer(0);
        r.fake.push(frame(100, 0, 0, 0));
        r.net.event(0);
        assert_eq!(r.used(RX), vec![(0, (HDR + 100) as u32)]);
        assert_eq!(r.read(DATA + 0x1000, 1), [8]); // frame byte 8 = seed + 0
    }

    #[test]
    fn interrupts_follow_used_event() {
        let mut r = rig(bit(VIRTIO_RING_F_EVENT_IDX));
        for i in 0..4 {
            r.add_chain(RX, &[(DATA + 0x1000 * i, 2048, W)]);
        }
        // The driver wants an interrupt once entry 2 (the third) is used.
        r.q[RX].set_used_event(2);
        r.fake.push(frame(100, 0, 0, 0));
        r.net.event(0);
        assert!(!r.take_irq());
        r.fake.push(frame(100, 0, 0, 0));
        r.net.event(0);
        assert!(!r.take_irq());
        r.fake.push(frame(100, 0, 0, 0));
        r.fake.push(frame(100, 0, 0, 0));
        r.net.event(0);
        assert!(r.take_irq(), "entries 2 and 3 added: used_event 2 crossed");
        assert_eq!(r.used(RX).len(), 4);
    }

    #[test]
    fn offloads_follow_the_guest_and_reset_forgets() {
        let fake = Fake::default();
        let r = rig_with(
            bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_UFO),
            16,
            fake.clone(),
        );
        let offered = r.net.device_features();
        for f in [
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_UFO,
            VIRTIO_RING_F_EVENT_IDX,
        ] {
            assert_ne!(offered & bit(f), 0, "feature {f}");
        }
        assert_eq!(fake.state().offloads, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_UFO);
        let mut net = r.net;
        net.reset();
        assert_eq!(net.acked, 0);
        assert!(net.active.is_none());
        assert_eq!(fake.state().offloads, 0);
        assert_eq!(net.watched_fds(), vec![(7, 0)]);

        // TSO without CSUM (a driver ignoring the dependency): no offloads.
        net.set_acked_features(bit(VIRTIO_NET_F_GUEST_TSO4));
        assert_eq!(net.tun_offloads(), 0);

        // A back-end that takes no offloads: no GUEST_* features offered.
        let refusing = Fake::default();
        refusing.state().refuse_offloads = true;
        let n = Net::with_backend("x".into(), refusing, default_mac(1));
        let guest = bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_UFO);
        assert_eq!(n.device_features() & guest, 0);
    }

    #[test]
    fn activation_needs_two_queues_and_can_repeat_after_reset() {
        let mem = mem();
        let mut net = Net::with_backend("n".into(), Fake::default(), default_mac(0));
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let e = net
            .activate(mem, vec![Queue::new(16).unwrap()], irq.clone())
            .unwrap_err();
        assert!(e.to_string().contains("expected 2 queues"), "{e}");
        // Used before activation or after reset: nothing happens.
        net.queue_notify(RX);
        net.queue_notify(TX);
        net.event(0);
        net.queue_notify(9);
        let mut r = rig(bit(VIRTIO_NET_F_MRG_RXBUF));
        r.add_chain(RX, &[(DATA, 100, W)]);
        r.fake.push(frame(1000, 0, 0, 0));
        r.net.event(0);
        r.net.reset();
        assert_eq!(
            r.stats().rx_dropped,
            1,
            "the waiting frame is dropped at reset"
        );
        assert!(r.net.rx.held.is_empty());
    }

    #[test]
    fn config_space() {
        let r = rig(0);
        let mut mac = [0u8; 6];
        r.net.read_config(0, &mut mac);
        assert_eq!(mac, [0x46, 0x45, 0x52, 0, 0, 0]);
        let mut b = [0xffu8; 4];
        r.net.read_config(4, &mut b);
        assert_eq!(b, [0, 0, 1, 0], "mac tail, status LINK_UP");
        r.net.read_config(8, &mut b);
        assert_eq!(b, [1, 0, 0, 0], "max_virtqueue_pairs 1, mtu 0");
        b.fill(0xff);
        r.net.read_config(100, &mut b);
        assert_eq!(b, [0; 4]);
        b.fill(0xff);
        r.net.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
        let mut big = [0xffu8; 300];
        r.net.read_config(u64::MAX - 2, &mut big);
        assert!(big.iter().all(|&x| x == 0));
        assert_eq!(default_mac(0x1234), [0x46, 0x45, 0x52, 0, 0x12, 0x34]);
    }

    #[test]
    fn net_config_parsing() {
        assert_eq!(
            NetConfig::parse("tap=tap0"),
            Ok(NetConfig {
                tap: "tap0".into(),
                mac: None
            })
        );
        assert_eq!(
            NetConfig::parse("mac=02:00:00:AB:cd:01,tap=t1"),
            Ok(NetConfig {
                tap: "t1".into(),
                mac: Some([2, 0, 0, 0xab, 0xcd, 1])
            })
        );
        for (bad, says) in [
            ("", "not key=value"),
            ("tap0", "not key=value"),
            ("mac=02:00:00:00:00:01", "tap=NAME is required"),
            ("tap=", "invalid interface name"),
            ("tap=a/b", "invalid interface name"),
            ("tap=abcdefghijklmnop", "invalid interface name"),
            ("tap=a,tap=b", "twice"),
            ("tap=a,mac=1:2:3:4:5:6", "six hex bytes"),
            ("tap=a,mac=02:00:00:00:00", "six hex bytes"),
            ("tap=a,mac=02:00:00:00:00:00:00", "six hex bytes"),
            ("tap=a,mac=02:00:00:00:00:zz", "six hex bytes"),
            ("tap=a,mac=01:00:00:00:00:01", "multicast"),
            ("tap=a,mac=00:00:00:00:00:00", "all-zero"),
            ("tap=a,mac=02:00:00:00:00:01,mac=02:00:00:00:00:01", "twice"),
            ("tap=a,speed=10", "unknown network option"),
        ] {
            let e = NetConfig::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    mod hostile {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        /// Guest memory with a hole: [0, 32K) and [64K, 96K).
        const REGIONS: [(u64, usize); 2] = [(0, 0x8000), (0x1_0000, 0x8000)];
        const SIZE: u16 = 16;
        /// (descriptor table, available ring, used ring) of rx and tx.
        const RINGS: [(u64, u64, u64); 2] = [(0x0, 0x100, 0x200), (0x400, 0x500, 0x600)];
        const USED_LEN: u64 = 4 + 8 * SIZE as u64 + 2;

        fn desc() -> impl Strategy<Value = (u64, u32, u16, u16)> {
            let addr = prop_oneof![
                4 => 0x800u64..0x1_8000,
                1 => Just(0x1_0000u64),
                1 => any::<u64>(),
                1 => (u64::MAX - 0x1000)..=u64::MAX,
            ];
            let len = prop_oneof![
                4 => 0u32..0x2000,
                1 => (0u32..9).prop_map(|k| k * 16),
                1 => any::<u32>(),
            ];
            // NEXT, WRITE, INDIRECT in any combination; next mostly in range.
            (addr, len, 0u16..8, 0u16..20)
        }

        fn store_desc(mem: &GuestMemory, at: u64, (addr, len, flags, next): (u64, u32, u16, u16)) {
            let _ = mem.write_obj(
                RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
                GuestAddress(at),
            );
        }

        fn snapshot(mem: &GuestMemory) -> Vec<Vec<u8>> {
            REGIONS
                .iter()
                .map(|&(base, len)| {
                    let mut v = vec![0u8; len];
                    mem.read_slice(&mut v, GuestAddress(base)).unwrap();
                    v
                })
                .collect()
        }

        /// Ranges the device may write: both used rings, and every device-writable
        /// buffer the receive queue's descriptors (direct or in indirect tables) name.
        fn allowed(mem: &GuestMemory, out: &mut Vec<(u64, u64)>) {
            for &(_, _, used) in &RINGS {
                out.push((used, used + USED_LEN));
            }
            let read = |at: u64| -> Option<Descriptor> {
                mem.read_obj::<RawDescriptor>(GuestAddress(at))
                    .ok()
                    .map(Descriptor::from)
            };
            let write = VRING_DESC_F_WRITE as u16;
            for i in 0..u64::from(SIZE) {
                let Some(d) = read(RINGS[0].0 + 16 * i) else {
                    continue;
                };
                if d.refers_to_indirect_table() {
                    for j in 0..u64::from(d.len() / 16).min(4096) {
                        let Some(e) = d.addr().0.checked_add(16 * j).and_then(read) else {
                            break;
                        };
                        if e.flags() & write != 0 {
                            out.push((e.addr().0, e.addr().0.saturating_add(u64::from(e.len()))));
                        }
                    }
                } else if d.flags() & write != 0 {
                    out.push((d.addr().0, d.addr().0.saturating_add(u64::from(d.len()))));
                }
            }
        }

        fn queue(i: usize) -> Queue {
            let (d, a, u) = RINGS[i];
            let mut q = Queue::new(256).unwrap();
            q.try_set_size(SIZE).unwrap();
            q.try_set_desc_table_address(GuestAddress(d)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(a)).unwrap();
            q.try_set_used_ring_address(GuestAddress(u)).unwrap();
            q.set_ready(true);
            q
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::test_util::cases(10_000)))]
            #[test]
            fn hostile_rings_are_harmless(
                seed in any::<u64>(),
                descs in vec(vec(desc(), SIZE as usize), 2),
                indirect in vec(desc(), 0..8),
                avail in vec(vec(0u16..20, SIZE as usize), 2),
                avail_idx in vec(prop_oneof![4 => 0u16..=SIZE, 1 => any::<u16>()], 2),
                used_event in any::<u16>(),
                frames in vec((prop_oneof![4 => 0usize..3000, 1 => 60_000usize..70_000], any::<u16>()), 0..6),
                features in 0u8..8,
                ops in vec(0u8..4, 1..8),
            ) {
                let mem: GuestMemory = GuestMemoryMmap::from_ranges(
                    &REGIONS.iter().map(|&(b, l)| (GuestAddress(b), l)).collect::<Vec<_>>(),
                ).unwrap();
                // Random bytes everywhere outside the rings, then the rings.
                let mut x = seed | 1;
                for &(base, len) in &REGIONS {
                    let mut v = vec![0u8; len];
                    for b in v.iter_mut() {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        *b = x as u8;
                    }
                    mem.write_slice(&v, GuestAddress(base)).unwrap();
                }
                mem.write_slice(&[0u8; 0x800], GuestAddress(0)).unwrap();
                for (i, &(dt, av, _)) in RINGS.iter().enumerate() {
                    for (j, &d) in descs[i].iter().enumerate() {
                        store_desc(&mem, dt + 16 * j as u64, d);
                    }
                    for (j, &h) in avail[i].iter().enumerate() {
                        mem.write_obj(h, GuestAddress(av + 4 + 2 * j as u64)).unwrap();
                    }
                    mem.write_obj(avail_idx[i], GuestAddress(av + 2)).unwrap();
                    mem.write_obj(used_event, GuestAddress(av + 4 + 2 * u64::from(SIZE))).unwrap();
                }
                for (j, &d) in indirect.iter().enumerate() {
                    store_desc(&mem, 0x1_0000 + 16 * j as u64, d);
                }

                let fake = Fake::default();
                for &(len, h) in &frames {
                    let mut f = frame(len, h as u8, h as u8, (h >> 8) as u8);
                    f.truncate(len);
                    fake.push(f);
                }
                let mut acked = VIRTIO_F_VERSION_1;
                if features & 1 != 0 { acked |= bit(VIRTIO_NET_F_MRG_RXBUF); }
                if features & 2 != 0 { acked |= bit(VIRTIO_RING_F_EVENT_IDX); }
                if features & 4 != 0 {
                    acked |= bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4)
                        | bit(VIRTIO_NET_F_GUEST_TSO6) | bit(VIRTIO_NET_F_GUEST_UFO);
                }
                let mut net = Net::with_backend("p".into(), fake.clone(), default_mac(0));
                let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
                net.set_acked_features(acked);
                net.activate(mem.clone(), vec![queue(0), queue(1)], irq.clone()).unwrap();

                let before = snapshot(&mem);
                let mut ok = Vec::new();
                allowed(&mem, &mut ok);
                for op in ops {
                    match op {
                        0 => net.queue_notify(RX),
                        1 => net.queue_notify(TX),
                        2 => net.event(0),
                        _ => {
                            net.reset();
                            net.set_acked_features(acked);
                            net.activate(mem.clone(), vec![queue(0), queue(1)], irq.clone()).unwrap();
                        }
                    }
                }
                allowed(&mem, &mut ok);
                let after = snapshot(&mem);
                for (r, &(base, _)) in REGIONS.iter().enumerate() {
                    for (i, (a, b)) in before[r].iter().zip(&after[r]).enumerate() {
                        if a != b {
                            let at = base + i as u64;
                            prop_assert!(
                                ok.iter().any(|&(s, e)| s <= at && at < e),
                                "byte {:#x} written outside the used rings and writable buffers", at
                            );
                        }
                    }
                }
                for f in &fake.state().tx {
                    prop_assert!(f.len() >= HDR + MIN_FRAME && f.len() <= HDR + MAX_FRAME);
                }
                let s = net.stats().snapshot();
                prop_assert!(s.rx_frames + s.rx_dropped <= frames.len() as u64);
            }
        }
    }

    /// Puts `frames` in transmit chains (one buffer each) at DATA + 0x1000 * i.
    fn offer_tx(r: &mut Rig, frames: &[Vec<u8>]) {
        for (i, f) in frames.iter().enumerate() {
            let at = DATA + 0x1000 * i as u64;
            r.mem.write_slice(f, GuestAddress(at)).unwrap();
            r.add_chain(TX, &[(at, f.len() as u32, R)]);
        }
    }

    #[test]
    fn mmds_frames_never_reach_the_backend_and_answers_land_in_the_rx_ring() {
        use crate::mmds::stack::tests::{arp_request, segment, ACK, GUEST_MAC, MMDS_IP, SYN};
        use crate::mmds::stack::{Responder, MMDS_MAC, PORT};
        let mut r = rig(bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_RING_F_EVENT_IDX));
        let mmds = Arc::new(Mutex::new(crate::mmds::Mmds::default()));
        r.net
            .set_mmds(Responder::new(mmds, crate::mmds::DEFAULT_IPV4));
        let arp = arp_request(MMDS_IP);
        let syn = segment(40000, PORT, 1, 0, SYN, 1000, &[]);
        // Near misses go to the back-end: another address, the MMDS as the source.
        let mut other_ip = syn.clone();
        other_ip[HDR + 14 + 19] = 253;
        let mut from_mmds = syn.clone();
        from_mmds[HDR + 14 + 12..HDR + 14 + 16].copy_from_slice(&MMDS_IP);
        from_mmds[HDR + 14 + 16..HDR + 14 + 20].copy_from_slice(&[10, 0, 2, 2]);
        let plain = frame(60, 1, VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0);
        // No receive buffers yet: the answers wait.
        offer_tx(
            &mut r,
            &[plain.clone(), arp, other_ip.clone(), syn, from_mmds.clone()],
        );
        r.net.queue_notify(TX);
        assert_eq!(
            r.fake.state().tx,
            vec![plain, other_ip, from_mmds],
            "byte for byte, MMDS frames left out"
        );
        assert_eq!(r.used(TX).len(), 5);
        let s = r.stats();
        assert_eq!((s.tx_frames, s.mmds_tx_frames, s.tx_dropped), (3, 2, 0));
        assert!(r.used(RX).is_empty());
        assert!(r.take_irq(), "for the transmit chains");

        // Buffers come: the ARP reply and the SYN-ACK go in, ahead of a TAP frame.
        r.fake.push(frame(100, 7, 0, 0));
        for i in 0..3 {
            r.add_chain(RX, &[(DATA + 0x10_000 + 0x1000 * i, 2048, W)]);
        }
        r.net.queue_notify(RX);
        let used = r.used(RX);
        assert_eq!(used.len(), 3);
        assert_eq!(used[2].1 as usize, HDR + 100);
        let arp_reply = r.read(DATA + 0x10_000, used[0].1 as usize);
        let mut hdr = [0u8; HDR];
        hdr[10] = 1; // num_buffers
        assert_eq!(arp_reply[..HDR], hdr);
        assert_eq!(arp_reply[HDR..HDR + 6], GUEST_MAC);
        assert_eq!(arp_reply[HDR + 6..HDR + 12], MMDS_MAC);
        assert_eq!(arp_reply[HDR + 12..HDR + 14], [8, 6]);
        let syn_ack = r.read(DATA + 0x11_000, used[1].1 as usize);
        assert_eq!(syn_ack[..HDR], hdr);
        assert_eq!(syn_ack[HDR + 12..HDR + 14], [8, 0]);
        assert_eq!(syn_ack[HDR + 14 + 20 + 13] & (SYN | ACK), SYN | ACK);
        let s = r.stats();
        assert_eq!((s.mmds_rx_frames, s.rx_frames), (2, 3));
        assert!(r.take_irq());

        // With buffers there, the answer goes in by the transmit pass itself, with
        // nothing to read from the TAP.
        r.add_chain(RX, &[(DATA + 0x20_000, 2048, W)]);
        let before = r.fake.state().reads;
        let rst = segment(40001, 22, 1, 0, SYN, 1000, &[]);
        offer_tx(&mut r, &[rst]);
        r.net.queue_notify(TX);
        assert_eq!(r.used(RX).len(), 4);
        let answer = r.read(DATA + 0x20_000, HDR + 14 + 40);
        assert_ne!(answer[HDR + 14 + 20 + 13] & 0x04, 0, "RST for port 22");
        assert_eq!(r.fake.state().tx.len(), 3);
        assert_eq!(r.fake.state().reads, before, "the TAP said EAGAIN before");

        // The responder's timer is watched; a reset forgets its answers.
        assert_eq!(r.net.watched_fds().len(), 2);
        assert_eq!(r.net.watched_fds()[1].1, EVENT_MMDS_TIMER);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            crate::test_util::cases(200)
        ))]
        /// Random frames, some shaped for the MMDS, some near misses, through the
        /// transmit ring of an interface with a responder: the back-end gets exactly
        /// the frames not for the MMDS address, byte for byte and in order; what the
        /// guest receives is the responder's.
        #[test]
        fn only_mmds_frames_are_taken_off_the_tx_path(
            frames in proptest::collection::vec((0u8..5, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)), 1..12),
            rx_buffers in 0u64..6,
        ) {
            use crate::mmds::stack::tests::{segment, arp_request, MMDS_IP, SYN};
            use crate::mmds::stack::{Responder, MMDS_MAC};
            let mut r = rig(bit(VIRTIO_NET_F_MRG_RXBUF));
            let mmds = Arc::new(Mutex::new(crate::mmds::Mmds::default()));
            r.net.set_mmds(Responder::new(mmds, crate::mmds::DEFAULT_IPV4));
            let mut built = Vec::new();
            for (kind, mut bytes) in frames {
                let f = match kind {
                    0 => {
                        bytes.resize(bytes.len().max(MIN_FRAME), 0);
                        let mut f = vec![0u8; HDR];
                        f.extend_from_slice(&bytes);
                        f
                    }
                    1 => segment(40000 + bytes.len() as u16, 80, 1, 0, SYN, 1000, &bytes),
                    2 => {
                        // A near miss: one byte of the destination differs.
                        let mut f = segment(40000, 80, 1, 0, SYN, 1000, &bytes);
                        let i = HDR + 14 + 16 + bytes.len() % 4;
                        f[i] ^= 1 + bytes.first().copied().unwrap_or(0) % 255;
                        f
                    }
                    3 => arp_request(MMDS_IP),
                    _ => {
                        let mut f = arp_request(MMDS_IP);
                        f[HDR + 14 + 27] ^= 0x80;
                        f
                    }
                };
                built.push(f);
            }
            let claimed = |f: &[u8]| {
                let e = &f[HDR..];
                (e[12..14] == [8, 0] && e.len() >= 34 && e[30..34] == MMDS_IP)
                    || (e[12..14] == [8, 6] && e.len() >= 42 && e[38..42] == MMDS_IP)
            };
            let want: Vec<Vec<u8>> = built.iter().filter(|f| !claimed(f)).cloned().collect();
            let n_mmds = built.len() - want.len();
            for i in 0..rx_buffers {
                r.add_chain(RX, &[(DATA + 0x20_000 + 0x1000 * i, 2048, W)]);
            }
            offer_tx(&mut r, &built);
            r.net.queue_notify(TX);
            proptest::prop_assert_eq!(&r.fake.state().tx, &want);
            let s = r.stats();
            proptest::prop_assert_eq!(s.mmds_tx_frames, n_mmds as u64);
            proptest::prop_assert_eq!(s.tx_frames, want.len() as u64);
            for (i, &(_, len)) in r.used(RX).iter().enumerate() {
                let f = r.read(DATA + 0x20_000 + 0x1000 * i as u64, len as usize);
                proptest::prop_assert_eq!(&f[HDR + 6..HDR + 12], &MMDS_MAC[..]);
            }
            proptest::prop_assert!(r.used(RX).len() as u64 <= rx_buffers);
        }
    }

    #[test]
    fn restore_keeps_the_mac_and_refuses_another() {
        let a = Net::with_backend("virtio-net tap7".into(), Fake::default(), default_mac(0));
        let saved = a.save_state().unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let back: super::super::BackendState = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back,
            super::super::BackendState::Net(NetState {
                tap: "tap7".into(),
                mac: default_mac(0)
            })
        );
        // Another TAP with the same MAC takes it (a clone's network override).
        let mut b = Net::with_backend("virtio-net tap8".into(), Fake::default(), default_mac(0));
        b.restore_state(&back).unwrap();
        let mut c = Net::with_backend("virtio-net tap7".into(), Fake::default(), default_mac(1));
        let e = c.restore_state(&back).unwrap_err();
        assert!(e.starts_with("MAC changed from "), "{e}");
        assert!(c.restore_state(&super::super::BackendState::None).is_err());
    }
}
