//! The executor: reads the kernel state portless owns and applies [`Op`]s
//! over rtnetlink.
//!
//! All netlink work runs on one dedicated OS thread with its own
//! current-thread runtime. When a network namespace is given, that thread
//! enters it first (setns affects only the calling thread, so it must never
//! be a tokio worker), and so does every command it runs, such as iptables.
//!
//! Changes are idempotent: EEXIST on add and ENOENT/ESRCH on delete count
//! as success, so a half-applied plan is simply applied again.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::pin::Pin;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol,
};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::model::Mac;
use crate::plan::{
    Addr, Fdb, LINK_PREFIX, LinkKind, LinkState, NETWORK_ROUTE_PROTOCOL, Neigh, Observed, Op,
    ROUTE_PROTOCOL, Route, Underlay, route_protocol,
};

// errno values the idempotence rules need (Linux, all architectures).
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EEXIST: i32 = 17;
const ENODEV: i32 = 19;
const EADDRNOTAVAIL: i32 = 99;

type Job = Box<dyn FnOnce(Handle) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// Handle to the executor thread. Cheap to clone; the thread ends when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Kernel {
    jobs: mpsc::UnboundedSender<Job>,
    netns: Option<PathBuf>,
}

/// What happened to one op.
#[derive(Debug)]
pub struct Applied {
    pub op: Op,
    pub result: Result<()>,
}

