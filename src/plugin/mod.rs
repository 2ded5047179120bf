//! `docker network create -d portless --ipam-driver portless`: Docker's
//! network and IPAM plugin protocol, served on a unix socket in cluster
//! mode: records, addresses, the local bridge, and (in [`plane`]) the
//! VXLAN between hosts.
//!
//! - [`api`]: the JSON of every call.
//! - this module: the socket, the dispatch and the answers. Networks and
//!   addresses live in etcd (`portless_netplane::store`, decided by
//!   `portless_netplane::ipam`); the local bridge and veth pairs are
//!   `portless_netplane::segment`.
//! - [`sync`]: every host makes the cluster's networks on its own Engine
//!   and removes them when their record goes.
//! - [`plane`]: each network's VXLAN device, routed per host block, from
//!   the blocks and addresses in etcd.
//!
//! Docker does not pass a network's name to its plugins. The pool is
//! recorded in etcd when Docker asks for it (`RequestPool`, before the
//! name is known); once Docker has made the network, this host reads its
//! name back and binds it to the record, and only then do other hosts
//! make it.

pub mod api;
pub mod plane;
pub mod sync;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bollard::Docker;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use ipnet::Ipv4Net;
use portless_netplane::agent;
use portless_netplane::ipam::{self, NetworkRecord, Taken};
use portless_netplane::netlink::Kernel;
use portless_netplane::segment;
use portless_netplane::store::{NewNetwork, Store};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};

use api::*;

/// The IPAM option portless sets when it makes a cluster network on its
/// own Engine: the network id, so that `RequestPool` hands out that
/// network's pool instead of recording a new one.
pub const REPLICA_OPTION: &str = "io.portless.network";
/// Label on the copies portless makes on each Engine (the value: the
/// network id).
pub const NETWORK_LABEL: &str = "io.portless.network";
/// The driver's and the IPAM driver's name.
pub const DRIVER: &str = "portless";

/// What the plugin needs from the configuration.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// Where networks without `--subnet` get theirs.
    pub pool: Ipv4Net,
    pub subnet_len: u8,
    /// The cluster range of host subnets: no network may overlap it.
    pub cluster: Ipv4Net,
    pub cluster_vni: u32,
    /// The VXLAN port of every host (`--vxlan-port`).
    pub vxlan_port: u16,
}

/// The MTU of a cluster network's links on a host: every packet may
/// cross a VXLAN device, whatever the cluster network's mode.
fn net_mtu(host: &agent::HostStatus) -> u32 {
    match host.mode {
        portless_netplane::Mode::Route => host
            .mtu
            .saturating_sub(portless_netplane::plan::VXLAN_OVERHEAD),
        _ => host.mtu,
    }
}

/// A network this Engine has, as its plugin knows it.
#[derive(Debug, Clone)]
struct LocalNet {
    id: String,
    bridge: String,
    gateway: Ipv4Addr,
}

/// The running plugin.
pub struct Plugin {
    cfg: PluginConfig,
    store: Store,
    kernel: Kernel,
    docker: Docker,
    status: watch::Receiver<agent::Status>,
    /// By Docker network id.
    nets: Mutex<HashMap<String, LocalNet>>,
    /// Records by network id (they never change but for the name).
    records: Mutex<HashMap<String, NetworkRecord>>,
    /// One address allocation at a time on this host: hosts race in etcd,
    /// not with themselves.
    alloc: tokio::sync::Mutex<()>,
    /// Network ids [`sync`] is removing itself (their record went).
    removing: Mutex<HashSet<String>>,
    /// Network ids whose copy here Docker is removing (`docker network
    /// rm`): [`sync`] must not make them again before the removal is
    /// through and its record, if the network leaves the cluster, gone.
    deleting: Mutex<HashMap<String, Deleting>>,
    /// Wakes [`sync`] early.
    wake: Notify,
    /// Wakes [`plane`] early (a network came or went here).
    plane_wake: Notify,
    /// [`sync`] has taken up this Engine's networks once: until then
    /// [`plane`] does not know which VXLAN devices to keep.
    taken_up: std::sync::atomic::AtomicBool,
    /// This host's own address in each network (by network id), with the
    /// lease it was given under.
    host_addrs: Mutex<HashMap<String, (i64, Ipv4Addr)>>,
    /// Addresses this process handed out to Docker and Docker has not
    /// given back, by network id, and when: in use though etcd may not
    /// show it (this host's lease ran out a moment ago), and not to be
    /// taken for leftovers while Docker is still attaching the container.
    handed: Mutex<HashMap<String, HashMap<Ipv4Addr, std::time::Instant>>>,
    /// The addresses of this Engine's containers by network id, as
    /// [`sync`] last listed them.
    engine_addrs: Mutex<HashMap<String, BTreeSet<Ipv4Addr>>>,
}

