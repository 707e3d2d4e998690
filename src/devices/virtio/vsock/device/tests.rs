//! The device against a fake guest driver (rings in test memory) and real host UNIX
//! sockets; no KVM.

use super::*;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU32, Ordering};

use proptest::prelude::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::mmio::VIRTIO_F_VERSION_1;
use crate::devices::virtio::vsock::conn::{CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
use crate::devices::virtio::vsock::muxer::HOST_PORT_BASE;
use crate::devices::virtio::vsock::packet::{SHUTDOWN_BOTH, SHUTDOWN_SEND, TYPE_STREAM};

const CID: u64 = 3;
const SIZE: u16 = 64;
const RX_BUFS: u64 = 0x10_0000;
const RX_BUF_LEN: u32 = HEADER_LEN as u32 + 4096;
const TX_HDR: u64 = 0x20_0000;
const TX_DATA: u64 = 0x21_0000;
const EV_BUFS: u64 = 0x30_0000;
/// The rx buffer size the fake guest advertises.
const GUEST_BUF: u32 = 256 * 1024;

/// A unique socket path in the temp directory.
fn sock_path(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("fvs-{}-{n}-{tag}", std::process::id()))
}

/// The driver's side of one split queue (own 4 KiB pages for each part).
struct Driver {
    mem: GuestMemory,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    seen_used: u16,
}

impl Driver {
    fn new(mem: &GuestMemory, base: u64) -> Driver {
        mem.write_slice(&[0u8; 0x3000], GuestAddress(base)).unwrap();
        Driver {
            mem: mem.clone(),
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            seen_used: 0,
        }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(256).unwrap();
        q.try_set_size(SIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        q.set_ready(true);
        q
    }

    /// Offers a chain of (address, length, device-writable) buffers; its head.
    fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let start = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let index = (start + i as u16) % SIZE;
            let next = (index + 1) % SIZE;
            self.mem
                .write_obj(
                    RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
                    GuestAddress(self.desc + 16 * u64::from(index)),
                )
                .unwrap();
        }
        self.next_desc = (start + bufs.len() as u16) % SIZE;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % SIZE);
        self.mem.write_obj(start, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        start
    }

    /// Used entries (head, length) not seen before.
    fn take_used(&mut self) -> Vec<(u16, u32)> {
        let n: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.seen_used != n {
            let at = self.used + 4 + 8 * u64::from(self.seen_used % SIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id as u16, len));
            self.seen_used = self.seen_used.wrapping_add(1);
        }
        out
    }

    fn outstanding(&self) -> u16 {
        let n: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        self.avail_idx.wrapping_sub(n)
    }
}

/// A fake guest: the device, its rings, and the guest's side of each connection's
/// credit (it consumes what it receives at once).
struct Rig {
    mem: GuestMemory,
    dev: Vsock,
    irq: Arc<Interrupt>,
    q: [Driver; 3],
    uds: PathBuf,
    /// Guest → host bytes sent and host → guest bytes received, per (guest port,
    /// host port).
    guest_fwd: HashMap<(u32, u32), u32>,
}

fn mem() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

fn rig_with(tag: &str, max: usize) -> Rig {
    let uds = sock_path(tag);
    let mut cfg = VsockConfig::new(CID, uds.clone()).unwrap();
    cfg.max_connections = max;
    let dev = Vsock::new(&cfg).unwrap();
    let mem = mem();
    let q = [
        Driver::new(&mem, 0),
        Driver::new(&mem, 0x4000),
        Driver::new(&mem, 0x8000),
    ];
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let mut r = Rig {
        mem,
        dev,
        irq,
        q,
        uds,
        guest_fwd: HashMap::new(),
    };
    r.activate();
    r
}

fn rig(tag: &str) -> Rig {
    rig_with(tag, 8)
}

/// A packet from the guest.
fn from_guest(op: Op, src_port: u32, dst_port: u32, len: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        ty: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF,
        fwd_cnt,
    }
}

/// Polls `f` until it returns Some, driving the device's event handler, for up to 5 s.
fn wait_for<T>(r: &mut Rig, mut f: impl FnMut(&mut Rig) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        r.dev.event(0);
        if let Some(v) = f(r) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Rig {
    fn activate(&mut self) {
        for d in &mut self.q {
            *d = Driver::new(&self.mem, d.desc);
        }
        self.dev
            .set_acked_features(VIRTIO_F_VERSION_1 | (1 << VIRTIO_RING_F_EVENT_IDX));
        let qs = self.q.iter().map(Driver::queue).collect();
        self.dev
            .activate(self.mem.clone(), qs, self.irq.clone())
            .unwrap();
    }

    /// Offers rx buffers up to `n` outstanding.
    fn offer_rx(&mut self, n: u16) {
        while self.q[RX].outstanding() < n {
            let slot = self.q[RX].next_desc;
            let addr = RX_BUFS + u64::from(slot) * 0x1100;
            self.q[RX].add_chain(&[(addr, RX_BUF_LEN, true)]);
        }
        self.dev.queue_notify(RX);
    }

    /// Sends one packet on the tx queue.
    fn send(&mut self, h: Header, payload: &[u8]) {
        self.send_raw(&h.to_bytes(), payload);
    }

    fn send_raw(&mut self, hdr: &[u8], payload: &[u8]) {
        self.mem.write_slice(hdr, GuestAddress(TX_HDR)).unwrap();
        self.mem
            .write_slice(payload, GuestAddress(TX_DATA))
            .unwrap();
        if payload.is_empty() {
            self.q[TX].add_chain(&[(TX_HDR, hdr.len() as u32, false)]);
        } else {
            self.q[TX].add_chain(&[
                (TX_HDR, hdr.len() as u32, false),
                (TX_DATA, payload.len() as u32, false),
            ]);
        }
        self.dev.queue_notify(TX);
    }

    /// Packets the device put in the rx ring since the last call; the guest counts
    /// the data as consumed at once.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        for (head, len) in self.q[RX].take_used() {
            let addr = RX_BUFS + u64::from(head) * 0x1100;
            let mut b = vec![0u8; len as usize];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            let h = Header::parse(&b).expect("device sent a valid header");
            let data = b[HEADER_LEN..].to_vec();
            assert_eq!(data.len(), h.len as usize);
            let k = (h.dst_port, h.src_port);
            let fwd = self.guest_fwd.entry(k).or_default();
            *fwd = fwd.wrapping_add(h.len);
            out.push((h, data));
        }
        out
    }

    /// Receives until `pred` holds on some packet; the packets so far.
    fn recv_until(&mut self, mut pred: impl FnMut(&Header) -> bool) -> Vec<(Header, Vec<u8>)> {
        let mut all = Vec::new();
        wait_for(self, |r| {
            r.offer_rx(32);
            let got = r.recv();
            let hit = got.iter().any(|(h, _)| pred(h));
            all.extend(got);
            hit.then_some(())
        });
        all
    }

    fn fwd(&self, guest_port: u32, host_port: u32) -> u32 {
        self.guest_fwd
            .get(&(guest_port, host_port))
            .copied()
            .unwrap_or(0)
    }

    /// A host client that got OK from the guest's port `guest_port` (the guest
    /// accepts); (client, host port).
    fn host_connect(&mut self, guest_port: u32) -> (UnixStream, u32) {
        let mut c = UnixStream::connect(&self.uds).unwrap();
        c.write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        let got = self.recv_until(|h| h.op == Op::Request && h.dst_port == guest_port);
        let (req, _) = got
            .iter()
            .find(|(h, _)| h.op == Op::Request)
            .expect("request")
            .clone();
        assert!(req.src_port >= HOST_PORT_BASE);
        self.send(
            from_guest(Op::Response, guest_port, req.src_port, 0, 0),
            &[],
        );
        let mut line = Vec::new();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        while !line.ends_with(b"\n") {
            assert_eq!(c.read(&mut b).unwrap(), 1);
            line.push(b[0]);
        }
        assert_eq!(line, format!("OK {}\n", req.src_port).into_bytes());
        (c, req.src_port)
    }

    /// A guest connection to host port `host_port` (which has a listener); the
    /// host's accepted stream.
    fn guest_connect(&mut self, l: &UnixListener, guest_port: u32, host_port: u32) -> UnixStream {
        self.send(from_guest(Op::Request, guest_port, host_port, 0, 0), &[]);
        let got = self.recv_until(|h| h.dst_port == guest_port);
        assert!(got.iter().any(|(h, _)| h.op == Op::Response), "{got:?}");
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    fn needs_reset(&self) -> bool {
        self.irq.needs_reset()
    }
}

