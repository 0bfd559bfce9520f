//! Exponential backoff with full jitter (AWS architecture blog's "full jitter"): the n-th
//! wait is uniform in `[0, min(max, initial * 2^n)]`. Every reconnect and poll loop of the
//! proxy keeps a [`Retry`] with one of the policies here, so all of them back off alike; the
//! local-mode supervisor's restarts use the same ceilings without jitter (like a kubelet).

use std::time::Duration;

use rand::Rng;

/// Backoff settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// First ceiling.
    pub initial: Duration,
    /// Largest ceiling.
    pub max: Duration,
}

impl Backoff {
    /// Hop links: a home dialing its main relays, a main relay dialing its peers.
    pub const DIAL: Backoff = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(10) };
    /// The config distribution subscription.
    pub const SUBSCRIBE: Backoff = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(5) };
    /// A sidecar's bootstrap: its first certificate, its first snapshot.
    pub const BOOTSTRAP: Backoff = Backoff { initial: Duration::from_millis(200), max: Duration::from_secs(30) };
    /// Restarts of a crashed node process (local mode; used without jitter).
    pub const RESTART: Backoff = Backoff { initial: Duration::from_millis(500), max: Duration::from_secs(10) };

    /// The ceiling before attempt `n` (0-based retry count).
    pub fn ceiling(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// A jittered wait before retry `n`.
    pub fn wait<R: Rng>(&self, n: u32, rng: &mut R) -> Duration {
        let c = self.ceiling(n).as_micros() as u64;
        Duration::from_micros(rng.random_range(0..=c))
    }
}

/// One reconnect or poll loop's state: failures in a row and the wait before the next try.
#[derive(Clone, Debug)]
pub struct Retry {
    policy: Backoff,
    failures: u32,
}

impl Retry {
    /// A loop that has not failed yet.
    pub fn new(policy: Backoff) -> Self {
        Self { policy, failures: 0 }
    }

    /// The attempt worked (a link registered, a session ran long enough): start over.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// The attempt ended or failed: the jittered wait before the next one.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.policy.wait(self.failures, &mut rand::rng());
        self.failures = self.failures.saturating_add(1);
        wait
    }

    /// The ceiling the next wait is drawn under (for logs).
    pub fn ceiling(&self) -> Duration {
        self.policy.ceiling(self.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn ceilings_double_up_to_the_max_and_waits_stay_below() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(5) };
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(10), Duration::from_secs(5));
        assert_eq!(b.ceiling(40), Duration::from_secs(5));
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let waits: Vec<Duration> = (0..200).map(|_| b.wait(2, &mut rng)).collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(400)));
        assert!(waits.iter().any(|w| *w < Duration::from_millis(100)), "full jitter reaches low values");
    }

    #[test]
    fn a_retry_backs_off_until_it_succeeds() {
        let mut r = Retry::new(Backoff::DIAL);
        let ceilings: Vec<Duration> = (0..8)
            .map(|_| {
                let c = r.ceiling();
                assert!(r.next_wait() <= c);
                c
            })
            .collect();
        assert_eq!(ceilings[0], Duration::from_millis(100));
        assert_eq!(ceilings[3], Duration::from_millis(800));
        assert_eq!(ceilings[7], Duration::from_secs(10));
        r.succeeded();
        assert_eq!(r.ceiling(), Duration::from_millis(100));
    }
}
