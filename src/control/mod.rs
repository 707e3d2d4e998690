//! The per-VM control channel: HTTP/1.1 with JSON bodies on a UNIX socket, served on
//! the event loop ([`server`], [`api`]), its socket's place and life ([`paths`]), the
//! request parser ([`http`]), the bodies of the native API ([`protocol`]) and the client
//! the CLI uses ([`client`], [`commands`]).

pub mod api;
pub mod client;
pub mod commands;
pub mod http;
pub mod paths;
pub mod protocol;
pub mod server;
pub mod service;