impl Kernel {
    /// Start the executor, inside the network namespace at `netns` (a file
    /// such as `/run/netns/NAME`) if given, else in the caller's.
    pub fn spawn(netns: Option<&Path>) -> Result<Kernel> {
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let ns = netns.map(Path::to_path_buf);
        let ns_thread = ns.clone();
        std::thread::Builder::new()
            .name("portless-netlink".into())
            .spawn(move || {
                let setup = || -> Result<(tokio::runtime::Runtime, Handle)> {
                    if let Some(path) = &ns_thread {
                        let file = std::fs::File::open(path)?;
                        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                            |source| Error::Netns {
                                path: path.clone(),
                                source,
                            },
                        )?;
                    }
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    // The socket is created here, after setns, so it lives in
                    // the namespace for good.
                    let handle = rt.block_on(async {
                        let (conn, handle, _) = rtnetlink::new_connection()?;
                        tokio::spawn(conn);
                        Ok::<_, Error>(handle)
                    })?;
                    Ok((rt, handle))
                };
                let (rt, handle) = match setup() {
                    Ok(v) => {
                        let _ = ready_tx.send(Ok(()));
                        v
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    while let Some(job) = rx.recv().await {
                        job(handle.clone()).await;
                    }
                });
            })?;
        ready_rx.recv().map_err(|_| Error::ExecutorGone)??;
        Ok(Kernel { jobs, netns: ns })
    }

    /// The namespace this executor works in, if not the caller's.
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    /// Run `f` on the executor thread, in its namespace.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Handle) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |h| {
            Box::pin(async move {
                let _ = tx.send(f(h).await);
            })
        });
        self.jobs.send(job).map_err(|_| Error::ExecutorGone)?;
        rx.await.map_err(|_| Error::ExecutorGone)
    }

    /// Run a blocking closure (a command, a sysctl write) on the executor
    /// thread, so that it sees the executor's namespace.
    pub async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.call(move |_| async move { f() }).await
    }

    /// Read back everything portless owns for the cluster network.
    pub async fn observe(&self) -> Result<Observed> {
        self.call(|h| async move { observe(&h).await.map(|(o, _)| o) })
            .await?
    }

    /// Read back the links of the cluster networks whose names start with
    /// `prefix` (a [`NETWORK_LINK_PREFIX`] one), the entries on them, and
    /// the routes stamped [`NETWORK_ROUTE_PROTOCOL`].
    pub async fn observe_networks(&self, prefix: &'static str) -> Result<Observed> {
        self.call(move |h| async move {
            observe_scope(&h, prefix, NETWORK_ROUTE_PROTOCOL)
                .await
                .map(|(o, _)| o)
        })
        .await?
    }

    /// Apply ops in order. A failed op does not stop the rest: later
    /// reconciles retry it.
    pub async fn apply(&self, ops: Vec<Op>) -> Result<Vec<Applied>> {
        self.call(|h| async move { apply(&h, ops).await }).await?
    }

    /// The underlay interface: the one holding `addr`, or, without one, the
    /// one the IPv4 default route leaves through.
    pub async fn underlay(&self, addr: Option<Ipv4Addr>) -> Result<Underlay> {
        self.call(move |h| async move { underlay(&h, addr).await })
            .await?
    }

    /// Follow kernel changes in the executor's namespace: the receiver
    /// gets a unit whenever one of portless's links changes or goes, or an
    /// address on one, a route with its protocol or a permanent neighbour
    /// or FDB entry is deleted, by anyone (portless included). The reconcile loop
    /// uses it to repair drift at once instead of at the next period.
    pub async fn changes(&self) -> Result<mpsc::UnboundedReceiver<()>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.call(move |h| async move {
            let groups = [
                rtnetlink::MulticastGroup::Link,
                rtnetlink::MulticastGroup::Ipv4Ifaddr,
                rtnetlink::MulticastGroup::Ipv4Route,
                rtnetlink::MulticastGroup::Neigh,
            ];
            let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&groups)?;
            // The indexes of portless's links, for neighbour and FDB
            // deletions (the kernel reports a deleted permanent entry with
            // state FAILED, so the state cannot tell whose it was). Listed
            // after subscribing, so no link made meanwhile is missed; kept
            // up to date from the link events.
            let (observed, _) = observe(&h).await?;
            let mut ours: HashSet<u32> = observed.links.iter().map(|l| l.index).collect();
            // One task on the executor thread's runtime runs the socket and
            // forwards; when the receiver is gone (the agent stopped) both
            // end together, so the socket never reports to nobody.
            tokio::spawn(async move {
                use futures::StreamExt;
                use rtnetlink::packet_core::NetlinkPayload;
                let forward = async move {
                    while let Some((msg, _)) = messages.next().await {
                        if tx.is_closed() {
                            return;
                        }
                        let relevant = match &msg.payload {
                            NetlinkPayload::InnerMessage(m) => {
                                track_ours(&mut ours, m);
                                touches_ours(m, &ours)
                            }
                            _ => false,
                        };
                        if relevant && tx.send(()).is_err() {
                            return;
                        }
                    }
                };
                tokio::select! {
                    _ = conn => {}
                    _ = forward => {}
                }
            });
            Ok::<_, Error>(())
        })
        .await??;
        Ok(rx)
    }

    /// Turn on IPv4 forwarding in the executor's namespace.
    pub async fn enable_forwarding(&self) -> Result<()> {
        self.blocking(|| {
            let path = "/proc/sys/net/ipv4/ip_forward";
            if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
                return Ok(());
            }
            std::fs::write(path, "1")
        })
        .await??;
        Ok(())
    }
}

/// Whether a kernel notification is about something portless owns, so
/// that the churn of a busy host (containers' veths coming and going, ARP
/// and bridge FDB entries ageing out) does not wake the reconcile loop.
fn touches_ours(m: &rtnetlink::packet_route::RouteNetlinkMessage, ours: &HashSet<u32>) -> bool {
    use rtnetlink::packet_route::RouteNetlinkMessage as M;
    match m {
        M::NewLink(l) | M::DelLink(l) => {
            link_name(l).is_some_and(|n| n.starts_with(LINK_PREFIX))
                || ours.contains(&l.header.index)
        }
        M::DelAddress(a) => a
            .attributes
            .iter()
            .any(|x| matches!(x, AddressAttribute::Label(n) if n.starts_with(LINK_PREFIX))),
        M::DelRoute(r) => u8::from(r.header.protocol) == ROUTE_PROTOCOL,
        // Neighbour and FDB entries on portless's links (the VXLAN
        // device): whatever state the kernel reports them in.
        M::DelNeighbour(n) => ours.contains(&n.header.ifindex),
        _ => false,
    }
}

