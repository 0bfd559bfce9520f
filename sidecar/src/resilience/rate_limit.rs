//! Per-sender token buckets with bounded memory.
//!
//! Each sender (an origin home node, or a peer main relay for the traffic it forwards) owns a
//! bucket of `burst` tokens refilled at `rate` per second; a stream costs one token. When the
//! table is full, buckets idle long enough to be full again are evicted first (they carry no
//! state worth keeping); if none is, the least recently used one goes. Time is passed in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A token-bucket limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limit {
    /// Tokens per second.
    pub rate: f64,
    /// Bucket size.
    pub burst: f64,
}

#[derive(Clone, Debug)]
struct Bucket {
    tokens: f64,
    stamp: Instant,
    limit: Limit,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.stamp).as_secs_f64();
        self.tokens = (self.tokens + dt * self.limit.rate).min(self.limit.burst);
        self.stamp = now;
    }
}

/// Outcome of [`RateLimiter::admit`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// Go ahead.
    Admit,
    /// Refused; a token is available after this long.
    Limited {
        /// When to retry.
        retry_after: Duration,
    },
}

impl Decision {
    /// `None` when admitted, else how long until a token is available.
    pub fn retry_after(self) -> Option<Duration> {
        match self {
            Decision::Admit => None,
            Decision::Limited { retry_after } => Some(retry_after),
        }
    }
}

/// Token buckets keyed by sender.
#[derive(Debug)]
pub struct RateLimiter {
    buckets: HashMap<String, Bucket>,
    max_senders: usize,
}

impl RateLimiter {
    /// A limiter tracking at most `max_senders` buckets.
    pub fn new(max_senders: usize) -> Self {
        Self { buckets: HashMap::new(), max_senders: max_senders.max(1) }
    }

    /// Charges one stream to `sender` under `limit`.
    pub fn admit(&mut self, sender: &str, limit: Limit, now: Instant) -> Decision {
        if !self.buckets.contains_key(sender) && self.buckets.len() >= self.max_senders {
            self.evict(now);
        }
        let b = self.buckets.entry(sender.to_owned()).or_insert(Bucket { tokens: limit.burst, stamp: now, limit });
        b.limit = limit;
        b.refill(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Decision::Admit
        } else {
            let wait = (1.0 - b.tokens) / limit.rate.max(f64::MIN_POSITIVE);
            Decision::Limited { retry_after: Duration::from_secs_f64(wait.min(3600.0)) }
        }
    }

    fn evict(&mut self, now: Instant) {
        let full: Vec<String> = self
            .buckets
            .iter_mut()
            .filter_map(|(k, b)| {
                b.refill(now);
                (b.tokens >= b.limit.burst).then(|| k.clone())
            })
            .collect();
        if full.is_empty() {
            if let Some(oldest) = self.buckets.iter().min_by_key(|(_, b)| b.stamp).map(|(k, _)| k.clone()) {
                self.buckets.remove(&oldest);
            }
        } else {
            for k in full {
                self.buckets.remove(&k);
            }
        }
    }

    /// Buckets currently tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no bucket is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limit = Limit { rate: 10.0, burst: 5.0 };

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(100);
        for _ in 0..5 {
            assert_eq!(r.admit("a", L, t0), Decision::Admit);
        }
        let Decision::Limited { retry_after } = r.admit("a", L, t0) else { panic!("6th in a burst of 5") };
        assert_eq!(retry_after, Duration::from_millis(100));
        assert_eq!(r.admit("a", L, t0 + Duration::from_millis(100)), Decision::Admit);
        // Other senders are unaffected.
        assert_eq!(r.admit("b", L, t0), Decision::Admit);
    }

    #[test]
    fn sustained_rate_is_held() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(100);
        let admitted =
            (0..1000).filter(|i| r.admit("flood", L, t0 + Duration::from_millis(i * 10)) == Decision::Admit).count();
        // 10 s at 100 attempts/s against 10/s plus a burst of 5.
        assert!((100..=106).contains(&admitted), "{admitted}");
    }

    #[test]
    fn memory_stays_bounded_with_many_senders() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(1000);
        for i in 0..100_000u32 {
            r.admit(&format!("s{i}"), L, t0 + Duration::from_millis(u64::from(i)));
        }
        assert!(r.len() <= 1000);
        // A busy sender that is still limited is not evicted by idle ones.
        let mut r = RateLimiter::new(2);
        for _ in 0..5 {
            r.admit("busy", L, t0);
        }
        r.admit("idle1", L, t0);
        r.admit("idle2", L, t0 + Duration::from_secs(10));
        assert!(matches!(r.admit("busy", L, t0 + Duration::from_secs(10)), Decision::Admit));
    }
}
