//! Cluster networks and their addresses against a real etcd (Debian's
//! etcd-server on loopback), with concurrent tasks acting as hosts.

#![allow(clippy::unwrap_used)]

#[path = "../../tests/common/netns.rs"]
mod netns;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netns::Etcd;
use portless_netplane::ipam::{IpamError, NetworkRecord, Taken};
use portless_netplane::store::{NewNetwork, Store};

fn have_etcd() -> bool {
    std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

async fn store() -> (Etcd, Store) {
    assert!(
        have_etcd(),
        "needs etcd (apt-get install etcd-server; see test.sh)"
    );
    let etcd = Etcd::on_loopback();
    let store = Store::connect(&[etcd.endpoint()], "/portless/v1/")
        .await
        .unwrap();
    (etcd, store)
}

fn new_net(subnet: Option<&str>, creator: &str) -> NewNetwork {
    NewNetwork {
        subnet: subnet.map(|s| s.parse().unwrap()),
        pool: "10.96.0.0/20".parse().unwrap(),
        len: 24,
        forbidden: vec![Taken {
            subnet: "10.244.0.0/16".parse().unwrap(),
            what: "the cluster range 10.244.0.0/16".into(),
        }],
        cluster_vni: 1,
        creator: creator.into(),
        options: BTreeMap::new(),
    }
}

async fn lease(store: &Store, ttl: i64) -> i64 {
    store
        .client()
        .lease_client()
        .grant(ttl, None)
        .await
        .unwrap()
        .id()
}

#[tokio::test]
async fn concurrent_creations_never_overlap_or_share_a_vni_or_a_name() {
    let (_etcd, store) = store().await;
    let mut tasks = Vec::new();
    // Ten from the pool, and three asking for one subnet by hand.
    for i in 0..13 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let asked = (i >= 10).then_some("10.96.7.0/24");
            store
                .create_network(&new_net(asked, &format!("h{i}")))
                .await
                .unwrap()
        }));
    }
    let mut made: Vec<NetworkRecord> = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => made.push(r),
            Err(e) => refused.push(e),
        }
    }
    // 16 /24s in the pool: the ten fit beside 10.96.7.0/24; two of the
    // three hand-picked ones are refused for overlapping the first.
    assert_eq!(made.len(), 11, "{refused:?}");
    assert_eq!(refused.len(), 2);
    for e in &refused {
        assert!(
            matches!(e, IpamError::Overlaps { asked, .. } if asked.to_string() == "10.96.7.0/24"),
            "{e}"
        );
    }
    for (i, a) in made.iter().enumerate() {
        for b in &made[i + 1..] {
            assert!(
                !a.subnet.contains(&b.subnet) && !b.subnet.contains(&a.subnet),
                "{} and {} overlap",
                a.subnet,
                b.subnet
            );
            assert_ne!(a.vni, b.vni);
        }
    }
    // The cluster range is never handed out, nor asked for.
    let e = store
        .create_network(&new_net(Some("10.244.3.0/24"), "h"))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "subnet 10.244.3.0/24 overlaps the cluster range 10.244.0.0/16"
    );

    // Two networks racing for one name: one gets it.
    let (a, b) = (made[0].id(), made[1].id());
    let (s1, s2) = (store.clone(), store.clone());
    let (r1, r2) = tokio::join!(
        async move { s1.bind_network_name(&a, "shared").await.unwrap() },
        async move { s2.bind_network_name(&b, "shared").await.unwrap() }
    );
    assert!(r1.is_ok() != r2.is_ok(), "{r1:?} {r2:?}");
    let loser = r1.err().or(r2.err()).unwrap();
    assert!(loser.contains("the name shared is taken"), "{loser}");
    let listing = store.list_networks().await.unwrap();
    assert_eq!(listing.networks.len(), 11);
    assert!(listing.by_name("shared").is_some());
}

