//! portless-dns: the DNS side of portless.
//!
//! - [`zone`]: the pure model. A [`Zone`] is built from plain inputs
//!   ([`ZoneInput`]: networks and their members, static hosts, ingress zones,
//!   host-side client ranges) and answers a question for a client address
//!   with [`Zone::answer`]. No sockets, no Docker, no clock.
//! - [`hosts`]: a hosts(5) parser for static names.
//! - [`forward`]: the upstream forwarder (UDP, TCP on truncation, failover,
//!   bounded time and concurrency).
//! - [`handler`]: the hickory-server `RequestHandler` that ties a live
//!   [`ZoneHandle`] and a [`Forwarder`] together.
//! - [`listener`]: the set of UDP/TCP listeners, changed live as addresses
//!   come and go.
//! - [`rrl`]: response rate limiting per client address over UDP.
//! - [`udp`], [`tcp`]: the serving loops.
//! - [`wire`]: the UDP fast path: the common query read, and its answer
//!   written, straight on the wire.
//!
//! It does not know Docker: the binary turns its catalog into a
//! [`ZoneInput`] and swaps the built [`Zone`] into the [`ZoneHandle`].

pub mod forward;
pub mod handler;
pub mod hosts;
pub mod listener;
pub mod metrics;
pub mod rrl;
pub mod tcp;
pub mod udp;
pub mod wire;
pub mod zone;

pub use forward::{ForwardError, Forwarder};
pub use handler::Handler;
pub use listener::Listeners;
pub use metrics::Metrics;
pub use rrl::{RateLimit, RateLimiter};
pub use zone::{Answer, Health, Member, NetworkInput, Zone, ZoneHandle, ZoneInput};
