//! One namespace across hosts (cluster mode): this host's containers on the
//! cluster network and on cluster networks (`-d portless`) become
//! container records in etcd, and the other hosts' records become
//! containers of the catalog, on this host's copies of those networks.
//! The merged catalog is the one snapshot the DNS zone and the
//! route table are built from, so names and routes cross hosts with no
//! special case in either.
//!
//! Pure conversions ([`local_records`], [`merge`]) and the task that runs
//! them on every change of either side ([`run`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use ipnet::IpNet;

use portless_netplane::membership::{HostContainers, RemoteView};
use portless_netplane::records::{self, ContainerRecord, NetworkEndpoint, RecordHealth};
use tokio::sync::watch;

use crate::catalog::Snapshot;
use crate::catalog::{Catalog, Container, Endpoint, Health, RemoteHost};
use crate::plugin;

/// This host's containers on the cluster network `network` or on cluster
/// networks (`-d portless`), as records (by container id). `changed_ns` is
/// stamped on each (the time of the change that produced this catalog);
/// it never causes a write by itself.
pub fn local_records(
    catalog: &Catalog,
    network: &str,
    changed_ns: i64,
) -> BTreeMap<String, ContainerRecord> {
    let mut out = BTreeMap::new();
    for c in catalog.containers.values() {
        // The netplane is IPv4.
        let cluster = c
            .endpoints
            .iter()
            .find(|e| e.network_name == network)
            .filter(|e| e.ipv4.is_some());
        let networks: Vec<NetworkEndpoint> = c
            .endpoints
            .iter()
            .filter(|e| {
                catalog
                    .networks
                    .get(&e.network_id)
                    .is_some_and(|n| n.driver == plugin::DRIVER)
            })
            .filter_map(|e| {
                Some(NetworkEndpoint {
                    network: e.network_name.clone(),
                    addr: e.ipv4?,
                    aliases: e
                        .aliases
                        .iter()
                        .take(records::MAX_ALIASES)
                        .cloned()
                        .collect(),
                })
            })
            // Within what every host accepts (more would have the whole
            // record refused, its other names with it).
            .take(records::MAX_NETWORKS)
            .collect();
        if cluster.is_none() && networks.is_empty() {
            continue;
        }
        out.insert(
            c.id.clone(),
            ContainerRecord {
                // Filled in by the agent.
                host: String::new(),
                id: c.id.clone(),
                name: c.name.clone(),
                project: c.compose_project.clone(),
                service: c.compose_service.clone(),
                aliases: cluster.map(|e| e.aliases.clone()).unwrap_or_default(),
                addr: cluster.and_then(|e| e.ipv4),
                networks,
                health: match c.health {
                    Health::None => RecordHealth::None,
                    Health::Starting => RecordHealth::Starting,
                    Health::Healthy => RecordHealth::Healthy,
                    Health::Unhealthy => RecordHealth::Unhealthy,
                },
                draining: c.stopping,
                labels: c
                    .labels
                    .iter()
                    .filter(|(k, _)| k.starts_with(records::LABEL_PREFIX))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                ports: c.exposed_tcp_ports.clone(),
                changed_ns: Some(changed_ns),
            },
        );
    }
    out
}

/// This host's networks that remote containers join: the cluster network
/// (its id, or a stand-in while it does not exist, so that host-side
/// names still answer) and the cluster networks (`-d portless`) by name,
/// with their ids and subnets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct LocalNets {
    cluster: String,
    networks: BTreeMap<String, (String, Vec<IpNet>)>,
}

impl LocalNets {
    fn of(local: &Catalog, network: &str) -> LocalNets {
        LocalNets {
            cluster: local
                .networks
                .values()
                .find(|n| n.name == network)
                .map(|n| n.id.clone())
                .unwrap_or_else(|| format!("cluster:{network}")),
            networks: local
                .networks
                .values()
                .filter(|n| n.driver == plugin::DRIVER)
                .map(|n| (n.name.clone(), (n.id.clone(), n.subnets.clone())))
                .collect(),
        }
    }
}

