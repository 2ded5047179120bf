//! The executor on real namespaces: hosts joined by a switch namespace,
//! "containers" on each host's bridge, no etcd. Requires root; skipped
//! otherwise.

#![allow(clippy::unwrap_used)]

#[path = "../../tests/common/netns.rs"]
mod netns;

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netns::{Container, Host, Router, Segment};
use portless_netplane::netlink::Kernel;
use portless_netplane::plan::{self, LocalSpec, Observed, VXLAN_DEVICE};
use portless_netplane::{HostRecord, Mac, Mode, Transport};

struct Node {
    host: Host,
    kernel: Kernel,
    spec: LocalSpec,
}

async fn node(host: Host, subnet: &str, mode: Mode) -> Node {
    let kernel = Kernel::spawn(Some(&host.ns.path())).unwrap();
    let underlay = kernel.underlay(Some(host.addr)).await.unwrap();
    assert_eq!(underlay.ifname, "eth0");
    let spec = LocalSpec {
        record: HostRecord {
            id: host.addr.to_string(),
            subnet: subnet.parse().unwrap(),
            underlay: host.addr,
            vtep_mac: Mac::for_vtep(host.addr),
            mode,
            vxlan_port: 4789,
            hostname: host.ns.name.clone(),
        },
        underlay,
        vxlan_name: VXLAN_DEVICE.into(),
        vni: 7,
        bridge: Some("pl-br0".into()),
    };
    Node { host, kernel, spec }
}

/// Plan against every node's record, apply, and check convergence.
async fn reconcile(n: &Node, all: &[HostRecord]) -> plan::Plan {
    let p = plan::plan(&n.spec, all);
    let obs = n.kernel.observe().await.unwrap();
    let ops = plan::diff(&p, &obs);
    for a in n.kernel.apply(ops).await.unwrap() {
        a.result.unwrap();
    }
    let obs = n.kernel.observe().await.unwrap();
    assert_eq!(plan::diff(&p, &obs), vec![], "not converged: {obs:?}");
    p
}

fn container(tag: &str, name: &str, n: &Node, host_part: u32) -> Container {
    let net = n.spec.record.subnet;
    let addr = Ipv4Net::new(
        Ipv4Addr::from(u32::from(net.network()) + host_part),
        net.prefix_len(),
    )
    .unwrap();
    Container::new(
        tag,
        name,
        &n.host.ns,
        "pl-br0",
        addr,
        n.spec.gateway().addr(),
        n.spec.container_mtu(),
    )
}

// A test that cannot run must not pass silently: test.sh runs as root and
// installs what is missing.
macro_rules! require_root {
    () => {
        assert!(
            netns::can_run(),
            "needs root, iproute2 and ping (see test.sh)"
        );
    };
}

