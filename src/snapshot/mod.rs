//! Snapshot and restore: a paused VM's state and memory to files and back (docs/DESIGN.md, "Snapshots").

pub mod devices;
pub mod kvm_vm;
pub mod vcpu;
