//! Token buckets for a disk's rate limiter, with Firecracker's semantics: a bucket of
//! `size` tokens, full at the start, refilled linearly so that an empty bucket is full
//! again after `refill_time` milliseconds (never beyond `size`), plus a `one_time_burst`
//! of extra tokens spent first and never refilled. A bucket whose size or refill time is
//! 0 limits nothing. A request larger than the bucket passes once the bucket is full
//! and leaves it in debt, so that the average rate still holds.
//!
//! Pure: every call takes the time (`now`) from its caller, so tests drive a clock of
//! their own.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

const NS_PER_MS: u128 = 1_000_000;

/// One bucket as configured (Firecracker's `TokenBucket` object: `size`,
/// `one_time_burst`, `refill_time` in milliseconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

impl TokenBucketConfig {
    /// Size 0 or refill time 0: no limit.
    pub fn is_unlimited(&self) -> bool {
        self.size == 0 || self.refill_time == 0
    }
}

/// A rate limiter as configured (Firecracker's `RateLimiter` object): a bandwidth bucket
/// (bytes) and an operations bucket (requests); an absent bucket limits nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// True when neither bucket limits anything (also `{}`, which clients send for "no
    /// limit").
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none_or(|b| b.is_unlimited()) && self.ops.is_none_or(|b| b.is_unlimited())
    }
}

/// A bucket in use.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    config: TokenBucketConfig,
    size: u128,
    refill_ns: u128,
    /// Tokens in the bucket; negative after a request larger than the bucket.
    budget: i128,
    /// What is left of the one-time burst.
    burst: u64,
    /// When refills were last credited.
    last: Instant,
    /// Token-nanoseconds earned since, short of a whole token (< `refill_ns`).
    carry: u128,
}

impl TokenBucket {
    /// A full bucket at `now`; None for a bucket that limits nothing.
    pub fn new(config: &TokenBucketConfig, now: Instant) -> Option<Self> {
        if config.is_unlimited() {
            return None;
        }
        Some(Self {
            config: *config,
            size: u128::from(config.size),
            refill_ns: u128::from(config.refill_time) * NS_PER_MS,
            budget: i128::from(config.size),
            burst: config.one_time_burst.unwrap_or(0),
            last: now,
            carry: 0,
        })
    }

    pub fn config(&self) -> TokenBucketConfig {
        self.config
    }

    /// Tokens available now (not counting the one-time burst; negative while in debt).
    pub fn budget(&self) -> i128 {
        self.budget
    }

    /// What is left of the one-time burst.
    pub fn burst_left(&self) -> u64 {
        self.burst
    }

    /// Credits the tokens earned since the last refill. Time is counted in token-
    /// nanoseconds (`size` per nanosecond, `refill_ns` per token) and what does not make
    /// a whole token yet is carried over, so nothing is lost between refills.
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = self.last.max(now);
        let size = self.size as i128;
        if self.budget >= size {
            self.carry = 0;
            return;
        }
        let credit = elapsed.saturating_mul(self.size).saturating_add(self.carry);
        let tokens = credit / self.refill_ns;
        self.carry = credit % self.refill_ns;
        let new = self
            .budget
            .saturating_add(i128::try_from(tokens).unwrap_or(i128::MAX));
        if new >= size {
            self.budget = size;
            self.carry = 0;
        } else {
            self.budget = new;
        }
    }

    /// How long until `tokens` can be taken (zero: now), after crediting refills.
    fn wait(&mut self, tokens: u64, now: Instant) -> Duration {
        self.refill(now);
        if self.burst >= tokens {
            return Duration::ZERO;
        }
        let rest = u128::from(tokens - self.burst);
        // A request larger than the bucket needs a full bucket.
        let needed = rest.min(self.size) as i128;
        if self.budget >= needed {
            return Duration::ZERO;
        }
        let deficit = (needed - self.budget) as u128;
        let credit = deficit
            .saturating_mul(self.refill_ns)
            .saturating_sub(self.carry);
        let ns = credit.div_ceil(self.size).max(1);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Takes `tokens` (only after [`Self::wait`] said zero).
    fn consume(&mut self, tokens: u64) {
        if self.burst >= tokens {
            self.burst -= tokens;
            return;
        }
        let rest = tokens - self.burst;
        self.burst = 0;
        self.budget -= i128::from(rest);
    }

    /// Takes `tokens` now, or says how long to wait before asking again.
    pub fn take(&mut self, tokens: u64, now: Instant) -> Result<(), Duration> {
        let wait = self.wait(tokens, now);
        if !wait.is_zero() {
            return Err(wait);
        }
        self.consume(tokens);
        Ok(())
    }
}