async fn two_hosts_one_segment(mode: Mode) {
    let tag = netns::unique_tag();
    let seg = Segment::new(&tag, "sw", "192.168.50.0/24");
    let a = node(Host::new(&tag, "h1", &seg, 1), "10.88.1.0/24", mode).await;
    let b = node(Host::new(&tag, "h2", &seg, 2), "10.88.2.0/24", mode).await;
    let all = vec![a.spec.record.clone(), b.spec.record.clone()];
    let pa = reconcile(&a, &all).await;
    reconcile(&b, &all).await;
    let want = if mode == Mode::Vxlan {
        Transport::Vxlan
    } else {
        Transport::Route
    };
    assert_eq!(pa.peers[0].transport, want);

    let c1 = container(&tag, "c1", &a, 10);
    let c2 = container(&tag, "c2", &b, 10);
    assert!(c1.ns.ping_until(c2.addr, 5), "c1 cannot reach c2");
    assert!(c2.ns.ping(c1.addr), "c2 cannot reach c1");
    // The host itself (where the router runs) reaches remote containers,
    // from an address inside the cluster range.
    assert!(a.host.ns.ping(c2.addr), "h1 cannot reach c2");
    let got =
        String::from_utf8(a.host.ns.ip(&["route", "get", &c2.addr.to_string()]).stdout).unwrap();
    let src = if mode == Mode::Vxlan {
        a.spec.record.subnet.network()
    } else {
        a.spec.gateway().addr()
    };
    assert!(got.contains(&format!("src {src}")), "{got}");
    // A full-size packet crosses without fragmentation.
    let mtu = a.spec.container_mtu();
    assert!(c1.ns.ping_size(c2.addr, mtu), "{mtu}-byte packet lost");
    assert!(netns::tcp_ok(&c1, &c2), "TCP across hosts");
    assert!(
        !c1.ns.ping_size(c2.addr, mtu + 1),
        "oversize packet with DF went through"
    );

    // Drift: a route deleted behind portless's back comes back.
    let route = &pa.peers[0].route;
    a.host
        .ns
        .ip(&["route", "del", &route.dst.to_string(), "proto", "149"]);
    assert!(!c1.ns.ping(c2.addr));
    reconcile(&a, &all).await;
    assert!(c1.ns.ping(c2.addr), "drift was not repaired");

    if mode == Mode::Vxlan {
        // The whole device deleted comes back with its entries.
        a.host.ns.ip(&["link", "del", VXLAN_DEVICE]);
        reconcile(&a, &all).await;
        assert!(c1.ns.ping(c2.addr), "device was not restored");
    }

    // Peer gone: its entries go and nothing else.
    reconcile(&a, &all[..1]).await;
    assert!(!c1.ns.ping(c2.addr));

    // Cleanup leaves nothing of ours behind.
    for n in [&a, &b] {
        let obs = n.kernel.observe().await.unwrap();
        for r in n.kernel.apply(plan::cleanup(&obs)).await.unwrap() {
            r.result.unwrap();
        }
        assert_eq!(n.kernel.observe().await.unwrap(), Observed::default());
        let routes =
            String::from_utf8(n.host.ns.ip(&["route", "show", "proto", "149"]).stdout).unwrap();
        assert!(routes.trim().is_empty(), "{routes}");
    }
}

#[tokio::test]
async fn containers_reach_each_other_over_vxlan() {
    require_root!();
    two_hosts_one_segment(Mode::Vxlan).await;
}

#[tokio::test]
async fn containers_reach_each_other_over_routes() {
    require_root!();
    two_hosts_one_segment(Mode::Route).await;
}

#[tokio::test]
async fn auto_mode_tunnels_across_a_router_and_route_mode_refuses() {
    require_root!();
    let tag = netns::unique_tag();
    let seg_a = Segment::new(&tag, "sa", "192.168.61.0/24");
    let seg_b = Segment::new(&tag, "sb", "192.168.62.0/24");
    let r = Router::new(&tag, "rt");
    let ra = seg_a.plug(&r.ns, "ea", 254);
    let rb = seg_b.plug(&r.ns, "eb", 254);
    let h1 = Host::new(&tag, "h1", &seg_a, 1);
    let h2 = Host::new(&tag, "h2", &seg_a, 2);
    let h3 = Host::new(&tag, "h3", &seg_b, 3);
    h1.default_via(ra);
    h2.default_via(ra);
    h3.default_via(rb);
    let a = node(h1, "10.89.1.0/24", Mode::Auto).await;
    let b = node(h2, "10.89.2.0/24", Mode::Auto).await;
    let c = node(h3, "10.89.3.0/24", Mode::Auto).await;
    let all = vec![
        a.spec.record.clone(),
        b.spec.record.clone(),
        c.spec.record.clone(),
    ];
    let pa = reconcile(&a, &all).await;
    reconcile(&b, &all).await;
    reconcile(&c, &all).await;
    let t: Vec<_> = pa.peers.iter().map(|p| p.transport).collect();
    assert_eq!(t, vec![Transport::Route, Transport::Vxlan]);

    let c1 = container(&tag, "c1", &a, 10);
    let c2 = container(&tag, "c2", &b, 10);
    let c3 = container(&tag, "c3", &c, 10);
    assert!(c1.ns.ping_until(c2.addr, 5), "same segment, routed");
    assert!(c1.ns.ping_until(c3.addr, 5), "across the router, tunnelled");
    assert!(c3.ns.ping(c2.addr));
    assert!(c1.ns.ping_size(c3.addr, a.spec.container_mtu()));

    // Route mode cannot reach a peer behind the router, and says why.
    let mut spec = a.spec.clone();
    spec.record.mode = Mode::Route;
    let p = plan::plan(&spec, &all);
    assert_eq!(p.refused.len(), 1);
    assert!(
        p.refused[0]
            .reason
            .contains("not on a directly connected segment")
    );
}

