//! Cluster networks (`docker network create -d portless`) and their
//! address management: the pure part.
//!
//! A cluster network is a record in etcd ([`NetworkRecord`]), keyed by its
//! subnet (which is also the pool id Docker keeps), with a name bound once
//! Docker has named it, and a VNI of its own. Each host leases blocks of
//! the subnet ([`block_len`], chosen like host subnets with
//! [`crate::plan::pick_subnet`]) and hands out addresses from them; every
//! address is a key of its own, created by compare-and-swap, so an address
//! is never given twice whoever asks. The etcd calls are in
//! `store/networks.rs`; what they decide is decided here, without I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The first VNI handed to cluster networks: the cluster's own network
/// uses `--vni` (default 1), and people pick small numbers by hand.
pub const VNI_FIRST: u32 = 4096;
/// The largest VNI (24 bits).
pub const VNI_LAST: u32 = 0x00ff_ffff;

/// A cluster network as kept in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NetworkRecord {
    /// The Docker network name; None until the creating host learned it
    /// from Docker (the plugin protocol does not carry it).
    #[serde(default)]
    pub name: Option<String>,
    pub subnet: Ipv4Net,
    /// The same on every host.
    pub gateway: Ipv4Addr,
    pub vni: u32,
    /// The host whose Docker created it.
    pub creator: String,
    /// Docker driver options (`-o`) given at creation.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

impl NetworkRecord {
    /// The pool id Docker keeps for this network, and its etcd key part.
    pub fn id(&self) -> String {
        network_id(&self.subnet)
    }

    pub fn encode(&self) -> String {
        // A struct of strings, numbers and maps: cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// None when malformed (or inconsistent): ignored, as a bad host record is.
    pub fn decode(bytes: &[u8]) -> Option<NetworkRecord> {
        let r: NetworkRecord = serde_json::from_slice(bytes).ok()?;
        let ok = r.subnet == r.subnet.trunc()
            && r.subnet.contains(&r.gateway)
            && (VNI_FIRST..=VNI_LAST).contains(&r.vni)
            && r.name.as_deref().is_none_or(valid_network_name);
        ok.then_some(r)
    }
}

/// The id of the network on `subnet` (`10.30.1.0-24`).
pub fn network_id(subnet: &Ipv4Net) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix_len())
}

/// The subnet of a network id.
pub fn parse_network_id(s: &str) -> Option<Ipv4Net> {
    let (ip, len) = s.rsplit_once('-')?;
    let n = Ipv4Net::new(ip.parse().ok()?, len.parse().ok()?).ok()?;
    (n == n.trunc()).then_some(n)
}

/// Docker's rule for network names, and what fits an etcd key.
pub fn valid_network_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Why a request cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("subnet {0} is not a network address with its prefix (did you mean {1}?)")]
    NotNetwork(Ipv4Net, Ipv4Net),
    #[error("subnet {0} is too small: at least a /29")]
    TooSmall(Ipv4Net),
    #[error("subnet {asked} overlaps {what}")]
    Overlaps { asked: Ipv4Net, what: String },
    #[error("no free /{len} left in the network pool {pool}")]
    PoolFull { pool: Ipv4Net, len: u8 },
    #[error("no free VNI left")]
    NoVni,
    #[error("address {addr} is not in network {subnet}")]
    OutOfSubnet { addr: Ipv4Addr, subnet: Ipv4Net },
    #[error("address {addr} is reserved in {subnet} (network, gateway or broadcast address)")]
    Reserved { addr: Ipv4Addr, subnet: Ipv4Net },
    #[error(
        "address {addr} is already in use in network {network} ({})",
        if *for_host { format!("host {host}'s own address there") } else { format!("by a container on host {host}") }
    )]
    InUse {
        addr: Ipv4Addr,
        network: String,
        host: String,
        /// The host's own address in the network, not a container's.
        for_host: bool,
    },
    #[error("no free address left in network {0}")]
    Exhausted(String),
    #[error("network {0} was removed from the cluster")]
    Gone(String),
}

