//! virtio-vsock's protocol core (virtio 1.2 §5.10), with Firecracker's host side
//! (UNIX sockets) in mind.
//!
//! [`packet`], [`conn`] and [`muxer`] are pure state machines, no I/O, no fds, no
//! guest memory: the device ([`device`], the adapter on the event loop) reads headers
//! from the tx queue, feeds them in, and carries out what comes back — headers for the
//! rx queue, bytes to write to or stop reading from a host socket, sockets to close.
//! Everything is unit-tested without KVM.
//!
//! - [`packet`]: the 44-byte header; [`Header::parse`] turns any bytes into a header
//!   or a [`PacketError`] (unknown op, short, payload on a control packet, RW longer
//!   than [`packet::MAX_PAYLOAD`], unknown SHUTDOWN flags).
//! - [`conn`]: one stream connection keyed by (host port, guest port): handshake both
//!   ways, SHUTDOWN halves, RST, credit flow control with wrapping `u32` counters. A
//!   guest that breaks the protocol (data beyond its credit, a `fwd_cnt` that goes
//!   back or past what we sent, data after its SHUTDOWN SEND, a second REQUEST, a
//!   non-stream packet) gets RST and the host side is aborted.
//! - [`muxer`]: the table of connections, the `CONNECT <port>\n` / `OK <port>\n`
//!   handshake of host clients (host ports from 2^30 up), RST for packets of unknown
//!   connections and for REQUESTs beyond the maximum, and the guest reset (every
//!   connection forgotten).
//!
//! Bounds: guest → host bytes the adapter holds for one connection are at most
//! [`conn::CONN_BUF_ALLOC`] (256 KiB, the credit we advertise; the guest cannot send
//! more without being reset); a device holds at most
//! [`muxer::DEFAULT_MAX_CONNECTIONS`] (128, configurable) connections, so at most
//! 32 MiB ([`muxer::max_buffered`]). Host → guest bytes are read from a host socket
//! only up to the guest's credit ([`Conn::tx_credit`]) and go straight to the guest's
//! buffers; only control headers wait for the guest's rx buffers, and bounding that
//! queue is the adapter's job. A host client's handshake line is read up to
//! [`muxer::MAX_CONNECT_LINE`] bytes.
#![deny(unsafe_code)]

pub mod config;
pub mod conn;
pub mod device;
pub mod muxer;
pub mod packet;
mod sys;

pub use config::VsockConfig;
pub use conn::{Action, Conn, ConnError, ConnKey, State};
pub use device::Vsock;
pub use muxer::{parse_connect, ConnectLine, MuxAction, MuxError, Muxer};
pub use packet::{Header, Op, PacketError};
