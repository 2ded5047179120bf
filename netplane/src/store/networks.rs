//! Cluster networks and their addresses in etcd (see [`crate::ipam`] for
//! the decisions, made without I/O).
//!
//! | key                                   | value                  | bound to lease |
//! |---------------------------------------|------------------------|----------------|
//! | `{prefix}networks/{id}`               | [`NetworkRecord`] JSON | no             |
//! | `{prefix}netnames/{name}`             | network id             | no             |
//! | `{prefix}netblocks/{id}/{block}`      | host id                | the host's     |
//! | `{prefix}netreserve/{id}/{block}`     | host id (last holder)  | no             |
//! | `{prefix}netaddrs/{id}/{ip}`          | [`AddressHolder`] JSON | the host's     |
//!
//! `{id}` is the network's subnet (`10.30.1.0-24`). A network is created by
//! one transaction that succeeds only if no key under `networks/` changed
//! since the listing its subnet and VNI were chosen from, so two networks
//! never overlap or share a VNI. A name is bound by one transaction that
//! creates `netnames/{name}`: names are unique. Blocks are leased as host
//! subnets are (create-if-absent, a reservation that outlives the lease).
//! Every address is its own key, created only if absent: an address is
//! never given twice, whichever hosts ask at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use ipnet::Ipv4Net;

use super::{Store, parse_subnet_key, subnet_key};
use crate::error::{Error, Result};
use crate::ipam::{self, AddressHolder, IpamError, NetworkRecord, Taken};
use crate::plan::pick_subnet;

/// Attempts of one compare-and-swap loop before giving up.
const ATTEMPTS: usize = 64;

/// What a new network asks for.
#[derive(Debug, Clone)]
pub struct NewNetwork {
    /// `--subnet`, or None: the first free /`len` of `pool`.
    pub subnet: Option<Ipv4Net>,
    pub pool: Ipv4Net,
    pub len: u8,
    /// Ranges no network may overlap (the cluster range of host subnets).
    pub forbidden: Vec<Taken>,
    pub cluster_vni: u32,
    pub creator: String,
    pub options: BTreeMap<String, String>,
}

/// A network's blocks and its addresses, each with its holder's host id.
pub type Holders = (BTreeMap<Ipv4Net, String>, BTreeMap<Ipv4Addr, String>);

/// Every network at one revision, by id, with its key's mod revision.
#[derive(Debug, Clone, Default)]
pub struct NetworkListing {
    pub networks: BTreeMap<String, (NetworkRecord, i64)>,
    pub revision: i64,
}

impl NetworkListing {
    pub fn by_name(&self, name: &str) -> Option<&NetworkRecord> {
        self.networks
            .values()
            .map(|(r, _)| r)
            .find(|r| r.name.as_deref() == Some(name))
    }
}

fn lease_gone(lease: i64, e: etcd_client::Error) -> Error {
    match e {
        etcd_client::Error::GRpcStatus(s) if s.message().contains("requested lease not found") => {
            Error::LeaseGone(lease)
        }
        e => e.into(),
    }
}

impl Store {
    /// Every cluster network.
    pub async fn list_networks(&self) -> Result<NetworkListing> {
        self.sign_in().await?;
        let prefix = self.key("networks", "");
        let resp = self
            .client
            .kv_client()
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        let mut out = NetworkListing {
            revision: resp.header().map(|h| h.revision()).unwrap_or(0),
            ..Default::default()
        };
        for kv in resp.kvs() {
            let Some(id) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else {
                continue;
            };
            match NetworkRecord::decode(kv.value()) {
                Some(r) if r.id() == id => {
                    out.networks.insert(id.to_owned(), (r, kv.mod_revision()));
                }
                _ => tracing::warn!(key = id, "ignoring malformed network record"),
            }
        }
        Ok(out)
    }

