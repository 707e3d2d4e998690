//! The control server: the listening socket and its clients as one event-loop handler.
//!
//! Everything is non-blocking: a client is read when readable and written when
//! writable; a request that needs the vCPUs (pause, resume, registers) is sent to
//! their mailboxes with reply callbacks that come back to the loop as messages, so a
//! slow vCPU, client or guest never blocks the loop. Clients are bounded
//! ([`MAX_CLIENTS`]; more connections are closed at once), and so is what one client
//! may buffer (the HTTP reader's limits).
#![forbid(unsafe_code)]

use std::any::Any;
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use vmm_sys_util::epoll::EventSet;

use super::api::{self, Api, Pending};
use super::http::{RequestReader, Response, READ_CHUNK};
use crate::event_loop::{self, EventHandler, HandlerId, LoopHandle, Ops};

/// Clients served at once.
pub const MAX_CLIENTS: usize = 64;
const LISTENER: u32 = 0;

struct Client {
    stream: UnixStream,
    reader: RequestReader,
    out: Vec<u8>,
    /// Waiting for the vCPUs to answer a request.
    waiting: bool,
    close_after_write: bool,
    watching_out: bool,
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
    api: Arc<Api>,
    loop_handle: LoopHandle,
    id: Option<HandlerId>,
}

impl ControlServer {
    pub fn new(listener: UnixListener, api: Arc<Api>, loop_handle: LoopHandle) -> Self {
        Self {
            listener,
            clients: BTreeMap::new(),
            next_id: 1,
            api,
            loop_handle,
            id: None,
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
            if self.clients.len() >= MAX_CLIENTS {
                log::warn!("control: {MAX_CLIENTS} clients connected; refusing another");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("control: {e}");
                continue;
            }
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if let Err(e) = ops.add(&stream, id, EventSet::IN | EventSet::READ_HANG_UP) {
                log::warn!("control: {e}");
                continue;
            }
            self.clients.insert(
                id,
                Client {
                    stream,
                    reader: RequestReader::default(),
                    out: Vec::new(),
                    waiting: false,
                    close_after_write: false,
                    watching_out: false,
                },
            );
        }
    }

    fn close(&mut self, id: u32, ops: &mut Ops<'_>) {
        if let Some(c) = self.clients.remove(&id) {
            let _ = ops.remove(&c.stream);
        }
    }

    fn on_client(&mut self, id: u32, events: EventSet, ops: &mut Ops<'_>) {
        if events.contains(EventSet::OUT) {
            self.flush(id, ops);
        }
        if !events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            return;
        }
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let mut buf = [0u8; READ_CHUNK];
        let mut eof = false;
        loop {
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    // Over the limits the reader keeps its error; `serve` answers it.
                    if c.reader.push(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        self.serve(id, ops);
        if eof {
            let idle = self
                .clients
                .get(&id)
                .is_some_and(|c| !c.waiting && c.out.is_empty());
            if idle {
                self.close(id, ops);
            } else if let Some(c) = self.clients.get_mut(&id) {
                c.close_after_write = true;
            }
        }
    }

    /// Handles the requests a client has sent, one at a time.
    fn serve(&mut self, id: u32, ops: &mut Ops<'_>) {
        loop {
            let Some(c) = self.clients.get_mut(&id) else {
                return;
            };
            if c.waiting || c.close_after_write && !c.out.is_empty() {
                return;
            }
            let request = match c.reader.next_request() {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    let r = e.response();
                    c.out.extend(r.to_bytes(false));
                    c.close_after_write = true;
                    self.flush(id, ops);
                    return;
                }
            };
            let keep_alive = request.keep_alive;
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
            match api::handle(&self.api, &request, Box::new(done)) {
                Pending::Done(response) => {
                    c.out.extend(response.to_bytes(keep_alive));
                    if !keep_alive {
                        c.close_after_write = true;
                    }
                    self.flush(id, ops);
                }
                Pending::Later => {
                    c.waiting = true;
                    return;
                }
            }
        }
    }

    /// Writes what is buffered for `id`; watches EPOLLOUT while some is left.
    fn flush(&mut self, id: u32, ops: &mut Ops<'_>) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => break,
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close(id, ops);
                    return;
                }
            }
        }
        if c.out.is_empty() && c.close_after_write && !c.waiting {
            self.close(id, ops);
            return;
        }
        let want_out = !c.out.is_empty();
        if want_out != c.watching_out {
            let mut set = EventSet::IN | EventSet::READ_HANG_UP;
            if want_out {
                set |= EventSet::OUT;
            }
            if ops.modify(&c.stream, id, set).is_ok() {
                c.watching_out = want_out;
            }
        }
    }
}

impl EventHandler for ControlServer {
    fn name(&self) -> &str {
        "control-server"
    }

    fn init(&mut self, ops: &mut Ops<'_>) -> Result<(), event_loop::Error> {
        self.id = Some(ops.id());
        ops.add(&self.listener, LISTENER, EventSet::IN)
    }

    fn handle(&mut self, data: u32, events: EventSet, ops: &mut Ops<'_>) {
        if data == LISTENER {
            self.accept(ops);
        } else {
            self.on_client(data, events, ops);
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
        c.out.extend(done.response.to_bytes(done.keep_alive));
        if !done.keep_alive {
            c.close_after_write = true;
        }
        let id = done.client;
        self.flush(id, ops);
        // Requests pipelined behind the one that waited.
        self.serve(id, ops);
    }
}