/// Whether `a` may be a container's address in cluster network `subnet`:
/// inside it, and neither its network address, its gateway (the first
/// address, the same on every host) nor its broadcast address.
fn container_address(subnet: &IpNet, a: std::net::Ipv4Addr) -> bool {
    let IpNet::V4(s) = subnet else { return false };
    s.contains(&a)
        && a != s.network()
        && a != s.broadcast()
        && a != portless_netplane::ipam::gateway_of(&s.trunc())
}

/// A remote record as a container of this host's networks: the cluster
/// network, and each cluster network (`-d portless`) this host has too,
/// when the address is a container address of its subnet (others are
/// left out: a record cannot put a name into a network it is not on, nor
/// point one at the gateway, which is every host's own).
fn container_of(rec: &ContainerRecord, host: &str, nets: &LocalNets, network: &str) -> Container {
    let mut endpoints = Vec::new();
    if let Some(addr) = rec.addr {
        endpoints.push(Endpoint {
            network_id: nets.cluster.clone(),
            network_name: network.to_owned(),
            ipv4: Some(addr),
            ipv6: None,
            aliases: rec.aliases.clone(),
        });
    }
    for ep in &rec.networks {
        let Some((id, subnets)) = nets.networks.get(&ep.network) else {
            continue;
        };
        if !subnets.iter().any(|s| container_address(s, ep.addr)) {
            continue;
        }
        endpoints.push(Endpoint {
            network_id: id.clone(),
            network_name: ep.network.clone(),
            ipv4: Some(ep.addr),
            ipv6: None,
            aliases: ep.aliases.clone(),
        });
    }
    Container {
        id: rec.id.clone(),
        name: rec.name.clone(),
        labels: rec.labels.clone(),
        health: match rec.health {
            RecordHealth::None => Health::None,
            RecordHealth::Starting => Health::Starting,
            RecordHealth::Healthy => Health::Healthy,
            RecordHealth::Unhealthy => Health::Unhealthy,
        },
        stopping: rec.draining,
        stop_signal: None,
        exposed_tcp_ports: rec.ports.clone(),
        compose_project: rec.project.clone(),
        compose_service: rec.service.clone(),
        endpoints,
        host: Some(host.to_owned()),
    }
}

/// Converted remote hosts, reused while their records and this host's
/// networks stay the same.
#[derive(Default)]
pub struct Converted {
    nets: LocalNets,
    hosts: BTreeMap<String, (Arc<HostContainers>, Arc<RemoteHost>)>,
}

/// The local catalog with every remote host's containers added. Only
/// hosts whose records changed are converted again. Returns the newest
/// `changed_ns` among the records of changed hosts (for the event-to-answer
/// measure), if any.
pub fn merge(
    local: &Catalog,
    remote: &RemoteView,
    network: &str,
    cache: &mut Converted,
) -> (Catalog, Option<i64>) {
    let nets = LocalNets::of(local, network);
    if nets != cache.nets {
        cache.hosts.clear();
        cache.nets = nets.clone();
    }
    cache.hosts.retain(|h, _| remote.contains_key(h));
    let mut newest: Option<i64> = None;
    let mut merged = BTreeMap::new();
    for (host, hc) in remote {
        let reuse = cache
            .hosts
            .get(host)
            .filter(|(src, _)| Arc::ptr_eq(src, hc))
            .map(|(_, conv)| conv.clone());
        let conv = match reuse {
            Some(c) => c,
            None => {
                for r in hc.records.values() {
                    newest = newest.max(r.changed_ns);
                }
                let conv = Arc::new(RemoteHost {
                    id: host.clone(),
                    hostname: hc.host.hostname.clone(),
                    containers: hc
                        .records
                        .values()
                        .map(|r| container_of(r, host, &nets, network))
                        .collect(),
                });
                cache.hosts.insert(host.clone(), (hc.clone(), conv.clone()));
                conv
            }
        };
        merged.insert(host.clone(), conv);
    }
    let catalog = Catalog {
        networks: local.networks.clone(),
        containers: local.containers.clone(),
        remote: merged,
    };
    (catalog, newest)
}

