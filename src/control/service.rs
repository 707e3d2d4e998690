//! What a control server serves: [`Service`] routes one parsed request to an answer,
//! now ([`Pending::Done`]) or later through a [`Done`] callback. The native API
//! ([`super::api::Api`]) and the Firecracker-compatible one both implement it, so one
//! server (limits, timeouts, backpressure) fronts either.
#![forbid(unsafe_code)]

use std::sync::Arc;

use super::http::{Request, Response};

/// Answers a request later (called once, from any thread).
pub type Done = Box<dyn FnOnce(Response) + Send>;

/// The answer to a request, or a promise to call [`Done`].
pub enum Pending {
    Done(Response),
    Later,
}

/// A request router behind a control socket.
///
/// Worst caller: any local process that can connect (the socket is 0600, so the owner
/// or root): the server bounds what it reads and buffers, the service must answer every
/// body it is given without panicking.
pub trait Service: Send + Sync {
    /// Routes `req`; answers now or calls `done` exactly once later.
    fn handle(self: Arc<Self>, req: &Request, done: Done) -> Pending;

    /// Whether `req` is still served when the server is full or overloaded: small
    /// answers with which the owner can always see and stop the VM.
    fn is_essential(&self, req: &Request) -> bool;

    /// The requests [`Self::is_essential`] accepts, for the busy message.
    fn essential_names(&self) -> &'static str;

    /// The server's own refusals (malformed request, busy, timeout) in this API's error
    /// form: `{"error": msg}` natively.
    fn error(&self, status: u16, msg: &str) -> Response {
        Response::error(status, msg)
    }
}
