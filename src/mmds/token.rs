//! MMDS V2 session tokens.
//!
//! A token is 32 bytes from the OS random source (`getrandom`), given to the guest as 64
//! lowercase hex characters and kept, with its expiry, in a table of at most
//! [`MAX_TOKENS`] entries. Guessing one is infeasible (2^256 values, at most 1024 live)
//! and checking one costs O(1): a length check, a hex decode of 64 characters and one
//! lookup in a `HashMap` (SipHash with a per-process random key, so guest-chosen
//! strings cannot degrade it). Expired tokens are purged whenever the table is used;
//! when it is full, issuing a new token drops the one that expires soonest.
//!
//! Why not Firecracker's scheme (stateless tokens: the expiry sealed with AES-256-GCM
//! under a per-process key, so no table at all): that needs an AEAD implementation, a
//! crypto crate (Firecracker uses aws-lc-rs, a C library with its own build) that
//! Ferrite does not otherwise need. Random tokens in a bounded table give the guest the
//! same guarantees — unforgeable, expiring after their TTL, not valid in another VMM
//! process — with only `getrandom`, already a dependency. What differs: at most
//! [`MAX_TOKENS`] tokens are live at once (a guest issuing more loses its
//! soonest-expiring ones), and the table costs ~100 KiB at most.

use super::Error;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// The shortest token lifetime a guest may ask for, in seconds (Firecracker's).
pub const MIN_TTL_SECONDS: u32 = 1;
/// The longest token lifetime a guest may ask for, in seconds (Firecracker's: 6 hours).
pub const MAX_TTL_SECONDS: u32 = 21600;
/// How many live tokens are kept at most.
pub const MAX_TOKENS: usize = 1024;
/// The path a guest PUTs to for a token.
pub const TOKEN_PATH: &str = "/latest/api/token";

const TOKEN_BYTES: usize = 32;
/// Length of a token as text (hex).
pub const TOKEN_LEN: usize = TOKEN_BYTES * 2;

type Secret = [u8; TOKEN_BYTES];

/// The live session tokens.
#[derive(Debug, Default)]
pub struct Tokens {
    expiry: HashMap<Secret, Instant>,
    /// The same tokens ordered by expiry, to purge and evict in O(log n).
    by_expiry: BTreeSet<(Instant, Secret)>,
}

fn encode(secret: &Secret) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(TOKEN_LEN);
    for byte in secret {
        text.push(char::from(HEX[usize::from(byte >> 4)]));
        text.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    text
}

fn decode(text: &str) -> Option<Secret> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let bytes = text.as_bytes();
    if bytes.len() != TOKEN_LEN {
        return None;
    }
    let mut secret = [0u8; TOKEN_BYTES];
    for (out, pair) in secret.iter_mut().zip(bytes.chunks_exact(2)) {
        *out = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(secret)
}

impl Tokens {
    /// Drops the tokens that have expired at `now`.
    fn purge(&mut self, now: Instant) {
        while let Some(&(expiry, secret)) = self.by_expiry.first() {
            if expiry > now {
                break;
            }
            self.by_expiry.pop_first();
            self.expiry.remove(&secret);
        }
    }