/// Follow which link indexes are portless's (a rename counts).
fn track_ours(ours: &mut HashSet<u32>, m: &rtnetlink::packet_route::RouteNetlinkMessage) {
    use rtnetlink::packet_route::RouteNetlinkMessage as M;
    match m {
        M::NewLink(l) => {
            if link_name(l).is_some_and(|n| n.starts_with(LINK_PREFIX)) {
                ours.insert(l.header.index);
            } else if link_name(l).is_some() {
                ours.remove(&l.header.index);
            }
        }
        M::DelLink(l) => {
            ours.remove(&l.header.index);
        }
        _ => {}
    }
}

pub(crate) fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let op = op.into();
    move |source| Error::Netlink { op, source }
}

pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn link_name(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_state(m: &LinkMessage) -> Option<LinkState> {
    let name = link_name(m)?.to_owned();
    let mut mtu = 0;
    let mut mac = None;
    let mut kind = LinkKind::Other(String::new());
    for a in &m.attributes {
        match a {
            LinkAttribute::Mtu(v) => mtu = *v,
            LinkAttribute::Address(b) if b.len() == 6 => {
                let mut o = [0u8; 6];
                o.copy_from_slice(b);
                mac = Some(Mac(o));
            }
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(InfoKind::Bridge) => kind = LinkKind::Bridge,
                        LinkInfo::Kind(InfoKind::Vxlan)
                            if kind == LinkKind::Other(String::new()) =>
                        {
                            kind = LinkKind::Vxlan {
                                vni: 0,
                                port: 0,
                                local: None,
                                underlay_index: None,
                                learning: true,
                            }
                        }
                        LinkInfo::Kind(k) if !matches!(kind, LinkKind::Vxlan { .. }) => {
                            kind = LinkKind::Other(k.to_string())
                        }
                        LinkInfo::Data(InfoData::Vxlan(attrs)) => {
                            let (mut v, mut p, mut l, mut u, mut learn) = (0, 0, None, None, true);
                            for x in attrs {
                                match x {
                                    InfoVxlan::Id(i) => v = *i,
                                    InfoVxlan::Port(i) => p = *i,
                                    InfoVxlan::Local(i) => l = Some(*i),
                                    InfoVxlan::Link(i) => u = Some(*i),
                                    InfoVxlan::Learning(b) => learn = *b,
                                    _ => {}
                                }
                            }
                            kind = LinkKind::Vxlan {
                                vni: v,
                                port: p,
                                local: l,
                                underlay_index: u,
                                learning: learn,
                            };
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(LinkState {
        name,
        index: m.header.index,
        kind,
        mtu,
        up: m.header.flags.contains(LinkFlags::Up),
        mac,
    })
}

/// Every link by index, and the observed state of ours.
async fn observe(h: &Handle) -> Result<(Observed, HashMap<u32, String>)> {
    observe_scope(h, LINK_PREFIX, ROUTE_PROTOCOL).await
}

/// Every link by index, and the observed state of the links named
/// `prefix*` and the routes stamped `protocol`.
async fn observe_scope(
    h: &Handle,
    prefix: &str,
    protocol: u8,
) -> Result<(Observed, HashMap<u32, String>)> {
    let mut names = HashMap::new();
    let mut obs = Observed::default();
    let mut links = h.link().get().execute();
    while let Some(m) = links.try_next().await.map_err(nl("link dump"))? {
        if let Some(state) = link_state(&m) {
            names.insert(state.index, state.name.clone());
            if state.name.starts_with(prefix) {
                obs.links.push(state);
            }
        }
    }
    let ours = |idx: u32| names.get(&idx).filter(|n| n.starts_with(prefix)).cloned();

    let mut addrs = h.address().get().execute();
    while let Some(m) = addrs.try_next().await.map_err(nl("address dump"))? {
        let Some(dev) = ours(m.header.index) else {
            continue;
        };
        let local = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(v)) => Some(*v),
            _ => None,
        });
        if let Some(ip) = local
            && let Ok(net) = Ipv4Net::new(ip, m.header.prefix_len)
        {
            obs.addrs.push(Addr { dev, net });
        }
    }

    let mut neighs = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute();
    while let Some(m) = neighs.try_next().await.map_err(nl("neighbour dump"))? {
        let Some(dev) = ours(m.header.ifindex) else {
            continue;
        };
        if m.header.state != NeighbourState::Permanent {
            continue;
        }
        let (mut ip, mut mac) = (None, None);
        for a in &m.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => ip = Some(*v),
                NeighbourAttribute::LinkLayerAddress(b) => mac = to_mac(b),
                _ => {}
            }
        }
        if let (Some(ip), Some(mac)) = (ip, mac) {
            obs.neighs.push(Neigh { dev, ip, mac });
        }
    }

    let mut fdbs = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute();
    while let Some(m) = fdbs.try_next().await.map_err(nl("fdb dump"))? {
        let Some(dev) = ours(m.header.ifindex) else {
            continue;
        };
        let (mut dst, mut mac) = (None, None);
        for a in &m.attributes {
            match a {
                // In the bridge family the kernel's NDA_DST is not parsed
                // as an address: four bytes are an IPv4 VTEP.
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => dst = Some(*v),
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                    dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                }
                NeighbourAttribute::LinkLayerAddress(b) => mac = to_mac(b),
                _ => {}
            }
        }
        if let (Some(dst), Some(mac)) = (dst, mac) {
            obs.fdbs.push(Fdb { dev, mac, dst });
        }
    }

    let mut routes = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(m) = routes.try_next().await.map_err(nl("route dump"))? {
        if u8::from(m.header.protocol) != protocol || m.header.table != RouteHeader::RT_TABLE_MAIN {
            continue;
        }
        if let Some(r) = route_of(&m, &names) {
            obs.routes.push(r);
        }
    }
    Ok((obs, names))
}

