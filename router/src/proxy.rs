//! The hyper shell around the route table: serves listeners handed in by
//! the caller, forwards to backends, retries, ejects, tunnels upgrades.
//!
//! The request path reads the current table through one `ArcSwap` load and
//! otherwise touches only atomics; [`Router::update`] builds the next table
//! (and carries ejection state and counters over by identity) off the
//! request path.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme as UriScheme};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{Either, Empty, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

/// Threads serving the router's listeners, one single-threaded runtime
/// each. Dropping this stops them (their open connections are closed).
pub struct RouterThreads {
    stop: tokio::sync::watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl RouterThreads {
    /// Stop every thread and wait for them to end.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for RouterThreads {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Bind `n` listening sockets to the same address with `SO_REUSEPORT`, so
/// that the kernel spreads new connections over [`Router::spawn_threads`]'s
/// threads. With port 0, all get the port the first one was given.
pub fn bind_reuseport(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    if addr.port() != 0 {
        // SO_REUSEPORT would let this bind share a port that another
        // process of the same user already serves (another portless, say),
        // silently splitting its connections. A plain bind first makes
        // "address in use" an error, as it should be.
        drop(std::net::TcpListener::bind(addr)?);
    }
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    let mut bind_to = addr;
    for _ in 0..n.max(1) {
        let s = Socket::new(
            Domain::for_address(bind_to),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        if bind_to.is_ipv6() && bind_to.ip().is_unspecified() {
            // `[::]` means every address, IPv4 included.
            s.set_only_v6(false)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&bind_to.into())?;
        s.listen(1024)?;
        let l: std::net::TcpListener = s.into();
        bind_to = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

use crate::access_log::{AccessLog, Entry};
use crate::balance::{self, Candidate};
use crate::error::{ErrorKind, ErrorSource, ProxyError};
use crate::h1_guard::{FramingHandle, H1Guard, Verdict};
use crate::headers::{self, ClientInfo};
use crate::host::{normalize_authority, same_authority};
use crate::io::{Prefixed, SendTimeout, read_proxy_header};
use crate::metrics::{self, Metrics, RouteStats};
use crate::policy;
use crate::pool::Http1Pool;
use crate::proxy_protocol::ProxyHeader;
use crate::table::{BackendState, RouteKey, RouteSpec, RouteTable, Scheme};

/// Body sent to a backend: the client's (with the size limit), or empty for
/// requests without one (so that they can be sent again on retry).
pub type ReqBody = Either<ClientBody<Limited<Incoming>>, Empty<Bytes>>;

/// The client's side of a request body failed: what the send error cannot
/// say (over HTTP/2 the cause does not survive in it), noted by the body.
#[derive(Debug, Default)]
pub struct BodyFault(std::sync::atomic::AtomicU8);

impl BodyFault {
    const NONE: u8 = 0;
    const OVER_LIMIT: u8 = 1;
    const BROKEN: u8 = 2;

    /// The error to answer with when sending failed because of the
    /// client's body: 413 over the limit, 400 for a body that broke (bad
    /// chunked framing, the client gone mid-upload). Neither is the
    /// backend's fault.
    fn error(&self) -> Option<ProxyError> {
        match self.0.load(Relaxed) {
            Self::OVER_LIMIT => Some(ProxyError::new(ErrorKind::BodyTooLarge)),
            Self::BROKEN => Some(ProxyError::new(ErrorKind::ClientBody)),
            _ => None,
        }
    }
}

/// The client's request body as sent to a backend, noting in a
/// [`BodyFault`] when it fails.
pub struct ClientBody<B> {
    inner: B,
    fault: Arc<BodyFault>,
}

impl<B> hyper::body::Body for ClientBody<B>
where
    B: hyper::body::Body<Error = Box<dyn std::error::Error + Send + Sync>> + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(e))) = &polled {
            let fault = if e.is::<http_body_util::LengthLimitError>() {
                BodyFault::OVER_LIMIT
            } else {
                BodyFault::BROKEN
            };
            // The first fault is the cause.
            let _ = self
                .fault
                .0
                .compare_exchange(BodyFault::NONE, fault, Relaxed, Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
/// Body sent to a client: the backend's, or one the router made.
pub type RespBody = Either<Incoming, Full<Bytes>>;

/// Tunables, all with safe defaults.
#[derive(Debug, Clone)]
pub struct RouterOptions {
    /// A client must send its request headers (and a PROXY header, and
    /// finish the TLS handshake) within this. A connection with no request
    /// in progress for one to two of these is shut down (HTTP/1 closed,
    /// HTTP/2 sent GOAWAY, a connection of unknown protocol dropped).
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1) or header list (HTTP/2); larger gets
    /// 431. At least 8192.
    pub max_header_bytes: usize,
    /// Most header fields in an HTTP/1 request; more gets 431.
    pub max_headers: usize,
    /// Largest request body; larger gets 413. `None`: no limit.
    pub max_body_bytes: Option<u64>,
    /// TCP connect (and HTTP/2 handshake) to a backend.
    pub connect_timeout: Duration,
    /// From sending a request to receiving the backend's response headers;
    /// past it, 504. Streams and WebSockets are not limited once answered.
    pub upstream_timeout: Duration,
    /// How long a backend that refused a connection gets no requests.
    pub eject_for: Duration,
    /// Peers whose forwarding headers are kept.
    pub trusted_proxies: Vec<IpNet>,
    /// Every connection must start with a PROXY v1/v2 header.
    pub proxy_protocol: bool,
    /// When set, the plain listener answers requests for routed hosts with
    /// a 308 to https on this port.
    pub redirect_https_port: Option<u16>,
    /// Pooled connections to backends idle for longer are closed (swept
    /// every quarter of it, traffic or not).
    pub pool_idle_timeout: Duration,
    /// Most pooled connections kept per backend and thread.
    pub pool_max_idle_per_backend: usize,
    /// A client connection whose writes make no progress for this long (a
    /// client that stopped reading) is closed, and the backend connection
    /// of its answer with it (nginx's `send_timeout`).
    pub send_timeout: Duration,
    /// Where each request is logged, when at all.
    pub access_log: Option<AccessLog>,
}

impl Default for RouterOptions {
    fn default() -> Self {
        RouterOptions {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_body_bytes: None,
            connect_timeout: Duration::from_secs(3),
            upstream_timeout: Duration::from_secs(60),
            eject_for: Duration::from_secs(10),
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            redirect_https_port: None,
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle_per_backend: 256,
            send_timeout: Duration::from_secs(60),
            access_log: None,
        }
    }
}

/// Runtime state of one backend, kept across table rebuilds by identity
/// (id, address, scheme).
struct BackendRuntime {
    /// Milliseconds since the router's epoch; 0 = not ejected.
    ejected_until_ms: AtomicU64,
    in_flight: AtomicI64,
    requests: AtomicU64,
    connect_failures: AtomicU64,
    authority: Authority,
    /// The shared HTTP/2 connection to an h2c backend.
    h2: ArcSwapOption<http2::SendRequest<ReqBody>>,
}

impl BackendRuntime {
    fn new(addr: SocketAddr) -> Self {
        BackendRuntime {
            ejected_until_ms: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            requests: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            // A socket address always renders as a valid authority.
            authority: Authority::try_from(addr.to_string().as_str())
                .unwrap_or_else(|_| Authority::from_static("invalid")),
            h2: ArcSwapOption::empty(),
        }
    }

    fn ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Relaxed) > now_ms
    }
}

struct RouteRuntime {
    key: RouteKey,
    /// The key again, shared with access log lines.
    log_key: Arc<str>,
    stats: Arc<RouteStats>,
    backends: Vec<Arc<BackendRuntime>>,
    rr: AtomicUsize,
}

#[derive(Default)]
struct Live {
    table: RouteTable,
    /// Parallel to `table.routes()`.
    routes: Vec<RouteRuntime>,
}

type BackendIdentity = (String, SocketAddr, Scheme);

#[derive(Default)]
struct Registry {
    backends: HashMap<BackendIdentity, Arc<BackendRuntime>>,
    routes: HashMap<RouteKey, Arc<RouteStats>>,
}

struct Shared {
    opts: RouterOptions,
    live: ArcSwap<Live>,
    registry: Mutex<Registry>,
    server: auto::Builder<TokioExecutor>,
    metrics: Metrics,
    epoch: Instant,
}

/// One accept loop's view of the router: the shared table plus its own
/// upstream connection pool. With one worker per thread (see
/// [`Router::spawn_threads`]) a request never leaves its thread: client
/// connection, pool checkout and backend connection are all driven by the
/// same single-threaded runtime, with no cross-thread wake-ups.
struct Worker {
    shared: Arc<Shared>,
    pool: Arc<Http1Pool>,
}

impl std::ops::Deref for Worker {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Worker {
    fn new(shared: Arc<Shared>) -> Self {
        let pool = Arc::new(Http1Pool::new(
            shared.opts.pool_max_idle_per_backend,
            shared.opts.connect_timeout,
            shared.opts.pool_idle_timeout,
        ));
        // On the worker's own runtime: the pool is its thread's.
        Http1Pool::spawn_sweeper(&pool);
        Worker { shared, pool }
    }
}

/// What a client connection looks like to request handling.
#[derive(Debug, Clone, Copy)]
struct ConnInfo {
    client: ClientInfo,
}

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
        let mut routes = Vec::with_capacity(table.len());
        // Round-robin positions carry over, so that rebuilds (any container
        // event rebuilds the table) do not send the next request of every
        // route to its first backend.
        let old = self.shared.live.load();
        let old_rr: HashMap<&RouteKey, usize> = old
            .routes
            .iter()
            .map(|r| (&r.key, r.rr.load(Relaxed)))
            .collect();
        for route in table.routes() {
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
            routes.push(RouteRuntime {
                log_key: Arc::from(key.0.as_str()),
                key,
                stats,
                backends,
                rr,
            });
        }
        *reg = next;
        let n = table.len();
        self.shared.live.store(Arc::new(Live { table, routes }));
        debug!(routes = n, "route table replaced");
    }

    /// Every route with its backends, for status.
    pub fn status(&self) -> Vec<RouteStatus> {
        let live = self.shared.live.load();
        let now = self.shared.now_ms();
        live.table
            .routes()
            .iter()
            .zip(&live.routes)
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

    /// Append the router's metrics in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        let live = self.shared.live.load();
        metrics::render(
            out,
            &self.shared.metrics,
            live.routes.iter().map(|r| (r.key.0.as_str(), &*r.stats)),
        );
        if let Some(log) = &self.shared.opts.access_log {
            metrics::render_counter(
                out,
                "access_log_dropped_total",
                "Access log lines dropped because the writer could not keep up.",
                log.dropped(),
            );
        }
    }

    /// Serve on `max(http.len(), https.len())` threads, thread `i` taking
    /// `http[i]` and `https[i]` (from [`bind_reuseport`]). Each thread runs
    /// its own single-threaded runtime and upstream pool; all share the
    /// route table. `tls` is needed when `https` is not empty.
    pub fn spawn_threads(
        &self,
        http: Vec<std::net::TcpListener>,
        https: Vec<std::net::TcpListener>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<RouterThreads> {
        if !https.is_empty() && tls.is_none() {
            return Err(std::io::Error::other(
                "HTTPS listeners without a TLS config",
            ));
        }
        let n = http.len().max(https.len());
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut http = http.into_iter();
        let mut https = https.into_iter();
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let h = http.next();
            let s = https.next();
            let shared = self.shared.clone();
            let tls = tls.clone();
            let mut stop_rx = stop_rx.clone();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let t = std::thread::Builder::new()
                .name(format!("router-{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        let worker = Arc::new(Worker::new(shared));
                        for (l, tls) in [(h, None), (s, tls.map(TlsAcceptor::from))] {
                            let Some(l) = l else { continue };
                            match l
                                .set_nonblocking(true)
                                .and_then(|()| TcpListener::from_std(l))
                            {
                                Ok(l) => {
                                    tokio::spawn(worker.clone().accept_loop(l, tls));
                                }
                                Err(e) => warn!(error = %e, "router listener unusable"),
                            }
                        }
                        // Until stopped, or until the handle is gone.
                        let _ = stop_rx.wait_for(|s| *s).await;
                    });
                })?;
            threads.push(t);
        }
        info!(threads = n, "router serving");
        Ok(RouterThreads { stop, threads })
    }

    /// Serve plain HTTP (HTTP/1.1, and HTTP/2 with prior knowledge) on a
    /// bound listener until the task is dropped.
    pub async fn serve_http(&self, listener: TcpListener) {
        self.serve(listener, None).await
    }

    /// Serve HTTPS on a bound listener until the task is dropped.
    /// `tls` comes from [`crate::tls::server_config`].
    pub async fn serve_https(&self, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        self.serve(listener, Some(TlsAcceptor::from(tls))).await
    }

    async fn serve(&self, listener: TcpListener, tls: Option<TlsAcceptor>) {
        let worker = Arc::new(Worker::new(self.shared.clone()));
        worker.accept_loop(listener, tls).await
    }
}