/// Another network the cluster knows, for the overlap checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub subnet: Ipv4Net,
    /// For the message: "network web (10.30.1.0/24)".
    pub what: String,
}

impl fmt::Display for Taken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

fn overlap(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(b) || b.contains(a)
}

/// Check a subnet asked for with `--subnet`: a network address, at least
/// a /29, clear of everything `taken` holds (the other cluster networks,
/// and the cluster range of the hosts' subnets).
pub fn check_subnet(asked: Ipv4Net, taken: &[Taken]) -> Result<(), IpamError> {
    if asked != asked.trunc() {
        return Err(IpamError::NotNetwork(asked, asked.trunc()));
    }
    if asked.prefix_len() > 29 {
        return Err(IpamError::TooSmall(asked));
    }
    if let Some(t) = taken.iter().find(|t| overlap(&t.subnet, &asked)) {
        return Err(IpamError::Overlaps {
            asked,
            what: t.what.clone(),
        });
    }
    Ok(())
}

/// The first /`len` of `pool` that overlaps nothing taken.
pub fn pick_network_subnet(pool: Ipv4Net, len: u8, taken: &[Taken]) -> Result<Ipv4Net, IpamError> {
    let full = || IpamError::PoolFull { pool, len };
    let mut candidates = pool.subnets(len).map_err(|_| full())?;
    candidates
        .find(|n| !taken.iter().any(|t| overlap(&t.subnet, n)))
        .ok_or_else(full)
}

/// The lowest VNI from [`VNI_FIRST`] that no network uses and that is not
/// the cluster network's own.
pub fn pick_vni(used: &BTreeSet<u32>, cluster_vni: u32) -> Result<u32, IpamError> {
    (VNI_FIRST..=VNI_LAST)
        .find(|v| *v != cluster_vni && !used.contains(v))
        .ok_or(IpamError::NoVni)
}

