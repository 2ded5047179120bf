//! Every host makes the cluster's named networks on its own Engine
//! (`-d portless --ipam-driver portless`, same name and subnet, labelled
//! [`NETWORK_LABEL`]) and removes the ones whose record went. It follows
//! the records with an etcd watch, and compares with the Engine at least
//! every [`PERIOD`] (someone ran `docker network rm`).
//!
//! The same pass keeps this host's side in step after a restart of
//! portless: the plugin learns the Engine's portless networks again (and
//! their bridges are made again if gone), and, whenever this host holds a
//! new etcd lease (its old one expired, taking its address keys with it),
//! the addresses of its running containers are written again under the
//! new lease. A record left without a name by a creation that never
//! finished (portless stopped between Docker's two calls) is removed after
//! a few passes, and an address this host holds that no container of the
//! Engine has had for [`ORPHAN_GRACE`] (Docker's `ReleaseAddress` came
//! while portless was down) is given back, unless this process handed it
//! out less than [`HANDED_GRACE`] ago. The addresses each pass finds on
//! the Engine's containers are kept for the plugin, which never hands
//! them out (nor those it handed out and Docker has not given back),
//! whatever etcd shows a moment after this host's lease ran out.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
use bollard::query_parameters::ListNetworksOptions;
use portless_netplane::ipam::{self, NetworkRecord};
use portless_netplane::store::NetworkListing;

use portless_netplane::segment;

use super::{DRIVER, LocalNet, NETWORK_LABEL, Plugin, REPLICA_OPTION, lock};

/// Passes a nameless record of this host's may go without a Docker
/// network before it is taken for the leftover of a creation that failed.
const PENDING_PASSES: u32 = 3;

/// How often the Engine is compared with the records when nothing woke us.
pub const PERIOD: Duration = Duration::from_secs(2);

/// How long an address this host holds in etcd may go without a container
/// of the Engine having it before it is given back: Docker asks for an
/// address just before it attaches the container (milliseconds), and
/// gives it back itself when it stops one; an address held longer without
/// a container is the leftover of a Docker call that never finished (its
/// `ReleaseAddress` came while portless was down, or never came).
pub const ORPHAN_GRACE: Duration = Duration::from_secs(15);

/// How long an address this process handed out is never taken for a
/// leftover, however long the Engine goes without a container having it:
/// on a busy host Docker may take many seconds from `RequestAddress` to
/// the container being attached.
pub const HANDED_GRACE: Duration = Duration::from_secs(120);

/// How long a network this Engine had must stay gone, with no removal of
/// it by Docker under way, before it is made again. Docker hides a network
/// from its listings as soon as `docker network rm` starts, before it calls
/// the plugin, and the record leaves etcd only when the plugin's
/// `DeleteNetwork` is through: a pass in between would make the network
/// again for a moment.
const REMAKE_QUIET: Duration = Duration::from_millis(500);

/// How soon a pass comes again when it put off making a network.
const DEFERRED_PASS: Duration = Duration::from_millis(200);

/// A portless network on this Engine.
#[derive(Debug, Clone)]
struct Have {
    docker_id: String,
    name: String,
    /// Its network id (from its subnet).
    id: Option<String>,
}

