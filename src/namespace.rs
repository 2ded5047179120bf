//! One namespace across hosts (cluster mode): this host's containers on the
//! cluster network become container records in etcd, and the other hosts'
//! records become containers of the catalog, on this host's cluster
//! network. The merged catalog is the one snapshot the DNS zone and the
//! route table are built from, so names and routes cross hosts with no
//! special case in either.
//!
//! Pure conversions ([`local_records`], [`merge`]) and the task that runs
//! them on every change of either side ([`run`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use portless_netplane::membership::{HostContainers, RemoteView};
use portless_netplane::records::{self, ContainerRecord, RecordHealth};
use tokio::sync::watch;

use crate::catalog::Snapshot;
use crate::catalog::{Catalog, Container, Endpoint, Health, RemoteHost};

/// This host's containers on the cluster network `network`, as records (by
/// container id). `changed_ns` is stamped on each (the time of the change
/// that produced this catalog); it never causes a write by itself.
pub fn local_records(
    catalog: &Catalog,
    network: &str,
    changed_ns: i64,
) -> BTreeMap<String, ContainerRecord> {
    let mut out = BTreeMap::new();
    for c in catalog.containers.values() {
        let Some(ep) = c.endpoints.iter().find(|e| e.network_name == network) else {
            continue;
        };
        // The netplane is IPv4.
        let Some(addr) = ep.ipv4 else { continue };
        out.insert(
            c.id.clone(),
            ContainerRecord {
                // Filled in by the agent.
                host: String::new(),
                id: c.id.clone(),
                name: c.name.clone(),
                project: c.compose_project.clone(),
                service: c.compose_service.clone(),
                aliases: ep.aliases.clone(),
                addr,
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

/// A remote record as a container of this host's cluster network.
fn container_of(rec: &ContainerRecord, host: &str, net_id: &str, network: &str) -> Container {
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
        endpoints: vec![Endpoint {
            network_id: net_id.to_owned(),
            network_name: network.to_owned(),
            ipv4: Some(rec.addr),
            ipv6: None,
            aliases: rec.aliases.clone(),
        }],
        host: Some(host.to_owned()),
    }
}

/// The id remote containers' endpoints carry: this host's cluster network
/// (so that its containers see them as neighbours), or a stand-in while it
/// does not exist (host-side names still answer).
fn cluster_network_id(local: &Catalog, network: &str) -> String {
    local
        .networks
        .values()
        .find(|n| n.name == network)
        .map(|n| n.id.clone())
        .unwrap_or_else(|| format!("cluster:{network}"))
}

/// Converted remote hosts, reused while their records and the cluster
/// network's id stay the same.
#[derive(Default)]
pub struct Converted {
    net_id: String,
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
    let net_id = cluster_network_id(local, network);
    if net_id != cache.net_id {
        cache.hosts.clear();
        cache.net_id = net_id.clone();
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
                        .map(|r| container_of(r, host, &net_id, network))
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
        for (id, name) in [("n-pl", "portless"), ("n-app", "app")] {
            cat.networks.insert(
                id.into(),
                Network {
                    id: id.into(),
                    name: name.into(),
                    driver: "bridge".into(),
                    subnets: vec![],
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
                ],
            ),
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
        assert_eq!(recs.len(), 1);
        let r = &recs["c1"];
        assert_eq!(r.addr, Ipv4Addr::new(10, 244, 1, 2));
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
        for (first, want) in [(local_catalog(), 1usize), (Catalog::default(), 0)] {
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
        rec.addr = Ipv4Addr::new(10, 244, 2, 9);
        let v = view(std::slice::from_ref(&rec));
        let mut cache = Converted::default();
        let (cat, newest) = merge(&local_catalog(), &v, "portless", &mut cache);
        assert_eq!(newest, Some(5));
        assert_eq!(cat.len(), 3);
        let remote = &cat.remote["b"];
        assert_eq!(remote.hostname, "host-b");
        let c = &remote.containers[0];
        assert_eq!(c.host.as_deref(), Some("b"));
        assert_eq!(c.endpoints[0].network_id, "n-pl");
        assert_eq!(c.endpoints[0].ipv4, Some(Ipv4Addr::new(10, 244, 2, 9)));
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
}
