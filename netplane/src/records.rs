//! Container records: what one host tells the others about its containers
//! on a cluster-scope network, so that names and routes cross hosts.
//!
//! Pure: the record type, the checks every record from etcd must pass
//! before anyone answers or routes it (records are untrusted input: any
//! holder of etcd credentials can write any key), and the publishing diff
//! (desired records against what etcd holds) that keeps writes to one per
//! change.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::model::HostRecord;

/// Docker's healthcheck state of a published container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordHealth {
    /// No healthcheck.
    #[default]
    None,
    Starting,
    Healthy,
    Unhealthy,
}

/// One container of one host, as published under
/// `{prefix}containers/{host}/{id}`, bound to the host's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ContainerRecord {
    /// The publishing host's id (as in its `hosts/` record).
    pub host: String,
    /// Docker's container id (64 hex digits).
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// `--network-alias` aliases on the cluster network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Its address on the cluster network: inside the host's leased
    /// subnet. None: it is only on cluster networks (`-d portless`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<Ipv4Addr>,
    /// Its endpoints on cluster networks made with `docker network create
    /// -d portless`, by network name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<NetworkEndpoint>,
    #[serde(default)]
    pub health: RecordHealth,
    /// Being stopped: no new requests, not in DNS answers while another
    /// replica remains.
    #[serde(default)]
    pub draining: bool,
    /// Its `portless.http.*` labels, and no others.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Exposed TCP ports: a route without `portless.http.port` uses the
    /// single one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// When the publisher saw the change this record carries (its Docker
    /// event's time, nanoseconds since the epoch); for the watch-lag
    /// metric only, never compared (see [`ContainerRecord::same_content`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_ns: Option<i64>,
}

/// A container's endpoint on a cluster network (`-d portless`): that
/// network's name on every host, its address there (inside the network's
/// subnet, which the reading host checks against its own copy of the
/// network) and its aliases on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NetworkEndpoint {
    pub network: String,
    pub addr: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

/// Only labels with this prefix travel in records.
pub const LABEL_PREFIX: &str = "portless.http.";

/// Bounds on a record's fields: a record is a few hundred bytes, and one
/// host's mistake (or an attacker's) cannot make every other host hold
/// megabytes.
pub const MAX_ALIASES: usize = 32;
pub const MAX_LABELS: usize = 32;
pub const MAX_PORTS: usize = 64;
pub const MAX_NETWORKS: usize = 16;
pub const MAX_NAME: usize = 128;
pub const MAX_LABEL_VALUE: usize = 1024;
/// etcd values larger than this are refused before decoding.
pub const MAX_RECORD_BYTES: usize = 16 * 1024;

impl ContainerRecord {
    /// Equal in everything but [`ContainerRecord::changed_ns`]: a record
    /// whose content is unchanged is never written again.
    pub fn same_content(&self, other: &ContainerRecord) -> bool {
        let strip = |r: &ContainerRecord| ContainerRecord {
            changed_ns: None,
            ..r.clone()
        };
        strip(self) == strip(other)
    }

    /// The record as stored in etcd.
    pub fn encode(&self) -> String {
        // A struct of strings, numbers and maps with string keys: cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A record from etcd's bytes, unchecked (see [`check`]).
    pub fn decode(bytes: &[u8]) -> Result<ContainerRecord, RecordRefusal> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(RecordRefusal::Malformed(format!(
                "{} bytes, more than {MAX_RECORD_BYTES}",
                bytes.len()
            )));
        }
        serde_json::from_slice(bytes).map_err(|e| RecordRefusal::Malformed(e.to_string()))
    }
}

/// Why a record from etcd is not answered or routed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "kebab-case")]
pub enum RecordRefusal {
    /// Not JSON of a record, or too large.
    Malformed(String),
    /// The key's host or id differs from the record's.
    KeyMismatch(String),
    /// No live host record for its host, or the record is not bound to
    /// that host's lease: someone else wrote it.
    NotTheHosts(String),
    /// Its address is outside the host's leased subnet (or is the subnet's
    /// network, gateway or broadcast address).
    AddressOutsideSubnet(String),
    /// A name, alias, label or port that is not allowed.
    BadField(String),
}

impl RecordRefusal {
    /// A short stable name, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            RecordRefusal::Malformed(_) => "malformed",
            RecordRefusal::KeyMismatch(_) => "key-mismatch",
            RecordRefusal::NotTheHosts(_) => "not-the-hosts",
            RecordRefusal::AddressOutsideSubnet(_) => "address-outside-subnet",
            RecordRefusal::BadField(_) => "bad-field",
        }
    }
}