fn to_mac(b: &[u8]) -> Option<Mac> {
    let arr: [u8; 6] = b.try_into().ok()?;
    Some(Mac(arr))
}

fn route_of(m: &RouteMessage, names: &HashMap<u32, String>) -> Option<Route> {
    let (mut dst, mut via, mut oif, mut src) = (Ipv4Addr::UNSPECIFIED, None, None, None);
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(v)) => dst = *v,
            RouteAttribute::PrefSource(RouteAddress::Inet(v)) => src = Some(*v),
            RouteAttribute::Gateway(RouteAddress::Inet(v)) => via = Some(*v),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    Some(Route {
        dst: Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?,
        via: via?,
        dev: names.get(&oif?)?.clone(),
        onlink: m.header.flags.contains(RouteFlags::Onlink),
        src,
    })
}

async fn apply(h: &Handle, ops: Vec<Op>) -> Result<Vec<Applied>> {
    let (_, mut names) = observe_names(h).await?;
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        let result = apply_one(h, &op, &mut names).await;
        match &result {
            Ok(()) => debug!(op = %op, "netlink op applied"),
            Err(e) => warn!(op = %op, error = %e, "netlink op failed"),
        }
        out.push(Applied { op, result });
    }
    Ok(out)
}

async fn observe_names(h: &Handle) -> Result<((), HashMap<u32, String>)> {
    let mut names = HashMap::new();
    let mut links = h.link().get().execute();
    while let Some(m) = links.try_next().await.map_err(nl("link dump"))? {
        if let Some(n) = link_name(&m) {
            names.insert(m.header.index, n.to_owned());
        }
    }
    Ok(((), names))
}

fn index_of(names: &HashMap<u32, String>, dev: &str) -> Result<u32> {
    names
        .iter()
        .find(|(_, n)| n.as_str() == dev)
        .map(|(i, _)| *i)
        .ok_or_else(|| Error::Underlay(format!("no link named {dev}")))
}

