//! The DNS against the real Docker Engine: real containers and networks,
//! the real `portless` binary, dig from the host and from inside
//! containers' network namespaces, busybox nslookup inside containers.

// Tests may panic on a broken setup, and may block their own thread.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(15);

/// Start portless with a DNS listener on each given gateway and on
/// loopback, all on one free port, and no gateway-following listeners.
fn portless_on(gateways: &[IpAddr], extra: &[&str]) -> (Portless, Vec<SocketAddr>) {
    let port = free_port([127, 0, 0, 1].into());
    let mut addrs: Vec<SocketAddr> = gateways.iter().map(|g| SocketAddr::new(*g, port)).collect();
    addrs.push(SocketAddr::new([127, 0, 0, 1].into(), port));
    let listen: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let mut args: Vec<&str> = vec![
        "--no-router=true",
        "--dns-port",
        "0",
        "--upstream",
        "127.0.0.1:9",
    ];
    for l in &listen {
        args.push("--dns-listen");
        args.push(l);
    }
    args.extend_from_slice(extra);
    (Portless::start(&args), addrs)
}

/// portless without Docker, with one DNS listener on a free loopback port;
/// returns it and that listener's address as text.
fn static_portless(extra: &[&str]) -> (Portless, String) {
    let listen = format!("127.0.0.1:{}", free_port([127, 0, 0, 1].into()));
    (static_portless_on(&listen, extra), listen)
}

/// The flags of a portless without Docker or router, with one DNS
/// listener on `listen`.
fn static_args(listen: &str) -> Vec<&str> {
    vec![
        "--no-router=true",
        "--docker-host",
        "none",
        "--dns-port",
        "0",
        "--dns-listen",
        listen,
    ]
}

/// portless without Docker, with one DNS listener on `listen`.
fn static_portless_on(listen: &str, extra: &[&str]) -> Portless {
    let mut args = static_args(listen);
    args.extend_from_slice(extra);
    Portless::start(&args)
}

fn arpa(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let hex: String = v6.octets().iter().map(|b| format!("{b:02x}")).collect();
            let nibbles: Vec<String> = hex.chars().rev().map(|c| c.to_string()).collect();
            format!("{}.ip6.arpa", nibbles.join("."))
        }
    }
}

fn lo(addrs: &[SocketAddr]) -> SocketAddr {
    *addrs.last().unwrap()
}

#[test]
fn names_and_aliases_resolve_only_inside_their_networks() {
    require("dig");
    require("nsenter");
    let c = Cleanup::new();
    let (front, front_gw) = network(&c, &[]);
    let (back, back_gw) = network(&c, &[]);
    let web = unique("web");
    let db = unique("db");
    let other = unique("oth");
    container(
        &c,
        &web,
        &["--network", &front, "--network-alias", "www"],
        &[],
    );
    container(
        &c,
        &db,
        &["--network", &front, "--network-alias", "database"],
        &[],
    );
    docker(&["network", "connect", "--alias", "store", &back, &db]);
    container(&c, &other, &["--network", &back], &[]);
    let (_p, addrs) = portless_on(&[front_gw, back_gw], &[]);
    let (on_front, on_back) = (addrs[0], addrs[1]);
    let db_front = container_ip(&db, &front).to_string();
    let db_back = container_ip(&db, &back).to_string();
    let web_ip = container_ip(&web, &front).to_string();

    let r = dig_from(&web, on_front, "www", "A");
    assert_eq!(
        (r.status.as_str(), r.answers.clone()),
        ("NOERROR", vec![web_ip.clone()]),
        "{}",
        r.raw
    );
    // db is on both networks, but web shares only `front` with it.
    assert_eq!(
        dig_from(&web, on_front, &db, "A").answers,
        vec![db_front.clone()]
    );
    assert_eq!(
        dig_from(&web, on_front, "database", "A").answers,
        vec![db_front.clone()]
    );
    assert_eq!(
        dig_from(&web, on_front, &format!("{db}.{front}"), "A").answers,
        vec![db_front.clone()]
    );
    assert_eq!(
        dig_from(&other, on_back, "store", "A").answers,
        vec![db_back.clone()]
    );
    assert_eq!(
        dig_from(&other, on_back, &db, "A").answers,
        vec![db_back.clone()]
    );
    // db is on both networks: whichever of its addresses it asks from, it
    // sees both (its queries leave from the address of the network they
    // are routed to).
    let other_ip = container_ip(&other, &back).to_string();
    assert_eq!(
        dig_from(&db, on_front, &other, "A").answers,
        vec![other_ip.clone()]
    );
    assert_eq!(
        dig_from(&db, on_back, "www", "A").answers,
        vec![web_ip.clone()]
    );
    // Isolation: names of a network the client is not on do not exist for it.
    for (client, server, name) in [
        (&web, on_front, "store"),
        (&web, on_front, other.as_str()),
        (&other, on_back, "www"),
        (&other, on_back, "database"),
        (&other, on_back, web.as_str()),
    ] {
        let r = dig_from(client, server, name, "A");
        assert!(
            r.answers.is_empty(),
            "{client} must not resolve {name}: {}",
            r.raw
        );
    }
    let r = dig_from(&other, on_back, &format!("{web}.docker.internal"), "A");
    assert_eq!(r.status, "NXDOMAIN", "{}", r.raw);
    // The host sees everything under the domain, with every address.
    let mut both = vec![db_front.clone(), db_back.clone()];
    both.sort();
    assert_eq!(
        dig(lo(&addrs), &format!("{db}.docker.internal"), "A", &[]).sorted(),
        both
    );
    assert_eq!(
        dig(
            lo(&addrs),
            &format!("{db}.{back}.docker.internal"),
            "A",
            &[]
        )
        .answers,
        vec![db_back.clone()]
    );
    assert_eq!(
        dig(
            lo(&addrs),
            &format!("store.{back}.docker.internal"),
            "A",
            &[]
        )
        .answers,
        vec![db_back]
    );
    assert_eq!(
        dig(
            lo(&addrs),
            &format!("www.{front}.docker.internal"),
            "A",
            &[]
        )
        .answers,
        vec![web_ip]
    );
}

#[test]
fn nodata_nxdomain_soa_and_ptr() {
    let c = Cleanup::new();
    let (net, gw) = network(&c, &[]);
    let app = unique("app");
    container(&c, &app, &["--network", &net], &[]);
    let ip = container_ip(&app, &net);
    let (_p, addrs) = portless_on(&[gw], &["--ttl", "7"]);
    let server = lo(&addrs);

    let r = dig(server, &format!("{app}.docker.internal"), "A", &[]);
    assert_eq!(r.answers, vec![ip.to_string()]);
    assert_eq!(r.ttls, vec![7], "TTL 7 expected: {}", r.raw);
    assert!(r.flags.contains("aa"), "authoritative: {}", r.raw);

    let r = dig(server, &format!("{app}.docker.internal"), "AAAA", &[]);
    assert_eq!(r.status, "NOERROR", "{}", r.raw);
    assert!(r.answers.is_empty());
    assert!(
        r.authority.iter().any(|a| a.starts_with("SOA")),
        "NODATA carries the SOA: {}",
        r.raw
    );

    let r = dig(server, &format!("{app}-missing.docker.internal"), "A", &[]);
    assert_eq!(r.status, "NXDOMAIN", "{}", r.raw);
    assert!(
        r.authority.iter().any(|a| a.starts_with("SOA")),
        "{}",
        r.raw
    );

    let r = dig(server, "docker.internal", "SOA", &[]);
    assert!(
        r.answers
            .first()
            .is_some_and(|a| a.starts_with("ns.docker.internal. hostmaster.docker.internal.")),
        "{}",
        r.raw
    );

    let r = dig(server, &arpa(ip), "PTR", &[]);
    assert_eq!(
        r.answers,
        vec![format!("{app}.{net}.docker.internal.")],
        "{}",
        r.raw
    );
    // Unknown address inside a Docker subnet: ours to deny.
    let unknown: IpAddr = match ip {
        IpAddr::V4(v4) => IpAddr::V4([v4.octets()[0], v4.octets()[1], v4.octets()[2], 250].into()),
        v6 => v6,
    };
    assert_eq!(dig(server, &arpa(unknown), "PTR", &[]).status, "NXDOMAIN");
}

