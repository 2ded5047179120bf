//! The whole netplane of several namespace hosts against a real etcd:
//! leases, peer watch, reconcile, dead-host removal, etcd outages, cleanup.
//! Requires root and etcd-server; skipped otherwise.

#![allow(clippy::unwrap_used)]
// tcp_ok waits for iperf3 to listen; a short blocking sleep is fine in a test.
#![allow(clippy::disallowed_methods)]

#[path = "../../tests/common/netns.rs"]
mod netns;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use netns::{Container, Etcd, Host, Segment, tcp_ok};
use portless_netplane::agent::{Agent, AgentConfig, HostStatus};
use portless_netplane::plan::VXLAN_DEVICE;
use portless_netplane::{Mode, Observed, Transport};

fn runnable() -> bool {
    let etcd = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    netns::can_run() && etcd
}

// A test that cannot run must not pass silently: test.sh runs as root and
// installs what is missing.
macro_rules! require {
    () => {
        assert!(
            runnable(),
            "needs root, iproute2, ping, iperf3 and etcd (see test.sh)"
        );
    };
}

const TTL: Duration = Duration::from_secs(2);

fn config(etcd: &Etcd, host: &Host, cluster: &str, mode: Mode) -> AgentConfig {
    AgentConfig {
        etcd: vec![etcd.endpoint()],
        etcd_access: Default::default(),
        prefix: "/portless/v1/".into(),
        cluster: cluster.parse().unwrap(),
        subnet_len: 24,
        advertise: Some(host.addr),
        host_id: None,
        hostname: host.ns.name.clone(),
        mode,
        vxlan_port: 4789,
        vni: 42,
        vxlan_name: VXLAN_DEVICE.into(),
        lease_ttl: TTL,
        bridge: Some("pl-br0".into()),
        // Long on purpose: drift must be repaired on the kernel's change
        // events, not by the periodic pass.
        resync: Duration::from_secs(60),
        netns: Some(host.ns.path()),
        iptables: true,
        masquerade_outside: true,
        state_dir: None,
    }
}

fn container(tag: &str, name: &str, host: &Host, st: &HostStatus) -> Container {
    let addr = Ipv4Net::new(
        Ipv4Addr::from(u32::from(st.subnet.network()) + 10),
        st.subnet.prefix_len(),
    )
    .unwrap();
    Container::new(tag, name, &host.ns, "pl-br0", addr, st.gateway, st.mtu)
}

async fn wait_for(what: &str, secs: u64, mut f: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if f().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {secs}s waiting for: {what}");
}

