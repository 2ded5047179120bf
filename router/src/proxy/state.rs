//! What the request path shares: the live table with each route's and
//! backend's runtime state, the router-wide state, one thread's worker,
//! and the marks that count connections and requests in progress.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::uri::Authority;
use hyper::client::conn::http2;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;

use crate::body::ReqBody;
use crate::headers::ClientInfo;
use crate::metrics::{Metrics, RouteStats};
use crate::options::RouterOptions;
use crate::pool::Http1Pool;
use crate::table::{RouteKey, RouteTable, Scheme};

/// Runtime state of one backend, kept across table rebuilds by identity
/// (id, address, scheme).
pub(crate) struct BackendRuntime {
    /// Milliseconds since the router's epoch; 0 = not ejected.
    pub(crate) ejected_until_ms: AtomicU64,
    pub(crate) in_flight: AtomicI64,
    pub(crate) requests: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) authority: Authority,
    /// The shared HTTP/2 connection to an h2c backend.
    pub(crate) h2: ArcSwapOption<http2::SendRequest<ReqBody>>,
    /// When the h2c connection last started or answered a request (the
    /// router's clock, ms).
    pub(crate) h2_used_ms: AtomicU64,
}

impl BackendRuntime {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        BackendRuntime {
            ejected_until_ms: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            requests: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            // A socket address always renders as a valid authority.
            authority: Authority::try_from(addr.to_string().as_str())
                .unwrap_or_else(|_| Authority::from_static("invalid")),
            h2: ArcSwapOption::empty(),
            h2_used_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Relaxed) > now_ms
    }
}

/// Runtime state of one route, kept across table rebuilds by its key (its
/// counters) or carried over (its round-robin position).
pub(crate) struct RouteRuntime {
    pub(crate) key: RouteKey,
    /// The key again, shared with access log lines.
    pub(crate) log_key: Arc<str>,
    pub(crate) stats: Arc<RouteStats>,
    pub(crate) backends: Vec<Arc<BackendRuntime>>,
    pub(crate) rr: AtomicUsize,
}

/// The table the request path reads, each route carrying its runtime
/// state.
#[derive(Default)]
pub(crate) struct Live {
    pub(crate) table: RouteTable<RouteRuntime>,
}

pub(crate) type BackendIdentity = (String, SocketAddr, Scheme);

#[derive(Default)]
pub(crate) struct Registry {
    pub(crate) backends: HashMap<BackendIdentity, Arc<BackendRuntime>>,
    pub(crate) routes: HashMap<RouteKey, Arc<RouteStats>>,
}

pub(crate) struct Shared {
    pub(crate) opts: RouterOptions,
    pub(crate) live: ArcSwap<Live>,
    pub(crate) registry: Mutex<Registry>,
    pub(crate) server: auto::Builder<TokioExecutor>,
    pub(crate) metrics: Metrics,
    pub(crate) epoch: Instant,
    /// The table's hosts (wildcards as `*.suffix`), for the ACME issuer.
    pub(crate) hosts: tokio::sync::watch::Sender<Arc<BTreeSet<String>>>,
}

/// One accept loop's view of the router: the shared table plus its own
/// upstream connection pool. With one worker per thread (see
/// [`Router::spawn_threads`]) a request never leaves its thread: client
/// connection, pool checkout and backend connection are all driven by the
/// same single-threaded runtime, with no cross-thread wake-ups.
pub(crate) struct Worker {
    pub(crate) shared: Arc<Shared>,
    pub(crate) pool: Arc<Http1Pool>,
}

impl std::ops::Deref for Worker {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Worker {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let pool = Arc::new(Http1Pool::new(
            shared.opts.pool_max_idle_per_backend,
            shared.opts.connect_timeout,
            shared.opts.pool_idle_timeout,
        ));
        // On the worker's own runtime: the pool is its thread's.
        Http1Pool::spawn_sweeper(&pool);
        Shared::spawn_h2c_sweeper(&shared);
        Worker { shared, pool }
    }
}

/// What a client connection looks like to request handling.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnInfo {
    pub(crate) client: ClientInfo,
}

/// What is going on on one client connection, for its idle watch.
#[derive(Default)]
pub(crate) struct Activity {
    /// Requests started plus requests ended.
    pub(crate) events: AtomicU64,
    /// Requests started and not ended (their response body not done).
    pub(crate) active: AtomicUsize,
}

/// One request in progress on a connection, from the moment hyper hands it
/// over until its response body is done or dropped.
pub(crate) struct Active(Arc<Activity>);

impl Active {
    pub(crate) fn new(activity: Arc<Activity>) -> Self {
        activity.events.fetch_add(1, Relaxed);
        activity.active.fetch_add(1, Relaxed);
        Active(activity)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
        self.0.events.fetch_add(1, Relaxed);
    }
}

/// Counts an open client connection (or its tunnel, once hyper let go of
/// it) in the open-connections gauge for as long as it lives, however it
/// ends.
pub(crate) struct OpenConn {
    pub(crate) shared: Arc<Shared>,
    pub(crate) tls: bool,
}

impl OpenConn {
    pub(crate) fn new(shared: Arc<Shared>, tls: bool) -> Self {
        shared.open_gauge(tls).fetch_add(1, Relaxed);
        OpenConn { shared, tls }
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.shared.open_gauge(self.tls).fetch_sub(1, Relaxed);
    }
}

impl Shared {
    pub(crate) fn open_gauge(&self, tls: bool) -> &AtomicI64 {
        if tls {
            &self.metrics.open_https
        } else {
            &self.metrics.open_http
        }
    }

    /// Let go of every h2c connection unused for the pool's idle timeout:
    /// dropping the cached handle closes the connection once the streams
    /// still on it (a long gRPC stream) end; the next request opens
    /// another.
    pub(crate) fn sweep_h2c(&self) {
        let idle = u64::try_from(self.opts.pool_idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let now = self.now_ms();
        let live = self.live.load();
        for route in live.table.routes() {
            for brt in &route.payload.backends {
                if brt.h2.load().is_some()
                    && now.saturating_sub(brt.h2_used_ms.load(Relaxed)) > idle
                {
                    brt.h2.store(None);
                }
            }
        }
    }

    /// Sweep h2c connections every quarter of the idle timeout, on the
    /// current runtime, while the router lives. (h2c connections are
    /// shared by all threads: each worker sweeps, which is harmless.)
    pub(crate) fn spawn_h2c_sweeper(shared: &Arc<Self>) {
        let every = (shared.opts.pool_idle_timeout / 4).clamp(
            std::time::Duration::from_millis(10),
            std::time::Duration::from_secs(15),
        );
        let shared = Arc::downgrade(shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match shared.upgrade() {
                    Some(s) => s.sweep_h2c(),
                    None => break,
                }
            }
        });
    }

    pub(crate) fn now_ms(&self) -> u64 {
        // Starts at 1 so that 0 can mean "never ejected".
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
    }
}
