//! MMDS V2 session tokens.

/// The live session tokens.
#[derive(Debug, Default)]
pub struct Tokens {}