/// The device closed `c`: end of file, or a reset when it left bytes the client
/// wrote unread.
fn assert_closed(c: &mut UnixStream) {
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    match c.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the socket closed, got {other:?}"),
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.read_exact(&mut v).unwrap();
    v
}

#[test]
fn host_connect_gets_ok_after_guest_response_and_data_flows_both_ways() {
    let mut r = rig("hc");
    r.offer_rx(32);
    let (mut c, hp) = r.host_connect(5000);
    // Host → guest.
    let data = pattern(10_000, 1);
    c.write_all(&data).unwrap();
    let mut got = Vec::new();
    wait_for(&mut r, |r| {
        r.offer_rx(32);
        for (h, d) in r.recv() {
            assert_eq!((h.op, h.src_port, h.dst_port), (Op::Rw, hp, 5000));
            got.extend(d);
        }
        (got.len() >= data.len()).then_some(())
    });
    assert_eq!(got, data);
    // Guest → host.
    let back = pattern(3000, 7);
    let fwd = r.fwd(5000, hp);
    r.send(from_guest(Op::Rw, 5000, hp, 3000, fwd), &back);
    assert_eq!(read_exactly(&mut c, 3000), back);
    let s = r.dev.stats();
    assert_eq!((s.bytes_to_guest, s.bytes_to_host), (10_000, 3000));
    assert_eq!(s.connections, 1);
    assert!(!r.needs_reset());
}

#[test]
fn bytes_after_the_connect_line_reach_the_guest_after_ok() {
    let mut r = rig("early");
    r.offer_rx(32);
    let mut c = UnixStream::connect(&r.uds).unwrap();
    c.write_all(b"CONNECT 52\nhello").unwrap();
    let got = r.recv_until(|h| h.op == Op::Request);
    let req = got.iter().find(|(h, _)| h.op == Op::Request).unwrap().0;
    assert!(got.iter().all(|(h, _)| h.op != Op::Rw));
    r.send(from_guest(Op::Response, 52, req.src_port, 0, 0), &[]);
    let got = r.recv_until(|h| h.op == Op::Rw);
    let data: Vec<u8> = got.into_iter().flat_map(|(_, d)| d).collect();
    assert_eq!(data, b"hello");
    assert_eq!(
        read_exactly(&mut c, 14),
        format!("OK {}\n", req.src_port).into_bytes()
    );
}

#[test]
fn guest_refusing_a_host_connect_closes_the_client() {
    let mut r = rig("refuse");
    r.offer_rx(32);
    let mut c = UnixStream::connect(&r.uds).unwrap();
    c.write_all(b"CONNECT 9\n").unwrap();
    let got = r.recv_until(|h| h.op == Op::Request);
    let req = got[0].0;
    r.send(from_guest(Op::Rst, 9, req.src_port, 0, 0), &[]);
    let mut b = [0u8; 8];
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(c.read(&mut b).unwrap(), 0, "client sees EOF, no OK");
    assert_eq!(r.dev.stats().connections, 0);
}

#[test]
fn bad_connect_lines_are_closed_and_counted() {
    let mut r = rig("badline");
    r.offer_rx(32);
    for line in [&b"LISTEN 5\n"[..], b"CONNECT x\n", &[b'C'; 40]] {
        let mut c = UnixStream::connect(&r.uds).unwrap();
        c.write_all(line).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        wait_for(&mut r, |r| (r.dev.stats().handshakes == 0).then_some(()));
        assert_closed(&mut c);
    }
    assert_eq!(r.dev.stats().refused, 3);
    assert!(r.recv().is_empty(), "nothing reached the guest");
}

#[test]
fn guest_connect_to_a_listening_port_gets_response_and_data() {
    let mut r = rig("gc");
    let l = UnixListener::bind(port_path(&r.uds, 1234)).unwrap();
    r.offer_rx(32);
    let mut s = r.guest_connect(&l, 40000, 1234);
    let data = pattern(70_000, 3);
    for chunk in data.chunks(MAX_PAYLOAD as usize) {
        let fwd = r.fwd(40000, 1234);
        r.send(
            from_guest(Op::Rw, 40000, 1234, chunk.len() as u32, fwd),
            chunk,
        );
    }
    assert_eq!(read_exactly(&mut s, data.len()), data);
    s.write_all(b"pong").unwrap();
    let got = r.recv_until(|h| h.op == Op::Rw);
    let rw: Vec<u8> = got
        .into_iter()
        .filter(|(h, _)| h.op == Op::Rw)
        .flat_map(|(_, d)| d)
        .collect();
    assert_eq!(rw, b"pong");
    let _ = std::fs::remove_file(port_path(&r.uds, 1234));
}