#[tokio::test]
async fn concurrent_hosts_never_get_the_same_address() {
    let (_etcd, store) = store().await;
    let net = store
        .create_network(&new_net(Some("10.96.1.0/24"), "h0"))
        .await
        .unwrap()
        .unwrap();
    // Three hosts, each with its own lease, each starting 40 containers
    // with 4 at a time (Docker asks in parallel too).
    let hosts = ["h1", "h2", "h3"];
    let mut leases = BTreeMap::new();
    for h in hosts {
        leases.insert(h, lease(&store, 60).await);
    }
    let mut tasks = Vec::new();
    for h in hosts {
        for _ in 0..4 {
            let (store, net, l) = (store.clone(), net.clone(), leases[h]);
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..10 {
                    let a = store
                        .request_address(&net, h, l, None)
                        .await
                        .unwrap()
                        .unwrap();
                    got.push((h, a));
                }
                got
            }));
        }
    }
    let mut all = BTreeMap::new();
    for t in tasks {
        for (h, a) in t.await.unwrap() {
            assert!(all.insert(a, h).is_none(), "{a} given twice");
        }
    }
    assert_eq!(all.len(), 120);
    let gw = Ipv4Addr::new(10, 96, 1, 1);
    assert!(!all.contains_key(&gw));
    // What etcd holds is what was handed out, with its host.
    let held = store.network_addresses(&net.id()).await.unwrap();
    let handed: BTreeMap<Ipv4Addr, String> =
        all.iter().map(|(a, h)| (*a, (*h).to_owned())).collect();
    assert_eq!(held, handed);
    // Each host's dynamic addresses come from blocks of its own: no /28
    // holds addresses of two hosts.
    let mut block_owner: BTreeMap<Ipv4Net, &str> = BTreeMap::new();
    for (a, h) in &all {
        let b = Ipv4Net::new(*a, 28).unwrap().trunc();
        assert_eq!(*block_owner.entry(b).or_insert(h), *h, "{b} shared");
    }

    // --ip: a taken address is refused with who holds it; a free one in
    // another host's block is given.
    let (taken, by) = all.iter().next().unwrap();
    let e = store
        .request_address(&net, "h3", leases["h3"], Some(*taken))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        e,
        IpamError::InUse {
            addr: *taken,
            network: "10.96.1.0/24".into(),
            host: (*by).to_owned(),
            for_host: false,
        }
    );
    assert!(e.to_string().contains("already in use"), "{e}");
    let free = (2..255)
        .map(|i| Ipv4Addr::new(10, 96, 1, i))
        .find(|a| !all.contains_key(a))
        .unwrap();
    assert_eq!(
        store
            .request_address(&net, "h1", leases["h1"], Some(free))
            .await
            .unwrap(),
        Ok(free)
    );
    for bad in [
        gw,
        Ipv4Addr::new(10, 96, 1, 255),
        Ipv4Addr::new(10, 96, 2, 9),
    ] {
        assert!(
            store
                .request_address(&net, "h1", leases["h1"], Some(bad))
                .await
                .unwrap()
                .is_err()
        );
    }
    // Release: only by the holder.
    store
        .release_address(&net.id(), "h2", free, false)
        .await
        .unwrap();
    assert!(
        store
            .network_addresses(&net.id())
            .await
            .unwrap()
            .contains_key(&free)
    );
    store
        .release_address(&net.id(), "h1", free, false)
        .await
        .unwrap();
    assert!(
        !store
            .network_addresses(&net.id())
            .await
            .unwrap()
            .contains_key(&free)
    );

    // A host's own address: one per host and lease, from its own blocks,
    // never a container's, marked as the host's; released only as such.
    let own = store
        .host_address(&net, "h1", leases["h1"])
        .await
        .unwrap()
        .unwrap();
    assert!(!all.contains_key(&own), "{own} is a container's");
    assert_eq!(
        store
            .host_address(&net, "h1", leases["h1"])
            .await
            .unwrap()
            .unwrap(),
        own,
        "asked again under the same lease"
    );
    let holders = store.network_address_holders(&net.id()).await.unwrap();
    let (h, l) = &holders[&own];
    assert!(h.for_host && h.host == "h1" && *l == leases["h1"], "{h:?}");
    let b = Ipv4Net::new(own, 28).unwrap().trunc();
    assert!(
        block_owner.get(&b).is_none_or(|o| *o == "h1"),
        "{own} is in a block of {:?}",
        block_owner.get(&b)
    );
    let other = store
        .host_address(&net, "h2", leases["h2"])
        .await
        .unwrap()
        .unwrap();
    assert_ne!(own, other);
    // --ip of a host's own address: refused, saying whose it is.
    let e = store
        .request_address(&net, "h3", leases["h3"], Some(own))
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("host h1's own address"), "{e}");
    // A host with no container on the network leases no block for its
    // own address: it takes one outside every block.
    let l4 = lease(&store, 30).await;
    let own4 = store.host_address(&net, "h4", l4).await.unwrap().unwrap();
    let (holders, _) = store.network_holders().await.unwrap();
    let (blocks, _) = &holders[&net.id()];
    assert!(blocks.values().all(|h| h != "h4"), "{blocks:?}");
    assert!(
        !blocks.keys().any(|b| b.contains(&own4)),
        "{own4} in a block"
    );
    assert!(
        store.network_address_holders(&net.id()).await.unwrap()[&own4]
            .0
            .for_host
    );
    store
        .release_address(&net.id(), "h1", own, false)
        .await
        .unwrap();
    assert!(
        store
            .network_addresses(&net.id())
            .await
            .unwrap()
            .contains_key(&own)
    );
    store
        .release_address(&net.id(), "h1", own, true)
        .await
        .unwrap();
    assert!(
        !store
            .network_addresses(&net.id())
            .await
            .unwrap()
            .contains_key(&own)
    );
}