/// Follow both sides: publish this host's records on every local change,
/// and the merged catalog on every change of either side.
pub async fn run(
    mut local: watch::Receiver<Snapshot>,
    mut remote: watch::Receiver<Arc<RemoteView>>,
    publisher: watch::Sender<BTreeMap<String, ContainerRecord>>,
    out: watch::Sender<Snapshot>,
    network: String,
) {
    let mut cache = Converted::default();
    // The channel's first value is an empty catalog from before discovery's
    // first listing: publishing it would delete this host's records from
    // etcd until the listing came. Records are published once discovery
    // has spoken, and its first word is always sent (even when it is "no
    // containers", so that records left from before a restart go).
    // (`changed()` below marks what it saw as seen: ask before the loop.)
    let mut discovered = local.has_changed().unwrap_or(false);
    let mut announced = false;
    loop {
        let snap = local.borrow_and_update().clone();
        let view = remote.borrow_and_update().clone();
        let changed_ns = snap.event_time_ns.unwrap_or_else(now_ns);
        let records = local_records(&snap.catalog, &network, changed_ns);
        if discovered && !announced {
            announced = true;
            publisher.send_replace(records);
        } else if discovered {
            publisher.send_if_modified(|cur| {
                // The stamps differ on every change; only content counts.
                let same = cur.len() == records.len()
                    && cur
                        .iter()
                        .zip(&records)
                        .all(|((a, x), (b, y))| a == b && x.same_content(y));
                if !same {
                    *cur = records;
                }
                !same
            });
        }
        let (catalog, newest) = merge(&snap.catalog, &view, &network, &mut cache);
        out.send_replace(Snapshot {
            catalog: Arc::new(catalog),
            event_time_ns: snap.event_time_ns.max(newest),
        });
        tokio::select! {
            r = local.changed() => {
                if r.is_err() {
                    return;
                }
                discovered = true;
            }
            r = remote.changed() => if r.is_err() { return },
        }
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use portless_netplane::{HostRecord, Mac, Mode};

    use super::*;
    use crate::catalog::Network;

    fn local_catalog() -> Catalog {
        let mut cat = Catalog::default();
        for (id, name, driver, subnet) in [
            ("n-pl", "portless", "bridge", "10.244.1.0/24"),
            ("n-app", "app", "bridge", "172.20.0.0/16"),
            ("n-shop", "shop", "portless", "10.112.0.0/24"),
        ] {
            cat.networks.insert(
                id.into(),
                Network {
                    id: id.into(),
                    name: name.into(),
                    driver: driver.into(),
                    subnets: vec![subnet.parse().unwrap()],
                    gateways: vec![],
                    internal: false,
                },
            );
        }
        let c = |id: &str, name: &str, eps: Vec<Endpoint>| Container {
            id: id.into(),
            name: name.into(),
            labels: BTreeMap::from([
                ("portless.http.host".into(), "shop.example.com".into()),
                ("com.example.secret".into(), "x".into()),
            ]),
            health: Health::Healthy,
            stopping: true,
            stop_signal: None,
            exposed_tcp_ports: vec![8080],
            compose_project: Some("shop".into()),
            compose_service: Some("web".into()),
            endpoints: eps,
            host: None,
        };
        let ep = |net: &str, name: &str, a: [u8; 4]| Endpoint {
            network_id: net.into(),
            network_name: name.into(),
            ipv4: Some(Ipv4Addr::from(a)),
            ipv6: None,
            aliases: vec!["www".into()],
        };
        cat.containers.insert(
            "c1".into(),
            c(
                "c1",
                "web-1",
                vec![
                    ep("n-app", "app", [172, 20, 0, 2]),
                    ep("n-pl", "portless", [10, 244, 1, 2]),
                    ep("n-shop", "shop", [10, 112, 0, 2]),
                ],
            ),
        );
        // Only on a cluster network (`-d portless`).
        cat.containers.insert(
            "c3".into(),
            c("c3", "db", vec![ep("n-shop", "shop", [10, 112, 0, 3])]),
        );
        // Only on a host-local network: never published.
        cat.containers.insert(
            "c2".into(),
            c("c2", "private", vec![ep("n-app", "app", [172, 20, 0, 3])]),
        );
        cat
    }

    #[test]
    fn only_cluster_network_containers_are_published_with_only_their_routing_labels() {
        let recs = local_records(&local_catalog(), "portless", 7);
        assert_eq!(recs.keys().collect::<Vec<_>>(), vec!["c1", "c3"]);
        let shop = |a: [u8; 4]| NetworkEndpoint {
            network: "shop".into(),
            addr: Ipv4Addr::from(a),
            aliases: vec!["www".into()],
        };
        let db = &recs["c3"];
        assert_eq!(db.addr, None);
        assert!(db.aliases.is_empty());
        assert_eq!(db.networks, vec![shop([10, 112, 0, 3])]);
        let r = &recs["c1"];
        assert_eq!(r.addr, Some(Ipv4Addr::new(10, 244, 1, 2)));
        assert_eq!(r.networks, vec![shop([10, 112, 0, 2])]);
        assert_eq!(r.aliases, vec!["www".to_owned()]);
        assert_eq!(r.service.as_deref(), Some("web"));
        assert!(r.draining);
        assert_eq!(r.health, RecordHealth::Healthy);
        assert_eq!(r.ports, vec![8080]);
        assert_eq!(
            r.labels.keys().collect::<Vec<_>>(),
            vec!["portless.http.host"]
        );
        assert_eq!(r.changed_ns, Some(7));
    }

    #[tokio::test]
    async fn records_are_published_only_once_discovery_has_listed_even_when_empty() {
        use std::time::Duration;
        use tokio::time::timeout;
        for (first, want) in [(local_catalog(), 2usize), (Catalog::default(), 0)] {
            let (local_tx, local_rx) = watch::channel(Snapshot::default());
            let (_remote_tx, remote_rx) = watch::channel(Arc::new(RemoteView::new()));
            let (pub_tx, mut pub_rx) = watch::channel(BTreeMap::new());
            let (out_tx, _out_rx) = watch::channel(Snapshot::default());
            let task = tokio::spawn(run(local_rx, remote_rx, pub_tx, out_tx, "portless".into()));
            // The empty start value is not discovery's word: nothing sent.
            assert!(
                timeout(Duration::from_millis(200), pub_rx.changed())
                    .await
                    .is_err(),
                "records published before discovery listed"
            );
            local_tx.send_replace(Snapshot {
                catalog: Arc::new(first),
                ..Snapshot::default()
            });
            timeout(Duration::from_secs(5), pub_rx.changed())
                .await
                .expect("discovery's first catalog was never published")
                .expect("publisher open");
            assert_eq!(pub_rx.borrow_and_update().len(), want);
            task.abort();
        }
    }

    fn view(records: &[ContainerRecord]) -> RemoteView {
        let hr = HostRecord {
            id: "b".into(),
            subnet: "10.244.2.0/24".parse().unwrap(),
            underlay: Ipv4Addr::new(192, 0, 2, 2),
            vtep_mac: Mac::for_vtep(Ipv4Addr::new(192, 0, 2, 2)),
            mode: Mode::Vxlan,
            vxlan_port: 4789,
            hostname: "host-b".into(),
        };
        RemoteView::from([(
            "b".to_owned(),
            Arc::new(HostContainers {
                host: hr,
                records: records
                    .iter()
                    .map(|r| (r.id.clone(), Arc::new(r.clone())))
                    .collect(),
            }),
        )])
    }

    #[test]
    fn remote_records_join_this_hosts_cluster_network_and_are_reused_until_they_change() {
        let mut rec = local_records(&local_catalog(), "portless", 5)["c1"].clone();
        rec.host = "b".into();
        rec.id = "r1".into();
        rec.addr = Some(Ipv4Addr::new(10, 244, 2, 9));
        let v = view(std::slice::from_ref(&rec));
        let mut cache = Converted::default();
        let (cat, newest) = merge(&local_catalog(), &v, "portless", &mut cache);
        assert_eq!(newest, Some(5));
        // three local containers and the remote one
        assert_eq!(cat.len(), 4);
        let remote = &cat.remote["b"];
        assert_eq!(remote.hostname, "host-b");
        let c = &remote.containers[0];
        assert_eq!(c.host.as_deref(), Some("b"));
        assert_eq!(c.endpoints[0].network_id, "n-pl");
        assert_eq!(c.endpoints[0].ipv4, Some(Ipv4Addr::new(10, 244, 2, 9)));
        // ... and this host's copy of each cluster network it is on.
        assert_eq!(c.endpoints.len(), 2);
        assert_eq!(
            (c.endpoints[1].network_id.as_str(), c.endpoints[1].ipv4),
            ("n-shop", Some(Ipv4Addr::new(10, 112, 0, 2)))
        );
        assert!(c.stopping);
        // The same view again: the converted host is shared, no new event.
        let (cat2, newest) = merge(&local_catalog(), &v, "portless", &mut cache);
        assert!(Arc::ptr_eq(&cat.remote["b"], &cat2.remote["b"]));
        assert_eq!(newest, None);
        // Without a local cluster network, a stand-in id.
        let mut bare = local_catalog();
        bare.networks.remove("n-pl");
        let (cat3, _) = merge(&bare, &v, "portless", &mut cache);
        assert_eq!(
            cat3.remote["b"].containers[0].endpoints[0].network_id,
            "cluster:portless"
        );
    }

    #[test]
    fn a_remote_record_joins_only_cluster_networks_this_host_has_at_their_subnet() {
        let ep = |net: &str, a: [u8; 4]| NetworkEndpoint {
            network: net.into(),
            addr: Ipv4Addr::from(a),
            aliases: vec!["db".into()],
        };
        let mut rec = local_records(&local_catalog(), "portless", 5)["c3"].clone();
        rec.host = "b".into();
        rec.id = "r3".into();
        rec.networks = vec![
            ep("shop", [10, 112, 0, 20]),
            // a network this host does not have, an address outside the
            // subnet of this host's copy, its gateway and broadcast: left
            // out
            ep("elsewhere", [10, 112, 0, 21]),
            ep("shop", [172, 20, 0, 9]),
            ep("shop", [10, 112, 0, 1]),
            ep("shop", [10, 112, 0, 255]),
        ];
        let v = view(std::slice::from_ref(&rec));
        let (cat, _) = merge(&local_catalog(), &v, "portless", &mut Converted::default());
        let c = &cat.remote["b"].containers[0];
        let eps: Vec<_> = c
            .endpoints
            .iter()
            .map(|e| (e.network_id.as_str(), e.network_name.as_str(), e.ipv4))
            .collect();
        assert_eq!(
            eps,
            vec![("n-shop", "shop", Some(Ipv4Addr::new(10, 112, 0, 20)))]
        );
        assert_eq!(c.endpoints[0].aliases, vec!["db".to_owned()]);
        // The network made on this host later: conversions are redone.
        let mut cache = Converted::default();
        let mut without = local_catalog();
        without.networks.remove("n-shop");
        let (cat, _) = merge(&without, &v, "portless", &mut cache);
        assert!(cat.remote["b"].containers[0].endpoints.is_empty());
        let (cat, _) = merge(&local_catalog(), &v, "portless", &mut cache);
        assert_eq!(cat.remote["b"].containers[0].endpoints.len(), 1);
    }
}