    /// Create a network record (no name yet): its subnet as asked or the
    /// first free one of the pool, and a VNI of its own. The outer error is
    /// etcd's; the inner one the caller's.
    pub async fn create_network(
        &self,
        req: &NewNetwork,
    ) -> Result<std::result::Result<NetworkRecord, IpamError>> {
        let mut kv = self.client.kv_client();
        for _ in 0..ATTEMPTS {
            let listing = self.list_networks().await?;
            let mut taken = req.forbidden.clone();
            taken.extend(listing.networks.values().map(|(r, _)| Taken {
                subnet: r.subnet,
                what: match &r.name {
                    Some(n) => format!("network {n} ({})", r.subnet),
                    None => format!("a network being created ({})", r.subnet),
                },
            }));
            let subnet = match req.subnet {
                Some(s) => ipam::check_subnet(s, &taken).map(|()| s),
                None => ipam::pick_network_subnet(req.pool, req.len, &taken),
            };
            let subnet = match subnet {
                Ok(s) => s,
                Err(e) => return Ok(Err(e)),
            };
            let used: BTreeSet<u32> = listing.networks.values().map(|(r, _)| r.vni).collect();
            let vni = match ipam::pick_vni(&used, req.cluster_vni) {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            };
            let record = NetworkRecord {
                name: None,
                subnet,
                gateway: ipam::gateway_of(&subnet),
                vni,
                creator: req.creator.clone(),
                options: req.options.clone(),
            };
            // Nothing under networks/ written since the listing: the
            // subnet and VNI are still free.
            let unchanged = Compare::mod_revision(
                self.key("networks", ""),
                CompareOp::Less,
                listing.revision + 1,
            )
            .with_prefix();
            let txn = Txn::new().when(vec![unchanged]).and_then(vec![TxnOp::put(
                self.key("networks", &record.id()),
                record.encode(),
                None,
            )]);
            if kv.txn(txn).await?.succeeded() {
                tracing::info!(subnet = %subnet, vni, "cluster network recorded");
                return Ok(Ok(record));
            }
        }
        Err(Error::Store(
            "could not record the network: networks changed under every attempt".into(),
        ))
    }

    /// One network by id, with its mod revision.
    pub async fn network(&self, id: &str) -> Result<Option<(NetworkRecord, i64)>> {
        self.sign_in().await?;
        let resp = self
            .client
            .kv_client()
            .get(self.key("networks", id), None)
            .await?;
        Ok(resp.kvs().first().and_then(|kv| {
            NetworkRecord::decode(kv.value())
                .filter(|r| r.id() == id)
                .map(|r| (r, kv.mod_revision()))
        }))
    }

    /// Give network `id` its name. The inner error says which network
    /// holds the name already.
    pub async fn bind_network_name(
        &self,
        id: &str,
        name: &str,
    ) -> Result<std::result::Result<NetworkRecord, String>> {
        let mut kv = self.client.kv_client();
        let name_key = self.key("netnames", name);
        for _ in 0..ATTEMPTS {
            let Some((mut record, rev)) = self.network(id).await? else {
                return Ok(Err(format!("network {id} is not recorded")));
            };
            match &record.name {
                Some(n) if n == name => return Ok(Ok(record)),
                Some(n) => return Ok(Err(format!("network {id} is named {n} already"))),
                None => {}
            }
            record.name = Some(name.to_owned());
            let txn = Txn::new()
                .when(vec![
                    Compare::mod_revision(self.key("networks", id), CompareOp::Equal, rev),
                    Compare::create_revision(name_key.clone(), CompareOp::Equal, 0),
                ])
                .and_then(vec![
                    TxnOp::put(self.key("networks", id), record.encode(), None),
                    TxnOp::put(name_key.clone(), id, None),
                ]);
            if kv.txn(txn).await?.succeeded() {
                tracing::info!(network = name, subnet = %record.subnet, "cluster network named");
                return Ok(Ok(record));
            }
            let held = kv.get(name_key.clone(), None).await?;
            if let Some(other) = held.kvs().first().and_then(|k| k.value_str().ok())
                && other != id
            {
                return Ok(Err(format!(
                    "the name {name} is taken by another cluster network ({other})"
                )));
            }
        }
        Err(Error::Store(format!("could not name network {id}")))
    }