#[test]
fn replicas_answer_all_addresses_shuffled_and_unhealthy_ones_are_left_out() {
    let c = Cleanup::new();
    let (net, gw) = network(&c, &[]);
    let client = unique("cli");
    container(&c, &client, &["--network", &net], &[]);
    let mut ips = Vec::new();
    for _ in 0..3 {
        let n = unique("rep");
        container(
            &c,
            &n,
            &[
                "--network",
                &net,
                "--network-alias",
                "api",
                "--health-cmd",
                "true",
                "--health-interval",
                "1s",
            ],
            &[],
        );
        ips.push(container_ip(&n, &net).to_string());
    }
    let sick = unique("sick");
    container(
        &c,
        &sick,
        &[
            "--network",
            &net,
            "--network-alias",
            "api",
            "--health-cmd",
            "false",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
        ],
        &[],
    );
    let sick_ip = container_ip(&sick, &net).to_string();
    let (_p, addrs) = portless_on(&[gw], &[]);
    ips.sort();
    // Wait for Docker to call `sick` unhealthy and the others healthy.
    wait_until("health states to settle", Duration::from_secs(30), || {
        (dig_from(&client, addrs[0], "api", "A").sorted() == ips).then_some(())
    });
    let orders: std::collections::BTreeSet<Vec<String>> = (0..20)
        .map(|_| dig_from(&client, addrs[0], "api", "A").answers)
        .collect();
    assert!(
        orders.len() > 1,
        "20 answers, always in the same order: {orders:?}"
    );
    assert!(orders.iter().all(|o| !o.contains(&sick_ip)));
}

#[test]
fn containers_appear_move_and_vanish_as_events_arrive() {
    let c = Cleanup::new();
    let (net, gw) = network(&c, &[]);
    let (p, addrs) = portless_on(&[gw], &[]);
    let server = lo(&addrs);
    let app = unique("mov");
    let name = format!("{app}.docker.internal");
    let prefix = gw.to_string();
    let prefix = prefix.trim_end_matches(".1");
    let first = format!("{prefix}.10");
    let second = format!("{prefix}.20");

    container(&c, &app, &["--network", &net, "--ip", &first], &[]);
    wait_until("the new container to resolve", WAIT, || {
        (dig(server, &name, "A", &[]).answers == vec![first.clone()]).then_some(())
    });

    // Restart with a new address.
    docker(&["stop", "-t", "0", &app]);
    wait_until("the stopped container to vanish", WAIT, || {
        (dig(server, &name, "A", &[]).status == "NXDOMAIN").then_some(())
    });
    docker(&["network", "disconnect", &net, &app]);
    docker(&["network", "connect", "--ip", &second, &net, &app]);
    docker(&["start", &app]);
    wait_until("the new address", WAIT, || {
        (dig(server, &name, "A", &[]).answers == vec![second.clone()]).then_some(())
    });

    // Removal.
    docker(&["rm", "-f", &app]);
    wait_until("the removed container to vanish", WAIT, || {
        (dig(server, &name, "A", &[]).status == "NXDOMAIN").then_some(())
    });
    let m = p.metrics();
    assert!(
        m.contains("portless_discovery_event_to_answer_seconds_count"),
        "{m}"
    );
}

#[test]
fn default_bridge_containers_have_names_too() {
    let c = Cleanup::new();
    let a = unique("dfa");
    let b = unique("dfb");
    container(&c, &a, &[], &[]);
    container(&c, &b, &[], &[]);
    let gw: IpAddr = docker(&[
        "network",
        "inspect",
        "bridge",
        "-f",
        "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
    ])
    .parse()
    .unwrap_or_else(|_| "172.17.0.1".parse().unwrap());
    let (_p, addrs) = portless_on(&[gw], &[]);
    let a_ip = container_ip(&a, "bridge").to_string();
    assert_eq!(
        dig(lo(&addrs), &format!("{a}.docker.internal"), "A", &[]).answers,
        vec![a_ip.clone()]
    );
    assert_eq!(dig_from(&b, addrs[0], &a, "A").answers, vec![a_ip]);
}

#[test]
fn compose_services_resolve_by_service_and_project() {
    let c = Cleanup::new();
    busybox_image();
    // Pick a free subnet by creating (and removing) a throwaway network.
    let (probe, gw) = {
        let probe_cleanup = Cleanup::new();
        let (n, gw) = network(&probe_cleanup, &[]);
        (n, gw)
    };
    let _ = probe;
    let gw_s = gw.to_string();
    let subnet = format!("{}.0/24", gw_s.trim_end_matches(".1"));
    let compose = format!(
        "version: '2.4'\nservices:\n  web:\n    image: {IMAGE}\n    command: sleep 3600\n    scale: 2\n    labels: ['portless-test=1']\n  client:\n    image: {IMAGE}\n    command: sleep 3600\n    labels: ['portless-test=1']\nnetworks:\n  default:\n    labels: ['portless-test=1']\n    ipam:\n      config:\n        - subnet: {subnet}\n          gateway: {gw_s}\n"
    );
    let project = compose_up(&c, "proj", &compose);
    let (_p, addrs) = portless_on(&[gw], &[]);
    let ids = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={project}"),
        "--filter",
        "label=com.docker.compose.service=web",
    ]);
    let net = format!("{project}_default");
    let mut web_ips: Vec<String> = ids
        .lines()
        .map(|id| container_ip(id, &net).to_string())
        .collect();
    web_ips.sort();
    assert_eq!(web_ips.len(), 2);
    let client = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={project}"),
        "--filter",
        "label=com.docker.compose.service=client",
    ]);
    assert_eq!(dig_from(&client, addrs[0], "web", "A").sorted(), web_ips);
    assert_eq!(
        dig_from(&client, addrs[0], &format!("web.{project}"), "A").sorted(),
        web_ips
    );
    assert_eq!(
        dig(
            lo(&addrs),
            &format!("web.{project}.docker.internal"),
            "A",
            &[]
        )
        .sorted(),
        web_ips
    );
}

#[test]
fn other_names_are_forwarded_faithfully_with_failover_and_tcp_retry() {
    let mut hosts = String::from("192.0.2.7 a.upstream.test\n");
    for i in 1..=60 {
        hosts.push_str(&format!("192.0.2.{i} big.upstream.test\n"));
    }
    // The first upstream knows nothing (REFUSED), the second is dead, the
    // third answers: portless must get through to it.
    let empty = common::dnsmasq::Dnsmasq::start("", "nothing.test");
    let good = common::dnsmasq::Dnsmasq::start(&hosts, "upstream.test");
    let dead = format!("127.0.0.1:{}", free_port([127, 0, 0, 1].into()));
    let ups = format!("{},{},{}", empty.addr, dead, good.addr);
    let (p, listen) = static_portless(&["--upstream", &ups]);
    let server: SocketAddr = listen.parse().unwrap();

    let r = dig(server, "a.upstream.test", "A", &[]);
    assert_eq!(r.answers, vec!["192.0.2.7"], "{}", r.raw);
    assert_eq!(r.ttls, vec![1234], "upstream TTL kept: {}", r.raw);
    let r = dig(server, "nope.upstream.test", "A", &[]);
    assert_eq!(r.status, "NXDOMAIN", "upstream rcode kept: {}", r.raw);
    // Too big for dnsmasq's 512-byte UDP answers: portless retries over TCP
    // and returns all of it to a client that reads over TCP.
    let r = dig(server, "big.upstream.test", "A", &["+tcp"]);
    assert_eq!(r.answers.len(), 60, "{}", r.raw);
    let m = p.metrics();
    assert!(
        m.contains("portless_dns_forward_tcp_retries_total ")
            && !m.contains("portless_dns_forward_tcp_retries_total 0"),
        "{m}"
    );
    // Truncation towards our own client: no EDNS means 512 bytes.
    let r = dig(server, "big.upstream.test", "A", &["+noedns", "+ignore"]);
    assert!(r.flags.contains("tc"), "TC expected: {}", r.raw);
}

