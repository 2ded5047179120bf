//! Cluster mode on the real Docker Engine, in the host's own namespace: the
//! bridge network on the leased subnet with the lease's gateway and MTU,
//! portless's iptables chains hooked into Docker's, and all of it removed by
//! `--cleanup-on-exit`.
//!
//! Route mode with a private etcd and no peers, so that nothing but the
//! Docker network and portless's own iptables chains is created here: no
//! device, no route.

#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::netns::Etcd;
use common::{Cleanup, http_get, wait_until};

fn iptables(args: &[&str]) -> String {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn docker_network_and_iptables_rules_follow_the_lease_and_go_on_exit() {
    common::require("docker");
    common::require("etcd");
    common::require("iptables");
    let cleanup = Cleanup::new();
    let etcd = Etcd::on_loopback();
    let net = common::unique("plc");
    cleanup.push(&["docker", "network", "rm", &net]);
    // 10.220-249: clear of 10.213.0.0/16, where the other Docker tests make
    // networks.
    let third = 220 + std::process::id() % 30;
    let cidr = format!("10.{third}.0.0/16");
    let endpoint = etcd.endpoint();
    let p = common::Portless::start(&[
        "--cluster-etcd",
        &endpoint,
        "--cluster-cidr",
        &cidr,
        "--netplane-mode",
        "route",
        "--docker-network",
        &net,
        "--lease-ttl",
        "2",
        "--cleanup-on-exit",
        // Not the machine's /run/docker/plugins.
        "--plugin-socket",
        "none",
        "--dns-port",
        "0",
        "--no-router",
    ]);

    let status: serde_json::Value = wait_until("network ready", Duration::from_secs(20), || {
        let body = http_get(p.admin, "/api/cluster")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["docker_network"]["ready"] == true).then_some(v)
    });
    let subnet = status["host"]["subnet"].as_str().unwrap().to_owned();
    let gateway = status["host"]["gateway"].as_str().unwrap().to_owned();
    let mtu = status["host"]["mtu"].as_u64().unwrap().to_string();
    assert!(subnet.starts_with(&format!("10.{third}.")), "{subnet}");

    let inspect = common::docker(&[
        "network",
        "inspect",
        "-f",
        "{{(index .IPAM.Config 0).Subnet}} {{(index .IPAM.Config 0).Gateway}} {{index .Options \"com.docker.network.driver.mtu\"}} {{index .Labels \"io.portless.netplane\"}}",
        &net,
    ]);
    assert_eq!(inspect, format!("{subnet} {gateway} {mtu} 1"));

    // A container on it gets an address of the leased subnet.
    let c = common::unique("plc");
    common::container(&cleanup, &c, &["--network", &net], &[]);
    let ip = common::container_ip(&c, &net);
    let subnet_net: ipnet::IpNet = subnet.parse().unwrap();
    assert!(subnet_net.contains(&ip), "{ip} not in {subnet}");

    // iptables: accepted ahead of Docker's rules, not masqueraded inside
    // the cluster range; Docker still masquerades the rest.
    let user = iptables(&["-S", "DOCKER-USER"]);
    assert!(user.contains("-A DOCKER-USER -j PORTLESS-FWD"), "{user}");
    let fwd = iptables(&["-S", "PORTLESS-FWD"]);
    assert!(
        fwd.contains(&format!("-A PORTLESS-FWD -s {cidr} -d {cidr} -j ACCEPT")),
        "{fwd}"
    );
    // Docker put its MASQUERADE for the new network at the top of
    // POSTROUTING; portless moves its jump back in front.
    let post = wait_until(
        "PORTLESS-NAT first in POSTROUTING",
        Duration::from_secs(5),
        || {
            let post = iptables(&["-t", "nat", "-S", "POSTROUTING"]);
            let first = post
                .lines()
                .find(|l| l.starts_with("-A POSTROUTING"))?
                .to_owned();
            (first == "-A POSTROUTING -j PORTLESS-NAT").then_some(post)
        },
    );
    let nat = iptables(&["-t", "nat", "-S", "PORTLESS-NAT"]);
    assert!(
        nat.contains(&format!("-A PORTLESS-NAT -s {subnet} -d {cidr} -j ACCEPT")),
        "{nat}"
    );
    assert!(
        !nat.contains("MASQUERADE"),
        "Docker masquerades its own networks: {nat}"
    );
    assert!(
        post.contains(&format!("-s {subnet} ! -o br-")),
        "Docker's MASQUERADE is kept: {post}"
    );

    // Stop: the container goes first (a network in use cannot be removed),
    // then SIGTERM with --cleanup-on-exit removes everything portless made.
    common::docker(&["rm", "-f", &c]);
    assert!(
        Command::new("kill")
            .args(["-TERM", &p.pid().to_string()])
            .status()
            .unwrap()
            .success()
    );
    wait_until("network removed", Duration::from_secs(15), || {
        (!common::run("docker", &["network", "inspect", &net])
            .status
            .success())
        .then_some(())
    });
    wait_until("chains removed", Duration::from_secs(5), || {
        let gone = !iptables(&["-S"]).contains("PORTLESS-FWD")
            && !iptables(&["-t", "nat", "-S"]).contains("PORTLESS-NAT");
        gone.then_some(())
    });
    let user = iptables(&["-S", "DOCKER-USER"]);
    assert!(!user.contains("PORTLESS"), "{user}");
}