#[test]
fn guest_connect_to_a_port_nobody_listens_on_gets_rst_at_once() {
    let mut r = rig("nolisten");
    r.offer_rx(32);
    r.send(from_guest(Op::Request, 40000, 4321, 0, 0), &[]);
    // No waiting: the answer is in the ring after the tx notification itself.
    let got = r.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.op, got[0].0.src_port, got[0].0.dst_port),
        (Op::Rst, 4321, 40000)
    );
    // A socket file nobody listens on (stale) is refused the same way.
    let p = port_path(&r.uds, 4322);
    drop(UnixListener::bind(&p).unwrap());
    r.send(from_guest(Op::Request, 40001, 4322, 0, 0), &[]);
    assert_eq!(r.recv()[0].0.op, Op::Rst);
    assert_eq!(r.dev.stats().connections, 0);
    let _ = std::fs::remove_file(p);
}

#[test]
fn stalled_host_reader_bounds_buffering_then_data_resumes_intact() {
    let mut r = rig("stall");
    let l = UnixListener::bind(port_path(&r.uds, 77)).unwrap();
    r.offer_rx(32);
    let mut s = r.guest_connect(&l, 900, 77);
    // The guest sends exactly the credit it was given (the host does not read).
    let total = CONN_BUF_ALLOC as usize;
    let data = pattern(total * 3, 9);
    let mut sent = 0usize;
    while sent < total {
        let n = MAX_PAYLOAD as usize;
        let fwd = r.fwd(900, 77);
        r.send(
            from_guest(Op::Rw, 900, 77, n as u32, fwd),
            &data[sent..sent + n],
        );
        sent += n;
    }
    r.dev.event(0);
    let s1 = r.dev.stats();
    // The socket's own buffer took some; the device holds the rest, within credit.
    assert!(s1.buffered_to_host <= CONN_BUF_ALLOC as usize, "{s1:?}");
    assert!(
        s1.buffered_to_host > 0,
        "{s1:?}: the test needs a full socket"
    );
    // Nor is more allocated than the bound.
    for hc in r.dev.conns.values() {
        assert!(hc.to_host.capacity() <= CONN_BUF_ALLOC as usize + 32);
    }
    // One byte beyond the credit the guest was told about is a credit lie: RST.
    // (Not sent: the guest respects its credit.) What it was told so far:
    let told: u32 = r
        .recv()
        .iter()
        .filter(|(h, _)| h.dst_port == 900)
        .map(|(h, _)| h.fwd_cnt)
        .max()
        .unwrap_or(0);
    let written = s1.bytes_to_host as u32;
    assert!(told <= written);
    // The host reads everything; credit comes back and the guest sends the rest,
    // a credit's worth at a time.
    let mut got = Vec::new();
    let mut told = told;
    let deadline = Instant::now() + Duration::from_secs(10);
    s.set_nonblocking(true).unwrap();
    while got.len() < data.len() {
        assert!(Instant::now() < deadline, "stalled at {}", got.len());
        let mut b = vec![0u8; 65536];
        match s.read(&mut b) {
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        r.dev.event(0);
        r.offer_rx(32);
        for (h, _) in r.recv() {
            if h.dst_port == 900 {
                told = told.max(h.fwd_cnt);
            }
        }
        // Send within the credit told.
        while sent < data.len() {
            let in_flight = (sent as u32).wrapping_sub(told);
            let credit = CONN_BUF_ALLOC - in_flight;
            let n = (MAX_PAYLOAD as usize)
                .min(data.len() - sent)
                .min(credit as usize);
            if n == 0 {
                break;
            }
            let fwd = r.fwd(900, 77);
            r.send(
                from_guest(Op::Rw, 900, 77, n as u32, fwd),
                &data[sent..sent + n],
            );
            sent += n;
        }
        assert!(r.dev.stats().buffered_to_host <= CONN_BUF_ALLOC as usize);
    }
    assert_eq!(got, data);
    assert_eq!(r.dev.stats().connections, 1, "never reset");
    let _ = std::fs::remove_file(port_path(&r.uds, 77));
}

#[test]
fn guest_sending_beyond_its_credit_is_reset() {
    let mut r = rig("lie");
    let l = UnixListener::bind(port_path(&r.uds, 78)).unwrap();
    r.offer_rx(32);
    let _s = r.guest_connect(&l, 901, 78);
    let chunk = vec![0u8; MAX_PAYLOAD as usize];
    for _ in 0..CONN_BUF_ALLOC / MAX_PAYLOAD {
        r.send(from_guest(Op::Rw, 901, 78, MAX_PAYLOAD, 0), &chunk);
    }
    // Whatever the host took, the guest was not told of it beyond a credit update.
    let told = r
        .recv()
        .iter()
        .filter(|(h, _)| h.op == Op::CreditUpdate)
        .map(|(h, _)| h.fwd_cnt)
        .max()
        .unwrap_or(0);
    let extra = told as usize + 1;
    let big = vec![0u8; extra.min(MAX_PAYLOAD as usize)];
    if extra <= MAX_PAYLOAD as usize {
        r.send(from_guest(Op::Rw, 901, 78, big.len() as u32, 0), &big);
        let got = r.recv();
        assert!(got.iter().any(|(h, _)| h.op == Op::Rst), "{got:?}");
        assert_eq!(r.dev.stats().connections, 0);
    }
    assert!(r.dev.stats().buffered_to_host <= CONN_BUF_ALLOC as usize);
    let _ = std::fs::remove_file(port_path(&r.uds, 78));
}

#[test]
fn host_close_sends_shutdown_then_guest_rst_forgets_the_connection() {
    let mut r = rig("hclose");
    r.offer_rx(32);
    let (c, hp) = r.host_connect(61);
    drop(c);
    let got = r.recv_until(|h| h.op == Op::Shutdown);
    let sd = got.iter().find(|(h, _)| h.op == Op::Shutdown).unwrap().0;
    assert_eq!(sd.flags, SHUTDOWN_BOTH);
    assert_eq!((sd.src_port, sd.dst_port), (hp, 61));
    assert_eq!(r.dev.stats().connections, 1);
    r.send(from_guest(Op::Rst, 61, hp, 0, 0), &[]);
    assert_eq!(r.dev.stats().connections, 0);
}

#[test]
fn host_half_close_sends_shutdown_send_and_guest_data_still_flows() {
    let mut r = rig("halfclose");
    r.offer_rx(32);
    let (mut c, hp) = r.host_connect(62);
    c.write_all(b"last").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let got = r.recv_until(|h| h.op == Op::Shutdown);
    let ops: Vec<Op> = got.iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, vec![Op::Rw, Op::Shutdown], "data before the shutdown");
    assert_eq!(got[1].0.flags, SHUTDOWN_SEND);
    r.send(from_guest(Op::Rw, 62, hp, 3, 4), b"bye");
    assert_eq!(read_exactly(&mut c, 3), b"bye");
}

