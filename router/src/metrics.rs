//! Counters the binary renders in Prometheus text format. Lock-free on the
//! request path: every counter is an atomic, and per-route counters hang off
//! the route, created when the table is rebuilt.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::error::ErrorSource;

/// Upper bounds of the latency buckets, in seconds.
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

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Render routes and router-wide metrics in Prometheus text format.
pub(crate) fn render<'a>(
    out: &mut String,
    m: &'a Metrics,
    routes: impl Iterator<Item = (&'a str, &'a RouteStats)> + Clone,
) {
    let all = routes.chain(std::iter::once(("", &m.unrouted)));
    // Writing to a String cannot fail: the results are ignored below.
    let _ = writeln!(
        out,
        "# HELP portless_router_requests_total Requests by route and status class (route=\"\" matched none).\n# TYPE portless_router_requests_total counter"
    );
    for (route, s) in all.clone() {
        for (i, c) in s.by_class.iter().enumerate() {
            let _ = writeln!(
                out,
                "portless_router_requests_total{{route=\"{}\",class=\"{}xx\"}} {}",
                esc(route),
                i + 1,
                c.load(Relaxed)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP portless_router_request_duration_seconds Time to response headers.\n# TYPE portless_router_request_duration_seconds histogram"
    );
    for (route, s) in all {
        let route = esc(route);
        let mut cum = 0;
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            cum += s.latency.buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "portless_router_request_duration_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {cum}"
            );
        }
        let count = s.latency.count.load(Relaxed);
        let _ = writeln!(
            out,
            "portless_router_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {count}\nportless_router_request_duration_seconds_sum{{route=\"{route}\"}} {}\nportless_router_request_duration_seconds_count{{route=\"{route}\"}} {count}",
            s.latency.sum_micros.load(Relaxed) as f64 / 1e6
        );
    }
    let _ = writeln!(
        out,
        "# HELP portless_router_open_connections Client connections open now.\n# TYPE portless_router_open_connections gauge\nportless_router_open_connections{{listener=\"http\"}} {}\nportless_router_open_connections{{listener=\"https\"}} {}",
        m.open_http.load(Relaxed),
        m.open_https.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP portless_router_failures_total Requests answered with an error, by whose fault it was.\n# TYPE portless_router_failures_total counter"
    );
    for s in ErrorSource::ALL {
        let _ = writeln!(
            out,
            "portless_router_failures_total{{fault=\"{}\"}} {}",
            s.as_str(),
            m.failures[s.index()].load(Relaxed)
        );
    }
    for (name, help, v) in [
        (
            "connections_total",
            "Client connections accepted.",
            &m.connections_total,
        ),
        (
            "tls_handshake_failures_total",
            "TLS handshakes that failed.",
            &m.tls_handshake_failures,
        ),
        (
            "proxy_protocol_failures_total",
            "Connections dropped for a missing or bad PROXY header.",
            &m.proxy_protocol_failures,
        ),
        (
            "retries_total",
            "Requests retried on another backend after a connect failure.",
            &m.retries,
        ),
        (
            "ejections_total",
            "Backends ejected after a connect failure.",
            &m.ejections,
        ),
        (
            "upstream_connect_errors_total",
            "Failed connects to backends.",
            &m.upstream_connect_errors,
        ),
        (
            "upstream_timeouts_total",
            "Backends that did not answer in time.",
            &m.upstream_timeouts,
        ),
        (
            "websocket_upgrades_total",
            "Upgraded (WebSocket) connections.",
            &m.websocket_upgrades,
        ),
    ] {
        render_counter(out, name, help, v.load(Relaxed));
    }
}

/// One router-wide counter.
pub(crate) fn render_counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP portless_router_{name} {help}\n# TYPE portless_router_{name} counter\nportless_router_{name} {v}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_classes_buckets_and_gauges() {
        let m = Metrics::default();
        let r = RouteStats::default();
        r.record(200, Duration::from_millis(3));
        r.record(502, Duration::from_secs(9));
        let mut out = String::new();
        render(&mut out, &m, [("a.test/", &r)].into_iter());
        assert!(out.contains("portless_router_requests_total{route=\"a.test/\",class=\"2xx\"} 1"));
        assert!(out.contains("portless_router_requests_total{route=\"a.test/\",class=\"5xx\"} 1"));
        assert!(out.contains(
            "portless_router_request_duration_seconds_bucket{route=\"a.test/\",le=\"0.005\"} 1"
        ));
        assert!(out.contains(
            "portless_router_request_duration_seconds_bucket{route=\"a.test/\",le=\"+Inf\"} 2"
        ));
        assert!(out.contains("portless_router_open_connections{listener=\"http\"} 0"));
        assert!(out.contains("portless_router_failures_total{fault=\"backend\"} 0"));
    }
}
