//! Ferrite: a small, fast virtual machine monitor for Linux/KVM.
//!
//! The binary (`src/main.rs`) is a thin shell over [`cli`]; everything else lives
//! in modules of this library so that it can be unit-tested without `/dev/kvm`.
//! Unsafe code is denied here and allowed, by name, only in the modules that need it
//! (the inventory in docs/DESIGN.md lists them and why).
//! See `docs/DESIGN.md` for threads, boot steps, lock order and the unsafe inventory.

#![deny(unsafe_code)]

pub mod arch;
pub mod bus;
pub mod cli;
pub mod console;
pub mod control;
pub mod devices;
pub mod errors;
pub mod event_loop;
pub mod file;
pub mod firecracker;
#[cfg(test)]
mod fuzz;
pub mod graceful;
pub mod jail;
pub mod loader;
pub mod memory;
pub mod mmds;
pub mod outcome;
pub mod ratelimit;
pub mod sandbox;
pub mod seccomp;
pub mod signals;
pub mod size;
pub mod snapshot;
pub mod stale_socket;
#[cfg(test)]
pub mod test_util;
pub mod threads;
pub mod timer;
pub mod vcpu;
pub mod vm;
