//! Subnet leases against a real etcd (Debian's etcd-server on loopback).

#![allow(clippy::unwrap_used)]

#[path = "../../tests/common/netns.rs"]
mod netns;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use netns::Etcd;
use portless_netplane::store::{Claim, Store};
use portless_netplane::{HostRecord, Mac, Mode};

fn have_etcd() -> bool {
    std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn claim(id: u8, cluster: &str, len: u8, ttl: u64) -> Claim {
    let underlay = Ipv4Addr::new(192, 0, 2, id);
    Claim {
        cluster: cluster.parse().unwrap(),
        subnet_len: len,
        ttl: Duration::from_secs(ttl),
        record: HostRecord {
            id: underlay.to_string(),
            subnet: cluster.parse().unwrap(),
            underlay,
            vtep_mac: Mac::for_vtep(underlay),
            mode: Mode::Vxlan,
            vxlan_port: 4789,
            hostname: format!("h{id}"),
        },
    }
}

#[tokio::test]
async fn concurrent_claims_never_share_a_subnet() {
    assert!(
        have_etcd(),
        "needs etcd (apt-get install etcd-server; see test.sh)"
    );
    let etcd = Etcd::on_loopback();
    let store = Store::connect(&[etcd.endpoint()], "/portless/v1/")
        .await
        .unwrap();
    // Four /24s in the range, six hosts racing for them.
    let mut tasks = Vec::new();
    for id in 1..=6u8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.claim(&claim(id, "10.90.0.0/22", 24, 30)).await
        }));
    }
    let mut won = BTreeSet::new();
    let mut lost = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(l) => assert!(
                won.insert(l.record.subnet),
                "{} granted twice",
                l.record.subnet
            ),
            Err(e) => {
                assert!(e.to_string().contains("no free /24"), "{e}");
                lost += 1;
            }
        }
    }
    assert_eq!(won.len(), 4);
    assert_eq!(lost, 2);
    let (hosts, _) = store.hosts().await.unwrap();
    assert_eq!(hosts.len(), 4);
}

#[tokio::test]
async fn restarting_host_gets_its_own_subnet_back() {
    assert!(
        have_etcd(),
        "needs etcd (apt-get install etcd-server; see test.sh)"
    );
    let etcd = Etcd::on_loopback();
    let store = Store::connect(&[etcd.endpoint()], "/portless/v1/")
        .await
        .unwrap();
    let a = store.claim(&claim(1, "10.91.0.0/16", 24, 2)).await.unwrap();
    let b = store
        .claim(&claim(2, "10.91.0.0/16", 24, 30))
        .await
        .unwrap();
    assert_ne!(a.record.subnet, b.record.subnet);

    // Restart while the old lease still lives: same subnet, and the same
    // lease adopted, so that records bound to it stay.
    let a2 = store.claim(&claim(1, "10.91.0.0/16", 24, 2)).await.unwrap();
    assert_eq!(a2.record.subnet, a.record.subnet);
    assert_eq!(a2.id, a.id);
    // A restart with another lease TTL: same subnet, a new lease, and the
    // old one is gone.
    let a2 = store.claim(&claim(1, "10.91.0.0/16", 24, 3)).await.unwrap();
    assert_eq!(a2.record.subnet, a.record.subnet);
    assert_ne!(a2.id, a.id);
    assert!(store.keep_alive(a.id).await.unwrap() <= 0);

    // Crash: the lease expires and the host vanishes within TTL + 1 s...
    let start = Instant::now();
    loop {
        let (hosts, _) = store.hosts().await.unwrap();
        if !hosts.contains_key("192.0.2.1") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "lease did not expire"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...a newcomer does not take the reserved subnet...
    let c = store
        .claim(&claim(3, "10.91.0.0/16", 24, 30))
        .await
        .unwrap();
    assert_ne!(c.record.subnet, a.record.subnet);
    // ...and the host coming back gets it again.
    let a3 = store
        .claim(&claim(1, "10.91.0.0/16", 24, 30))
        .await
        .unwrap();
    assert_eq!(a3.record.subnet, a.record.subnet);
    // Keep-alive works on a live lease.
    assert!(store.keep_alive(a3.id).await.unwrap() > 0);
    store.release(a3.id).await.unwrap();
    let (hosts, _) = store.hosts().await.unwrap();
    assert!(!hosts.contains_key("192.0.2.1"));
}
