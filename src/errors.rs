//! Errors as one line for people: a leaf module, so that every layer (the CLI, the
//! control API) words a failure the same way without importing the layer above it.
#![forbid(unsafe_code)]

/// The full error chain on one line: "what failed: because: because". A cause whose
/// text its parent already ends with (an error that prints its source and also
/// returns it from `source()`) is not printed twice.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !text.is_empty() && !s.ends_with(&text) {
            s += ": ";
            s += &text;
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open disk x.img")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open disk x.img: {0}")]
    struct Doubled(#[source] std::io::Error);

    #[test]
    fn causes_are_chained_once() {
        let nf = || std::io::Error::from_raw_os_error(libc::ENOENT);
        let once = chain(&Outer(nf()));
        assert_eq!(once, format!("cannot open disk x.img: {}", nf()));
        // A Display that already holds its cause does not get it a second time.
        assert_eq!(chain(&Doubled(nf())), once);
    }
}
