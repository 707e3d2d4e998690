//! Device state in a snapshot (filled below).
