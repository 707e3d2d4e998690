//! The guest-facing HTTP/1.1 server of the MMDS.

use super::{Mmds, Served};
use std::time::Instant;

/// Serves the bytes a guest connection has sent so far.
pub fn serve(_mmds: &mut Mmds, _request: &[u8], _now: Instant) -> Served {
    Served::Reply {
        consumed: 0,
        response: b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\n\r\n".to_vec(),
        close: true,
    }
}
