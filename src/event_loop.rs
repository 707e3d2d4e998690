//! The event loop: one thread (`ferrite-events`) owning one epoll fd, and nothing but
//! mechanics. Everything that waits on an fd is an [`EventHandler`] that registers its
//! own fds, each with a [`Token`] carrying a payload of the handler's choosing, and may
//! add or remove fds (its own, or whole handlers) while the loop runs.
//!
//! * The reserved stop token is checked before anything else in each batch.
//! * Other threads reach the loop through a [`LoopHandle`]: `call` queues a closure
//!   that runs on the loop thread (adding a handler, delivering a message to one) and
//!   wakes the loop through an eventfd. A vCPU hands work over this way; it never
//!   touches epoll.
//! * A panic in a handler stops the VM with an error naming the handler; the loop then
//!   returns, so teardown never waits on a dead loop.
//!
//! rust-vmm's `event-manager` (0.4) was evaluated and not used; docs/DESIGN.md, "Event
//! loop", has the reasons: it dispatches a batch in epoll order with no way to see a
//! stop event first, an event for an fd whose subscriber was removed earlier in the
//! same batch hits an `expect` (a panic), and nothing stands between a panicking
//! subscriber and the loop thread.
#![forbid(unsafe_code)]

use std::any::Any;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::outcome::{StopSignal, VmOutcome};
use crate::threads::{Joinable, Joined};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the event loop's {what}")]
    Create {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("event loop: cannot {op} fd {fd} for {token:?}")]
    Ctl {
        op: &'static str,
        token: Token,
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot spawn the ferrite-events thread")]
    Spawn(#[source] std::io::Error),
    #[error("cannot signal the event loop ({what})")]
    Signal {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the ferrite-events thread panicked")]
    Panicked,
    #[error("the ferrite-events thread did not stop within {0:?}")]
    StopTimeout(Duration),
    #[error("the event loop has stopped")]
    Gone,
}

/// Identifies one registered handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HandlerId(u32);

/// What an epoll event is about, encoded in the event's 64-bit data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// Reserved: stop the loop. Checked first.
    Stop,
    /// Reserved: closures queued by [`LoopHandle::call`].
    Remote,
    /// A handler's fd; `data` is the handler's own payload (its token type, encoded).
    Handler { id: HandlerId, data: u32 },
}

const HANDLER_BIT: u64 = 1 << 63;

impl Token {
    pub fn to_data(self) -> u64 {
        match self {
            Token::Stop => 0,
            Token::Remote => 1,
            Token::Handler { id, data } => HANDLER_BIT | (u64::from(id.0) << 32) | u64::from(data),
        }
    }

    pub fn from_data(d: u64) -> Option<Self> {
        match d {
            0 => Some(Token::Stop),
            1 => Some(Token::Remote),
            d if d & HANDLER_BIT != 0 => Some(Token::Handler {
                id: HandlerId(((d & !HANDLER_BIT) >> 32) as u32),
                data: d as u32,
            }),
            _ => None,
        }
    }
}

/// Something that waits on fds in the loop.
pub trait EventHandler: Send {
    /// Names the handler in logs and errors.
    fn name(&self) -> &str;
    /// Called once on the loop thread when the handler is added: register fds here.
    fn init(&mut self, ops: &mut Ops<'_>) -> Result<(), Error>;
    /// One of the handler's fds is ready; `data` is the payload it registered.
    fn handle(&mut self, data: u32, events: EventSet, ops: &mut Ops<'_>);
    /// A message sent with [`Ctx::deliver`] (from another thread via [`LoopHandle`]).
    fn on_message(&mut self, msg: Box<dyn Any + Send>, ops: &mut Ops<'_>) {
        let _ = (msg, ops);
        log::warn!("event loop: {} ignores messages", self.name());
    }
}

/// What a handler may do while it handles an event.
pub struct Ops<'a> {
    epoll: &'a Epoll,
    id: HandlerId,
    fds: &'a mut Vec<RawFd>,
    stop: &'a StopSignal,
    remove_self: bool,
}

impl Ops<'_> {
    fn ctl(
        &self,
        op: ControlOperation,
        name: &'static str,
        fd: RawFd,
        data: u32,
        events: EventSet,
    ) -> Result<(), Error> {
        let token = Token::Handler { id: self.id, data };
        self.epoll
            .ctl(op, fd, EpollEvent::new(events, token.to_data()))
            .map_err(|source| Error::Ctl {
                op: name,
                token,
                fd,
                source,
            })
    }

    /// Watches `fd` for `events`; readiness arrives at `handle` with `data`.
    pub fn add(&mut self, fd: &impl AsRawFd, data: u32, events: EventSet) -> Result<(), Error> {
        let fd = fd.as_raw_fd();
        self.ctl(ControlOperation::Add, "add", fd, data, events)?;
        self.fds.push(fd);
        Ok(())
    }

    /// Changes the events or payload of a watched fd.
    pub fn modify(&mut self, fd: &impl AsRawFd, data: u32, events: EventSet) -> Result<(), Error> {
        self.ctl(
            ControlOperation::Modify,
            "modify",
            fd.as_raw_fd(),
            data,
            events,
        )
    }

    /// Stops watching `fd`.
    pub fn remove(&mut self, fd: &impl AsRawFd) -> Result<(), Error> {
        let fd = fd.as_raw_fd();
        self.fds.retain(|&f| f != fd);
        self.ctl(ControlOperation::Delete, "remove", fd, 0, EventSet::empty())
    }

    /// Ends the VM with `outcome` (first request wins).
    pub fn stop_vm(&self, outcome: VmOutcome) {
        self.stop.request(outcome);
    }

    /// Drops this handler (and unwatches its fds) once the current call returns.
    pub fn remove_self(&mut self) {
        self.remove_self = true;
    }

    pub fn id(&self) -> HandlerId {
        self.id
    }
}

struct Slot {
    handler: Box<dyn EventHandler>,
    fds: Vec<RawFd>,
}

type RemoteFn = Box<dyn FnOnce(&mut Ctx<'_>) + Send>;

struct Remote {
    queue: Mutex<Vec<RemoteFn>>,
    wake: EventFd,
}

/// The loop's state as seen by a remote closure.
pub struct Ctx<'a> {
    inner: &'a mut Inner,
}

impl Ctx<'_> {
    /// Adds a handler; its `init` runs now. Returns its id.
    pub fn add_handler(&mut self, handler: Box<dyn EventHandler>) -> Result<HandlerId, Error> {
        self.inner.add_handler(handler)
    }

    /// Removes a handler and unwatches its fds.
    pub fn remove_handler(&mut self, id: HandlerId) {
        self.inner.remove_handler(id);
    }

    /// Hands `msg` to a handler's `on_message`. False when there is no such handler.
    pub fn deliver(&mut self, id: HandlerId, msg: Box<dyn Any + Send>) -> bool {
        self.inner.dispatch(id, |h, ops| h.on_message(msg, ops))
    }

    pub fn stop_vm(&self, outcome: VmOutcome) {
        self.inner.stop.request(outcome);
    }
}

