//! Pure delay calculator: capped exponential backoff with ± jitter. Takes the attempt
//! number and a seed, returns a `Duration`; never reads a clock or sleeps.

use std::time::Duration;

/// Backoff policy: `base * 2^(attempt-1)`, capped at `max`, then scaled by a random
/// factor in `[1 - jitter, 1 + jitter]` (and capped at `max` again).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the first retry. Defaults to 1 s.
    pub base: Duration,
    /// Upper bound on any delay. Defaults to 30 s.
    pub max: Duration,
    /// Relative jitter, 0.0 to 1.0. Defaults to 0.25 (±25 %).
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(30),
            jitter: 0.25,
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (1-based; 0 is treated as 1), jittered
    /// by `seed`. Same inputs, same output.
    pub fn delay(&self, attempt: u32, seed: u64) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let raw = self.base.saturating_mul(1u32 << exp).min(self.max);
        let jitter = self.jitter.clamp(0.0, 1.0);
        // Map the seed to [0, 1), then to [1 - j, 1 + j].
        let unit = (crate::uuid::splitmix64(seed) >> 11) as f64 / (1u64 << 53) as f64;
        let factor = 1.0 - jitter + 2.0 * jitter * unit;
        raw.mul_f64(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps() {
        let b = Backoff {
            jitter: 0.0,
            ..Backoff::default()
        };
        let secs: Vec<u64> = (1..=7).map(|a| b.delay(a, 0).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(b.delay(0, 0), Duration::from_secs(1));
        assert_eq!(b.delay(u32::MAX, 0), Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_in_bounds_and_varies() {
        let b = Backoff {
            base: Duration::from_secs(4),
            max: Duration::from_secs(100),
            jitter: 0.25,
        };
        let mut seen = std::collections::HashSet::new();
        for seed in 0..1000u64 {
            let d = b.delay(1, seed);
            assert!(
                d >= Duration::from_secs(3) && d <= Duration::from_secs(5),
                "{d:?}"
            );
            seen.insert(d.as_millis());
        }
        assert!(seen.len() > 100);
        assert_eq!(b.delay(2, 42), b.delay(2, 42));
    }

    #[test]
    fn jitter_never_exceeds_cap() {
        let b = Backoff {
            base: Duration::from_secs(16),
            max: Duration::from_secs(16),
            jitter: 0.25,
        };
        for seed in 0..500u64 {
            assert!(b.delay(3, seed) <= Duration::from_secs(16));
        }
    }
}
