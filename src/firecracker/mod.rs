//! The Firecracker-compatible front door: Firecracker's command line ([`cli`]), API
//! bodies ([`model`]), REST API ([`api`]) and process behaviour ([`run`]), so that tools
//! built for Firecracker drive Ferrite unmodified. `ferrite firecracker [FLAGS]`, or the
//! binary started under the name `firecracker`.

pub mod api;
pub mod cli;
pub mod model;
pub mod run;