    /// Remove a network and everything under it (name, blocks,
    /// reservations, addresses).
    pub async fn delete_network(&self, record: &NetworkRecord) -> Result<()> {
        self.sign_in().await?;
        let id = record.id();
        let mut ops = vec![TxnOp::delete(self.key("networks", &id), None)];
        for kind in ["netblocks", "netreserve", "netaddrs"] {
            ops.push(TxnOp::delete(
                self.key(kind, &format!("{id}/")),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ));
        }
        let mut kv = self.client.kv_client();
        kv.txn(Txn::new().and_then(ops)).await?;
        if let Some(name) = &record.name {
            // Only if it still names this network.
            let k = self.key("netnames", name);
            let txn = Txn::new()
                .when(vec![Compare::value(
                    k.clone(),
                    CompareOp::Equal,
                    id.clone(),
                )])
                .and_then(vec![TxnOp::delete(k, None)]);
            kv.txn(txn).await?;
        }
        tracing::info!(network = ?record.name, subnet = %record.subnet, "cluster network removed");
        Ok(())
    }

    /// Whether network `id`'s record is in etcd.
    async fn network_exists(&self, id: &str) -> Result<bool> {
        let resp = self
            .client
            .kv_client()
            .get(
                self.key("networks", id),
                Some(GetOptions::new().with_count_only()),
            )
            .await?;
        Ok(resp.count() > 0)
    }

    /// Every address given out in network `id`, with its holder and the
    /// lease its key is bound to.
    pub async fn network_address_holders(
        &self,
        id: &str,
    ) -> Result<BTreeMap<Ipv4Addr, (AddressHolder, i64)>> {
        self.sign_in().await?;
        let prefix = self.key("netaddrs", &format!("{id}/"));
        let resp = self
            .client
            .kv_client()
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        let mut out = BTreeMap::new();
        for kv in resp.kvs() {
            let Some(ip) = kv
                .key_str()
                .ok()
                .and_then(|k| k.strip_prefix(&prefix))
                .and_then(|s| s.parse().ok())
            else {
                continue;
            };
            let holder =
                serde_json::from_slice::<AddressHolder>(kv.value()).unwrap_or(AddressHolder {
                    host: String::new(),
                    for_host: false,
                });
            out.insert(ip, (holder, kv.lease()));
        }
        Ok(out)
    }

    /// Every address given out in network `id` (containers' and hosts'
    /// own), with its host.
    pub async fn network_addresses(&self, id: &str) -> Result<BTreeMap<Ipv4Addr, String>> {
        Ok(self
            .network_address_holders(id)
            .await?
            .into_iter()
            .map(|(a, (h, _))| (a, h.host))
            .collect())
    }

    /// The address `host` (holding `lease`) has for itself in network
    /// `record` (see [`AddressHolder::for_host`]): the one it holds under
    /// this lease, or a new one: from its blocks when it holds some, else
    /// one outside every block ([`ipam::pick_host_address`]: a host with
    /// no container on the network leases no block for itself, which
    /// would leave fewer for the hosts that run its containers).
    pub async fn host_address(
        &self,
        record: &NetworkRecord,
        host: &str,
        lease: i64,
    ) -> Result<std::result::Result<Ipv4Addr, IpamError>> {
        self.host_address_avoiding(record, host, lease, &BTreeSet::new())
            .await
    }