#[test]
fn strangers_are_refused_and_allowed_ranges_are_not() {
    require("ip");
    let c = Cleanup::new();
    let ns = unique("plr");
    let (host_if, ns_if) = (unique("plh"), unique("plc"));
    let third = std::process::id() % 250;
    let host_ip = format!("198.18.{third}.1");
    let ns_ip = format!("198.18.{third}.2");
    ok("ip", &["netns", "add", &ns]);
    c.push(&["ip", "netns", "del", &ns]);
    ok(
        "ip",
        &[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ],
    );
    c.push(&["ip", "link", "del", &host_if]);
    ok("ip", &["link", "set", &ns_if, "netns", &ns]);
    ok(
        "ip",
        &["addr", "add", &format!("{host_ip}/30"), "dev", &host_if],
    );
    ok("ip", &["link", "set", &host_if, "up"]);
    ok(
        "ip",
        &[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns_if,
        ],
    );
    ok("ip", &["-n", &ns, "link", "set", &ns_if, "up"]);
    let port = free_port(host_ip.parse().unwrap());
    let listen = format!("{host_ip}:{port}");
    let hosts = std::env::temp_dir().join(unique("plhf-"));
    std::fs::write(&hosts, "192.0.2.44 static.example\n").unwrap();
    c.push(&["rm", "-f", hosts.to_str().unwrap()]);
    let h = hosts.to_str().unwrap();
    let dig_ns = |name: &str| {
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "dig",
                &format!("@{host_ip}"),
                "-p",
                &port.to_string(),
                name,
                "A",
                "+tries=1",
                "+time=3",
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    {
        let _p = static_portless_on(&listen, &["--hosts-file", h, "--upstream", "127.0.0.1:9"]);
        let out = dig_ns("static.example");
        assert!(out.contains("status: REFUSED"), "{out}");
        let out = dig_ns("example.org");
        assert!(
            out.contains("status: REFUSED"),
            "portless is no open resolver: {out}"
        );
    }
    let allow = format!("{ns_ip}/32");
    let _p = static_portless_on(
        &listen,
        &[
            "--hosts-file",
            h,
            "--dns-allow",
            &allow,
            "--upstream",
            "127.0.0.1:9",
        ],
    );
    let out = dig_ns("static.example");
    assert!(
        out.contains("status: NOERROR") && out.contains("192.0.2.44"),
        "{out}"
    );
}

#[test]
fn hosts_file_and_ingress_zones_answer_and_reload() {
    let hosts = std::env::temp_dir().join(unique("plhf-"));
    std::fs::write(&hosts, "192.0.2.10 nas.lan nas-alias.lan\nbad line here\n").unwrap();
    let h = hosts.to_str().unwrap().to_owned();
    let (_p, listen) = static_portless(&[
        "--hosts-file",
        &h,
        "--ingress-zone",
        "apps.example.com=192.0.2.80",
        "--upstream",
        "127.0.0.1:9",
    ]);
    let server: SocketAddr = listen.parse().unwrap();
    assert_eq!(dig(server, "nas.lan", "A", &[]).answers, vec!["192.0.2.10"]);
    assert_eq!(
        dig(server, "nas-alias.lan", "A", &[]).answers,
        vec!["192.0.2.10"]
    );
    assert_eq!(
        dig(server, "shop.apps.example.com", "A", &[]).answers,
        vec!["192.0.2.80"]
    );
    assert_eq!(
        dig(server, "a.b.apps.example.com", "A", &[]).answers,
        vec!["192.0.2.80"]
    );
    std::fs::write(&hosts, "192.0.2.11 nas.lan\n").unwrap();
    wait_until("the hosts file to reload", WAIT, || {
        (dig(server, "nas.lan", "A", &[]).answers == vec!["192.0.2.11"]).then_some(())
    });
    std::fs::remove_file(&hosts).unwrap();
}

#[test]
fn malformed_packets_get_formerr_or_are_dropped_and_nothing_crashes() {
    use std::net::UdpSocket;
    let (p, listen) = static_portless(&["--upstream", "127.0.0.1:9"]);
    let server: SocketAddr = listen.parse().unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // A header that promises a question and has none.
    let header_only = [0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    sock.send_to(&header_only, server).unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = sock
        .recv_from(&mut buf)
        .expect("an answer to a truncated question");
    assert!(n >= 12 && buf[0] == 0x12 && buf[1] == 0x34, "same id");
    assert_eq!(buf[3] & 0x0f, 1, "FORMERR");
    // Garbage of every length.
    for len in [0usize, 1, 5, 11, 12, 13, 40, 300, 1500] {
        let junk: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
        sock.send_to(&junk, server).unwrap();
    }
    // Two questions in one message.
    let mut two = vec![0xab, 0xcd, 0x01, 0x00, 0x00, 0x02, 0, 0, 0, 0, 0, 0];
    for _ in 0..2 {
        two.extend_from_slice(&[1, b'a', 0, 0, 1, 0, 1]);
    }
    sock.send_to(&two, server).unwrap();
    // Still alive and answering.
    let r = dig(server, "docker.internal", "SOA", &[]);
    assert_eq!(r.status, "NOERROR", "{}", r.raw);
    assert!(
        p.metrics().contains("outcome=\"formerr\""),
        "{}",
        p.metrics()
    );
}

#[test]
fn bad_configuration_exits_64_with_a_clear_message() {
    let dir = std::env::temp_dir().join(unique("plcfg-"));
    std::fs::create_dir_all(&dir).unwrap();
    let bad_key = dir.join("bad.toml");
    std::fs::write(&bad_key, "[dns]\ndns-prot = 53\n").unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/examples/portless.toml"
        ))
        .unwrap(),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_portless");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "run".into(),
                "--config".into(),
                bad_key.display().to_string(),
            ],
            "dns-prot",
        ),
        (vec!["run".into(), "--ttl".into(), "soon".into()], "--ttl"),
        (
            vec![
                "run".into(),
                "--ingress-zone".into(),
                "apps.example.com".into(),
            ],
            "ZONE=ADDR",
        ),
        (
            vec!["run".into(), "--upstream".into(), "resolver.example".into()],
            "--upstream",
        ),
        (
            vec!["run".into(), "--docker-host".into(), "ftp://x".into()],
            "--docker-host",
        ),
        (
            vec![
                "run".into(),
                "--config".into(),
                dir.join("missing.toml").display().to_string(),
            ],
            "cannot read",
        ),
        (
            vec![
                "run".into(),
                "--hosts-file".into(),
                dir.join("no-hosts").display().to_string(),
            ],
            "--hosts-file",
        ),
        (
            vec!["run".into(), "--log".into(), "info,[[".into()],
            "--log",
        ),
        (
            vec![
                "run".into(),
                "--forward-max-inflight".into(),
                "100000000".into(),
            ],
            "--forward-max-inflight",
        ),
    ];
    for (args, needle) in cases {
        let out = std::process::Command::new(bin)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?} should mention {needle}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cut_event_stream_is_resynced_with_no_stale_or_missing_names() {
    let c = Cleanup::new();
    let (net, _gw) = network(&c, &[]);
    let proxy = common::docker_proxy::DockerProxy::start();
    let host = format!("tcp://{}", proxy.addr);
    let port = free_port([127, 0, 0, 1].into());
    let listen = format!("127.0.0.1:{port}");
    let p = Portless::start(&[
        "--no-router=true",
        "--docker-host",
        &host,
        "--dns-port",
        "0",
        "--dns-listen",
        &listen,
        "--upstream",
        "127.0.0.1:9",
    ]);
    let server: SocketAddr = listen.parse().unwrap();
    let old = unique("old");
    container(&c, &old, &["--network", &net], &[]);
    let old_name = format!("{old}.docker.internal");
    wait_until("the first container", WAIT, || {
        (dig(server, &old_name, "A", &[]).answers.len() == 1).then_some(())
    });

    proxy.cut();
    wait_until("portless to notice the cut", WAIT, || {
        p.metrics()
            .contains("portless_docker_connected 0")
            .then_some(())
    });
    // Changes while portless is blind.
    docker(&["rm", "-f", &old]);
    let new = unique("new");
    container(&c, &new, &["--network", &net], &[]);
    let new_name = format!("{new}.docker.internal");
    // Until it reconnects it keeps answering from the last catalog.
    assert_eq!(dig(server, &old_name, "A", &[]).answers.len(), 1);
    proxy.restore();
    wait_until("the resync", Duration::from_secs(20), || {
        (dig(server, &new_name, "A", &[]).answers.len() == 1
            && dig(server, &old_name, "A", &[]).status == "NXDOMAIN")
            .then_some(())
    });
    let m = p.metrics();
    assert!(!m.contains("portless_docker_reconnects_total 0"), "{m}");
}