#[test]
fn host_client_closing_before_the_guest_answers_gets_rst_to_the_guest() {
    let mut r = rig("earlyclose");
    r.offer_rx(32);
    let mut c = UnixStream::connect(&r.uds).unwrap();
    c.write_all(b"CONNECT 63\n").unwrap();
    r.recv_until(|h| h.op == Op::Request);
    drop(c);
    let got = r.recv_until(|h| h.op == Op::Rst);
    assert_eq!(got.last().unwrap().0.dst_port, 63);
    assert_eq!(r.dev.stats().connections, 0);
}

#[test]
fn guest_shutdown_both_after_data_delivers_it_then_closes_the_host_socket() {
    let mut r = rig("gclose");
    let l = UnixListener::bind(port_path(&r.uds, 80)).unwrap();
    r.offer_rx(32);
    let mut s = r.guest_connect(&l, 902, 80);
    let data = pattern(1000, 5);
    r.send(from_guest(Op::Rw, 902, 80, 1000, 0), &data);
    r.send(
        Header {
            flags: SHUTDOWN_BOTH,
            ..from_guest(Op::Shutdown, 902, 80, 0, 0)
        },
        &[],
    );
    let got = r.recv();
    assert!(got.iter().any(|(h, _)| h.op == Op::Rst), "{got:?}");
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert_eq!(all, data, "data, then EOF");
    assert_eq!(r.dev.stats().connections, 0);
    let _ = std::fs::remove_file(port_path(&r.uds, 80));
}

#[test]
fn reset_closes_host_sockets_and_the_device_activates_again() {
    let mut r = rig("reset");
    let l = UnixListener::bind(port_path(&r.uds, 81)).unwrap();
    r.offer_rx(32);
    let (mut c, _) = r.host_connect(64);
    let mut s = r.guest_connect(&l, 903, 81);
    r.dev.reset();
    let mut b = [0u8; 4];
    assert_eq!(c.read(&mut b).unwrap(), 0, "client sees EOF");
    assert_eq!(s.read(&mut b).unwrap(), 0, "host listener's peer sees EOF");
    assert_eq!(r.dev.stats().connections, 0);
    assert!(r.dev.conns.is_empty() && r.dev.pending.is_empty());
    r.activate();
    r.offer_rx(32);
    let (mut c2, hp) = r.host_connect(64);
    r.send(from_guest(Op::Rw, 64, hp, 2, 0), b"hi");
    assert_eq!(read_exactly(&mut c2, 2), b"hi");
    let _ = std::fs::remove_file(port_path(&r.uds, 81));
}

#[test]
fn transport_reset_queues_the_event_and_closes_connections() {
    let mut r = rig("treset");
    r.offer_rx(32);
    let (mut c, _) = r.host_connect(65);
    r.dev.transport_reset();
    let mut b = [0u8; 4];
    assert_eq!(c.read(&mut b).unwrap(), 0, "client sees EOF");
    assert_eq!(r.dev.stats().connections, 0);
    // No event buffer yet: the event waits for one.
    assert!(r.q[EVQ].take_used().is_empty());
    r.mem
        .write_slice(&[0xffu8; 8], GuestAddress(EV_BUFS))
        .unwrap();
    r.q[EVQ].add_chain(&[(EV_BUFS, 8, true)]);
    r.dev.queue_notify(EVQ);
    assert_eq!(r.q[EVQ].take_used(), vec![(0, 4)]);
    let id: u32 = r.mem.read_obj(GuestAddress(EV_BUFS)).unwrap();
    assert_eq!(id, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
    // Delivered once.
    r.q[EVQ].add_chain(&[(EV_BUFS, 8, true)]);
    r.dev.queue_notify(EVQ);
    assert!(r.q[EVQ].take_used().is_empty());
    // New connections work afterwards.
    let (mut c2, hp) = r.host_connect(65);
    r.send(from_guest(Op::Rw, 65, hp, 2, 0), b"ok");
    assert_eq!(read_exactly(&mut c2, 2), b"ok");
}

#[test]
fn connections_beyond_the_maximum_are_refused_both_ways() {
    let mut r = rig_with("max", 2);
    let l = UnixListener::bind(port_path(&r.uds, 82)).unwrap();
    r.offer_rx(32);
    let _a = r.guest_connect(&l, 1, 82);
    let (_c, _) = r.host_connect(66);
    r.send(from_guest(Op::Request, 2, 82, 0, 0), &[]);
    let got = r.recv();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, got[0].0.dst_port), (Op::Rst, 2));
    let mut c = UnixStream::connect(&r.uds).unwrap();
    c.write_all(b"CONNECT 66\n").unwrap();
    r.dev.event(0);
    assert_closed(&mut c);
    assert_eq!(r.dev.stats().connections, 2);
    let _ = std::fs::remove_file(port_path(&r.uds, 82));
}

#[test]
fn empty_rx_ring_stops_reading_and_the_rx_notification_resumes() {
    let mut r = rig("norx");
    r.offer_rx(32);
    let (mut c, _) = r.host_connect(67);
    // The guest takes no more buffers: everything offered is used up, then the host
    // writes.
    let data = pattern(200_000, 2);
    let writer = {
        let mut c2 = c.try_clone().unwrap();
        let d = data.clone();
        std::thread::spawn(move || c2.write_all(&d))
    };
    let mut got = Vec::new();
    // Consume what fits in the offered buffers without offering more.
    for _ in 0..50 {
        r.dev.event(0);
        got.extend(r.recv().into_iter().flat_map(|(_, d)| d));
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        got.len() <= 32 * 4096,
        "{} bytes without buffers",
        got.len()
    );
    // Events without buffers do not spin or read ahead: the device holds nothing.
    assert_eq!(r.dev.stats().buffered_to_host, 0);
    let taken = r.dev.stats().bytes_to_guest as usize;
    assert_eq!(taken, got.len());
    // Buffers come back: data resumes, intact. The guest's credit is returned
    // as it consumes.
    wait_for(&mut r, |r| {
        r.offer_rx(32);
        got.extend(r.recv().into_iter().flat_map(|(_, d)| d));
        let (hp, gp) = (r.dev.conns.keys().next().unwrap().local_port, 67);
        let fwd = r.fwd(gp, hp);
        r.send(from_guest(Op::CreditUpdate, gp, hp, 0, fwd), &[]);
        (got.len() >= data.len()).then_some(())
    });
    assert_eq!(got, data);
    writer.join().unwrap().unwrap();
    drop(c.write(b""));
}

#[test]
fn handshake_that_never_completes_times_out() {
    let mut r = rig("slow");
    let mut c = UnixStream::connect(&r.uds).unwrap();
    c.write_all(b"CONN").unwrap();
    r.dev.event(0);
    assert_eq!(r.dev.stats().handshakes, 1);
    // The deadline is the timer's: fake its passing.
    for p in r.dev.pending.values_mut() {
        p.deadline = Instant::now();
    }
    r.dev.queue_notify(RX);
    assert_eq!(r.dev.stats().handshakes, 0);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 4];
    assert_eq!(c.read(&mut b).unwrap(), 0);
}

