//! A cluster network (`docker network create -d portless`) in one host's
//! kernel: a Linux bridge per network holding the network's gateway, a
//! veth pair per container (one end on the bridge, the other handed to
//! Docker to move into the container), and a VXLAN device per network
//! (`pn-vx<vni>`, the network's VNI) that carries its traffic to the
//! other hosts.
//!
//! Between hosts the network is routed per address block, not one layer-2
//! segment: [`network_plan`] wants, per other host holding blocks of the
//! network, one permanent neighbour entry and one FDB entry on the VXLAN
//! device (no learning, no flooding) and one onlink route per block (and
//! per address given outside its host's blocks, a /32). The bridge
//! answers ARP for addresses routed elsewhere (proxy ARP), so containers
//! see their peers on other hosts as on their own subnet. The plan is the
//! netplane's [`Plan`], diffed with [`plan::diff`] and applied by the same
//! executor as the cluster network's.
//!
//! Every link is named `pn-*`, apart from the netplane's own `pl-*` links
//! (whose reconcile removes any `pl-*` link it did not plan), and their
//! routes carry a protocol number of their own
//! ([`plan::NETWORK_ROUTE_PROTOCOL`]), so that neither side touches the
//! other's. Isolation is the chain [`CHAIN`] (jumped to from
//! `DOCKER-USER`, or `FORWARD` without Docker): traffic within one
//! network (its bridge and its VXLAN device) is accepted, traffic between
//! two `pn-` links otherwise dropped (Docker's FORWARD policy is DROP
//! anyway; the drop holds without it). Bridged frames pass through
//! iptables once Docker loaded br_netfilter.
//!
//! Beyond the cluster a network reaches the world as a Docker bridge does:
//! through its own host, masqueraded to the host's address (the nat chain
//! [`NAT_CHAIN`], jumped to from `POSTROUTING`), with replies let back in
//! and nothing else from outside. Nothing inside a network is
//! masqueraded, and the cluster network and Docker's own bridges stay out
//! of reach ([`tail_rules`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth};

use crate::error::{Error, Result};
use crate::model::{HostRecord, Mac, Transport};
use crate::netlink::{Kernel, errno, nl};
use crate::plan::{self, Fdb, Neigh, Observed, Op, PeerPlan, Plan, Refusal, Route, VxlanLink};

/// Prefix of every link of cluster networks.
pub const PREFIX: &str = plan::NETWORK_LINK_PREFIX;

/// Prefix of the networks' VXLAN devices.
pub const VXLAN_PREFIX: &str = "pn-vx";

/// The filter chain that keeps cluster networks apart and lets their
/// traffic out of the cluster.
pub const CHAIN: &str = "PORTLESS-NETS";

/// The nat chain (jumped to from `POSTROUTING`) that masquerades what
/// leaves a cluster network for the world beyond the cluster.
pub const NAT_CHAIN: &str = "PORTLESS-NETS";

/// The VXLAN device of the network with VNI `vni` (at most 8 digits: a
/// VNI is 24 bits).
pub fn vxlan_name(vni: u32) -> String {
    format!("{VXLAN_PREFIX}{vni}")
}

const EEXIST: i32 = 17;

/// The bridge of the Docker network `docker_id` on this host.
pub fn bridge_name(docker_id: &str) -> String {
    format!("{PREFIX}br{}", short(docker_id, 10))
}

/// The MAC of a network's bridge: fixed, and the same on every host
/// (the network is routed between hosts, so it never meets another
/// host's), from the gateway (unique per network).
pub fn bridge_mac(gateway: Ipv4Addr) -> Mac {
    let o = gateway.octets();
    Mac([0x0e, 0x71, o[0], o[1], o[2], o[3]])
}

/// The host end and the container end of an endpoint's veth pair.
pub fn veth_names(endpoint_id: &str) -> (String, String) {
    let s = short(endpoint_id, 11);
    (format!("{PREFIX}h{s}"), format!("{PREFIX}c{s}"))
}

fn short(id: &str, n: usize) -> String {
    id.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(n)
        .collect()
}

async fn index_of(h: &Handle, name: &str) -> Result<Option<u32>> {
    let mut req = h.link().get().match_name(name.to_owned()).execute();
    match req.try_next().await {
        Ok(m) => Ok(m.map(|m| m.header.index)),
        Err(e) if errno(&e) == Some(19) => Ok(None),
        Err(e) => Err(nl(format!("link get {name}"))(e)),
    }
}

fn exists_ok(op: &str, r: std::result::Result<(), rtnetlink::Error>) -> Result<()> {
    match r {
        Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
        other => other.map_err(nl(op)),
    }
}

fn iptables(table: &str, args: &[&str]) -> Result<bool> {
    let out = std::process::Command::new("iptables")
        .args(["-w", "-t", table])
        .args(args)
        .output()?;
    Ok(out.status.success())
}

