//! The hyper shell around the route table: serves listeners handed in by
//! the caller, forwards to backends, retries, ejects, tunnels upgrades.
//!
//! The request path reads the current table through one `ArcSwap` load and
//! otherwise touches only atomics; [`Router::update`] builds the next table
//! (and carries ejection state and counters over by identity) off the
//! request path.
//!
//! Split along the phases a request passes through, each layer using only
//! those below it:
//! - `state`: what they share (the live table and each route's and
//!   backend's runtime state, one thread's worker, in-progress marks).
//! - `upstream`: connections to backends (the h2c cache here, the HTTP/1
//!   pool in `crate::pool`, the error classifier).
//! - `request`: one request: route it, prepare the upstream request, send
//!   it (retries and ejection decided by `crate::policy`), finish the
//!   response.
//! - `connection`: one client connection (PROXY header, TLS, the idle
//!   watch, the send timeout).
//! - `serve`: serving threads and listeners.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tracing::debug;

use crate::host::HostPattern;
use crate::metrics::{self, Metrics};
use crate::options::{RouterOptions, h2_decoder_limit, max_head};
use crate::table::{BackendState, RouteKey, RouteSpec, RouteTable, Scheme};
use state::{BackendRuntime, Live, Registry, RouteRuntime, Shared};

mod connection;
mod request;
mod serve;
mod state;
mod upstream;

pub use serve::{RouterThreads, bind_reuseport};

/// A backend as shown in status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    pub id: String,
    pub name: String,
    pub addr: SocketAddr,
    pub scheme: Scheme,
    /// `healthy`, `starting`, `unhealthy`, `draining` or `ejected`.
    pub state: &'static str,
    /// Requests sent and not yet answered with headers.
    pub in_flight: i64,
    pub requests: u64,
    pub connect_failures: u64,
}

/// A route as shown in status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteStatus {
    /// `host/prefix`.
    pub key: String,
    pub host: String,
    pub path_prefix: String,
    pub requests: u64,
    pub backends: Vec<BackendStatus>,
}

/// The router: cheap to clone, shared by every listener.
#[derive(Clone)]
pub struct Router {
    shared: Arc<Shared>,
}

impl Router {
    /// A router with an empty table.
    pub fn new(opts: RouterOptions) -> Self {
        let mut server = auto::Builder::new(TokioExecutor::new());
        server
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(opts.header_read_timeout)
            // No half-close (hyper's default, and nginx's behaviour): a
            // client's EOF aborts its request in flight, so that a client
            // that leaves cannot keep a backend request (a stream, a long
            // poll) open after it; with half-close, hyper stops watching
            // the client's side until the answer is written.
            .half_close(false)
            .max_buf_size(max_head(&opts))
            .max_headers(opts.max_headers);
        server
            .http2()
            .timer(TokioTimer::new())
            // Not the limit itself: h2 answers a header block over its
            // limit with a GOAWAY or a reset that clients retry (curl sent
            // a 70 KB block five times), so the decoder takes more and
            // `route` answers 431 past the limit (see `h2_decoder_limit`).
            .max_header_list_size(
                u32::try_from(h2_decoder_limit(opts.max_header_bytes)).unwrap_or(u32::MAX),
            )
            .max_concurrent_streams(256)
            .keep_alive_interval(Duration::from_secs(30));
        Router {
            shared: Arc::new(Shared {
                opts,
                live: ArcSwap::from_pointee(Live::default()),
                registry: Mutex::new(Registry::default()),
                server,
                metrics: Metrics::default(),
                epoch: Instant::now(),
                hosts: tokio::sync::watch::Sender::new(Arc::default()),
            }),
        }
    }