#[test]
fn guest_that_never_answers_a_request_is_reset_after_the_timeout() {
    let mut r = rig("noanswer");
    r.offer_rx(32);
    let mut c = UnixStream::connect(&r.uds).unwrap();
    c.write_all(b"CONNECT 68\n").unwrap();
    r.recv_until(|h| h.op == Op::Request);
    let hc = r.dev.conns.values_mut().next().unwrap();
    assert!(hc.deadline.is_some(), "the close timeout is armed");
    hc.deadline = Some(Instant::now());
    r.dev.queue_notify(RX);
    let got = r.recv();
    assert!(got.iter().any(|(h, _)| h.op == Op::Rst), "{got:?}");
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 4];
    assert_eq!(c.read(&mut b).unwrap(), 0);
    assert_eq!(r.dev.stats().connections, 0);
}

#[test]
fn the_timer_fires_through_the_event_fd() {
    let mut r = rig("timer");
    let _c = UnixStream::connect(&r.uds).unwrap();
    r.dev.event(0);
    for p in r.dev.pending.values_mut() {
        p.deadline = Instant::now() + Duration::from_millis(30);
    }
    r.dev.timer_at = None;
    r.dev.queue_notify(RX);
    wait_for(&mut r, |r| (r.dev.stats().handshakes == 0).then_some(()));
}

#[test]
fn malformed_headers_are_answered_with_rst() {
    let mut r = rig("badhdr");
    let l = UnixListener::bind(port_path(&r.uds, 83)).unwrap();
    r.offer_rx(32);
    let _s = r.guest_connect(&l, 904, 83);
    // Unknown op on the open connection: it is reset.
    let mut b = from_guest(Op::Rw, 904, 83, 0, 0).to_bytes();
    b[30] = 99;
    r.send_raw(&b, &[]);
    let got = r.recv();
    assert!(got
        .iter()
        .any(|(h, _)| h.op == Op::Rst && h.dst_port == 904));
    assert_eq!(r.dev.stats().connections, 0);
    // RW announcing more than it carries, for no connection: RST.
    r.send(from_guest(Op::Rw, 905, 83, 100, 0), &[1, 2, 3]);
    let got = r.recv();
    assert!(got
        .iter()
        .any(|(h, _)| h.op == Op::Rst && h.dst_port == 905));
    assert_eq!(r.dev.stats().bad_packets, 2);
    assert!(!r.needs_reset());
    let _ = std::fs::remove_file(port_path(&r.uds, 83));
}

#[test]
fn broken_chains_set_device_needs_reset() {
    for case in 0..3 {
        let mut r = rig("badchain");
        match case {
            0 => {
                // A device-writable buffer in a tx chain.
                r.q[TX].add_chain(&[(TX_HDR, 44, true)]);
                r.dev.queue_notify(TX);
            }
            1 => {
                // A tx buffer beyond guest memory.
                r.q[TX].add_chain(&[(0x40_0000 - 8, 44, false)]);
                r.dev.queue_notify(TX);
            }
            _ => {
                // A device-readable rx buffer.
                r.send(from_guest(Op::Request, 1, 999, 0, 0), &[]);
                r.q[RX].add_chain(&[(RX_BUFS, RX_BUF_LEN, false)]);
                r.dev.queue_notify(RX);
            }
        }
        assert!(r.needs_reset(), "case {case}");
        // Nothing more happens, and no panic.
        r.dev.queue_notify(TX);
        r.dev.queue_notify(RX);
        r.dev.event(0);
    }
}

#[test]
fn flood_of_requests_without_rx_buffers_is_bounded() {
    let mut r = rig("flood");
    // No rx buffers: every REQUEST to a port nobody listens on wants an RST.
    for p in 0..(CONTROL_SOFT_MAX as u32 + 20) {
        r.send(from_guest(Op::Request, p, 5, 0, 0), &[]);
    }
    let s = r.dev.stats();
    assert_eq!(s.control_queued, CONTROL_SOFT_MAX);
    assert_eq!(r.q[TX].take_used().len(), CONTROL_SOFT_MAX, "tx stops");
    // Buffers come: the queue drains and the tx queue is served again.
    wait_for(&mut r, |r| {
        r.offer_rx(32);
        r.recv();
        (r.dev.stats().control_queued == 0 && r.q[TX].outstanding() == 0).then_some(())
    });
}

#[test]
fn config_space_is_the_guest_cid_and_event_idx_is_offered() {
    let r = rig("cfg");
    let mut b = [0u8; 8];
    r.dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), CID);
    assert_ne!(r.dev.device_features() & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    assert_eq!(r.dev.watched_fds().len(), 1);
}

#[test]
fn stale_socket_is_replaced() {
    let p = sock_path("stale");
    drop(UnixListener::bind(&p).unwrap());
    assert!(p.exists());
    let dev = Vsock::new(&VsockConfig::new(CID, p.clone()).unwrap()).unwrap();
    assert!(UnixStream::connect(&p).is_ok(), "ours now");
    drop(dev);
    assert!(!p.exists());
}

#[test]
fn live_socket_is_refused_and_left_alone() {
    let p = sock_path("live");
    let l = UnixListener::bind(&p).unwrap();
    let e = Vsock::new(&VsockConfig::new(CID, p.clone()).unwrap())
        .err()
        .expect("refused");
    assert!(matches!(e, Error::InUse { .. }), "{e}");
    assert!(p.exists());
    drop(l);
    let _ = std::fs::remove_file(&p);
}