fn list_rules(table: &str, chain: &str) -> Vec<String> {
    match std::process::Command::new("iptables")
        .args(["-w", "-t", table, "-S", chain])
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

fn words(args: &[&str]) -> Vec<String> {
    args.iter().map(|w| (*w).to_owned()).collect()
}

/// The rules of [`CHAIN`] that let one network's traffic through: within
/// its bridge, and between its bridge and its VXLAN device. Inserted at
/// the top, ahead of [`tail_rules`].
fn network_rules(bridge: &str, vxlan: &str) -> Vec<Vec<String>> {
    let r = |i: &str, o: &str| words(&["-i", i, "-o", o, "-j", "ACCEPT"]);
    vec![r(bridge, bridge), r(bridge, vxlan), r(vxlan, bridge)]
}

/// The end of [`CHAIN`], the same for every network, in the order
/// `iptables -S` prints rules (so that they compare as text):
/// - traffic between two `pn-` links (two networks) is dropped;
/// - into a network from anywhere else, only replies (a connection one
///   of its containers opened) pass, as on a Docker bridge, and nothing
///   but the network's own bridge sends into its VXLAN device (else a
///   container of a Docker bridge on this host, or the LAN routed through
///   it, would reach the network's containers on other hosts);
/// - out of a network: never into the cluster network (its links `pl-*`,
///   its range `cluster`, however routed) nor into Docker's bridges
///   (`docker0`, `br-*`); anything else (the outside world, through this
///   host) passes, masqueraded by [`nat_rules`];
/// - nothing else from a `pn-` link (a VXLAN device's traffic bound
///   anywhere but its bridge) passes.
fn tail_rules(cluster: Ipv4Net) -> Vec<Vec<String>> {
    let c = cluster.to_string();
    vec![
        words(&["-i", "pn-+", "-o", "pn-+", "-j", "DROP"]),
        words(&[
            "-o",
            "pn-br+",
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
            "-j",
            "ACCEPT",
        ]),
        words(&["-o", "pn-br+", "-j", "DROP"]),
        // Into a network's VXLAN device only from its own bridge (its
        // rule above): not from a Docker bridge, the cluster network or
        // the LAN routed through this host to the network's other hosts.
        words(&["-o", "pn-vx+", "-j", "DROP"]),
        words(&["-i", "pn-br+", "-o", "pl-+", "-j", "DROP"]),
        words(&["-d", &c, "-i", "pn-br+", "-j", "DROP"]),
        words(&["-i", "pn-br+", "-o", "docker0", "-j", "DROP"]),
        words(&["-i", "pn-br+", "-o", "br-+", "-j", "DROP"]),
        words(&["-i", "pn-br+", "-j", "ACCEPT"]),
        words(&["-i", "pn-+", "-j", "DROP"]),
    ]
}

/// The rule of [`NAT_CHAIN`] for the network of `bridge` on `subnet`:
/// what leaves it through any link but a `pn-` one (its bridge, its VXLAN
/// device: the network itself, which keeps its addresses) takes this
/// host's address. Traffic to this host itself is delivered, not
/// forwarded, and keeps its source; traffic to other networks and to the
/// cluster is dropped by [`CHAIN`] before it gets here. The comment names
/// the bridge, so that the rule goes with it.
fn nat_rules(bridge: &str, subnet: Ipv4Net) -> Vec<Vec<String>> {
    vec![words(&[
        "-s",
        &subnet.trunc().to_string(),
        "!",
        "-o",
        "pn-+",
        "-m",
        "comment",
        "--comment",
        bridge,
        "-j",
        "MASQUERADE",
    ])]
}

/// Whether a listed rule (`-A CHAIN ...`) names one link of a network (a
/// bridge or VXLAN device, not a `pn-+` wildcard): a network's rule, not
/// one of [`tail_rules`].
fn names_a_link(rule: &str) -> bool {
    rule.split_whitespace()
        .any(|w| w.starts_with(PREFIX) && !w.ends_with('+'))
}

/// Whether a listed rule names a bridge not among `links`.
fn names_a_gone_bridge(rule: &str, links: &[String]) -> bool {
    rule.split_whitespace()
        .any(|w| w.starts_with("pn-br") && !w.ends_with('+') && !links.iter().any(|l| l == w))
}

/// Delete a listed rule (`-A CHAIN ...`) of `table`.
fn delete_listed(table: &str, rule: &str) -> Result<bool> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    let mut del = vec!["-D"];
    del.extend(&words[1..]);
    iptables(table, &del)
}

fn ensure_chain(table: &str, chain: &str) -> Result<()> {
    if !iptables(table, &["-n", "-L", chain])? && !iptables(table, &["-N", chain])? {
        return Err(Error::Iptables(format!(
            "cannot create chain {table} {chain}"
        )));
    }
    Ok(())
}

/// Add `rule` to `chain` of `table` unless present: at the top, or at
/// the end.
fn ensure_rule(table: &str, chain: &str, rule: &[String], top: bool) -> Result<()> {
    let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
    let mut check = vec!["-C", chain];
    check.extend(&rule);
    if iptables(table, &check)? {
        return Ok(());
    }
    let mut add = if top {
        vec!["-I", chain, "1"]
    } else {
        vec!["-A", chain]
    };
    add.extend(&rule);
    if !iptables(table, &add)? {
        return Err(Error::Iptables(format!(
            "cannot add to {table} {chain}: {}",
            rule.join(" ")
        )));
    }
    Ok(())
}

/// Make [`CHAIN`] (ending in [`tail_rules`]) and [`NAT_CHAIN`] with their
/// jumps, and let the traffic of the network of `bridge` (on `subnet`)
/// and `vxlan` through them.
fn ensure_rules(bridge: &str, vxlan: &str, subnet: Ipv4Net, cluster: Ipv4Net) -> Result<()> {
    ensure_chain("filter", CHAIN)?;
    let tail: Vec<String> = tail_rules(cluster)
        .iter()
        .map(|r| format!("-A {CHAIN} {}", r.join(" ")))
        .collect();
    let rules = list_rules("filter", CHAIN);
    let generic: Vec<&String> = rules.iter().filter(|r| !names_a_link(r)).collect();
    if generic.len() != tail.len() || !rules.ends_with(&tail) {
        // Rewritten whole (an older tail, another cluster range, a rule
        // deleted by hand): the networks' own rules stay on top. The new
        // tail goes in before the old one goes (each deletion takes the
        // first rule of its text: the old one), so that no moment is
        // without the drops.
        tracing::info!(
            chain = CHAIN,
            "rewriting the shared rules of cluster networks"
        );
        for r in tail_rules(cluster) {
            let mut add = vec!["-A", CHAIN];
            add.extend(r.iter().map(String::as_str));
            if !iptables("filter", &add)? {
                return Err(Error::Iptables(format!(
                    "cannot add to {CHAIN}: {}",
                    r.join(" ")
                )));
            }
        }
        for r in generic {
            delete_listed("filter", r)?;
        }
    }
    for rule in network_rules(bridge, vxlan) {
        ensure_rule("filter", CHAIN, &rule, true)?;
    }
    let hook = if iptables("filter", &["-n", "-L", "DOCKER-USER"])? {
        "DOCKER-USER"
    } else {
        "FORWARD"
    };
    ensure_rule("filter", hook, &words(&["-j", CHAIN]), true)?;
    ensure_chain("nat", NAT_CHAIN)?;
    for rule in nat_rules(bridge, subnet) {
        ensure_rule("nat", NAT_CHAIN, &rule, false)?;
    }
    ensure_rule("nat", "POSTROUTING", &words(&["-j", NAT_CHAIN]), true)?;
    Ok(())
}

