//! The per-VM control channel: HTTP/1.1 with JSON bodies on a UNIX socket.

pub mod client;
pub mod http;
