//! The zone model: who may ask, and what each client sees.
//!
//! A [`Zone`] is immutable. The binary builds a new one from a
//! [`ZoneInput`] whenever its catalog changes and swaps it into the
//! [`ZoneHandle`]; queries only ever read a snapshot.
//!
//! Scoping:
//! - A client whose source address belongs to a container (a *container
//!   client*) sees the names of the networks that container is on: container
//!   names, aliases, compose `SERVICE` and `SERVICE.PROJECT`, and
//!   `NAME.NETWORK`, with or without the domain suffix. Answers carry only
//!   addresses on the networks the two containers share.
//! - A *host-side client* (loopback, or a range the operator allows) sees
//!   `NAME.DOMAIN`, `NAME.NETWORK.DOMAIN`, `ALIAS.NETWORK.DOMAIN` and
//!   `SERVICE.PROJECT.DOMAIN`.
//! - A client from an address no container is known to have yet, inside a
//!   network's client subnets, is a container of that network whose start
//!   discovery has not seen yet: it sees that network's names from its
//!   first query.
//! - Both see static names and ingress zones. Anyone else is refused.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::rr::{LowerName, Name, RecordType};
use ipnet::IpNet;
use rand::seq::SliceRandom;
use smallvec::SmallVec;

/// Keys are our own names; a seeded fast hasher keeps lookups cheap
/// without making collisions predictable.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A container's attachment to one network, as the zone needs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    /// Stable identity of the container (its Docker id), to count a
    /// container once when several of its names match.
    pub id: String,
    pub name: String,
    /// Its addresses on this network.
    pub addrs: Vec<IpAddr>,
    pub aliases: Vec<String>,
    /// Compose service and project, when started by compose.
    pub service: Option<String>,
    pub project: Option<String>,
    pub health: Health,
}

/// A member's fitness for new clients, reduced to what DNS needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Health {
    /// No healthcheck, or not decided yet.
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
    /// Being stopped: still running, but going away.
    Draining,
}