/// Remove the rules that name link `name` from [`CHAIN`] and
/// [`NAT_CHAIN`].
fn remove_rules_of(name: &str) {
    for (table, chain) in [("filter", CHAIN), ("nat", NAT_CHAIN)] {
        for rule in list_rules(table, chain) {
            if rule.split_whitespace().any(|w| w == name) {
                let _ = delete_listed(table, &rule);
            }
        }
    }
}

/// Remove the rules of [`CHAIN`] and [`NAT_CHAIN`] that name a bridge
/// that no longer exists (a removal that raced with a re-creation, or a
/// bridge deleted by hand); the number removed.
pub async fn prune_rules(kernel: &Kernel) -> Result<usize> {
    let obs = kernel.observe_networks(PREFIX).await?;
    let links: Vec<String> = obs.links.into_iter().map(|l| l.name).collect();
    kernel
        .blocking(move || {
            let mut n = 0;
            for (table, chain) in [("filter", CHAIN), ("nat", NAT_CHAIN)] {
                for rule in list_rules(table, chain) {
                    if names_a_gone_bridge(&rule, &links)
                        && delete_listed(table, &rule).unwrap_or(false)
                    {
                        n += 1;
                    }
                }
            }
            n
        })
        .await
}

/// Remove [`CHAIN`], [`NAT_CHAIN`] and their jumps, and nothing else
/// (`portless netplane cleanup`).
fn remove_chain() -> Result<()> {
    for (table, hooks, chain) in [
        ("filter", &["DOCKER-USER", "FORWARD"][..], CHAIN),
        ("nat", &["POSTROUTING"][..], NAT_CHAIN),
    ] {
        for hook in hooks {
            while iptables(table, &["-D", hook, "-j", chain])? {}
        }
        if iptables(table, &["-n", "-L", chain])?
            && !(iptables(table, &["-F", chain])? && iptables(table, &["-X", chain])?)
        {
            return Err(Error::Iptables(format!(
                "cannot remove chain {table} {chain}"
            )));
        }
    }
    Ok(())
}

/// Proxy ARP on the bridge `name` (index `idx`): it answers for the
/// network's addresses routed through another link (the VXLAN device),
/// and at once (the default `proxy_delay` holds answers to broadcast
/// requests up to 0.8 s). Over netlink (the device's inet configuration,
/// and its ARP table's parameters), not `/proc/sys`, which is read-only
/// in an unprivileged container (the image, the chart's pod).
async fn proxy_arp(h: &Handle, idx: u32, name: &str) -> Result<()> {
    use futures::StreamExt;
    use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
    use rtnetlink::packet_route::link::{AfSpecInet, AfSpecUnspec, InetDevConf, LinkAttribute};
    use rtnetlink::packet_route::neighbour_table::{
        NeighbourTableAttribute, NeighbourTableMessage, NeighbourTableParameter,
    };
    use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

    let mut conf = InetDevConf::default();
    conf.proxy_arp = 1;
    let mut msg = LinkUnspec::new_with_index(idx).build();
    msg.attributes
        .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![
            AfSpecInet::DevConfRequest(conf),
        ])]));
    h.link()
        .set(msg)
        .execute()
        .await
        .map_err(nl(format!("proxy_arp on {name}")))?;

    let mut table = NeighbourTableMessage::default();
    table.header.family = AddressFamily::Inet;
    table.attributes = vec![
        NeighbourTableAttribute::Name("arp_cache".into()),
        NeighbourTableAttribute::Parms(vec![
            NeighbourTableParameter::Ifindex(idx),
            NeighbourTableParameter::ProxyDelay(0),
        ]),
    ];
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::SetNeighbourTable(table));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut resp = h
        .clone()
        .request(req)
        .map_err(nl(format!("proxy_delay on {name}")))?;
    while let Some(m) = resp.next().await {
        if let NetlinkPayload::Error(e) = m.payload
            && e.code.is_some()
        {
            return Err(nl(format!("proxy_delay on {name}"))(
                rtnetlink::Error::NetlinkError(e),
            ));
        }
    }
    Ok(())
}

