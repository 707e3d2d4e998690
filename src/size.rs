//! Sizes as people write them (`--mem`, `ferrite balloon`, the balloon endpoint): a
//! plain number is MiB; K, M, G and T suffixes (any case, optionally followed by `B`
//! or `iB`) are binary multiples.
#![forbid(unsafe_code)]

/// The power of two a suffix stands for, or `None` for an unknown one.
fn suffix_shift(suffix: &str) -> Option<u32> {
    let mut chars = suffix.chars();
    let Some(unit) = chars.next() else {
        return Some(20);
    };
    if !["", "B", "IB"].contains(&chars.as_str().to_ascii_uppercase().as_str()) {
        return None;
    }
    match unit.to_ascii_uppercase() {
        'K' => Some(10),
        'M' => Some(20),
        'G' => Some(30),
        'T' => Some(40),
        _ => None,
    }
}

/// Bytes in `s` (zero allowed; the caller checks bounds).
pub fn parse(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!("'{s}' is not a size (expected e.g. 128, 16M, 1G)"));
    }
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is too large"))?;
    let shift = suffix_shift(suffix).ok_or_else(|| {
        format!("'{s}' has an unknown size suffix '{suffix}' (use K, M, G or T, optionally followed by B or iB)")
    })?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse("0"), Ok(0));
        assert_eq!(super::parse("64M"), Ok(64 << 20));
        assert_eq!(super::parse("64"), Ok(64 << 20));
        assert_eq!(super::parse("512k"), Ok(512 << 10));
        assert!(super::parse("x").is_err());
        assert!(super::parse("16Q").is_err());
        assert!(super::parse("99999999999T").is_err());
    }
}