#[test]
fn non_socket_file_is_refused_and_not_removed() {
    let p = sock_path("file");
    std::fs::write(&p, b"keep me").unwrap();
    let e = Vsock::new(&VsockConfig::new(CID, p.clone()).unwrap())
        .err()
        .expect("refused");
    assert!(matches!(e, Error::NotASocket { .. }), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn path_is_removed_on_drop_only_if_still_ours() {
    let p = sock_path("drop");
    let dev = Vsock::new(&VsockConfig::new(CID, p.clone()).unwrap()).unwrap();
    assert!(p.exists());
    drop(dev);
    assert!(!p.exists());
    // Replaced by someone else meanwhile: left alone.
    let dev = Vsock::new(&VsockConfig::new(CID, p.clone()).unwrap()).unwrap();
    std::fs::remove_file(&p).unwrap();
    std::fs::write(&p, b"other").unwrap();
    drop(dev);
    assert_eq!(std::fs::read(&p).unwrap(), b"other");
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn clients_wait_in_the_backlog_until_activation() {
    let uds = sock_path("backlog");
    let mut dev = Vsock::new(&VsockConfig::new(CID, uds.clone()).unwrap()).unwrap();
    let mut c = UnixStream::connect(&uds).unwrap();
    c.write_all(b"CONNECT 70\n").unwrap();
    dev.event(0);
    dev.queue_notify(RX);
    assert_eq!(dev.stats().handshakes + dev.stats().connections, 0);
    let mem = mem();
    let mut q = [
        Driver::new(&mem, 0),
        Driver::new(&mem, 0x4000),
        Driver::new(&mem, 0x8000),
    ];
    dev.set_acked_features(VIRTIO_F_VERSION_1);
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    dev.activate(mem.clone(), q.iter().map(Driver::queue).collect(), irq)
        .unwrap();
    q[RX].add_chain(&[(RX_BUFS, RX_BUF_LEN, true)]);
    dev.queue_notify(RX);
    assert_eq!(q[RX].take_used().len(), 1, "the REQUEST");
    assert_eq!(dev.stats().connections, 1);
}

// ----- randomized --------------------------------------------------------------

/// A random guest packet: mostly plausible headers for a few ports, sometimes junk.
fn any_packet() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let op = prop_oneof![6 => Just(5u16), 6 => 1u16..=7, 1 => any::<u16>()];
    (
        prop_oneof![8 => Just(CID), 1 => any::<u64>()],
        prop_oneof![8 => Just(HOST_CID), 1 => any::<u64>()],
        0u32..3,
        prop_oneof![3 => 1u32..3, 1 => HOST_PORT_BASE..HOST_PORT_BASE + 2, 1 => any::<u32>()],
        op,
        prop_oneof![8 => Just(TYPE_STREAM), 1 => any::<u16>()],
        0u32..4,
        prop_oneof![Just(GUEST_BUF), Just(0u32), any::<u32>()],
        prop_oneof![4 => Just(0u32), 1 => any::<u32>()],
        prop_oneof![4 => 0usize..64, 1 => 0usize..70_000],
        prop_oneof![4 => Just(None), 1 => Just(Some(0u32)), 1 => any::<u32>().prop_map(Some)],
    )
        .prop_map(
            |(src_cid, dst_cid, sp, dp, op, ty, flags, buf_alloc, fwd_cnt, plen, len_lie)| {
                let mut b = [0u8; HEADER_LEN];
                b[0..8].copy_from_slice(&src_cid.to_le_bytes());
                b[8..16].copy_from_slice(&dst_cid.to_le_bytes());
                b[16..20].copy_from_slice(&sp.to_le_bytes());
                b[20..24].copy_from_slice(&dp.to_le_bytes());
                let len = len_lie.unwrap_or(plen as u32);
                b[24..28].copy_from_slice(&len.to_le_bytes());
                b[28..30].copy_from_slice(&ty.to_le_bytes());
                b[30..32].copy_from_slice(&op.to_le_bytes());
                b[32..36].copy_from_slice(&flags.to_le_bytes());
                b[36..40].copy_from_slice(&buf_alloc.to_le_bytes());
                b[40..44].copy_from_slice(&fwd_cnt.to_le_bytes());
                (b.to_vec(), pattern(plen, op as u8))
            },
        )
}

#[derive(Debug, Clone)]
enum Step {
    Packet(Vec<u8>, Vec<u8>),
    /// A random descriptor table and available ring for queue `q`.
    Ring {
        q: usize,
        descs: Vec<(u64, u32, u16, u16)>,
        heads: Vec<u16>,
        idx: u16,
    },
    OfferRx(u16),
    HostClient(u32),
    HostWrite(usize, usize),
    HostClose(usize),
    Event,
    Reset,
    TransportReset,
}

fn any_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        10 => any_packet().prop_map(|(h, p)| Step::Packet(h, p)),
        1 => (
            0usize..3,
            proptest::collection::vec(crate::devices::virtio::test_util::any_desc(), 1..8),
            proptest::collection::vec(0u16..10, 0..4),
            any::<u16>(),
        )
            .prop_map(|(q, descs, heads, idx)| Step::Ring { q, descs, heads, idx }),
        3 => (1u16..33).prop_map(Step::OfferRx),
        2 => (0u32..3).prop_map(Step::HostClient),
        2 => (0usize..4, 0usize..100_000).prop_map(|(i, n)| Step::HostWrite(i, n)),
        1 => (0usize..4).prop_map(Step::HostClose),
        3 => Just(Step::Event),
        1 => Just(Step::Reset),
        1 => Just(Step::TransportReset),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::test_util::cases(64)))]
    /// Random packets, random rings, host clients writing and closing, resets, against
    /// an activated device with listeners on two host ports: no panic, the device's
    /// fds, connections and buffered bytes stay within their bounds, and nothing is
    /// left open after a reset.
    #[test]
    fn random_packets_rings_and_host_events_stay_bounded(
        steps in proptest::collection::vec(any_step(), 1..60)
    ) {
        let mut r = rig_with("prop", 4);
        let listeners: Vec<UnixListener> = (1u32..3)
            .map(|p| {
                let l = UnixListener::bind(port_path(&r.uds, p)).unwrap();
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect();
        let mut clients: Vec<UnixStream> = Vec::new();
        let mut accepted: Vec<UnixStream> = Vec::new();
        for step in steps {
            match step {
                Step::Packet(h, p) => {
                    if r.needs_reset() {
                        continue;
                    }
                    let n = p.len().min(0x10000);
                    r.send_raw(&h, &p[..n]);
                }
                Step::Ring { q, descs, heads, idx } => {
                    let d = &r.q[q];
                    for (i, &(a, l, f, n)) in descs.iter().enumerate() {
                        r.mem.write_obj(
                            crate::devices::virtio::test_util::desc(a, l, f, n),
                            GuestAddress(d.desc + 16 * i as u64),
                        ).unwrap();
                    }
                    for (i, &h) in heads.iter().enumerate() {
                        let slot = d.avail + 4 + 2 * u64::from((d.avail_idx + i as u16) % SIZE);
                        r.mem.write_obj(h, GuestAddress(slot)).unwrap();
                    }
                    r.mem.write_obj(idx, GuestAddress(d.avail + 2)).unwrap();
                    r.dev.queue_notify(q);
                }
                Step::OfferRx(n) => {
                    if !r.needs_reset() {
                        // Not parsed: after a random ring the buffers are anywhere.
                        r.offer_rx(n.min(SIZE / 2));
                        r.q[RX].take_used();
                    }
                }
                Step::HostClient(port) => {
                    if clients.len() < 12 {
                        if let Ok(mut c) = UnixStream::connect(&r.uds) {
                            c.set_nonblocking(true).unwrap();
                            let _ = c.write(format!("CONNECT {port}\n").as_bytes());
                            clients.push(c);
                        }
                    }
                }
                Step::HostWrite(i, n) => {
                    let data = pattern(n, 1);
                    let all = clients.iter_mut().chain(accepted.iter_mut());
                    if let Some(c) = all.into_iter().nth(i) {
                        let _ = c.write(&data);
                    }
                }
                Step::HostClose(i) => {
                    if i < clients.len() {
                        clients.remove(i);
                    } else if i - clients.len() < accepted.len() {
                        accepted.remove(i - clients.len());
                    }
                }
                Step::Event => r.dev.event(0),
                Step::Reset => {
                    r.dev.reset();
                    prop_assert_eq!(r.dev.stats().connections, 0);
                    prop_assert_eq!(r.dev.conns.len() + r.dev.pending.len() + r.dev.lingering.len(), 0);
                    r.activate();
                }
                Step::TransportReset => r.dev.transport_reset(),
            }
            for l in &listeners {
                while let Ok((s, _)) = l.accept() {
                    s.set_nonblocking(true).unwrap();
                    accepted.push(s);
                }
            }
            // Host readers read a little (some never do).
            for s in accepted.iter_mut().take(1) {
                let mut b = [0u8; 4096];
                let _ = s.read(&mut b);
            }
            let st = r.dev.stats();
            prop_assert!(st.connections <= 4);
            prop_assert!(st.handshakes <= 4);
            prop_assert!(st.lingering <= 4);
            // Host sockets: connections, handshakes, lingering closes.
            prop_assert!(r.dev.conns.len() + r.dev.pending.len() + r.dev.lingering.len() <= 3 * 4);
            prop_assert!(st.buffered_to_host <= 3 * 4 * (CONN_BUF_ALLOC as usize + 32));
            for hc in r.dev.conns.values() {
                prop_assert!(hc.to_host.len() <= CONN_BUF_ALLOC as usize + 32);
            }
            prop_assert!(st.control_queued <= CONTROL_SOFT_MAX + 8 * 4 + 8);
        }
        drop(clients);
        drop(accepted);
        r.dev.reset();
        let uds = r.uds.clone();
        drop(listeners);
        drop(r);
        for p in 1u32..3 {
            let _ = std::fs::remove_file(port_path(&uds, p));
        }
        prop_assert!(!uds.exists());
    }
}

#[test]
fn credit_update_threshold_is_reported_as_the_host_consumes() {
    let mut r = rig("credit");
    let l = UnixListener::bind(port_path(&r.uds, 84)).unwrap();
    r.offer_rx(32);
    let mut s = r.guest_connect(&l, 906, 84);
    let chunk = pattern(MAX_PAYLOAD as usize, 4);
    r.send(from_guest(Op::Rw, 906, 84, MAX_PAYLOAD, 0), &chunk);
    assert_eq!(read_exactly(&mut s, chunk.len()), chunk);
    let got = r.recv();
    let up: Vec<u32> = got
        .iter()
        .filter(|(h, _)| h.op == Op::CreditUpdate)
        .map(|(h, _)| h.fwd_cnt)
        .collect();
    assert_eq!(up, vec![CREDIT_UPDATE_THRESHOLD]);
    let _ = std::fs::remove_file(port_path(&r.uds, 84));
}

/// A fake guest echo server on port 5000 that behaves as Linux does with credit: it
/// consumes what it receives at once, tells the host its `fwd_cnt` in every packet
/// but sends a CREDIT_UPDATE only when less than 64 KiB of its buffer is untold, and
/// answers CREDIT_REQUEST; it echoes within the credit the host gave it.
#[derive(Default)]
struct EchoConn {
    /// Bytes received and not yet echoed.
    pending: VecDeque<u8>,
    /// Bytes received (the guest's fwd_cnt: consumed at once).
    received: u32,
    /// `received` as last told to the host.
    told: u32,
    /// Bytes echoed, and the host's credit as last heard.
    sent: u32,
    host_buf: u32,
    host_fwd: u32,
}

#[test]
fn many_connections_echo_both_ways_without_stalls() {
    const N: usize = 16;
    const LEN: usize = 300_000;
    let mut r = rig_with("many", 32);
    r.offer_rx(32);
    let uds = r.uds.clone();
    let clients: Vec<_> = (0..N)
        .map(|i| {
            let uds = uds.clone();
            std::thread::spawn(move || {
                let mut c = UnixStream::connect(&uds).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                c.write_all(b"CONNECT 5000\n").unwrap();
                let mut ok = Vec::new();
                let mut b = [0u8; 1];
                while !ok.ends_with(b"\n") {
                    assert_eq!(c.read(&mut b).unwrap(), 1);
                    ok.push(b[0]);
                }
                let data = pattern(LEN, i as u8);
                let mut w = c.try_clone().unwrap();
                let d = data.clone();
                let writer = std::thread::spawn(move || w.write_all(&d).unwrap());
                let mut back = vec![0u8; LEN];
                c.read_exact(&mut back).unwrap();
                writer.join().unwrap();
                back == data
            })
        })
        .collect();
    let mut conns: HashMap<u32, EchoConn> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !clients.iter().all(|t| t.is_finished()) {
        assert!(Instant::now() < deadline, "stalled");
        r.dev.event(0);
        r.offer_rx(32);
        let mut out: Vec<(Header, Vec<u8>)> = Vec::new();
        for (h, d) in r.recv() {
            let hp = h.src_port;
            match h.op {
                Op::Request => {
                    conns.insert(
                        hp,
                        EchoConn {
                            host_buf: h.buf_alloc,
                            host_fwd: h.fwd_cnt,
                            ..EchoConn::default()
                        },
                    );
                    out.push((from_guest(Op::Response, 5000, hp, 0, 0), vec![]));
                }
                Op::Rw | Op::CreditUpdate | Op::CreditRequest => {
                    let c = conns.get_mut(&hp).expect("known connection");
                    c.host_buf = h.buf_alloc;
                    c.host_fwd = h.fwd_cnt;
                    c.received = c.received.wrapping_add(d.len() as u32);
                    c.pending.extend(&d);
                    if h.op == Op::CreditRequest {
                        c.told = c.received;
                        out.push((
                            from_guest(Op::CreditUpdate, 5000, hp, 0, c.received),
                            vec![],
                        ));
                    }
                }
                Op::Shutdown => {
                    // A client done with its echo closed: the guest closes too.
                    let c = conns.remove(&hp).expect("known connection");
                    assert!(c.pending.is_empty(), "shut down with echo pending");
                    out.push((from_guest(Op::Rst, 5000, hp, 0, 0), vec![]));
                }
                op => panic!("unexpected {op:?}"),
            }
        }
        for (&hp, c) in conns.iter_mut() {
            // Echo within the host's credit, 4 KiB at a time as Linux's skbs.
            loop {
                let in_flight = c.sent.wrapping_sub(c.host_fwd);
                let credit = c.host_buf.saturating_sub(in_flight) as usize;
                let n = c.pending.len().min(credit).min(4096);
                if n == 0 {
                    break;
                }
                let chunk: Vec<u8> = c.pending.drain(..n).collect();
                c.sent = c.sent.wrapping_add(n as u32);
                c.told = c.received;
                out.push((from_guest(Op::Rw, 5000, hp, n as u32, c.received), chunk));
            }
            if GUEST_BUF - c.received.wrapping_sub(c.told) < 64 * 1024 {
                c.told = c.received;
                out.push((
                    from_guest(Op::CreditUpdate, 5000, hp, 0, c.received),
                    vec![],
                ));
            }
        }
        for (h, d) in out {
            r.send(h, &d);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for t in clients {
        assert!(t.join().unwrap(), "echo differs");
    }
    let s = r.dev.stats();
    assert_eq!(s.bytes_to_guest, (N * LEN) as u64);
    assert_eq!(s.bytes_to_host, (N * LEN) as u64);
    assert!(!r.needs_reset());
}

/// Reads `c` to its end while driving the device; the bytes.
fn read_all_driving(r: &mut Rig, c: &mut UnixStream) -> Vec<u8> {
    c.set_nonblocking(true).unwrap();
    let mut all = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            Instant::now() < deadline,
            "no EOF after {} bytes",
            all.len()
        );
        let mut b = vec![0u8; 65536];
        match c.read(&mut b) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("after {} bytes: {e}", all.len()),
        }
        r.dev.event(0);
        r.dev.queue_notify(RX);
    }
}