impl fmt::Display for RecordRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordRefusal::Malformed(d) => write!(f, "malformed record: {d}"),
            RecordRefusal::KeyMismatch(d) => write!(f, "key does not match the record: {d}"),
            RecordRefusal::NotTheHosts(d) => write!(f, "not written by its host: {d}"),
            RecordRefusal::AddressOutsideSubnet(d) => {
                write!(f, "address outside the host's subnet: {d}")
            }
            RecordRefusal::BadField(d) => write!(f, "bad field: {d}"),
        }
    }
}

/// A Docker name, alias, compose project or service: what Docker accepts
/// for container names (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`), bounded.
pub fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// The checks of one record, read from key `containers/{key_host}/{key_id}`
/// bound to etcd lease `lease`, against the live host records (`hosts`:
/// id → record and the lease its `hosts/` key is bound to).
pub fn check(
    record: &ContainerRecord,
    key_host: &str,
    key_id: &str,
    lease: i64,
    hosts: &BTreeMap<String, (HostRecord, i64)>,
) -> Result<(), RecordRefusal> {
    if record.host != key_host || record.id != key_id {
        return Err(RecordRefusal::KeyMismatch(format!(
            "key {key_host}/{key_id}, record {}/{}",
            record.host, record.id
        )));
    }
    let Some((host, host_lease)) = hosts.get(key_host) else {
        return Err(RecordRefusal::NotTheHosts(format!(
            "no live host {key_host}"
        )));
    };
    if lease == 0 || lease != *host_lease {
        return Err(RecordRefusal::NotTheHosts(format!(
            "bound to lease {lease:x}, host {key_host} holds lease {host_lease:x}"
        )));
    }
    if let Some(addr) = record.addr {
        let subnet = host.subnet;
        let a = u32::from(addr);
        let net = u32::from(subnet.network());
        let bcast = u32::from(subnet.broadcast());
        // .0 is the VTEP's, .1 the gateway's, the last the broadcast.
        if !subnet.contains(&addr) || a <= net + 1 || a == bcast {
            return Err(RecordRefusal::AddressOutsideSubnet(format!(
                "{addr} is not a container address of {subnet}"
            )));
        }
    } else if record.networks.is_empty() {
        return Err(RecordRefusal::BadField(
            "no address: neither on the cluster network nor on a cluster network".into(),
        ));
    }
    if record.networks.len() > MAX_NETWORKS {
        return Err(RecordRefusal::BadField(format!(
            "{} networks, more than {MAX_NETWORKS}",
            record.networks.len()
        )));
    }
    for n in &record.networks {
        if !crate::ipam::valid_network_name(&n.network) {
            return Err(RecordRefusal::BadField(format!("network {:?}", n.network)));
        }
        if n.aliases.len() > MAX_ALIASES {
            return Err(RecordRefusal::BadField(format!(
                "{} aliases on {}, more than {MAX_ALIASES}",
                n.aliases.len(),
                n.network
            )));
        }
        if let Some(a) = n.aliases.iter().find(|a| !valid_name(a)) {
            return Err(RecordRefusal::BadField(format!("alias {a:?}")));
        }
        // The address's subnet is the network's: checked where the network
        // is known (the reading host's copy of it).
        if host.subnet.contains(&n.addr) {
            return Err(RecordRefusal::AddressOutsideSubnet(format!(
                "{} on {} is inside the host's cluster network subnet",
                n.addr, n.network
            )));
        }
    }
    if !valid_id(&record.id) {
        return Err(RecordRefusal::BadField(format!(
            "id {:?} is not 64 hex digits",
            record.id
        )));
    }
    if !valid_name(&record.name) {
        return Err(RecordRefusal::BadField(format!("name {:?}", record.name)));
    }
    for (what, v) in [("project", &record.project), ("service", &record.service)] {
        if let Some(v) = v
            && !valid_name(v)
        {
            return Err(RecordRefusal::BadField(format!("{what} {v:?}")));
        }
    }
    if record.aliases.len() > MAX_ALIASES {
        return Err(RecordRefusal::BadField(format!(
            "{} aliases, more than {MAX_ALIASES}",
            record.aliases.len()
        )));
    }
    if let Some(a) = record.aliases.iter().find(|a| !valid_name(a)) {
        return Err(RecordRefusal::BadField(format!("alias {a:?}")));
    }
    if record.labels.len() > MAX_LABELS {
        return Err(RecordRefusal::BadField(format!(
            "{} labels, more than {MAX_LABELS}",
            record.labels.len()
        )));
    }
    for (k, v) in &record.labels {
        if !k.starts_with(LABEL_PREFIX) || k.len() > MAX_NAME {
            return Err(RecordRefusal::BadField(format!(
                "label {k:?} (only {LABEL_PREFIX}* labels travel)"
            )));
        }
        if v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return Err(RecordRefusal::BadField(format!("value of label {k}")));
        }
    }
    if record.ports.len() > MAX_PORTS || record.ports.contains(&0) {
        return Err(RecordRefusal::BadField("ports".into()));
    }
    Ok(())
}

