//! The control server: the listening socket and its clients as one event-loop handler.
//!
//! Everything is non-blocking: a client is read when readable and written when
//! writable; a request that needs the vCPUs (pause, resume, registers) is sent to
//! their mailboxes with reply callbacks that come back to the loop as messages, so a
//! slow vCPU, client or guest never blocks the loop.
//!
//! Limits (docs/DESIGN.md, "Control server limits"):
//! * Reading: at most [`READ_CHUNK`] (and what the reader has room for) at a time, the
//!   complete requests served before the next read, so pipelined input of any length
//!   is served in order. A client is not read while a vCPU request of its is pending,
//!   while its unsent output is above [`CLIENT_OUTPUT_BOUND`] (backpressure: the next
//!   request starts only below it, so a client holds at most that plus one answer),
//!   or after it half-closed.
//! * Total output: while all clients together hold more than [`TOTAL_OUTPUT_BOUND`]
//!   unsent, every request but `PUT /vm/stop` and `GET /vm` is answered 503.
//! * Clients: [`MAX_CLIENTS`], then [`RESERVED_CLIENTS`] more that are served one
//!   `PUT /vm/stop` or `GET /vm` (anything else: 503); when those are full too, the
//!   client idle longest (else the one whose request has been under way longest) is
//!   closed to make room; when every client awaits the vCPUs or has output pending,
//!   the newcomer is answered 503 and closed (`ferrite stop` retries on 503).
//! * Timeouts ([`Limits`]): idle (no request under way) [`IDLE_TIMEOUT`]; a request
//!   not complete [`READ_TIMEOUT`] after its first byte (408); output with no write
//!   progress for [`WRITE_TIMEOUT`]. A periodic timerfd, armed only while clients are
//!   connected, checks them.
#![forbid(unsafe_code)]

use std::any::Any;
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::http::{Request, RequestReader, Response, CONTINUE, READ_CHUNK};
use super::service::{Pending, Service};
use crate::event_loop::{self, EventHandler, HandlerId, LoopHandle, Ops};
use crate::ratelimit::RateLimit;

/// Clients served at once with the whole API.
pub const MAX_CLIENTS: usize = 64;
/// Further clients accepted when [`MAX_CLIENTS`] are connected; each is served one
/// request, and only `PUT /vm/stop` or `GET /vm` (others get 503).
pub const RESERVED_CLIENTS: usize = 4;
/// A client with no request under way and nothing to send is closed after this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A request must be complete this long after its first byte (else 408, closed).
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A client whose pending output sees no write progress for this long is closed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The next request of a client is not started while more than this of its output
/// is unsent (its socket is not read either).
pub const CLIENT_OUTPUT_BOUND: usize = 64 * 1024;
/// While all clients together have more than this unsent, requests other than
/// `PUT /vm/stop` and `GET /vm` are answered 503.
pub const TOTAL_OUTPUT_BOUND: usize = 2 * 1024 * 1024;
/// The "clients connected" warning is logged at most once per this interval.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Most chunks read from one client per readiness event (fairness between clients).
const READS_PER_EVENT: usize = 16;

const LISTENER: u32 = 0;
const TIMER: u32 = 1;
const FIRST_CLIENT: u32 = 2;

/// The control server's timeouts. [`Limits::from_env`] lets tests shorten them
/// (`FERRITE_CONTROL_IDLE_MS`, `FERRITE_CONTROL_READ_MS`, `FERRITE_CONTROL_WRITE_MS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub idle: Duration,
    pub read: Duration,
    pub write: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            idle: IDLE_TIMEOUT,
            read: READ_TIMEOUT,
            write: WRITE_TIMEOUT,
        }
    }
}

impl Limits {
    /// The defaults, each replaced by its environment variable (milliseconds,
    /// 1..=86 400 000) when that is set and valid; an invalid value is logged and
    /// ignored.
    pub fn from_env() -> Limits {
        Limits::from_env_over(Limits::default())
    }

    /// [`Limits::from_env`] over other defaults.
    pub fn from_env_over(mut l: Limits) -> Limits {
        for (var, slot) in [
            ("FERRITE_CONTROL_IDLE_MS", &mut l.idle),
            ("FERRITE_CONTROL_READ_MS", &mut l.read),
            ("FERRITE_CONTROL_WRITE_MS", &mut l.write),
        ] {
            let Some(v) = std::env::var_os(var) else {
                continue;
            };
            match v.to_str().and_then(|s| s.parse::<u64>().ok()) {
                Some(ms @ 1..=86_400_000) => *slot = Duration::from_millis(ms),
                _ => log::warn!("control: ignoring {var}={v:?} (milliseconds, 1..=86400000)"),
            }
        }
        l
    }

