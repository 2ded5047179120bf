//! When to order: renewal at two thirds of a certificate's lifetime, and
//! retries with exponential backoff that never come sooner than the
//! server's `Retry-After`. Pure functions, time passed in.

use std::time::{Duration, SystemTime};

/// When a certificate valid from `not_before` to `not_after` is renewed:
/// two thirds into its lifetime (Let's Encrypt's advice; a 90-day
/// certificate is renewed with 30 days left).
pub fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    not_before + life.mul_f64(2.0 / 3.0)
}

/// The wait before the next order after `failures` failed ones in a row
/// (at least 1): `base` doubling up to `max`, and no sooner than the
/// server's `Retry-After`.
pub fn retry_delay(
    failures: u32,
    base: Duration,
    max: Duration,
    retry_after: Option<SystemTime>,
    now: SystemTime,
) -> Duration {
    let doublings = failures.saturating_sub(1).min(30);
    let backoff = base.saturating_mul(1u32 << doublings).min(max);
    let server = retry_after
        .and_then(|t| t.duration_since(now).ok())
        .unwrap_or(Duration::ZERO);
    backoff.max(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_two_thirds_of_the_lifetime() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        assert_eq!(renew_at(t0, t0 + day * 90), t0 + day * 60);
        assert_eq!(
            renew_at(t0, t0 + Duration::from_secs(30)),
            t0 + Duration::from_secs(20)
        );
        // A certificate that ends before it starts is due at once.
        assert_eq!(renew_at(t0 + day, t0), t0 + day);
    }

    #[test]
    fn retries_back_off_exponentially_and_respect_retry_after() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = Duration::from_secs;
        let d = |n| retry_delay(n, s(10), s(3600), None, now);
        assert_eq!([d(1), d(2), d(3), d(4)], [s(10), s(20), s(40), s(80)]);
        assert_eq!(d(12), s(3600));
        assert_eq!(d(1000), s(3600));
        // The server asks for more: it gets it.
        assert_eq!(
            retry_delay(1, s(10), s(3600), Some(now + s(300)), now),
            s(300)
        );
        // A Retry-After in the past changes nothing.
        assert_eq!(retry_delay(2, s(10), s(3600), Some(now - s(5)), now), s(20));
    }
}
