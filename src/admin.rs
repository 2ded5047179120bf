//! The admin API: `/healthz`, `/metrics` (Prometheus text format, named
//! in [`metrics`] and encoded by `crate::metrics`) and the JSON endpoints
//! of `crate::api` (read by `portless status`). Loopback by default.

mod metrics;

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

use crate::api;
use crate::catalog::Snapshot;
use crate::discovery::DiscoveryMetrics;
use crate::dns::DnsState;

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
            metrics::render(state),
        ),
        "/api/status" => json(&status(state)),
        "/api/routes" => match &state.router {
            Some(r) => json(&r.routes()),
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

fn status(state: &AdminState) -> api::Status {
    api::Status {
        docker: api::DockerStatus {
            enabled: state.docker_enabled,
            connected: state.discovery.connected.load(Ordering::Relaxed) == 1,
            reconnects: state.discovery.reconnects.load(Ordering::Relaxed),
        },
        dns: api::DnsStatus {
            domain: state.dns.domain.clone(),
            listeners: state.dns.listeners.borrow().clone(),
            upstreams: state.dns.upstreams.clone(),
            names: state.dns.zone.load().len(),
        },
        catalog: state.snapshots.borrow().catalog.clone(),
    }
}
