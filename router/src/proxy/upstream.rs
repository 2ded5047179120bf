//! Upstream connections: the h2c connection cache beside the HTTP/1 pool
//! (`crate::pool`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::debug;

use super::state::{BackendRuntime, Worker};
use crate::body::ReqBody;
use crate::error::{ErrorKind, ProxyError};
use crate::table::{Backend, Scheme};

impl Worker {
    /// Send one attempt to `backend` and wait for its response headers, up
    /// to the upstream timeout; counted in the backend's requests and in
    /// flight while it waits.
    pub(crate) async fn send_upstream(
        &self,
        backend: &Backend,
        brt: &BackendRuntime,
        up: Request<ReqBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        brt.requests.fetch_add(1, Relaxed);
        brt.in_flight.fetch_add(1, Relaxed);
        let timeout = self.opts.upstream_timeout;
        let sent = match backend.scheme {
            Scheme::Http => tokio::time::timeout(timeout, self.pool.send(backend.addr, up)).await,
            // Boxed: only h2c backends take this path, and its large
            // future would otherwise be part of (and moved with) every
            // HTTP/1 request's.
            Scheme::H2c => {
                tokio::time::timeout(timeout, Box::pin(self.send_h2(brt, backend.addr, up))).await
            }
        };
        brt.in_flight.fetch_sub(1, Relaxed);
        sent.unwrap_or_else(|_| {
            self.metrics.upstream_timeouts.fetch_add(1, Relaxed);
            Err(ProxyError::new(ErrorKind::UpstreamTimeout))
        })
    }

    pub(crate) async fn send_h2(
        &self,
        brt: &BackendRuntime,
        addr: SocketAddr,
        req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        brt.h2_used_ms.store(self.now_ms(), Relaxed);
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
        let resp = sender
            .send_request(req)
            .await
            .map_err(crate::pool::classify);
        brt.h2_used_ms.store(self.now_ms(), Relaxed);
        resp
    }

    pub(crate) async fn connect_h2(
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