impl Health {
    /// Answers carry only the members of the best rank a name has: live
    /// ones, else unhealthy ones, else draining ones.
    fn rank(self) -> u8 {
        match self {
            Health::Unknown | Health::Healthy => 0,
            Health::Unhealthy => 1,
            Health::Draining => 2,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct NetworkInput {
    pub name: String,
    pub members: Vec<Member>,
    /// Ranges where only this network's containers (and the host, a
    /// host-side client) live: an unknown client in one is scoped to this
    /// network. Empty for networks shared with other machines (macvlan).
    pub client_subnets: Vec<IpNet>,
    /// Docker's `--internal`: cut off from the outside. A client whose
    /// networks are all internal gets answers from the zone only, never
    /// forwarded ones (no DNS channel out of the network).
    pub internal: bool,
}

/// Suffix of host-side names, unless configured.
pub const DEFAULT_DOMAIN: &str = "docker.internal";

/// TTL of the zone's own answers, in seconds, unless configured: short, as
/// containers come and go.
pub const DEFAULT_TTL: u32 = 5;

/// Everything a zone is built from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ZoneInput {
    /// Suffix for host-side names, lower case, no trailing dot.
    pub domain: String,
    pub ttl: u32,
    pub networks: Vec<NetworkInput>,
    /// Static names (hosts file), answered exactly as written.
    pub static_hosts: BTreeMap<String, Vec<IpAddr>>,
    /// Ingress zones: the zone and every name under it.
    pub ingress: Vec<(String, Vec<IpAddr>)>,
    /// Host-side clients besides loopback.
    pub host_clients: Vec<IpNet>,
    /// Reverse lookups inside these ranges are answered here (NXDOMAIN
    /// when unknown) rather than forwarded: the Docker subnets.
    pub private_ranges: Vec<IpNet>,
    /// SOA serial; any number that grows with each change.
    pub serial: u32,
    /// TXT records by exact name (no trailing dot), answered to every
    /// client allowed to ask: the ACME DNS-01 challenges
    /// (`_acme-challenge.NAME`) the binary publishes for the time of an
    /// order. A name here answers nothing but TXT (NODATA for other types).
    pub txt: BTreeMap<String, Vec<String>>,
}

/// What the zone says about one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The name exists; these are its addresses of the asked type, in a
    /// fresh random order.
    Addrs(Vec<IpAddr>),
    /// TXT records of the name: one record per value.
    Txt(Vec<String>),
    /// A reverse name with its target.
    Ptr(Name),
    /// The SOA of the domain (a question for the apex).
    Soa,
    /// The name exists but has nothing of the asked type.
    NoData,
    /// The name is under a zone portless serves and does not exist.
    NxDomain,
    /// Not ours: ask upstream.
    Forward,
    /// The client may not use this server.
    Refused,
}

#[derive(Debug, Clone)]
struct Target {
    id: u32,
    /// Its addresses under this name: mostly one, kept inline.
    addrs: SmallVec<[IpAddr; 1]>,
    /// [`Health::rank`]: lower is better.
    rank: u8,
    /// Matched only as the bare service name of this compose project
    /// (interned): a client of another project that has the service too
    /// gets its own project's replicas instead.
    service_of: Option<u32>,
}

/// Most names have one target, kept inline: a `Vec` per name (a heap
/// block each) was the zone's largest cost at 100,000 records.
type Targets = SmallVec<[Target; 1]>;
type Names = HashMap<Box<str>, Targets>;

/// A built, immutable zone.
#[derive(Debug, Default)]
pub struct Zone {
    domain: String,
    domain_name: Name,
    ttl: u32,
    serial: u32,
    /// Container address → indices of the networks that container is on.
    clients: HashMap<IpAddr, Vec<u32>>,
    /// Compose container address → its project (interned as in
    /// `Target::service_of`).
    client_projects: HashMap<IpAddr, u32>,
    /// Client subnets → the network whose containers live there.
    client_subnets: Vec<(IpNet, u32)>,
    /// Per network: is it internal?
    internal: Vec<bool>,
    /// Per network: names (without the domain) → targets.
    nets: Vec<Names>,
    /// Host-side names (without the domain) → targets.
    host_names: Names,
    statics: HashMap<Box<str>, Vec<IpAddr>>,
    txt: HashMap<Box<str>, Vec<String>>,
    ingress: Vec<(String, Vec<IpAddr>)>,
    /// Address → (PTR target, networks it is on; empty for static names,
    /// which everyone may see). The target is kept as checked text and
    /// made a `Name` when asked: a `Name` per address was a fifth of the
    /// zone's memory.
    ptr: HashMap<IpAddr, (Box<str>, Vec<u32>)>,
    host_clients: Vec<IpNet>,
    private_ranges: Vec<IpNet>,
}

/// The live zone, swapped whole on every change.
pub type ZoneHandle = Arc<ArcSwap<Zone>>;

/// Add `target` under `key`. A container met again under the same key
/// right after itself (a name that is also its alias) is merged at once;
/// other repeats (the same host-side name from two of its networks) are
/// merged by [`merge_repeats`] once the zone is built. Searching the whole
/// list here would make names shared by many containers (a compose
/// service in many projects) cost quadratic time.
fn push_target(names: &mut Names, key: String, target: &Target) {
    let targets = names.entry(key.into_boxed_str()).or_default();
    match targets.last_mut() {
        Some(t) if t.id == target.id => merge_into(t, target),
        _ => targets.push(target.clone()),
    }
}

/// `other` is the same container as `t` met again under the same name.
fn merge_into(t: &mut Target, other: &Target) {
    // Matched by its own name or an alias too: seen by every project.
    if other.service_of.is_none() {
        t.service_of = None;
    }
    for a in &other.addrs {
        if !t.addrs.contains(a) {
            t.addrs.push(*a);
        }
    }
}

/// One target per container under each name, its addresses merged.
fn merge_repeats(names: &mut Names) {
    for targets in names.values_mut() {
        if targets.len() < 2 || targets.windows(2).all(|w| w[0].id < w[1].id) {
            continue;
        }
        targets.sort_by_key(|t| t.id);
        let mut out = Targets::with_capacity(targets.len());
        for t in targets.drain(..) {
            match out.last_mut() {
                Some(last) if last.id == t.id => merge_into(last, &t),
                _ => out.push(t),
            }
        }
        *targets = out;
    }
}

/// `name` if it is a valid domain name (a PTR target).
fn ptr_text(name: String) -> Option<Box<str>> {
    fqdn(&name).map(|_| name.into_boxed_str())
}

/// A Docker id's short form: its first 12 hex digits (lower case, as
/// Docker writes ids); None for an id that is not a Docker id.
fn short_id(id: &str) -> Option<&str> {
    let short = id.get(..12)?;
    short
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        .then_some(short)
}

fn fqdn(name: &str) -> Option<Name> {
    let mut n = Name::from_ascii(name).ok()?;
    n.set_fqdn(true);
    Some(n)
}

impl Zone {
    pub fn build(input: &ZoneInput) -> Zone {
        let lower = |s: &str| s.to_ascii_lowercase();
        let domain = lower(input.domain.trim_end_matches('.'));
        let mut ids: HashMap<&str, u32> = HashMap::default();
        // A client is its container: whichever of its addresses a query
        // comes from, it sees every network the container is on.
        let mut container_nets: HashMap<&str, Vec<u32>> = HashMap::default();
        let mut addrs_of: HashMap<&str, Vec<IpAddr>> = HashMap::default();
        let mut projects: HashMap<String, u32> = HashMap::default();
        let mut zone = Zone {
            domain_name: fqdn(&domain).unwrap_or_else(Name::root),
            domain,
            ttl: input.ttl,
            serial: input.serial,
            host_clients: input.host_clients.clone(),
            private_ranges: input.private_ranges.clone(),
            ..Zone::default()
        };
        for (net_idx, net) in input.networks.iter().enumerate() {
            let net_idx = net_idx as u32;
            let net_name = lower(&net.name);
            zone.client_subnets
                .extend(net.client_subnets.iter().map(|s| (*s, net_idx)));
            zone.internal.push(net.internal);
            let mut names = Names::default();
            for m in &net.members {
                let next = ids.len() as u32;
                let id = *ids.entry(m.id.as_str()).or_insert(next);
                let target = Target {
                    id,
                    addrs: m.addrs.iter().copied().collect(),
                    rank: m.health.rank(),
                    service_of: None,
                };
                let project = m.project.as_deref().map(|p| {
                    let next = projects.len() as u32;
                    *projects.entry(lower(p)).or_insert(next)
                });
                if let Some(project) = project {
                    for a in &m.addrs {
                        zone.client_projects.insert(a.to_canonical(), project);
                    }
                }
                // Compose gives every replica its service name as an alias
                // too; the service entry below is what answers it.
                let is_service = |alias: &str| {
                    project.is_some()
                        && m.service
                            .as_deref()
                            .is_some_and(|s| s.eq_ignore_ascii_case(alias))
                };
                let name = lower(&m.name);
                let nets = container_nets.entry(m.id.as_str()).or_default();
                if !nets.contains(&net_idx) {
                    nets.push(net_idx);
                }
                addrs_of
                    .entry(m.id.as_str())
                    .or_default()
                    .extend(m.addrs.iter().copied());
                for a in &m.addrs {
                    if let Some(ptr) = ptr_text(format!("{name}.{net_name}.{}", zone.domain)) {
                        let entry = zone
                            .ptr
                            .entry(*a)
                            .or_insert_with(|| (ptr, Vec::with_capacity(1)));
                        if !entry.1.contains(&net_idx) {
                            entry.1.push(net_idx);
                        }
                    }
                }
                // Seen from containers on this network.
                push_target(&mut names, name.clone(), &target);
                push_target(&mut names, format!("{name}.{net_name}"), &target);
                // As Docker's resolver: the short id (also the default
                // hostname), and every alias qualified by the network.
                if let Some(short) = short_id(&m.id) {
                    push_target(&mut names, short.to_owned(), &target);
                    push_target(&mut names, format!("{short}.{net_name}"), &target);
                }
                for alias in m.aliases.iter().filter(|a| !is_service(a)) {
                    push_target(&mut names, lower(alias), &target);
                    push_target(&mut names, lower(&format!("{alias}.{net_name}")), &target);
                }
                if let Some(service) = &m.service {
                    let bare = Target {
                        service_of: project,
                        ..target.clone()
                    };
                    push_target(&mut names, lower(service), &bare);
                    if let Some(project) = &m.project {
                        push_target(&mut names, lower(&format!("{service}.{project}")), &target);
                    }
                }
                // Seen from the host, under the domain.
                push_target(&mut zone.host_names, name.clone(), &target);
                push_target(&mut zone.host_names, format!("{name}.{net_name}"), &target);
                for alias in &m.aliases {
                    push_target(
                        &mut zone.host_names,
                        lower(&format!("{alias}.{net_name}")),
                        &target,
                    );
                }
                if let (Some(service), Some(project)) = (&m.service, &m.project) {
                    push_target(
                        &mut zone.host_names,
                        lower(&format!("{service}.{project}")),
                        &target,
                    );
                }
            }
            merge_repeats(&mut names);
            zone.nets.push(names);
        }
        merge_repeats(&mut zone.host_names);
        for (id, addrs) in addrs_of {
            let nets = container_nets.get(id).cloned().unwrap_or_default();
            for a in addrs {
                zone.clients.insert(a, nets.clone());
            }
        }
        for (name, addrs) in &input.static_hosts {
            let name = lower(name.trim_end_matches('.'));
            for a in addrs {
                if let Some(ptr) = ptr_text(name.clone()) {
                    zone.ptr.entry(*a).or_insert_with(|| (ptr, Vec::new()));
                }
            }
            zone.statics.insert(name.into_boxed_str(), addrs.clone());
        }
        for (name, values) in &input.txt {
            let name = lower(name.trim_end_matches('.'));
            // Kept only when it is a valid name and each value fits one
            // character-string (RFC 1035 3.3: at most 255 bytes).
            if fqdn(&name).is_some() && values.iter().all(|v| v.len() <= 255) {
                zone.txt.insert(name.into_boxed_str(), values.clone());
            }
        }
        zone.ingress = input
            .ingress
            .iter()
            .map(|(z, a)| {
                (
                    lower(z.trim_start_matches("*.").trim_end_matches('.')),
                    a.clone(),
                )
            })
            .collect();
        // Longest zone first, so that the most specific zone wins.
        zone.ingress
            .sort_by_key(|(z, _)| std::cmp::Reverse(z.len()));
        zone
    }