/// Run forever: list, watch, reconcile; list again after any error.
pub async fn run(plugin: Arc<Plugin>) {
    let mut state = State::default();
    loop {
        if let Err(e) = follow(&plugin, &mut state).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "following cluster networks; again in 1 s"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// What one pass leaves for the next.
#[derive(Debug, Default)]
struct State {
    /// The lease under which this host's addresses were last written again.
    republished: Option<i64>,
    /// Nameless records of this host's without a Docker network, and for
    /// how many passes.
    pending: HashMap<String, u32>,
    /// Addresses this host holds that no container of the Engine has, by
    /// network id, and since when.
    orphans: HashMap<(String, Ipv4Addr), tokio::time::Instant>,
    /// Cluster network ids this Engine had at the last pass.
    had: BTreeSet<String>,
    /// Networks this Engine had that went, and since when.
    gone: HashMap<String, tokio::time::Instant>,
}

async fn follow(plugin: &Arc<Plugin>, state: &mut State) -> anyhow::Result<()> {
    let listing = plugin.store.list_networks().await?;
    let mut watch = plugin.store.watch_networks(listing.revision + 1).await?;
    let mut deferred = reconcile(plugin, &listing, state).await;
    local_side(plugin, &listing, state).await;
    loop {
        let next = if deferred { DEFERRED_PASS } else { PERIOD };
        tokio::select! {
            m = watch.message() => {
                let Some(resp) = m? else { anyhow::bail!("watch ended") };
                if resp.canceled() {
                    anyhow::bail!("watch canceled: {}", resp.cancel_reason());
                }
            }
            _ = plugin.wake.notified() => {
                // Let Docker finish what woke us (a removal under way).
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ = tokio::time::sleep(next) => {}
        }
        let listing = plugin.store.list_networks().await?;
        deferred = reconcile(plugin, &listing, state).await;
        local_side(plugin, &listing, state).await;
    }
}

async fn local_networks(plugin: &Plugin) -> anyhow::Result<Vec<Have>> {
    let nets = plugin
        .docker
        .list_networks(Some(ListNetworksOptions {
            filters: Some(HashMap::from([(
                "driver".to_owned(),
                vec![DRIVER.to_owned()],
            )])),
        }))
        .await?;
    Ok(nets
        .into_iter()
        .filter(|n| n.driver.as_deref() == Some(DRIVER))
        .filter_map(|n| {
            let subnet = n
                .ipam
                .as_ref()
                .and_then(|i| i.config.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.subnet.as_deref())
                .and_then(|s| s.parse().ok());
            Some(Have {
                docker_id: n.id?,
                name: n.name?,
                id: subnet.map(|s| ipam::network_id(&s)),
            })
        })
        .collect())
}

/// Makes and removes this Engine's copies of the cluster's networks;
/// true if it put off making one (a removal may be under way).
async fn reconcile(plugin: &Arc<Plugin>, listing: &NetworkListing, state: &mut State) -> bool {
    let have = match local_networks(plugin).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "listing this Engine's networks");
            return false;
        }
    };
    let now = tokio::time::Instant::now();
    let here: BTreeSet<String> = have.iter().filter_map(|h| h.id.clone()).collect();
    let mut gone = HashMap::new();
    for id in state.had.iter().chain(state.gone.keys()) {
        if !here.contains(id) {
            gone.insert(id.clone(), state.gone.get(id).copied().unwrap_or(now));
        }
    }
    state.gone = gone;
    state.had = here;
    let mut deferred = false;
    // Gone from the cluster (or another network holds the name now).
    for h in &have {
        let wanted = h.id.as_ref().and_then(|id| listing.networks.get(id));
        let keep = match wanted {
            None => false,
            // Being created; named once Docker has named it.
            Some((r, _)) if r.name.is_none() => true,
            Some((r, _)) => r.name.as_deref() == Some(h.name.as_str()),
        };
        if keep {
            continue;
        }
        if let Some(id) = &h.id {
            lock(&plugin.removing).insert(id.clone());
        }
        match plugin.docker.remove_network(&h.name).await {
            Ok(()) => tracing::info!(network = %h.name, "cluster network removed from this Engine"),
            Err(e) => {
                if let Some(id) = &h.id {
                    lock(&plugin.removing).remove(id);
                }
                tracing::warn!(network = %h.name, error = %e, "cannot remove a network that left the cluster (containers still attached here?)");
            }
        }
    }
    for (id, (rec, _)) in &listing.networks {
        let Some(name) = &rec.name else { continue };
        if have
            .iter()
            .any(|h| h.name == *name && h.id.as_deref() == Some(id))
        {
            continue;
        }
        if have.iter().any(|h| h.name == *name) {
            // Another network of that name here: removed above if it was
            // portless's; a foreign one is left alone.
            tracing::warn!(network = %name, "a network of this name that is not the cluster's exists here");
            continue;
        }
        // A network this Engine just had: Docker may be removing it, and
        // its record may go when the removal is through.
        if plugin.removal_under_way(id, REMAKE_QUIET)
            || state
                .gone
                .get(id)
                .is_some_and(|since| since.elapsed() < REMAKE_QUIET)
        {
            deferred = true;
            continue;
        }
        // The listing may predate a `docker network rm` that removed the
        // record after it was read and the Docker network after that:
        // read the record again now that the Engine was listed.
        match plugin.store.network(id).await {
            Ok(Some((r, _))) if r.name.as_ref() == Some(name) => {}
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(network = %name, error = %e, "reading the network's record");
                continue;
            }
        }
        match create(plugin, rec).await {
            Ok(()) => {
                tracing::info!(network = %name, subnet = %rec.subnet, "cluster network made on this Engine")
            }
            Err(e) => {
                tracing::warn!(network = %name, error = %e, "cannot make the cluster network here")
            }
        }
    }
    // Records that left the cluster need no remembering.
    state.gone.retain(|id, _| listing.networks.contains_key(id));
    deferred
}