/// Make the network's bridge, with the gateway address and MTU, up,
/// answering ARP for the network's addresses on other hosts, and let the
/// network's traffic through (within the bridge, and to and from the
/// network's VXLAN device, of VNI `vni`) and out to the world beyond the
/// cluster (`cluster`: the cluster network's range), masqueraded.
/// Idempotent.
pub async fn ensure_bridge(
    kernel: &Kernel,
    bridge: &str,
    vni: u32,
    gateway: Ipv4Addr,
    prefix_len: u8,
    mtu: u32,
    cluster: Ipv4Net,
) -> Result<()> {
    let subnet = Ipv4Net::new(gateway, prefix_len)
        .map_err(|e| Error::Underlay(format!("{gateway}/{prefix_len}: {e}")))?
        .trunc();
    let name = bridge.to_owned();
    kernel
        .call(move |h| async move {
            exists_ok(
                &format!("bridge add {name}"),
                h.link()
                    .add(LinkBridge::new(&name).mtu(mtu).build())
                    .execute()
                    .await,
            )?;
            let idx = index_of(&h, &name)
                .await?
                .ok_or_else(|| Error::Underlay(format!("bridge {name} vanished")))?;
            exists_ok(
                &format!("addr add {gateway}/{prefix_len} dev {name}"),
                h.address()
                    .add(idx, IpAddr::V4(gateway), prefix_len)
                    .execute()
                    .await,
            )?;
            // A fixed MAC: a bridge without one takes its lowest port's,
            // and changes it when a container comes or goes, leaving the
            // containers' cached gateway and proxy-ARP answers pointing
            // at a MAC the bridge no longer takes as its own.
            h.link()
                .set(
                    LinkUnspec::new_with_index(idx)
                        .address(bridge_mac(gateway).0.to_vec())
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(nl(format!("link set {name} up")))?;
            proxy_arp(&h, idx, &name).await
        })
        .await??;
    ensure_network_rules(kernel, bridge, vni, subnet, cluster).await
}

/// Put back whatever is missing of the isolation and NAT rules of the
/// network of `bridge` (VNI `vni`, on `subnet`, in a cluster of range
/// `cluster`): the chains, their jumps, the shared tail and the network's
/// own rules. Idempotent; run on every bridge made and now and then
/// (a chain flushed by hand, a firewall reloaded).
pub async fn ensure_network_rules(
    kernel: &Kernel,
    bridge: &str,
    vni: u32,
    subnet: Ipv4Net,
    cluster: Ipv4Net,
) -> Result<()> {
    let b = bridge.to_owned();
    kernel
        .blocking(move || ensure_rules(&b, &vxlan_name(vni), subnet, cluster))
        .await?
}

/// The changes that give each bridge of `wanted` this host's own address
/// in its network (`addr`/32, beside the gateway), the source of what the
/// host itself sends to the network's other hosts, and take away any
/// other /32 it holds (an address of an earlier lease). Pure.
pub fn host_address_ops(obs: &Observed, wanted: &[(String, Ipv4Addr)]) -> Vec<Op> {
    let mut ops = Vec::new();
    for (bridge, addr) in wanted {
        let want = Ipv4Net::from(*addr);
        ops.extend(
            obs.addrs
                .iter()
                .filter(|a| a.dev == *bridge && a.net.prefix_len() == 32 && a.net != want)
                .map(|a| Op::DelAddr(a.clone())),
        );
        if !obs.addrs.iter().any(|a| a.dev == *bridge && a.net == want) {
            ops.push(Op::AddAddr(plan::Addr {
                dev: bridge.clone(),
                net: want,
            }));
        }
    }
    ops
}

/// Bring the bridges' own addresses to `wanted` ([`host_address_ops`],
/// from one read of the kernel); every change is tried, the first error
/// returned with the number of changes made.
pub async fn ensure_host_addresses(
    kernel: &Kernel,
    wanted: &[(String, Ipv4Addr)],
) -> (usize, Option<Error>) {
    let obs = match kernel.observe_networks(PREFIX).await {
        Ok(o) => o,
        Err(e) => return (0, Some(e)),
    };
    let ops = host_address_ops(&obs, wanted);
    if ops.is_empty() {
        return (0, None);
    }
    let (mut n, mut first) = (0, None);
    match kernel.apply(ops).await {
        Ok(applied) => {
            for a in applied {
                match a.result {
                    Ok(()) => n += 1,
                    Err(e) => {
                        first.get_or_insert(e);
                    }
                }
            }
        }
        Err(e) => first = Some(e),
    }
    (n, first)
}

/// Remove a link (a veth pair, by either end) if it exists.
pub async fn remove_link(kernel: &Kernel, name: &str) -> Result<()> {
    let n = name.to_owned();
    kernel
        .call(move |h| async move {
            let Some(idx) = index_of(&h, &n).await? else {
                return Ok(());
            };
            match h.link().del(idx).execute().await {
                Err(e) if errno(&e) == Some(19) => Ok(()),
                other => other.map_err(nl(format!("link del {n}"))),
            }
        })
        .await?
}

/// Remove a network's bridge if it exists, and its rule.
pub async fn remove_bridge(kernel: &Kernel, bridge: &str) -> Result<()> {
    remove_link(kernel, bridge).await?;
    let n = bridge.to_owned();
    kernel.blocking(move || remove_rules_of(&n)).await
}

/// Make the veth pair of an endpoint, the host end on `bridge` and up;
/// the container end is left for Docker to move.
pub async fn add_veth(
    kernel: &Kernel,
    bridge: &str,
    host_end: &str,
    container_end: &str,
    mtu: u32,
) -> Result<()> {
    let (bridge, host_end, container_end) = (
        bridge.to_owned(),
        host_end.to_owned(),
        container_end.to_owned(),
    );
    kernel
        .call(move |h| async move {
            exists_ok(
                &format!("veth add {host_end}"),
                h.link()
                    .add(LinkVeth::new(&host_end, &container_end).mtu(mtu).build())
                    .execute()
                    .await,
            )?;
            let br = index_of(&h, &bridge)
                .await?
                .ok_or_else(|| Error::Underlay(format!("no bridge {bridge}")))?;
            let idx = index_of(&h, &host_end)
                .await?
                .ok_or_else(|| Error::Underlay(format!("veth {host_end} vanished")))?;
            h.link()
                .set(LinkUnspec::new_with_index(idx).controller(br).up().build())
                .execute()
                .await
                .map_err(nl(format!("link set {host_end} master {bridge} up")))?;
            if let Some(c) = index_of(&h, &container_end).await? {
                h.link()
                    .set(LinkUnspec::new_with_index(c).mtu(mtu).build())
                    .execute()
                    .await
                    .map_err(nl(format!("link set {container_end} mtu")))?;
            }
            Ok(())
        })
        .await?
}

/// This host's side of every network's VXLAN device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    pub host_id: String,
    /// This host's underlay address and interface.
    pub underlay: Ipv4Addr,
    pub underlay_index: u32,
    /// The VXLAN UDP port (every host's, as for the cluster network).
    pub port: u16,
    /// This host's VTEP MAC (the one its host record publishes).
    pub mac: Mac,
    /// The MTU of the networks' links: the underlay's less VXLAN's 50 bytes.
    pub mtu: u32,
}

