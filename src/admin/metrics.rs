//! `/metrics`: every metric portless exports, named here from the plain
//! snapshots the parts hand out, and encoded by `crate::metrics`. The names,
//! types and labels are those the Grafana dashboard
//! (`charts/portless/dashboards/portless.json`) queries.

use std::sync::atomic::Ordering;

use portless_dns::forward::UpstreamStatus;
use portless_netplane::agent;
use portless_netplane::model::Transport;

use super::AdminState;
use crate::catalog::Catalog;
use crate::discovery::DiscoveryMetrics;
use crate::metrics::{Histogram, Kind, Text};

pub(super) fn render(state: &AdminState) -> String {
    let mut t = Text::default();
    dns(
        &mut t,
        &state.dns.metrics.snapshot(),
        &state.dns.forwarder.upstream_status(),
        state.dns.zone.load().len(),
    );
    let catalog = state.snapshots.borrow().catalog.clone();
    catalog_and_docker(&mut t, &catalog, &state.discovery);
    t.family(
        "portless_discovery_event_to_answer_seconds",
        Kind::Histogram,
        "From a Docker event's emission to the DNS zone with its change being live.",
    )
    .histogram(&[], &state.dns.event_to_answer.snapshot());
    if let Some(router) = &state.router {
        self::router(&mut t, &router.metrics());
        if let Some((certs, orders)) = router.acme() {
            acme(&mut t, &certs, orders, std::time::SystemTime::now());
        }
    }
    if let Some(cluster) = &state.cluster {
        netplane(&mut t, &cluster.snapshot().netplane);
    }
    t.finish()
}

/// Automatic HTTPS: certificates by state, each one's time to expiry,
/// failures in a row, and orders by result.
fn acme(
    t: &mut Text,
    certs: &[portless_router::acme::CertStatus],
    (issued, failed): (u64, u64),
    now: std::time::SystemTime,
) {
    use portless_router::acme::CertPhase;
    let mut f = t.family(
        "portless_acme_certificates",
        Kind::Gauge,
        "Hosts with automatic HTTPS by certificate state (pending: none yet; failed: the last order failed).",
    );
    for phase in [CertPhase::Pending, CertPhase::Valid, CertPhase::Failed] {
        let n = certs.iter().filter(|c| c.phase == phase).count();
        f.sample(&[("state", phase.as_str())], n);
    }
    let mut f = t.family(
        "portless_acme_certificate_expiry_seconds",
        Kind::Gauge,
        "Time until the served ACME certificate of a host expires (negative: expired); divide by 86400 for days.",
    );
    for c in certs {
        if let Some(end) = c.not_after {
            let secs = match end.duration_since(now) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            f.sample(&[("host", &c.host)], secs.round());
        }
    }
    let mut f = t.family(
        "portless_acme_order_failures",
        Kind::Gauge,
        "Orders of a host failed in a row (0 after a success).",
    );
    for c in certs {
        f.sample(&[("host", &c.host)], c.failures);
    }
    t.family(
        "portless_acme_orders_total",
        Kind::Counter,
        "Certificate orders since the start, by result.",
    )
    .sample(&[("result", "issued")], issued)
    .sample(&[("result", "failed")], failed);
}