/// A disk's limiter: one operation and its bytes are taken together or not at all.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    pub fn new(config: &RateLimiterConfig, now: Instant) -> Self {
        let bucket =
            |c: &Option<TokenBucketConfig>| c.as_ref().and_then(|c| TokenBucket::new(c, now));
        Self {
            bandwidth: bucket(&config.bandwidth),
            ops: bucket(&config.ops),
        }
    }

    /// Replaces the buckets given (a new bucket starts full); None keeps a bucket as it
    /// is (Firecracker's `PATCH /drives`). A bucket of size 0 or refill time 0 removes
    /// the limit.
    pub fn update(
        &mut self,
        bandwidth: Option<&TokenBucketConfig>,
        ops: Option<&TokenBucketConfig>,
        now: Instant,
    ) {
        if let Some(c) = bandwidth {
            self.bandwidth = TokenBucket::new(c, now);
        }
        if let Some(c) = ops {
            self.ops = TokenBucket::new(c, now);
        }
    }

    /// The buckets in force (absent when unlimited).
    pub fn config(&self) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: self.bandwidth.as_ref().map(TokenBucket::config),
            ops: self.ops.as_ref().map(TokenBucket::config),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Takes `ops` operations and `bytes` bytes now, or nothing and says how long to
    /// wait before asking again.
    pub fn take(&mut self, ops: u64, bytes: u64, now: Instant) -> Result<(), Duration> {
        let mut wait = Duration::ZERO;
        if let Some(b) = &mut self.ops {
            wait = wait.max(b.wait(ops, now));
        }
        if bytes > 0 {
            if let Some(b) = &mut self.bandwidth {
                wait = wait.max(b.wait(bytes, now));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        if let Some(b) = &mut self.ops {
            b.consume(ops);
        }
        if bytes > 0 {
            if let Some(b) = &mut self.bandwidth {
                b.consume(bytes);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn cfg(size: u64, burst: Option<u64>, refill_ms: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time: refill_ms,
        }
    }

    #[test]
    fn size_or_refill_zero_limits_nothing() {
        let t0 = Instant::now();
        assert!(TokenBucket::new(&cfg(0, Some(5), 100), t0).is_none());
        assert!(TokenBucket::new(&cfg(100, None, 0), t0).is_none());
        let mut rl = RateLimiter::new(
            &RateLimiterConfig {
                bandwidth: Some(cfg(0, None, 1000)),
                ops: None,
            },
            t0,
        );
        assert!(rl.is_unlimited());
        for _ in 0..1000 {
            assert_eq!(rl.take(1, 1 << 30, t0), Ok(()));
        }
    }

    #[test]
    fn a_bucket_starts_full_and_refills_linearly() {
        let t0 = Instant::now();
        // 1000 tokens per second.
        let mut b = TokenBucket::new(&cfg(1000, None, 1000), t0).unwrap();
        assert_eq!(b.take(1000, t0), Ok(()));
        assert_eq!(b.budget(), 0);
        // Empty: 100 tokens take 100 ms.
        assert_eq!(b.take(100, t0), Err(ms(100)));
        assert_eq!(b.take(100, t0 + ms(40)), Err(ms(60)));
        assert_eq!(b.take(100, t0 + ms(100)), Ok(()));
        assert_eq!(b.budget(), 0);
        // Never beyond the size.
        assert_eq!(b.take(1, t0 + ms(100) + Duration::from_secs(60)), Ok(()));
        assert_eq!(b.budget(), 999);
    }

    #[test]
    fn fractions_of_a_token_are_not_lost_between_refills() {
        let t0 = Instant::now();
        // 3 tokens per 10 ms: one per 3.33 ms.
        let mut b = TokenBucket::new(&cfg(3, None, 10), t0).unwrap();
        assert_eq!(b.take(3, t0), Ok(()));
        // Asked every millisecond for 30 ms, it hands out exactly 9 tokens.
        let mut got = 0;
        for i in 1..=30 {
            if b.take(1, t0 + ms(i)).is_ok() {
                got += 1;
            }
        }
        assert_eq!(got, 9);
    }

    #[test]
    fn the_one_time_burst_is_spent_first_and_never_refilled() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&cfg(100, Some(500), 1000), t0).unwrap();
        assert_eq!(b.take(400, t0), Ok(()));
        assert_eq!((b.burst_left(), b.budget()), (100, 100));
        // 150: the last 100 of the burst, then 50 of the bucket.
        assert_eq!(b.take(150, t0), Ok(()));
        assert_eq!((b.burst_left(), b.budget()), (0, 50));
        assert_eq!(b.take(100, t0), Err(ms(500)));
        // Refilled after a second; the burst stays spent.
        assert_eq!(b.take(100, t0 + Duration::from_secs(1)), Ok(()));
        assert_eq!((b.burst_left(), b.budget()), (0, 0));
    }

    #[test]
    fn a_request_larger_than_the_bucket_waits_for_a_full_bucket_then_leaves_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&cfg(100, None, 100), t0).unwrap();
        assert_eq!(b.take(50, t0), Ok(()));
        // 300 > size: needs a full bucket (50 more: 50 ms).
        assert_eq!(b.take(300, t0), Err(ms(50)));
        assert_eq!(b.take(300, t0 + ms(50)), Ok(()));
        assert_eq!(b.budget(), -200);
        // Paying off the debt and one more token takes 201 ms.
        assert_eq!(b.take(1, t0 + ms(50)), Err(ms(201)));
        assert_eq!(b.take(1, t0 + ms(251)), Ok(()));
    }

    #[test]
    fn ops_and_bytes_are_taken_together_or_not_at_all() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(
            &RateLimiterConfig {
                bandwidth: Some(cfg(4096, None, 1000)),
                ops: Some(cfg(10, None, 1000)),
            },
            t0,
        );
        assert_eq!(rl.take(1, 4096, t0), Ok(()));
        // The bandwidth is spent: the operation is not taken either.
        assert_eq!(rl.take(1, 512, t0), Err(ms(125)));
        let ops = rl.ops.as_ref().unwrap();
        assert_eq!(ops.budget(), 9);
        // A request without data (a flush) needs only an operation.
        assert_eq!(rl.take(1, 0, t0), Ok(()));
        assert_eq!(rl.ops.as_ref().unwrap().budget(), 8);
        // The longer of the two waits is the answer.
        for _ in 0..8 {
            assert_eq!(rl.take(1, 0, t0), Ok(()));
        }
        assert_eq!(rl.take(1, 512, t0), Err(ms(125)));
        assert_eq!(rl.take(1, 0, t0 + ms(50)), Err(ms(50)));
    }

    #[test]
    fn an_update_replaces_only_the_buckets_given() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(
            &RateLimiterConfig {
                bandwidth: Some(cfg(1000, None, 1000)),
                ops: Some(cfg(5, Some(2), 1000)),
            },
            t0,
        );
        assert_eq!(rl.take(1, 1000, t0), Ok(()));
        // A new ops bucket; the (empty) bandwidth bucket stays as it is.
        rl.update(None, Some(&cfg(7, None, 100)), t0);
        assert_eq!(rl.config().ops, Some(cfg(7, None, 100)));
        assert_eq!(rl.config().bandwidth, Some(cfg(1000, None, 1000)));
        assert!(rl.take(1, 1, t0).is_err());
        // Size 0 removes the limit.
        rl.update(Some(&cfg(0, None, 0)), None, t0);
        assert_eq!(rl.config().bandwidth, None);
        assert_eq!(rl.take(1, 1 << 20, t0), Ok(()));
    }

    #[test]
    fn serde_names_are_firecrackers() {
        let c: RateLimiterConfig = serde_json::from_str(
            r#"{"bandwidth":{"size":1048576,"one_time_burst":4096,"refill_time":1000},
                "ops":{"size":100,"refill_time":1000}}"#,
        )
        .unwrap();
        assert_eq!(c.bandwidth, Some(cfg(1 << 20, Some(4096), 1000)));
        assert_eq!(c.ops, Some(cfg(100, None, 1000)));
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"bw":{}}"#).is_err());
    }

    #[test]
    fn a_clock_going_backwards_does_not_panic_or_refill() {
        let t0 = Instant::now() + ms(1000);
        let mut b = TokenBucket::new(&cfg(10, None, 10), t0).unwrap();
        assert_eq!(b.take(10, t0), Ok(()));
        assert!(b.take(1, t0 - ms(500)).is_err());
        assert_eq!(b.budget(), 0);
    }
}