/// The guest sends a full credit the host reader has not taken yet and shuts SEND.
fn guest_fills_and_shuts(r: &mut Rig, hp: u32, gp: u32, seed: u8) -> Vec<u8> {
    let data = pattern(CONN_BUF_ALLOC as usize, seed);
    for chunk in data.chunks(MAX_PAYLOAD as usize) {
        r.send(from_guest(Op::Rw, gp, hp, chunk.len() as u32, 0), chunk);
    }
    r.send(
        Header {
            flags: SHUTDOWN_SEND,
            ..from_guest(Op::Shutdown, gp, hp, 0, 0)
        },
        &[],
    );
    data
}

#[test]
fn guest_rst_ending_a_closed_connection_keeps_bytes_the_host_has_not_read() {
    let mut r = rig("rstdrain");
    r.offer_rx(32);
    let (mut c, hp) = r.host_connect(69);
    let data = guest_fills_and_shuts(&mut r, hp, 69, 6);
    assert!(
        r.dev.stats().buffered_to_host > 0,
        "the socket must be full"
    );
    // The host shuts its write half: both halves are shut, SHUTDOWN both goes to the
    // guest, and Linux answers it with RST at once.
    c.shutdown(Shutdown::Write).unwrap();
    let got = r.recv_until(|h| h.op == Op::Shutdown);
    let sd = got.iter().find(|(h, _)| h.op == Op::Shutdown).unwrap().0;
    assert_eq!(sd.flags, SHUTDOWN_BOTH);
    r.send(from_guest(Op::Rst, 69, hp, 0, 0), &[]);
    assert_eq!(r.dev.stats().connections, 0);
    // Every byte still reaches the host reader, then EOF.
    let got = read_all_driving(&mut r, &mut c);
    assert!(got == data, "{} of {} bytes", got.len(), data.len());
    assert_eq!(r.dev.stats().lingering, 0);
}