/// Tests that serve DNS on port 53 of every gateway cannot overlap.
static PORT_53: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn gateway_listeners_follow_networks_and_containers_resolve_through_docker_dns() {
    let _serial = PORT_53.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cleanup::new();
    let port = free_port([127, 0, 0, 1].into());
    let listen = format!("127.0.0.1:{port}");
    let p = Portless::start(&[
        "--no-router=true",
        "--dns-listen",
        &listen,
        "--upstream",
        "127.0.0.1:9",
    ]);
    // A network made after start gets a listener on its gateway.
    let (net, gw) = network(&c, &[]);
    let gw53 = format!("\"{gw}:53\"");
    wait_until("a listener on the new gateway", WAIT, || {
        http_get(p.admin, "/api/status")?
            .contains(&gw53)
            .then_some(())
    });
    let target = unique("tgt");
    container(&c, &target, &["--network", &net], &[]);
    let target_ip = container_ip(&target, &net).to_string();
    // The client uses Docker's own 127.0.0.11, which forwards what it does
    // not know (names under our domain) to portless, from the client's IP.
    let client = unique("cli");
    let gw_s = gw.to_string();
    container(&c, &client, &["--network", &net, "--dns", &gw_s], &[]);
    let name = format!("{target}.docker.internal");
    let out = wait_until("nslookup inside the container", WAIT, || {
        let out = run("docker", &["exec", &client, "nslookup", "-type=a", &name]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains(&target_ip).then_some(text)
    });
    assert!(out.contains(&name), "{out}");
    // Asked straight at the gateway, too.
    let out = docker(&["exec", &client, "nslookup", "-type=a", &target, &gw_s]);
    assert!(out.contains(&target_ip), "{out}");
    // The network goes, so does its listener.
    docker(&["rm", "-f", &client, &target]);
    docker(&["network", "rm", &net]);
    wait_until("the listener to close", WAIT, || {
        (!http_get(p.admin, "/api/status")?.contains(&gw53)).then_some(())
    });
    // `portless status` shows what it knows, as tables.
    let out = ok(
        env!("CARGO_BIN_EXE_portless"),
        &["status", "--admin", &p.admin.to_string()],
    );
    assert!(
        out.contains("LISTENERS")
            && out.contains(&listen)
            && out.contains("NETWORKS")
            && out.contains("CONTAINERS"),
        "{out}"
    );
}

#[test]
fn ipv6_networks_answer_aaaa_and_ip6_ptr() {
    let c = Cleanup::new();
    let third = std::process::id() % 250;
    let v6 = format!("fd00:5eed:{third:x}::/64");
    let (net, gw) = network(&c, &["--ipv6", "--subnet", &v6]);
    let app = unique("six");
    let peer = unique("pee");
    container(&c, &app, &["--network", &net], &[]);
    container(&c, &peer, &["--network", &net], &[]);
    let fmt = format!("{{{{(index .NetworkSettings.Networks \"{net}\").GlobalIPv6Address}}}}");
    let app6: IpAddr = docker(&["inspect", "-f", &fmt, &app]).parse().unwrap();
    let (_p, addrs) = portless_on(&[gw], &[]);
    let r = dig(lo(&addrs), &format!("{app}.docker.internal"), "AAAA", &[]);
    assert_eq!(r.answers, vec![app6.to_string()], "{}", r.raw);
    let r = dig_from(&peer, addrs[0], &app, "AAAA");
    assert_eq!(r.answers, vec![app6.to_string()], "{}", r.raw);
    let r = dig(lo(&addrs), &arpa(app6), "PTR", &[]);
    assert_eq!(
        r.answers,
        vec![format!("{app}.{net}.docker.internal.")],
        "{}",
        r.raw
    );
}

#[test]
fn forwarding_is_bounded_in_time_and_concurrency() {
    // An upstream that reads queries and never answers.
    let blackhole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let up = blackhole.local_addr().unwrap().to_string();
    let (p, listen) = static_portless(&[
        "--upstream",
        &up,
        "--forward-max-inflight",
        "2",
        "--forward-timeout-ms",
        "1500",
    ]);
    let server: SocketAddr = listen.parse().unwrap();
    let handles: Vec<_> = (0..10)
        .map(|i| {
            std::thread::spawn(move || {
                dig(server, &format!("n{i}.example.org"), "A", &["+time=5"]).status
            })
        })
        .collect();
    let statuses: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(statuses.iter().all(|s| s == "SERVFAIL"), "{statuses:?}");
    let m = p.metrics();
    let overloaded: u64 = m
        .lines()
        .find(|l| l.starts_with("portless_dns_forwarded_total{result=\"overloaded\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0);
    assert!(overloaded >= 1, "queries over the bound must be shed: {m}");
    assert!(
        m.contains("portless_dns_forwarded_total{result=\"failed\"}"),
        "{m}"
    );
    drop(blackhole);
}

#[test]
fn edns_versions_above_zero_get_badvers() {
    let (_p, listen) = static_portless(&["--upstream", "127.0.0.1:9"]);
    let r = dig(
        listen.parse().unwrap(),
        "docker.internal",
        "SOA",
        &["+edns=1", "+noednsneg"],
    );
    assert_eq!(r.status, "BADVERS", "{}", r.raw);
    let r = dig(
        listen.parse().unwrap(),
        "docker.internal",
        "SOA",
        &["+edns=0"],
    );
    assert_eq!(r.status, "NOERROR", "{}", r.raw);
}

/// A container that resolves a name the moment it starts (what an app does
/// with its database) is answered with its network's scope from its first
/// query, before discovery has seen it start: its address alone, inside a
/// known network's subnet, says which network it is on. Through Docker's
/// 127.0.0.11 on a user-defined network, and straight at the gateway on the
/// default bridge.
#[test]
fn a_starting_container_is_answered_from_its_first_query() {
    let _serial = PORT_53.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cleanup::new();
    let (net, gw) = network(&c, &[]);
    let db = unique("db");
    container(&c, &db, &["--network", &net], &[]);
    let db_ip = container_ip(&db, &net).to_string();
    let bdb = unique("bdb");
    container(&c, &bdb, &[], &[]);
    let bdb_ip = container_ip(&bdb, "bridge").to_string();
    let bridge_gw: IpAddr = docker(&[
        "network",
        "inspect",
        "bridge",
        "-f",
        "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
    ])
    .parse()
    .unwrap_or_else(|_| "172.17.0.1".parse().unwrap());
    let on_net = format!("{gw}:53");
    let on_bridge = format!("{bridge_gw}:53");
    let _p = Portless::start(&[
        "--no-router=true",
        "--dns-port",
        "0",
        "--dns-listen",
        &on_net,
        "--dns-listen",
        &on_bridge,
        "--upstream",
        "127.0.0.1:9",
    ]);
    let gw_s = gw.to_string();
    let bridge_gw_s = bridge_gw.to_string();
    let name = format!("{db}.docker.internal");
    let mut failures = Vec::new();
    for i in 0..20 {
        // Alternate: 127.0.0.11 on the user-defined network (which forwards
        // names under our domain to portless from the client's address),
        // and the default bridge, whose containers ask the gateway directly.
        let (args, target, want) = if i % 2 == 0 {
            (
                vec!["--network", net.as_str(), "--dns", gw_s.as_str()],
                name.as_str(),
                &db_ip,
            )
        } else {
            (vec!["--dns", bridge_gw_s.as_str()], bdb.as_str(), &bdb_ip)
        };
        let run_name = unique("fq");
        c.push(&["docker", "rm", "-f", &run_name]);
        let mut all = vec!["run", "--rm", "--label", LABEL, "--name", &run_name];
        all.extend_from_slice(&args);
        all.extend_from_slice(&[IMAGE, "nslookup", "-type=a", target]);
        let out = run("docker", &all);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() || !text.contains(want.as_str()) {
            failures.push(format!("run {i} ({target}): {text}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 20 first queries not answered:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// One DNS query for `name` (type A) over TCP, with its length prefix.
fn tcp_query(id: u16, name: &str) -> Vec<u8> {
    let mut msg = id.to_be_bytes().to_vec();
    msg.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        msg.push(label.len() as u8);
        msg.extend_from_slice(label.as_bytes());
    }
    msg.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&msg);
    framed
}

#[test]
fn the_default_log_level_writes_nothing_per_query() {
    use std::io::{Read, Write};
    let listen = format!("127.0.0.1:{}", free_port([127, 0, 0, 1].into()));
    // No --log: the default filter, as users run it.
    let p = Portless::start_logging(
        &[static_args(&listen), vec!["--upstream", "127.0.0.1:9"]].concat(),
        &[],
        None,
    );
    // Let start-up lines settle, then count.
    std::thread::sleep(Duration::from_millis(300));
    let before = p.logs().lines().count();
    const QUERIES: u16 = 200;
    let mut s = std::net::TcpStream::connect(&listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut batch = Vec::new();
    for i in 0..QUERIES {
        batch.extend_from_slice(&tcp_query(i, "docker.internal"));
    }
    s.write_all(&batch).unwrap();
    for _ in 0..QUERIES {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut msg).unwrap();
    }
    drop(s);
    std::thread::sleep(Duration::from_millis(300));
    let logs = p.logs();
    let grown = logs.lines().count() - before;
    assert!(
        grown < 10,
        "{QUERIES} TCP queries wrote {grown} log lines at the default level:\n{}",
        logs.lines()
            .skip(before)
            .take(10)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// An `--internal` network is meant to be cut off from the outside; portless
/// must not be a DNS channel out of it. A container whose networks are all
/// internal gets names from the catalog and nothing forwarded; a container
/// on a normal network still gets forwarded answers.
#[test]
fn containers_on_internal_networks_get_catalog_answers_only() {
    let c = Cleanup::new();
    let (inet, igw) = network(&c, &["--internal"]);
    let (onet, ogw) = network(&c, &[]);
    let shut = unique("int");
    let peer = unique("ipr");
    let open = unique("opn");
    container(&c, &shut, &["--network", &inet], &[]);
    container(&c, &peer, &["--network", &inet], &[]);
    container(&c, &open, &["--network", &onet], &[]);
    let peer_ip = container_ip(&peer, &inet).to_string();
    let up = common::dnsmasq::Dnsmasq::start("192.0.2.7 a.upstream.test\n", "upstream.test");
    let ups = up.addr.to_string();
    let (_p, addrs) = portless_on(&[igw, ogw], &["--upstream", &ups]);
    let (on_internal, on_open) = (addrs[0], addrs[1]);

    // Control: a container on a normal network gets the upstream's answer.
    let r = dig_from(&open, on_open, "a.upstream.test", "A");
    assert_eq!(r.answers, vec!["192.0.2.7"], "{}", r.raw);
    // The internal container gets its network's names...
    let r = dig_from(&shut, on_internal, &peer, "A");
    assert_eq!(r.answers, vec![peer_ip], "{}", r.raw);
    // ...and nothing from upstream, forward or reverse.
    let r = dig_from(&shut, on_internal, "a.upstream.test", "A");
    assert_eq!(r.status, "REFUSED", "{}", r.raw);
    let r = dig_from(&shut, on_internal, "7.2.0.192.in-addr.arpa", "PTR");
    assert_eq!(r.status, "REFUSED", "{}", r.raw);
    // Nor does a container of the internal network that portless has not
    // seen yet (scoped by its subnet): make an address in the subnet and ask
    // from it through the peer's namespace.
    let stranger = match igw {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.200", o[0], o[1], o[2])
        }
        v6 => panic!("an IPv4 test network expected, got {v6}"),
    };
    let pid = container_pid(&peer);
    ok(
        "nsenter",
        &[
            "-t",
            &pid,
            "-n",
            "ip",
            "addr",
            "add",
            &format!("{stranger}/32"),
            "dev",
            "eth0",
        ],
    );
    let out = run(
        "nsenter",
        &[
            "-t",
            &pid,
            "-n",
            "dig",
            &format!("@{}", on_internal.ip()),
            "-p",
            &on_internal.port().to_string(),
            "-b",
            &stranger,
            "a.upstream.test",
            "A",
            "+tries=1",
            "+time=3",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("status: REFUSED"), "{text}");
}

/// Two compose projects on one shared network, each with a `db`: a compose
/// client's bare `db` is its own project's, the other's is `db.PROJECT`; a
/// container outside compose still gets every `db`.
#[test]
fn a_bare_service_name_is_the_clients_own_projects() {
    let c = Cleanup::new();
    let (net, gw) = network(&c, &[]);
    let yaml = |with_client: bool| {
        let client = if with_client {
            format!(
                "  client:\n    image: {IMAGE}\n    command: sleep 3600\n    labels: ['portless-test=1']\n"
            )
        } else {
            String::new()
        };
        format!(
            "version: '2.4'\nservices:\n  db:\n    image: {IMAGE}\n    command: sleep 3600\n    scale: 2\n    labels: ['portless-test=1']\n{client}networks:\n  default:\n    external:\n      name: {net}\n"
        )
    };
    let p1 = compose_up(&c, "pa", &yaml(true));
    let p2 = compose_up(&c, "pb", &yaml(false));
    let plain = unique("pln");
    container(&c, &plain, &["--network", &net], &[]);
    let (_p, addrs) = portless_on(&[gw], &[]);
    let service_ips = |project: &str, service: &str| {
        let ids = docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=com.docker.compose.project={project}"),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ]);
        let mut ips: Vec<String> = ids
            .lines()
            .map(|id| container_ip(id, &net).to_string())
            .collect();
        ips.sort();
        ips
    };
    let db1 = service_ips(&p1, "db");
    let db2 = service_ips(&p2, "db");
    assert_eq!((db1.len(), db2.len()), (2, 2));
    let client = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={p1}"),
        "--filter",
        "label=com.docker.compose.service=client",
    ]);
    let on = addrs[0];
    assert_eq!(
        dig_from(&client, on, "db", "A").sorted(),
        db1,
        "own project"
    );
    assert_eq!(
        dig_from(&client, on, "db.docker.internal", "A").sorted(),
        db1,
        "own project, with the domain"
    );
    assert_eq!(
        dig_from(&client, on, &format!("db.{p2}"), "A").sorted(),
        db2
    );
    assert_eq!(
        dig_from(&client, on, &format!("db.{p1}"), "A").sorted(),
        db1
    );
    let mut all = [db1.clone(), db2.clone()].concat();
    all.sort();
    assert_eq!(
        dig_from(&plain, on, "db", "A").sorted(),
        all,
        "a client outside compose sees every replica"
    );
}

/// `docker stop` announces a container's end (its `kill` event) seconds
/// before it dies. The router stops sending to it at once; DNS must too,
/// while another replica remains.
#[test]
fn a_replica_being_stopped_leaves_answers_while_another_remains() {
    let c = Cleanup::new();
    let (net, gw) = network(&c, &[]);
    let client = unique("cli");
    container(&c, &client, &["--network", &net], &[]);
    let (stay, going) = (unique("sty"), unique("gon"));
    // busybox `sleep` as PID 1 ignores SIGTERM: `docker stop -t 20` keeps
    // it alive, draining, until the SIGKILL 20 s later.
    for n in [&stay, &going] {
        container(&c, n, &["--network", &net, "--network-alias", "api"], &[]);
    }
    let stay_ip = container_ip(&stay, &net).to_string();
    let going_ip = container_ip(&going, &net).to_string();
    let (_p, addrs) = portless_on(&[gw], &[]);
    let mut both = vec![stay_ip.clone(), going_ip];
    both.sort();
    assert_eq!(dig_from(&client, addrs[0], "api", "A").sorted(), both);
    let going_c = going.clone();
    let stopper = std::thread::spawn(move || run("docker", &["stop", "-t", "20", &going_c]));
    wait_until(
        "the replica being stopped to leave the answers",
        Duration::from_secs(8),
        || (dig_from(&client, addrs[0], "api", "A").answers == vec![stay_ip.clone()]).then_some(()),
    );
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Running}}", &going]),
        "true",
        "left out while still running (draining), not because it died"
    );
    // The host-side name of the draining container itself still answers:
    // it is the only one behind it.
    let r = dig(lo(&addrs), &format!("{going}.docker.internal"), "A", &[]);
    assert_eq!(r.answers.len(), 1, "{}", r.raw);
    docker(&["kill", &going]);
    let _ = stopper.join();
}

/// What Docker's own resolver (127.0.0.11) answers a container, portless
/// answers the same: container name, short id (also the default
/// hostname), alias, and the network-qualified forms.
#[test]
fn container_names_match_dockers_resolver() {
    let c = Cleanup::new();
    let (net, gw) = network(&c, &[]);
    let web = unique("web");
    let client = unique("cli");
    let id = container(
        &c,
        &web,
        &["--network", &net, "--network-alias", "www"],
        &[],
    );
    container(&c, &client, &["--network", &net], &[]);
    let web_ip = container_ip(&web, &net).to_string();
    let (_p, addrs) = portless_on(&[gw], &[]);
    let docker_dns: SocketAddr = "127.0.0.11:53".parse().unwrap();
    let short = &id[..12];
    let hostname = docker(&["exec", &web, "hostname"]);
    assert_eq!(hostname, short, "the default hostname is the short id");
    let names = [
        web.clone(),
        short.to_owned(),
        "www".to_owned(),
        format!("{web}.{net}"),
        format!("www.{net}"),
        format!("{short}.{net}"),
    ];
    let mut differ = Vec::new();
    for name in &names {
        let theirs = dig_from(&client, docker_dns, name, "A");
        let ours = dig_from(&client, addrs[0], name, "A");
        assert_eq!(
            theirs.answers,
            vec![web_ip.clone()],
            "Docker's resolver answers {name}: {}",
            theirs.raw
        );
        if ours.answers != theirs.answers {
            differ.push(format!(
                "{name}: Docker {:?}, portless {} {:?}",
                theirs.answers, ours.status, ours.answers
            ));
        }
    }
    assert!(differ.is_empty(), "{differ:#?}");
}

/// A host address other than loopback (loopback is never rate limited):
/// the gateway of a network the test makes.
fn host_address(c: &Cleanup) -> IpAddr {
    network(c, &[]).1
}

/// Send `n` A queries for `name` from `from` to `server` (`gap` apart) and
/// count the replies: (full answers, truncated ones).
fn udp_burst(from: IpAddr, server: SocketAddr, name: &str, n: u16, gap: Duration) -> (u32, u32) {
    let sock = std::net::UdpSocket::bind((from, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    let reader = sock.try_clone().unwrap();
    let counter = std::thread::spawn(move || {
        let (mut full, mut tc) = (0u32, 0u32);
        let mut buf = [0u8; 1500];
        while let Ok(len) = reader.recv(&mut buf) {
            assert!(len >= 12, "short reply");
            let truncated = buf[2] & 0x02 != 0;
            let answers = u16::from_be_bytes([buf[6], buf[7]]);
            if truncated {
                assert_eq!(answers, 0, "a slipped reply carries no answer");
                tc += 1;
            } else if answers > 0 {
                full += 1;
            }
        }
        (full, tc)
    });
    for i in 0..n {
        let q = tcp_query(i, name);
        sock.send_to(&q[2..], server).unwrap();
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
    }
    counter.join().unwrap()
}

/// Spoofed sources turn a resolver into a reflector: replies per client
/// address are limited (token bucket), and over the limit every second
/// reply is a small truncated one (slip) so a real client retries over
/// TCP, while the rest are dropped. A normal client is not affected.
#[test]
fn replies_to_one_address_are_rate_limited_with_slip() {
    let c = Cleanup::new();
    let flood_from = host_address(&c);
    let normal_from = host_address(&c);
    let port = free_port(normal_from);
    let listen = SocketAddr::new(normal_from, port);
    let hosts = std::env::temp_dir().join(unique("plrrl-"));
    std::fs::write(&hosts, "192.0.2.5 big.test\n").unwrap();
    c.push(&["rm", "-f", hosts.to_str().unwrap()]);
    let p = static_portless_on(
        &listen.to_string(),
        &[
            "--hosts-file",
            hosts.to_str().unwrap(),
            "--upstream",
            "127.0.0.1:9",
            "--dns-rate-limit",
            "20",
        ],
    );
    let (full, slipped) = udp_burst(flood_from, listen, "big.test", 400, Duration::ZERO);
    assert!(
        (10..=45).contains(&full),
        "400 queries at once, 20/s allowed: {full} full answers"
    );
    let limited = 400 - full;
    assert!(
        slipped >= limited / 3 && slipped <= limited / 2 + 5,
        "about every second limited reply slips: {slipped} of {limited}"
    );
    // A normal client at another address, at 10 queries a second and in a
    // burst within the allowance, gets every answer.
    let (full, slipped) = udp_burst(
        normal_from,
        listen,
        "big.test",
        20,
        Duration::from_millis(100),
    );
    assert_eq!((full, slipped), (20, 0));
    let (full, slipped) = udp_burst(normal_from, listen, "big.test", 15, Duration::ZERO);
    assert_eq!((full, slipped), (15, 0));
    let m = p.metrics();
    let count = |action: &str| -> u64 {
        let key = format!("portless_dns_rate_limited_total{{action=\"{action}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(&key)?.parse().ok())
            .unwrap_or(0)
    };
    assert!(count("slip") > 0 && count("drop") > 0, "{m}");
}

/// A rebuild with nothing new (the hosts file rewritten as it was, the
/// periodic look at host addresses) neither counts the last Docker event
/// again in the event-to-answer histogram nor raises the SOA serial.
#[test]
fn rebuilds_without_a_change_keep_the_serial_and_count_no_event_again() {
    let c = Cleanup::new();
    let (net, _gw) = network(&c, &[]);
    let hosts = std::env::temp_dir().join(unique("plser-"));
    std::fs::write(&hosts, "192.0.2.10 nas.lan\n").unwrap();
    c.push(&["rm", "-f", hosts.to_str().unwrap()]);
    let listen = format!("127.0.0.1:{}", free_port([127, 0, 0, 1].into()));
    let p = Portless::start(&[
        "--no-router=true",
        "--dns-port",
        "0",
        "--dns-listen",
        &listen,
        "--hosts-file",
        hosts.to_str().unwrap(),
        "--upstream",
        "127.0.0.1:9",
    ]);
    let server: SocketAddr = listen.parse().unwrap();
    let app = unique("ser");
    container(&c, &app, &["--network", &net], &[]);
    wait_until("the container to resolve", WAIT, || {
        (dig(server, &format!("{app}.docker.internal"), "A", &[])
            .answers
            .len()
            == 1)
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let samples = || -> u64 {
        p.metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix("portless_discovery_event_to_answer_seconds_count ")?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    let serial = || -> String {
        let r = dig(server, "docker.internal", "SOA", &[]);
        r.answers
            .first()
            .and_then(|a| a.split_whitespace().nth(2).map(str::to_owned))
            .unwrap_or_else(|| panic!("no SOA: {}", r.raw))
    };
    let events = || -> u64 {
        p.metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix("portless_docker_events_total ")?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    // The host's own addresses are part of the zone (host-side clients):
    // a container started or removed by another test adds or drops a
    // veth and its link-local address, a real change with no event in it.
    let host_addrs = || -> String {
        let out = ok("ip", &["-o", "addr", "show"]);
        let mut a: Vec<&str> = out
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3))
            .collect();
        a.sort();
        a.join(" ")
    };
    assert!(samples() >= 1, "the start was counted");
    // The same contents, written anew: reloaded, nothing changed. Other
    // tests' containers make Docker events too (portless sees the whole
    // Engine): judge only rounds in which no event arrived and the host's
    // addresses stayed the same.
    let mut quiet_rounds = 0;
    let mut reloads = 0;
    // Rewrite the hosts file as it was and wait until portless has read it
    // again (a rebuild with whatever else is current).
    let mut rewrite = || {
        std::fs::write(&hosts, "192.0.2.10 nas.lan\n").unwrap();
        reloads += 1;
        wait_until("the hosts file to be read again", WAIT, || {
            (p.logs().matches("hosts file reloaded").count() >= reloads).then_some(())
        });
        std::thread::sleep(Duration::from_millis(300));
    };
    for _ in 0..30 {
        let (e0, h0) = (events(), host_addrs());
        // A first rebuild takes in what came before e0 and h0 (events on
        // their way to the zone, which is built on its own thread; new
        // host addresses); then one with nothing new must change nothing.
        std::thread::sleep(Duration::from_millis(1100));
        rewrite();
        let (n0, s0) = (samples(), serial());
        std::thread::sleep(Duration::from_millis(1100));
        rewrite();
        let (n1, s1) = (samples(), serial());
        if events() != e0 || host_addrs() != h0 {
            continue;
        }
        assert_eq!(n1, n0, "a rebuild with no event counted the last one again");
        assert_eq!(s1, s0, "the serial rose with no change");
        quiet_rounds += 1;
        if quiet_rounds == 3 {
            break;
        }
    }
    assert_eq!(quiet_rounds, 3, "Docker was never quiet for a second");
    // A real change raises it.
    let s0 = serial();
    std::fs::write(&hosts, "192.0.2.11 nas.lan\n").unwrap();
    wait_until("the change", WAIT, || {
        (dig(server, "nas.lan", "A", &[]).answers == vec!["192.0.2.11"]).then_some(())
    });
    assert_ne!(serial(), s0);
}

/// EDNS in UDP replies: the OPT record stays in a truncated reply (so the
/// client still sees EDNS spoken), and it advertises portless's own UDP
/// payload size, not an echo of the client's.
#[test]
fn udp_replies_keep_their_opt_record_and_advertise_our_payload_size() {
    let hosts = std::env::temp_dir().join(unique("plopt-"));
    let mut text = String::new();
    for i in 1..=60 {
        text.push_str(&format!("192.0.2.{i} big.test\n"));
    }
    std::fs::write(&hosts, text).unwrap();
    let h = hosts.to_str().unwrap().to_owned();
    let (_p, listen) = static_portless(&["--hosts-file", &h, "--upstream", "127.0.0.1:9"]);
    let server: SocketAddr = listen.parse().unwrap();
    let udp_size = |raw: &str| -> Option<u32> {
        let line = raw.lines().find(|l| l.contains("; EDNS:"))?;
        line.split("udp: ").nth(1)?.trim().parse().ok()
    };
    // Whatever room the records leave over, the OPT record stays.
    for size in (512..=560).chain([600, 700, 1000]) {
        let bufsize = format!("+bufsize={size}");
        let r = dig(server, "big.test", "A", &[&bufsize, "+ignore", "+notcp"]);
        assert!(
            r.flags.contains("tc"),
            "60 addresses do not fit in {size}: {}",
            r.raw
        );
        assert!(
            r.raw.contains("OPT PSEUDOSECTION"),
            "the truncated reply to {size} lost its OPT record: {}",
            r.raw
        );
    }
    let r = dig(server, "big.test", "A", &["+bufsize=4000", "+ignore"]);
    assert!(!r.flags.contains("tc"), "{}", r.raw);
    assert_eq!(r.answers.len(), 60);
    assert_eq!(udp_size(&r.raw), Some(1232), "our own size: {}", r.raw);
    let r = dig(server, "big.test", "A", &["+bufsize=700", "+ignore"]);
    assert_eq!(udp_size(&r.raw), Some(1232), "our own size: {}", r.raw);
    std::fs::remove_file(&hosts).unwrap();
}

/// TCP connections are capped (each holds memory and a task until its idle
/// timeout): past the cap a new connection is closed at once, while the
/// ones in the cap are still served, and a freed slot is used again.
#[test]
fn tcp_connections_are_capped_at_the_default_limit() {
    use std::io::{Read, Write};
    let (p, listen) = static_portless(&["--upstream", "127.0.0.1:9"]);
    let server: SocketAddr = listen.parse().unwrap();
    let conns: Vec<std::net::TcpStream> = (0..600)
        .map(|_| std::net::TcpStream::connect(server).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut open = Vec::new();
    let mut closed = 0;
    for mut s in conns {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open.push(s),
            Err(_) => closed += 1,
            Ok(_) => panic!("data on an idle connection"),
        }
    }
    assert_eq!((open.len(), closed), (512, 88), "512 connections at most");
    // The ones inside the cap are served.
    let ask = |s: &mut std::net::TcpStream| {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&tcp_query(7, "docker.internal")).unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut msg).unwrap();
        assert_eq!(&msg[..2], &[0, 7]);
    };
    ask(&mut open[0]);
    ask(&mut open[511]);
    // Freed slots take new connections.
    open.truncate(10);
    std::thread::sleep(Duration::from_millis(300));
    let mut fresh = std::net::TcpStream::connect(server).unwrap();
    ask(&mut fresh);
    assert!(
        p.metrics()
            .contains("portless_dns_tcp_connections_refused_total 88"),
        "{}",
        p.metrics()
    );
}

/// A tiny upstream on loopback that ignores every query until switched on,
/// then answers every A question with `addr`.
struct SwitchedUpstream {
    addr: SocketAddr,
    on: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    queries: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl SwitchedUpstream {
    fn start(answer: [u8; 4]) -> SwitchedUpstream {
        use std::sync::atomic::Ordering::Relaxed;
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let on = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let queries = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (on2, stop2, queries2) = (on.clone(), stop.clone(), queries.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop2.load(Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                queries2.fetch_add(1, Relaxed);
                if !on2.load(Relaxed) || n < 12 {
                    continue;
                }
                // Header and question only, then one A record.
                let mut end = 12;
                while end < n && buf[end] != 0 {
                    end += 1 + buf[end] as usize;
                }
                end += 5;
                if end > n {
                    continue;
                }
                let mut reply = buf[..end].to_vec();
                reply[2] |= 0x80;
                reply[3] = 0x80;
                reply[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
                reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                reply.extend_from_slice(&answer);
                let _ = sock.send_to(&reply, from);
            }
        });
        SwitchedUpstream {
            addr,
            on,
            stop,
            queries,
        }
    }
}

impl Drop for SwitchedUpstream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// With the first upstream black-holed, only the first query pays its
/// timeout: the dead upstream is remembered and passed over, probed in the
/// background, and preferred again as soon as it answers.
#[test]
fn a_dead_upstream_is_remembered_probed_and_taken_back() {
    use std::sync::atomic::Ordering::Relaxed;
    let first = SwitchedUpstream::start([192, 0, 2, 99]);
    let good = common::dnsmasq::Dnsmasq::start("192.0.2.7 a.upstream.test\n", "upstream.test");
    let ups = format!("{},{}", first.addr, good.addr);
    let (p, listen) = static_portless(&["--upstream", &ups, "--forward-timeout-ms", "1500"]);
    let server: SocketAddr = listen.parse().unwrap();
    let timed = |name: &str| {
        let start = std::time::Instant::now();
        let r = dig(server, name, "A", &["+time=5"]);
        (r.answers, start.elapsed())
    };
    let (answers, _) = timed("a.upstream.test");
    assert_eq!(answers, vec!["192.0.2.7"]);
    let down = format!("portless_dns_upstream_up{{upstream=\"{}\"}} 0", first.addr);
    assert!(p.metrics().contains(&down), "{}", p.metrics());
    for i in 0..5 {
        let (answers, took) = timed("a.upstream.test");
        assert_eq!(answers, vec!["192.0.2.7"]);
        assert!(
            took < Duration::from_millis(400),
            "query {i} after the first waited {took:?} on the dead upstream"
        );
    }
    // It comes back: a probe notices, and it is first again.
    let before = first.queries.load(Relaxed);
    first.on.store(true, Relaxed);
    wait_until(
        "the first upstream to be taken back",
        Duration::from_secs(40),
        || (timed("a.upstream.test").0 == vec!["192.0.2.99"]).then_some(()),
    );
    assert!(first.queries.load(Relaxed) > before);
    let up = format!("portless_dns_upstream_up{{upstream=\"{}\"}} 1", first.addr);
    assert!(p.metrics().contains(&up), "{}", p.metrics());
}

/// A new IPv6 network's gateway address is still tentative (duplicate
/// address detection) when Docker announces the network; the listener on
/// it must be there at once, not at the next rebuild.
#[test]
fn a_new_ipv6_networks_gateway_gets_its_listener_at_once() {
    let c = Cleanup::new();
    let port = free_port([127, 0, 0, 1].into());
    let listen = format!("127.0.0.1:{port}");
    let p = Portless::start(&[
        "--no-router=true",
        "--dns-port",
        &port.to_string(),
        "--dns-listen",
        &listen,
        "--upstream",
        "127.0.0.1:9",
    ]);
    let third = (std::process::id() + 77) % 250;
    let v6 = format!("fd00:5eef:{third:x}::/64");
    let (net, _gw) = network(&c, &["--ipv6", "--subnet", &v6]);
    let gw6: IpAddr = format!("fd00:5eef:{third:x}::1").parse().unwrap();
    let want = format!("\"{}\"", SocketAddr::new(gw6, port));
    let started = std::time::Instant::now();
    wait_until(
        "a listener on the IPv6 gateway",
        Duration::from_secs(20),
        || {
            http_get(p.admin, "/api/status")?
                .contains(&want)
                .then_some(())
        },
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the IPv6 gateway listener came {took:?} after the network"
    );
    // And it serves, once the address is usable.
    let app = unique("six");
    let peer = unique("pee");
    container(&c, &app, &["--network", &net], &[]);
    container(&c, &peer, &["--network", &net], &[]);
    let server = SocketAddr::new(gw6, port);
    wait_until("an answer over the IPv6 gateway", WAIT, || {
        (dig_from(&peer, server, &app, "A").answers.len() == 1).then_some(())
    });
}

/// Logs that go to a file, journald or `docker logs` carry no colour
/// codes; `--log-format json` writes one JSON object a line, with the
/// level, the target and the message, for log shippers.
#[test]
fn logs_have_no_colour_codes_off_a_terminal_and_json_lines_parse() {
    let listen = format!("127.0.0.1:{}", free_port([127, 0, 0, 1].into()));
    let text = Portless::start_logging(&static_args(&listen), &[], None);
    let logs = text.logs();
    assert!(
        logs.contains("portless running"),
        "no start-up line in the text log:\n{logs}"
    );
    assert!(
        !logs.contains('\x1b'),
        "colour codes in a log written to a file:\n{logs:?}"
    );
    drop(text);

    let listen = format!("127.0.0.1:{}", free_port([127, 0, 0, 1].into()));
    // Also through the environment, as a container would set it.
    let json = Portless::start_logging(
        &static_args(&listen),
        &[("PORTLESS_LOG_FORMAT", "json")],
        None,
    );
    let logs = json.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines at all");
    let mut running = false;
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {l}"));
        assert!(v["level"].is_string(), "no level in {l}");
        assert!(v["target"].is_string(), "no target in {l}");
        assert!(v["timestamp"].is_string(), "no timestamp in {l}");
        running |= v["message"] == "portless running";
    }
    assert!(running, "no `portless running` message in:\n{logs}");
}

/// `portless status` exits 0 when every part is healthy and 2 when one is
/// not (here: its Docker Engine is unreachable), saying what is wrong, so
/// that scripts and health checks can use it; `--admin-listen` is the same
/// flag as `run`'s.
#[test]
fn status_exits_2_and_says_why_when_a_part_is_unhealthy() {
    use std::process::{Command, Stdio};
    let bin = env!("CARGO_BIN_EXE_portless");
    let healthy = Portless::start(&[
        "--no-router=true",
        "--docker-host",
        "none",
        "--dns-port",
        "0",
    ]);
    let out = Command::new(bin)
        .args(["status", "--admin-listen", &healthy.admin.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("HEALTHY"), "{text}");
    drop(healthy);

    // A Docker socket nobody serves: portless runs, retrying, unhealthy.
    let sock = std::env::temp_dir().join(format!("{}.sock", unique("no-docker-")));
    // A socket file whose listener is gone: connections are refused, as
    // for a stopped daemon.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    struct Rm(std::path::PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _rm = Rm(sock.clone());
    let admin = SocketAddr::new([127, 0, 0, 1].into(), free_port([127, 0, 0, 1].into()));
    let mut child = Command::new(bin)
        .args([
            "run",
            "--no-router=true",
            "--dns-port",
            "0",
            "--admin-listen",
            &admin.to_string(),
            "--docker-host",
            &format!("unix://{}", sock.display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    wait_until("the admin API", Duration::from_secs(20), || {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("portless exited with {st}");
        }
        http_get(admin, "/api/status")
    });
    let _guard = Kill(child);
    let out = Command::new(bin)
        .args(["status", "--admin", &admin.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("UNHEALTHY") && text.contains("Docker Engine not connected"),
        "{text}"
    );
    let json = Command::new(bin)
        .args(["status", "--json", "--admin-listen", &admin.to_string()])
        .output()
        .unwrap();
    assert_eq!(json.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(
        v["problems"][0]
            .as_str()
            .is_some_and(|p| p.contains("Docker Engine not connected")),
        "{v:#}"
    );
}
