//! portless-router: the Host-header HTTP(S) ingress.
//!
//! Requests are matched by host and path prefix against a [`RouteTable`] and
//! forwarded straight to a backend's own address. The crate takes plain
//! input ([`RouteSpec`]s of [`Backend`]s) and knows nothing of Docker.
//!
//! Layers, pure first:
//! - [`host`], [`table`]: host normalisation and route matching (no I/O).
//! - [`balance`]: backend choice (round-robin over health tiers).
//! - [`policy`]: retry and ejection decisions (pure, time passed in).
//! - [`proxy_protocol`], [`headers`], [`error`]: wire parsing, header
//!   rewriting and the error → status mapping.
//! - [`Router`] (in `proxy`): the hyper shell that serves listeners handed
//!   in by the caller ([`bind_reuseport`], [`Router::spawn_threads`]: one
//!   single-threaded runtime per CPU, sharing the table), pools upstream
//!   connections per thread (`pool`), retries and ejects.
//! - `h1_guard`: follows HTTP/1 request framing on the wire, so that a
//!   request with both `Content-Length` and `Transfer-Encoding` (which
//!   hyper accepts, dropping the former) gets 400.
//! - [`tls`]: the rustls SNI certificate resolver over a directory (and
//!   ACME's certificates).
//! - [`acme`]: automatic HTTPS: certificates ordered and renewed from an
//!   ACME server for the table's hosts.
//! - [`metrics`]: lock-free counters and their plain snapshots (the binary encodes them).
//! - [`access_log`]: one JSON line per request, queued by the request path
//!   and written by a thread of its own.
//!
//! It does not discover routes or render status as JSON: the binary does
//! those.

// Tests may unwrap: a panic there is a failed test, with its message.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod access_log;
pub mod acme;
pub mod balance;
mod body;
pub mod error;
mod h1_guard;
/// For the `h1_framing` fuzz target only (the `fuzzing` feature).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use h1_guard::fuzzing as h1_guard_fuzzing;
pub mod headers;
pub mod host;
pub mod metrics;
mod options;
pub mod policy;
mod pool;
pub mod proxy_protocol;
pub mod table;

pub use host::HostPattern;
pub use table::{Backend, BackendState, Route, RouteKey, RouteSpec, RouteTable, Scheme};
pub mod io;
mod proxy;
pub mod tls;

pub use body::{BodyFault, ClientBody, ReqBody, RespBody};
pub use options::RouterOptions;
pub use proxy::{BackendStatus, RouteStatus, Router, RouterThreads, bind_reuseport};
