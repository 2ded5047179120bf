//! One request: route it, prepare the upstream request, send it (with
//! retries), finish the response.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme as UriScheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{Either, Empty, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::state::{Active, BackendRuntime, ConnInfo, Live, OpenConn, RouteRuntime, Worker};
use crate::access_log::{AccessLog, Entry};
use crate::acme::HTTP01_PREFIX;
use crate::balance::{self, Candidate};
use crate::body::{BodyFault, ClientBody, ReqBody, RespBody};
use crate::error::{ErrorKind, ErrorSource, ProxyError};
use crate::h1_guard::Verdict;
use crate::headers::{self, ClientInfo};
use crate::host::{normalize_authority, same_authority};
use crate::policy;
use crate::table::{Backend, Route, Scheme};

/// What [`Worker::route`] decided for a request.
pub(crate) enum Routing {
    /// Answered without a backend, with the route it matched if any.
    Answer(Result<Response<RespBody>, ProxyError>, Option<usize>),
    /// Forward on route `idx`; `raw_host` is the host as the client sent it.
    Forward { idx: usize, raw_host: String },
}

/// A response body with its request's [`Active`] mark and its access log
/// line, sent when hyper is done with the body (or drops it), with the
/// bytes it took.
pub(crate) struct Tracked {
    pub(crate) body: RespBody,
    pub(crate) _active: Active,
    pub(crate) log: LogLine,
}

/// A request's access log line in the making (nothing without a log),
/// written when dropped with the time taken. Until an answer is set it
/// stands for a client that left first: status 499, as nginx logs it.
/// One pointer wide: it rides in every response body.
pub(crate) struct LogLine(Option<Box<(AccessLog, Entry, Instant)>>);

impl LogLine {
    fn new(
        log: Option<&AccessLog>,
        req: &Request<Incoming>,
        conn: ConnInfo,
        start: Instant,
    ) -> Self {
        // Only what the line needs, and only with a log: clones of
        // reference-counted parts, no formatting.
        LogLine(log.map(|log| {
            let entry = Entry {
                time: std::time::SystemTime::now(),
                client: conn.client.addr,
                host: match req.uri().authority() {
                    Some(a) => HeaderValue::from_str(a.as_str()).ok(),
                    None => req.headers().get(header::HOST).cloned(),
                },
                method: req.method().clone(),
                path: req.uri().path_and_query().cloned(),
                status: 499,
                bytes: 0,
                duration: Duration::ZERO,
                route: None,
                backend: None,
                upstream: None,
                tls: conn.client.tls,
                version: req.version(),
                fault: Some(ErrorSource::Downstream.as_str()),
            };
            Box::new((log.clone(), entry, start))
        }))
    }

    fn entry(&mut self) -> Option<&mut Entry> {
        self.0.as_mut().map(|p| &mut p.1)
    }

    /// The backend an attempt goes to (`forward`, as it goes).
    pub(crate) fn backend(&mut self, addr: SocketAddr) {
        if let Some(e) = self.entry() {
            e.backend = Some(addr);
        }
    }

    /// The time the backend took to answer with headers.
    pub(crate) fn upstream_time(&mut self, d: Duration) {
        if let Some(e) = self.entry() {
            e.upstream = Some(d);
        }
    }