    /// How often the timeouts are checked: a quarter of the shortest, 10 ms ..= 1 s.
    pub fn tick(&self) -> Duration {
        (self.idle.min(self.read).min(self.write) / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

/// Why a client's time is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Connected with nothing under way for [`Limits::idle`].
    Idle,
    /// A request begun and not complete within [`Limits::read`].
    Read,
    /// Output pending with no write progress for [`Limits::write`].
    Write,
}

/// The times a client's timeouts are measured from.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Connected, or last request complete, or last write progress.
    pub active: Instant,
    /// The first byte of the request under way arrived (while Ferrite reads it).
    pub request: Option<Instant>,
    /// Output became pending, or last write progress.
    pub output: Instant,
}

impl Clock {
    pub fn new(now: Instant) -> Clock {
        Clock {
            active: now,
            request: None,
            output: now,
        }
    }

    /// Whether a client is out of time at `now`. `reading`: Ferrite reads it (the read
    /// timeout runs only then); `idle`: no request under way, nothing pending;
    /// `output`: unsent output.
    pub fn expired(
        &self,
        now: Instant,
        limits: &Limits,
        reading: bool,
        idle: bool,
        output: bool,
    ) -> Option<Expiry> {
        let since = |t: Instant| now.saturating_duration_since(t);
        if output && since(self.output) >= limits.write {
            return Some(Expiry::Write);
        }
        if reading {
            if let Some(t) = self.request {
                if since(t) >= limits.read {
                    return Some(Expiry::Read);
                }
            }
        }
        if idle && since(self.active) >= limits.idle {
            return Some(Expiry::Idle);
        }
        None
    }
}

/// What to do with a request, given the connection and the output pending in all.
#[derive(Debug, PartialEq)]
pub enum Admit {
    Serve,
    Busy(String),
}

/// Decides whether `req` is served: on a reserved connection only the essential
/// requests are; above [`TOTAL_OUTPUT_BOUND`] of pending output, likewise.
pub fn admit(req: &Request, service: &dyn Service, reserved: bool, total_output: usize) -> Admit {
    if service.is_essential(req) {
        return Admit::Serve;
    }
    if reserved {
        return Admit::Busy(format!(
            "the control server is busy ({MAX_CLIENTS} clients connected): this connection \
             serves only {}; retry later",
            service.essential_names()
        ));
    }
    if total_output > TOTAL_OUTPUT_BOUND {
        return Admit::Busy(format!(
            "the control server is busy: {total_output} bytes of answers wait for clients \
             to read them (limit {TOTAL_OUTPUT_BOUND}); retry later"
        ));
    }
    Admit::Serve
}

struct Client {
    stream: UnixStream,
    reader: RequestReader,
    out: Vec<u8>,
    /// One of the [`RESERVED_CLIENTS`]: one essential request, then closed.
    reserved: bool,
    /// Waiting for the vCPUs to answer a request.
    waiting: bool,
    /// The peer shut its side (read returned 0): nothing more to read.
    eof: bool,
    close_after_write: bool,
    /// The events currently watched.
    interest: EventSet,
    clock: Clock,
}

impl Client {
    fn new(stream: UnixStream, reserved: bool, now: Instant) -> Client {
        Client {
            stream,
            reader: RequestReader::default(),
            out: Vec::new(),
            reserved,
            waiting: false,
            eof: false,
            close_after_write: false,
            interest: EventSet::IN | EventSet::READ_HANG_UP,
            clock: Clock::new(now),
        }
    }

    /// Whether the socket is read now.
    fn reading(&self) -> bool {
        !self.eof
            && !self.close_after_write
            && !self.waiting
            && self.out.len() <= CLIENT_OUTPUT_BOUND
            && self.reader.error().is_none()
    }

    /// Nothing under way: no request begun, nothing to send, no vCPU answer awaited.
    fn idle(&self) -> bool {
        !self.waiting && self.out.is_empty() && self.reader.is_idle()
    }