fn peers_in_place(a: &Agent, n: usize) -> bool {
    let s = a.status();
    s.peers.len() == n && s.peers.iter().all(|p| p.in_place)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_lease_subnets_and_containers_reach_each_other() {
    require!();
    let tag = netns::unique_tag();
    let etcd = Etcd::on_loopback();
    let seg = Segment::new(&tag, "sw", "192.168.70.0/24");
    let h1 = Host::new(&tag, "h1", &seg, 1);
    let h2 = Host::new(&tag, "h2", &seg, 2);
    let h3 = Host::new(&tag, "h3", &seg, 3);
    let a1 = Agent::start(config(&etcd, &h1, "10.70.0.0/16", Mode::Vxlan))
        .await
        .unwrap();
    let a2 = Agent::start(config(&etcd, &h2, "10.70.0.0/16", Mode::Vxlan))
        .await
        .unwrap();
    let a3 = Agent::start(config(&etcd, &h3, "10.70.0.0/16", Mode::Vxlan))
        .await
        .unwrap();
    let s1 = a1.ready().await;
    let s2 = a2.ready().await;
    let s3 = a3.ready().await;
    assert_eq!(s1.mtu, 1450);
    let subnets: std::collections::BTreeSet<_> = [s1.subnet, s2.subnet, s3.subnet].into();
    assert_eq!(subnets.len(), 3, "subnets must differ");
    for a in [&a1, &a2, &a3] {
        wait_for("all peers in place", 5, async || peers_in_place(a, 2)).await;
    }
    assert!(
        a1.status()
            .peers
            .iter()
            .all(|p| p.transport == Transport::Vxlan)
    );
    assert!(a1.status().etcd_connected);

    let c1 = container(&tag, "c1", &h1, &s1);
    let c2 = container(&tag, "c2", &h2, &s2);
    let c3 = container(&tag, "c3", &h3, &s3);
    for (x, y) in [(&c1, &c2), (&c2, &c3), (&c3, &c1)] {
        assert!(x.ns.ping_until(y.addr, 5), "{} -> {}", x.addr, y.addr);
    }
    assert!(
        c1.ns.ping_size(c2.addr, 1450),
        "a full-size packet must cross"
    );
    assert!(tcp_ok(&c1, &c3), "TCP across hosts");

    // etcd is reconciled too: a host's record deleted by hand comes back
    // while its lease lives.
    let store = portless_netplane::store::Store::connect(&[etcd.endpoint()], "/portless/v1/")
        .await
        .unwrap();
    store
        .client()
        .kv_client()
        .delete(format!("/portless/v1/hosts/{}", s2.id), None)
        .await
        .unwrap();
    wait_for("record restored", 3, async || {
        store.hosts().await.unwrap().0.contains_key(&s2.id)
    })
    .await;
    // Peers drop it on the delete and take it back on the put; let both
    // pass before looking.
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_for("peer back in place", 3, async || peers_in_place(&a1, 2)).await;

    // iptables: portless's chains exist in the host namespace.
    let rules = String::from_utf8(h1.ns.exec(&["iptables", "-S", "PORTLESS-FWD"]).stdout).unwrap();
    assert!(
        rules.contains("-s 10.70.0.0/16 -d 10.70.0.0/16 -j ACCEPT"),
        "{rules}"
    );

    // Drift: a deleted route and a deleted device come back on their own.
    h1.ns
        .ip(&["route", "del", &s2.subnet.to_string(), "proto", "149"]);
    let k = a1.kernel().clone();
    let back = wait_for("route restored", 2, async || {
        k.observe()
            .await
            .unwrap()
            .routes
            .iter()
            .any(|r| r.dst == s2.subnet)
    })
    .await;
    assert!(back < Duration::from_secs(1), "took {back:?}");
    // A deleted permanent neighbour entry (the kernel reports it FAILED)
    // and FDB entry come back at once too, not at the periodic resync.
    let neigh = k.observe().await.unwrap().neighs[0].clone();
    h1.ns
        .ip(&["neigh", "del", &neigh.ip.to_string(), "dev", VXLAN_DEVICE]);
    let back = wait_for("neighbour restored", 2, async || {
        k.observe().await.unwrap().neighs.contains(&neigh)
    })
    .await;
    assert!(back < Duration::from_secs(1), "neighbour took {back:?}");
    let fdb = k.observe().await.unwrap().fdbs[0].clone();
    h1.ns.exec(&[
        "bridge",
        "fdb",
        "del",
        &fdb.mac.to_string(),
        "dev",
        VXLAN_DEVICE,
        "dst",
        &fdb.dst.to_string(),
    ]);
    let back = wait_for("fdb entry restored", 2, async || {
        k.observe().await.unwrap().fdbs.contains(&fdb)
    })
    .await;
    assert!(back < Duration::from_secs(1), "fdb entry took {back:?}");
    h1.ns.ip(&["link", "del", VXLAN_DEVICE]);
    assert!(c1.ns.ping_until(c2.addr, 5), "drift was not repaired");

    // A host that dies (no cleanup, lease left to expire) disappears from
    // every other kernel within the TTL plus one second.
    drop(a3);
    let gone = wait_for("dead host removed", 5, async || peers_in_place(&a1, 1)).await;
    assert!(gone <= TTL + Duration::from_secs(1), "took {gone:?}");
    let routes = String::from_utf8(h1.ns.ip(&["route", "show", "proto", "149"]).stdout).unwrap();
    assert!(
        !routes.contains(&s3.subnet.network().to_string()),
        "{routes}"
    );
    assert!(c1.ns.ping(c2.addr), "the other peer is untouched");

    // Restarting the dead host gets its subnet back.
    let a3 = Agent::start(config(&etcd, &h3, "10.70.0.0/16", Mode::Vxlan))
        .await
        .unwrap();
    assert_eq!(a3.ready().await.subnet, s3.subnet);
    assert!(c1.ns.ping_until(c3.addr, 5));

    // Cleanup: lease given back (peers drop it at once), nothing left.
    let k = a3.kernel().clone();
    a3.stop(true).await.unwrap();
    assert_eq!(k.observe().await.unwrap(), Observed::default());
    assert!(!h3.ns.try_exec(&["iptables", "-n", "-L", "PORTLESS-FWD"]));
    assert!(
        !h3.ns
            .try_exec(&["iptables", "-t", "nat", "-n", "-L", "PORTLESS-NAT"])
    );
    wait_for("released host removed", 2, async || peers_in_place(&a1, 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_keeps_connectivity_and_converges_after() {
    require!();
    let tag = netns::unique_tag();
    let mut etcd = Etcd::on_loopback();
    let seg = Segment::new(&tag, "sw", "192.168.71.0/24");
    let h1 = Host::new(&tag, "h1", &seg, 1);
    let h2 = Host::new(&tag, "h2", &seg, 2);
    let h3 = Host::new(&tag, "h3", &seg, 3);
    let a1 = Agent::start(config(&etcd, &h1, "10.71.0.0/16", Mode::Auto))
        .await
        .unwrap();
    let a2 = Agent::start(config(&etcd, &h2, "10.71.0.0/16", Mode::Vxlan))
        .await
        .unwrap();
    let s1 = a1.ready().await;
    let s2 = a2.ready().await;
    wait_for("peers", 5, async || {
        peers_in_place(&a1, 1) && peers_in_place(&a2, 1)
    })
    .await;
    let c1 = container(&tag, "c1", &h1, &s1);
    let c2 = container(&tag, "c2", &h2, &s2);
    assert!(c1.ns.ping_until(c2.addr, 5));

    // A steady ping across the whole outage, longer than the lease TTL.
    let pinger = c1
        .ns
        .command(&[
            "ping",
            "-i",
            "0.2",
            "-c",
            "30",
            "-W",
            "1",
            &c2.addr.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // And one TCP connection that lives through it.
    let mut server = c2
        .ns
        .command(&["iperf3", "-s", "-1", "-B", &c2.addr.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = c1
        .ns
        .command(&["iperf3", "-c", &c2.addr.to_string(), "-t", "7", "-b", "10M"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.stop();
    wait_for("etcd seen down", 8, async || !a1.status().etcd_connected).await;
    tokio::time::sleep(TTL * 2).await;
    assert!(
        peers_in_place(&a1, 1),
        "entries must stay while etcd is away"
    );
    etcd.restart();
    let out = tokio::task::spawn_blocking(move || pinger.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" 0% packet loss"), "{text}");
    let tcp = tokio::task::spawn_blocking(move || client.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let _ = server.wait();
    assert!(
        tcp.status.success(),
        "TCP connection broke during the outage: {}{}",
        String::from_utf8_lossy(&tcp.stdout),
        String::from_utf8_lossy(&tcp.stderr)
    );

    wait_for("etcd seen back", 10, async || a1.status().etcd_connected).await;
    // After the outage, changes converge again: a new host joins.
    let a3 = Agent::start(config(&etcd, &h3, "10.71.0.0/16", Mode::Auto))
        .await
        .unwrap();
    let s3 = a3.ready().await;
    wait_for("new peer everywhere", 5, async || {
        peers_in_place(&a1, 2) && peers_in_place(&a2, 2) && peers_in_place(&a3, 2)
    })
    .await;
    let c3 = container(&tag, "c3", &h3, &s3);
    assert!(c3.ns.ping_until(c1.addr, 5));
    assert!(c3.ns.ping_until(c2.addr, 5));
    assert!(tcp_ok(&c3, &c1), "TCP over a plain route (auto mode)");
    // Auto between two auto hosts on one segment: a plain route.
    let t = a1
        .status()
        .peers
        .iter()
        .find(|p| p.subnet == s3.subnet)
        .map(|p| p.transport);
    assert_eq!(t, Some(Transport::Route));
}

#[tokio::test]
async fn cluster_range_overlapping_the_underlay_is_refused() {
    require!();
    let tag = netns::unique_tag();
    let seg = Segment::new(&tag, "sw", "192.168.73.0/24");
    let h1 = Host::new(&tag, "h1", &seg, 1);
    let mut cfg = AgentConfig {
        etcd: vec!["http://127.0.0.1:1".into()],
        ..config_without_etcd(&h1)
    };
    cfg.cluster = "192.168.0.0/16".parse().unwrap();
    let err = Agent::start(cfg).await.err().expect("must be refused");
    assert!(
        err.to_string().contains("overlaps the underlay network"),
        "{err}"
    );
}

fn config_without_etcd(host: &Host) -> AgentConfig {
    AgentConfig {
        etcd: vec![],
        etcd_access: Default::default(),
        prefix: "/portless/v1/".into(),
        cluster: "10.72.0.0/16".parse().unwrap(),
        subnet_len: 24,
        advertise: Some(host.addr),
        host_id: None,
        hostname: String::new(),
        mode: Mode::Vxlan,
        vxlan_port: 4789,
        vni: 1,
        vxlan_name: VXLAN_DEVICE.into(),
        lease_ttl: TTL,
        bridge: None,
        resync: Duration::from_secs(10),
        netns: Some(host.ns.path()),
        iptables: false,
        masquerade_outside: false,
        state_dir: None,
    }
}

/// portless restarting while etcd is down leaves the kernel as the last run
/// left it (containers keep talking), and takes its own subnet back once
/// etcd returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_during_etcd_outage_keeps_the_last_plan() {
    require!();
    let tag = netns::unique_tag();
    let mut etcd = Etcd::on_loopback();
    let seg = Segment::new(&tag, "sw", "192.168.74.0/24");
    let h1 = Host::new(&tag, "h1", &seg, 1);
    let h2 = Host::new(&tag, "h2", &seg, 2);
    let a1 = Agent::start(config(&etcd, &h1, "10.74.0.0/16", Mode::Vxlan))
        .await
        .unwrap();
    let a2 = Agent::start(config(&etcd, &h2, "10.74.0.0/16", Mode::Vxlan))
        .await
        .unwrap();
    let s1 = a1.ready().await;
    let s2 = a2.ready().await;
    wait_for("peers", 5, async || {
        peers_in_place(&a1, 1) && peers_in_place(&a2, 1)
    })
    .await;
    let c1 = container(&tag, "c1", &h1, &s1);
    let c2 = container(&tag, "c2", &h2, &s2);
    assert!(c1.ns.ping_until(c2.addr, 5));

    // A plain restart with etcd up: not one packet lost (the kernel is not
    // touched before the peers are listed again).
    let pinger = c1
        .ns
        .command(&[
            "ping",
            "-i",
            "0.1",
            "-c",
            "20",
            "-W",
            "1",
            &c2.addr.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut monitor = std::process::Command::new("ip")
        .args(["-n", &h1.ns.name, "monitor", "route"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(a1);
    let a1 = Agent::start(config(&etcd, &h1, "10.74.0.0/16", Mode::Vxlan))
        .await
        .unwrap();
    assert_eq!(a1.ready().await.subnet, s1.subnet);
    wait_for("peer back in status", 5, async || peers_in_place(&a1, 1)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    monitor.kill().unwrap();
    let routes = monitor.wait_with_output().unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(
        !routes
            .lines()
            .any(|l| l.starts_with("Deleted") && l.contains("proto 149")),
        "a route was torn down: {routes}"
    );
    let out = tokio::task::spawn_blocking(move || pinger.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" 0% packet loss"), "{text}");

    // h1's portless stops (no cleanup), etcd goes away, h1's portless
    // comes back without etcd.
    drop(a1);
    etcd.stop();
    let a1 = Agent::start(config(&etcd, &h1, "10.74.0.0/16", Mode::Vxlan))
        .await
        .unwrap();
    tokio::time::sleep(TTL * 2).await;
    assert!(a1.status().host.is_none(), "no lease without etcd");
    assert!(c1.ns.ping(c2.addr), "the kernel must keep the last plan");
    assert!(c2.ns.ping(c1.addr));

    etcd.restart();
    let again = a1.ready().await;
    assert_eq!(again.subnet, s1.subnet, "its own subnet back");
    wait_for("converged", 10, async || {
        peers_in_place(&a1, 1) && peers_in_place(&a2, 1)
    })
    .await;
    assert!(c1.ns.ping(c2.addr));
}
