//! One client connection: PROXY header, TLS, the HTTP server, the idle
//! watch and the send timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::state::{Active, Activity, ConnInfo, OpenConn, Worker};
use crate::h1_guard::{FramingHandle, H1Guard};
use crate::headers::ClientInfo;
use crate::io::{Prefixed, SendTimeout, read_proxy_header};
use crate::options::max_head;
use crate::proxy_protocol::ProxyHeader;
use crate::tls::ACME_TLS_ALPN;

impl Worker {
    pub(crate) async fn connection(
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
                    let alpn = tls_stream.get_ref().1.alpn_protocol();
                    if alpn == Some(ACME_TLS_ALPN) {
                        // A TLS-ALPN-01 validation: the handshake was the
                        // answer (RFC 8737 3); no HTTP follows.
                        debug!(%peer, "ACME TLS-ALPN-01 handshake answered");
                        return;
                    }
                    let h2 = alpn == Some(b"h2");
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
    pub(crate) async fn serve_conn<I>(self: &Arc<Self>, io: I, conn: ConnInfo, h1: bool)
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
}