struct Inner {
    epoll: Epoll,
    stop: Arc<StopSignal>,
    handlers: BTreeMap<HandlerId, Slot>,
    next_id: u32,
    /// Set when a handler panicked: the loop ends after the current batch.
    broken: bool,
}

impl Inner {
    fn add_handler(&mut self, mut handler: Box<dyn EventHandler>) -> Result<HandlerId, Error> {
        let id = HandlerId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        let mut fds = Vec::new();
        let mut ops = Ops {
            epoll: &self.epoll,
            id,
            fds: &mut fds,
            stop: &self.stop,
            remove_self: false,
        };
        if let Err(e) = handler.init(&mut ops) {
            for fd in fds {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            return Err(e);
        }
        self.handlers.insert(id, Slot { handler, fds });
        Ok(id)
    }

    fn remove_handler(&mut self, id: HandlerId) {
        if let Some(slot) = self.handlers.remove(&id) {
            for fd in slot.fds {
                if let Err(e) = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                {
                    log::debug!(
                        "event loop: unwatching fd {fd} of {}: {e}",
                        slot.handler.name()
                    );
                }
            }
        }
    }

    /// Calls `f` on handler `id` behind an unwind boundary. A panic stops the VM with
    /// an error and marks the loop broken.
    fn dispatch(
        &mut self,
        id: HandlerId,
        f: impl FnOnce(&mut dyn EventHandler, &mut Ops<'_>),
    ) -> bool {
        let Some(slot) = self.handlers.get_mut(&id) else {
            return false;
        };
        let mut ops = Ops {
            epoll: &self.epoll,
            id,
            fds: &mut slot.fds,
            stop: &self.stop,
            remove_self: false,
        };
        let handler = &mut slot.handler;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            f(handler.as_mut(), &mut ops)
        }));
        let remove = ops.remove_self;
        if let Err(p) = result {
            let name = slot.handler.name().to_owned();
            self.stop.request(VmOutcome::Error(format!(
                "event loop: handler {name} panicked: {}",
                panic_message(&p)
            )));
            self.broken = true;
            return true;
        }
        if remove {
            self.remove_handler(id);
        }
        true
    }
}