fn dns(
    t: &mut Text,
    m: &portless_dns::metrics::Snapshot,
    upstreams: &[UpstreamStatus],
    names: usize,
) {
    let mut f = t.family(
        "portless_dns_queries_total",
        Kind::Counter,
        "DNS queries by type and outcome.",
    );
    for q in &m.queries {
        f.sample(&[("type", q.qtype), ("outcome", q.outcome)], q.count);
    }
    t.family(
        "portless_dns_forwarded_total",
        Kind::Counter,
        "Forwarded queries by result.",
    )
    .sample(&[("result", "ok")], m.forward_ok)
    .sample(&[("result", "failed")], m.forward_failed)
    .sample(&[("result", "overloaded")], m.forward_overloaded);
    t.single(
        "portless_dns_forward_tcp_retries_total",
        Kind::Counter,
        "Forwarded queries retried over TCP after truncation.",
        m.forward_tcp_retries,
    );
    t.family(
        "portless_dns_rate_limited_total",
        Kind::Counter,
        "UDP queries over their client's rate limit, by action: slip (TC=1 reply) or drop.",
    )
    .sample(&[("action", "slip")], m.rate_limited_slip)
    .sample(&[("action", "drop")], m.rate_limited_drop);
    let mut f = t.family(
        "portless_dns_upstream_up",
        Kind::Gauge,
        "1 while an upstream answers; 0 while it is down (passed over, probed in the background).",
    );
    for u in upstreams {
        f.sample(&[("upstream", &u.addr.to_string())], u.up);
    }
    let mut f = t.family(
        "portless_dns_upstream_srtt_seconds",
        Kind::Gauge,
        "Smoothed round-trip time of each upstream that has answered.",
    );
    for u in upstreams {
        if let Some(srtt) = u.srtt {
            f.sample(&[("upstream", &u.addr.to_string())], srtt.as_secs_f64());
        }
    }
    t.single(
        "portless_dns_tcp_connections_refused_total",
        Kind::Counter,
        "DNS TCP connections closed at once because --dns-tcp-max-connections were open.",
        m.tcp_refused,
    );
    t.single(
        "portless_dns_names",
        Kind::Gauge,
        "Names in the live zone.",
        names,
    );
}

fn catalog_and_docker(t: &mut Text, catalog: &Catalog, d: &DiscoveryMetrics) {
    t.single(
        "portless_catalog_containers",
        Kind::Gauge,
        "Running containers known.",
        catalog.containers.len(),
    );
    t.single(
        "portless_catalog_remote_containers",
        Kind::Gauge,
        "Other cluster hosts' containers merged from etcd.",
        catalog.len() - catalog.containers.len(),
    );
    t.single(
        "portless_catalog_networks",
        Kind::Gauge,
        "Docker networks known.",
        catalog.networks.len(),
    );
    t.single(
        "portless_docker_connected",
        Kind::Gauge,
        "1 while the Docker event stream is followed.",
        d.connected.load(Ordering::Relaxed),
    );
    t.single(
        "portless_docker_reconnects_total",
        Kind::Counter,
        "Reconnections to the Docker Engine.",
        d.reconnects.load(Ordering::Relaxed),
    );
    t.single(
        "portless_docker_events_total",
        Kind::Counter,
        "Docker events received.",
        d.events.load(Ordering::Relaxed),
    );
}

fn latency(h: &portless_router::metrics::HistogramSnapshot) -> Histogram {
    Histogram {
        bounds: h.bounds.to_vec(),
        buckets: h.buckets.clone(),
        count: h.count,
        sum_seconds: h.sum.as_secs_f64(),
    }
}