    fn queue(&mut self, bytes: &[u8], now: Instant) {
        if self.out.is_empty() {
            self.clock.output = now;
        }
        self.out.extend_from_slice(bytes);
    }
}

/// A reply from a vCPU (or other async work) for client `client`.
pub struct Completion {
    pub client: u32,
    pub response: Response,
    pub keep_alive: bool,
}

pub struct ControlServer {
    listener: UnixListener,
    clients: BTreeMap<u32, Client>,
    next_id: u32,
    api: Arc<dyn Service>,
    loop_handle: LoopHandle,
    id: Option<HandlerId>,
    limits: Limits,
    timer: Option<TimerFd>,
    timer_armed: bool,
    full_warning: RateLimit,
}

impl ControlServer {
    /// A server with the timeouts of [`Limits::from_env`].
    pub fn new(listener: UnixListener, api: Arc<dyn Service>, loop_handle: LoopHandle) -> Self {
        Self::with_limits(listener, api, loop_handle, Limits::from_env())
    }

    pub fn with_limits(
        listener: UnixListener,
        api: Arc<dyn Service>,
        loop_handle: LoopHandle,
        limits: Limits,
    ) -> Self {
        Self {
            listener,
            clients: BTreeMap::new(),
            next_id: FIRST_CLIENT,
            api,
            loop_handle,
            id: None,
            limits,
            timer: None,
            timer_armed: false,
            full_warning: RateLimit::new(WARN_INTERVAL),
        }
    }

    fn total_output(&self) -> usize {
        self.clients.values().map(|c| c.out.len()).sum()
    }