/// iptables glue in a namespace: hooks into DOCKER-USER when Docker made
/// one (faked here), else FORWARD; idempotent; cleanup removes exactly
/// portless's chains and jumps.
#[tokio::test]
async fn iptables_rules_hook_in_and_clean_up() {
    require_root!();
    use portless_netplane::iptables::{self, Rules};
    let tag = netns::unique_tag();
    let ns = netns::Netns::new(format!("pl-{tag}-ipt"));
    let kernel = Kernel::spawn(Some(&ns.path())).unwrap();
    let rules = Rules {
        cluster: "10.60.0.0/16".parse().unwrap(),
        subnet: "10.60.3.0/24".parse().unwrap(),
        masquerade_outside: true,
    };
    let save =
        |table: &str| String::from_utf8(ns.exec(&["iptables", "-t", table, "-S"]).stdout).unwrap();

    // No Docker: FORWARD.
    iptables::ensure(&kernel, &rules).await.unwrap();
    iptables::ensure(&kernel, &rules).await.unwrap();
    let filter = save("filter");
    assert_eq!(
        filter.matches("-A FORWARD -j PORTLESS-FWD").count(),
        1,
        "{filter}"
    );
    assert!(filter.contains("-A PORTLESS-FWD -s 10.60.0.0/16 -d 10.60.0.0/16 -j ACCEPT"));
    let nat = save("nat");
    assert_eq!(
        nat.matches("-A POSTROUTING -j PORTLESS-NAT").count(),
        1,
        "{nat}"
    );
    assert!(nat.contains("-A PORTLESS-NAT -s 10.60.3.0/24 -d 10.60.0.0/16 -j ACCEPT"));
    assert!(nat.contains("-A PORTLESS-NAT -s 10.60.3.0/24 ! -d 10.60.0.0/16 -j MASQUERADE"));

    // A rule inserted ahead of the jump (as Docker does for a new network)
    // is overtaken again.
    ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-I",
        "POSTROUTING",
        "1",
        "-s",
        "10.9.9.0/24",
        "-j",
        "MASQUERADE",
    ]);
    iptables::ensure(&kernel, &rules).await.unwrap();
    let nat = save("nat");
    let first = nat
        .lines()
        .find(|l| l.starts_with("-A POSTROUTING"))
        .unwrap();
    assert_eq!(first, "-A POSTROUTING -j PORTLESS-NAT", "{nat}");
    assert_eq!(nat.matches("-j PORTLESS-NAT").count(), 1, "{nat}");
    assert!(nat.contains("-A POSTROUTING -s 10.9.9.0/24 -j MASQUERADE"));

    // A foreign rule is never touched.
    ns.exec(&[
        "iptables",
        "-A",
        "FORWARD",
        "-s",
        "10.1.1.1/32",
        "-j",
        "DROP",
    ]);
    iptables::cleanup(&kernel).await.unwrap();
    assert!(!iptables::present(&kernel).await.unwrap());
    let filter = save("filter");
    assert!(!filter.contains("PORTLESS"), "{filter}");
    assert!(filter.contains("-A FORWARD -s 10.1.1.1/32 -j DROP"));
    assert!(!save("nat").contains("PORTLESS"));

    // With Docker's user chain present, the jump goes there, first.
    ns.exec(&["iptables", "-N", "DOCKER-USER"]);
    ns.exec(&["iptables", "-A", "DOCKER-USER", "-j", "RETURN"]);
    iptables::ensure(
        &kernel,
        &Rules {
            masquerade_outside: false,
            ..rules
        },
    )
    .await
    .unwrap();
    let out = String::from_utf8(ns.exec(&["iptables", "-S", "DOCKER-USER"]).stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[1], "-A DOCKER-USER -j PORTLESS-FWD", "{out}");
    let nat = String::from_utf8(
        ns.exec(&["iptables", "-t", "nat", "-S", "PORTLESS-NAT"])
            .stdout,
    )
    .unwrap();
    assert!(!nat.contains("MASQUERADE"), "{nat}");
    iptables::cleanup(&kernel).await.unwrap();
    assert!(!save("filter").contains("PORTLESS"));
}