    fn count_bytes(&mut self, n: usize) {
        if let Some(e) = self.entry() {
            e.bytes += n as u64;
        }
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        if let Some(l) = self.0.take() {
            let (log, mut entry, start) = *l;
            entry.duration = start.elapsed();
            log.log(entry);
        }
    }
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
        if let std::task::Poll::Ready(Some(Ok(f))) = &polled
            && let Some(d) = f.data_ref()
        {
            this.log.count_bytes(d.len());
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

impl Worker {
    /// One request. The request path is kept to few levels of futures
    /// (`handle` awaits `forward`, routing is synchronous, `forward` awaits
    /// `send_upstream`, which times the pool's future itself): rustc keeps
    /// an awaited future beside the temporary it was built in, so each
    /// level of `async fn` roughly doubled the size of the future that
    /// hyper moves, and memcpy copies, several times per request. It was
    /// 17.7 KiB, it is 6.1 KiB; that took 38,300 user-space instructions
    /// per request to 36,500 (bench/router_instr.sh). (The phase split kept
    /// it: 3,488 to 3,112 bytes in a debug build.)
    pub(crate) async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: ConnInfo,
        seen: Option<Verdict>,
        active: Active,
    ) -> Result<Response<Tracked>, Infallible> {
        let start = Instant::now();
        let live = self.live.load_full();
        let mut line = LogLine::new(self.opts.access_log.as_ref(), &req, conn, start);
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
                Routing::Forward { idx, raw_host } => {
                    // Known before the wait, for a client that leaves.
                    if let Some(e) = line.entry() {
                        e.route = Some(live.table.routes()[idx].payload.log_key.clone());
                    }
                    let sent = self.forward(req, conn, &live, idx, &raw_host, &mut line);
                    (sent.await, Some(idx))
                }
            }
        };
        let mut resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                debug!(error = %e, status = e.status().as_u16(), "request failed");
                let source = e.source_of_fault();
                self.metrics.failures[source.index()].fetch_add(1, Relaxed);
                fault = Some(source.as_str());
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
        if let Some(e) = line.entry() {
            e.status = resp.status().as_u16();
            e.route = stats.map(|i| live.table.routes()[i].payload.log_key.clone());
            e.fault = fault;
        }
        let stats = match stats {
            Some(i) => &*live.table.routes()[i].payload.stats,
            None => &self.metrics.unrouted,
        };
        stats.record(resp.status().as_u16(), start.elapsed());
        // In progress until hyper is done with the body.
        Ok(resp.map(|body| Tracked {
            body,
            _active: active,
            log: line,
        }))
    }

    /// Where a request goes: answered here (an error, an ACME challenge, a
    /// redirect) or forwarded on a route. The route index comes with an answer too, so
    /// that it counts against its route.
    pub(crate) fn route(&self, req: &Request<Incoming>, conn: ConnInfo, live: &Live) -> Routing {
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
        if let Some(answer) = self.acme_challenge(req, &host, conn) {
            return Answer(Ok(answer), None);
        }
        let Some(idx) = live.table.find(&host, req.uri().path()) else {
            return Answer(Err(ProxyError::new(ErrorKind::NoRoute)), None);
        };
        if let (Some(port), false) = (self.opts.redirect_https_port, conn.client.tls)
            && !self.opts.acme.as_ref().is_some_and(|a| a.is_pending(&host))
        {
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

    /// The ACME HTTP-01 step: a plain-HTTP GET for a token the issuer is
    /// answering now, for the host it is answering it for, gets the key
    /// authorization (RFC 8555 8.3). Anything else goes on to routing, so
    /// a path under `/.well-known/acme-challenge/` that is no live token
    /// reaches the backend as before.
    fn acme_challenge(
        &self,
        req: &Request<Incoming>,
        host: &str,
        conn: ConnInfo,
    ) -> Option<Response<RespBody>> {
        let acme = self.opts.acme.as_ref()?;
        if conn.client.tls || req.method() != Method::GET {
            return None;
        }
        let token = req.uri().path().strip_prefix(HTTP01_PREFIX)?;
        let answer = acme.http01_answer(host, token)?;
        debug!(%host, "ACME HTTP-01 challenge answered");
        let mut resp = Response::new(Either::Right(Full::new(Bytes::from(answer))));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        Some(resp)
    }

    /// Forward on route `idx`: prepare the request once, then pick a
    /// backend, send, and on failure let the policy say whether to eject
    /// and try the next; finish the response that came.
    pub(crate) async fn forward(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        live: &Live,
        idx: usize,
        raw_host: &str,
        line: &mut LogLine,
    ) -> Result<Response<RespBody>, ProxyError> {
        let route = &live.table.routes()[idx];
        let rt = &route.payload;
        let (mut prepared, down_upgrade) =
            Prepared::new(req, &conn.client, raw_host, self.opts.max_body_bytes);
        let max_attempts = policy::max_attempts(route.backends.len(), prepared.traits);
        let mut tried: Vec<usize> = Vec::new();
        let mut last_err: Option<ProxyError> = None;
        let resp = loop {
            let Some(bi) = self.pick(route, &tried) else {
                return Err(last_err.unwrap_or_else(|| ProxyError::new(ErrorKind::NoBackend)));
            };
            let (backend, brt) = (&route.backends[bi], &rt.backends[bi]);
            let last_attempt = tried.len() + 1 >= max_attempts;
            let up =
                prepared.for_backend(backend.scheme, &brt.authority, raw_host, last_attempt)?;
            line.backend(backend.addr);
            let sent_at = Instant::now();
            // Boxed: the upstream wait (the pool's future in a `Timeout`)
            // is the largest state of the request's future, which hyper
            // moves and memcpy copies whole; one allocation costs less
            // (bench/router_instr.sh: -340 instructions per request).
            match Box::pin(self.send_upstream(backend, brt, up)).await {
                Ok(resp) => {
                    line.upstream_time(sent_at.elapsed());
                    break resp;
                }
                Err(e) => {
                    let e = prepared.blame(e);
                    let attempt = tried.len() + 1;
                    if !self.judge_failure(&e, backend, brt, attempt, max_attempts, prepared.traits)
                    {
                        return Err(e);
                    }
                    tried.push(bi);
                    last_err = Some(e);
                }
            }
        };
        self.finish_response(resp, down_upgrade, conn, prepared.version)
    }

    /// The next backend to try: round-robin over the best health tier,
    /// skipping ejected ones and those tried.
    fn pick(&self, route: &Route<RouteRuntime>, tried: &[usize]) -> Option<usize> {
        let now = self.now_ms();
        balance::pick(
            route.backends.len(),
            |i| Candidate {
                state: route.backends[i].state,
                ejected: route.payload.backends[i].ejected(now),
            },
            route.payload.rr.fetch_add(1, Relaxed),
            tried,
        )
    }

    /// Count a failed attempt and act on the policy's outcome: eject the
    /// backend if it says so. Whether to try another backend.
    fn judge_failure(
        &self,
        e: &ProxyError,
        backend: &Backend,
        brt: &BackendRuntime,
        attempt: usize,
        max_attempts: usize,
        traits: policy::RequestTraits,
    ) -> bool {
        let outcome = policy::after_failure(
            e.kind,
            attempt,
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
        }
        outcome.retry
    }

    /// The backend's answer as the client gets it: a WebSocket switch
    /// becomes a tunnel (any other switch is refused), hop-by-hop headers
    /// go, the version is the client's.
    fn finish_response(
        &self,
        mut resp: Response<Incoming>,
        down_upgrade: Option<OnUpgrade>,
        conn: ConnInfo,
        version: Version,
    ) -> Result<Response<RespBody>, ProxyError> {
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
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
        headers::remove_hop_by_hop(&mut rparts.headers, switching);
        rparts.version = version;
        Ok(Response::from_parts(rparts, Either::Left(rbody)))
    }
}

/// A client request made ready for backends once (hop-by-hop headers
/// removed, Host and forwarding headers set), from which each attempt's
/// upstream request is cut.
pub(crate) struct Prepared {
    method: Method,
    /// The client's, for the response.
    pub(crate) version: Version,
    headers: HeaderMap,
    path_and_query: PathAndQuery,
    /// The client's body, until an attempt takes it.
    body: Option<Incoming>,
    /// Largest body forwarded.
    limit: usize,
    /// Notes the client's body failing; only requests with a body can.
    body_fault: Option<Arc<BodyFault>>,
    /// The client asked for trailers (passed on to h2c backends, gRPC).
    te_trailers: bool,
    pub(crate) traits: policy::RequestTraits,
}

impl Prepared {
    /// Rewrite the client's request for backends; with it, the client
    /// side of a WebSocket upgrade when it asked for one (the only upgrade
    /// tunnelled: any other `Upgrade` goes with the hop-by-hop headers,
    /// and the request as plain HTTP).
    pub(crate) fn new(
        mut req: Request<Incoming>,
        client: &ClientInfo,
        raw_host: &str,
        max_body_bytes: Option<u64>,
    ) -> (Prepared, Option<OnUpgrade>) {
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
            // or an absolute-form URI's (which Host agrees with).
            if let Ok(v) = HeaderValue::from_str(raw_host) {
                parts.headers.insert(header::HOST, v);
            }
        }
        headers::set_forwarded(&mut parts.headers, client, raw_host);
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let body_empty = body.is_end_stream();
        let prepared = Prepared {
            traits: policy::RequestTraits::of(&parts.method, body_empty),
            method: parts.method,
            version: parts.version,
            headers: parts.headers,
            path_and_query,
            body: (!body_empty).then_some(body),
            limit: max_body_bytes.map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX)),
            body_fault: (!body_empty).then(|| Arc::new(BodyFault::default())),
            te_trailers,
        };
        (prepared, down_upgrade)
    }

    /// The request for one attempt on a backend of `scheme` at
    /// `authority`. The body goes with the first attempt (only requests
    /// without one are tried again); the headers are moved, not copied,
    /// into the last.
    pub(crate) fn for_backend(
        &mut self,
        scheme: Scheme,
        authority: &Authority,
        raw_host: &str,
        last_attempt: bool,
    ) -> Result<Request<ReqBody>, ProxyError> {
        let req_body: ReqBody = match self.body.take() {
            Some(b) => Either::Left(ClientBody::new(
                Limited::new(b, self.limit),
                self.body_fault.clone().unwrap_or_default(),
            )),
            None => Either::Right(Empty::new()),
        };
        let mut up = Request::new(req_body);
        *up.method_mut() = self.method.clone();
        *up.headers_mut() = if last_attempt {
            std::mem::take(&mut self.headers)
        } else {
            self.headers.clone()
        };
        let mut uri_parts = http::uri::Parts::default();
        if scheme == Scheme::H2c {
            // The backend sees the client's host as :authority (HTTP/2
            // sends :scheme and :authority from the URI).
            up.headers_mut().remove(header::HOST);
            if self.te_trailers {
                up.headers_mut()
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
            uri_parts.scheme = Some(UriScheme::HTTP);
            uri_parts.authority =
                Some(Authority::try_from(raw_host).unwrap_or_else(|_| authority.clone()));
        }
        // HTTP/1.1: origin-form, the host is in the Host header.
        uri_parts.path_and_query = Some(self.path_and_query.clone());
        *up.uri_mut() = Uri::from_parts(uri_parts)
            .map_err(|e| ProxyError::with_cause(ErrorKind::BadRequest, e))?;
        *up.version_mut() = match scheme {
            Scheme::Http => Version::HTTP_11,
            Scheme::H2c => Version::HTTP_2,
        };
        Ok(up)
    }

    /// A failed send is the client's fault when its body broke (413 over
    /// the limit, 400 otherwise): then no ejection, no retry, a 4xx.
    pub(crate) fn blame(&self, e: ProxyError) -> ProxyError {
        match self.body_fault.as_ref().and_then(|f| f.error()) {
            Some(client) => {
                debug!(error = %e, "client request body failed");
                client
            }
            None => e,
        }
    }
}

/// An HTTP/2 request's header list size as RFC 9113 6.5.2 counts it (each
/// field, pseudo-headers included, plus 32 octets).
pub(crate) fn h2_header_list_size(req: &Request<Incoming>) -> usize {
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

pub(crate) fn error_response(e: &ProxyError) -> Response<RespBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(e.body()))));
    *resp.status_mut() = e.status();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

pub(crate) fn redirect(host: &str, port: u16, uri: &Uri) -> Response<RespBody> {
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