#[tokio::test]
async fn a_host_that_comes_back_gets_its_blocks_back() {
    let (_etcd, store) = store().await;
    let net = store
        .create_network(&new_net(None, "h0"))
        .await
        .unwrap()
        .unwrap();
    let l1 = lease(&store, 60).await;
    let other = lease(&store, 60).await;
    let a1 = store
        .request_address(&net, "h1", l1, None)
        .await
        .unwrap()
        .unwrap();
    let o1 = store
        .request_address(&net, "h2", other, None)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(
        Ipv4Net::new(a1, 28).unwrap().trunc(),
        Ipv4Net::new(o1, 28).unwrap().trunc()
    );
    // h1's lease ends: its block and address go with it.
    store.release(l1).await.unwrap();
    let held = store.network_addresses(&net.id()).await.unwrap();
    assert_eq!(held.keys().copied().collect::<Vec<_>>(), vec![o1]);
    // h1 again, under a new lease: its reserved block first. Its
    // container may still have a1, which etcd no longer shows: avoided,
    // it is neither handed out nor given when asked for.
    let l2 = lease(&store, 60).await;
    let avoid = BTreeSet::from([a1]);
    let a2 = store
        .request_address_avoiding(&net, "h1", l2, None, &avoid)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(a2, a1);
    assert_eq!(
        Ipv4Net::new(a2, 28).unwrap().trunc(),
        Ipv4Net::new(a1, 28).unwrap().trunc()
    );
    let refused = store
        .request_address_avoiding(&net, "h1", l2, Some(a1), &avoid)
        .await
        .unwrap()
        .unwrap_err();
    assert!(refused.to_string().contains("in use"), "{refused}");
    let own = store
        .host_address_avoiding(&net, "h1", l2, &avoid)
        .await
        .unwrap()
        .unwrap();
    assert!(own != a1 && own != a2);
    // A lease that is gone is an error of its own.
    let e = store
        .request_address(&net, "h1", l1, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("is gone"), "{e}");

    // Removing the network removes everything under it.
    store.delete_network(&net).await.unwrap();
    assert!(store.network(&net.id()).await.unwrap().is_none());
    assert!(store.network_addresses(&net.id()).await.unwrap().is_empty());
    // A host that has not heard of the removal yet writes nothing under
    // the network: no address, no block, no own address.
    for want in [None, Some(a2)] {
        let gone = store
            .request_address(&net, "h1", l2, want)
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(gone, IpamError::Gone(_)), "{gone}");
    }
    let gone = store
        .host_address(&net, "h2", other)
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(gone, IpamError::Gone(_)), "{gone}");
    let kvs = store
        .client()
        .kv_client()
        .get(
            "/portless/v1/net",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let left: BTreeSet<String> = kvs
        .kvs()
        .iter()
        .map(|k| k.key_str().unwrap().to_owned())
        .collect();
    assert!(left.is_empty(), "left: {left:?}");
}
