//! portless-netplane: cross-host container connectivity.
//!
//! Every host leases a subnet of a cluster range in etcd and programs its
//! kernel so that containers on other hosts are reachable by their own
//! addresses: over one kernel VXLAN device with static neighbour, FDB and
//! route entries per peer, or over plain routes via peers on the same
//! segment.
//!
//! - [`plan`]: the pure core. [`plan::plan`] turns this host's spec and its
//!   peers' [`HostRecord`]s into a [`Plan`]; [`plan::diff`] compares it with
//!   the [`Observed`] kernel state and yields netlink [`Op`]s. Also the
//!   subnet choice ([`plan::pick_subnet`]). Tested without root.
//! - [`netlink`]: the executor ([`netlink::Kernel`]) on rtnetlink, on a
//!   dedicated OS thread that enters a network namespace if asked; reads
//!   back what portless owns and applies ops idempotently; follows kernel
//!   change events.
//! - [`store`]: the state in etcd under a versioned prefix: subnet leases
//!   granted by compare-and-swap, reservations, host records, watch.
//! - [`ipam`]: cluster networks (`docker network create -d portless`):
//!   their records, subnet, VNI, per-host address blocks and addresses,
//!   decided without I/O; the etcd side is in `store/networks.rs`.
//! - [`segment`]: a cluster network's bridge and veth pairs on one host.
//! - [`access`]: TLS (a CA, a client certificate) and user/password for
//!   etcd ([`access::EtcdAccess`]), checked when the configuration is read.
//! - [`iptables`]: the `PORTLESS-FWD`/`PORTLESS-NAT` chains.
//! - [`records`]: container records, what each host publishes about its
//!   containers on the cluster network so that names and routes cross
//!   hosts; the checks every record from etcd must pass; the publish diff.
//! - [`membership`]: the pure state machine of one host's membership:
//!   lease and keep-alive, listing and watching hosts and records,
//!   publishing own records, when to reconcile the kernel.
//! - [`agent`]: the thin I/O loop around it ([`agent::Agent`]): carries out
//!   its actions against etcd and the kernel, status snapshot, cleanup.
//!
//! What portless creates is its own: links named `pl-*`, routes with
//! protocol [`plan::ROUTE_PROTOCOL`], the two iptables chains. It does not
//! know Docker: the binary creates the Docker network on the leased subnet.
//! IPv4 only. etcd over http, or over TLS (mutual if given a client
//! certificate), with or without etcd's user/password auth.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod access;
pub mod agent;
pub mod error;
pub mod ipam;
pub mod iptables;
pub mod membership;
pub mod model;
pub mod netlink;
pub mod plan;
pub mod records;
pub mod segment;
pub mod store;

pub use error::{Error, Result};
pub use model::{HostRecord, Mac, Mode, Transport};
pub use plan::{Observed, Op, Plan};
