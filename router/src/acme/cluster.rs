//! Several hosts, one order per name. The issuers of a cluster's hosts
//! share their work through a [`Coordinator`] (the binary implements it
//! over etcd; the router never imports etcd):
//! - one host takes the right to order a name ([`Coordinator::claim`]);
//!   the others wait for its result;
//! - its challenge answers are published for every host
//!   ([`Coordinator::publish`]), since the ACME server may reach any host
//!   behind the name; each host serves the others' answers through
//!   [`crate::acme::AcmeState::put_token`] and its TXT channel;
//! - the certificate is shared ([`Coordinator::share`]) and comes back to
//!   every other host's issuer on its incoming channel
//!   ([`crate::acme::Issuer::with_cluster`]).
//!
//! TLS-ALPN-01 is not used in a cluster: its answer is a certificate
//! whose key would have to travel too, and HTTP-01 serves the same names.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

/// A future of a coordinator call.
pub type CoordFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// A challenge answer, as published for the other hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum SharedAnswer {
    /// Serve `key_authorization` at the HTTP-01 path of `token` for `host`.
    Http01 {
        token: String,
        host: String,
        key_authorization: String,
    },
    /// Serve TXT `value` at `name` (`_acme-challenge.…`).
    Dns01 { name: String, value: String },
}

/// What issuers of several hosts share.
pub trait Coordinator: Send + Sync + 'static {
    /// Take (or keep) the right to order `host`'s certificate. False:
    /// another host holds it and will share its result.
    fn claim<'a>(&'a self, host: &'a str) -> CoordFuture<'a, bool>;
    /// Publish a challenge answer under `id` for every host, for the time
    /// of the order.
    fn publish<'a>(&'a self, id: &'a str, answer: &'a SharedAnswer) -> CoordFuture<'a, ()>;
    /// Withdraw the answer published under `id`.
    fn withdraw<'a>(&'a self, id: &'a str) -> CoordFuture<'a, ()>;
    /// Give every other host `host`'s certificate: chain and key, PEM.
    fn share<'a>(&'a self, host: &'a str, pem: &'a str) -> CoordFuture<'a, ()>;
}

/// A certificate another host obtained: its name and its chain and key,
/// PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedCert {
    pub host: String,
    pub pem: String,
}