/// One cluster network as the other hosts hold it in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkState {
    pub vni: u32,
    pub subnet: Ipv4Net,
    /// Its address blocks, by holder.
    pub blocks: BTreeMap<Ipv4Net, String>,
    /// Its addresses, by holder.
    pub addrs: BTreeMap<Ipv4Addr, String>,
    /// Its bridge on this host.
    pub bridge: String,
    /// This host's own address in the network (on its bridge): the source
    /// of the routes to the other hosts' blocks, so that what the host
    /// itself sends there (its router) comes back to it.
    pub host_addr: Option<Ipv4Addr>,
}

/// The kernel state of one network on this host: its VXLAN device and,
/// per other live host holding blocks of it, one neighbour entry and one
/// FDB entry (the host's VTEP MAC at its underlay address, which is also
/// the routes' next hop) and one onlink route per block; an address a
/// host holds outside its own blocks (`--ip`) gets a /32 route. Blocks
/// outside the subnet or overlapping this host's own, and hosts on
/// another VXLAN port, are refused.
pub fn network_plan(
    local: &NetworkSpec,
    net: &NetworkState,
    hosts: &BTreeMap<String, HostRecord>,
) -> Plan {
    let dev = vxlan_name(net.vni);
    let mut out = Plan {
        vxlan: Some(VxlanLink {
            name: dev.clone(),
            vni: net.vni,
            port: local.port,
            local: local.underlay,
            underlay_index: local.underlay_index,
            mac: local.mac,
            mtu: local.mtu,
        }),
        ..Plan::default()
    };
    let mine: Vec<Ipv4Net> = net
        .blocks
        .iter()
        .filter(|(_, h)| **h == local.host_id)
        .map(|(b, _)| *b)
        .collect();
    let to = |dst: Ipv4Net, peer: &HostRecord| PeerPlan {
        id: peer.id.clone(),
        subnet: dst,
        underlay: peer.underlay,
        transport: Transport::Vxlan,
        neigh: Some(Neigh {
            dev: dev.clone(),
            ip: peer.underlay,
            mac: peer.vtep_mac,
        }),
        fdb: Some(Fdb {
            dev: dev.clone(),
            mac: peer.vtep_mac,
            dst: peer.underlay,
        }),
        route: Route {
            dst,
            via: peer.underlay,
            dev: dev.clone(),
            onlink: true,
            src: net.host_addr,
        },
    };
    let mut refuse = |id: &str, subnet: Ipv4Net, reason: String| {
        out.refused.push(Refusal {
            id: id.to_owned(),
            subnet,
            reason,
        })
    };
    let mut peers = Vec::new();
    for (block, holder) in &net.blocks {
        if *holder == local.host_id {
            continue;
        }
        // A host with no live record: its blocks go with its lease.
        let Some(peer) = hosts.get(holder) else {
            continue;
        };
        if !net.subnet.contains(block) {
            refuse(holder, *block, format!("block outside {}", net.subnet));
        } else if let Some(m) = mine
            .iter()
            .find(|m| m.contains(block) || block.contains(*m))
        {
            refuse(holder, *block, format!("block overlaps this host's {m}"));
        } else if peer.vxlan_port != local.port {
            refuse(
                holder,
                *block,
                format!(
                    "host {holder} listens for VXLAN on port {}, this host on {}",
                    peer.vxlan_port, local.port
                ),
            );
        } else {
            peers.push(to(*block, peer));
        }
    }
    for (addr, holder) in &net.addrs {
        if *holder == local.host_id {
            // A container here with an address (`--ip`) inside another
            // host's block: a /32 on the bridge keeps it from that
            // block's route.
            let elsewhere = peers.iter().any(|x: &PeerPlan| x.route.dst.contains(addr));
            if elsewhere {
                peers.push(PeerPlan {
                    id: local.host_id.clone(),
                    subnet: Ipv4Net::from(*addr),
                    underlay: local.underlay,
                    transport: Transport::Route,
                    neigh: None,
                    fdb: None,
                    route: Route {
                        dst: Ipv4Net::from(*addr),
                        via: *addr,
                        dev: net.bridge.clone(),
                        onlink: true,
                        src: None,
                    },
                });
            }
            continue;
        }
        if !net.subnet.contains(addr)
            || net
                .blocks
                .iter()
                .any(|(b, h)| h == holder && b.contains(addr))
        {
            continue;
        }
        if let Some(peer) = hosts.get(holder).filter(|p| p.vxlan_port == local.port) {
            peers.push(to(Ipv4Net::from(*addr), peer));
        }
    }
    out.peers = peers;
    out
}