/// A removal of a network's copy by Docker: its calls under way, and when
/// the last one came or ended.
#[derive(Debug, Clone, Copy)]
struct Deleting {
    busy: u32,
    last: std::time::Instant,
}

/// Marks a network's removal under way for as long as it lives.
struct DeletingGuard<'a> {
    plugin: &'a Plugin,
    id: String,
}

impl Drop for DeletingGuard<'_> {
    fn drop(&mut self) {
        if let Some(d) = lock(&self.plugin.deleting).get_mut(&self.id) {
            d.busy = d.busy.saturating_sub(1);
            d.last = std::time::Instant::now();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An answer, or Docker's error shape.
type Answer = Result<serde_json::Value, String>;

fn to_value<T: Serialize>(v: T) -> Answer {
    serde_json::to_value(v).map_err(|e| e.to_string())
}

fn parse<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| format!("malformed request: {e}"))
}

fn cidr_addr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let n: Ipv4Net = s
        .parse()
        .or_else(|_| {
            s.parse::<Ipv4Addr>()
                .map(|a| Ipv4Net::new(a, 32).unwrap_or_default())
        })
        .map_err(|_| format!("not an IPv4 address: {s:?}"))?;
    Ok((n.addr(), n.prefix_len()))
}

impl Plugin {
    pub fn new(
        cfg: PluginConfig,
        store: Store,
        kernel: Kernel,
        docker: Docker,
        status: watch::Receiver<agent::Status>,
    ) -> Arc<Plugin> {
        Arc::new(Plugin {
            cfg,
            store,
            kernel,
            docker,
            status,
            nets: Mutex::new(HashMap::new()),
            records: Mutex::new(HashMap::new()),
            alloc: tokio::sync::Mutex::new(()),
            removing: Mutex::new(HashSet::new()),
            deleting: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            plane_wake: Notify::new(),
            taken_up: std::sync::atomic::AtomicBool::new(false),
            host_addrs: Mutex::new(HashMap::new()),
            handed: Mutex::new(HashMap::new()),
            engine_addrs: Mutex::new(HashMap::new()),
        })
    }

    /// The addresses this host knows are in use in network `id`: handed
    /// out and not given back, or on a container of the Engine. Never
    /// handed out again, whatever etcd says for a moment.
    fn in_use_here(&self, id: &str) -> BTreeSet<Ipv4Addr> {
        let mut all: BTreeSet<Ipv4Addr> = lock(&self.handed)
            .get(id)
            .map(|h| h.keys().copied().collect())
            .unwrap_or_default();
        if let Some(e) = lock(&self.engine_addrs).get(id) {
            all.extend(e);
        }
        all
    }

