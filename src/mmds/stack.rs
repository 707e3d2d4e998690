//! The MMDS responder on a virtio-net TX path: a minimal TCP/IPv4 endpoint for the MMDS
//! address.

use super::SharedMmds;
use std::net::Ipv4Addr;

/// The MMDS endpoint of one net interface.
pub struct Responder {
    #[allow(dead_code)]
    mmds: SharedMmds,
    #[allow(dead_code)]
    ipv4: Ipv4Addr,
}

impl Responder {
    /// A responder answering for `ipv4` with the document in `mmds`.
    pub fn new(mmds: SharedMmds, ipv4: Ipv4Addr) -> Responder {
        Responder { mmds, ipv4 }
    }
}
