//! The data plane of cluster networks between hosts: for every network
//! this Engine has, its VXLAN device and the entries and routes to the
//! other hosts' blocks of it (`portless_netplane::segment::network_plan`),
//! from the blocks and addresses in etcd and the host records.
//!
//! It follows the blocks and addresses with an etcd watch (a new block on
//! another host is routed here within milliseconds), is woken when a
//! network comes or goes on this Engine, and compares the kernel with
//! etcd at least every [`PERIOD`] (an entry deleted by someone comes
//! back), and the networks' iptables rules every [`RULES_PERIOD`] (a
//! chain flushed by hand or by a firewall reload comes back). It waits
//! until [`super::sync`] has taken up this Engine's networks after a
//! start, so that a restart of portless never removes the VXLAN device of
//! a network it has not learnt yet. It also gives this host its own
//! address in each network (on the bridge, the source of its routes to
//! the other hosts' blocks).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use portless_netplane::segment::{self, NetworkSpec, NetworkState};

use super::{Plugin, lock, net_mtu};

/// How often the kernel is compared with etcd when nothing woke us.
pub const PERIOD: Duration = Duration::from_secs(2);

/// Run forever: list, watch, reconcile; list again after any error.
pub async fn run(plugin: Arc<Plugin>) {
    let mut last_refused = String::new();
    loop {
        if let Err(e) = follow(&plugin, &mut last_refused).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "following the blocks of cluster networks; again in 1 s"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// How often the networks' iptables rules are checked (and put back).
pub const RULES_PERIOD: Duration = Duration::from_secs(10);

async fn follow(plugin: &Arc<Plugin>, last_refused: &mut String) -> anyhow::Result<()> {
    let (_, revision) = plugin.store.network_holders().await?;
    let mut watch = plugin.store.watch_network_holders(revision + 1).await?;
    let mut rules_at = tokio::time::Instant::now() + RULES_PERIOD;
    loop {
        let rules = tokio::time::Instant::now() >= rules_at;
        if rules {
            rules_at = tokio::time::Instant::now() + RULES_PERIOD;
        }
        pass(plugin, last_refused, rules).await;
        tokio::select! {
            m = watch.message() => {
                let Some(resp) = m? else { anyhow::bail!("watch ended") };
                if resp.canceled() {
                    anyhow::bail!("watch canceled: {}", resp.cancel_reason());
                }
            }
            _ = plugin.plane_wake.notified() => {}
            _ = tokio::time::sleep(PERIOD) => {}
        }
    }
}

async fn pass(plugin: &Plugin, last_refused: &mut String, rules: bool) {
    match reconcile(plugin, last_refused, rules).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(ops = n, "cluster networks' data plane brought up to date"),
        Err(e) => tracing::warn!(
            error = format!("{e:#}"),
            "bringing the cluster networks' data plane up to date"
        ),
    }
}

/// One comparison of the kernel with etcd (and, with `rules`, of the
/// networks' iptables rules with what they should be); the operations
/// applied.
async fn reconcile(
    plugin: &Plugin,
    last_refused: &mut String,
    rules: bool,
) -> anyhow::Result<usize> {
    if !plugin.taken_up.load(Ordering::Relaxed) {
        return Ok(0);
    }
    let Some(host) = plugin
        .status
        .borrow()
        .host
        .clone()
        .filter(|h| h.lease_id != 0)
    else {
        return Ok(0);
    };
    let here: BTreeMap<String, String> = lock(&plugin.nets)
        .values()
        .map(|n| (n.id.clone(), n.bridge.clone()))
        .collect();
    let listing = plugin.store.list_networks().await?;
    let (holders, _) = plugin.store.network_holders().await?;
    let (hosts, _) = plugin.store.hosts().await?;
    let underlay = plugin.kernel.underlay(Some(host.underlay)).await?;
    let spec = NetworkSpec {
        host_id: host.id.clone(),
        underlay: underlay.addr,
        underlay_index: underlay.ifindex,
        port: plugin.cfg.vxlan_port,
        mac: host.vtep_mac,
        mtu: net_mtu(&host),
    };
    // This host's own address in each network, on its bridge: the source
    // of what the host sends to the other hosts' blocks.
    let mut host_addrs = BTreeMap::new();
    for (id, bridge) in &here {
        let Some((rec, _)) = listing.networks.get(id) else {
            continue;
        };
        // One network's trouble (a bridge gone for a moment, the xtables
        // lock) holds up no other's routes: logged, tried again next pass.
        let held = holders.get(id).map(|(_, addrs)| addrs);
        match host_address(plugin, rec, &host, held).await {
            Ok(Some(a)) => {
                host_addrs.insert(id.clone(), (bridge.clone(), a));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(network = ?rec.name, error = format!("{e:#}"), "taking this host's own address in the network")
            }
        }
        if rules
            && let Err(e) = segment::ensure_network_rules(
                &plugin.kernel,
                bridge,
                rec.vni,
                rec.subnet,
                plugin.cfg.cluster,
            )
            .await
        {
            tracing::warn!(network = ?rec.name, error = %e, "putting back the network's iptables rules");
        }
    }
    // On the bridges, from one read of the kernel. A bridge whose address
    // could not be put in place routes without one (no `src`) this pass.
    let wanted: Vec<(String, std::net::Ipv4Addr)> = host_addrs.values().cloned().collect();
    let (_, err) = segment::ensure_host_addresses(&plugin.kernel, &wanted).await;
    if let Some(e) = err {
        tracing::warn!(error = %e, "putting this host's own addresses on the networks' bridges");
        let obs = plugin.kernel.observe_networks(segment::PREFIX).await?;
        host_addrs.retain(|_, (bridge, a)| {
            obs.addrs
                .iter()
                .any(|x| x.dev == *bridge && x.net == ipnet::Ipv4Net::from(*a))
        });
    }
    let mut refused = Vec::new();
    let plans: Vec<_> = here
        .iter()
        .filter_map(|(id, bridge)| Some((listing.networks.get(id)?, bridge)))
        .map(|((rec, _), bridge)| {
            let (blocks, addrs) = holders.get(&rec.id()).cloned().unwrap_or_default();
            let p = segment::network_plan(
                &spec,
                &NetworkState {
                    vni: rec.vni,
                    subnet: rec.subnet,
                    blocks,
                    addrs,
                    bridge: bridge.clone(),
                    host_addr: host_addrs.get(&rec.id()).map(|(_, a)| *a),
                },
                &hosts,
            );
            for r in &p.refused {
                refused.push(format!(
                    "{} {} of host {}: {}",
                    rec.name.as_deref().unwrap_or("?"),
                    r.subnet,
                    r.id,
                    r.reason
                ));
            }
            p
        })
        .collect();
    let now = refused.join("; ");
    if now != *last_refused {
        if !now.is_empty() {
            tracing::warn!(refused = %now, "blocks of cluster networks not routed");
        }
        *last_refused = now;
    }
    let pruned = segment::prune_rules(&plugin.kernel).await?;
    if pruned > 0 {
        tracing::info!(
            rules = pruned,
            "rules of cluster networks' bridges that are gone removed"
        );
    }
    Ok(segment::reconcile_networks(&plugin.kernel, &plans).await?)
}

/// This host's own address in network `rec` under its current lease:
/// remembered, or asked of etcd (which gives the one held, or a new one).
/// None, logged, when the network has no address left.
async fn host_address(
    plugin: &Plugin,
    rec: &portless_netplane::ipam::NetworkRecord,
    host: &portless_netplane::agent::HostStatus,
    held: Option<&BTreeMap<std::net::Ipv4Addr, String>>,
) -> anyhow::Result<Option<std::net::Ipv4Addr>> {
    let id = rec.id();
    // Remembered, while etcd (`held`: the network's addresses by holder,
    // read this pass) still gives it to this host.
    let cached = lock(&plugin.host_addrs).get(&id).copied();
    if let Some((l, a)) = cached
        && l == host.lease_id
        && held.and_then(|h| h.get(&a)) == Some(&host.id)
    {
        return Ok(Some(a));
    }
    lock(&plugin.host_addrs).remove(&id);
    let _one = plugin.alloc.lock().await;
    let avoid = plugin.in_use_here(&id);
    match plugin
        .store
        .host_address_avoiding(rec, &host.id, host.lease_id, &avoid)
        .await?
    {
        Ok(a) => {
            lock(&plugin.host_addrs).insert(id.clone(), (host.lease_id, a));
            // The network left this host meanwhile (`DeleteNetwork` gives
            // back the address it knew of, not this one): give it back.
            if !lock(&plugin.nets).values().any(|n| n.id == id) {
                lock(&plugin.host_addrs).remove(&id);
                plugin.store.release_address(&id, &host.id, a, true).await?;
                return Ok(None);
            }
            Ok(Some(a))
        }
        // Removed from the cluster a moment ago: sync removes it here.
        Err(e @ portless_netplane::ipam::IpamError::Gone(_)) => {
            tracing::debug!(error = %e, "no own address in a network that went");
            Ok(None)
        }
        Err(e) => {
            tracing::warn!(network = ?rec.name, error = %e, "no address of its own in a cluster network for this host: it cannot reach the network's containers on other hosts");
            Ok(None)
        }
    }
}
