//! Cluster mode of the real `portless run`: every host is a network
//! namespace running the binary with `--docker-host none`, etcd runs in a
//! namespace of its own on the test segment, containers are namespaces on
//! each host's `pl-br0`. Requires root, iproute2, ping, curl and etcd.

#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod common;

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{self, Container, Etcd, Host, Netns, Segment};
use ipnet::Ipv4Net;

const BIN: &str = env!("CARGO_BIN_EXE_portless");

/// `portless run` inside a host namespace; SIGTERM and wait on drop.
struct Portless {
    child: Option<Child>,
    /// Its --state-dir, removed on drop.
    state: Option<std::path::PathBuf>,
}

impl Portless {
    fn start(host: &Host, etcd: &str, extra: &[&str]) -> Portless {
        let mut args = vec![
            "netns",
            "exec",
            &host.ns.name,
            BIN,
            "run",
            "--docker-host",
            "none",
            "--cluster-etcd",
            etcd,
            "--dns-port",
            "0",
            "--no-router",
            "--admin-listen",
            "127.0.0.1:9053",
            "--advertise-addr",
        ];
        let addr = host.addr.to_string();
        args.push(&addr);
        args.extend_from_slice(&["--lease-ttl", "2", "--netplane-resync", "1"]);
        // Not the machine's /var/lib/portless.
        let state_dir = std::env::temp_dir().join(format!("portless-state-{}", host.ns.name));
        let state = state_dir.to_string_lossy().into_owned();
        args.extend_from_slice(&["--state-dir", &state]);
        args.extend_from_slice(extra);
        let child = Command::new("ip")
            .args(&args)
            .env("PORTLESS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("portless");
        Portless {
            child: Some(child),
            state: Some(state_dir),
        }
    }

    /// SIGTERM, then wait for a clean exit.
    fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(st)) = c.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }
}

