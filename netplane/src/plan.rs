//! The pure core: desired state in, netlink operations out.
//!
//! [`plan`] turns this host's spec and its peers' records into a [`Plan`]:
//! the devices, addresses, neighbour, FDB and route entries that should
//! exist. [`diff`] compares a plan with the [`Observed`] kernel state and
//! returns the [`Op`]s that close the gap, in an order that is safe to apply
//! one by one. Nothing here touches the kernel, so all of it is unit-tested
//! without root.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::model::{HostRecord, Mac, Mode, Transport};

/// Bytes VXLAN adds to every packet over IPv4: outer IP 20, UDP 8, VXLAN 8,
/// inner Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;

/// Route protocol number stamped on every route portless installs, so that
/// it finds its own routes again and never touches anybody else's. Unused
/// by iproute2's `rt_protos` and by the well-known routing daemons.
pub const ROUTE_PROTOCOL: u8 = 149;

/// Route protocol number of the routes of cluster networks (`docker
/// network create -d portless`): one per other host's address block, on
/// the network's own VXLAN device. A number of their own, so that the
/// cluster network's reconcile (which owns [`ROUTE_PROTOCOL`]) never sees
/// them, and the reverse.
pub const NETWORK_ROUTE_PROTOCOL: u8 = 150;

/// Prefix of every link portless creates for the cluster network.
pub const LINK_PREFIX: &str = "pl-";

/// Prefix of every link of the cluster networks (`segment.rs`): bridges,
/// veths and their VXLAN devices.
pub const NETWORK_LINK_PREFIX: &str = "pn-";

/// The route protocol number a route on `dev` is stamped with: its owner
/// is told by the device.
pub fn route_protocol(dev: &str) -> u8 {
    if dev.starts_with(NETWORK_LINK_PREFIX) {
        NETWORK_ROUTE_PROTOCOL
    } else {
        ROUTE_PROTOCOL
    }
}

/// Default name of the VXLAN device.
pub const VXLAN_DEVICE: &str = "pl-vx0";

/// Default name of the bridge of portless's own (hosts without Docker).
pub const DEFAULT_BRIDGE: &str = "pl-br0";

/// The interface that carries traffic to peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub ifname: String,
    pub ifindex: u32,
    pub addr: Ipv4Addr,
    pub mtu: u32,
    /// Networks directly reachable on this interface (its address prefixes).
    pub connected: Vec<Ipv4Net>,
}

/// Everything about this host that the plan depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSpec {
    /// What this host publishes; its subnet, mode and VTEP MAC.
    pub record: HostRecord,
    pub underlay: Underlay,
    pub vxlan_name: String,
    pub vni: u32,
    /// A bridge portless owns (with `--docker-host none`), holding the
    /// subnet's gateway address.
    pub bridge: Option<String>,
}

impl LocalSpec {
    /// MTU that containers on this host must use: every packet may have to
    /// fit in VXLAN unless the host never uses it.
    pub fn container_mtu(&self) -> u32 {
        match self.record.mode {
            Mode::Route => self.underlay.mtu,
            Mode::Vxlan | Mode::Auto => self.underlay.mtu.saturating_sub(VXLAN_OVERHEAD),
        }
    }

    /// Gateway address of the local subnet: its first host address.
    pub fn gateway(&self) -> Ipv4Net {
        let net = self.record.subnet;
        let first = u32::from(net.network()).saturating_add(1);
        // The prefix length comes from a valid Ipv4Net, so this cannot fail.
        Ipv4Net::new(Ipv4Addr::from(first), net.prefix_len()).unwrap_or(net)
    }
}

/// The VXLAN device as it should be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VxlanLink {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub local: Ipv4Addr,
    pub underlay_index: u32,
    pub mac: Mac,
    pub mtu: u32,
}

/// A bridge portless owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BridgeLink {
    pub name: String,
    pub mtu: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Addr {
    pub dev: String,
    pub net: Ipv4Net,
}

/// A permanent neighbour entry: the peer's subnet address behind its VTEP MAC.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Neigh {
    pub dev: String,
    pub ip: Ipv4Addr,
    pub mac: Mac,
}

/// A VXLAN forwarding entry: frames for `mac` go to underlay address `dst`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Fdb {
    pub dev: String,
    pub mac: Mac,
    pub dst: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Route {
    pub dst: Ipv4Net,
    pub via: Ipv4Addr,
    pub dev: String,
    pub onlink: bool,
    /// Preferred source for traffic the host itself sends (the router in
    /// the host's namespace reaching remote containers). Plain routes use
    /// the local gateway, an address inside the cluster range, so that the
    /// peer's forwarding rules, which accept the cluster range, let it in.
    pub src: Option<Ipv4Addr>,
}

/// What one peer needs in the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerPlan {
    pub id: String,
    pub subnet: Ipv4Net,
    pub underlay: Ipv4Addr,
    pub transport: Transport,
    pub neigh: Option<Neigh>,
    pub fdb: Option<Fdb>,
    pub route: Route,
}

/// A peer that cannot be reached in the configured mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Refusal {
    pub id: String,
    pub subnet: Ipv4Net,
    pub reason: String,
}