    /// Replace the route table. Requests in flight finish on the table they
    /// started with; open WebSockets and streams are not touched.
    pub fn update(&self, specs: impl IntoIterator<Item = RouteSpec>) {
        let table = RouteTable::build(specs);
        // The registry is only touched here, never on the request path; a
        // poisoned lock only means an earlier update panicked half-way,
        // and the registry is rebuilt whole below anyway.
        let mut reg = self
            .shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut next = Registry::default();
        // Round-robin positions carry over, so that rebuilds (any container
        // event rebuilds the table) do not send the next request of every
        // route to its first backend.
        let old = self.shared.live.load();
        let old_rr: HashMap<&RouteKey, usize> = old
            .table
            .routes()
            .iter()
            .map(|r| (&r.payload.key, r.payload.rr.load(Relaxed)))
            .collect();
        let table = table.with_payload(|route| {
            let key = route.key();
            let stats = reg.routes.get(&key).cloned().unwrap_or_default();
            next.routes.insert(key.clone(), stats.clone());
            let backends = route
                .backends
                .iter()
                .map(|b| {
                    let ident = (b.id.clone(), b.addr, b.scheme);
                    let rt = reg
                        .backends
                        .get(&ident)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(BackendRuntime::new(b.addr)));
                    next.backends.insert(ident, rt.clone());
                    rt
                })
                .collect();
            let rr = AtomicUsize::new(old_rr.get(&key).copied().unwrap_or(0));
            RouteRuntime {
                log_key: Arc::from(key.0.as_str()),
                key,
                stats,
                backends,
                rr,
            }
        });
        *reg = next;
        let hosts: BTreeSet<String> = table
            .routes()
            .iter()
            .map(|r| match &r.host {
                HostPattern::Exact(h) => h.clone(),
                HostPattern::Wildcard(suffix) => format!("*.{suffix}"),
            })
            .collect();
        self.shared.hosts.send_if_modified(|old| {
            let changed = **old != hosts;
            if changed {
                *old = Arc::new(hosts);
            }
            changed
        });
        let n = table.len();
        self.shared.live.store(Arc::new(Live { table }));
        debug!(routes = n, "route table replaced");
    }

    /// The hosts of the table (exact, and wildcards as `*.suffix`), now and
    /// as they change: the names ACME orders certificates for (and no
    /// others).
    pub fn hosts(&self) -> tokio::sync::watch::Receiver<Arc<BTreeSet<String>>> {
        self.shared.hosts.subscribe()
    }

    /// Every route with its backends, for status.
    pub fn status(&self) -> Vec<RouteStatus> {
        let live = self.shared.live.load();
        let now = self.shared.now_ms();
        live.table
            .routes()
            .iter()
            .map(|r| (r, &r.payload))
            .map(|(r, rt)| RouteStatus {
                key: rt.key.0.clone(),
                host: r.host.to_string(),
                path_prefix: r.path_prefix.clone(),
                requests: rt.stats.total(),
                backends: r
                    .backends
                    .iter()
                    .zip(&rt.backends)
                    .map(|(b, brt)| BackendStatus {
                        id: b.id.clone(),
                        name: b.name.clone(),
                        addr: b.addr,
                        scheme: b.scheme,
                        state: match b.state {
                            BackendState::Healthy | BackendState::Starting if brt.ejected(now) => {
                                "ejected"
                            }
                            s => s.as_str(),
                        },
                        in_flight: brt.in_flight.load(Relaxed),
                        requests: brt.requests.load(Relaxed),
                        connect_failures: brt.connect_failures.load(Relaxed),
                    })
                    .collect(),
            })
            .collect()
    }

    /// Every counter of the router, for `/metrics`: per route of the live
    /// table, then the unrouted requests, then the router-wide ones.
    pub fn metrics(&self) -> metrics::Snapshot {
        let live = self.shared.live.load();
        let routes = live
            .table
            .routes()
            .iter()
            .map(|r| r.payload.stats.snapshot(&r.payload.key.0))
            .collect();
        self.shared.metrics.snapshot(
            routes,
            self.shared.opts.access_log.as_ref().map(|l| l.dropped()),
        )
    }
}
