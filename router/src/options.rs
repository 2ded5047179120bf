//! The router's tunables, with their defaults (the one home of each).

use std::time::Duration;

use ipnet::IpNet;

use std::sync::Arc;

use crate::access_log::AccessLog;
use crate::acme::AcmeState;

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
    /// With automatic HTTPS: the HTTP-01 answers (a step of the request
    /// path) and the hosts still waiting for a certificate (not
    /// redirected to https).
    pub acme: Option<Arc<AcmeState>>,
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
            acme: None,
        }
    }
}

/// The HTTP/2 header list size the HPACK decoder takes (and the router
/// advertises): four times the limit, at least 256 KiB. A header block
/// between the limit and this gets a 431 from `route`; past this the
/// decoder cannot go on, and h2 answers a 431 and a PROTOCOL_ERROR reset
/// when it can, or ends the connection with GOAWAY(COMPRESSION_ERROR) when
/// the block no longer fits its buffer.
pub(crate) fn h2_decoder_limit(max_header_bytes: usize) -> usize {
    max_header_bytes.saturating_mul(4).max(256 * 1024)
}

/// hyper's read buffer limit: the largest HTTP/1 request head it reads.
pub(crate) fn max_head(opts: &RouterOptions) -> usize {
    opts.max_header_bytes.max(8192)
}