/// The desired kernel state of this host.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Plan {
    pub vxlan: Option<VxlanLink>,
    pub bridge: Option<BridgeLink>,
    pub addrs: Vec<Addr>,
    pub peers: Vec<PeerPlan>,
    pub refused: Vec<Refusal>,
}

/// Build the plan for this host and these peers. Records of this host
/// itself, and peers whose subnet overlaps this host's or an earlier peer's,
/// are skipped (the latter refused: two hosts must never claim one subnet).
pub fn plan(local: &LocalSpec, peers: &[HostRecord]) -> Plan {
    let mut out = Plan::default();
    let me = &local.record;
    let mtu = local.container_mtu();
    if me.mode.has_vxlan() {
        out.vxlan = Some(VxlanLink {
            name: local.vxlan_name.clone(),
            vni: local.vni,
            port: me.vxlan_port,
            local: local.underlay.addr,
            underlay_index: local.underlay.ifindex,
            mac: me.vtep_mac,
            mtu,
        });
        // The VTEP holds the subnet's network address, so that packets it
        // sends to peers carry a source inside the cluster range.
        out.addrs.push(Addr {
            dev: local.vxlan_name.clone(),
            net: Ipv4Net::new(me.subnet.network(), 32).unwrap_or(me.subnet),
        });
    }
    if let Some(name) = &local.bridge {
        out.bridge = Some(BridgeLink {
            name: name.clone(),
            mtu,
        });
        out.addrs.push(Addr {
            dev: name.clone(),
            net: local.gateway(),
        });
    }

    let mut sorted: Vec<&HostRecord> = peers.iter().filter(|p| p.id != me.id).collect();
    sorted.sort_by(|a, b| a.subnet.cmp(&b.subnet).then(a.id.cmp(&b.id)));
    let mut claimed: Vec<Ipv4Net> = vec![me.subnet];
    for peer in sorted {
        if let Some(other) = claimed
            .iter()
            .find(|n| n.contains(&peer.subnet) || peer.subnet.contains(*n))
        {
            out.refused.push(Refusal {
                id: peer.id.clone(),
                subnet: peer.subnet,
                reason: format!("subnet overlaps {other}, which is already in use"),
            });
            continue;
        }
        let chosen = transport(local, peer).and_then(|t| {
            if t == Transport::Vxlan && peer.vxlan_port != local.record.vxlan_port {
                Err(format!(
                    "peer {} listens for VXLAN on port {}, this host on {}: \
                     every host needs the same --vxlan-port",
                    peer.id, peer.vxlan_port, local.record.vxlan_port
                ))
            } else {
                Ok(t)
            }
        });
        match chosen {
            Ok(t) => {
                claimed.push(peer.subnet);
                out.peers.push(peer_plan(local, peer, t));
            }
            Err(reason) => out.refused.push(Refusal {
                id: peer.id.clone(),
                subnet: peer.subnet,
                reason,
            }),
        }
    }
    out
}

/// Whether `addr` sits on a segment this host is directly connected to.
pub fn on_segment(underlay: &Underlay, addr: Ipv4Addr) -> bool {
    underlay.connected.iter().any(|n| n.contains(&addr))
}

/// Choose how to reach one peer. A peer in route mode has no VXLAN device,
/// so it can only be reached by a plain route, even from a VXLAN host; the
/// way back is chosen by the peer on its own and need not match.
pub fn transport(local: &LocalSpec, peer: &HostRecord) -> Result<Transport, String> {
    let direct = on_segment(&local.underlay, peer.underlay);
    let not_direct = || {
        format!(
            "peer {} ({}) is not on a directly connected segment of {} ({}); \
             plain routes need one: use --netplane-mode vxlan or auto",
            peer.id,
            peer.underlay,
            local.underlay.ifname,
            join(&local.underlay.connected)
        )
    };
    match (local.record.mode, peer.mode) {
        (_, Mode::Route) | (Mode::Route, _) => {
            if direct {
                Ok(Transport::Route)
            } else if local.record.mode == Mode::Route {
                Err(not_direct())
            } else {
                Err(format!(
                    "peer {} runs in route mode (no VXLAN) and is not on a directly \
                     connected segment",
                    peer.id
                ))
            }
        }
        (Mode::Vxlan, _) => Ok(Transport::Vxlan),
        (Mode::Auto, _) => Ok(if direct {
            Transport::Route
        } else {
            Transport::Vxlan
        }),
    }
}

fn join(nets: &[Ipv4Net]) -> String {
    if nets.is_empty() {
        return "no addresses".to_owned();
    }
    nets.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn peer_plan(local: &LocalSpec, peer: &HostRecord, t: Transport) -> PeerPlan {
    let (neigh, fdb, route) = match t {
        Transport::Vxlan => {
            let dev = local.vxlan_name.clone();
            let vtep_ip = peer.subnet.network();
            (
                Some(Neigh {
                    dev: dev.clone(),
                    ip: vtep_ip,
                    mac: peer.vtep_mac,
                }),
                Some(Fdb {
                    dev: dev.clone(),
                    mac: peer.vtep_mac,
                    dst: peer.underlay,
                }),
                Route {
                    dst: peer.subnet,
                    via: vtep_ip,
                    dev,
                    onlink: true,
                    // The VTEP's own address (the subnet's network address)
                    // is already inside the cluster range.
                    src: None,
                },
            )
        }
        Transport::Route => (
            None,
            None,
            Route {
                dst: peer.subnet,
                via: peer.underlay,
                dev: local.underlay.ifname.clone(),
                onlink: false,
                src: Some(local.gateway().addr()),
            },
        ),
    };
    PeerPlan {
        id: peer.id.clone(),
        subnet: peer.subnet,
        underlay: peer.underlay,
        transport: t,
        neigh,
        fdb,
        route,
    }
}

/// What kind of link an observed link is, with the attributes that matter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Vxlan {
        vni: u32,
        port: u16,
        local: Option<Ipv4Addr>,
        underlay_index: Option<u32>,
        learning: bool,
    },
    Bridge,
    Other(String),
}

