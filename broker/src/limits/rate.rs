//! Token buckets: a sustained rate with a burst on top.
//!
//! A bucket holds up to `burst` tokens and gains `per_sec` a second. Taking more than is
//! there is refused with the time until enough has refilled, so the caller can wait
//! (throttle) instead of dropping. A cost larger than the whole burst is let through once
//! the bucket is full and leaves it in debt: an oversized message is slowed, not stuck.

use std::time::{Duration, Instant};

/// A sustained rate and the burst allowed on top of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_sec: u64,
    pub burst: u64,
}

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    /// May go negative (debt) after an oversized take.
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: Rate, now: Instant) -> Self {
        Self {
            rate,
            tokens: rate.burst as f64,
            refilled_at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * self.rate.per_sec as f64).min(self.rate.burst as f64);
        self.refilled_at = now;
    }

    /// How long until `cost` could be taken; zero if it can be now.
    pub fn wait_for(&mut self, cost: u64, now: Instant) -> Duration {
        self.refill(now);
        let needed = (cost.min(self.rate.burst)) as f64 - self.tokens;
        if needed <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(needed / self.rate.per_sec as f64)
        }
    }

    /// Takes `cost` (call after [`TokenBucket::wait_for`] returned zero).
    pub fn take(&mut self, cost: u64) {
        self.tokens -= cost as f64;
    }

    /// Takes `cost` if it is there now; otherwise says how long until it would be.
    pub fn try_take(&mut self, cost: u64, now: Instant) -> Result<(), Duration> {
        let wait = self.wait_for(cost, now);
        if wait.is_zero() {
            self.take(cost);
            Ok(())
        } else {
            Err(wait)
        }
    }

    /// Whether the bucket has refilled completely by `now` (nothing to remember).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.rate.burst as f64
    }
}

/// A connection's inbound budget: messages and bytes, each optional.
#[derive(Debug, Clone)]
pub struct InboundLimiter {
    messages: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

impl InboundLimiter {
    pub fn new(messages: Option<Rate>, bytes: Option<Rate>, now: Instant) -> Self {
        Self {
            messages: messages.map(|rate| TokenBucket::new(rate, now)),
            bytes: bytes.map(|rate| TokenBucket::new(rate, now)),
        }
    }

    /// Whether both buckets are full at `now` (a new limiter would be the same).
    pub fn is_full(&mut self, now: Instant) -> bool {
        let messages = self.messages.as_mut().is_none_or(|b| b.is_full(now));
        messages && self.bytes.as_mut().is_none_or(|b| b.is_full(now))
    }

    /// Admits one message of `size` bytes, or says how long it must wait. Nothing is
    /// taken from either bucket unless both allow it.
    pub fn admit(&mut self, size: usize, now: Instant) -> Result<(), Duration> {
        let wait_messages = self
            .messages
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(1, now));
        let wait_bytes = self
            .bytes
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(size as u64, now));
        let wait = wait_messages.max(wait_bytes);
        if !wait.is_zero() {
            return Err(wait);
        }
        if let Some(bucket) = self.messages.as_mut() {
            bucket.take(1);
        }
        if let Some(bucket) = self.bytes.as_mut() {
            bucket.take(size as u64);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        per_sec: 10,
        burst: 20,
    };

    #[test]
    fn burst_then_sustained_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(RATE, start);
        for _ in 0..20 {
            assert_eq!(bucket.try_take(1, start), Ok(()));
        }
        let wait = bucket.try_take(1, start).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert_eq!(
            bucket.try_take(1, start + Duration::from_millis(100)),
            Ok(())
        );
        assert!(!bucket.is_full(start + Duration::from_millis(100)));
        assert!(bucket.is_full(start + Duration::from_secs(3)));
    }

    #[test]
    fn oversized_cost_waits_for_a_full_bucket_and_leaves_debt() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(RATE, start);
        assert_eq!(bucket.try_take(50, start), Ok(()));
        // 30 tokens in debt: 3 s until one token is back.
        let wait = bucket.try_take(1, start).unwrap_err();
        assert!((wait.as_secs_f64() - 3.1).abs() < 1e-6, "{wait:?}");
    }

    #[test]
    fn limiter_takes_from_both_buckets_or_neither() {
        let start = Instant::now();
        let messages = Rate {
            per_sec: 100,
            burst: 100,
        };
        let bytes = Rate {
            per_sec: 1000,
            burst: 1000,
        };
        let mut limiter = InboundLimiter::new(Some(messages), Some(bytes), start);
        assert_eq!(limiter.admit(600, start), Ok(()));
        // Bytes refuse; the message bucket must not be charged for the refusal.
        assert!(limiter.admit(600, start).is_err());
        for _ in 0..99 {
            assert_eq!(limiter.admit(4, start), Ok(()));
        }
        assert!(limiter.admit(0, start).is_err());
        let unlimited = &mut InboundLimiter::new(None, None, start);
        assert!((0..10_000).all(|_| unlimited.admit(1 << 20, start).is_ok()));
    }
}