async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>> {
    let mut req = h.link().get().match_name(name.to_owned()).execute();
    match req.try_next().await {
        Ok(Some(m)) => Ok(Some(m.header.index)),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(Error::Netlink {
            op: format!("link get {name}"),
            source: e,
        }),
    }
}

/// Ok when the kernel says the object already exists.
fn added(op: &Op, r: Result<(), rtnetlink::Error>) -> Result<()> {
    match r {
        Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
        other => other.map_err(nl(op.to_string())),
    }
}

/// Ok when the kernel says the object is already gone.
fn deleted(op: &Op, r: Result<(), rtnetlink::Error>) -> Result<()> {
    match r {
        Err(e) if matches!(errno(&e), Some(ENOENT | ESRCH | ENODEV | EADDRNOTAVAIL)) => Ok(()),
        other => other.map_err(nl(op.to_string())),
    }
}

fn route_message(r: &Route, oif: u32) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst.network(), r.dst.prefix_len())
        .gateway(r.via)
        .output_interface(oif)
        .protocol(RouteProtocol::from(route_protocol(&r.dev)));
    if r.onlink {
        b = b.onlink();
    }
    if let Some(src) = r.src {
        b = b.pref_source(src);
    }
    b.build()
}

fn neigh_message(family: AddressFamily, index: u32) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family;
    m.header.ifindex = index;
    m
}

async fn apply_one(h: &Handle, op: &Op, names: &mut HashMap<u32, String>) -> Result<()> {
    match op {
        Op::AddVxlan(v) => {
            let msg = LinkVxlan::new(&v.name, v.vni)
                .dev(v.underlay_index)
                .port(v.port)
                .local(v.local)
                .learning(false)
                .address(v.mac.0.to_vec())
                .mtu(v.mtu)
                .build();
            added(op, h.link().add(msg).execute().await)?;
            if let Some(i) = link_index(h, &v.name).await? {
                names.insert(i, v.name.clone());
            }
            Ok(())
        }
        Op::AddBridge(b) => {
            let msg = LinkBridge::new(&b.name).mtu(b.mtu).build();
            added(op, h.link().add(msg).execute().await)?;
            if let Some(i) = link_index(h, &b.name).await? {
                names.insert(i, b.name.clone());
            }
            Ok(())
        }
        Op::DelLink { name } => {
            let Some(idx) = link_index(h, name).await? else {
                return Ok(());
            };
            deleted(op, h.link().del(idx).execute().await)?;
            names.remove(&idx);
            Ok(())
        }
        Op::SetLink { name, mtu } => {
            let idx = index_of(names, name)?;
            let msg = LinkUnspec::new_with_index(idx).mtu(*mtu).up().build();
            h.link()
                .set(msg)
                .execute()
                .await
                .map_err(nl(op.to_string()))
        }
        Op::AddAddr(a) => {
            let idx = index_of(names, &a.dev)?;
            added(
                op,
                h.address()
                    .add(idx, IpAddr::V4(a.net.addr()), a.net.prefix_len())
                    .execute()
                    .await,
            )
        }
        Op::DelAddr(a) => {
            let Ok(idx) = index_of(names, &a.dev) else {
                return Ok(());
            };
            let mut msg = rtnetlink::AddressMessageBuilder::<Ipv4Addr>::new()
                .index(idx)
                .address(a.net.addr(), a.net.prefix_len())
                .build();
            msg.header.family = AddressFamily::Inet;
            deleted(op, h.address().del(msg).execute().await)
        }
        Op::AddNeigh(n) => {
            let idx = index_of(names, &n.dev)?;
            h.neighbours()
                .add(idx, IpAddr::V4(n.ip))
                .link_layer_address(&n.mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl(op.to_string()))
        }
        Op::DelNeigh(n) => {
            let Ok(idx) = index_of(names, &n.dev) else {
                return Ok(());
            };
            let mut m = neigh_message(AddressFamily::Inet, idx);
            m.attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                    n.ip,
                )));
            deleted(op, h.neighbours().del(m).execute().await)
        }
        Op::AddFdb(e) => {
            let idx = index_of(names, &e.dev)?;
            added(
                op,
                h.neighbours()
                    .add_bridge(idx, &e.mac.0)
                    .flags(NeighbourFlags::Own)
                    .state(NeighbourState::Permanent)
                    .destination(IpAddr::V4(e.dst))
                    .execute()
                    .await,
            )
        }
        Op::DelFdb(e) => {
            let Ok(idx) = index_of(names, &e.dev) else {
                return Ok(());
            };
            let mut m = neigh_message(AddressFamily::Bridge, idx);
            m.header.flags = NeighbourFlags::Own;
            m.attributes
                .push(NeighbourAttribute::LinkLayerAddress(e.mac.0.to_vec()));
            m.attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                    e.dst,
                )));
            deleted(op, h.neighbours().del(m).execute().await)
        }
        Op::AddRoute(r) => {
            let idx = index_of(names, &r.dev)?;
            added(op, h.route().add(route_message(r, idx)).execute().await)
        }
        Op::DelRoute(r) => {
            let Ok(idx) = index_of(names, &r.dev) else {
                return Ok(());
            };
            deleted(op, h.route().del(route_message(r, idx)).execute().await)
        }
    }
}

