//! Response rate limiting: a token bucket per client address.
//!
//! UDP sources can be spoofed: a container with CAP_NET_RAW can send
//! queries "from" another container, and the replies (a forwarded one can
//! be 100x the query) land on that victim. So replies per address are
//! limited, as BIND and Knot do: within the rate every query is answered;
//! over it, every `slip`-th one gets a small truncated reply (TC=1, no
//! records, never larger than the query), which sends a real client to
//! TCP, where spoofing is impossible, and the rest are dropped.
//!
//! Pure: the caller passes the time in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

/// The limit, per client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Replies per second; the bucket holds one second's worth, so a
    /// client may burst up to this many at once.
    pub per_second: u32,
    /// Over the limit, every `slip`-th reply is a truncated one; 0: none
    /// (drop them all), 1: all of them.
    pub slip: u32,
}

impl Default for RateLimit {
    /// 100 replies a second (an app resolving names, even in bursts, stays
    /// well under it), every second reply over it truncated.
    fn default() -> Self {
        RateLimit {
            per_second: 100,
            slip: 2,
        }
    }
}

/// What to do with one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Answer,
    /// Reply with TC=1 and nothing else.
    Slip,
    Drop,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Duration,
    /// Replies refused since the bucket last had a token, for the slip.
    limited: u32,
}

/// Clients tracked at once. Past it, stale entries (whose bucket has
/// refilled) are swept; if all are live, a new address goes untracked
/// until room comes back, while every tracked address stays limited.
const MAX_CLIENTS: usize = 65_536;

#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Take one reply's token for `client` at `now` (any monotonic clock's
    /// time since a fixed start).
    pub fn check(&self, client: IpAddr, now: Duration) -> Verdict {
        let rate = f64::from(self.limit.per_second.max(1));
        let client = client.to_canonical();
        let Ok(mut buckets) = self.buckets.lock() else {
            // A panic while holding the lock: answer rather than go silent.
            return Verdict::Answer;
        };
        if !buckets.contains_key(&client) && buckets.len() >= MAX_CLIENTS {
            buckets
                .retain(|_, b| b.tokens + rate * (now.saturating_sub(b.at)).as_secs_f64() < rate);
            if buckets.len() >= MAX_CLIENTS {
                return Verdict::Answer;
            }
        }
        let b = buckets.entry(client).or_insert(Bucket {
            tokens: rate,
            at: now,
            limited: 0,
        });
        let elapsed = now.saturating_sub(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(rate);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            b.limited = 0;
            return Verdict::Answer;
        }
        b.limited = b.limited.wrapping_add(1);
        match self.limit.slip {
            0 => Verdict::Drop,
            s if b.limited % s == 0 => Verdict::Slip,
            _ => Verdict::Drop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_within_the_rate_is_answered_then_every_second_reply_slips() {
        let l = RateLimiter::new(RateLimit {
            per_second: 10,
            slip: 2,
        });
        let t = Duration::from_secs(100);
        let verdicts: Vec<Verdict> = (0..20).map(|_| l.check(ip("10.0.0.2"), t)).collect();
        assert!(verdicts[..10].iter().all(|v| *v == Verdict::Answer));
        for (i, v) in verdicts[10..].iter().enumerate() {
            let want = if i % 2 == 1 {
                Verdict::Slip
            } else {
                Verdict::Drop
            };
            assert_eq!(*v, want, "limited reply {i}");
        }
        // Another address has its own bucket.
        assert_eq!(l.check(ip("10.0.0.3"), t), Verdict::Answer);
        // The same address seen as IPv4-mapped is the same client.
        assert_ne!(l.check(ip("::ffff:10.0.0.2"), t), Verdict::Answer);
        // Refilled at the rate: 0.25 s gives 2.5 tokens.
        let later = t + Duration::from_millis(250);
        let answered = (0..5)
            .filter(|_| l.check(ip("10.0.0.2"), later) == Verdict::Answer)
            .count();
        assert_eq!(answered, 2);
    }

    #[test]
    fn a_client_at_its_rate_is_never_limited() {
        let l = RateLimiter::new(RateLimit {
            per_second: 10,
            slip: 2,
        });
        for i in 0..1000u64 {
            let now = Duration::from_millis(i * 100);
            assert_eq!(l.check(ip("10.0.0.2"), now), Verdict::Answer, "query {i}");
        }
    }

    #[test]
    fn slip_zero_drops_and_slip_one_truncates_everything_over_the_limit() {
        for (slip, want) in [(0, Verdict::Drop), (1, Verdict::Slip)] {
            let l = RateLimiter::new(RateLimit {
                per_second: 1,
                slip,
            });
            let t = Duration::ZERO;
            assert_eq!(l.check(ip("10.0.0.2"), t), Verdict::Answer);
            for _ in 0..5 {
                assert_eq!(l.check(ip("10.0.0.2"), t), want);
            }
        }
    }

    #[test]
    fn many_spoofed_sources_cannot_free_a_victims_bucket() {
        let l = RateLimiter::new(RateLimit {
            per_second: 5,
            slip: 0,
        });
        let t = Duration::from_secs(1);
        for _ in 0..5 {
            assert_eq!(l.check(ip("10.0.0.2"), t), Verdict::Answer);
        }
        for i in 0..(MAX_CLIENTS as u32 + 10) {
            l.check(
                IpAddr::from(0x0b00_0000u32.wrapping_add(i).to_be_bytes()),
                t,
            );
        }
        assert_eq!(l.check(ip("10.0.0.2"), t), Verdict::Drop);
    }
}