/// The gateway of a network: its first address, the same on every host.
pub fn gateway_of(subnet: &Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// Size of the blocks hosts lease: 16 addresses in a /24, 64 in a /16 and
/// larger networks (up to 1,024 hosts per /16), never less than 8.
pub fn block_len(subnet: &Ipv4Net) -> u8 {
    (subnet.prefix_len() + 4)
        .clamp(26, 29)
        .max(subnet.prefix_len())
}

/// Whether `addr` may be given to a container of `subnet`: inside it, and
/// neither its network, gateway nor broadcast address.
pub fn check_address(subnet: &Ipv4Net, addr: Ipv4Addr) -> Result<(), IpamError> {
    if !subnet.contains(&addr) {
        return Err(IpamError::OutOfSubnet {
            addr,
            subnet: *subnet,
        });
    }
    if addr == subnet.network() || addr == subnet.broadcast() || addr == gateway_of(subnet) {
        return Err(IpamError::Reserved {
            addr,
            subnet: *subnet,
        });
    }
    Ok(())
}

/// The lowest address of `blocks` (this host's, in order) that is usable
/// and not in `used`.
pub fn pick_address(
    subnet: &Ipv4Net,
    blocks: &[Ipv4Net],
    used: &BTreeSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    blocks.iter().find_map(|b| {
        let (lo, hi) = (u32::from(b.network()), u32::from(b.broadcast()));
        (lo..=hi)
            .map(Ipv4Addr::from)
            .find(|a| !used.contains(a) && check_address(subnet, *a).is_ok())
    })
}

/// An address for a host that holds no block of the network (its own
/// address there, see [`AddressHolder::for_host`]): the highest usable
/// address that is in no held block and not in `used`, so that a host
/// without containers on a network takes no block from those with some.
pub fn pick_host_address(
    subnet: &Ipv4Net,
    blocks: &[Ipv4Net],
    used: &BTreeSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let (lo, hi) = (u32::from(subnet.network()), u32::from(subnet.broadcast()));
    (lo..=hi).rev().map(Ipv4Addr::from).find(|a| {
        !used.contains(a)
            && check_address(subnet, *a).is_ok()
            && !blocks.iter().any(|b| b.contains(a))
    })
}

/// Who holds an address: the value of its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AddressHolder {
    pub host: String,
    /// The host's own address in the network (on its bridge, the source of
    /// what the host itself sends to the network's other hosts: its
    /// router, its DNS), not a container's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub for_host: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn taken(s: &str, what: &str) -> Taken {
        Taken {
            subnet: net(s),
            what: what.into(),
        }
    }

    #[test]
    fn a_host_without_blocks_takes_the_highest_free_address_outside_every_block() {
        let s = net("10.112.0.0/24");
        let used: BTreeSet<Ipv4Addr> = ["10.112.0.254".parse().unwrap()].into();
        assert_eq!(
            pick_host_address(&s, &[net("10.112.0.0/28")], &used),
            Some("10.112.0.253".parse().unwrap())
        );
        // the top block held: below it
        assert_eq!(
            pick_host_address(&s, &[net("10.112.0.240/28")], &used),
            Some("10.112.0.239".parse().unwrap())
        );
        // every address in a block or used: none
        assert_eq!(pick_host_address(&s, &[net("10.112.0.0/24")], &used), None);
    }

    #[test]
    fn a_requested_subnet_must_be_clear_of_the_others() {
        let t = vec![
            taken("10.244.0.0/16", "the cluster range 10.244.0.0/16"),
            taken("10.30.1.0/24", "network web (10.30.1.0/24)"),
        ];
        assert_eq!(check_subnet(net("10.30.2.0/24"), &t), Ok(()));
        let e = check_subnet(net("10.30.0.0/16"), &t).unwrap_err();
        assert_eq!(
            e.to_string(),
            "subnet 10.30.0.0/16 overlaps network web (10.30.1.0/24)"
        );
        assert!(matches!(
            check_subnet(net("10.244.7.0/24"), &t),
            Err(IpamError::Overlaps { .. })
        ));
        assert!(matches!(
            check_subnet(net("10.30.2.1/24"), &t),
            Err(IpamError::NotNetwork(..))
        ));
        assert!(matches!(
            check_subnet(net("10.30.2.0/30"), &t),
            Err(IpamError::TooSmall(_))
        ));
    }

    #[test]
    fn subnets_and_vnis_are_picked_clear_of_the_others() {
        let t = vec![taken("10.30.0.0/24", "a"), taken("10.30.2.0/23", "b")];
        assert_eq!(
            pick_network_subnet(net("10.30.0.0/16"), 24, &t),
            Ok(net("10.30.1.0/24"))
        );
        assert_eq!(
            pick_network_subnet(net("10.30.0.0/22"), 23, &t),
            Err(IpamError::PoolFull {
                pool: net("10.30.0.0/22"),
                len: 23
            })
        );
        let used = BTreeSet::from([VNI_FIRST, VNI_FIRST + 2]);
        assert_eq!(pick_vni(&used, 1), Ok(VNI_FIRST + 1));
        assert_eq!(pick_vni(&used, VNI_FIRST + 1), Ok(VNI_FIRST + 3));
    }

    #[test]
    fn addresses_skip_network_gateway_and_broadcast() {
        let s = net("10.30.1.0/24");
        assert_eq!(gateway_of(&s), Ipv4Addr::new(10, 30, 1, 1));
        assert_eq!(block_len(&s), 28);
        assert_eq!(block_len(&net("10.30.0.0/16")), 26);
        assert_eq!(block_len(&net("10.30.1.0/29")), 29);
        let blocks = [net("10.30.1.0/28"), net("10.30.1.240/28")];
        let used = BTreeSet::new();
        assert_eq!(
            pick_address(&s, &blocks, &used),
            Some(Ipv4Addr::new(10, 30, 1, 2))
        );
        let used: BTreeSet<Ipv4Addr> = (2..=15).map(|i| Ipv4Addr::new(10, 30, 1, i)).collect();
        assert_eq!(
            pick_address(&s, &blocks, &used),
            Some(Ipv4Addr::new(10, 30, 1, 240))
        );
        let used: BTreeSet<Ipv4Addr> = (2..=254).map(|i| Ipv4Addr::new(10, 30, 1, i)).collect();
        assert_eq!(pick_address(&s, &blocks, &used), None);
        assert!(check_address(&s, Ipv4Addr::new(10, 30, 1, 255)).is_err());
        assert!(check_address(&s, Ipv4Addr::new(10, 30, 2, 5)).is_err());
        assert!(check_address(&s, Ipv4Addr::new(10, 30, 1, 9)).is_ok());
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let r = NetworkRecord {
            name: Some("web".into()),
            subnet: net("10.30.1.0/24"),
            gateway: Ipv4Addr::new(10, 30, 1, 1),
            vni: VNI_FIRST,
            creator: "10.0.0.1".into(),
            options: BTreeMap::new(),
        };
        assert_eq!(r.id(), "10.30.1.0-24");
        assert_eq!(parse_network_id("10.30.1.0-24"), Some(r.subnet));
        assert_eq!(parse_network_id("10.30.1.5-24"), None);
        assert_eq!(
            NetworkRecord::decode(r.encode().as_bytes()),
            Some(r.clone())
        );
        let mut bad = r.clone();
        bad.gateway = Ipv4Addr::new(10, 9, 9, 9);
        assert_eq!(NetworkRecord::decode(bad.encode().as_bytes()), None);
        let mut bad = r;
        bad.name = Some("../x".into());
        assert_eq!(NetworkRecord::decode(bad.encode().as_bytes()), None);
        assert!(valid_network_name("my-net_1.x"));
        assert!(!valid_network_name("-x"));
        assert!(!valid_network_name(""));
    }

    proptest! {
        /// Whatever the blocks and used addresses, a picked address is
        /// inside one of the blocks, usable, and not used.
        #[test]
        fn a_picked_address_is_free_and_usable(
            len in 20u8..=28,
            third in 0u32..4,
            used_bits in proptest::collection::vec(any::<bool>(), 64),
            nblocks in 1usize..4,
        ) {
            let subnet = Ipv4Net::new(Ipv4Addr::new(10, 40, 0, 0), len).unwrap().trunc();
            let bl = block_len(&subnet);
            let all: Vec<Ipv4Net> = subnet.subnets(bl).unwrap().collect();
            let blocks: Vec<Ipv4Net> = all.iter().skip(third as usize % all.len()).take(nblocks).copied().collect();
            let mut used = BTreeSet::new();
            for (b, bit) in blocks.iter().flat_map(|b| b.hosts()).zip(&used_bits) {
                if *bit { used.insert(b); }
            }
            match pick_address(&subnet, &blocks, &used) {
                Some(a) => {
                    prop_assert!(blocks.iter().any(|b| b.contains(&a)));
                    prop_assert!(!used.contains(&a));
                    prop_assert!(check_address(&subnet, a).is_ok());
                }
                None => {
                    for b in &blocks {
                        for a in (u32::from(b.network())..=u32::from(b.broadcast())).map(Ipv4Addr::from) {
                            prop_assert!(used.contains(&a) || check_address(&subnet, a).is_err());
                        }
                    }
                }
            }
        }

        /// A picked network subnet lies in the pool and overlaps nothing taken.
        #[test]
        fn a_picked_subnet_overlaps_nothing(
            taken_at in proptest::collection::vec((0u32..256, 20u8..=26), 0..12),
            len in 22u8..=26,
        ) {
            let pool = net("10.50.0.0/16");
            let t: Vec<Taken> = taken_at.iter().map(|(o, l)| Taken {
                subnet: Ipv4Net::new(Ipv4Addr::from(u32::from(pool.network()) + (o << 8)), *l).unwrap().trunc(),
                what: String::new(),
            }).collect();
            if let Ok(n) = pick_network_subnet(pool, len, &t) {
                prop_assert!(pool.contains(&n));
                prop_assert!(t.iter().all(|x| !overlap(&x.subnet, &n)));
                prop_assert_eq!(check_subnet(n, &t), Ok(()));
            }
        }
    }
}