async fn underlay(h: &Handle, want: Option<Ipv4Addr>) -> Result<Underlay> {
    let (_, names) = observe_names(h).await?;
    let mut by_if: HashMap<u32, Vec<Ipv4Net>> = HashMap::new();
    let mut addrs = h.address().get().execute();
    while let Some(m) = addrs.try_next().await.map_err(nl("address dump"))? {
        for a in &m.attributes {
            if let AddressAttribute::Local(IpAddr::V4(ip)) = a
                && let Ok(net) = Ipv4Net::new(*ip, m.header.prefix_len)
            {
                by_if.entry(m.header.index).or_default().push(net);
            }
        }
    }
    let (ifindex, addr) = match want {
        Some(ip) => {
            let idx = by_if
                .iter()
                .find(|(_, nets)| nets.iter().any(|n| n.addr() == ip))
                .map(|(i, _)| *i)
                .ok_or_else(|| Error::Underlay(format!("no interface holds {ip}")))?;
            (idx, ip)
        }
        None => {
            let mut routes = h
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute();
            let mut oif = None;
            while let Some(m) = routes.try_next().await.map_err(nl("route dump"))? {
                if m.header.destination_prefix_length == 0
                    && m.header.table == RouteHeader::RT_TABLE_MAIN
                {
                    oif = m.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Oif(i) => Some(*i),
                        _ => None,
                    });
                    if oif.is_some() {
                        break;
                    }
                }
            }
            let idx = oif.ok_or_else(|| {
                Error::Underlay("no IPv4 default route; give --advertise-addr".into())
            })?;
            let ip = by_if
                .get(&idx)
                .and_then(|n| n.first())
                .map(|n| n.addr())
                .ok_or_else(|| {
                    Error::Underlay("the default route's interface has no IPv4 address".into())
                })?;
            (idx, ip)
        }
    };
    let ifname = names
        .get(&ifindex)
        .cloned()
        .ok_or_else(|| Error::Underlay(format!("interface {ifindex} vanished")))?;
    let mut links = h.link().get().match_index(ifindex).execute();
    let mtu = match links.try_next().await.map_err(nl("link get"))? {
        Some(m) => m
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(v) => Some(*v),
                _ => None,
            })
            .unwrap_or(1500),
        None => 1500,
    };
    let connected = by_if
        .get(&ifindex)
        .map(|v| v.iter().map(|n| n.trunc()).collect())
        .unwrap_or_default();
    Ok(Underlay {
        ifname,
        ifindex,
        addr,
        mtu,
        connected,
    })
}