    /// Marks network `id`'s removal from this Engine under way until the
    /// guard drops.
    fn deleting(&self, id: &str) -> DeletingGuard<'_> {
        let now = std::time::Instant::now();
        let mut all = lock(&self.deleting);
        // Forget removals long over.
        all.retain(|_, d| d.busy > 0 || now.duration_since(d.last) < Duration::from_secs(60));
        let d = all
            .entry(id.to_owned())
            .or_insert(Deleting { busy: 0, last: now });
        d.busy += 1;
        d.last = now;
        DeletingGuard {
            plugin: self,
            id: id.to_owned(),
        }
    }

    /// Whether Docker is removing network `id` from this Engine, or was
    /// within `quiet`.
    fn removal_under_way(&self, id: &str, quiet: Duration) -> bool {
        lock(&self.deleting)
            .get(id)
            .is_some_and(|d| d.busy > 0 || d.last.elapsed() < quiet)
    }

    /// This host's id, lease and MTU, waiting a little for the lease.
    async fn host(&self) -> Result<agent::HostStatus, String> {
        self.host_not_on(0).await
    }

    /// [`Plugin::host`] under a lease other than `old` (which ran out: the
    /// agent leases again at once).
    async fn host_not_on(&self, old: i64) -> Result<agent::HostStatus, String> {
        let mut rx = self.status.clone();
        let wait = async {
            loop {
                if let Some(h) = rx.borrow_and_update().host.clone()
                    && h.lease_id != 0
                    && h.lease_id != old
                {
                    return h;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .map_err(|_| {
                "portless holds no cluster lease (is etcd reachable?); try again".to_owned()
            })
    }

    async fn record(&self, id: &str) -> Result<NetworkRecord, String> {
        if let Some(r) = lock(&self.records).get(id) {
            return Ok(r.clone());
        }
        match self.store.network(id).await {
            Ok(Some((r, _))) => {
                lock(&self.records).insert(id.to_owned(), r.clone());
                Ok(r)
            }
            Ok(None) => Err(format!("no portless network with pool {id}")),
            Err(e) => Err(format!("etcd: {e}")),
        }
    }

    /// Answer one call.
    pub async fn call(self: &Arc<Self>, method: &str, body: &[u8]) -> Answer {
        match method {
            "Plugin.Activate" => to_value(Activate {
                implements: vec!["NetworkDriver".into(), "IpamDriver".into()],
            }),
            // Scope local: Docker 23+ has no cluster store, and portless
            // makes the network on every host's Engine itself.
            "NetworkDriver.GetCapabilities" => to_value(Capabilities {
                scope: "local".into(),
                connectivity_scope: "global".into(),
            }),
            "NetworkDriver.CreateNetwork" => self.create_network(parse(body)?).await,
            "NetworkDriver.DeleteNetwork" => self.delete_network(parse(body)?).await,
            "NetworkDriver.CreateEndpoint" => {
                let r: CreateEndpoint = parse(body)?;
                let has_addr = r.interface.as_ref().is_some_and(|i| !i.address.is_empty());
                if !has_addr {
                    return Err("no IPv4 address for the endpoint: create the network with \
                                --ipam-driver portless"
                        .into());
                }
                to_value(CreateEndpointResponse::default())
            }
            "NetworkDriver.DeleteEndpoint" => {
                let _: EndpointRef = parse(body)?;
                Ok(serde_json::json!({}))
            }
            "NetworkDriver.EndpointOperInfo" => {
                let _: EndpointRef = parse(body)?;
                to_value(EndpointInfo::default())
            }
            "NetworkDriver.Join" => self.join(parse(body)?).await,
            "NetworkDriver.Leave" => {
                let r: EndpointRef = parse(body)?;
                let (host_end, _) = segment::veth_names(&r.endpoint_id);
                segment::remove_link(&self.kernel, &host_end)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(serde_json::json!({}))
            }
            "NetworkDriver.DiscoverNew" | "NetworkDriver.DiscoverDelete" => {
                let _: Discovery = parse(body)?;
                Ok(serde_json::json!({}))
            }
            // NAT out is the bridge's own (segment); ports are never
            // published: `-p` is refused rather than silently ignored.
            "NetworkDriver.ProgramExternalConnectivity" => {
                let r: ProgramExternalConnectivity = parse(body)?;
                match r.refusal() {
                    Some(why) => Err(why),
                    None => Ok(serde_json::json!({})),
                }
            }
            "NetworkDriver.RevokeExternalConnectivity" => {
                let _: EndpointRef = parse(body)?;
                Ok(serde_json::json!({}))
            }
            "IpamDriver.GetCapabilities" => to_value(IpamCapabilities::default()),
            "IpamDriver.GetDefaultAddressSpaces" => to_value(AddressSpaces {
                local_default_address_space: DRIVER.into(),
                global_default_address_space: DRIVER.into(),
            }),
            "IpamDriver.RequestPool" => self.request_pool(parse(body)?).await,
            "IpamDriver.ReleasePool" => self.release_pool(parse(body)?).await,
            "IpamDriver.RequestAddress" => self.request_address(parse(body)?).await,
            "IpamDriver.ReleaseAddress" => self.release_address(parse(body)?).await,
            other => Err(format!("{other}: not implemented by portless")),
        }
    }

    async fn request_pool(&self, r: RequestPool) -> Answer {
        if r.v6 {
            return Err("portless networks are IPv4 only: leave out --ipv6".into());
        }
        if !r.sub_pool.is_empty() {
            return Err("portless networks do not take --ip-range".into());
        }
        let mut options = r.options.unwrap_or_default();
        let asked: Option<Ipv4Net> = match r.pool.as_str() {
            "" => None,
            p => Some(
                p.parse()
                    .map_err(|_| format!("--subnet {p}: not an IPv4 CIDR"))?,
            ),
        };
        if let Some(id) = options.remove(REPLICA_OPTION) {
            // This host's copy of a cluster network.
            let rec = self.record(&id).await?;
            if asked.is_some_and(|a| a != rec.subnet) {
                return Err(format!("network {id} is on {}, not {}", rec.subnet, r.pool));
            }
            return to_value(RequestPoolResponse {
                pool_id: id,
                pool: rec.subnet.to_string(),
                data: BTreeMap::new(),
            });
        }
        let host = self.host().await?;
        let req = NewNetwork {
            subnet: asked,
            pool: self.cfg.pool,
            len: self.cfg.subnet_len,
            forbidden: vec![Taken {
                subnet: self.cfg.cluster,
                what: format!("the cluster range {} (--cluster-cidr)", self.cfg.cluster),
            }],
            cluster_vni: self.cfg.cluster_vni,
            creator: host.id,
            options,
        };
        let rec = match self.store.create_network(&req).await {
            Ok(Ok(rec)) => rec,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(e) => return Err(format!("etcd: {e}")),
        };
        lock(&self.records).insert(rec.id(), rec.clone());
        to_value(RequestPoolResponse {
            pool_id: rec.id(),
            pool: rec.subnet.to_string(),
            data: BTreeMap::new(),
        })
    }

    async fn release_pool(&self, r: ReleasePool) -> Answer {
        let _removal = self.deleting(&r.pool_id);
        // A creation that failed after its pool was recorded: forget it.
        // A named network goes with DeleteNetwork.
        if let Ok(Some((rec, _))) = self.store.network(&r.pool_id).await
            && rec.name.is_none()
            && self.host().await.is_ok_and(|h| h.id == rec.creator)
            && !lock(&self.nets).values().any(|n| n.id == r.pool_id)
        {
            self.store
                .delete_network(&rec)
                .await
                .map_err(|e| format!("etcd: {e}"))?;
        }
        lock(&self.records).remove(&r.pool_id);
        Ok(serde_json::json!({}))
    }

    async fn request_address(&self, r: RequestAddress) -> Answer {
        let rec = self.record(&r.pool_id).await?;
        let len = rec.subnet.prefix_len();
        let gateway = r
            .options
            .as_ref()
            .and_then(|o| o.get(REQUEST_ADDRESS_TYPE))
            .is_some_and(|t| t == GATEWAY_TYPE);
        let want = match r.address.as_str() {
            "" => None,
            a => Some(cidr_addr(a)?.0),
        };
        if gateway {
            if want.is_some_and(|w| w != rec.gateway) {
                return Err(format!(
                    "the gateway of a portless network is its first address, {}",
                    rec.gateway
                ));
            }
            return to_value(RequestAddressResponse {
                address: format!("{}/{len}", rec.gateway),
                data: BTreeMap::new(),
            });
        }
        let mut host = self.host().await?;
        self.engine_known().await;
        let mut retried = false;
        loop {
            let one = self.alloc.lock().await;
            let avoid = self.in_use_here(&r.pool_id);
            match self
                .store
                .request_address_avoiding(&rec, &host.id, host.lease_id, want, &avoid)
                .await
            {
                Ok(Ok(a)) => {
                    lock(&self.handed)
                        .entry(r.pool_id.clone())
                        .or_default()
                        .insert(a, std::time::Instant::now());
                    tracing::debug!(network = ?rec.name, addr = %a, "address handed out");
                    return to_value(RequestAddressResponse {
                        address: format!("{a}/{len}"),
                        data: BTreeMap::new(),
                    });
                }
                Ok(Err(e)) => return Err(e.to_string()),
                // The lease ran out a moment ago (a busy host or etcd
                // missed a keepalive): once more under the new one, which
                // the agent takes at once.
                Err(portless_netplane::Error::LeaseGone(old)) if !retried => {
                    drop(one);
                    retried = true;
                    tracing::info!(
                        lease = old,
                        "the lease ran out while handing out an address; again under the new one"
                    );
                    host = self.host_not_on(old).await?;
                }
                Err(e) => return Err(format!("etcd: {e}")),
            }
        }
    }

    async fn release_address(&self, r: ReleaseAddress) -> Answer {
        let (addr, _) = cidr_addr(&r.address)?;
        if let Some(h) = lock(&self.handed).get_mut(&r.pool_id) {
            h.remove(&addr);
        }
        let Ok(rec) = self.record(&r.pool_id).await else {
            // The network is gone, and its addresses with it.
            return Ok(serde_json::json!({}));
        };
        if addr == rec.gateway {
            return Ok(serde_json::json!({}));
        }
        let host = self.host().await?;
        self.store
            .release_address(&r.pool_id, &host.id, addr, false)
            .await
            .map_err(|e| format!("etcd: {e}"))?;
        Ok(serde_json::json!({}))
    }

    async fn create_network(self: &Arc<Self>, r: CreateNetwork) -> Answer {
        if r.ipv6_data.as_ref().is_some_and(|v| !v.is_empty()) {
            return Err("portless networks are IPv4 only".into());
        }
        let v4 = r.ipv4_data.unwrap_or_default();
        let [data] = v4.as_slice() else {
            return Err(format!(
                "a portless network has exactly one IPv4 pool, not {}",
                v4.len()
            ));
        };
        let pool: Ipv4Net = data
            .pool
            .parse()
            .map_err(|_| format!("pool {:?} is not an IPv4 CIDR", data.pool))?;
        let id = ipam::network_id(&pool);
        let rec = self.record(&id).await.map_err(|_| {
            format!(
                "pool {pool} is not a portless cluster network: create it with \
                 --ipam-driver portless"
            )
        })?;
        let host = self.host().await?;
        let bridge = segment::bridge_name(&r.network_id);
        segment::ensure_bridge(
            &self.kernel,
            &bridge,
            rec.vni,
            rec.gateway,
            pool.prefix_len(),
            net_mtu(&host),
            self.cfg.cluster,
        )
        .await
        .map_err(|e| format!("making bridge {bridge}: {e}"))?;
        lock(&self.nets).insert(
            r.network_id.clone(),
            LocalNet {
                id: id.clone(),
                bridge,
                gateway: rec.gateway,
            },
        );
        self.plane_wake.notify_one();
        if rec.name.is_none() {
            // Docker names the network once this call returned.
            let me = self.clone();
            tokio::spawn(async move { me.bind_name(r.network_id, id).await });
        }
        Ok(serde_json::json!({}))
    }

    /// Learn the name Docker gave network `docker_id` and bind it to its
    /// record, so that the other hosts make it. A name another cluster
    /// network holds already loses: this host's network is removed, and
    /// [`sync`] makes the cluster's network of that name instead.
    async fn bind_name(self: Arc<Self>, docker_id: String, id: String) {
        let mut name = None;
        for _ in 0..200 {
            match self.docker.inspect_network(&docker_id, None).await {
                Ok(n) => {
                    name = n.name;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
        let Some(name) = name else {
            tracing::warn!(network = %docker_id, "could not read the name of a new network from Docker");
            return;
        };
        match self.store.bind_network_name(&id, &name).await {
            Ok(Ok(rec)) => {
                lock(&self.records).insert(id, rec);
            }
            Ok(Err(why)) => {
                tracing::error!(network = %name, reason = %why, "network refused; removing it from this host");
                let _ = self.docker.remove_network(&docker_id).await;
            }
            Err(e) => {
                tracing::warn!(network = %name, error = %e, "could not name the network in etcd")
            }
        }
        self.wake.notify_one();
    }

    async fn delete_network(&self, r: DeleteNetwork) -> Answer {
        let local = lock(&self.nets).remove(&r.network_id);
        let _removal = local.as_ref().map(|l| self.deleting(&l.id));
        // The address this host took for itself in the network: its key
        // goes below (given back) or with the record; never reused.
        let own = local
            .as_ref()
            .and_then(|l| lock(&self.host_addrs).remove(&l.id));
        let bridge = segment::bridge_name(&r.network_id);
        segment::remove_bridge(&self.kernel, &bridge)
            .await
            .map_err(|e| format!("removing bridge {bridge}: {e}"))?;
        self.plane_wake.notify_one();
        let Some(local) = local else {
            return Ok(serde_json::json!({}));
        };
        // Docker removes a network only without endpoints here.
        lock(&self.handed).remove(&local.id);
        lock(&self.engine_addrs).remove(&local.id);
        if lock(&self.removing).remove(&local.id) {
            return Ok(serde_json::json!({}));
        }
        // `docker network rm` here: the network leaves the cluster unless
        // containers on other hosts still use it.
        let Ok(Some((rec, _))) = self.store.network(&local.id).await else {
            return Ok(serde_json::json!({}));
        };
        let host = self.host().await?;
        // This host's own address in the network goes with its copy.
        if let Some((_, a)) = own {
            self.store
                .release_address(&local.id, &host.id, a, true)
                .await
                .map_err(|e| format!("etcd: {e}"))?;
        }
        let addrs = self
            .store
            .network_address_holders(&local.id)
            .await
            .map_err(|e| format!("etcd: {e}"))?;
        let mut elsewhere: BTreeMap<String, usize> = BTreeMap::new();
        for (h, _) in addrs
            .values()
            .filter(|(h, _)| h.host != host.id && !h.for_host)
        {
            *elsewhere.entry(h.host.clone()).or_default() += 1;
        }
        let name = rec.name.clone().unwrap_or_else(|| rec.subnet.to_string());
        if !elsewhere.is_empty() {
            let on: Vec<String> = elsewhere
                .iter()
                .map(|(h, n)| format!("{n} on host {h}"))
                .collect();
            let msg = format!(
                "network {name} is still in use by containers on other hosts ({}); \
                 it stays in the cluster and portless makes it again on this host: \
                 remove those containers first",
                on.join(", ")
            );
            tracing::warn!(network = %name, "{msg}");
            self.wake.notify_one();
            return Err(msg);
        }
        self.store
            .delete_network(&rec)
            .await
            .map_err(|e| format!("etcd: {e}"))?;
        lock(&self.records).remove(&local.id);
        Ok(serde_json::json!({}))
    }

    /// Right after a start of portless, the Engine's networks and the
    /// addresses of its containers are not known (nor, if the lease ran
    /// out meanwhile, written again in etcd) until [`sync`]'s first pass:
    /// wait for it a little (Docker's call waits meanwhile).
    async fn engine_known(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.taken_up.load(std::sync::atomic::Ordering::Relaxed)
            && tokio::time::Instant::now() < deadline
        {
            self.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !self.taken_up.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                "answering Docker before this Engine's networks and containers are known (Docker or etcd slow to answer)"
            );
        }
    }

    /// The network `docker_id` of this Engine, once [`sync`] has taken the
    /// Engine's networks up.
    async fn local_net(&self, docker_id: &str) -> Result<LocalNet, String> {
        if !lock(&self.nets).contains_key(docker_id) {
            self.engine_known().await;
        }
        lock(&self.nets).get(docker_id).cloned().ok_or_else(|| {
            format!(
                "network {docker_id} is unknown to portless on this host \
                 (was portless restarted? recreate the network)"
            )
        })
    }

    async fn join(&self, r: Join) -> Answer {
        let net = self.local_net(&r.network_id).await?;
        let host = self.host().await?;
        let (host_end, container_end) = segment::veth_names(&r.endpoint_id);
        segment::add_veth(
            &self.kernel,
            &net.bridge,
            &host_end,
            &container_end,
            net_mtu(&host),
        )
        .await
        .map_err(|e| format!("making the veth pair of {}: {e}", r.endpoint_id))?;
        to_value(JoinResponse {
            interface_name: InterfaceName {
                src_name: container_end,
                dst_prefix: "eth".into(),
            },
            gateway: net.gateway.to_string(),
            ..Default::default()
        })
    }
}

/// Serve the plugin socket until the task is dropped. The socket file is
/// made afresh (a stale one from a previous run is removed).
pub async fn serve(
    plugin: Arc<Plugin>,
    socket: &Path,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing stale {}", socket.display()));
        }
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("binding the plugin socket {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "Docker network plugin listening");
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let plugin = plugin.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let plugin = plugin.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&plugin, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }))
}

async fn handle(plugin: &Arc<Plugin>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.uri().path().trim_start_matches('/').to_owned();
    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return answer(Err(format!("reading the request: {e}"))),
    };
    tracing::debug!(call = %method, body = %String::from_utf8_lossy(&body), "plugin call");
    let out = plugin.call(&method, &body).await;
    if let Err(e) = &out {
        tracing::info!(call = %method, error = %e, "plugin call refused");
    }
    answer(out)
}

fn answer(out: Answer) -> Response<Full<Bytes>> {
    let (status, body) = match out {
        Ok(v) => (StatusCode::OK, v.to_string()),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::to_string(&ErrorResponse { err: e }).unwrap_or_default(),
        ),
    };
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}
