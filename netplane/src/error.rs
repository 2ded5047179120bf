//! The crate's error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netlink: {op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("network namespace {}: {source}", path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the netlink executor thread is gone")]
    ExecutorGone,
    #[error("underlay: {0}")]
    Underlay(String),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// etcd answered and refused the credentials (or has auth off).
    #[error("etcd refused to authenticate user {user}: {reason}")]
    Auth { user: String, reason: String },
    /// etcd refused this host's client certificate (from a TLS alert).
    #[error("{0}")]
    CertificateRefused(String),
    /// etcd no longer knows this lease (it expired): lease again.
    #[error("etcd lease {0:x} is gone")]
    LeaseGone(i64),
    #[error("cluster state: {0}")]
    Store(String),
    #[error("iptables: {0}")]
    Iptables(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
