//! Automatic HTTPS: certificates from an ACME server (RFC 8555), for every
//! exact host the route table claims, obtained and renewed by the router.
//!
//! Layers, plain first:
//! - `state`: what the request path and the TLS resolver read (HTTP-01
//!   answers, TLS-ALPN-01 and issued certificates, pending hosts) and each
//!   host's [`CertStatus`].
//! - `schedule`: renewal time and retry backoff (pure).
//! - `store`: the account and certificates on disk (atomic, 0600).
//! - `client`: the HTTPS transport (`--acme-ca`, `Retry-After`).
//! - `issuer`: the task that orders, answers challenges and renews.
//!
//! Wildcard hosts are ordered by DNS-01 when they lie inside a zone whose
//! TXT records someone serves from the issuer's channel (the binary feeds
//! it into its DNS: the router knows no DNS).
//!
//! Only names a route claims are ever ordered: the issuer follows
//! [`crate::Router::hosts`], never the names clients ask for. The HTTP-01
//! answer is a step of the request path (`proxy/request.rs`, `route`); the
//! TLS-ALPN-01 answer is the resolver's (`crate::tls::CertResolver`).

use std::path::PathBuf;
use std::time::Duration;

mod client;
pub mod cluster;
mod issuer;
pub mod schedule;
mod state;
pub mod store;

pub use issuer::{Issuer, TxtRecords};
pub use state::{AcmeState, CertPhase, CertStatus};

/// The path prefix of HTTP-01 answers (RFC 8555 8.3).
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("{0}: {1}")]
    Store(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Certificate(PathBuf, String),
    #[error("ACME: {0}")]
    Acme(String),
    #[error("order failed: {0}")]
    Order(String),
    #[error("certificate key: {0}")]
    Key(String),
}

impl From<instant_acme::Error> for AcmeError {
    fn from(e: instant_acme::Error) -> Self {
        AcmeError::Acme(e.to_string())
    }
}

impl From<rcgen::Error> for AcmeError {
    fn from(e: rcgen::Error) -> Self {
        AcmeError::Key(e.to_string())
    }
}

/// A challenge type portless can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// HTTP-01: a file under [`HTTP01_PREFIX`] on the plain listener.
    Http01,
    /// TLS-ALPN-01: a certificate by ALPN `acme-tls/1` on the HTTPS
    /// listener.
    TlsAlpn01,
    /// DNS-01: a TXT record `_acme-challenge.<name>`, published on the
    /// issuer's TXT channel; the only one for wildcard hosts.
    Dns01,
}

impl ChallengeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
            ChallengeKind::Dns01 => "dns-01",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "http-01" => Some(ChallengeKind::Http01),
            "tls-alpn-01" => Some(ChallengeKind::TlsAlpn01),
            _ => None,
        }
    }

    fn acme_type(self) -> instant_acme::ChallengeType {
        match self {
            ChallengeKind::Http01 => instant_acme::ChallengeType::Http01,
            ChallengeKind::TlsAlpn01 => instant_acme::ChallengeType::TlsAlpn01,
            ChallengeKind::Dns01 => instant_acme::ChallengeType::Dns01,
        }
    }
}

/// How to reach the ACME server and keep its certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeOptions {
    /// The server's directory URL.
    pub directory: String,
    /// Contact address of the account (`mailto:` is added).
    pub email: Option<String>,
    /// PEM file of CA certificates trusted for the ACME server's own
    /// HTTPS, beside the system's (a private server's CA).
    pub ca_file: Option<PathBuf>,
    /// Where the account and certificates are kept.
    pub dir: PathBuf,
    /// Challenge types in order of preference; the first the server offers
    /// is used.
    pub challenges: Vec<ChallengeKind>,
    /// The wait after a first failed order, doubling with each further one.
    pub retry_base: Duration,
    /// The longest wait between failed orders.
    pub retry_max: Duration,
    /// Zones whose names' TXT records the issuer's DNS-01 channel serves
    /// (lower case, no trailing dot): a wildcard host inside one (`*.z`
    /// with `z` the zone or under it) is ordered by DNS-01; others are not
    /// ordered at all.
    pub dns01_zones: Vec<String>,
    /// How long a published TXT record is given to be served before the
    /// server is told to look.
    pub dns01_settle: Duration,
}

impl AcmeOptions {
    pub fn new(directory: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        AcmeOptions {
            directory: directory.into(),
            email: None,
            ca_file: None,
            dir: dir.into(),
            challenges: vec![ChallengeKind::Http01, ChallengeKind::TlsAlpn01],
            // Let's Encrypt allows 5 failed validations per name and hour:
            // a minute doubling stays under it.
            retry_base: Duration::from_secs(60),
            retry_max: Duration::from_secs(6 * 3600),
            dns01_zones: Vec::new(),
            dns01_settle: Duration::from_millis(500),
        }
    }
}
