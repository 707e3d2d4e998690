//! The Firecracker-compatible front door: Firecracker's command line ([`cli`]), API
//! bodies ([`model`]), REST API ([`api`]), process behaviour ([`run`]), log
//! ([`logger`]), metrics ([`metrics`]), the non-blocking destination both write to ([`sink`]) and boot timer ([`boot_timer`]), so that tools
//! built for Firecracker drive Ferrite unmodified. `ferrite firecracker [FLAGS]`, or
//! the binary started under the name `firecracker`.

pub mod api;
pub mod boot_timer;
pub mod cli;
pub mod logger;
pub mod metrics;
pub mod model;
pub mod run;
pub mod sink;