    fn new_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = match self.next_id.checked_add(1) {
                Some(n) => n,
                None => FIRST_CLIENT,
            };
            if !self.clients.contains_key(&id) {
                return id;
            }
        }
    }

    fn warn_full(&mut self, what: &str) {
        if let Some(suppressed) = self.full_warning.allow(Instant::now()) {
            let more = if suppressed > 0 {
                format!(" ({suppressed} more such connections since the last warning)")
            } else {
                String::new()
            };
            log::warn!(
                "control: {} clients connected; {what}{more}",
                self.clients.len()
            );
        }
    }

    fn accept(&mut self, ops: &mut Ops<'_>) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("control: accept failed: {e}");
                    return;
                }
            };
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("control: {e}");
                continue;
            }
            let now = Instant::now();
            let regular = self.clients.values().filter(|c| !c.reserved).count();
            let reserved = if regular < MAX_CLIENTS {
                false
            } else if self.clients.len() < MAX_CLIENTS + RESERVED_CLIENTS {
                self.warn_full("serving another one PUT /vm/stop or GET /vm only");
                true
            } else {
                // Every slot taken: make room by closing the client idle longest, or
                // else the one whose request has been under way longest (slow drip).
                match self.victim() {
                    Some((id, reserved)) => {
                        self.warn_full("closing the one idle (or dripping) longest for a new one");
                        self.close(id, ops);
                        reserved
                    }
                    None => {
                        self.warn_full("answering another one 503");
                        refuse(stream, self.api.as_ref());
                        continue;
                    }
                }
            };
            let id = self.new_id();
            let client = Client::new(stream, reserved, now);
            if let Err(e) = ops.add(&client.stream, id, client.interest) {
                log::warn!("control: {e}");
                continue;
            }
            self.clients.insert(id, client);
            self.arm_timer();
        }
    }

    /// The client to close for a newcomer when every slot is taken: the one idle
    /// longest, else the one read longest without completing its request. Clients
    /// awaiting the vCPUs or with output pending are never chosen.
    fn victim(&self) -> Option<(u32, bool)> {
        let idle = self
            .clients
            .iter()
            .filter(|(_, c)| c.idle())
            .min_by_key(|(_, c)| c.clock.active);
        let dripping = || {
            self.clients
                .iter()
                .filter(|(_, c)| c.reading() && c.out.is_empty())
                .filter_map(|(id, c)| Some((id, c, c.clock.request?)))
                .min_by_key(|&(_, _, started)| started)
                .map(|(id, c, _)| (id, c))
        };
        idle.or_else(dripping).map(|(&id, c)| (id, c.reserved))
    }

    fn close(&mut self, id: u32, ops: &mut Ops<'_>) {
        if let Some(c) = self.clients.remove(&id) {
            let _ = ops.remove(&c.stream);
        }
    }

    fn on_client(&mut self, id: u32, events: EventSet, ops: &mut Ops<'_>) {
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) && !c.reading() {
            // The peer is gone for good (or the socket failed): no one can read what
            // would be sent, and epoll reports this until the fd is closed.
            self.close(id, ops);
            return;
        }
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP)
            && !self.read(id, ops)
        {
            return;
        }
        self.progress(id, ops);
    }

    /// Reads at most [`READS_PER_EVENT`] chunks, serving after each. False if the
    /// client was closed.
    fn read(&mut self, id: u32, ops: &mut Ops<'_>) -> bool {
        let mut buf = [0u8; READ_CHUNK];
        for _ in 0..READS_PER_EVENT {
            let Some(c) = self.clients.get_mut(&id) else {
                return false;
            };
            if !c.reading() {
                break;
            }
            let room = c.reader.room().min(READ_CHUNK);
            if room == 0 {
                break;
            }
            match c.stream.read(&mut buf[..room]) {
                Ok(0) => {
                    c.eof = true;
                    break;
                }
                Ok(n) => {
                    if c.reader.is_idle() {
                        c.clock.request = Some(Instant::now());
                    }
                    // Within `room`, so this cannot fail; a failed reader is answered
                    // by `serve`.
                    let _ = c.reader.push(&buf[..n]);
                    self.serve(id);
                    if !self.flush(id, ops) {
                        return false;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close(id, ops);
                    return false;
                }
            }
        }
        true
    }

    /// Serves the complete requests a client has sent, one at a time, until one waits
    /// for the vCPUs or its output is above [`CLIENT_OUTPUT_BOUND`]. True if it
    /// served any.
    fn serve(&mut self, id: u32) -> bool {
        let mut served = false;
        loop {
            let total = self.total_output();
            let Some(c) = self.clients.get_mut(&id) else {
                return served;
            };
            if c.waiting || c.close_after_write || c.out.len() > CLIENT_OUTPUT_BOUND {
                break;
            }
            let now = Instant::now();
            let request = match c.reader.next_request() {
                Ok(Some(r)) => r,
                Ok(None) => {
                    if c.reader.take_continue() {
                        c.queue(CONTINUE, now);
                    }
                    break;
                }
                Err(e) => {
                    c.queue(
                        &self.api.error(e.status(), &e.to_string()).to_bytes(false),
                        now,
                    );
                    c.close_after_write = true;
                    break;
                }
            };
            served = true;
            c.clock.active = now;
            c.clock.request = (!c.reader.is_idle()).then_some(now);
            // A reserved connection is served one request.
            let keep_alive = request.keep_alive && !c.reserved;
            if !keep_alive {
                c.close_after_write = true;
            }
            if let Admit::Busy(msg) = admit(&request, self.api.as_ref(), c.reserved, total) {
                c.queue(&self.api.error(503, &msg).to_bytes(keep_alive), now);
                continue;
            }
            let server = self.id;
            let lh = self.loop_handle.clone();
            let done = move |response: Response| {
                if let Some(server) = server {
                    let _ = lh.call(move |ctx| {
                        ctx.deliver(
                            server,
                            Box::new(Completion {
                                client: id,
                                response,
                                keep_alive,
                            }),
                        );
                    });
                }
            };
            match self.api.clone().handle(&request, Box::new(done)) {
                Pending::Done(response) => c.queue(&response.to_bytes(keep_alive), now),
                Pending::Later => c.waiting = true,
            }
        }
        if let Some(c) = self.clients.get_mut(&id) {
            if c.reader.is_idle() {
                c.clock.request = None;
            }
        }
        served
    }

    /// Writes what is buffered for `id`. False if the client was closed.
    fn flush(&mut self, id: u32, ops: &mut Ops<'_>) -> bool {
        let Some(c) = self.clients.get_mut(&id) else {
            return false;
        };
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => break,
                Ok(n) => {
                    c.out.drain(..n);
                    let now = Instant::now();
                    c.clock.output = now;
                    c.clock.active = now;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close(id, ops);
                    return false;
                }
            }
        }
        true
    }

    /// Writes, serves what backpressure held back, and then closes the client or
    /// watches the events its state needs.
    fn progress(&mut self, id: u32, ops: &mut Ops<'_>) {
        // Ends: each round serves at least one buffered request (at most MAX_BUFFERED
        // bytes of them) or stops.
        loop {
            if !self.flush(id, ops) {
                return;
            }
            if !self.serve(id) {
                break;
            }
        }
        // What the last round queued without serving (a 100 Continue, an error).
        if !self.flush(id, ops) {
            return;
        }
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let done = c.out.is_empty() && !c.waiting && (c.close_after_write || c.eof);
        if done {
            self.close(id, ops);
            return;
        }
        let mut want = EventSet::empty();
        if c.reading() {
            want |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        if !c.out.is_empty() {
            want |= EventSet::OUT;
        }
        if want != c.interest {
            match ops.modify(&c.stream, id, want) {
                Ok(()) => c.interest = want,
                Err(e) => {
                    log::warn!("control: {e}");
                    self.close(id, ops);
                }
            }
        }
    }

    fn arm_timer(&mut self) {
        if self.timer_armed {
            return;
        }
        let Some(t) = self.timer.as_mut() else {
            return;
        };
        let tick = self.limits.tick();
        match t.reset(tick, Some(tick)) {
            Ok(()) => self.timer_armed = true,
            Err(e) => log::warn!("control: cannot arm the client timer: {e}"),
        }
    }

    /// The periodic check: closes the clients out of time; disarms the timer when no
    /// client is left.
    fn on_timer(&mut self, ops: &mut Ops<'_>) {
        if let Some(t) = self.timer.as_mut() {
            // Readable (it expired) and re-armed only while disarmed, so this read
            // does not block.
            let _ = t.wait();
        }
        let now = Instant::now();
        let mut expired = Vec::new();
        for (&id, c) in self.clients.iter_mut() {
            let reading = c.reading();
            if !reading && c.clock.request.is_some() {
                // The read timeout runs only while Ferrite reads this client.
                c.clock.request = Some(now);
            }
            if let Some(why) =
                c.clock
                    .expired(now, &self.limits, reading, c.idle(), !c.out.is_empty())
            {
                expired.push((id, why));
            }
        }
        for (id, why) in expired {
            if let Some(c) = self.clients.get_mut(&id) {
                match why {
                    Expiry::Read => {
                        log::debug!("control: client {id}: request incomplete; closing");
                        if c.out.is_empty() {
                            let msg = format!(
                                "the request was not complete within {} ms of its first byte",
                                self.limits.read.as_millis()
                            );
                            let _ = c.stream.write(&self.api.error(408, &msg).to_bytes(false));
                        }
                    }
                    Expiry::Write => {
                        log::debug!("control: client {id} read none of its answers; closing")
                    }
                    Expiry::Idle => log::debug!("control: client {id} idle; closing"),
                }
            }
            self.close(id, ops);
        }
        if self.clients.is_empty() && self.timer_armed {
            if let Some(t) = self.timer.as_mut() {
                if t.clear().is_ok() {
                    self.timer_armed = false;
                }
            }
        }
    }
}

