//! The router's counters. Lock-free on the request path: every counter is
//! an atomic, and per-route counters hang off the route, created when the
//! table is rebuilt. [`crate::Router::metrics`] copies them into a plain
//! [`Snapshot`]; the binary names and encodes it for `/metrics`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::error::ErrorSource;

/// Upper bounds of the latency buckets, in seconds (those of every
/// portless histogram: the binary checks that they agree).
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: &LATENCY_BUCKETS,
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            count: self.count.load(Relaxed),
            sum: Duration::from_micros(self.sum_micros.load(Relaxed)),
        }
    }
}

/// A [`Histogram`] at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Upper bounds, seconds.
    pub bounds: &'static [f64],
    /// Observations per bucket, not cumulative; those over the last bound
    /// are `count` minus their sum.
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum: Duration,
}

/// Requests of one route, by status class, and their latency to response
/// headers.
#[derive(Debug, Default)]
pub struct RouteStats {
    /// 1xx..5xx at index 0..4.
    pub by_class: [AtomicU64; 5],
    pub latency: Histogram,
}

impl RouteStats {
    pub fn record(&self, status: u16, elapsed: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Relaxed);
        self.latency.observe(elapsed);
    }

    pub fn total(&self) -> u64 {
        self.by_class.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub fn snapshot(&self, route: &str) -> RouteSnapshot {
        RouteSnapshot {
            route: route.to_owned(),
            by_class: std::array::from_fn(|i| self.by_class[i].load(Relaxed)),
            latency: self.latency.snapshot(),
        }
    }
}

/// One route's [`RouteStats`] at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSnapshot {
    /// The route's key (`host/prefix`); empty for requests no route took.
    pub route: String,
    /// Requests answered 1xx..5xx, at index 0..4.
    pub by_class: [u64; 5],
    /// Time to response headers.
    pub latency: HistogramSnapshot,
}

/// Every router counter at one moment (the fields are those of
/// [`Metrics`] unless said otherwise).
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Every route of the live table, then the unrouted requests (route
    /// `""`).
    pub routes: Vec<RouteSnapshot>,
    pub open_http: i64,
    pub open_https: i64,
    pub connections_total: u64,
    pub tls_handshake_failures: u64,
    pub proxy_protocol_failures: u64,
    pub retries: u64,
    pub ejections: u64,
    pub upstream_connect_errors: u64,
    pub upstream_timeouts: u64,
    pub websocket_upgrades: u64,
    /// Failed requests by whose fault, every [`ErrorSource`] once.
    pub failures: Vec<(ErrorSource, u64)>,
    /// Access log lines dropped; None without an access log.
    pub access_log_dropped: Option<u64>,
}

/// Router-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests that matched no route (or had no usable host).
    pub unrouted: RouteStats,
    pub open_http: AtomicI64,
    pub open_https: AtomicI64,
    pub connections_total: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    pub proxy_protocol_failures: AtomicU64,
    pub retries: AtomicU64,
    pub ejections: AtomicU64,
    pub upstream_connect_errors: AtomicU64,
    pub upstream_timeouts: AtomicU64,
    pub websocket_upgrades: AtomicU64,
    /// Requests that failed, by whose fault, at [`ErrorSource::index`].
    pub failures: [AtomicU64; 3],
}

impl Metrics {
    /// A copy of the router-wide counters, with `routes` (then the
    /// unrouted requests) as the per-route part.
    pub fn snapshot(
        &self,
        mut routes: Vec<RouteSnapshot>,
        access_log_dropped: Option<u64>,
    ) -> Snapshot {
        routes.push(self.unrouted.snapshot(""));
        Snapshot {
            routes,
            open_http: self.open_http.load(Relaxed),
            open_https: self.open_https.load(Relaxed),
            connections_total: self.connections_total.load(Relaxed),
            tls_handshake_failures: self.tls_handshake_failures.load(Relaxed),
            proxy_protocol_failures: self.proxy_protocol_failures.load(Relaxed),
            retries: self.retries.load(Relaxed),
            ejections: self.ejections.load(Relaxed),
            upstream_connect_errors: self.upstream_connect_errors.load(Relaxed),
            upstream_timeouts: self.upstream_timeouts.load(Relaxed),
            websocket_upgrades: self.websocket_upgrades.load(Relaxed),
            failures: ErrorSource::ALL
                .iter()
                .map(|s| (*s, self.failures[s.index()].load(Relaxed)))
                .collect(),
            access_log_dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_has_classes_buckets_and_the_unrouted_last() {
        let m = Metrics::default();
        let r = RouteStats::default();
        r.record(200, Duration::from_millis(3));
        r.record(502, Duration::from_secs(9));
        let s = m.snapshot(vec![r.snapshot("a.test/")], None);
        assert_eq!(s.routes.len(), 2);
        let a = &s.routes[0];
        assert_eq!(a.route, "a.test/");
        assert_eq!(a.by_class, [0, 1, 0, 0, 1]);
        // 3 ms falls in the 0.005 bucket; 9 s over every bound.
        let i = LATENCY_BUCKETS.iter().position(|b| *b == 0.005).unwrap();
        assert_eq!(a.latency.buckets[i], 1);
        assert_eq!(a.latency.buckets.iter().sum::<u64>(), 1);
        assert_eq!(a.latency.count, 2);
        assert_eq!(a.latency.sum, Duration::from_millis(9003));
        assert_eq!(s.routes[1].route, "");
        assert_eq!(s.failures.len(), ErrorSource::ALL.len());
    }
}