    /// [`Store::host_address`], never one of `avoid` (addresses this
    /// host's containers have, which etcd may not hold for a moment: its
    /// lease ran out and they are not written again yet).
    pub async fn host_address_avoiding(
        &self,
        record: &NetworkRecord,
        host: &str,
        lease: i64,
        avoid: &BTreeSet<Ipv4Addr>,
    ) -> Result<std::result::Result<Ipv4Addr, IpamError>> {
        let held = self.network_address_holders(&record.id()).await?;
        if let Some((a, _)) = held
            .iter()
            .find(|(_, (h, l))| h.for_host && h.host == host && *l == lease)
        {
            return Ok(Ok(*a));
        }
        let label = record
            .name
            .clone()
            .unwrap_or_else(|| record.subnet.to_string());
        for _ in 0..ATTEMPTS {
            let (held_blocks, reserved) = self.blocks(&record.id()).await?;
            if held_blocks
                .values()
                .any(|(owner, l)| owner == host && *l == lease)
            {
                return self.allocate(record, host, lease, None, true, avoid).await;
            }
            let held: Vec<Ipv4Net> = held_blocks.keys().copied().collect();
            // Outside the blocks other hosts hold or will get back (their
            // reservations: a host away past its lease may still run
            // containers there), else outside the held ones only.
            let mut kept = held.clone();
            kept.extend(reserved.iter().filter(|(_, h)| *h != host).map(|(b, _)| *b));
            let mut used: BTreeSet<Ipv4Addr> = self
                .network_addresses(&record.id())
                .await?
                .into_keys()
                .collect();
            used.extend(avoid);
            let Some(a) = ipam::pick_host_address(&record.subnet, &kept, &used)
                .or_else(|| ipam::pick_host_address(&record.subnet, &held, &used))
            else {
                return Ok(Err(IpamError::Exhausted(label)));
            };
            match self
                .allocate(record, host, lease, Some(a), true, avoid)
                .await?
            {
                Err(IpamError::InUse { .. }) => continue,
                other => return Ok(other),
            }
        }
        Err(Error::Store(format!(
            "could not take an address of its own in {label}: too much contention"
        )))
    }

