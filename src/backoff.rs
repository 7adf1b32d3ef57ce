//! The one retry schedule of the crate: exponential from a minimum (the first failure waits the
//! minimum), capped at a maximum. Consul watches, the proxy lookup and JWKS fetches take it
//! jittered, because many of them fail together (one Consul restart) and must not retry
//! together; the applier's retries and a child's restart are single actors and take it plain,
//! so that their pauses are the ones their logs and tests state.

use std::time::Duration;

/// The pause before attempt `failures + 1` (`failures` counts from 1).
pub fn exponential(min: Duration, max: Duration, failures: u32) -> Duration {
    // 2^16 times any minimum used here is far past every maximum: the shift cannot overflow.
    min.saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(max)
}

/// `exponential`, spread over its upper half ([d/2, d]) at random.
pub fn jittered(min: Duration, max: Duration, failures: u32) -> Duration {
    let half = exponential(min, max, failures) / 2;
    half + half.mul_f64(crate::random::jitter_fraction())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_from_the_minimum_and_stops_at_the_maximum() {
        let (min, max) = (Duration::from_millis(250), Duration::from_secs(15));
        assert_eq!(exponential(min, max, 1), min);
        assert_eq!(exponential(min, max, 2), min * 2);
        assert_eq!(
            exponential(min, max, 0),
            min,
            "no failure yet waits the minimum"
        );
        assert_eq!(exponential(min, max, 40), max);
        assert_eq!(exponential(min, max, u32::MAX), max);
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let (min, max) = (Duration::from_millis(250), Duration::from_secs(15));
        for failures in 1..40 {
            let d = jittered(min, max, failures);
            let cap = exponential(min, max, failures);
            assert!(d >= cap / 2 && d <= cap, "{failures}: {d:?} vs {cap:?}");
        }
    }
}