    /// Mints a token valid for `ttl_seconds` from `now` (which must be within
    /// [`MIN_TTL_SECONDS`]..=[`MAX_TTL_SECONDS`]).
    pub fn issue(&mut self, ttl_seconds: u32, now: Instant) -> Result<String, Error> {
        if !(MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&ttl_seconds) {
            return Err(Error::InvalidTtl(ttl_seconds));
        }
        let mut secret = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut secret).map_err(Error::Random)?;
        // `Instant` cannot overflow within 6 hours of any real `now`; if it somehow did,
        // the token would simply be born expired.
        let expiry = now
            .checked_add(Duration::from_secs(u64::from(ttl_seconds)))
            .unwrap_or(now);
        self.purge(now);
        while self.expiry.len() >= MAX_TOKENS {
            match self.by_expiry.pop_first() {
                Some((_, oldest)) => {
                    self.expiry.remove(&oldest);
                }
                None => break,
            }
        }
        self.expiry.insert(secret, expiry);
        self.by_expiry.insert((expiry, secret));
        Ok(encode(&secret))
    }

    /// Whether `token` was issued here and has not expired at `now`.
    pub fn is_valid(&mut self, token: &str, now: Instant) -> bool {
        self.purge(now);
        match decode(token) {
            Some(secret) => self.expiry.get(&secret).is_some_and(|&e| e > now),
            None => false,
        }
    }

    /// The number of live (not yet purged) tokens.
    pub fn len(&self) -> usize {
        self.expiry.len()
    }

    /// Whether no token is live.
    pub fn is_empty(&self) -> bool {
        self.expiry.is_empty()
    }

    /// Forgets every token (e.g. when the MMDS is reconfigured).
    pub fn clear(&mut self) {
        self.expiry.clear();
        self.by_expiry.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_token_is_valid_until_ttl_then_not() {
        let mut tokens = Tokens::default();
        let t0 = Instant::now();
        let token = tokens.issue(60, t0).unwrap();
        assert_eq!(token.len(), TOKEN_LEN);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(tokens.is_valid(&token, t0));
        assert!(tokens.is_valid(&token, t0 + Duration::from_millis(59_999)));
        assert!(!tokens.is_valid(&token, t0 + Duration::from_secs(60)));
        // The expired token was purged.
        assert!(tokens.is_empty());
    }

    #[test]
    fn ttl_outside_firecrackers_range_is_refused_with_its_message() {
        let mut tokens = Tokens::default();
        let now = Instant::now();
        for ttl in [0, 21601, u32::MAX] {
            let err = tokens.issue(ttl, now).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "Invalid time to live value provided for token: {ttl}. \
                     Please provide a value between 1 and 21600."
                )
            );
        }
        assert!(tokens.is_empty());
        tokens.issue(1, now).unwrap();
        tokens.issue(21600, now).unwrap();
        assert_eq!(tokens.len(), 2);
    }

    #[test]
    fn tokens_are_distinct_and_forged_or_altered_ones_are_refused() {
        let mut tokens = Tokens::default();
        let now = Instant::now();
        let a = tokens.issue(60, now).unwrap();
        let b = tokens.issue(60, now).unwrap();
        assert_ne!(a, b);
        let mut altered = a.clone().into_bytes();
        altered[10] = if altered[10] == b'0' { b'1' } else { b'0' };
        let altered = String::from_utf8(altered).unwrap();
        for bad in [
            "",
            "INVALID_TOKEN",
            &"0".repeat(TOKEN_LEN),
            &altered,
            &a.to_uppercase(),
            &format!("{a}0"),
            &a[1..],
            &"é".repeat(TOKEN_LEN / 2),
        ] {
            assert!(!tokens.is_valid(bad, now), "{bad:?} accepted");
        }
        assert!(tokens.is_valid(&a, now) && tokens.is_valid(&b, now));
    }

    #[test]
    fn table_is_bounded_and_full_table_drops_soonest_expiring() {
        let mut tokens = Tokens::default();
        let now = Instant::now();
        let soonest = tokens.issue(10, now).unwrap();
        let mut later = Vec::new();
        for _ in 1..MAX_TOKENS {
            later.push(tokens.issue(3600, now).unwrap());
        }
        assert_eq!(tokens.len(), MAX_TOKENS);
        let newest = tokens.issue(3600, now).unwrap();
        assert_eq!(tokens.len(), MAX_TOKENS);
        assert!(!tokens.is_valid(&soonest, now));
        assert!(tokens.is_valid(&newest, now));
        assert!(later.iter().all(|t| tokens.is_valid(t, now)));
    }

    #[test]
    fn expired_tokens_are_purged_when_issuing() {
        let mut tokens = Tokens::default();
        let t0 = Instant::now();
        for _ in 0..10 {
            tokens.issue(1, t0).unwrap();
        }
        tokens.issue(60, t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(tokens.len(), 1);
    }

    #[test]
    fn clear_forgets_tokens() {
        let mut tokens = Tokens::default();
        let now = Instant::now();
        let t = tokens.issue(60, now).unwrap();
        tokens.clear();
        assert!(!tokens.is_valid(&t, now));
    }
}