    /// This network's blocks (owner, lease) and reservations.
    #[allow(clippy::type_complexity)]
    async fn blocks(
        &self,
        id: &str,
    ) -> Result<(BTreeMap<Ipv4Net, (String, i64)>, BTreeMap<Ipv4Net, String>)> {
        let read = |kind: &'static str| {
            let mut kv = self.client.kv_client();
            let prefix = self.key(kind, &format!("{id}/"));
            async move {
                let resp = kv
                    .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
                    .await?;
                let mut out = BTreeMap::new();
                for kv in resp.kvs() {
                    if let Some(b) = kv
                        .key_str()
                        .ok()
                        .and_then(|k| k.strip_prefix(&prefix))
                        .and_then(parse_subnet_key)
                    {
                        out.insert(
                            b,
                            (kv.value_str().unwrap_or_default().to_owned(), kv.lease()),
                        );
                    }
                }
                Ok::<_, Error>(out)
            }
        };
        let held = read("netblocks").await?;
        let reserved = read("netreserve")
            .await?
            .into_iter()
            .map(|(b, (h, _))| (b, h))
            .collect();
        Ok((held, reserved))
    }

    /// Give `host` (holding etcd lease `lease`) an address of network
    /// `record`: `want` if asked and free, else the lowest free one of the
    /// host's blocks (leasing a new block when they are full). The address
    /// key is bound to the lease. The inner error is the caller's.
    pub async fn request_address(
        &self,
        record: &NetworkRecord,
        host: &str,
        lease: i64,
        want: Option<Ipv4Addr>,
    ) -> Result<std::result::Result<Ipv4Addr, IpamError>> {
        self.request_address_avoiding(record, host, lease, want, &BTreeSet::new())
            .await
    }

    /// [`Store::request_address`], never one of `avoid`: addresses this
    /// host knows are in use (handed out and not given back, or on its
    /// containers) though etcd may not hold them for a moment (the host's
    /// lease ran out and they are not written again yet). `want` among
    /// them is refused as in use.
    pub async fn request_address_avoiding(
        &self,
        record: &NetworkRecord,
        host: &str,
        lease: i64,
        want: Option<Ipv4Addr>,
        avoid: &BTreeSet<Ipv4Addr>,
    ) -> Result<std::result::Result<Ipv4Addr, IpamError>> {
        self.allocate(record, host, lease, want, false, avoid).await
    }

    async fn allocate(
        &self,
        record: &NetworkRecord,
        host: &str,
        lease: i64,
        want: Option<Ipv4Addr>,
        for_host: bool,
        avoid: &BTreeSet<Ipv4Addr>,
    ) -> Result<std::result::Result<Ipv4Addr, IpamError>> {
        self.sign_in().await?;
        let id = record.id();
        let subnet = record.subnet;
        let label = record.name.clone().unwrap_or_else(|| subnet.to_string());
        let holder = serde_json::to_string(&AddressHolder {
            host: host.to_owned(),
            for_host,
        })
        .unwrap_or_default();
        let mut kv = self.client.kv_client();
        let on_lease = Some(PutOptions::new().with_lease(lease));
        // Nothing is written under a network whose record went (removed
        // from another host meanwhile): its keys would outlive it.
        let exists = Compare::version(self.key("networks", &id), CompareOp::Greater, 0);
        for _ in 0..ATTEMPTS {
            let addr = match want {
                Some(a) => {
                    if let Err(e) = ipam::check_address(&subnet, a) {
                        return Ok(Err(e));
                    }
                    if avoid.contains(&a) {
                        return Ok(Err(IpamError::InUse {
                            addr: a,
                            network: label,
                            host: host.to_owned(),
                            for_host: false,
                        }));
                    }
                    a
                }
                None => {
                    let (held, reserved) = self.blocks(&id).await?;
                    let mine: Vec<Ipv4Net> = held
                        .iter()
                        .filter(|(_, (owner, l))| owner == host && *l == lease)
                        .map(|(b, _)| *b)
                        .collect();
                    let mut used: BTreeSet<Ipv4Addr> =
                        self.network_addresses(&id).await?.into_keys().collect();
                    used.extend(avoid);
                    match ipam::pick_address(&subnet, &mine, &used) {
                        Some(a) => a,
                        None => {
                            let taken: BTreeSet<Ipv4Net> = held.keys().copied().collect();
                            let Some(block) = pick_subnet(
                                subnet,
                                ipam::block_len(&subnet),
                                host,
                                &taken,
                                &reserved,
                            ) else {
                                return Ok(Err(IpamError::Exhausted(label)));
                            };
                            let bk = self.key("netblocks", &format!("{id}/{}", subnet_key(&block)));
                            let txn = Txn::new()
                                .when(vec![
                                    Compare::create_revision(bk.clone(), CompareOp::Equal, 0),
                                    exists.clone(),
                                ])
                                .and_then(vec![
                                    TxnOp::put(bk, host, on_lease.clone()),
                                    TxnOp::put(
                                        self.key(
                                            "netreserve",
                                            &format!("{id}/{}", subnet_key(&block)),
                                        ),
                                        host,
                                        None,
                                    ),
                                ]);
                            if kv
                                .txn(txn)
                                .await
                                .map_err(|e| lease_gone(lease, e))?
                                .succeeded()
                            {
                                tracing::info!(network = %label, block = %block, "address block leased");
                            } else if !self.network_exists(&id).await? {
                                return Ok(Err(IpamError::Gone(label)));
                            }
                            continue;
                        }
                    }
                }
            };
            let ak = self.key("netaddrs", &format!("{id}/{addr}"));
            let txn = Txn::new()
                .when(vec![
                    Compare::create_revision(ak.clone(), CompareOp::Equal, 0),
                    exists.clone(),
                ])
                .and_then(vec![TxnOp::put(
                    ak.clone(),
                    holder.clone(),
                    on_lease.clone(),
                )]);
            if kv
                .txn(txn)
                .await
                .map_err(|e| lease_gone(lease, e))?
                .succeeded()
            {
                return Ok(Ok(addr));
            }
            if !self.network_exists(&id).await? {
                return Ok(Err(IpamError::Gone(label)));
            }
            if want.is_some() {
                let resp = kv.get(ak, None).await?;
                let by = resp
                    .kvs()
                    .first()
                    .and_then(|k| serde_json::from_slice::<AddressHolder>(k.value()).ok())
                    .unwrap_or(AddressHolder {
                        host: "?".into(),
                        for_host: false,
                    });
                return Ok(Err(IpamError::InUse {
                    addr,
                    network: label,
                    host: by.host,
                    for_host: by.for_host,
                }));
            }
        }
        Err(Error::Store(format!(
            "could not allocate an address in {label}: too much contention"
        )))
    }

    /// Give back an address `host` holds (not another host's), a
    /// container's or (`for_host`) its own.
    pub async fn release_address(
        &self,
        id: &str,
        host: &str,
        addr: Ipv4Addr,
        for_host: bool,
    ) -> Result<()> {
        self.sign_in().await?;
        let ak = self.key("netaddrs", &format!("{id}/{addr}"));
        let holder = serde_json::to_string(&AddressHolder {
            host: host.to_owned(),
            for_host,
        })
        .unwrap_or_default();
        let txn = Txn::new()
            .when(vec![Compare::value(ak.clone(), CompareOp::Equal, holder)])
            .and_then(vec![TxnOp::delete(ak, None)]);
        self.client.kv_client().txn(txn).await?;
        Ok(())
    }

    /// Follow the network records from `revision` on; each message is a
    /// change (list again to see it).
    pub async fn watch_networks(&self, revision: i64) -> Result<etcd_client::WatchStream> {
        self.sign_in().await?;
        let mut w = self.client.watch_client();
        Ok(w.watch(
            self.key("networks", ""),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision),
            ),
        )
        .await?)
    }

    /// Every network's blocks and addresses with their holders, by
    /// network id (what the data plane routes), read at one revision,
    /// which is returned too.
    pub async fn network_holders(&self) -> Result<(BTreeMap<String, Holders>, i64)> {
        self.sign_in().await?;
        let mut kv = self.client.kv_client();
        let bp = self.key("netblocks", "");
        let blocks = kv
            .get(bp.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        let rev = blocks.header().map(|h| h.revision()).unwrap_or(0);
        let ap = self.key("netaddrs", "");
        let addrs = kv
            .get(
                ap.clone(),
                Some(GetOptions::new().with_prefix().with_revision(rev)),
            )
            .await?;
        let mut out: BTreeMap<String, Holders> = BTreeMap::new();
        for kv in blocks.kvs() {
            let Some((id, block)) = kv
                .key_str()
                .ok()
                .and_then(|k| k.strip_prefix(&bp))
                .and_then(|k| k.split_once('/'))
            else {
                continue;
            };
            if let Some(b) = parse_subnet_key(block) {
                out.entry(id.to_owned())
                    .or_default()
                    .0
                    .insert(b, kv.value_str().unwrap_or_default().to_owned());
            }
        }
        for kv in addrs.kvs() {
            let Some((id, ip)) = kv
                .key_str()
                .ok()
                .and_then(|k| k.strip_prefix(&ap))
                .and_then(|k| k.split_once('/'))
            else {
                continue;
            };
            let (Ok(ip), Ok(h)) = (
                ip.parse::<Ipv4Addr>(),
                serde_json::from_slice::<AddressHolder>(kv.value()),
            ) else {
                continue;
            };
            out.entry(id.to_owned()).or_default().1.insert(ip, h.host);
        }
        Ok((out, rev))
    }

    /// Follow the networks' blocks and addresses from `revision` on; each
    /// message is a change.
    pub async fn watch_network_holders(&self, revision: i64) -> Result<etcd_client::WatchStream> {
        self.sign_in().await?;
        let mut w = self.client.watch_client();
        // `netblocks/` and `netaddrs/` share this prefix (with
        // `netnames/` and `netreserve/`, rarely written).
        Ok(w.watch(
            format!("{}net", self.prefix),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision),
            ),
        )
        .await?)
    }
}