fn panic_message(p: &Box<dyn Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// The loop before it runs: add handlers, then [`EventLoop::spawn`].
pub struct EventLoop {
    inner: Inner,
    stop_evt: EventFd,
    remote: Arc<Remote>,
    /// Install the loop's seccomp filter when the thread starts (else the owner installs
    /// it later, from the loop, with `seccomp::enter`).
    filter_at_start: bool,
}

/// Reaches a running loop from any thread.
#[derive(Clone)]
pub struct LoopHandle {
    remote: Arc<Remote>,
}

impl LoopHandle {
    /// Runs `f` on the loop thread, soon. Never blocks on the loop.
    pub fn call(&self, f: impl FnOnce(&mut Ctx<'_>) + Send + 'static) -> Result<(), Error> {
        self.remote
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(f));
        self.remote.wake.write(1).map_err(|source| Error::Signal {
            what: "remote wake-up",
            source,
        })
    }
}

/// Owns the running `ferrite-events` thread.
pub struct EventLoopHandle {
    stop_evt: EventFd,
    thread: Joinable,
    handle: LoopHandle,
}

impl EventLoop {
    pub fn new(stop: Arc<StopSignal>) -> Result<Self, Error> {
        let create = |what| move |source| Error::Create { what, source };
        let epoll = Epoll::new().map_err(create("epoll fd"))?;
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(create("stop eventfd"))?;
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(create("remote eventfd"))?;
        for (fd, token) in [
            (stop_evt.as_raw_fd(), Token::Stop),
            (wake.as_raw_fd(), Token::Remote),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token.to_data()),
                )
                .map_err(|source| Error::Ctl {
                    op: "add",
                    token,
                    fd,
                    source,
                })?;
        }
        Ok(Self {
            filter_at_start: true,
            inner: Inner {
                epoll,
                stop,
                handlers: BTreeMap::new(),
                next_id: 0,
                broken: false,
            },
            stop_evt,
            remote: Arc::new(Remote {
                queue: Mutex::new(Vec::new()),
                wake,
            }),
        })
    }

    /// Adds a handler before the loop runs (its `init` runs now, on this thread).
    pub fn add_handler(&mut self, handler: Box<dyn EventHandler>) -> Result<HandlerId, Error> {
        self.inner.add_handler(handler)
    }

    pub fn handle(&self) -> LoopHandle {
        LoopHandle {
            remote: self.remote.clone(),
        }
    }

    /// Leaves the loop thread unfiltered at start: its owner builds a VM on it first and
    /// installs the filter from the loop afterwards.
    pub fn filter_later(&mut self) {
        self.filter_at_start = false;
    }

    /// Starts the `ferrite-events` thread.
    pub fn spawn(self) -> Result<EventLoopHandle, Error> {
        let stop_evt = self.stop_evt.try_clone().map_err(|source| Error::Create {
            what: "stop eventfd clone",
            source,
        })?;
        let handle = self.handle();
        let stop = self.inner.stop.clone();
        let thread = Joinable::spawn("ferrite-events".into(), move || {
            if self.filter_at_start {
                crate::seccomp::enter(crate::seccomp::ThreadKind::EventLoop);
            }
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run()));
            if let Err(p) = r {
                stop.request(VmOutcome::Error(format!(
                    "event loop panicked: {}",
                    panic_message(&p)
                )));
            }
        })
        .map_err(Error::Spawn)?;
        Ok(EventLoopHandle {
            stop_evt,
            thread,
            handle,
        })
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 32];
        while !self.inner.broken {
            let n = match self.inner.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.inner.stop.request(VmOutcome::Error(format!(
                        "event loop: epoll_wait failed: {e}"
                    )));
                    return;
                }
            };
            let batch = &events[..n];
            if batch
                .iter()
                .any(|e| Token::from_data(e.data()) == Some(Token::Stop))
            {
                if let Err(e) = self.stop_evt.read() {
                    log::warn!("event loop: reading the stop eventfd failed: {e}");
                }
                log::debug!("event loop: stop received");
                return;
            }
            for ev in batch {
                if self.inner.broken {
                    break;
                }
                match Token::from_data(ev.data()) {
                    Some(Token::Stop) => {}
                    Some(Token::Remote) => self.run_remote(),
                    Some(Token::Handler { id, data }) => {
                        let set = ev.event_set();
                        // A handler removed earlier in this batch is simply gone.
                        self.inner.dispatch(id, |h, ops| h.handle(data, set, ops));
                    }
                    None => log::warn!("event loop: unknown token {:#x}", ev.data()),
                }
            }
        }
    }

    fn run_remote(&mut self) {
        match self.remote.wake.read() {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => log::warn!("event loop: reading the remote eventfd failed: {e}"),
        }
        let calls =
            std::mem::take(&mut *self.remote.queue.lock().unwrap_or_else(|p| p.into_inner()));
        for call in calls {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                call(&mut Ctx {
                    inner: &mut self.inner,
                })
            }));
            if let Err(p) = r {
                self.inner.stop.request(VmOutcome::Error(format!(
                    "event loop: remote call panicked: {}",
                    panic_message(&p)
                )));
                self.inner.broken = true;
                return;
            }
        }
    }
}