fn router(t: &mut Text, m: &portless_router::metrics::Snapshot) {
    const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
    let mut f = t.family(
        "portless_router_requests_total",
        Kind::Counter,
        "Requests by route and status class (route=\"\" matched none).",
    );
    for r in &m.routes {
        for (class, n) in CLASSES.iter().zip(r.by_class) {
            f.sample(&[("route", &r.route), ("class", class)], n);
        }
    }
    let mut f = t.family(
        "portless_router_request_duration_seconds",
        Kind::Histogram,
        "Time to response headers.",
    );
    for r in &m.routes {
        f.histogram(&[("route", &r.route)], &latency(&r.latency));
    }
    t.family(
        "portless_router_open_connections",
        Kind::Gauge,
        "Client connections open now.",
    )
    .sample(&[("listener", "http")], m.open_http)
    .sample(&[("listener", "https")], m.open_https);
    let mut f = t.family(
        "portless_router_failures_total",
        Kind::Counter,
        "Requests answered with an error, by whose fault it was.",
    );
    for (source, n) in &m.failures {
        f.sample(&[("fault", source.as_str())], *n);
    }
    for (name, help, v) in [
        (
            "portless_router_connections_total",
            "Client connections accepted.",
            m.connections_total,
        ),
        (
            "portless_router_tls_handshake_failures_total",
            "TLS handshakes that failed.",
            m.tls_handshake_failures,
        ),
        (
            "portless_router_proxy_protocol_failures_total",
            "Connections dropped for a missing or bad PROXY header.",
            m.proxy_protocol_failures,
        ),
        (
            "portless_router_retries_total",
            "Requests retried on another backend after a connect failure.",
            m.retries,
        ),
        (
            "portless_router_ejections_total",
            "Backends ejected after a connect failure.",
            m.ejections,
        ),
        (
            "portless_router_upstream_connect_errors_total",
            "Failed connects to backends.",
            m.upstream_connect_errors,
        ),
        (
            "portless_router_upstream_timeouts_total",
            "Backends that did not answer in time.",
            m.upstream_timeouts,
        ),
        (
            "portless_router_websocket_upgrades_total",
            "Upgraded (WebSocket) connections.",
            m.websocket_upgrades,
        ),
    ] {
        t.single(name, Kind::Counter, help, v);
    }
    if let Some(dropped) = m.access_log_dropped {
        t.single(
            "portless_router_access_log_dropped_total",
            Kind::Counter,
            "Access log lines dropped because the writer could not keep up.",
            dropped,
        );
    }
}

/// Reasons a container record is refused, as the netplane names them in
/// `refused_total`; each is a sample even before it happens.
const REFUSAL_REASONS: [&str; 5] = [
    "malformed",
    "key-mismatch",
    "not-the-hosts",
    "address-outside-subnet",
    "bad-field",
];

