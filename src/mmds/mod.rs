//! The microVM metadata service (MMDS), compatible with Firecracker's: a JSON document
//! the host sets through the API ([`store`]) and the guest reads over HTTP at a
//! link-local address (169.254.169.254 by default). The guest's frames for that address
//! are taken off a virtio-net interface's TX path and answered by a small TCP/IP
//! responder inside Ferrite ([`stack`]); its HTTP requests are served by [`http`], with
//! V2 session tokens from [`token`].
//!
//! Threads: the store is shared ([`SharedMmds`]) between the API thread (PUT/PATCH/GET
//! `/mmds`) and the event-loop thread (the net devices that answer the guest). Each
//! holds the lock only for one operation and takes no other lock under it.

pub mod http;
pub mod stack;
pub mod store;
pub mod token;

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Firecracker's default MMDS address.
pub const DEFAULT_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// The MMDS version: V1 (plain GETs) or V2 (session tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Version {
    #[default]
    V1,
    V2,
}

/// How the guest reaches the MMDS (Firecracker's `mmds-config`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmdsConfig {
    pub version: Version,
    /// The net interfaces (by id) whose TX path answers for `ipv4`.
    pub network_interfaces: Vec<String>,
    pub ipv4: Ipv4Addr,
    /// EC2 IMDS compatibility: text/plain listings whatever the `Accept` header.
    pub imds_compat: bool,
}

impl Default for MmdsConfig {
    fn default() -> Self {
        MmdsConfig {
            version: Version::V1,
            network_interfaces: Vec::new(),
            ipv4: DEFAULT_IPV4,
            imds_compat: false,
        }
    }
}

/// What the HTTP layer made of the bytes a guest connection has sent so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// No complete request yet: keep the bytes and wait for more.
    NeedMore,
    /// A complete request (its first `consumed` bytes) and the whole response to send.
    /// With `close` the connection is closed after the response.
    Reply {
        consumed: usize,
        response: Vec<u8>,
        close: bool,
    },
}

/// The metadata service's state: the document, the guest-facing settings and the V2
/// session tokens.
#[derive(Debug, Default)]
pub struct Mmds {
    pub store: store::Store,
    pub version: Version,
    pub imds_compat: bool,
    pub tokens: token::Tokens,
}

/// The MMDS as shared between the API thread and the event-loop thread.
pub type SharedMmds = Arc<Mutex<Mmds>>;

impl Mmds {
    /// Serves the bytes a guest connection has sent so far (see [`Served`]).
    pub fn serve(&mut self, request: &[u8], now: Instant) -> Served {
        http::serve(self, request, now)
    }
}

/// What the MMDS refuses. The texts of the store's refusals are Firecracker's (its API
/// prefixes them, e.g. "MMDS limit exceeded error: "), so clients that match on them
/// keep working; the fields say what was refused for logs and callers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PUT or PATCH whose result would serialize to more than the size limit.
    #[error("The MMDS patch request doesn't fit.")]
    LimitExceeded {
        /// Compact JSON size of the refused document, in bytes.
        size: usize,
        /// The store's limit, in bytes.
        limit: usize,
    },
    /// A PATCH before any successful PUT.
    #[error("The MMDS data store is not initialized.")]
    NotInitialized,
    /// A session token asked for with a lifetime outside Firecracker's range.
    #[error(
        "Invalid time to live value provided for token: {0}. Please provide a value between {min} and {max}.",
        min = token::MIN_TTL_SECONDS,
        max = token::MAX_TTL_SECONDS
    )]
    InvalidTtl(u32),
    /// The OS random source failed while minting a session token.
    #[error("cannot read random bytes for an MMDS session token: {0}")]
    Random(getrandom::Error),
}
