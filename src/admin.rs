//! The admin API: `/healthz`, `/metrics` (Prometheus text format) and
//! `/api/status` (JSON, read by `portless status`). Loopback by default.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::watch;

use crate::catalog::{Catalog, Snapshot};
use crate::discovery::DiscoveryMetrics;
use crate::dns::DnsState;
use crate::metrics::{header, sample};

pub struct AdminState {
    pub snapshots: watch::Receiver<Snapshot>,
    pub discovery: Arc<DiscoveryMetrics>,
    pub docker_enabled: bool,
    pub dns: DnsState,
    /// None with --no-router.
    pub router: Option<crate::router_task::RouterHandle>,
    /// None without --cluster-etcd.
    pub cluster: Option<crate::cluster::ClusterStatusSource>,
}

/// The JSON of `/api/status`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Status {
    pub docker: DockerStatus,
    pub dns: DnsStatus,
    pub catalog: serde_json::Value,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct DockerStatus {
    pub enabled: bool,
    pub connected: bool,
    pub reconnects: u64,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct DnsStatus {
    pub domain: String,
    pub listeners: Vec<SocketAddr>,
    pub upstreams: Vec<SocketAddr>,
    pub names: usize,
}

/// Bind the admin listener now (so a bad address fails start-up) and serve
/// it in the background.
pub async fn start(addr: SocketAddr, state: Arc<AdminState>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the admin API on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "admin API listening");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(&state, req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(bound)
}

fn text(status: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

fn handle(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            render_metrics(state),
        ),
        "/api/status" => json(&status(state)),
        "/api/routes" => match &state.router {
            Some(r) => json(&r.routes_json()),
            None => text(
                StatusCode::NOT_FOUND,
                "text/plain",
                "the router is off (--no-router)\n".into(),
            ),
        },
        "/api/cluster" => match &state.cluster {
            Some(c) => json(&c.snapshot()),
            None => text(
                StatusCode::NOT_FOUND,
                "text/plain",
                "cluster mode is off (no --cluster-etcd)\n".into(),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(json) => text(StatusCode::OK, "application/json", json),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    }
}

fn status(state: &AdminState) -> Status {
    let catalog: Arc<Catalog> = state.snapshots.borrow().catalog.clone();
    Status {
        docker: DockerStatus {
            enabled: state.docker_enabled,
            connected: state.discovery.connected.load(Ordering::Relaxed) == 1,
            reconnects: state.discovery.reconnects.load(Ordering::Relaxed),
        },
        dns: DnsStatus {
            domain: state.dns.domain.clone(),
            listeners: state.dns.listeners.borrow().clone(),
            upstreams: state.dns.upstreams.clone(),
            names: state.dns.zone.load().len(),
        },
        catalog: serde_json::to_value(&*catalog).unwrap_or_default(),
    }
}

fn render_metrics(state: &AdminState) -> String {
    let mut out = String::new();
    let m = &state.dns.metrics;
    header(
        &mut out,
        "portless_dns_queries_total",
        "counter",
        "DNS queries by type and outcome.",
    );
    for (qtype, outcome, n) in m.queries() {
        sample(
            &mut out,
            "portless_dns_queries_total",
            &format!("type=\"{qtype}\",outcome=\"{outcome}\""),
            n,
        );
    }
    header(
        &mut out,
        "portless_dns_forwarded_total",
        "counter",
        "Forwarded queries by result.",
    );
    for (result, c) in [
        ("ok", &m.forward_ok),
        ("failed", &m.forward_failed),
        ("overloaded", &m.forward_overloaded),
    ] {
        sample(
            &mut out,
            "portless_dns_forwarded_total",
            &format!("result=\"{result}\""),
            c.load(Ordering::Relaxed),
        );
    }
    header(
        &mut out,
        "portless_dns_forward_tcp_retries_total",
        "counter",
        "Forwarded queries retried over TCP after truncation.",
    );
    sample(
        &mut out,
        "portless_dns_forward_tcp_retries_total",
        "",
        m.forward_tcp_retries.load(Ordering::Relaxed),
    );
    header(
        &mut out,
        "portless_dns_rate_limited_total",
        "counter",
        "UDP queries over their client's rate limit, by action: slip (TC=1 reply) or drop.",
    );
    for (action, c) in [
        ("slip", &m.rate_limited_slip),
        ("drop", &m.rate_limited_drop),
    ] {
        sample(
            &mut out,
            "portless_dns_rate_limited_total",
            &format!("action=\"{action}\""),
            c.load(Ordering::Relaxed),
        );
    }
    let upstreams = state.dns.forwarder.upstream_status();
    header(
        &mut out,
        "portless_dns_upstream_up",
        "gauge",
        "1 while an upstream answers; 0 while it is down (passed over, probed in the background).",
    );
    for u in &upstreams {
        sample(
            &mut out,
            "portless_dns_upstream_up",
            &format!("upstream=\"{}\"", u.addr),
            u8::from(u.up),
        );
    }
    header(
        &mut out,
        "portless_dns_upstream_srtt_seconds",
        "gauge",
        "Smoothed round-trip time of each upstream that has answered.",
    );
    for u in &upstreams {
        if let Some(srtt) = u.srtt {
            sample(
                &mut out,
                "portless_dns_upstream_srtt_seconds",
                &format!("upstream=\"{}\"", u.addr),
                srtt.as_secs_f64(),
            );
        }
    }
    header(
        &mut out,
        "portless_dns_tcp_connections_refused_total",
        "counter",
        "DNS TCP connections closed at once because --dns-tcp-max-connections were open.",
    );
    sample(
        &mut out,
        "portless_dns_tcp_connections_refused_total",
        "",
        m.tcp_refused.load(Ordering::Relaxed),
    );
    header(
        &mut out,
        "portless_dns_names",
        "gauge",
        "Names in the live zone.",
    );
    sample(
        &mut out,
        "portless_dns_names",
        "",
        state.dns.zone.load().len(),
    );
    let catalog = state.snapshots.borrow().catalog.clone();
    header(
        &mut out,
        "portless_catalog_containers",
        "gauge",
        "Running containers known.",
    );
    sample(
        &mut out,
        "portless_catalog_containers",
        "",
        catalog.containers.len(),
    );
    header(
        &mut out,
        "portless_catalog_remote_containers",
        "gauge",
        "Other cluster hosts' containers merged from etcd.",
    );
    sample(
        &mut out,
        "portless_catalog_remote_containers",
        "",
        catalog.len() - catalog.containers.len(),
    );
    header(
        &mut out,
        "portless_catalog_networks",
        "gauge",
        "Docker networks known.",
    );
    sample(
        &mut out,
        "portless_catalog_networks",
        "",
        catalog.networks.len(),
    );
    let d = &state.discovery;
    header(
        &mut out,
        "portless_docker_connected",
        "gauge",
        "1 while the Docker event stream is followed.",
    );
    sample(
        &mut out,
        "portless_docker_connected",
        "",
        d.connected.load(Ordering::Relaxed),
    );
    header(
        &mut out,
        "portless_docker_reconnects_total",
        "counter",
        "Reconnections to the Docker Engine.",
    );
    sample(
        &mut out,
        "portless_docker_reconnects_total",
        "",
        d.reconnects.load(Ordering::Relaxed),
    );
    header(
        &mut out,
        "portless_docker_events_total",
        "counter",
        "Docker events received.",
    );
    sample(
        &mut out,
        "portless_docker_events_total",
        "",
        d.events.load(Ordering::Relaxed),
    );
    state.dns.event_to_answer.render(
        &mut out,
        "portless_discovery_event_to_answer_seconds",
        "From a Docker event's emission to the DNS zone with its change being live.",
        "",
    );
    if let Some(router) = &state.router {
        router.render_metrics(&mut out);
    }
    if let Some(cluster) = &state.cluster {
        out.push_str(&cluster.snapshot().netplane.prometheus());
    }
    out
}