fn netplane(t: &mut Text, s: &agent::Status) {
    t.single(
        "portless_netplane_lease_held",
        Kind::Gauge,
        "1 when this host holds its subnet lease.",
        s.host.is_some(),
    );
    t.single(
        "portless_netplane_etcd_connected",
        Kind::Gauge,
        "1 when etcd answered the last keep-alive.",
        s.etcd_connected,
    );
    let count = |tr: Transport, in_place: Option<bool>| {
        s.peers
            .iter()
            .filter(|p| p.transport == tr && in_place.is_none_or(|i| p.in_place == i))
            .count()
    };
    t.family(
        "portless_netplane_peers",
        Kind::Gauge,
        "Peers by transport.",
    )
    .sample(&[("transport", "vxlan")], count(Transport::Vxlan, None))
    .sample(&[("transport", "route")], count(Transport::Route, None));
    t.family(
        "portless_netplane_peers_not_in_place",
        Kind::Gauge,
        "Peers whose kernel entries are not all in place.",
    )
    .sample(
        &[("transport", "vxlan")],
        count(Transport::Vxlan, Some(false)),
    )
    .sample(
        &[("transport", "route")],
        count(Transport::Route, Some(false)),
    );
    t.single(
        "portless_netplane_peers_refused",
        Kind::Gauge,
        "Peers that cannot be reached in the configured mode.",
        s.refused.len(),
    );
    t.single(
        "portless_netplane_reconciles_total",
        Kind::Counter,
        "Comparisons of the kernel with the plan.",
        s.reconciles,
    );
    t.single(
        "portless_netplane_netlink_ops_total",
        Kind::Counter,
        "Netlink changes applied.",
        s.ops_applied,
    );
    let r = &s.records;
    t.single(
        "portless_cluster_records_published",
        Kind::Gauge,
        "This host's container records held in etcd.",
        r.published,
    );
    t.single(
        "portless_cluster_records_pending",
        Kind::Gauge,
        "This host's container records not yet written.",
        r.pending,
    );
    t.single(
        "portless_cluster_record_writes_total",
        Kind::Counter,
        "Container record writes (puts and deletes) by this host.",
        r.writes,
    );
    t.single(
        "portless_cluster_records_merged",
        Kind::Gauge,
        "Other hosts' container records answered and routed here.",
        r.merged,
    );
    t.single(
        "portless_cluster_records_refused",
        Kind::Gauge,
        "Container records in etcd refused now (forged or malformed).",
        r.refused,
    );
    let mut f = t.family(
        "portless_cluster_records_refused_total",
        Kind::Counter,
        "Container records refused, by reason.",
    );
    for reason in REFUSAL_REASONS {
        f.sample(
            &[("reason", reason)],
            r.refused_total.get(reason).copied().unwrap_or(0),
        );
    }
    let lag = &r.watch_lag;
    t.family(
        "portless_cluster_watch_lag_seconds",
        Kind::Histogram,
        "Time from a change on its host to its record arriving here.",
    )
    .histogram(
        &[],
        &Histogram::from_cumulative(
            &agent::LAG_BUCKETS,
            &lag.buckets,
            lag.count,
            std::time::Duration::from_micros(lag.sum_us),
        ),
    );
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use portless_netplane::agent::PeerStatus;
    use portless_netplane::model::Mode;
    use portless_router::metrics::{Metrics, RouteStats};

    use super::*;

    #[test]
    fn netplane_peers_are_counted_by_transport() {
        let peer = |id: &str, t: Transport, in_place: bool| PeerStatus {
            id: id.into(),
            hostname: String::new(),
            subnet: "10.244.2.0/24".parse().unwrap(),
            underlay: Ipv4Addr::new(192, 0, 2, 2),
            mode: Mode::Auto,
            transport: t,
            in_place,
        };
        let s = agent::Status {
            etcd_connected: true,
            peers: vec![
                peer("a", Transport::Vxlan, true),
                peer("b", Transport::Vxlan, false),
                peer("c", Transport::Route, true),
            ],
            reconciles: 7,
            ops_applied: 12,
            ..agent::Status::default()
        };
        let mut t = Text::default();
        netplane(&mut t, &s);
        let text = t.finish();
        for line in [
            "portless_netplane_lease_held 0",
            "portless_netplane_etcd_connected 1",
            "portless_netplane_peers{transport=\"vxlan\"} 2",
            "portless_netplane_peers{transport=\"route\"} 1",
            "portless_netplane_peers_not_in_place{transport=\"vxlan\"} 1",
            "portless_netplane_peers_refused 0",
            "portless_netplane_reconciles_total 7",
            "portless_netplane_netlink_ops_total 12",
            "portless_cluster_records_refused_total{reason=\"bad-field\"} 0",
            "portless_cluster_watch_lag_seconds_bucket{le=\"+Inf\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
    }

    /// A route's key comes from a container's labels: a path may hold `"`
    /// and `\`, which the text must escape.
    #[test]
    fn router_routes_are_labelled_escaped_and_in_seconds() {
        let stats = RouteStats::default();
        stats.record(200, Duration::from_millis(3));
        stats.record(502, Duration::from_secs(9));
        let route_key = "a.test/x\"y\\z";
        let m = Metrics::default().snapshot(vec![stats.snapshot(route_key)], Some(4));
        let mut t = Text::default();
        router(&mut t, &m);
        let text = t.finish();
        let label = "route=\"a.test/x\\\"y\\\\z\"";
        for line in [
            format!("portless_router_requests_total{{{label},class=\"2xx\"}} 1"),
            format!("portless_router_requests_total{{{label},class=\"5xx\"}} 1"),
            format!("portless_router_request_duration_seconds_bucket{{{label},le=\"0.005\"}} 1"),
            format!("portless_router_request_duration_seconds_bucket{{{label},le=\"+Inf\"}} 2"),
            format!("portless_router_request_duration_seconds_sum{{{label}}} 9.003"),
            "portless_router_open_connections{listener=\"http\"} 0".to_owned(),
            "portless_router_failures_total{fault=\"backend\"} 0".to_owned(),
            "portless_router_access_log_dropped_total 4".to_owned(),
            "portless_router_requests_total{route=\"\",class=\"4xx\"} 0".to_owned(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
    }
}