impl Worker {
    async fn accept_loop(self: Arc<Self>, listener: TcpListener, tls: Option<TlsAcceptor>) {
        let local = listener.local_addr().ok();
        debug!(listen = ?local, tls = tls.is_some(), "router accepting");
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off a
                    // little instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let worker = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move { worker.connection(stream, peer, tls).await });
        }
    }
}

/// What [`Worker::route`] decided for a request.
enum Routing {
    /// Answered without a backend, with the route it matched if any.
    Answer(Result<Response<RespBody>, ProxyError>, Option<usize>),
    /// Forward on route `idx`; `raw_host` is the host as the client sent it.
    Forward { idx: usize, raw_host: String },
}

/// What is going on on one client connection, for its idle watch.
#[derive(Default)]
struct Activity {
    /// Requests started plus requests ended.
    events: AtomicU64,
    /// Requests started and not ended (their response body not done).
    active: AtomicUsize,
}

/// One request in progress on a connection, from the moment hyper hands it
/// over until its response body is done or dropped.
struct Active(Arc<Activity>);

impl Active {
    fn new(activity: Arc<Activity>) -> Self {
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

/// A response body with its request's [`Active`] mark, and its access log
/// line when there is a log: sent when hyper is done with the body (or
/// drops it), with the bytes it took.
struct Tracked {
    body: RespBody,
    _active: Active,
    log: Option<Box<(AccessLog, Entry, Instant)>>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(l) = self.log.take() {
            let (log, mut entry, start) = *l;
            entry.duration = start.elapsed();
            log.log(entry);
        }
    }
}

/// What `forward` learnt about the backend side, for the access log.
#[derive(Default)]
struct UpstreamSeen {
    backend: Option<SocketAddr>,
    /// From sending to response headers.
    time: Option<Duration>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = <RespBody as Body>::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        if let (Some(l), std::task::Poll::Ready(Some(Ok(f)))) = (&mut this.log, &polled)
            && let Some(d) = f.data_ref()
        {
            l.1.bytes += d.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Counts an open client connection (or its tunnel, once hyper let go of
/// it) in the open-connections gauge for as long as it lives, however it
/// ends.
struct OpenConn {
    shared: Arc<Shared>,
    tls: bool,
}

impl OpenConn {
    fn new(shared: Arc<Shared>, tls: bool) -> Self {
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
    fn open_gauge(&self, tls: bool) -> &AtomicI64 {
        if tls {
            &self.metrics.open_https
        } else {
            &self.metrics.open_http
        }
    }

    fn now_ms(&self) -> u64 {
        // Starts at 1 so that 0 can mean "never ejected".
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
    }
}

impl Worker {
    async fn connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        tls: Option<TlsAcceptor>,
    ) {
        let m = &self.metrics;
        m.connections_total.fetch_add(1, Relaxed);
        let _open = OpenConn::new(self.shared.clone(), tls.is_some());
        let _ = stream.set_nodelay(true);
        let timeout = self.opts.header_read_timeout;
        let mut client_addr = peer.ip();
        let mut trusted = self
            .opts
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&peer.ip()));
        let io = if self.opts.proxy_protocol {
            match tokio::time::timeout(timeout, read_proxy_header(&mut stream)).await {
                Ok(Ok((header, rest))) => {
                    if let ProxyHeader::Proxied { source, .. } = header {
                        client_addr = source.ip();
                    }
                    // The PROXY sender is a balancer the operator put in
                    // front: its forwarding headers are as good as its
                    // PROXY header.
                    trusted = true;
                    Prefixed::new(stream, rest)
                }
                Ok(Err(e)) => {
                    m.proxy_protocol_failures.fetch_add(1, Relaxed);
                    debug!(%peer, error = %e, "PROXY header refused");
                    return;
                }
                Err(_) => {
                    m.proxy_protocol_failures.fetch_add(1, Relaxed);
                    debug!(%peer, "PROXY header timed out");
                    return;
                }
            }
        } else {
            Prefixed::new(stream, Bytes::new())
        };
        let mut conn = ConnInfo {
            client: ClientInfo {
                addr: client_addr,
                trusted,
                tls: false,
            },
        };
        match tls {
            None => self.serve_conn(io, conn, true).await,
            Some(acceptor) => match tokio::time::timeout(timeout, acceptor.accept(io)).await {
                Ok(Ok(tls_stream)) => {
                    conn.client.tls = true;
                    let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    self.serve_conn(tls_stream, conn, !h2).await
                }
                Ok(Err(e)) => {
                    m.tls_handshake_failures.fetch_add(1, Relaxed);
                    debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    m.tls_handshake_failures.fetch_add(1, Relaxed);
                    debug!(%peer, "TLS handshake timed out");
                }
            },
        }
    }

    /// `h1`: the connection may speak HTTP/1 (not h2 by ALPN), so its
    /// request framing is checked (see `h1_guard`).
    async fn serve_conn<I>(self: &Arc<Self>, io: I, conn: ConnInfo, h1: bool)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let framing = h1.then(|| FramingHandle::new(max_head(&self.opts), self.opts.max_headers));
        let io = TokioIo::new(H1Guard::new(
            SendTimeout::new(io, self.opts.send_timeout),
            framing.clone(),
        ));
        let worker = self.clone();
        // Requests on this connection, for the idle watch below.
        let activity = Arc::new(Activity::default());
        let tracked = activity.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let active = Active::new(tracked.clone());
            let worker = worker.clone();
            // Now, in the order hyper hands requests over.
            let seen = framing.as_ref().map(|f| f.admit(req.headers()));
            // The future itself, not one wrapping it: hyper moves it, and
            // each wrapping level would double its size (see `handle`).
            worker.handle(req, conn, seen, active)
        });
        let serving = self.server.serve_connection_with_upgrades(io, svc);
        tokio::pin!(serving);
        // hyper times out a slow HTTP/1 request head once its first byte
        // is in, but nothing else: not a client that sends nothing (or
        // part of the HTTP/2 preface), nor an HTTP/2 connection kept open
        // with no request, or sending its first HEADERS slowly. So a
        // connection idle (no request in progress, none started or ended)
        // for a whole header timeout is shut down gracefully: before the
        // protocol is known it is dropped, idle HTTP/1 is closed, HTTP/2
        // gets GOAWAY and closes once the peer has acknowledged it and
        // taken the rest of its answers. An HTTP/2 peer that never
        // acknowledges, or stops reading, is closed by hyper's keep-alive
        // (a PING after 30 s without a frame, 20 s to answer it), like any
        // silent HTTP/2 peer. Idle connections thus close after one to two
        // header timeouts; a request in progress (a stream, a slow answer,
        // a slow upload) keeps its connection open however long it takes,
        // and so does the end of an answer a slow client is still taking.
        let idle = self.opts.header_read_timeout.max(Duration::from_millis(10));
        let mut seen = activity.events.load(Relaxed);
        let mut shut = false;
        let result = loop {
            tokio::select! {
                biased;
                r = serving.as_mut() => break r,
                () = tokio::time::sleep(idle), if !shut => {
                    let now = activity.events.load(Relaxed);
                    let busy = now != seen || activity.active.load(Relaxed) > 0;
                    seen = now;
                    if !busy {
                        debug!(client = %conn.client.addr, "connection idle for a header timeout: shutting it down");
                        serving.as_mut().graceful_shutdown();
                        shut = true;
                    }
                }
            }
        };
        if let Err(e) = result {
            debug!(client = %conn.client.addr, error = %e, "client connection ended with an error");
        }
    }

    /// One request. The request path is kept to few levels of futures
    /// (`handle` awaits `forward`, routing is synchronous, `forward` times
    /// the pool's future itself): rustc keeps an awaited future beside the
    /// temporary it was built in, so each level of `async fn` roughly
    /// doubled the size of the future that hyper moves, and memcpy copies,
    /// several times per request. It was 17.7 KiB, it is 6.1 KiB; that took
    /// 38,300 user-space instructions per request to 36,500
    /// (bench/router_instr.sh).
    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: ConnInfo,
        seen: Option<Verdict>,
        active: Active,
    ) -> Result<Response<Tracked>, Infallible> {
        let start = Instant::now();
        let live = self.live.load_full();
        // Only what the line needs, and only with a log: clones of
        // reference-counted parts, no formatting.
        let line = self.opts.access_log.as_ref().map(|_| Entry {
            time: std::time::SystemTime::now(),
            client: conn.client.addr,
            host: match req.uri().authority() {
                Some(a) => HeaderValue::from_str(a.as_str()).ok(),
                None => req.headers().get(header::HOST).cloned(),
            },
            method: req.method().clone(),
            path: req.uri().path_and_query().cloned(),
            status: 0,
            bytes: 0,
            duration: Duration::ZERO,
            route: None,
            backend: None,
            upstream: None,
            tls: conn.client.tls,
            version: req.version(),
            fault: None,
        });
        let mut seen_up = UpstreamSeen::default();
        let mut fault = None;
        // Both Content-Length and Transfer-Encoding: hyper kept only the
        // latter, so only the wire (h1_guard) can tell.
        let conflicting = seen.as_ref().is_some_and(|v| v.conflicting);
        let (result, stats) = if conflicting {
            let e = ProxyError::with_cause(
                ErrorKind::BadRequest,
                "both Content-Length and Transfer-Encoding",
            );
            (Err(e), None)
        } else {
            match self.route(&req, conn, &live) {
                Routing::Answer(result, idx) => (result, idx),
                Routing::Forward { idx, raw_host } => (
                    self.forward(req, conn, &live, idx, &raw_host, &mut seen_up)
                        .await,
                    Some(idx),
                ),
            }
        };
        let mut resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                debug!(error = %e, status = e.status().as_u16(), "request failed");
                fault = Some(match e.source_of_fault() {
                    ErrorSource::Downstream => "client",
                    ErrorSource::Upstream => "backend",
                    ErrorSource::Internal => "router",
                });
                error_response(&e)
            }
        };
        if conflicting {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(v) = seen {
            v.answered(resp.status());
        }
        let log = match (line, &self.opts.access_log) {
            (Some(mut e), Some(log)) => {
                e.status = resp.status().as_u16();
                e.route = stats.map(|i| live.routes[i].log_key.clone());
                e.backend = seen_up.backend;
                e.upstream = seen_up.time;
                e.fault = fault;
                Some(Box::new((log.clone(), e, start)))
            }
            _ => None,
        };
        let stats = match stats {
            Some(i) => &*live.routes[i].stats,
            None => &self.metrics.unrouted,
        };
        stats.record(resp.status().as_u16(), start.elapsed());
        // In progress until hyper is done with the body.
        Ok(resp.map(|body| Tracked {
            body,
            _active: active,
            log,
        }))
    }

    /// Where a request goes: answered here (an error, a redirect) or
    /// forwarded on a route. The route index comes with an answer too, so
    /// that it counts against its route.
    fn route(&self, req: &Request<Incoming>, conn: ConnInfo, live: &Live) -> Routing {
        use Routing::Answer;
        if req.method() == Method::CONNECT {
            return Answer(Err(ProxyError::new(ErrorKind::MethodNotAllowed)), None);
        }
        if req.version() == Version::HTTP_2 && h2_header_list_size(req) > self.opts.max_header_bytes
        {
            return Answer(Err(ProxyError::new(ErrorKind::HeadersTooLarge)), None);
        }
        let bad = |why: &'static str| {
            Answer(
                Err(ProxyError::with_cause(ErrorKind::BadRequest, why)),
                None,
            )
        };
        // One Host at most (RFC 9112 3.2), agreeing with the request
        // target's authority when both are there (an absolute-form target,
        // or an HTTP/2 :authority): a proxy and its backend must not see
        // two different hosts in one request.
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let host_header = hosts.next();
        if hosts.next().is_some() {
            return bad("more than one Host");
        }
        let host_header = match host_header.map(|h| h.to_str()) {
            Some(Ok(h)) => Some(h),
            Some(Err(_)) => return bad("Host is not text"),
            None => None,
        };
        let raw_host = match (req.uri().authority(), host_header) {
            (Some(a), Some(h)) => {
                let default_port = if req.uri().scheme() == Some(&UriScheme::HTTPS) {
                    443
                } else {
                    80
                };
                if !same_authority(a.as_str(), h, default_port) {
                    return bad("Host disagrees with the request target");
                }
                a.as_str().to_owned()
            }
            (Some(a), None) => a.as_str().to_owned(),
            (None, Some(h)) => h.to_owned(),
            (None, None) => return bad("no Host"),
        };
        let Some(host) = normalize_authority(&raw_host) else {
            return Answer(Err(ProxyError::new(ErrorKind::BadRequest)), None);
        };
        let Some(idx) = live.table.find(&host, req.uri().path()) else {
            return Answer(Err(ProxyError::new(ErrorKind::NoRoute)), None);
        };
        if let (Some(port), false) = (self.opts.redirect_https_port, conn.client.tls) {
            return Answer(Ok(redirect(&host, port, req.uri())), Some(idx));
        }
        if let Some(max) = self.opts.max_body_bytes {
            let declared = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > max) {
                return Answer(Err(ProxyError::new(ErrorKind::BodyTooLarge)), Some(idx));
            }
        }
        Routing::Forward { idx, raw_host }
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        conn: ConnInfo,
        live: &Live,
        idx: usize,
        raw_host: &str,
        seen_up: &mut UpstreamSeen,
    ) -> Result<Response<RespBody>, ProxyError> {
        let route = &live.table.routes()[idx];
        let rt = &live.routes[idx];
        // Only WebSocket is tunnelled; any other Upgrade is removed below
        // with the hop-by-hop headers, and the request goes as plain HTTP.
        let upgrade = req.version() == Version::HTTP_11 && headers::wants_websocket(req.headers());
        let down_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let te_trailers = headers::te_trailers(req.headers());
        let (mut parts, body) = req.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers, upgrade);
        if upgrade {
            // Not the client's whole offer: the backend may switch to
            // WebSocket and nothing else.
            parts
                .headers
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        if parts.uri.authority().is_some() || !parts.headers.contains_key(header::HOST) {
            // The host the request was routed by is the one the backend
            // sees: an HTTP/2 :authority (HTTP/1 backends need it as Host),
            // or an absolute-form URI's, which overrides Host (RFC 9112
            // 3.2.2).
            if let Ok(v) = HeaderValue::from_str(raw_host) {
                parts.headers.insert(header::HOST, v);
            }
        }
        headers::set_forwarded(&mut parts.headers, &conn.client, raw_host);
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));

        let body_empty = body.is_end_stream();
        let traits = policy::RequestTraits::of(&parts.method, body_empty);
        let max_attempts = policy::max_attempts(route.backends.len(), traits);
        let limit = self
            .opts
            .max_body_bytes
            .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
        let mut body = Some(body);
        // Only requests with a body can go over the limit or break.
        let body_fault = (!body_empty).then(|| Arc::new(BodyFault::default()));
        let mut tried: Vec<usize> = Vec::new();
        let mut last_err: Option<ProxyError> = None;

        let resp = loop {
            let now = self.now_ms();
            let pick = balance::pick(
                route.backends.len(),
                |i| Candidate {
                    state: route.backends[i].state,
                    ejected: rt.backends[i].ejected(now),
                },
                rt.rr.fetch_add(1, Relaxed),
                &tried,
            );
            let Some(bi) = pick else {
                return Err(last_err.unwrap_or_else(|| ProxyError::new(ErrorKind::NoBackend)));
            };
            let backend = &route.backends[bi];
            let brt = &rt.backends[bi];
            let last_attempt = tried.len() + 1 >= max_attempts;

            let req_body: ReqBody = match body.take() {
                Some(b) if !body_empty => Either::Left(ClientBody {
                    inner: Limited::new(b, limit),
                    fault: body_fault.clone().unwrap_or_default(),
                }),
                _ => Either::Right(Empty::new()),
            };
            let mut up = Request::new(req_body);
            *up.method_mut() = parts.method.clone();
            *up.headers_mut() = if last_attempt {
                std::mem::take(&mut parts.headers)
            } else {
                parts.headers.clone()
            };
            let authority = match backend.scheme {
                Scheme::Http => brt.authority.clone(),
                Scheme::H2c => {
                    // The backend sees the client's host as :authority.
                    up.headers_mut().remove(header::HOST);
                    if te_trailers {
                        up.headers_mut()
                            .insert(header::TE, HeaderValue::from_static("trailers"));
                    }
                    Authority::try_from(raw_host).unwrap_or_else(|_| brt.authority.clone())
                }
            };
            let mut uri_parts = http::uri::Parts::default();
            if backend.scheme == Scheme::H2c {
                // HTTP/2 sends :scheme and :authority from the URI.
                uri_parts.scheme = Some(UriScheme::HTTP);
                uri_parts.authority = Some(authority);
            }
            // HTTP/1.1: origin-form, the host is in the Host header.
            uri_parts.path_and_query = Some(path_and_query.clone());
            *up.uri_mut() = match Uri::from_parts(uri_parts) {
                Ok(u) => u,
                Err(e) => return Err(ProxyError::with_cause(ErrorKind::BadRequest, e)),
            };
            *up.version_mut() = match backend.scheme {
                Scheme::Http => Version::HTTP_11,
                Scheme::H2c => Version::HTTP_2,
            };

            brt.requests.fetch_add(1, Relaxed);
            brt.in_flight.fetch_add(1, Relaxed);
            seen_up.backend = Some(backend.addr);
            let sent_at = Instant::now();
            let upstream_timeout = self.opts.upstream_timeout;
            let sent = match backend.scheme {
                Scheme::Http => {
                    tokio::time::timeout(upstream_timeout, self.pool.send(backend.addr, up)).await
                }
                // Boxed: only h2c backends take this path, and its large
                // future would otherwise be part of (and moved with) every
                // HTTP/1 request's.
                Scheme::H2c => {
                    tokio::time::timeout(
                        upstream_timeout,
                        Box::pin(self.send_h2(brt, backend.addr, up)),
                    )
                    .await
                }
            };
            brt.in_flight.fetch_sub(1, Relaxed);
            match sent {
                Ok(Ok(resp)) => {
                    seen_up.time = Some(sent_at.elapsed());
                    break resp;
                }
                Ok(Err(e)) if body_fault.as_ref().is_some_and(|f| f.error().is_some()) => {
                    // The client's fault: no ejection, no retry, a 4xx.
                    let fault = body_fault.as_ref().and_then(|f| f.error());
                    debug!(error = %e, "client request body failed");
                    return Err(fault.unwrap_or(e));
                }
                Ok(Err(e)) => {
                    let outcome = policy::after_failure(
                        e.kind,
                        tried.len() + 1,
                        max_attempts,
                        traits,
                        self.now_ms(),
                        self.opts.eject_for,
                    );
                    if e.kind == ErrorKind::Connect {
                        self.metrics.upstream_connect_errors.fetch_add(1, Relaxed);
                        brt.connect_failures.fetch_add(1, Relaxed);
                    }
                    if let Some(until) = outcome.eject_until_ms {
                        self.metrics.ejections.fetch_add(1, Relaxed);
                        brt.ejected_until_ms.store(until, Relaxed);
                        debug!(backend = %backend.id, addr = %backend.addr, error = %e, "backend ejected");
                    }
                    if outcome.retry {
                        self.metrics.retries.fetch_add(1, Relaxed);
                        tried.push(bi);
                        last_err = Some(e);
                        continue;
                    }
                    return Err(e);
                }
                Err(_) => {
                    self.metrics.upstream_timeouts.fetch_add(1, Relaxed);
                    return Err(ProxyError::new(ErrorKind::UpstreamTimeout));
                }
            }
        };

        let mut resp = resp;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(down) = down_upgrade else {
                return Err(ProxyError::with_cause(
                    ErrorKind::UpstreamProtocol,
                    "backend switched protocols unasked",
                ));
            };
            if !headers::wants_websocket(resp.headers()) {
                return Err(ProxyError::with_cause(
                    ErrorKind::UpstreamProtocol,
                    "backend switched to a protocol other than WebSocket",
                ));
            }
            let up = hyper::upgrade::on(&mut resp);
            self.metrics.websocket_upgrades.fetch_add(1, Relaxed);
            // The client connection's own count ends when hyper hands the
            // connection over; the tunnel is counted while it lasts.
            let open = OpenConn::new(self.shared.clone(), conn.client.tls);
            tokio::spawn(async move {
                let _open = open;
                match tokio::try_join!(up, down) {
                    Ok((up, down)) => {
                        let mut up = TokioIo::new(up);
                        let mut down = TokioIo::new(down);
                        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                            debug!(error = %e, "upgraded connection ended with an error");
                        }
                    }
                    Err(e) => debug!(error = %e, "upgrade failed"),
                }
            });
        }
        let (mut rparts, rbody) = resp.into_parts();
        headers::remove_hop_by_hop(
            &mut rparts.headers,
            rparts.status == StatusCode::SWITCHING_PROTOCOLS,
        );
        rparts.version = parts.version;
        Ok(Response::from_parts(rparts, Either::Left(rbody)))
    }

    async fn send_h2(
        &self,
        brt: &BackendRuntime,
        addr: SocketAddr,
        req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let cached = brt.h2.load_full().filter(|s| !s.is_closed());
        let mut sender = match cached {
            Some(s) => (*s).clone(),
            None => self.connect_h2(brt, addr).await?,
        };
        if sender.ready().await.is_err() {
            // The cached connection died between the check and now: the
            // request was not sent, so a fresh connection is safe.
            sender = self.connect_h2(brt, addr).await?;
            sender
                .ready()
                .await
                .map_err(|e| ProxyError::with_cause(ErrorKind::Connect, e))?;
        }
        sender
            .send_request(req)
            .await
            .map_err(crate::pool::classify)
    }

    async fn connect_h2(
        &self,
        brt: &BackendRuntime,
        addr: SocketAddr,
    ) -> Result<http2::SendRequest<ReqBody>, ProxyError> {
        let stream = tokio::time::timeout(self.opts.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ProxyError::with_cause(ErrorKind::Connect, "connect timed out"))?
            .map_err(|e| ProxyError::with_cause(ErrorKind::Connect, e))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::with_cause(ErrorKind::Connect, e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%addr, error = %e, "h2c backend connection ended");
            }
        });
        brt.h2.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }
}