    pub fn domain(&self) -> &Name {
        &self.domain_name
    }

    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// Number of names served (per-network, host-side and static).
    pub fn len(&self) -> usize {
        self.nets.iter().map(HashMap::len).sum::<usize>()
            + self.host_names.len()
            + self.statics.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Is this client a host-side client?
    pub fn is_host_client(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        client.is_loopback()
            || matches!(client, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
            || self.host_clients.iter().any(|n| n.contains(&client))
    }

    /// Answer `qtype` for `qname` as seen by `client`.
    pub fn answer(&self, client: IpAddr, qname: &LowerName, qtype: RecordType) -> Answer {
        let key = lookup_key(qname);
        self.answer_with(client, &key, Some(qname), qtype)
            .unwrap_or(Answer::Forward)
    }

    /// [`Self::answer`] for a name given as its lookup text: labels joined
    /// by dots, no final dot, ASCII lowercased, other bytes U+FFFD (what
    /// [`lookup_key`] makes of a name). For the UDP fast path, which reads
    /// names off the wire without making a `Name`. None for a reverse
    /// name (`.in-addr.arpa`, `.ip6.arpa`): ask [`Self::answer`].
    pub fn answer_text(&self, client: IpAddr, key: &str, qtype: RecordType) -> Option<Answer> {
        self.answer_with(client, key, None, qtype)
    }

    /// Whether `key` (as for [`Self::answer_text`]) is the domain or under it.
    pub fn in_domain(&self, key: &str) -> bool {
        key == self.domain
            || key
                .strip_suffix(self.domain.as_str())
                .is_some_and(|r| r.ends_with('.'))
    }

    fn answer_with(
        &self,
        client: IpAddr,
        key: &str,
        qname: Option<&LowerName>,
        qtype: RecordType,
    ) -> Option<Answer> {
        // An IPv4 client of a dual-stack socket arrives as ::ffff:a.b.c.d.
        let client = client.to_canonical();
        let container_nets = match self.clients.get(&client) {
            Some(nets) => Some(nets.as_slice()),
            // The host's own addresses (gateways) lie inside the subnets too.
            None if self.is_host_client(client) => None,
            None => match self.subnet_scope(client) {
                Some(nets) => Some(nets),
                None => return Some(Answer::Refused),
            },
        };
        Some(
            match self.lookup(client, container_nets, key, qname, qtype)? {
                // Every network of the client is internal: nothing from outside.
                Answer::Forward
                    if container_nets
                        .is_some_and(|nets| nets.iter().all(|&n| self.is_internal(n))) =>
                {
                    Answer::Refused
                }
                answer => answer,
            },
        )
    }

    /// A compose client asking for a bare service name its own project has
    /// gets its own project's replicas only (others by `SERVICE.PROJECT`).
    fn own_project_first(&self, client: IpAddr, targets: &mut Vec<&Target>) {
        if targets.iter().all(|t| t.service_of.is_none()) {
            return;
        }
        let Some(&own) = self.client_projects.get(&client) else {
            return;
        };
        if targets.iter().any(|t| t.service_of == Some(own)) {
            targets.retain(|t| t.service_of.is_none_or(|p| p == own));
        }
    }

    fn is_internal(&self, net: u32) -> bool {
        self.internal.get(net as usize).copied().unwrap_or(false)
    }

    /// The answer for a client allowed to ask: a container client seeing
    /// `container_nets`, or a host-side client (None).
    /// None: a reverse name, and no `qname` to answer it from.
    fn lookup(
        &self,
        client: IpAddr,
        container_nets: Option<&[u32]>,
        name: &str,
        qname: Option<&LowerName>,
        qtype: RecordType,
    ) -> Option<Answer> {
        if name.ends_with(".in-addr.arpa") || name.ends_with(".ip6.arpa") {
            return Some(self.reverse(container_nets, qname?, qtype));
        }
        Some(self.lookup_forward(client, container_nets, name, qtype))
    }

    fn lookup_forward(
        &self,
        client: IpAddr,
        container_nets: Option<&[u32]>,
        name: &str,
        qtype: RecordType,
    ) -> Answer {
        if let Some(addrs) = self.statics.get(name) {
            return addresses(addrs.iter().copied(), qtype);
        }
        if let Some(values) = self.txt.get(name) {
            return match qtype {
                RecordType::TXT | RecordType::ANY => Answer::Txt(values.clone()),
                _ => Answer::NoData,
            };
        }
        if let Some((_, addrs)) = self.ingress.iter().find(|(zone, _)| {
            name == zone
                || (name.len() > zone.len()
                    && name.ends_with(zone.as_str())
                    && name.as_bytes()[name.len() - zone.len() - 1] == b'.')
        }) {
            return addresses(addrs.iter().copied(), qtype);
        }
        let relative = if name == self.domain {
            Some("")
        } else {
            name.strip_suffix(self.domain.as_str())
                .and_then(|r| r.strip_suffix('.'))
        };
        let found = match container_nets {
            Some(nets) => {
                let key = relative.unwrap_or(name);
                let mut targets: Vec<&Target> = nets
                    .iter()
                    .filter_map(|&n| self.nets.get(n as usize).and_then(|names| names.get(key)))
                    .flatten()
                    .collect();
                self.own_project_first(client, &mut targets);
                (!targets.is_empty()).then(|| live_addrs(&targets))
            }
            None => relative
                .and_then(|rel| self.host_names.get(rel))
                .map(|targets| live_addrs(&targets.iter().collect::<Vec<_>>())),
        };
        if let Some(addrs) = found {
            return addresses(addrs.into_iter(), qtype);
        }
        match relative {
            Some("") if qtype == RecordType::SOA => Answer::Soa,
            Some("") => Answer::NoData,
            Some(_) => Answer::NxDomain,
            None => Answer::Forward,
        }
    }

    /// The network of an unknown client, by the subnet its address is in:
    /// a container that has just started, whose first queries can come
    /// before discovery has seen it.
    fn subnet_scope(&self, client: IpAddr) -> Option<&[u32]> {
        self.client_subnets
            .iter()
            .find(|(s, _)| s.contains(&client))
            .map(|(_, idx)| std::slice::from_ref(idx))
    }

    fn reverse(
        &self,
        container_nets: Option<&[u32]>,
        qname: &LowerName,
        qtype: RecordType,
    ) -> Answer {
        let name: Name = qname.clone().into();
        let Ok(net) = name.parse_arpa_name() else {
            return Answer::Forward;
        };
        let full = net.prefix_len() == net.max_prefix_len();
        let ip = net.addr();
        let visible = |nets: &[u32]| match container_nets {
            None => true,
            Some(client_nets) => nets.is_empty() || nets.iter().any(|n| client_nets.contains(n)),
        };
        if full {
            if let Some((target, nets)) = self.ptr.get(&ip)
                && visible(nets)
            {
                return match (qtype, fqdn(target)) {
                    (RecordType::PTR | RecordType::ANY, Some(target)) => Answer::Ptr(target),
                    _ => Answer::NoData,
                };
            }
        } else if self
            .ptr
            .iter()
            .any(|(a, (_, nets))| net.contains(a) && visible(nets))
        {
            // A partial name (`0.2.10.in-addr.arpa`) above an address the
            // client can see exists as an empty non-terminal: NODATA. An
            // NXDOMAIN would tell a resolver that nothing below it exists
            // (RFC 8020), hiding the address's own PTR.
            return Answer::NoData;
        }
        if self.private_ranges.iter().any(|r| r.contains(&ip)) {
            return Answer::NxDomain;
        }
        Answer::Forward
    }
}

/// The addresses of the best-ranked `targets`, without duplicates:
/// unhealthy and draining ones are left out while a live one remains,
/// draining ones while an unhealthy one remains.
fn live_addrs(targets: &[&Target]) -> Vec<IpAddr> {
    let best = targets.iter().map(|t| t.rank).min().unwrap_or(0);
    let mut addrs = Vec::new();
    for t in targets.iter().filter(|t| t.rank == best) {
        for a in &t.addrs {
            if !addrs.contains(a) {
                addrs.push(*a);
            }
        }
    }
    addrs
}

/// The query name as a zone key: labels joined by dots, no trailing dot.
/// `LowerName` is lower case already. Bytes outside ASCII become U+FFFD, so
/// such names match no key (every key is checked ASCII when built). This
/// is the per-query hot path: no `fmt` machinery.
pub(crate) fn lookup_key(name: &LowerName) -> String {
    let mut key = String::with_capacity(name.len().max(1));
    for (i, label) in name.iter().enumerate() {
        if i > 0 {
            key.push('.');
        }
        for &b in label {
            key.push(if b.is_ascii() {
                char::from(b.to_ascii_lowercase())
            } else {
                '\u{FFFD}'
            });
        }
    }
    key
}

fn addresses(addrs: impl Iterator<Item = IpAddr>, qtype: RecordType) -> Answer {
    let mut out: Vec<IpAddr> = match qtype {
        RecordType::A => addrs.filter(IpAddr::is_ipv4).collect(),
        RecordType::AAAA => addrs.filter(IpAddr::is_ipv6).collect(),
        RecordType::ANY => addrs.collect(),
        _ => return Answer::NoData,
    };
    if out.is_empty() {
        return Answer::NoData;
    }
    out.shuffle(&mut rand::rng());
    Answer::Addrs(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn member(id: &str, name: &str, addrs: &[&str]) -> Member {
        Member {
            id: id.into(),
            name: name.into(),
            addrs: addrs.iter().map(|a| ip(a)).collect(),
            aliases: vec![],
            service: None,
            project: None,
            health: Health::Unknown,
        }
    }

    fn q(zone: &Zone, client: &str, name: &str, t: RecordType) -> Answer {
        zone.answer(ip(client), &LowerName::from_str(name).unwrap(), t)
    }

    fn sorted(a: Answer) -> Vec<IpAddr> {
        match a {
            Answer::Addrs(mut v) => {
                v.sort();
                v
            }
            other => panic!("expected addresses, got {other:?}"),
        }
    }

    fn two_networks() -> Zone {
        let mut web = member("w", "web", &["10.1.0.2"]);
        web.aliases = vec!["www".into()];
        web.service = Some("web".into());
        web.project = Some("shop".into());
        let mut db1 = member("d", "db", &["10.1.0.3"]);
        db1.aliases = vec!["database".into()];
        let db2 = member("d", "db", &["10.2.0.3", "fd00::3"]);
        let other = member("o", "other", &["10.2.0.4"]);
        Zone::build(&ZoneInput {
            domain: "docker.internal".into(),
            ttl: 5,
            networks: vec![
                NetworkInput {
                    name: "front".into(),
                    members: vec![web, db1],
                    ..Default::default()
                },
                NetworkInput {
                    name: "back".into(),
                    members: vec![db2, other],
                    ..Default::default()
                },
            ],
            private_ranges: vec!["10.0.0.0/8".parse().unwrap()],
            ..ZoneInput::default()
        })
    }

    #[test]
    fn a_name_with_one_target_needs_no_heap_block_of_its_own() {
        // The zone's size at 100,000 records is mostly per-name entries.
        assert!(
            std::mem::size_of::<Targets>() <= 64,
            "{}",
            std::mem::size_of::<Targets>()
        );
        assert!(!Targets::new().spilled());
    }

    #[test]
    fn a_name_shared_by_many_containers_on_several_networks_answers_each_address_once() {
        // A compose service name used by 2,000 containers (the cluster
        // namespace makes such names common), each on two networks met
        // in opposite orders, host-side: every address once.
        let svc = |id: usize, a: String| {
            let mut m = member(&format!("c{id}"), &format!("c{id}"), &[&a]);
            m.service = Some("svc".into());
            m.project = Some("p".into());
            m
        };
        let n = 2000usize;
        let addr = |net: usize, i: usize| format!("10.{net}.{}.{}", i / 250, i % 250 + 2);
        let zone = Zone::build(&ZoneInput {
            domain: "docker.internal".into(),
            networks: vec![
                NetworkInput {
                    name: "one".into(),
                    members: (0..n).map(|i| svc(i, addr(1, i))).collect(),
                    client_subnets: vec![],
                    internal: false,
                },
                NetworkInput {
                    name: "two".into(),
                    members: (0..n).rev().map(|i| svc(i, addr(2, i))).collect(),
                    client_subnets: vec![],
                    internal: false,
                },
            ],
            ..ZoneInput::default()
        });
        let mut want: Vec<IpAddr> = (0..n)
            .flat_map(|i| [ip(&addr(1, i)), ip(&addr(2, i))])
            .collect();
        want.sort();
        assert_eq!(
            sorted(q(
                &zone,
                "127.0.0.1",
                "svc.p.docker.internal.",
                RecordType::A
            )),
            want
        );
        // And c7 host-side has both of its addresses, once.
        assert_eq!(
            sorted(q(&zone, "127.0.0.1", "c7.docker.internal.", RecordType::A)),
            vec![ip(&addr(1, 7)), ip(&addr(2, 7))]
        );
    }

    #[test]
    fn alias_resolves_only_inside_its_network() {
        let z = two_networks();
        assert_eq!(
            sorted(q(&z, "10.1.0.2", "database.", RecordType::A)),
            vec![ip("10.1.0.3")]
        );
        assert_eq!(
            q(&z, "10.2.0.4", "database.", RecordType::A),
            Answer::Forward
        );
        assert_eq!(q(&z, "10.2.0.4", "web.", RecordType::A), Answer::Forward);
    }

    #[test]
    fn answers_carry_only_addresses_on_shared_networks() {
        let z = two_networks();
        assert_eq!(
            sorted(q(&z, "10.1.0.2", "db.", RecordType::A)),
            vec![ip("10.1.0.3")]
        );
        assert_eq!(
            sorted(q(&z, "10.2.0.4", "db.", RecordType::A)),
            vec![ip("10.2.0.3")]
        );
        assert_eq!(
            sorted(q(&z, "10.2.0.4", "db.", RecordType::AAAA)),
            vec![ip("fd00::3")]
        );
        // Host-side: every address.
        assert_eq!(
            sorted(q(&z, "127.0.0.1", "db.docker.internal.", RecordType::A)),
            vec![ip("10.1.0.3"), ip("10.2.0.3")]
        );
        assert_eq!(
            sorted(q(
                &z,
                "127.0.0.1",
                "db.back.docker.internal.",
                RecordType::A
            )),
            vec![ip("10.2.0.3")]
        );
    }

    #[test]
    fn compose_and_network_qualified_names() {
        let z = two_networks();
        assert_eq!(
            sorted(q(&z, "10.1.0.3", "web.shop.", RecordType::A)),
            vec![ip("10.1.0.2")]
        );
        assert_eq!(
            sorted(q(&z, "10.1.0.3", "web.front.", RecordType::A)),
            vec![ip("10.1.0.2")]
        );
        assert_eq!(
            sorted(q(
                &z,
                "10.1.0.3",
                "web.shop.docker.internal.",
                RecordType::A
            )),
            vec![ip("10.1.0.2")]
        );
        assert_eq!(
            sorted(q(&z, "::1", "web.shop.docker.internal.", RecordType::A)),
            vec![ip("10.1.0.2")]
        );
        assert_eq!(
            sorted(q(&z, "::1", "www.front.docker.internal.", RecordType::A)),
            vec![ip("10.1.0.2")]
        );
        // Bare aliases are ambiguous from the host.
        assert_eq!(
            q(&z, "::1", "www.docker.internal.", RecordType::A),
            Answer::NxDomain
        );
    }

    #[test]
    fn a_container_on_two_networks_sees_both_from_either_address() {
        let z = two_networks();
        // db is on front (10.1.0.3) and back (10.2.0.3); other is on back only.
        assert_eq!(
            sorted(q(&z, "10.1.0.3", "other.", RecordType::A)),
            vec![ip("10.2.0.4")]
        );
        assert_eq!(
            sorted(q(&z, "10.2.0.3", "web.", RecordType::A)),
            vec![ip("10.1.0.2")]
        );
        assert!(matches!(
            q(&z, "10.1.0.3", "4.0.2.10.in-addr.arpa.", RecordType::PTR),
            Answer::Ptr(_)
        ));
        // ...and still only addresses on networks it shares with the target.
        assert_eq!(
            sorted(q(&z, "10.2.0.4", "db.", RecordType::A)),
            vec![ip("10.2.0.3")]
        );
        // IPv4-mapped sources (dual-stack sockets) are the same client.
        assert_eq!(
            sorted(q(&z, "::ffff:10.2.0.4", "db.", RecordType::A)),
            vec![ip("10.2.0.3")]
        );
        assert_eq!(
            q(&z, "::ffff:192.0.2.1", "example.com.", RecordType::A),
            Answer::Refused
        );
        assert_eq!(
            q(&z, "::ffff:127.0.0.1", "example.com.", RecordType::A),
            Answer::Forward
        );
    }

    #[test]
    fn nodata_nxdomain_soa_and_forward() {
        let z = two_networks();
        assert_eq!(
            q(&z, "127.0.0.1", "web.docker.internal.", RecordType::AAAA),
            Answer::NoData
        );
        assert_eq!(
            q(&z, "127.0.0.1", "web.docker.internal.", RecordType::MX),
            Answer::NoData
        );
        assert_eq!(
            q(&z, "127.0.0.1", "nope.docker.internal.", RecordType::A),
            Answer::NxDomain
        );
        assert_eq!(
            q(&z, "127.0.0.1", "docker.internal.", RecordType::SOA),
            Answer::Soa
        );
        assert_eq!(
            q(&z, "127.0.0.1", "docker.internal.", RecordType::A),
            Answer::NoData
        );
        assert_eq!(
            q(&z, "127.0.0.1", "example.com.", RecordType::A),
            Answer::Forward
        );
        assert_eq!(
            q(&z, "10.1.0.2", "nope.docker.internal.", RecordType::A),
            Answer::NxDomain
        );
    }

    #[test]
    fn an_unknown_client_in_a_client_subnet_is_scoped_to_its_network() {
        let mut input = ZoneInput {
            domain: "docker.internal".into(),
            networks: vec![
                NetworkInput {
                    name: "front".into(),
                    members: vec![member("w", "web", &["10.1.0.2"])],
                    client_subnets: vec!["10.1.0.0/24".parse().unwrap()],
                    ..NetworkInput::default()
                },
                NetworkInput {
                    name: "back".into(),
                    members: vec![member("o", "other", &["10.2.0.4"])],
                    client_subnets: vec!["10.2.0.0/24".parse().unwrap()],
                    ..NetworkInput::default()
                },
            ],
            host_clients: vec!["10.1.0.1/32".parse().unwrap()],
            ..ZoneInput::default()
        };
        let z = Zone::build(&input);
        // 10.1.0.9 is no container yet: a container of `front` just started.
        assert_eq!(
            sorted(q(&z, "10.1.0.9", "web.", RecordType::A)),
            vec![ip("10.1.0.2")]
        );
        assert_eq!(
            sorted(q(&z, "10.1.0.9", "web.docker.internal.", RecordType::A)),
            vec![ip("10.1.0.2")]
        );
        // ...and sees only that network.
        assert_eq!(q(&z, "10.1.0.9", "other.", RecordType::A), Answer::Forward);
        assert_eq!(
            q(&z, "10.1.0.9", "other.docker.internal.", RecordType::A),
            Answer::NxDomain
        );
        // The gateway stays a host-side client.
        assert_eq!(q(&z, "10.1.0.1", "web.", RecordType::A), Answer::Forward);
        assert_eq!(
            sorted(q(&z, "10.1.0.1", "web.docker.internal.", RecordType::A)),
            vec![ip("10.1.0.2")]
        );
        // Outside every subnet: refused, as before.
        assert_eq!(q(&z, "10.3.0.9", "web.", RecordType::A), Answer::Refused);
        input.networks[0].client_subnets.clear();
        let z = Zone::build(&input);
        assert_eq!(q(&z, "10.1.0.9", "web.", RecordType::A), Answer::Refused);
    }

    #[test]
    fn clients_only_on_internal_networks_are_never_forwarded() {
        let input = ZoneInput {
            domain: "docker.internal".into(),
            networks: vec![
                NetworkInput {
                    name: "vault".into(),
                    members: vec![
                        member("s", "shut", &["10.1.0.2"]),
                        member("b", "both", &["10.1.0.3"]),
                    ],
                    client_subnets: vec!["10.1.0.0/24".parse().unwrap()],
                    internal: true,
                },
                NetworkInput {
                    name: "open".into(),
                    members: vec![member("b", "both", &["10.2.0.3"])],
                    ..NetworkInput::default()
                },
            ],
            private_ranges: vec!["10.0.0.0/8".parse().unwrap()],
            ..ZoneInput::default()
        };
        let z = Zone::build(&input);
        assert_eq!(
            sorted(q(&z, "10.1.0.2", "both.", RecordType::A)),
            vec![ip("10.1.0.3")]
        );
        for client in ["10.1.0.2", "10.1.0.9"] {
            assert_eq!(
                q(&z, client, "example.com.", RecordType::A),
                Answer::Refused,
                "{client}"
            );
            assert_eq!(
                q(&z, client, "1.2.0.192.in-addr.arpa.", RecordType::PTR),
                Answer::Refused,
                "{client}"
            );
            assert_eq!(
                q(&z, client, "nope.docker.internal.", RecordType::A),
                Answer::NxDomain,
                "{client}"
            );
        }
        // On an internal network and a normal one: it can reach out anyway.
        assert_eq!(
            q(&z, "10.1.0.3", "example.com.", RecordType::A),
            Answer::Forward
        );
        assert_eq!(
            q(&z, "127.0.0.1", "example.com.", RecordType::A),
            Answer::Forward
        );
    }

    #[test]
    fn a_compose_client_gets_its_own_projects_replicas_for_a_bare_service() {
        let replica = |id: &str, addr: &str, service: &str, project: &str| {
            let mut m = member(id, &format!("{project}-{service}-{id}"), &[addr]);
            m.service = Some(service.into());
            m.project = Some(project.into());
            // Compose adds the service name as a network alias.
            m.aliases = vec![service.into()];
            m
        };
        let z = Zone::build(&ZoneInput {
            domain: "d".into(),
            networks: vec![NetworkInput {
                name: "shared".into(),
                members: vec![
                    replica("a1", "10.0.0.2", "db", "p1"),
                    replica("a2", "10.0.0.3", "db", "p1"),
                    replica("b1", "10.0.0.4", "db", "p2"),
                    replica("c1", "10.0.0.5", "web", "p1"),
                    replica("q1", "10.0.0.6", "cache", "p2"),
                    member("x", "plain", &["10.0.0.9"]),
                ],
                ..NetworkInput::default()
            }],
            ..ZoneInput::default()
        });
        let (p1, p2, all) = (
            vec![ip("10.0.0.2"), ip("10.0.0.3")],
            vec![ip("10.0.0.4")],
            vec![ip("10.0.0.2"), ip("10.0.0.3"), ip("10.0.0.4")],
        );
        assert_eq!(sorted(q(&z, "10.0.0.5", "db.", RecordType::A)), p1);
        assert_eq!(sorted(q(&z, "10.0.0.5", "db.d.", RecordType::A)), p1);
        assert_eq!(sorted(q(&z, "10.0.0.6", "db.", RecordType::A)), p2);
        assert_eq!(sorted(q(&z, "10.0.0.5", "db.p2.", RecordType::A)), p2);
        assert_eq!(sorted(q(&z, "10.0.0.6", "db.p1.", RecordType::A)), p1);
        // Outside compose: every replica, as before.
        assert_eq!(sorted(q(&z, "10.0.0.9", "db.", RecordType::A)), all);
        // A service only another project has: still found.
        assert_eq!(
            sorted(q(&z, "10.0.0.5", "cache.", RecordType::A)),
            vec![ip("10.0.0.6")]
        );
        // From the host, by project.
        assert_eq!(sorted(q(&z, "127.0.0.1", "db.p1.d.", RecordType::A)), p1);
    }

    #[test]
    fn short_ids_and_network_qualified_aliases_resolve_as_with_docker() {
        let id = "3b94bf3df0591c185611f6feeaf948bfe2a2ad41367e483c88d6b741eafb7ee2";
        let mut web = member(id, "web", &["10.1.0.2"]);
        web.aliases = vec!["www".into()];
        let z = Zone::build(&ZoneInput {
            domain: "d".into(),
            networks: vec![NetworkInput {
                name: "front".into(),
                members: vec![web, member("cli", "cli", &["10.1.0.3"])],
                ..NetworkInput::default()
            }],
            ..ZoneInput::default()
        });
        for name in [
            "3b94bf3df059.",
            "3b94bf3df059.front.",
            "3B94BF3DF059.",
            "www.front.",
            "www.front.d.",
        ] {
            assert_eq!(
                sorted(q(&z, "10.1.0.3", name, RecordType::A)),
                vec![ip("10.1.0.2")],
                "{name}"
            );
        }
        // Not a Docker id: no short name made up for it.
        assert_eq!(short_id("cli"), None);
        assert_eq!(short_id("3b94bf3df05z00"), None);
    }

    #[test]
    fn strangers_are_refused() {
        let z = two_networks();
        assert_eq!(
            q(&z, "192.0.2.1", "web.docker.internal.", RecordType::A),
            Answer::Refused
        );
        assert_eq!(
            q(&z, "192.0.2.1", "example.com.", RecordType::A),
            Answer::Refused
        );
        let mut input = ZoneInput {
            domain: "docker.internal".into(),
            ..ZoneInput::default()
        };
        input.host_clients = vec!["192.0.2.0/24".parse().unwrap()];
        let z = Zone::build(&input);
        assert_eq!(
            q(&z, "192.0.2.1", "example.com.", RecordType::A),
            Answer::Forward
        );
    }

    #[test]
    fn ptr_is_scoped_and_private_ranges_are_authoritative() {
        let z = two_networks();
        let expect = Answer::Ptr(Name::from_ascii("db.back.docker.internal.").unwrap());
        assert_eq!(
            q(&z, "127.0.0.1", "3.0.2.10.in-addr.arpa.", RecordType::PTR),
            expect
        );
        assert_eq!(
            q(&z, "10.2.0.4", "3.0.2.10.in-addr.arpa.", RecordType::PTR),
            expect
        );
        // 10.2.0.3 is on `back`, which web (front only) does not share.
        assert_eq!(
            q(&z, "10.1.0.2", "3.0.2.10.in-addr.arpa.", RecordType::PTR),
            Answer::NxDomain
        );
        assert_eq!(
            q(&z, "127.0.0.1", "9.9.9.10.in-addr.arpa.", RecordType::PTR),
            Answer::NxDomain
        );
        assert_eq!(
            q(&z, "127.0.0.1", "1.2.0.192.in-addr.arpa.", RecordType::PTR),
            Answer::Forward
        );
        let v6 = "3.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
        assert!(matches!(
            q(&z, "127.0.0.1", v6, RecordType::PTR),
            Answer::Ptr(_)
        ));
    }

    #[test]
    fn partial_reverse_names_above_a_visible_address_are_empty_non_terminals() {
        let z = two_networks();
        // 10.2.0.3 (db, on `back`) lies under each of these.
        for partial in ["0.2.10.in-addr.arpa.", "2.10.in-addr.arpa."] {
            assert_eq!(
                q(&z, "127.0.0.1", partial, RecordType::PTR),
                Answer::NoData,
                "{partial} from the host"
            );
            assert_eq!(
                q(&z, "10.2.0.4", partial, RecordType::PTR),
                Answer::NoData,
                "{partial} from a container on back"
            );
        }
        // web (front only) sees nothing under 0.2.10: as for the full name.
        assert_eq!(
            q(&z, "10.1.0.2", "0.2.10.in-addr.arpa.", RecordType::PTR),
            Answer::NxDomain
        );
        // Nothing under 9.9.10 in a Docker range.
        assert_eq!(
            q(&z, "127.0.0.1", "9.9.10.in-addr.arpa.", RecordType::PTR),
            Answer::NxDomain
        );
    }

    #[test]
    fn unhealthy_replicas_are_left_out_while_a_healthy_one_remains() {
        let mut a = member("a", "a", &["10.0.0.2"]);
        a.service = Some("api".into());
        let mut b = member("b", "b", &["10.0.0.3"]);
        b.service = Some("api".into());
        b.health = Health::Unhealthy;
        let input = |members| ZoneInput {
            domain: "d".into(),
            networks: vec![NetworkInput {
                name: "n".into(),
                members,
                ..Default::default()
            }],
            ..ZoneInput::default()
        };
        let z = Zone::build(&input(vec![a.clone(), b.clone()]));
        assert_eq!(
            sorted(q(&z, "10.0.0.3", "api.", RecordType::A)),
            vec![ip("10.0.0.2")]
        );
        a.health = Health::Unhealthy;
        let z = Zone::build(&input(vec![a, b]));
        assert_eq!(
            sorted(q(&z, "10.0.0.3", "api.", RecordType::A)),
            vec![ip("10.0.0.2"), ip("10.0.0.3")]
        );
    }

    #[test]
    fn draining_replicas_are_left_out_while_another_remains() {
        let replica = |id: &str, addr: &str, health: Health| {
            let mut m = member(id, id, &[addr]);
            m.aliases = vec!["api".into()];
            m.health = health;
            m
        };
        let zone = |members| {
            Zone::build(&ZoneInput {
                domain: "d".into(),
                networks: vec![NetworkInput {
                    name: "n".into(),
                    members,
                    ..NetworkInput::default()
                }],
                ..ZoneInput::default()
            })
        };
        let z = zone(vec![
            replica("a", "10.0.0.2", Health::Unknown),
            replica("b", "10.0.0.3", Health::Draining),
        ]);
        assert_eq!(
            sorted(q(&z, "10.0.0.3", "api.", RecordType::A)),
            vec![ip("10.0.0.2")]
        );
        // Its own name still answers: nothing else is behind it.
        assert_eq!(
            sorted(q(&z, "10.0.0.2", "b.", RecordType::A)),
            vec![ip("10.0.0.3")]
        );
        // An unhealthy replica is still better than one going away.
        let z = zone(vec![
            replica("a", "10.0.0.2", Health::Unhealthy),
            replica("b", "10.0.0.3", Health::Draining),
        ]);
        assert_eq!(
            sorted(q(&z, "10.0.0.3", "api.", RecordType::A)),
            vec![ip("10.0.0.2")]
        );
        // All draining: all of them, until they are gone.
        let z = zone(vec![
            replica("a", "10.0.0.2", Health::Draining),
            replica("b", "10.0.0.3", Health::Draining),
        ]);
        assert_eq!(
            sorted(q(&z, "10.0.0.3", "api.", RecordType::A)),
            vec![ip("10.0.0.2"), ip("10.0.0.3")]
        );
    }

    #[test]
    fn statics_and_ingress_zones() {
        let z = Zone::build(&ZoneInput {
            domain: "docker.internal".into(),
            static_hosts: [("NAS.lan".to_string(), vec![ip("192.0.2.9")])].into(),
            ingress: vec![
                ("*.apps.example.com".into(), vec![ip("192.0.2.80")]),
                ("example.com".into(), vec![ip("192.0.2.81")]),
            ],
            ..ZoneInput::default()
        });
        assert_eq!(
            sorted(q(&z, "127.0.0.1", "nas.lan.", RecordType::A)),
            vec![ip("192.0.2.9")]
        );
        assert_eq!(
            sorted(q(&z, "127.0.0.1", "shop.apps.example.com.", RecordType::A)),
            vec![ip("192.0.2.80")]
        );
        assert_eq!(
            sorted(q(&z, "127.0.0.1", "apps.example.com.", RecordType::A)),
            vec![ip("192.0.2.80")]
        );
        assert_eq!(
            sorted(q(&z, "127.0.0.1", "www.example.com.", RecordType::A)),
            vec![ip("192.0.2.81")]
        );
        assert_eq!(
            q(&z, "127.0.0.1", "badexample.com.", RecordType::A),
            Answer::Forward
        );
        assert_eq!(
            q(&z, "127.0.0.1", "9.2.0.192.in-addr.arpa.", RecordType::PTR),
            Answer::Ptr(Name::from_ascii("nas.lan.").unwrap())
        );
    }

    #[test]
    fn txt_records_answer_txt_only_and_shadow_the_ingress_wildcard() {
        let z = Zone::build(&ZoneInput {
            domain: "docker.internal".into(),
            ingress: vec![("*.apps.example.com".into(), vec![ip("192.0.2.80")])],
            txt: [
                (
                    "_acme-challenge.APPS.example.com.".to_string(),
                    vec!["token-a".to_string(), "token-b".to_string()],
                ),
                ("bad name!".to_string(), vec!["x".to_string()]),
                (
                    "_acme-challenge.long.apps.example.com".to_string(),
                    vec!["x".repeat(256)],
                ),
            ]
            .into(),
            ..ZoneInput::default()
        });
        let name = "_acme-challenge.apps.example.com.";
        assert_eq!(
            q(&z, "127.0.0.1", name, RecordType::TXT),
            Answer::Txt(vec!["token-a".into(), "token-b".into()])
        );
        // The ingress wildcard would answer A for it: the TXT name wins.
        assert_eq!(q(&z, "127.0.0.1", name, RecordType::A), Answer::NoData);
        // Names not kept (invalid, or a value too long for one string).
        assert_eq!(
            sorted(q(
                &z,
                "127.0.0.1",
                "_acme-challenge.long.apps.example.com.",
                RecordType::A
            )),
            vec![ip("192.0.2.80")]
        );
        // Who may not ask is still refused.
        assert_eq!(
            q(&z, "198.51.100.7", name, RecordType::TXT),
            Answer::Refused
        );
    }

    #[test]
    fn several_replicas_answer_all_addresses_shuffled() {
        let members: Vec<Member> = (2..12)
            .map(|i| {
                let mut m = member(
                    &format!("c{i}"),
                    &format!("c{i}"),
                    &[&format!("10.0.0.{i}")],
                );
                m.service = Some("api".into());
                m
            })
            .collect();
        let z = Zone::build(&ZoneInput {
            domain: "d".into(),
            networks: vec![NetworkInput {
                name: "n".into(),
                members,
                ..Default::default()
            }],
            ..ZoneInput::default()
        });
        let first = q(&z, "10.0.0.2", "api.", RecordType::A);
        assert_eq!(sorted(first.clone()).len(), 10);
        let differs = (0..50).any(|_| q(&z, "10.0.0.2", "api.", RecordType::A) != first);
        assert!(differs, "50 answers in the same order: not shuffled");
    }
}