async fn create(plugin: &Plugin, rec: &NetworkRecord) -> Result<(), bollard::errors::Error> {
    let id = rec.id();
    let mut ipam_options: HashMap<String, String> = rec
        .options
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    ipam_options.insert(REPLICA_OPTION.to_owned(), id.clone());
    let req = NetworkCreateRequest {
        name: rec.name.clone().unwrap_or_default(),
        driver: Some(DRIVER.into()),
        attachable: Some(true),
        ipam: Some(Ipam {
            driver: Some(DRIVER.into()),
            config: Some(vec![IpamConfig {
                subnet: Some(rec.subnet.to_string()),
                gateway: Some(rec.gateway.to_string()),
                ..Default::default()
            }]),
            options: Some(ipam_options),
        }),
        labels: Some(HashMap::from([(NETWORK_LABEL.to_owned(), id)])),
        ..Default::default()
    };
    plugin.docker.create_network(req).await.map(|_| ())
}

/// This host's side of the networks it has: the plugin's map and the
/// bridges after a restart, its addresses under a new lease, and the
/// leftovers of failed creations.
async fn local_side(plugin: &Arc<Plugin>, listing: &NetworkListing, state: &mut State) {
    let Some(host) = plugin
        .status
        .borrow()
        .host
        .clone()
        .filter(|h| h.lease_id != 0)
    else {
        return;
    };
    let Ok(have) = local_networks(plugin).await else {
        return;
    };
    let republish = state.republished != Some(host.lease_id);
    let mut all_written = true;
    let mut orphans = HashMap::new();
    for h in &have {
        let Some((rec, _)) = h.id.as_ref().and_then(|id| listing.networks.get(id)) else {
            continue;
        };
        let known = lock(&plugin.nets).contains_key(&h.docker_id);
        if !known {
            let bridge = segment::bridge_name(&h.docker_id);
            match segment::ensure_bridge(
                &plugin.kernel,
                &bridge,
                rec.vni,
                rec.gateway,
                rec.subnet.prefix_len(),
                super::net_mtu(&host),
                plugin.cfg.cluster,
            )
            .await
            {
                Ok(()) => {
                    tracing::info!(network = %h.name, bridge = %bridge, "network of this Engine taken up again");
                    lock(&plugin.nets).insert(
                        h.docker_id.clone(),
                        LocalNet {
                            id: rec.id(),
                            bridge,
                            gateway: rec.gateway,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(network = %h.name, error = %e, "cannot make the network's bridge")
                }
            }
        }
        let Some(here) = engine_addresses(plugin, h).await else {
            all_written = false;
            continue;
        };
        lock(&plugin.engine_addrs).insert(rec.id(), here.clone());
        if republish && !rewrite_addresses(plugin, h, rec, &host, &here).await {
            all_written = false;
        }
        release_orphans(plugin, h, rec, &host, &here, &mut orphans, &state.orphans).await;
    }
    state.orphans = orphans;
    if republish && all_written {
        state.republished = Some(host.lease_id);
    }
    if !plugin
        .taken_up
        .swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        plugin.plane_wake.notify_one();
    }
    // Nameless records of ours with no network here: a creation that
    // never finished.
    let mine: BTreeSet<&String> = have.iter().filter_map(|h| h.id.as_ref()).collect();
    let nets: BTreeSet<String> = lock(&plugin.nets).values().map(|n| n.id.clone()).collect();
    let mut pending = HashMap::new();
    for (id, (rec, _)) in &listing.networks {
        if rec.name.is_some() || rec.creator != host.id || mine.contains(id) || nets.contains(id) {
            continue;
        }
        let passes = state.pending.get(id).copied().unwrap_or(0) + 1;
        if passes < PENDING_PASSES {
            pending.insert(id.clone(), passes);
            continue;
        }
        match plugin.store.delete_network(rec).await {
            Ok(()) => {
                tracing::info!(subnet = %rec.subnet, "removed the record of a network whose creation never finished")
            }
            Err(e) => tracing::warn!(error = %e, "removing a stale network record"),
        }
    }
    state.pending = pending;
}

/// The addresses of the containers of network `h` on this Engine; None
/// when the Engine could not say.
async fn engine_addresses(plugin: &Plugin, h: &Have) -> Option<BTreeSet<Ipv4Addr>> {
    let n = plugin
        .docker
        .inspect_network(&h.docker_id, None)
        .await
        .ok()?;
    Some(
        n.containers
            .unwrap_or_default()
            .values()
            .filter_map(|c| c.ipv4_address.as_deref())
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .collect(),
    )
}

/// Give back the addresses this host holds in network `h` that no
/// container of the Engine (`here`) has had for [`ORPHAN_GRACE`]
/// (`before`: since when each was seen unused; `now_unused` gets this
/// pass's).
async fn release_orphans(
    plugin: &Plugin,
    h: &Have,
    rec: &NetworkRecord,
    host: &portless_netplane::agent::HostStatus,
    here: &BTreeSet<Ipv4Addr>,
    now_unused: &mut HashMap<(String, Ipv4Addr), tokio::time::Instant>,
    before: &HashMap<(String, Ipv4Addr), tokio::time::Instant>,
) {
    let id = rec.id();
    let Ok(held) = plugin.store.network_address_holders(&id).await else {
        return;
    };
    let now = tokio::time::Instant::now();
    for (a, (holder, _)) in held {
        if holder.host != host.id || holder.for_host || here.contains(&a) {
            continue;
        }
        // Handed out by this process, and Docker is still attaching the
        // container (slow on a busy host), or will give it back.
        if lock(&plugin.handed)
            .get(&id)
            .and_then(|m| m.get(&a))
            .is_some_and(|t| t.elapsed() < HANDED_GRACE)
        {
            continue;
        }
        let key = (id.clone(), a);
        let since = before.get(&key).copied().unwrap_or(now);
        if now.duration_since(since) < ORPHAN_GRACE {
            now_unused.insert(key, since);
            continue;
        }
        // One allocation at a time: an address handed out this instant
        // is not yet on its container.
        let _one = plugin.alloc.lock().await;
        match engine_addresses(plugin, h).await {
            Some(again) if !again.contains(&a) => {}
            _ => continue,
        }
        match plugin.store.release_address(&id, &host.id, a, false).await {
            Ok(()) => {
                if let Some(m) = lock(&plugin.handed).get_mut(&id) {
                    m.remove(&a);
                }
                tracing::info!(network = %h.name, addr = %a, "address given back: no container here has had it for {} s (a Docker call that never finished)", ORPHAN_GRACE.as_secs())
            }
            Err(e) => {
                tracing::warn!(network = %h.name, addr = %a, error = %e, "giving back an unused address")
            }
        }
    }
}

/// Write the addresses of this host's containers on network `h` (`here`)
/// that etcd does not hold (its keys went with an expired lease) under the
/// current lease; false when not all could be.
async fn rewrite_addresses(
    plugin: &Plugin,
    h: &Have,
    rec: &NetworkRecord,
    host: &portless_netplane::agent::HostStatus,
    here: &BTreeSet<Ipv4Addr>,
) -> bool {
    if here.is_empty() {
        return true;
    }
    let Ok(held) = plugin.store.network_addresses(&rec.id()).await else {
        return false;
    };
    let mut ok = true;
    for &a in here {
        match held.get(&a) {
            Some(owner) if *owner == host.id => continue,
            Some(owner) => {
                tracing::error!(network = %h.name, addr = %a, host = %owner, "a container here has an address another host holds in etcd");
                continue;
            }
            None => {}
        }
        let _one = plugin.alloc.lock().await;
        match plugin
            .store
            .request_address(rec, &host.id, host.lease_id, Some(a))
            .await
        {
            Ok(Ok(_)) => {
                tracing::info!(network = %h.name, addr = %a, "address written again under this host's new lease")
            }
            Ok(Err(e)) => {
                tracing::error!(network = %h.name, addr = %a, error = %e, "cannot write a container's address again")
            }
            Err(e) => {
                tracing::warn!(network = %h.name, error = %e, "writing addresses again");
                ok = false;
            }
        }
    }
    ok
}