/// `obs` restricted to links `devs` and what hangs off them.
fn observed_on(obs: &Observed, devs: &[&str]) -> Observed {
    let on = |d: &str| devs.contains(&d);
    Observed {
        links: obs.links.iter().filter(|l| on(&l.name)).cloned().collect(),
        addrs: obs.addrs.iter().filter(|a| on(&a.dev)).cloned().collect(),
        neighs: obs.neighs.iter().filter(|n| on(&n.dev)).cloned().collect(),
        fdbs: obs.fdbs.iter().filter(|e| on(&e.dev)).cloned().collect(),
        routes: obs.routes.iter().filter(|r| on(&r.dev)).cloned().collect(),
    }
}

/// The operations that bring the networks' VXLAN devices (observed in
/// `obs`) to `plans`: each device diffed as the cluster network's is
/// ([`plan::diff`], with the /32 routes a plan puts on its bridge), the
/// `pn-vx` devices no plan wants removed (their routes and entries go
/// with them), and routes on bridges that no plan wants.
pub fn network_ops(plans: &[Plan], obs: &Observed) -> Vec<Op> {
    let wanted: Vec<&str> = plans
        .iter()
        .filter_map(|p| p.vxlan.as_ref().map(|v| v.name.as_str()))
        .collect();
    let mut ops: Vec<Op> = obs
        .links
        .iter()
        .filter(|l| l.name.starts_with(VXLAN_PREFIX) && !wanted.contains(&l.name.as_str()))
        .map(|l| Op::DelLink {
            name: l.name.clone(),
        })
        .collect();
    for p in plans {
        if let Some(v) = &p.vxlan {
            let mut devs: Vec<&str> = vec![&v.name];
            devs.extend(p.peers.iter().map(|x| x.route.dev.as_str()));
            ops.extend(plan::diff(p, &observed_on(obs, &devs)));
        }
    }
    for r in &obs.routes {
        let wanted = plans
            .iter()
            .flat_map(|p| &p.peers)
            .any(|x| x.route.dev == r.dev);
        if r.dev.starts_with("pn-br") && !wanted {
            ops.push(Op::DelRoute(r.clone()));
        }
    }
    ops
}

