//! The balloon's unit: guest RAM is given back with [`crate::memory::discard`], in the
//! guest's pages.

/// The guest's page size for balloon PFNs.
pub const PAGE: u64 = crate::memory::PAGE_SIZE;