impl EventLoopHandle {
    pub fn handle(&self) -> LoopHandle {
        self.handle.clone()
    }

    /// Writes the stop event and waits up to `timeout` for the thread to end. On
    /// timeout the thread is left behind (the error says so).
    pub fn stop_and_join(self, timeout: Duration) -> Result<(), Error> {
        self.stop_evt.write(1).map_err(|source| Error::Signal {
            what: "stop",
            source,
        })?;
        match self.thread.join_until(Instant::now() + timeout) {
            Joined::Finished => Ok(()),
            Joined::Panicked => Err(Error::Panicked),
            Joined::TimedOut => Err(Error::StopTimeout(timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn tokens_round_trip() {
        let id = HandlerId(7);
        for t in [
            Token::Stop,
            Token::Remote,
            Token::Handler { id, data: 0 },
            Token::Handler {
                id: HandlerId(u32::MAX >> 1),
                data: u32::MAX,
            },
        ] {
            assert_eq!(Token::from_data(t.to_data()), Some(t));
        }
        assert_eq!(Token::from_data(77), None);
    }

    #[test]
    fn stop_event_ends_the_loop() {
        let stop = Arc::new(StopSignal::new());
        let el = EventLoop::new(stop.clone()).unwrap();
        let h = el.spawn().unwrap();
        h.stop_and_join(T).unwrap();
        assert!(!stop.is_stopping());
    }

    /// Counts events on its eventfd; after `limit` events it unwatches the fd and adds
    /// a second eventfd under another payload.
    struct Counter {
        evt: EventFd,
        second: EventFd,
        seen: Arc<AtomicUsize>,
        second_seen: Arc<AtomicUsize>,
        limit: usize,
    }

    impl EventHandler for Counter {
        fn name(&self) -> &str {
            "counter"
        }
        fn init(&mut self, ops: &mut Ops<'_>) -> Result<(), Error> {
            ops.add(&self.evt, 1, EventSet::IN)
        }
        fn handle(&mut self, data: u32, _: EventSet, ops: &mut Ops<'_>) {
            match data {
                1 => {
                    self.evt.read().unwrap();
                    if self.seen.fetch_add(1, Ordering::SeqCst) + 1 == self.limit {
                        ops.remove(&self.evt).unwrap();
                        ops.add(&self.second, 2, EventSet::IN).unwrap();
                    }
                }
                2 => {
                    self.second.read().unwrap();
                    self.second_seen.fetch_add(1, Ordering::SeqCst);
                    ops.remove_self();
                }
                other => panic!("unexpected payload {other}"),
            }
        }
    }

    fn wait_until(f: impl Fn() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(start.elapsed() < T, "condition not met within {T:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn handlers_add_and_remove_fds_while_running() {
        let stop = Arc::new(StopSignal::new());
        let el = EventLoop::new(stop.clone()).unwrap();
        let loop_handle = el.handle();
        let h = el.spawn().unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let second = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (w1, w2) = (evt.try_clone().unwrap(), second.try_clone().unwrap());
        let seen = Arc::new(AtomicUsize::new(0));
        let second_seen = Arc::new(AtomicUsize::new(0));
        let counter = Counter {
            evt,
            second,
            seen: seen.clone(),
            second_seen: second_seen.clone(),
            limit: 3,
        };
        // Added from another thread while the loop runs.
        loop_handle
            .call(move |ctx| {
                ctx.add_handler(Box::new(counter)).unwrap();
            })
            .unwrap();
        for i in 1..=3 {
            w1.write(1).unwrap();
            wait_until(|| seen.load(Ordering::SeqCst) == i);
        }
        // The first fd is no longer watched: further writes are not seen.
        w1.write(1).unwrap();
        w2.write(1).unwrap();
        wait_until(|| second_seen.load(Ordering::SeqCst) == 1);
        assert_eq!(seen.load(Ordering::SeqCst), 3);
        // The handler removed itself: its second fd is no longer watched either.
        w2.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(second_seen.load(Ordering::SeqCst), 1);
        h.stop_and_join(T).unwrap();
        assert!(!stop.is_stopping());
    }

    struct Panicker(EventFd);
    impl EventHandler for Panicker {
        fn name(&self) -> &str {
            "panicker"
        }
        fn init(&mut self, ops: &mut Ops<'_>) -> Result<(), Error> {
            ops.add(&self.0, 0, EventSet::IN)
        }
        fn handle(&mut self, _: u32, _: EventSet, _: &mut Ops<'_>) {
            panic!("deliberate test panic");
        }
    }

    #[test]
    fn a_panicking_handler_stops_the_vm_with_an_error() {
        let stop = Arc::new(StopSignal::new());
        let mut el = EventLoop::new(stop.clone()).unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let w = evt.try_clone().unwrap();
        el.add_handler(Box::new(Panicker(evt))).unwrap();
        let h = el.spawn().unwrap();
        w.write(1).unwrap();
        match stop.wait() {
            VmOutcome::Error(m) => {
                assert!(m.contains("panicker") && m.contains("deliberate"), "{m}")
            }
            o => panic!("unexpected outcome {o:?}"),
        }
        // The loop has ended on its own; stopping it is still clean and bounded.
        h.stop_and_join(T).unwrap();
    }

    #[test]
    fn messages_reach_a_handler() {
        struct Sink(Arc<Mutex<Vec<u32>>>);
        impl EventHandler for Sink {
            fn name(&self) -> &str {
                "sink"
            }
            fn init(&mut self, _: &mut Ops<'_>) -> Result<(), Error> {
                Ok(())
            }
            fn handle(&mut self, _: u32, _: EventSet, _: &mut Ops<'_>) {}
            fn on_message(&mut self, msg: Box<dyn Any + Send>, _: &mut Ops<'_>) {
                self.0.lock().unwrap().push(*msg.downcast::<u32>().unwrap());
            }
        }
        let stop = Arc::new(StopSignal::new());
        let mut el = EventLoop::new(stop).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let id = el.add_handler(Box::new(Sink(got.clone()))).unwrap();
        let lh = el.handle();
        let h = el.spawn().unwrap();
        for v in [5u32, 6] {
            lh.call(move |ctx| {
                assert!(ctx.deliver(id, Box::new(v)));
            })
            .unwrap();
        }
        wait_until(|| got.lock().unwrap().len() == 2);
        assert_eq!(*got.lock().unwrap(), vec![5, 6]);
        h.stop_and_join(T).unwrap();
    }
}
