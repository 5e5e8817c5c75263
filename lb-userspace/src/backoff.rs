//! Exponential backoff with jitter and a cap, for every retry loop (watches, applies).
//!
//! Each delay is drawn at random from the upper half of the current step (`step/2..=step`),
//! so instances that failed together do not retry together; the step doubles up to the cap.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher as _, Hasher as _};
use std::time::Duration;

/// Delays for successive retries: `first`, doubling, at most `cap`, each jittered.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    step: Duration,
    random: RandomState,
    draws: u64,
}

impl Backoff {
    /// A backoff that starts at `first` and never waits longer than `cap`.
    pub fn new(first: Duration, cap: Duration) -> Self {
        Backoff {
            first,
            cap,
            step: first,
            random: RandomState::new(),
            draws: 0,
        }
    }

    /// The delay before the next retry.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step.min(self.cap);
        self.step = step.saturating_mul(2).min(self.cap);
        let half = step / 2;
        let mut hasher = self.random.build_hasher();
        hasher.write_u64(self.draws);
        self.draws += 1;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(hasher.finish() % nanos.saturating_add(1))
    }

    /// Starts over from `first` (after a success).
    pub fn reset(&mut self) {
        self.step = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(3));
        let steps = [200, 400, 800, 1600, 3000, 3000, 3000];
        let mut delays = Vec::new();
        for step in steps {
            let delay = backoff.next_delay();
            let step = Duration::from_millis(step);
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} outside {:?}..={step:?}",
                step / 2
            );
            delays.push(delay);
        }
        let capped = &delays[4..];
        assert!(
            capped.iter().any(|delay| *delay != capped[0]),
            "jitter: capped delays all equal {capped:?}"
        );
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(200));
    }
}