/// The HTTP/2 header list size the HPACK decoder takes (and the router
/// advertises): four times the limit, at least 256 KiB. A header block
/// between the limit and this gets a 431 from `route`; past this the
/// decoder cannot go on, and h2 answers a 431 and a PROTOCOL_ERROR reset
/// when it can, or ends the connection with GOAWAY(COMPRESSION_ERROR) when
/// the block no longer fits its buffer.
fn h2_decoder_limit(max_header_bytes: usize) -> usize {
    max_header_bytes.saturating_mul(4).max(256 * 1024)
}

/// An HTTP/2 request's header list size as RFC 9113 6.5.2 counts it (each
/// field, pseudo-headers included, plus 32 octets).
fn h2_header_list_size(req: &Request<Incoming>) -> usize {
    let uri = req.uri();
    let pseudo = req.method().as_str().len()
        + uri.path_and_query().map_or(1, |p| p.as_str().len())
        + uri.scheme_str().map_or(0, str::len)
        + uri.authority().map_or(0, |a| a.as_str().len());
    let fields: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum();
    pseudo + 4 * 32 + fields
}

/// hyper's read buffer limit: the largest HTTP/1 request head it reads.
fn max_head(opts: &RouterOptions) -> usize {
    opts.max_header_bytes.max(8192)
}

fn error_response(e: &ProxyError) -> Response<RespBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(e.body()))));
    *resp.status_mut() = e.status();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn redirect(host: &str, port: u16, uri: &Uri) -> Response<RespBody> {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    let location = if port == 443 {
        format!("https://{host}{pq}")
    } else {
        format!("https://{host}:{port}{pq}")
    };
    let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}