/// Answers a connection there is no room for with 503 and closes it. The socket is
/// new and empty, so the short answer fits in its buffer.
fn refuse(mut stream: UnixStream, service: &dyn Service) {
    let r = service.error(
        503,
        &format!(
            "the control server is busy: {} clients connected, each awaiting an answer; \
             retry later",
            MAX_CLIENTS + RESERVED_CLIENTS
        ),
    );
    let _ = stream.write(&r.to_bytes(false));
}

impl EventHandler for ControlServer {
    fn name(&self) -> &str {
        "control-server"
    }

    fn init(&mut self, ops: &mut Ops<'_>) -> Result<(), event_loop::Error> {
        self.id = Some(ops.id());
        let timer = TimerFd::new().map_err(|e| event_loop::Error::Create {
            what: "control client timer",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        ops.add(&timer, TIMER, EventSet::IN)?;
        self.timer = Some(timer);
        ops.add(&self.listener, LISTENER, EventSet::IN)
    }

    fn handle(&mut self, data: u32, events: EventSet, ops: &mut Ops<'_>) {
        match data {
            LISTENER => self.accept(ops),
            TIMER => self.on_timer(ops),
            id => self.on_client(id, events, ops),
        }
    }

    fn on_message(&mut self, msg: Box<dyn Any + Send>, ops: &mut Ops<'_>) {
        let Ok(done) = msg.downcast::<Completion>() else {
            return;
        };
        let Some(c) = self.clients.get_mut(&done.client) else {
            return;
        };
        c.waiting = false;
        c.queue(&done.response.to_bytes(done.keep_alive), Instant::now());
        if !done.keep_alive {
            c.close_after_write = true;
        }
        // Writes it, and serves the requests pipelined behind the one that waited.
        self.progress(done.client, ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::http::Method;

    fn req(method: Method, path: &str) -> Request {
        Request {
            method,
            path: path.to_owned(),
            query: None,
            body: Vec::new(),
            keep_alive: true,
        }
    }

    /// The native API's choice of essential requests, without a VM.
    struct Native;
    impl Service for Native {
        fn handle(self: Arc<Self>, _: &Request, _: crate::control::service::Done) -> Pending {
            Pending::Done(Response::no_content())
        }
        fn is_essential(&self, req: &Request) -> bool {
            crate::control::api::is_essential(req)
        }
        fn essential_names(&self) -> &'static str {
            "PUT /vm/stop and GET /vm"
        }
    }

    #[test]
    fn stop_and_info_are_served_on_reserved_connections_and_when_output_is_full() {
        let stop = req(Method::Put, "/vm/stop");
        let info = req(Method::Get, "/vm/");
        let stats = req(Method::Get, "/vm/stats");
        let pause = req(Method::Put, "/vm/pause");
        for r in [&stop, &info, &req(Method::Put, "//vm//stop/")] {
            assert_eq!(admit(r, &Native, true, usize::MAX), Admit::Serve, "{r:?}");
        }
        for r in [&stats, &pause, &req(Method::Get, "/vm/stop")] {
            let Admit::Busy(msg) = admit(r, &Native, true, 0) else {
                panic!("{r:?} served on a reserved connection");
            };
            assert!(msg.contains("PUT /vm/stop"), "{msg}");
        }
        assert_eq!(
            admit(&stats, &Native, false, TOTAL_OUTPUT_BOUND),
            Admit::Serve
        );
        let Admit::Busy(msg) = admit(&stats, &Native, false, TOTAL_OUTPUT_BOUND + 1) else {
            panic!("served above the total output bound");
        };
        assert!(msg.contains(&TOTAL_OUTPUT_BOUND.to_string()), "{msg}");
        assert_eq!(
            admit(&stop, &Native, false, TOTAL_OUTPUT_BOUND + 1),
            Admit::Serve
        );
    }

    #[test]
    fn timeouts_by_injected_clock() {
        let l = Limits {
            idle: Duration::from_secs(60),
            read: Duration::from_secs(10),
            write: Duration::from_secs(10),
        };
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut c = Clock::new(t0);
        // Idle: only when nothing is under way.
        assert_eq!(c.expired(at(59), &l, true, true, false), None);
        assert_eq!(c.expired(at(60), &l, true, true, false), Some(Expiry::Idle));
        assert_eq!(c.expired(at(600), &l, true, false, false), None);
        // A slow-drip head or a short body: read timeout from the first byte.
        c.request = Some(at(5));
        assert_eq!(c.expired(at(14), &l, true, false, false), None);
        assert_eq!(
            c.expired(at(15), &l, true, false, false),
            Some(Expiry::Read)
        );
        // Not while Ferrite holds off reading (backpressure, vCPUs).
        assert_eq!(c.expired(at(15), &l, false, false, false), None);
        // Output without progress.
        c.output = at(20);
        assert_eq!(c.expired(at(29), &l, false, false, true), None);
        assert_eq!(
            c.expired(at(30), &l, false, false, true),
            Some(Expiry::Write)
        );
        // A clock going backwards never expires anything.
        let c = Clock::new(at(100));
        assert_eq!(c.expired(at(1), &l, true, true, true), None);
    }

    #[test]
    fn limits_tick_is_a_quarter_of_the_shortest_within_bounds() {
        assert_eq!(Limits::default().tick(), Duration::from_secs(1));
        let l = Limits {
            idle: Duration::from_millis(400),
            read: Duration::from_millis(800),
            write: Duration::from_secs(10),
        };
        assert_eq!(l.tick(), Duration::from_millis(100));
        let l = Limits {
            idle: Duration::from_millis(1),
            ..l
        };
        assert_eq!(l.tick(), Duration::from_millis(10));
    }
}