#[test]
fn close_timeout_waits_while_the_host_still_takes_the_guests_last_bytes() {
    let mut r = rig("closewait");
    r.offer_rx(32);
    let (mut c, hp) = r.host_connect(71);
    // The host shuts its write half first (SHUTDOWN SEND to the guest) ...
    c.shutdown(Shutdown::Write).unwrap();
    r.recv_until(|h| h.op == Op::Shutdown);
    // ... then the guest sends its last credit's worth and shuts SEND: no data
    // either way any more (Closing), but the host has not read it all.
    let data = guest_fills_and_shuts(&mut r, hp, 71, 8);
    r.dev.event(0);
    let hc = r.dev.conns.values().next().expect("still open");
    assert!(!hc.to_host.is_empty());
    assert_eq!(hc.deadline, None, "no close timeout while bytes wait");
    let got = read_all_driving(&mut r, &mut c);
    assert!(got == data, "{} of {} bytes", got.len(), data.len());
    // Flushed: now the guest's RST is waited for, 2 s at most.
    let hc = r.dev.conns.values().next().expect("still open");
    assert!(hc.deadline.is_some());
}

#[test]
fn a_budget_hands_the_loop_back_and_the_device_wakes_itself_to_go_on() {
    let mut r = rig("budget");
    r.dev.budget = 4;
    let l = UnixListener::bind(port_path(&r.uds, 85)).unwrap();
    r.offer_rx(32);
    let mut s = r.guest_connect(&l, 907, 85);
    r.q[TX].take_used();
    // Ten packets queued at once: four are taken per turn.
    for i in 0..10u8 {
        r.mem
            .write_slice(&[i; 8], GuestAddress(TX_DATA + 0x100 * u64::from(i)))
            .unwrap();
        let h = from_guest(Op::Rw, 907, 85, 1, 0);
        r.mem
            .write_slice(&h.to_bytes(), GuestAddress(TX_HDR + 0x100 * u64::from(i)))
            .unwrap();
        r.q[TX].add_chain(&[
            (TX_HDR + 0x100 * u64::from(i), HEADER_LEN as u32, false),
            (TX_DATA + 0x100 * u64::from(i), 1, false),
        ]);
    }
    r.dev.queue_notify(TX);
    assert_eq!(r.q[TX].take_used().len(), 4);
    // The self-wake is what brings the device back: no notification, only events.
    r.dev.event(0);
    assert_eq!(r.q[TX].take_used().len(), 4);
    r.dev.event(0);
    assert_eq!(r.q[TX].take_used().len(), 2);
    assert_eq!(read_exactly(&mut s, 10), (0..10u8).collect::<Vec<_>>());
    // Host → guest the same way: 20 packets' worth, four per turn.
    s.write_all(&vec![7u8; 20 * 4096]).unwrap();
    let mut got = 0;
    let mut turns = 0;
    while got < 20 * 4096 {
        r.dev.event(0);
        let n = r.recv().iter().filter(|(h, _)| h.op == Op::Rw).count();
        assert!(n <= 4, "{n} packets in one turn");
        got += r.dev.stats().bytes_to_guest as usize - got;
        turns += 1;
        assert!(turns < 100);
    }
    assert!(turns >= 5);
    let _ = std::fs::remove_file(port_path(&r.uds, 85));
}
