//! Keep-alive HTTP/1.1 connections to backends, one pool per worker thread.
//!
//! Leaner than hyper-util's pooled client for a proxy: a connection goes
//! back into the list as soon as its response headers arrive and is skipped
//! until hyper reports it ready again (its response body done), so no task
//! is spawned per request to wait for that; there is no lock contention (the
//! pool is its thread's own) and no per-request boxing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::body::ReqBody;
use crate::error::{ErrorKind, ProxyError};

/// foldhash: looked up twice per request, keyed by backend addresses.
type Conns =
    HashMap<SocketAddr, Vec<(http1::SendRequest<ReqBody>, Instant)>, foldhash::fast::RandomState>;

pub(crate) struct Http1Pool {
    /// Each connection with the time it was last seen busy (handed a
    /// request, or still answering one at a sweep).
    conns: Mutex<Conns>,
    max_per_backend: usize,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

impl Http1Pool {
    pub(crate) fn new(
        max_per_backend: usize,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        Http1Pool {
            conns: Mutex::new(HashMap::default()),
            max_per_backend,
            connect_timeout,
            idle_timeout,
        }
    }

    /// Send `req` (origin-form URI, Host set) to `addr` on a pooled
    /// connection, or a new one.
    pub(crate) async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        while let Some(mut sender) = self.checkout(addr) {
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.checkin(addr, sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // Never written (the backend closed the idle
                    // connection): safe on another connection, any method.
                    Some(back) => req = back,
                    None => return Err(classify(e.into_error())),
                },
            }
        }
        // Boxed: connecting is the rare path, and its future (connect,
        // handshake) would otherwise be part of every request's.
        let mut sender = Box::pin(self.connect(addr)).await?;
        let resp = sender.send_request(req).await.map_err(classify)?;
        self.checkin(addr, sender);
        Ok(resp)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Conns> {
        // Only this worker's thread uses the pool; a poisoned lock means a
        // panic mid-update of a Vec, which leaves it valid anyway.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ready connection to `addr`. Only the connections looked at are
    /// checked for expiry (the sweeper does the rest): a pass over the
    /// whole list cost a clock subtraction per pooled connection on every
    /// request.
    fn checkout(&self, addr: SocketAddr) -> Option<http1::SendRequest<ReqBody>> {
        let mut now = None;
        let mut conns = self.lock();
        let list = conns.get_mut(&addr)?;
        let mut i = 0;
        let found = loop {
            let Some((s, _)) = list.get(i) else {
                break None;
            };
            if s.is_closed() {
                list.swap_remove(i);
                continue;
            }
            if !s.is_ready() {
                i += 1;
                continue;
            }
            let now = *now.get_or_insert_with(Instant::now);
            // Dropping a sender closes its idle connection.
            let (s, used) = list.swap_remove(i);
            if now.duration_since(used) <= self.idle_timeout {
                break Some(s);
            }
            drop(s);
        };
        if list.is_empty() {
            conns.remove(&addr);
        }
        found
    }

    /// Closed, or idle (ready) for longer than the idle timeout. A
    /// connection still busy with an answer (not ready) is marked used
    /// now, so that its idle time runs from the end of that answer (to
    /// within a sweep), not from its start.
    fn expired(&self, s: &http1::SendRequest<ReqBody>, used: &mut Instant, now: Instant) -> bool {
        if s.is_closed() {
            return true;
        }
        if !s.is_ready() {
            *used = now;
            return false;
        }
        now.duration_since(*used) > self.idle_timeout
    }

    /// Close every connection closed or idle too long, whatever its
    /// backend. Run on a timer ([`Http1Pool::spawn_sweeper`]), so that
    /// idle connections go on time when traffic stops, not at the next
    /// request that happens to use the pool.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        self.lock().retain(|_, list| {
            list.retain_mut(|(s, used)| !self.expired(s, used, now));
            !list.is_empty()
        });
    }

    /// Sweep the pool every quarter of the idle timeout (so a connection
    /// goes at most 25% late), on the current runtime, for as long as the
    /// pool lives.
    pub(crate) fn spawn_sweeper(pool: &std::sync::Arc<Self>) {
        let every =
            (pool.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(15));
        let pool = std::sync::Arc::downgrade(pool);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match pool.upgrade() {
                    Some(p) => p.sweep(),
                    None => break,
                }
            }
        });
    }

    fn checkin(&self, addr: SocketAddr, sender: http1::SendRequest<ReqBody>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut conns = self.lock();
        let list = conns.entry(addr).or_default();
        if list.len() < self.max_per_backend {
            list.push((sender, now));
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<http1::SendRequest<ReqBody>, ProxyError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ProxyError::with_cause(ErrorKind::Connect, "connect timed out"))?
            .map_err(|e| ProxyError::with_cause(ErrorKind::Connect, e))?;
        let _ = stream.set_nodelay(true);
        // Finds a backend that vanished under an idle pooled connection.
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(30));
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::with_cause(ErrorKind::Connect, e))?;
        tokio::spawn(async move {
            // with_upgrades: a 101 hands the connection to the tunnel.
            if let Err(e) = conn.with_upgrades().await {
                debug!(%addr, error = %e, "backend connection ended");
            }
        });
        Ok(sender)
    }
}

/// Classify a failure after the request was (maybe) written.
pub(crate) fn classify(e: hyper::Error) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return ProxyError::with_cause(ErrorKind::BodyTooLarge, e);
        }
        source = s.source();
    }
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return ProxyError::with_cause(ErrorKind::UpstreamClosed, e);
    }
    ProxyError::with_cause(ErrorKind::UpstreamProtocol, e)
}
