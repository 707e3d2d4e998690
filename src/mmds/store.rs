//! The MMDS document: a JSON value with a size limit, set by PUT, merged by PATCH.

/// The document and its size limit.
#[derive(Debug, Default)]
pub struct Store {}
