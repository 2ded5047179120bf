//! The catalog: one immutable snapshot of what the Docker Engine (and, in
//! cluster mode, etcd) says exists. Discovery builds a new one on every change
//! and publishes it; the DNS zone, the route table and the netplane plan are
//! all derived from it, away from any request path.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Everything portless knows about this host's containers and networks,
/// and in cluster mode the other hosts' containers on the cluster network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// Networks by Docker network id.
    pub networks: BTreeMap<String, Network>,
    /// Running (or paused) containers of this host by Docker container id.
    /// Stopped containers are not in the catalog.
    pub containers: BTreeMap<String, Container>,
    /// Other hosts' containers on the cluster network, by host id (cluster
    /// mode). Each host's entry is shared between snapshots until it
    /// changes, so a snapshot of a large cluster is cheap to make.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub remote: BTreeMap<String, Arc<RemoteHost>>,
}

/// One other host's containers, merged from its records in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteHost {
    /// Its id in etcd.
    pub id: String,
    pub hostname: String,
    /// Each with one endpoint, on this host's cluster network, and `host`
    /// set.
    pub containers: Vec<Container>,
}

impl Catalog {
    /// Every container answered and routed here: this host's, then the
    /// other hosts'.
    pub fn all_containers(&self) -> impl Iterator<Item = &Container> + '_ {
        self.containers
            .values()
            .chain(self.remote.values().flat_map(|h| h.containers.iter()))
    }

    /// How many containers [`Catalog::all_containers`] yields.
    pub fn len(&self) -> usize {
        self.containers.len()
            + self
                .remote
                .values()
                .map(|h| h.containers.len())
                .sum::<usize>()
    }
}

/// A Docker network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub name: String,
    pub driver: String,
    pub subnets: Vec<IpNet>,
    /// Gateway addresses: portless listens for DNS on these.
    pub gateways: Vec<IpAddr>,
    pub internal: bool,
}

impl Network {
    /// A bridge on this host: Docker's `bridge` driver, or a cluster
    /// network (`-d portless`, a bridge on every host). Its gateway is a
    /// host address and nothing but its containers and the host lives in
    /// its subnet (unlike macvlan or ipvlan, whose subnet is the LAN).
    pub fn is_bridge(&self) -> bool {
        self.driver == "bridge" || self.driver == crate::plugin::DRIVER
    }
}

/// Docker's healthcheck state for a container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// The container has no healthcheck.
    #[default]
    None,
    Starting,
    Healthy,
    Unhealthy,
}

/// A running container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub id: String,
    /// The name without Docker's leading slash.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub health: Health,
    /// Docker has announced that the container is being stopped or killed:
    /// it gets no new requests, but its in-flight ones may finish.
    pub stopping: bool,
    /// The signal `docker stop` sends it (`STOPSIGNAL`, `--stop-signal`),
    /// as Docker reports it (`SIGTERM`, `QUIT`, `37`...); None: SIGTERM.
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// TCP ports the image or run command exposes.
    pub exposed_tcp_ports: Vec<u16>,
    /// `com.docker.compose.project`, when started by compose.
    pub compose_project: Option<String>,
    /// `com.docker.compose.service`, when started by compose.
    pub compose_service: Option<String>,
    /// One entry per network the container is attached to, sorted by
    /// network name.
    pub endpoints: Vec<Endpoint>,
    /// The cluster host it runs on, for another host's container (cluster
    /// mode); None for this host's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// A container's attachment to one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub network_id: String,
    pub network_name: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// `--network-alias` aliases on this network (Docker's own short-id
    /// alias is left out).
    pub aliases: Vec<String>,
}

/// How fit a container is for new work: the one notion of liveness that
/// DNS answers and the router's backends are both derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Healthy, or without a healthcheck.
    Ready,
    /// Its healthcheck has not passed yet.
    Starting,
    /// Its healthcheck fails.
    Unhealthy,
    /// Docker is stopping it (its `kill` event): no new work, though it
    /// still runs and finishes what it has.
    Draining,
}

impl Container {
    pub fn liveness(&self) -> Liveness {
        if self.stopping {
            return Liveness::Draining;
        }
        match self.health {
            Health::None | Health::Healthy => Liveness::Ready,
            Health::Starting => Liveness::Starting,
            Health::Unhealthy => Liveness::Unhealthy,
        }
    }
}

impl Endpoint {
    /// The endpoint's addresses, IPv4 first.
    pub fn addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.ipv6.map(IpAddr::V6))
    }
}

/// A published catalog with what caused it: what discovery (merged with
/// the other hosts' records in cluster mode) hands to its consumers over a
/// `watch` channel.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub catalog: Arc<Catalog>,
    /// When the Docker event that produced this snapshot was emitted
    /// (nanoseconds since the epoch, the daemon's clock). None for a full
    /// listing.
    pub event_time_ns: Option<i64>,
}