/// One write of the publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PubOp {
    Put(Box<ContainerRecord>),
    Delete(String),
}

impl PubOp {
    pub fn id(&self) -> &str {
        match self {
            PubOp::Put(r) => &r.id,
            PubOp::Delete(id) => id,
        }
    }
}

/// What etcd holds of this host's own records: the record and the lease it
/// is bound to.
pub type Published = BTreeMap<String, (ContainerRecord, i64)>;

/// The writes that make etcd hold exactly `desired` under `lease`: a put
/// for every record that is new, changed, or bound to another lease (an
/// expired one), a delete for every record no longer desired. Unchanged
/// records are not written. Sorted by container id.
pub fn publish_ops(
    desired: &BTreeMap<String, ContainerRecord>,
    published: &Published,
    lease: i64,
) -> Vec<PubOp> {
    let mut ops = Vec::new();
    for (id, want) in desired {
        match published.get(id) {
            Some((have, l)) if *l == lease && have.same_content(want) => {}
            _ => ops.push(PubOp::Put(Box::new(want.clone()))),
        }
    }
    for id in published.keys() {
        if !desired.contains_key(id) {
            ops.push(PubOp::Delete(id.clone()));
        }
    }
    ops.sort_by(|a, b| a.id().cmp(b.id()));
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Mac, Mode};

    pub(crate) fn id(n: u8) -> String {
        format!("{:064x}", n)
    }

    fn host(id: &str, subnet: &str) -> HostRecord {
        HostRecord {
            id: id.into(),
            subnet: subnet.parse().unwrap(),
            underlay: Ipv4Addr::new(192, 0, 2, 1),
            vtep_mac: Mac::for_vtep(Ipv4Addr::new(192, 0, 2, 1)),
            mode: Mode::Vxlan,
            vxlan_port: 4789,
            hostname: String::new(),
        }
    }

    fn rec(host: &str, n: u8, addr: [u8; 4]) -> ContainerRecord {
        ContainerRecord {
            host: host.into(),
            id: id(n),
            name: format!("web-{n}"),
            project: Some("shop".into()),
            service: Some("web".into()),
            aliases: vec!["www".into()],
            addr: Some(Ipv4Addr::from(addr)),
            networks: Vec::new(),
            health: RecordHealth::Healthy,
            draining: false,
            labels: BTreeMap::from([("portless.http.host".into(), "shop.example.com".into())]),
            ports: vec![80],
            changed_ns: Some(1),
        }
    }

    fn hosts() -> BTreeMap<String, (HostRecord, i64)> {
        BTreeMap::from([("b".to_owned(), (host("b", "10.244.2.0/24"), 7))])
    }

    #[test]
    fn a_good_record_passes() {
        let r = rec("b", 1, [10, 244, 2, 5]);
        assert_eq!(check(&r, "b", &id(1), 7, &hosts()), Ok(()));
    }

    #[test]
    fn forged_records_are_refused_with_their_reason() {
        let h = hosts();
        let ok = rec("b", 1, [10, 244, 2, 5]);
        let kind = |r: &ContainerRecord, key_host: &str, lease: i64| {
            check(r, key_host, &r.id.clone(), lease, &h)
                .err()
                .map(|e| e.kind())
        };
        // Address outside the publisher's subnet, or its reserved ones.
        for addr in [
            [10, 244, 3, 5],
            [10, 244, 2, 0],
            [10, 244, 2, 1],
            [10, 244, 2, 255],
        ] {
            let r = ContainerRecord {
                addr: Some(Ipv4Addr::from(addr)),
                ..ok.clone()
            };
            assert_eq!(kind(&r, "b", 7), Some("address-outside-subnet"), "{addr:?}");
        }
        // Only on cluster networks (`-d portless`): no cluster network
        // address, but one on a network; neither is refused.
        let shop = NetworkEndpoint {
            network: "shop".into(),
            addr: Ipv4Addr::new(10, 112, 0, 18),
            aliases: vec!["db".into()],
        };
        let only_nets = ContainerRecord {
            addr: None,
            networks: vec![shop.clone()],
            ..ok.clone()
        };
        assert_eq!(kind(&only_nets, "b", 7), None);
        let nothing = ContainerRecord {
            addr: None,
            ..ok.clone()
        };
        assert_eq!(kind(&nothing, "b", 7), Some("bad-field"));
        // A bad network name or alias, too many networks, or a network
        // address inside the host's cluster network subnet.
        for bad in [
            NetworkEndpoint {
                network: "-x".into(),
                ..shop.clone()
            },
            NetworkEndpoint {
                aliases: vec!["a b".into()],
                ..shop.clone()
            },
        ] {
            let r = ContainerRecord {
                networks: vec![bad.clone()],
                ..ok.clone()
            };
            assert_eq!(kind(&r, "b", 7), Some("bad-field"), "{bad:?}");
        }
        let r = ContainerRecord {
            networks: vec![shop.clone(); MAX_NETWORKS + 1],
            ..ok.clone()
        };
        assert_eq!(kind(&r, "b", 7), Some("bad-field"));
        let r = ContainerRecord {
            networks: vec![NetworkEndpoint {
                addr: Ipv4Addr::new(10, 244, 2, 9),
                ..shop
            }],
            ..ok.clone()
        };
        assert_eq!(kind(&r, "b", 7), Some("address-outside-subnet"));
        // Claiming another host's id: the key says b, the record c.
        let r = ContainerRecord {
            host: "c".into(),
            ..ok.clone()
        };
        assert_eq!(kind(&r, "b", 7), Some("key-mismatch"));
        // Written under b's key but not with b's lease.
        assert_eq!(kind(&ok, "b", 8), Some("not-the-hosts"));
        assert_eq!(kind(&ok, "b", 0), Some("not-the-hosts"));
        // A host nobody leased.
        let r = ContainerRecord {
            host: "x".into(),
            ..ok.clone()
        };
        assert_eq!(kind(&r, "x", 7), Some("not-the-hosts"));
        // Bad fields.
        for bad in [
            ContainerRecord {
                name: "bad name".into(),
                ..ok.clone()
            },
            ContainerRecord {
                name: String::new(),
                ..ok.clone()
            },
            ContainerRecord {
                name: "x".repeat(MAX_NAME + 1),
                ..ok.clone()
            },
            ContainerRecord {
                aliases: vec!["evil\u{0}".into()],
                ..ok.clone()
            },
            ContainerRecord {
                service: Some("-x".into()),
                ..ok.clone()
            },
            ContainerRecord {
                labels: BTreeMap::from([("com.other".into(), "x".into())]),
                ..ok.clone()
            },
            ContainerRecord {
                labels: BTreeMap::from([("portless.http.host".into(), "a\nb".into())]),
                ..ok.clone()
            },
            ContainerRecord {
                ports: vec![0],
                ..ok.clone()
            },
        ] {
            assert_eq!(kind(&bad, "b", 7), Some("bad-field"), "{bad:?}");
        }
        let r = ContainerRecord {
            id: "zz".into(),
            ..ok.clone()
        };
        assert_eq!(
            check(&r, "b", "zz", 7, &h).err().map(|e| e.kind()),
            Some("bad-field")
        );
    }

    #[test]
    fn records_round_trip_and_oversized_ones_are_refused() {
        let r = rec("b", 1, [10, 244, 2, 5]);
        assert_eq!(ContainerRecord::decode(r.encode().as_bytes()), Ok(r));
        assert!(matches!(
            ContainerRecord::decode(b"{\"host\":1}"),
            Err(RecordRefusal::Malformed(_))
        ));
        let big = vec![b' '; MAX_RECORD_BYTES + 1];
        assert!(matches!(
            ContainerRecord::decode(&big),
            Err(RecordRefusal::Malformed(_))
        ));
    }

    #[test]
    fn only_changes_are_written() {
        let a = rec("me", 1, [10, 244, 1, 5]);
        let b = rec("me", 2, [10, 244, 1, 6]);
        let c = rec("me", 3, [10, 244, 1, 7]);
        let desired = BTreeMap::from([(a.id.clone(), a.clone()), (b.id.clone(), b.clone())]);
        // Nothing published yet: everything is put.
        assert_eq!(publish_ops(&desired, &Published::new(), 5).len(), 2);
        // The same content, another event time: nothing to write.
        let published: Published = BTreeMap::from([
            (
                a.id.clone(),
                (
                    ContainerRecord {
                        changed_ns: Some(99),
                        ..a.clone()
                    },
                    5,
                ),
            ),
            (b.id.clone(), (b.clone(), 5)),
            (c.id.clone(), (c.clone(), 5)),
        ]);
        assert_eq!(
            publish_ops(&desired, &published, 5),
            vec![PubOp::Delete(c.id.clone())]
        );
        // A changed record (draining now) and one under an old lease.
        let mut desired2 = desired.clone();
        desired2.insert(
            a.id.clone(),
            ContainerRecord {
                draining: true,
                ..a.clone()
            },
        );
        let mut published2 = published.clone();
        published2.insert(b.id.clone(), (b.clone(), 4));
        published2.remove(&c.id);
        let ops = publish_ops(&desired2, &published2, 5);
        assert_eq!(ops.len(), 2);
        assert!(ops.iter().all(|o| matches!(o, PubOp::Put(_))));
    }
}
