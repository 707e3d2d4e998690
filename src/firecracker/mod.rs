//! Ferrite's Firecracker-compatible front door: its log, metrics and boot timer.
pub mod boot_timer;
pub mod logger;
pub mod metrics;