impl Drop for Portless {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(dir) = self.state.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn cluster_status(ns: &Netns) -> Option<serde_json::Value> {
    let out = ns
        .command(&[
            "curl",
            "-sf",
            "-m",
            "2",
            "http://127.0.0.1:9053/api/cluster",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Wait until the host holds a lease and every one of `peers` peers is in
/// place; returns (subnet, gateway, mtu).
fn wait_ready(host: &Host, peers: usize) -> (Ipv4Net, Ipv4Addr, u32) {
    let end = Instant::now() + Duration::from_secs(15);
    let mut last = None;
    while Instant::now() < end {
        if let Some(s) = cluster_status(&host.ns) {
            let ok = s["host"].is_object()
                && s["peers"].as_array().map(|p| p.len()) == Some(peers)
                && s["peers"]
                    .as_array()
                    .is_some_and(|p| p.iter().all(|p| p["in_place"] == true));
            if ok {
                let h = &s["host"];
                return (
                    h["subnet"].as_str().unwrap().parse().unwrap(),
                    h["gateway"].as_str().unwrap().parse().unwrap(),
                    h["mtu"].as_u64().unwrap() as u32,
                );
            }
            last = Some(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{} not ready; last /api/cluster: {last:#?}", host.ns.name);
}

fn container(
    tag: &str,
    name: &str,
    host: &Host,
    subnet: Ipv4Net,
    gw: Ipv4Addr,
    mtu: u32,
) -> Container {
    let addr = Ipv4Net::new(
        Ipv4Addr::from(u32::from(subnet.network()) + 10),
        subnet.prefix_len(),
    )
    .unwrap();
    Container::new(tag, name, &host.ns, "pl-br0", addr, gw, mtu)
}

fn nothing_left(host: &Host) {
    let links = String::from_utf8(host.ns.ip(&["-o", "link", "show"]).stdout).unwrap();
    assert!(
        !links.contains("pl-vx0") && !links.contains("pl-br0"),
        "{links}"
    );
    let routes = String::from_utf8(host.ns.ip(&["route", "show", "proto", "149"]).stdout).unwrap();
    assert!(routes.trim().is_empty(), "{routes}");
    assert!(!host.ns.try_exec(&["iptables", "-n", "-L", "PORTLESS-FWD"]));
    assert!(
        !host
            .ns
            .try_exec(&["iptables", "-t", "nat", "-n", "-L", "PORTLESS-NAT"])
    );
}

#[test]
fn two_hosts_run_portless_and_containers_reach_each_other() {
    assert!(
        netns::can_run(),
        "needs root, iproute2 and ping (see test.sh)"
    );
    common::require("etcd");
    common::require("curl");
    let tag = netns::unique_tag();
    let seg = Segment::new(&tag, "sw", "192.168.80.0/24");
    let etcd_ns = Netns::new(format!("pl-{tag}-etcd"));
    let etcd_ip = seg.plug(&etcd_ns, "eth0", 250);
    let etcd = Etcd::in_netns(&etcd_ns, etcd_ip);
    let h1 = Host::new(&tag, "h1", &seg, 1);
    let h2 = Host::new(&tag, "h2", &seg, 2);

    let mut p1 = Portless::start(&h1, &etcd.endpoint(), &["--cleanup-on-exit"]);
    let mut p2 = Portless::start(&h2, &etcd.endpoint(), &[]);
    let (n1, g1, mtu1) = wait_ready(&h1, 1);
    let (n2, g2, mtu2) = wait_ready(&h2, 1);
    assert_ne!(n1, n2);
    assert_eq!(mtu1, 1450);
    let c1 = container(&tag, "c1", &h1, n1, g1, mtu1);
    let c2 = container(&tag, "c2", &h2, n2, g2, mtu2);
    assert!(c1.ns.ping_until(c2.addr, 5), "c1 -> c2");
    assert!(c2.ns.ping(c1.addr), "c2 -> c1");
    assert!(c1.ns.ping_size(c2.addr, mtu1), "full-size packet");

    // --cleanup-on-exit: a clean stop removes everything of h1 and gives
    // its lease back, so h2 drops it at once.
    assert!(p1.stop(), "portless on h1 did not stop cleanly");
    nothing_left(&h1);
    wait_ready(&h2, 0);

    // `portless netplane cleanup` after a plain stop.
    assert!(p2.stop(), "portless on h2 did not stop cleanly");
    assert!(
        h2.ns.try_exec(&["ip", "link", "show", "pl-vx0"]),
        "kept without --cleanup-on-exit"
    );
    // Things that are not portless's, even when they look alike: a veth
    // with the name prefix, a static route, an iptables chain and rule.
    h2.ns.ip(&[
        "link", "add", "pl-other", "type", "veth", "peer", "name", "other0",
    ]);
    h2.ns
        .ip(&["route", "add", "10.99.0.0/16", "via", &h1.addr.to_string()]);
    h2.ns.exec(&["iptables", "-N", "OTHER-FWD"]);
    h2.ns
        .exec(&["iptables", "-A", "FORWARD", "-j", "OTHER-FWD"]);
    let out = h2
        .ns
        .command(&[
            BIN,
            "netplane",
            "cleanup",
            "--docker-host",
            "none",
            "--cluster-etcd",
            &etcd.endpoint(),
            "--advertise-addr",
            &h2.addr.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    nothing_left(&h2);
    assert!(
        h2.ns.try_exec(&["ip", "link", "show", "pl-other"]),
        "foreign link removed"
    );
    let routes = String::from_utf8(h2.ns.ip(&["route", "show"]).stdout).unwrap();
    assert!(
        routes.contains("10.99.0.0/16"),
        "foreign route removed: {routes}"
    );
    assert!(
        h2.ns
            .try_exec(&["iptables", "-C", "FORWARD", "-j", "OTHER-FWD"]),
        "foreign rule removed"
    );
}

/// Two segments joined by a router namespace: `auto` tunnels to the far
/// host and routes to the near one; `route` refuses the far host with a
/// reason in /api/cluster; a host killed with SIGKILL disappears from its
/// peers' kernels within the lease TTL plus a second.
#[test]
fn modes_across_a_router_and_dead_host_removal() {
    assert!(
        netns::can_run(),
        "needs root, iproute2 and ping (see test.sh)"
    );
    common::require("etcd");
    common::require("curl");
    let tag = netns::unique_tag();
    let sa = Segment::new(&tag, "sa", "192.168.81.0/24");
    let sb = Segment::new(&tag, "sb", "192.168.82.0/24");
    let r = netns::Router::new(&tag, "rt");
    let ra = sa.plug(&r.ns, "ea", 254);
    let rb = sb.plug(&r.ns, "eb", 254);
    let etcd_ns = Netns::new(format!("pl-{tag}-etcd"));
    let etcd_ip = sa.plug(&etcd_ns, "eth0", 250);
    etcd_ns.ip(&["route", "add", "default", "via", &ra.to_string()]);
    let etcd = Etcd::in_netns(&etcd_ns, etcd_ip);
    let h1 = Host::new(&tag, "h1", &sa, 1);
    let h2 = Host::new(&tag, "h2", &sa, 2);
    let h3 = Host::new(&tag, "h3", &sb, 3);
    h1.default_via(ra);
    h2.default_via(ra);
    h3.default_via(rb);

    let _p1 = Portless::start(&h1, &etcd.endpoint(), &["--netplane-mode", "auto"]);
    let mut p2 = Portless::start(&h2, &etcd.endpoint(), &["--netplane-mode", "auto"]);
    let _p3 = Portless::start(&h3, &etcd.endpoint(), &["--netplane-mode", "auto"]);
    let (n1, g1, m1) = wait_ready(&h1, 2);
    let (n2, g2, m2) = wait_ready(&h2, 2);
    let (n3, g3, m3) = wait_ready(&h3, 2);
    let s1 = cluster_status(&h1.ns).unwrap();
    let transport = |subnet: Ipv4Net| {
        s1["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["subnet"] == subnet.to_string())
            .map(|p| p["transport"].as_str().unwrap().to_owned())
    };
    assert_eq!(transport(n2).as_deref(), Some("route"));
    assert_eq!(transport(n3).as_deref(), Some("vxlan"));
    let c1 = container(&tag, "c1", &h1, n1, g1, m1);
    let c2 = container(&tag, "c2", &h2, n2, g2, m2);
    let c3 = container(&tag, "c3", &h3, n3, g3, m3);
    assert!(c1.ns.ping_until(c2.addr, 5), "same segment");
    assert!(c1.ns.ping_until(c3.addr, 5), "across the router");
    assert!(c3.ns.ping_until(c2.addr, 5), "across the router, back");

    // A fourth host in route mode on the far segment: the near hosts are
    // refused with a reason, visible in its status.
    let h4 = Host::new(&tag, "h4", &sb, 4);
    h4.default_via(rb);
    let _p4 = Portless::start(&h4, &etcd.endpoint(), &["--netplane-mode", "route"]);
    let end = Instant::now() + Duration::from_secs(15);
    let refused = loop {
        let s = cluster_status(&h4.ns);
        if let Some(s) = s
            && s["refused"].as_array().is_some_and(|r| r.len() == 2)
        {
            break s["refused"].clone();
        }
        assert!(Instant::now() < end, "h4 never refused the far hosts");
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = refused.to_string();
    assert!(
        text.contains("not on a directly connected segment"),
        "{text}"
    );

    // SIGKILL h2: no clean stop, the lease runs out (TTL 2 s).
    let killed = Instant::now();
    if let Some(c) = p2.child.as_mut() {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    p2.child = None;
    loop {
        let gone = cluster_status(&h1.ns).is_some_and(|s| {
            s["peers"]
                .as_array()
                .is_some_and(|p| p.iter().all(|p| p["subnet"] != n2.to_string()))
        });
        if gone {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(6),
            "dead host never removed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = killed.elapsed();
    let routes = String::from_utf8(h1.ns.ip(&["route", "show", "proto", "149"]).stdout).unwrap();
    assert!(!routes.contains(&n2.network().to_string()), "{routes}");
    assert!(
        took <= Duration::from_secs(3),
        "removed after {took:?} (TTL 2 s + 1 s)"
    );
    assert!(c1.ns.ping(c3.addr), "the other peers are untouched");
}

/// The etcd security options are checked with the rest of the
/// configuration: a bad combination or file exits with 64 and names the
/// option, before anything is bound or etcd is asked.
#[test]
fn etcd_tls_and_auth_mistakes_exit_64_naming_the_option() {
    struct TempDir(std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = std::env::temp_dir().join(format!("portless-etcd-opts-{}", netns::unique_tag()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = TempDir(dir.clone());
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let garbage = garbage.to_str().unwrap();
    let missing = dir.join("missing");
    let missing = missing.to_str().unwrap();
    let password = dir.join("password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let password = password.to_str().unwrap();
    const TLS: &str = "https://127.0.0.1:1";
    // The endpoint, flags, environment, and what the message must say.
    type Case<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 8] = [
        (
            TLS,
            &["--etcd-ca", garbage, "--etcd-cert", garbage],
            &[],
            "--etcd-cert needs --etcd-key",
        ),
        (TLS, &["--etcd-ca", garbage], &[], "--etcd-ca"),
        (
            TLS,
            &["--etcd-user", "portless"],
            &[],
            "--etcd-user needs --etcd-password-file",
        ),
        (
            TLS,
            &["--etcd-user", "portless"],
            &[("PORTLESS_ETCD_PASSWORD_FILE", missing)],
            "--etcd-password-file",
        ),
        (
            TLS,
            &[],
            &[("PORTLESS_ETCD_KEY", garbage)],
            "--etcd-key needs --etcd-cert",
        ),
        // A password over plain http would cross the network in clear.
        (
            "http://127.0.0.1:1",
            &["--etcd-user", "portless", "--etcd-password-file", password],
            &[],
            "--etcd-user: needs TLS (--etcd-ca or https:// endpoints)",
        ),
        (
            "http://127.0.0.1:1",
            &["--etcd-user", "portless"],
            &[("PORTLESS_ETCD_PASSWORD_FILE", password)],
            "--etcd-user: needs TLS",
        ),
        // A password in the endpoint would show in /api/cluster, unused.
        (
            "https://portless:s3cret@127.0.0.1:1",
            &[],
            &[],
            "use --etcd-user and --etcd-password-file",
        ),
    ];
    for (endpoint, args, env, needle) in cases {
        let child = Command::new(BIN)
            .args(["run", "--docker-host", "none", "--cluster-etcd", endpoint])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Killed on drop: a regression that starts instead of exiting
        // fails here rather than hanging the test (as root).
        let mut p = Portless {
            child: Some(child),
            state: None,
        };
        let status = common::wait_until(
            &format!("portless to exit on {args:?} {env:?}"),
            Duration::from_secs(20),
            || p.child.as_mut().and_then(|c| c.try_wait().unwrap()),
        );
        let mut err = String::new();
        if let Some(mut stderr) = p.child.as_mut().and_then(|c| c.stderr.take()) {
            std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
        }
        assert_eq!(status.code(), Some(64), "{args:?} {env:?}: {err}");
        assert!(err.contains(needle), "{args:?} {env:?}: {err}");
        assert!(!err.contains("s3cret"), "the password shows: {err}");
    }
}