/// One link portless may own (its name has [`LINK_PREFIX`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub name: String,
    pub index: u32,
    pub kind: LinkKind,
    pub mtu: u32,
    pub up: bool,
    pub mac: Option<Mac>,
}

/// The kernel state portless owns, as read back: links with its prefix, the
/// addresses, permanent neighbours and FDB entries on them, and every route
/// with its protocol number.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    pub links: Vec<LinkState>,
    pub addrs: Vec<Addr>,
    pub neighs: Vec<Neigh>,
    pub fdbs: Vec<Fdb>,
    pub routes: Vec<Route>,
}

/// One netlink change. Devices are named; the executor resolves indexes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    DelRoute(Route),
    DelNeigh(Neigh),
    DelFdb(Fdb),
    DelAddr(Addr),
    DelLink { name: String },
    AddVxlan(VxlanLink),
    AddBridge(BridgeLink),
    SetLink { name: String, mtu: u32 },
    AddAddr(Addr),
    AddNeigh(Neigh),
    AddFdb(Fdb),
    AddRoute(Route),
}

impl Op {
    /// Position in the apply order: removals first, then links, then the
    /// entries that hang off them, routes last.
    fn rank(&self) -> u8 {
        match self {
            Op::DelRoute(_) => 0,
            Op::DelNeigh(_) => 1,
            Op::DelFdb(_) => 2,
            Op::DelAddr(_) => 3,
            Op::DelLink { .. } => 4,
            Op::AddVxlan(_) => 5,
            Op::AddBridge(_) => 6,
            Op::SetLink { .. } => 7,
            Op::AddAddr(_) => 8,
            Op::AddNeigh(_) => 9,
            Op::AddFdb(_) => 10,
            Op::AddRoute(_) => 11,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::DelRoute(r) => write!(f, "route del {} via {} dev {}", r.dst, r.via, r.dev),
            Op::DelNeigh(n) => write!(f, "neigh del {} dev {}", n.ip, n.dev),
            Op::DelFdb(e) => write!(f, "fdb del {} dst {} dev {}", e.mac, e.dst, e.dev),
            Op::DelAddr(a) => write!(f, "addr del {} dev {}", a.net, a.dev),
            Op::DelLink { name } => write!(f, "link del {name}"),
            Op::AddVxlan(v) => write!(
                f,
                "link add {} type vxlan id {} dstport {} local {} mtu {}",
                v.name, v.vni, v.port, v.local, v.mtu
            ),
            Op::AddBridge(b) => write!(f, "link add {} type bridge mtu {}", b.name, b.mtu),
            Op::SetLink { name, mtu } => write!(f, "link set {name} mtu {mtu} up"),
            Op::AddAddr(a) => write!(f, "addr add {} dev {}", a.net, a.dev),
            Op::AddNeigh(n) => write!(f, "neigh replace {} lladdr {} dev {}", n.ip, n.mac, n.dev),
            Op::AddFdb(e) => write!(f, "fdb add {} dst {} dev {}", e.mac, e.dst, e.dev),
            Op::AddRoute(r) => write!(
                f,
                "route add {} via {} dev {}{}{}",
                r.dst,
                r.via,
                r.dev,
                if r.onlink { " onlink" } else { "" },
                r.src.map(|s| format!(" src {s}")).unwrap_or_default()
            ),
        }
    }
}

fn vxlan_matches(want: &VxlanLink, have: &LinkState) -> bool {
    match &have.kind {
        LinkKind::Vxlan {
            vni,
            port,
            local,
            underlay_index,
            learning,
        } => {
            *vni == want.vni
                && *port == want.port
                && *local == Some(want.local)
                && *underlay_index == Some(want.underlay_index)
                && !*learning
                && have.mac == Some(want.mac)
        }
        _ => false,
    }
}