/// Bring the kernel to `plans` (see [`network_ops`]); the number of
/// operations applied. A failed one is logged by the executor, retried on
/// the next pass, and returned.
pub async fn reconcile_networks(kernel: &Kernel, plans: &[Plan]) -> Result<usize> {
    let obs = kernel.observe_networks(VXLAN_PREFIX).await?;
    let ops = network_ops(plans, &obs);
    let n = ops.len();
    if n == 0 {
        return Ok(0);
    }
    let mut first_err = None;
    for a in kernel.apply(ops).await? {
        if let Err(e) = a.result {
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(n),
    }
}

/// Remove every link of the cluster networks (bridges, VXLAN devices,
/// the host ends of veths, taking the other ends along) and [`CHAIN`]
/// with its jumps: nothing else. The number of links removed.
pub async fn cleanup(kernel: &Kernel) -> Result<usize> {
    let obs = kernel.observe_networks(PREFIX).await?;
    // Veths first: a bridge's removal would leave them behind anyway.
    let mut names: Vec<String> = obs.links.iter().map(|l| l.name.clone()).collect();
    names.sort_by_key(|n| n.starts_with("pn-br") || n.starts_with(VXLAN_PREFIX));
    let mut first_err = None;
    let mut n = 0;
    for name in names {
        match remove_link(kernel, &name).await {
            Ok(()) => n += 1,
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    kernel.blocking(remove_chain).await??;
    match first_err {
        Some(e) => Err(e),
        None => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_in_an_interface_name() {
        let b = bridge_name("0123456789abcdef0123");
        assert_eq!(b, "pn-br0123456789");
        assert!(b.len() <= 15);
        let (h, c) = veth_names("fedcba9876543210");
        assert_eq!(
            (h.as_str(), c.as_str()),
            ("pn-hfedcba98765", "pn-cfedcba98765")
        );
        assert!(!b.starts_with(crate::plan::LINK_PREFIX));
        let v = vxlan_name((1 << 24) - 1);
        assert_eq!(v, "pn-vx16777215");
        assert!(v.len() <= 15 && v.starts_with(PREFIX));
        assert_eq!(plan::route_protocol(&v), plan::NETWORK_ROUTE_PROTOCOL);
        assert_eq!(plan::route_protocol("pl-vx0"), plan::ROUTE_PROTOCOL);
        let m = bridge_mac(Ipv4Addr::new(10, 112, 0, 1));
        assert_eq!(m.to_string(), "0e:71:0a:70:00:01");
        assert_ne!(m, Mac::for_vtep(Ipv4Addr::new(10, 112, 0, 1)));
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn host(id: &str, underlay: &str, port: u16) -> HostRecord {
        HostRecord {
            id: id.into(),
            subnet: net("10.244.9.0/24"),
            underlay: ip(underlay),
            vtep_mac: Mac::for_vtep(ip(underlay)),
            mode: crate::model::Mode::Vxlan,
            vxlan_port: port,
            hostname: String::new(),
        }
    }

    fn spec() -> NetworkSpec {
        NetworkSpec {
            host_id: "a".into(),
            underlay: ip("192.168.1.1"),
            underlay_index: 2,
            port: 4789,
            mac: Mac::for_vtep(ip("192.168.1.1")),
            mtu: 1450,
        }
    }

    fn state(blocks: &[(&str, &str)], addrs: &[(&str, &str)]) -> NetworkState {
        NetworkState {
            vni: 4096,
            subnet: net("10.112.0.0/24"),
            blocks: blocks.iter().map(|(b, h)| (net(b), (*h).into())).collect(),
            addrs: addrs.iter().map(|(a, h)| (ip(a), (*h).into())).collect(),
            bridge: "pn-br0123456789".into(),
            host_addr: Some(ip("10.112.0.3")),
        }
    }

    #[test]
    fn each_other_hosts_block_is_routed_through_the_networks_vxlan_device() {
        let hosts: BTreeMap<String, HostRecord> = [
            host("a", "192.168.1.1", 4789),
            host("b", "192.168.1.2", 4789),
            host("c", "10.9.9.9", 4789),
            host("d", "192.168.1.4", 8472),
        ]
        .into_iter()
        .map(|h| (h.id.clone(), h))
        .collect();
        let st = state(
            &[
                ("10.112.0.0/28", "a"),
                ("10.112.0.16/28", "b"),
                ("10.112.0.32/28", "b"),
                ("10.112.0.48/28", "c"),
                // a host on another VXLAN port, a dead host, a block
                // outside the subnet and one over this host's own
                ("10.112.0.64/28", "d"),
                ("10.112.0.80/28", "gone"),
                ("10.99.0.0/28", "b"),
                ("10.112.0.0/27", "c"),
            ],
            &[
                ("10.112.0.2", "a"),
                ("10.112.0.17", "b"),
                // given with --ip outside b's blocks: a /32
                ("10.112.0.200", "b"),
                // this host's own outside its blocks: nothing here, ...
                ("10.112.0.201", "a"),
                // ... unless inside another host's block: a /32 on the
                // bridge
                ("10.112.0.20", "a"),
            ],
        );
        let p = network_plan(&spec(), &st, &hosts);
        let v = p.vxlan.as_ref().unwrap();
        assert_eq!(
            (v.name.as_str(), v.vni, v.port, v.mtu, v.mac),
            ("pn-vx4096", 4096, 4789, 1450, spec().mac)
        );
        assert!(p.bridge.is_none() && p.addrs.is_empty());
        let routes: Vec<(String, Ipv4Addr)> = p
            .peers
            .iter()
            .map(|x| (x.route.dst.to_string(), x.route.via))
            .collect();
        assert_eq!(
            routes,
            vec![
                ("10.112.0.16/28".to_owned(), ip("192.168.1.2")),
                ("10.112.0.32/28".to_owned(), ip("192.168.1.2")),
                ("10.112.0.48/28".to_owned(), ip("10.9.9.9")),
                ("10.112.0.20/32".to_owned(), ip("10.112.0.20")),
                ("10.112.0.200/32".to_owned(), ip("192.168.1.2")),
            ]
        );
        let local = &p.peers[3];
        assert_eq!(
            (local.route.dev.as_str(), local.route.onlink, &local.neigh),
            ("pn-br0123456789", true, &None)
        );
        for x in p.peers.iter().filter(|x| x.transport == Transport::Vxlan) {
            let peer = &hosts[&x.id];
            // What the host sends leaves from its own address in the network.
            assert!(x.route.onlink && x.route.dev == "pn-vx4096");
            assert_eq!(x.route.src, Some(ip("10.112.0.3")));
            assert_eq!(
                x.neigh,
                Some(Neigh {
                    dev: "pn-vx4096".into(),
                    ip: peer.underlay,
                    mac: peer.vtep_mac
                })
            );
            assert_eq!(
                x.fdb,
                Some(Fdb {
                    dev: "pn-vx4096".into(),
                    mac: peer.vtep_mac,
                    dst: peer.underlay
                })
            );
        }
        let refused: Vec<(String, String)> = p
            .refused
            .iter()
            .map(|r| (r.id.clone(), r.subnet.to_string()))
            .collect();
        assert_eq!(
            refused,
            vec![
                ("b".to_owned(), "10.99.0.0/28".to_owned()),
                ("c".to_owned(), "10.112.0.0/27".to_owned()),
                ("d".to_owned(), "10.112.0.64/28".to_owned()),
            ]
        );
    }

    fn observed(vx: &[&str], plans: &[Plan]) -> Observed {
        let mut o = Observed::default();
        for (i, name) in vx.iter().enumerate() {
            let want = plans
                .iter()
                .filter_map(|p| p.vxlan.as_ref())
                .find(|v| v.name == *name);
            o.links.push(plan::LinkState {
                name: (*name).into(),
                index: 10 + i as u32,
                kind: plan::LinkKind::Vxlan {
                    vni: want.map_or(1, |v| v.vni),
                    port: 4789,
                    local: Some(spec().underlay),
                    underlay_index: Some(2),
                    learning: false,
                },
                mtu: 1450,
                up: true,
                mac: Some(spec().mac),
            });
        }
        for p in plans {
            for x in &p.peers {
                o.neighs.extend(x.neigh.clone());
                o.fdbs.extend(x.fdb.clone());
                o.routes.push(x.route.clone());
            }
        }
        o
    }

    #[test]
    fn a_network_in_place_needs_nothing_and_a_gone_one_loses_its_device() {
        let hosts: BTreeMap<String, HostRecord> = [host("b", "192.168.1.2", 4789)]
            .into_iter()
            .map(|h| (h.id.clone(), h))
            .collect();
        let p = network_plan(&spec(), &state(&[("10.112.0.16/28", "b")], &[]), &hosts);
        let plans = vec![p];
        // Made from nothing: the device, up, then its entries and route.
        let ops = network_ops(&plans, &Observed::default());
        let shown: Vec<String> = ops.iter().map(|o| o.to_string()).collect();
        assert_eq!(
            shown,
            vec![
                "link add pn-vx4096 type vxlan id 4096 dstport 4789 local 192.168.1.1 mtu 1450",
                "link set pn-vx4096 mtu 1450 up",
                "neigh replace 192.168.1.2 lladdr 0e:70:c0:a8:01:02 dev pn-vx4096",
                "fdb add 0e:70:c0:a8:01:02 dst 192.168.1.2 dev pn-vx4096",
                "route add 10.112.0.16/28 via 192.168.1.2 dev pn-vx4096 onlink src 10.112.0.3",
            ]
        );
        // In place: nothing; the cluster network's links and another
        // network's device that is no longer wanted: only the latter goes.
        let mut obs = observed(&["pn-vx4096", "pn-vx4097"], &plans);
        obs.links.push(plan::LinkState {
            name: "pn-br0123456789".into(),
            index: 30,
            kind: plan::LinkKind::Bridge,
            mtu: 1450,
            up: true,
            mac: None,
        });
        assert_eq!(
            network_ops(&plans, &obs),
            vec![Op::DelLink {
                name: "pn-vx4097".into()
            }]
        );
        // A deleted route and FDB entry come back, nothing else moves.
        let mut obs = observed(&["pn-vx4096"], &plans);
        obs.routes.clear();
        obs.fdbs.clear();
        let shown: Vec<String> = network_ops(&plans, &obs)
            .iter()
            .map(|o| o.to_string())
            .collect();
        assert_eq!(
            shown,
            vec![
                "fdb add 0e:70:c0:a8:01:02 dst 192.168.1.2 dev pn-vx4096",
                "route add 10.112.0.16/28 via 192.168.1.2 dev pn-vx4096 onlink src 10.112.0.3",
            ]
        );
    }

    #[test]
    fn only_the_networks_own_traffic_is_accepted_within_the_cluster() {
        let r = network_rules("pn-br1", "pn-vx4096");
        let shown: Vec<String> = r.iter().map(|x| x.join(" ")).collect();
        assert_eq!(
            shown,
            [
                "-i pn-br1 -o pn-br1 -j ACCEPT",
                "-i pn-br1 -o pn-vx4096 -j ACCEPT",
                "-i pn-vx4096 -o pn-br1 -j ACCEPT",
            ]
        );
        assert!(r.iter().all(|x| names_a_link(&x.join(" "))));
    }

    #[test]
    fn each_bridge_gets_its_own_address_and_loses_an_earlier_one() {
        let addr = |dev: &str, n: &str| plan::Addr {
            dev: dev.into(),
            net: net(n),
        };
        let obs = Observed {
            addrs: vec![
                // the gateway stays; an earlier own address goes
                addr("pn-br1", "10.112.0.1/24"),
                addr("pn-br1", "10.112.0.250/32"),
                // already in place: nothing
                addr("pn-br2", "10.113.0.1/24"),
                addr("pn-br2", "10.113.0.254/32"),
            ],
            ..Observed::default()
        };
        let ops = host_address_ops(
            &obs,
            &[
                ("pn-br1".into(), ip("10.112.0.254")),
                ("pn-br2".into(), ip("10.113.0.254")),
            ],
        );
        assert_eq!(
            ops,
            vec![
                Op::DelAddr(addr("pn-br1", "10.112.0.250/32")),
                Op::AddAddr(addr("pn-br1", "10.112.0.254/32")),
            ]
        );
    }

    #[test]
    fn the_tail_lets_a_network_out_of_the_cluster_and_nowhere_else() {
        let tail: Vec<String> = tail_rules(net("10.244.0.0/16"))
            .iter()
            .map(|x| x.join(" "))
            .collect();
        assert_eq!(
            tail,
            [
                // two networks
                "-i pn-+ -o pn-+ -j DROP",
                // into a network: replies only
                "-o pn-br+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-o pn-br+ -j DROP",
                // into a network's VXLAN device: only from its bridge
                "-o pn-vx+ -j DROP",
                // out: never into the cluster network (links or range,
                // routed over the underlay in route mode) nor Docker's
                // bridges ...
                "-i pn-br+ -o pl-+ -j DROP",
                "-d 10.244.0.0/16 -i pn-br+ -j DROP",
                "-i pn-br+ -o docker0 -j DROP",
                "-i pn-br+ -o br-+ -j DROP",
                // ... the rest of the world: yes
                "-i pn-br+ -j ACCEPT",
                // a VXLAN device's traffic bound elsewhere
                "-i pn-+ -j DROP",
            ]
        );
        // The only ACCEPT of traffic out of a network comes after every
        // drop of what it must not reach, and no rule of the tail ACCEPTs
        // into a link of Docker's or the cluster network's.
        let accept_out = tail.iter().position(|r| r == "-i pn-br+ -j ACCEPT");
        assert_eq!(accept_out, Some(tail.len() - 2));
        for r in &tail {
            if r.ends_with("ACCEPT") {
                assert!(!r.contains("docker0") && !r.contains("br-+") && !r.contains("pl-"));
            }
        }
        // Tail rules name no network's link: they are never pruned.
        assert!(tail.iter().all(|r| !names_a_link(r)));
        assert!(tail.iter().all(|r| !names_a_gone_bridge(r, &[])));
    }

    #[test]
    fn what_leaves_a_network_for_the_world_is_masqueraded_and_nothing_inside() {
        let r = nat_rules("pn-br0123456789", net("10.112.0.1/24"));
        let shown: Vec<String> = r.iter().map(|x| x.join(" ")).collect();
        assert_eq!(
            shown,
            ["-s 10.112.0.0/24 ! -o pn-+ -m comment --comment pn-br0123456789 -j MASQUERADE"]
        );
        // It names its bridge, so it goes with it.
        let listed = format!("-A {NAT_CHAIN} {}", shown[0]);
        assert!(names_a_link(&listed));
        assert!(names_a_gone_bridge(&listed, &["pn-br1".to_owned()]));
        assert!(!names_a_gone_bridge(
            &listed,
            &["pn-br0123456789".to_owned()]
        ));
    }
}
