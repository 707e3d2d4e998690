//! Randomized tests of the inputs a hostile caller controls (issue 18, "Fuzzing in
//! CI"): every Firecracker API body and the config file, the native control API's
//! bodies, both command lines and their value parsers, and the image loaders. The HTTP
//! request reader's own properties are in `control::http`, the virtio rings' beside
//! each device.
//!
//! Each property holds for any input: a value or an error, never a panic; where a
//! value has a written form, writing it and reading it back gives the same value. The
//! default case counts keep `cargo test` fast; `PROPTEST_CASES=N` runs N cases of each
//! (see [`crate::test_util::cases`]).
#![forbid(unsafe_code)]

mod cli;
mod control;
mod firecracker;
mod json;
mod loader;

/// The case count of a property: `PROPTEST_CASES`, else `default`.
pub(crate) fn cases(default: u32) -> u32 {
    crate::test_util::cases(default)
}