/// The operations that turn `observed` into `plan`, in apply order.
pub fn diff(plan: &Plan, observed: &Observed) -> Vec<Op> {
    let mut ops = Vec::new();
    // Links that get (re)created start empty: whatever was observed on them
    // is gone once they are deleted.
    let mut fresh: BTreeSet<&str> = BTreeSet::new();
    let mut wanted_links: BTreeMap<&str, u32> = BTreeMap::new();

    if let Some(v) = &plan.vxlan {
        wanted_links.insert(&v.name, v.mtu);
        match observed.links.iter().find(|l| l.name == v.name) {
            Some(have) if vxlan_matches(v, have) => {
                if have.mtu != v.mtu || !have.up {
                    ops.push(Op::SetLink {
                        name: v.name.clone(),
                        mtu: v.mtu,
                    });
                }
            }
            Some(_) => {
                ops.push(Op::DelLink {
                    name: v.name.clone(),
                });
                ops.push(Op::AddVxlan(v.clone()));
                ops.push(Op::SetLink {
                    name: v.name.clone(),
                    mtu: v.mtu,
                });
                fresh.insert(&v.name);
            }
            None => {
                ops.push(Op::AddVxlan(v.clone()));
                ops.push(Op::SetLink {
                    name: v.name.clone(),
                    mtu: v.mtu,
                });
                fresh.insert(&v.name);
            }
        }
    }
    if let Some(b) = &plan.bridge {
        wanted_links.insert(&b.name, b.mtu);
        match observed.links.iter().find(|l| l.name == b.name) {
            Some(have) if have.kind == LinkKind::Bridge => {
                if have.mtu != b.mtu || !have.up {
                    ops.push(Op::SetLink {
                        name: b.name.clone(),
                        mtu: b.mtu,
                    });
                }
            }
            Some(_) => {
                ops.push(Op::DelLink {
                    name: b.name.clone(),
                });
                ops.push(Op::AddBridge(b.clone()));
                ops.push(Op::SetLink {
                    name: b.name.clone(),
                    mtu: b.mtu,
                });
                fresh.insert(&b.name);
            }
            None => {
                ops.push(Op::AddBridge(b.clone()));
                ops.push(Op::SetLink {
                    name: b.name.clone(),
                    mtu: b.mtu,
                });
                fresh.insert(&b.name);
            }
        }
    }
    // Links of ours that the plan no longer wants (mode changed to route,
    // bridge renamed). Only kinds portless creates are removed.
    let mut deleted: BTreeSet<&str> = BTreeSet::new();
    for l in &observed.links {
        if l.name.starts_with(LINK_PREFIX)
            && !wanted_links.contains_key(l.name.as_str())
            && matches!(l.kind, LinkKind::Vxlan { .. } | LinkKind::Bridge)
        {
            ops.push(Op::DelLink {
                name: l.name.clone(),
            });
            deleted.insert(&l.name);
        }
    }
    let gone = |dev: &str| fresh.contains(dev) || deleted.contains(dev);

    let want_addrs: BTreeSet<&Addr> = plan.addrs.iter().collect();
    let have_addrs: BTreeSet<&Addr> = observed.addrs.iter().filter(|a| !gone(&a.dev)).collect();
    for a in have_addrs.difference(&want_addrs) {
        ops.push(Op::DelAddr((*a).clone()));
    }
    for a in want_addrs.difference(&have_addrs) {
        ops.push(Op::AddAddr((*a).clone()));
    }

    let want_neigh: BTreeSet<&Neigh> = plan.peers.iter().filter_map(|p| p.neigh.as_ref()).collect();
    let have_neigh: BTreeSet<&Neigh> = observed.neighs.iter().filter(|n| !gone(&n.dev)).collect();
    for n in have_neigh.difference(&want_neigh) {
        // A changed MAC is fixed by the replace below; only stale IPs go.
        if !want_neigh.iter().any(|w| w.dev == n.dev && w.ip == n.ip) {
            ops.push(Op::DelNeigh((*n).clone()));
        }
    }
    for n in want_neigh.difference(&have_neigh) {
        ops.push(Op::AddNeigh((*n).clone()));
    }

    let want_fdb: BTreeSet<&Fdb> = plan.peers.iter().filter_map(|p| p.fdb.as_ref()).collect();
    let have_fdb: BTreeSet<&Fdb> = observed.fdbs.iter().filter(|e| !gone(&e.dev)).collect();
    for e in have_fdb.difference(&want_fdb) {
        ops.push(Op::DelFdb((*e).clone()));
    }
    for e in want_fdb.difference(&have_fdb) {
        ops.push(Op::AddFdb((*e).clone()));
    }

    let want_routes: BTreeSet<&Route> = plan.peers.iter().map(|p| &p.route).collect();
    let have_routes: BTreeSet<&Route> = observed.routes.iter().filter(|r| !gone(&r.dev)).collect();
    for r in have_routes.difference(&want_routes) {
        ops.push(Op::DelRoute((*r).clone()));
    }
    for r in want_routes.difference(&have_routes) {
        ops.push(Op::AddRoute((*r).clone()));
    }

    ops.sort_by_key(Op::rank);
    ops
}

/// Everything portless owns, removed: its routes, then its links (which
/// takes their addresses, neighbours and FDB entries along).
pub fn cleanup(observed: &Observed) -> Vec<Op> {
    let mut ops: Vec<Op> = observed.routes.iter().cloned().map(Op::DelRoute).collect();
    for l in &observed.links {
        if l.name.starts_with(LINK_PREFIX)
            && matches!(l.kind, LinkKind::Vxlan { .. } | LinkKind::Bridge)
        {
            ops.push(Op::DelLink {
                name: l.name.clone(),
            });
        }
    }
    ops
}

/// Whether every kernel entry of one peer is in place.
pub fn peer_in_place(peer: &PeerPlan, observed: &Observed) -> bool {
    peer.neigh
        .as_ref()
        .is_none_or(|n| observed.neighs.contains(n))
        && peer.fdb.as_ref().is_none_or(|e| observed.fdbs.contains(e))
        && observed.routes.contains(&peer.route)
}

