//! Exponential backoff with full jitter (AWS architecture blog's "full jitter"): the n-th
//! wait is uniform in `[0, min(max, initial * 2^n)]`.

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
}
