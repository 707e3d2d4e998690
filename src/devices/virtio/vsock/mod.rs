//! virtio-vsock's protocol core (virtio 1.2 §5.10), not yet wired to a device.
#![forbid(unsafe_code)]

pub mod conn;
pub mod packet;

pub use conn::{Action, Conn, ConnError, ConnKey, State};
pub use packet::{Header, Op, PacketError};