/// Pick a subnet of `cluster` with prefix length `len` for host `id`.
///
/// `taken` are subnets held by live hosts; `reserved` maps subnets to the
/// host that held them last (kept after a lease expires, so that a host
/// that comes back gets its own subnet again). Order of preference: this
/// host's own reservation if free, then the lowest subnet nobody holds or
/// reserved, then the lowest one only reserved by another host.
pub fn pick_subnet(
    cluster: Ipv4Net,
    len: u8,
    id: &str,
    taken: &BTreeSet<Ipv4Net>,
    reserved: &BTreeMap<Ipv4Net, String>,
) -> Option<Ipv4Net> {
    let free = |n: &Ipv4Net| !taken.iter().any(|t| t.contains(n) || n.contains(t));
    if let Some((mine, _)) = reserved
        .iter()
        .find(|(n, owner)| owner.as_str() == id && cluster.contains(*n) && n.prefix_len() == len)
        && free(mine)
    {
        return Some(*mine);
    }
    let subnets = cluster.subnets(len).ok()?;
    let mut fallback = None;
    for n in subnets {
        if !free(&n) {
            continue;
        }
        match reserved.get(&n) {
            None => return Some(n),
            Some(_) if fallback.is_none() => fallback = Some(n),
            Some(_) => {}
        }
    }
    fallback
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, subnet: &str, underlay: [u8; 4], mode: Mode) -> HostRecord {
        let underlay = Ipv4Addr::from(underlay);
        HostRecord {
            id: id.into(),
            subnet: subnet.parse().unwrap(),
            underlay,
            vtep_mac: Mac::for_vtep(underlay),
            mode,
            vxlan_port: 4789,
            hostname: String::new(),
        }
    }

    fn local(mode: Mode, bridge: bool) -> LocalSpec {
        LocalSpec {
            record: rec("a", "10.244.1.0/24", [192, 168, 1, 1], mode),
            underlay: Underlay {
                ifname: "eth0".into(),
                ifindex: 2,
                addr: Ipv4Addr::new(192, 168, 1, 1),
                mtu: 1500,
                connected: vec!["192.168.1.0/24".parse().unwrap()],
            },
            vxlan_name: VXLAN_DEVICE.into(),
            vni: 1,
            bridge: bridge.then(|| "pl-br0".to_owned()),
        }
    }

    /// Apply ops to an observed state the way the kernel would.
    fn simulate(obs: &mut Observed, ops: &[Op]) {
        for op in ops {
            match op {
                Op::DelRoute(r) => obs.routes.retain(|x| x != r),
                Op::DelNeigh(n) => obs.neighs.retain(|x| x != n),
                Op::DelFdb(e) => obs.fdbs.retain(|x| x != e),
                Op::DelAddr(a) => obs.addrs.retain(|x| x != a),
                Op::DelLink { name } => {
                    obs.links.retain(|l| &l.name != name);
                    obs.addrs.retain(|x| &x.dev != name);
                    obs.neighs.retain(|x| &x.dev != name);
                    obs.fdbs.retain(|x| &x.dev != name);
                    obs.routes.retain(|x| &x.dev != name);
                }
                Op::AddVxlan(v) => obs.links.push(LinkState {
                    name: v.name.clone(),
                    index: 100,
                    kind: LinkKind::Vxlan {
                        vni: v.vni,
                        port: v.port,
                        local: Some(v.local),
                        underlay_index: Some(v.underlay_index),
                        learning: false,
                    },
                    mtu: 1500,
                    up: false,
                    mac: Some(v.mac),
                }),
                Op::AddBridge(b) => obs.links.push(LinkState {
                    name: b.name.clone(),
                    index: 101,
                    kind: LinkKind::Bridge,
                    mtu: 1500,
                    up: false,
                    mac: None,
                }),
                Op::SetLink { name, mtu } => {
                    for l in obs.links.iter_mut().filter(|l| &l.name == name) {
                        l.mtu = *mtu;
                        l.up = true;
                    }
                }
                Op::AddAddr(a) => obs.addrs.push(a.clone()),
                Op::AddNeigh(n) => {
                    obs.neighs.retain(|x| !(x.dev == n.dev && x.ip == n.ip));
                    obs.neighs.push(n.clone())
                }
                Op::AddFdb(e) => obs.fdbs.push(e.clone()),
                Op::AddRoute(r) => obs.routes.push(r.clone()),
            }
        }
    }

    #[test]
    fn vxlan_peer_gets_one_neighbour_one_fdb_one_onlink_route() {
        let l = local(Mode::Vxlan, false);
        let peers = vec![rec("b", "10.244.2.0/24", [10, 0, 0, 2], Mode::Vxlan)];
        let p = plan(&l, &peers);
        let v = p.vxlan.as_ref().unwrap();
        assert_eq!(v.mtu, 1450);
        assert_eq!(v.mac, Mac::for_vtep(Ipv4Addr::new(192, 168, 1, 1)));
        assert_eq!(p.peers.len(), 1);
        let ops = diff(&p, &Observed::default());
        let count = |f: fn(&Op) -> bool| ops.iter().filter(|o| f(o)).count();
        assert_eq!(count(|o| matches!(o, Op::AddNeigh(_))), 1);
        assert_eq!(count(|o| matches!(o, Op::AddFdb(_))), 1);
        assert_eq!(count(|o| matches!(o, Op::AddRoute(_))), 1);
        assert!(ops.contains(&Op::AddNeigh(Neigh {
            dev: "pl-vx0".into(),
            ip: Ipv4Addr::new(10, 244, 2, 0),
            mac: Mac::for_vtep(Ipv4Addr::new(10, 0, 0, 2)),
        })));
        assert!(ops.contains(&Op::AddFdb(Fdb {
            dev: "pl-vx0".into(),
            mac: Mac::for_vtep(Ipv4Addr::new(10, 0, 0, 2)),
            dst: Ipv4Addr::new(10, 0, 0, 2),
        })));
        assert!(ops.contains(&Op::AddRoute(Route {
            dst: "10.244.2.0/24".parse().unwrap(),
            via: Ipv4Addr::new(10, 244, 2, 0),
            dev: "pl-vx0".into(),
            onlink: true,
            src: None,
        })));
        assert!(ops.contains(&Op::AddAddr(Addr {
            dev: "pl-vx0".into(),
            net: "10.244.1.0/32".parse().unwrap(),
        })));
        // Links come before what hangs off them, routes last.
        assert!(matches!(ops.first(), Some(Op::AddVxlan(_))));
        assert!(matches!(ops.last(), Some(Op::AddRoute(_))));
    }

    #[test]
    fn route_mode_routes_via_peer_on_segment() {
        let l = local(Mode::Route, false);
        let peers = vec![rec("b", "10.244.2.0/24", [192, 168, 1, 2], Mode::Route)];
        let p = plan(&l, &peers);
        assert!(p.vxlan.is_none());
        assert!(p.refused.is_empty());
        assert_eq!(
            diff(&p, &Observed::default()),
            vec![Op::AddRoute(Route {
                dst: "10.244.2.0/24".parse().unwrap(),
                via: Ipv4Addr::new(192, 168, 1, 2),
                dev: "eth0".into(),
                onlink: false,
                src: Some(Ipv4Addr::new(10, 244, 1, 1)),
            })]
        );
    }

    #[test]
    fn route_mode_refuses_peer_off_segment_with_clear_reason() {
        let l = local(Mode::Route, false);
        let peers = vec![rec("b", "10.244.2.0/24", [10, 9, 9, 9], Mode::Route)];
        let p = plan(&l, &peers);
        assert!(p.peers.is_empty());
        assert_eq!(p.refused.len(), 1);
        let reason = &p.refused[0].reason;
        assert!(
            reason.contains("not on a directly connected segment"),
            "{reason}"
        );
        assert!(reason.contains("192.168.1.0/24"), "{reason}");
        assert!(diff(&p, &Observed::default()).is_empty());
    }

    #[test]
    fn auto_mode_routes_on_segment_and_tunnels_the_rest() {
        let l = local(Mode::Auto, false);
        let peers = vec![
            rec("b", "10.244.2.0/24", [192, 168, 1, 2], Mode::Auto),
            rec("c", "10.244.3.0/24", [10, 0, 0, 3], Mode::Auto),
            rec("d", "10.244.4.0/24", [10, 0, 0, 4], Mode::Route),
        ];
        let p = plan(&l, &peers);
        let t: Vec<_> = p
            .peers
            .iter()
            .map(|p| (p.id.as_str(), p.transport))
            .collect();
        assert_eq!(t, vec![("b", Transport::Route), ("c", Transport::Vxlan)]);
        assert_eq!(p.refused.len(), 1);
        assert_eq!(p.refused[0].id, "d");
        assert!(
            p.vxlan.is_some(),
            "auto keeps a VTEP so that remote peers can reach it"
        );
    }

    #[test]
    fn vxlan_port_mismatch_is_refused_with_a_reason() {
        let l = local(Mode::Vxlan, false);
        let mut b = rec("b", "10.244.2.0/24", [10, 0, 0, 2], Mode::Vxlan);
        b.vxlan_port = 8472;
        let p = plan(&l, &[b]);
        assert!(p.peers.is_empty());
        assert!(
            p.refused[0].reason.contains("--vxlan-port"),
            "{:?}",
            p.refused
        );
        // Routed peers do not care.
        let mut c = rec("c", "10.244.3.0/24", [192, 168, 1, 3], Mode::Route);
        c.vxlan_port = 8472;
        assert_eq!(plan(&l, &[c]).peers.len(), 1);
    }

    #[test]
    fn vxlan_host_reaches_route_mode_peer_by_route() {
        let l = local(Mode::Vxlan, false);
        let peers = vec![rec("b", "10.244.2.0/24", [192, 168, 1, 2], Mode::Route)];
        let p = plan(&l, &peers);
        assert_eq!(p.peers[0].transport, Transport::Route);
    }

    #[test]
    fn own_record_is_skipped_and_overlapping_subnets_refused() {
        let l = local(Mode::Vxlan, false);
        let peers = vec![
            l.record.clone(),
            rec("b", "10.244.1.0/25", [10, 0, 0, 2], Mode::Vxlan),
            rec("c", "10.244.3.0/24", [10, 0, 0, 3], Mode::Vxlan),
            rec("d", "10.244.3.0/24", [10, 0, 0, 4], Mode::Vxlan),
        ];
        let p = plan(&l, &peers);
        assert_eq!(
            p.peers.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        let refused: Vec<_> = p.refused.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(refused, ["b", "d"]);
    }

    #[test]
    fn converged_state_yields_no_ops_and_drift_is_repaired() {
        let l = local(Mode::Vxlan, true);
        let peers = vec![
            rec("b", "10.244.2.0/24", [10, 0, 0, 2], Mode::Vxlan),
            rec("c", "10.244.3.0/24", [10, 0, 0, 3], Mode::Vxlan),
        ];
        let p = plan(&l, &peers);
        let mut obs = Observed::default();
        {
            let ops = diff(&p, &obs);
            simulate(&mut obs, &ops);
        }
        assert_eq!(diff(&p, &obs), vec![]);
        assert!(p.peers.iter().all(|peer| peer_in_place(peer, &obs)));

        // A route deleted behind our back comes back, and nothing else moves.
        let lost = obs.routes.remove(0);
        assert!(!peer_in_place(&p.peers[0], &obs));
        assert_eq!(diff(&p, &obs), vec![Op::AddRoute(lost)]);

        // A deleted device comes back with everything on it.
        let mut obs2 = obs.clone();
        simulate(
            &mut obs2,
            &[Op::DelLink {
                name: "pl-vx0".into(),
            }],
        );
        let ops = diff(&p, &obs2);
        assert!(matches!(ops[0], Op::AddVxlan(_)));
        simulate(&mut obs2, &ops);
        assert_eq!(diff(&p, &obs2), vec![]);
    }

    #[test]
    fn removed_peer_loses_its_entries_and_nothing_else() {
        let l = local(Mode::Vxlan, false);
        let b = rec("b", "10.244.2.0/24", [10, 0, 0, 2], Mode::Vxlan);
        let c = rec("c", "10.244.3.0/24", [10, 0, 0, 3], Mode::Vxlan);
        let mut obs = Observed::default();
        let p1 = plan(&l, &[b.clone(), c.clone()]);
        {
            let ops = diff(&p1, &obs);
            simulate(&mut obs, &ops);
        }
        let p2 = plan(&l, &[b]);
        let ops = diff(&p2, &obs);
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(
            ops.iter()
                .all(|o| matches!(o, Op::DelRoute(_) | Op::DelNeigh(_) | Op::DelFdb(_)))
        );
        assert!(matches!(ops[0], Op::DelRoute(_)));
    }

    #[test]
    fn peer_moving_underlay_replaces_fdb_and_keeps_neighbour() {
        let l = local(Mode::Vxlan, false);
        let b = rec("b", "10.244.2.0/24", [10, 0, 0, 2], Mode::Vxlan);
        let mut obs = Observed::default();
        {
            let ops = diff(&plan(&l, std::slice::from_ref(&b)), &obs);
            simulate(&mut obs, &ops);
        }
        let mut moved = b.clone();
        moved.underlay = Ipv4Addr::new(10, 0, 0, 22);
        let ops = diff(&plan(&l, &[moved]), &obs);
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert!(matches!(ops[0], Op::DelFdb(_)));
        assert!(matches!(ops[1], Op::AddFdb(_)));
    }

    #[test]
    fn wrong_vxlan_parameters_recreate_the_device_and_its_entries() {
        let l = local(Mode::Vxlan, false);
        let b = rec("b", "10.244.2.0/24", [10, 0, 0, 2], Mode::Vxlan);
        let p = plan(&l, &[b]);
        let mut obs = Observed::default();
        {
            let ops = diff(&p, &obs);
            simulate(&mut obs, &ops);
        }
        if let LinkKind::Vxlan { learning, .. } = &mut obs.links[0].kind {
            *learning = true;
        }
        let ops = diff(&p, &obs);
        assert!(matches!(ops[0], Op::DelLink { .. }));
        assert!(ops.iter().any(|o| matches!(o, Op::AddRoute(_))));
        simulate(&mut obs, &ops);
        assert_eq!(diff(&p, &obs), vec![]);
    }

    #[test]
    fn mtu_drift_is_set_back() {
        let l = local(Mode::Vxlan, true);
        let p = plan(&l, &[]);
        let mut obs = Observed::default();
        {
            let ops = diff(&p, &obs);
            simulate(&mut obs, &ops);
        }
        obs.links[0].mtu = 1400;
        assert_eq!(
            diff(&p, &obs),
            vec![Op::SetLink {
                name: "pl-vx0".into(),
                mtu: 1450
            }]
        );
    }

    #[test]
    fn switching_to_route_mode_removes_the_vtep() {
        let mut l = local(Mode::Vxlan, false);
        let b = rec("b", "10.244.2.0/24", [192, 168, 1, 2], Mode::Vxlan);
        let mut obs = Observed::default();
        {
            let ops = diff(&plan(&l, std::slice::from_ref(&b)), &obs);
            simulate(&mut obs, &ops);
        }
        l.record.mode = Mode::Route;
        let p = plan(&l, &[b]);
        let ops = diff(&p, &obs);
        assert!(ops.contains(&Op::DelLink {
            name: "pl-vx0".into()
        }));
        simulate(&mut obs, &ops);
        assert_eq!(diff(&p, &obs), vec![]);
        assert!(obs.links.is_empty());
    }

    #[test]
    fn foreign_links_are_never_touched() {
        let l = local(Mode::Vxlan, false);
        let p = plan(&l, &[]);
        let mut obs = Observed::default();
        obs.links.push(LinkState {
            name: "pl-veth".into(),
            index: 7,
            kind: LinkKind::Other("veth".into()),
            mtu: 1500,
            up: true,
            mac: None,
        });
        assert!(
            !diff(&p, &obs)
                .iter()
                .any(|o| matches!(o, Op::DelLink { .. }))
        );
        assert!(cleanup(&obs).is_empty());
    }

    #[test]
    fn cleanup_removes_routes_then_links() {
        let l = local(Mode::Auto, true);
        let peers = vec![
            rec("b", "10.244.2.0/24", [192, 168, 1, 2], Mode::Auto),
            rec("c", "10.244.3.0/24", [10, 0, 0, 3], Mode::Auto),
        ];
        let mut obs = Observed::default();
        {
            let ops = diff(&plan(&l, &peers), &obs);
            simulate(&mut obs, &ops);
        }
        let ops = cleanup(&obs);
        simulate(&mut obs, &ops);
        assert_eq!(obs, Observed::default());
        assert!(matches!(ops[0], Op::DelRoute(_)));
    }

    #[test]
    fn bridge_holds_gateway_with_container_mtu() {
        let l = local(Mode::Vxlan, true);
        let p = plan(&l, &[]);
        assert_eq!(p.bridge.as_ref().unwrap().mtu, 1450);
        assert!(p.addrs.contains(&Addr {
            dev: "pl-br0".into(),
            net: "10.244.1.1/24".parse().unwrap()
        }));
        let l = local(Mode::Route, true);
        assert_eq!(plan(&l, &[]).bridge.unwrap().mtu, 1500);
    }

    #[test]
    fn pick_subnet_prefers_own_reservation_then_unreserved() {
        let cluster: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let n = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let mut taken = BTreeSet::new();
        let mut reserved = BTreeMap::new();
        assert_eq!(
            pick_subnet(cluster, 24, "a", &taken, &reserved),
            Some(n("10.244.0.0/24"))
        );
        reserved.insert(n("10.244.0.0/24"), "b".to_owned());
        reserved.insert(n("10.244.5.0/24"), "a".to_owned());
        assert_eq!(
            pick_subnet(cluster, 24, "a", &taken, &reserved),
            Some(n("10.244.5.0/24"))
        );
        assert_eq!(
            pick_subnet(cluster, 24, "c", &taken, &reserved),
            Some(n("10.244.1.0/24"))
        );
        taken.insert(n("10.244.5.0/24"));
        assert_eq!(
            pick_subnet(cluster, 24, "a", &taken, &reserved),
            Some(n("10.244.1.0/24"))
        );
        // Full range: only reservations of others remain, then nothing.
        let small: Ipv4Net = "10.0.0.0/30".parse().unwrap();
        let mut r = BTreeMap::new();
        r.insert(n("10.0.0.0/31"), "x".to_owned());
        let mut t = BTreeSet::new();
        t.insert(n("10.0.0.2/31"));
        assert_eq!(pick_subnet(small, 31, "a", &t, &r), Some(n("10.0.0.0/31")));
        t.insert(n("10.0.0.0/31"));
        assert_eq!(pick_subnet(small, 31, "a", &t, &r), None);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn arb_peer() -> impl Strategy<Value = HostRecord> {
            (1u8..60, 0u8..3, any::<bool>()).prop_map(|(i, m, same_seg)| {
                let mode = [Mode::Vxlan, Mode::Route, Mode::Auto][m as usize];
                let underlay = if same_seg {
                    [192, 168, 1, i + 1]
                } else {
                    [10, 0, 0, i]
                };
                rec(
                    &format!("h{i}"),
                    &format!("10.244.{}.0/24", i + 1),
                    underlay,
                    mode,
                )
            })
        }

        proptest! {
            /// Whatever the start and target peer sets, applying the diff
            /// converges in one step, and cleanup leaves nothing.
            #[test]
            fn diff_converges_in_one_step(
                mode in 0u8..3,
                before in proptest::collection::vec(arb_peer(), 0..8),
                after in proptest::collection::vec(arb_peer(), 0..8),
            ) {
                let l = local([Mode::Vxlan, Mode::Route, Mode::Auto][mode as usize], true);
                let mut obs = Observed::default();
                { let ops = diff(&plan(&l, &before), &obs); simulate(&mut obs, &ops); }
                let p = plan(&l, &after);
                { let ops = diff(&p, &obs); simulate(&mut obs, &ops); }
                prop_assert_eq!(diff(&p, &obs), vec![]);
                for peer in &p.peers {
                    prop_assert!(peer_in_place(peer, &obs));
                }
                { let ops = cleanup(&obs); simulate(&mut obs, &ops); }
                prop_assert_eq!(obs, Observed::default());
            }
        }
    }
}
