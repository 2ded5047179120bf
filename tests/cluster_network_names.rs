//! Names and routes of `docker network create -d portless` networks across
//! hosts, and a restart of portless under running traffic, on two real
//! Docker Engines (each in its own network namespace), a real etcd and a
//! real `portless run` per engine.
//!
//! One scenario, in steps: a container on host B is resolved by its name
//! and its alias from a container on host A on the same network (through
//! Docker's own 127.0.0.11, which forwards to portless on the network's
//! gateway) and reached by name over TCP; a container of another portless
//! network resolves nothing of it; host A's router routes a Host header to
//! it (from A's own address in the network); portless on A is killed with
//! `kill -9` and started again while a container on A pings the one on B
//! (no reply may be lost), and a `docker run` on A that arrives while
//! portless is down is answered once it is back. The harness takes
//! everything down at the end, even when a step fails.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::engines::{
    Engines, Sidecar, cgi_client, fail_with_logs, nslookup_addrs, plugin_sidecars, wait,
};

fn subnet_of(e: &Engines, h: char, net: &str) -> ipnet::Ipv4Net {
    e.docker_ok(
        h,
        &[
            "network",
            "inspect",
            "-f",
            "{{(index .IPAM.Config 0).Subnet}}",
            net,
        ],
    )
    .parse()
    .unwrap()
}

/// `name` looked up from container `c` on `h`, through `server` (None:
/// the container's own resolver, Docker's 127.0.0.11).
fn lookup(e: &Engines, h: char, c: &str, name: &str, server: Option<Ipv4Addr>) -> Vec<String> {
    let server = server.map(|s| s.to_string());
    let mut args = vec!["exec", c, "nslookup", name];
    args.extend(server.as_deref());
    let out = e.docker(h, &args);
    nslookup_addrs(&String::from_utf8_lossy(&out.stdout))
}

/// The client address busybox httpd saw, fetched by `c` on `h` from `url`.
fn fetch(e: &Engines, h: char, c: &str, url: &str) -> Option<String> {
    let out = e.docker(
        h,
        &["exec", c, "timeout", "3", "wget", "-q", "-O", "-", url],
    );
    out.status
        .success()
        .then(|| cgi_client(&String::from_utf8_lossy(&out.stdout)))
}

const TTL: &[&str] = &["--lease-ttl", "10"];

#[test]
fn names_and_routes_of_a_portless_network_cross_hosts_and_a_restart_keeps_traffic() {
    let e = Engines::up();
    // The default lease (10 s), which a restart of a few seconds keeps
    // (the harness's 2 s would expire while portless is down).
    let (mut a, b) = plugin_sidecars(&e, TTL);
    let image = e.image();
    let nets = [format!("{}-shop", e.pfx), format!("{}-other", e.pfx)];
    let mut made: Vec<(char, String)> = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        steps(&e, &mut a, &image, &nets, &mut made)
    }));
    if result.is_err() {
        // A may be down: start it again so that Docker's removals below
        // reach a plugin.
        a.stop();
        a = Sidecar::start_unready(&e, 'A', TTL);
        std::thread::sleep(Duration::from_secs(2));
    }
    for (h, c) in &made {
        let _ = e.docker(*h, &["rm", "-f", c]);
    }
    for net in &nets {
        let _ = e.docker('A', &["network", "rm", net]);
    }
    fail_with_logs(result, &a, &b);
}

fn steps(
    e: &Engines,
    a: &mut Sidecar,
    image: &str,
    nets: &[String; 2],
    made: &mut Vec<(char, String)>,
) {
    let [shop, other] = nets;
    for net in nets {
        e.docker_ok(
            'A',
            &[&common::CREATE_PORTLESS_NETWORK[..], &[net]].concat(),
        );
    }
    wait("both networks on B", 3.0, || {
        nets.iter()
            .all(|n| e.docker('B', &["network", "inspect", n]).status.success())
    });
    let subnet = subnet_of(e, 'A', shop);
    let gw = Ipv4Addr::from(u32::from(subnet.network()) + 1);

    // An address A holds in etcd that no container of A's has (Docker's
    // ReleaseAddress came while portless was down): A gives it back
    // after a while (checked at the end).
    let st = a.status();
    let a_id = st["cluster"]["host"]["id"].as_str().unwrap().to_owned();
    let a_lease = st["cluster"]["host"]["lease_id"].as_i64().unwrap();
    let leaked = Ipv4Addr::from(u32::from(subnet.network()) + 250);
    let leaked_key = format!(
        "/portless/v1/netaddrs/{}-{}/{leaked}",
        subnet.network(),
        subnet.prefix_len()
    );
    let out = e.etcdctl(&[
        "put",
        &format!("--lease={a_lease:x}"),
        &leaked_key,
        &format!(r#"{{"host":"{a_id}"}}"#),
    ]);
    assert!(out.status.success(), "{out:?}");
    let leaked_at = Instant::now();
    let other_gw = Ipv4Addr::from(u32::from(subnet_of(e, 'A', other).network()) + 1);

    // A web server on B with an alias and a route label; a client on A on
    // the same network and one on A on another network, both resolving
    // through Docker's 127.0.0.11, which forwards to portless on their
    // network's gateway (`--dns`).
    let db = format!("{}-db", e.pfx);
    made.push(('B', db.clone()));
    e.docker_ok(
        'B',
        &[
            "run",
            "-d",
            "--name",
            &db,
            "--network",
            shop,
            "--network-alias",
            "database",
            "--label",
            "portless.http.host=db.shop.test",
            "--label",
            "portless.http.port=80",
            image,
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/var/www",
        ],
    );
    let db_ip = e.ip_of('B', &db, shop);
    let run_client = |made: &mut Vec<(char, String)>, name: &str, net: &str, dns: Ipv4Addr| {
        let c = format!("{}-{name}", e.pfx);
        made.push(('A', c.clone()));
        e.docker_ok(
            'A',
            &[
                "run",
                "-d",
                "--name",
                &c,
                "--network",
                net,
                "--dns",
                &dns.to_string(),
                image,
                "sleep",
                "100000",
            ],
        );
        c
    };
    let cli = run_client(made, "cli", shop, gw);
    let stranger = run_client(made, "stranger", other, other_gw);
    let cli_ip = e.ip_of('A', &cli, shop);
    // The bridge answers ARP for the network's addresses on B (proxy ARP,
    // set over netlink), at once (proxy_delay 0).
    let bridge = format!(
        "pn-br{}",
        &e.docker_ok('A', &["network", "inspect", "-f", "{{.Id}}", shop])[..10]
    );
    for (path, want) in [
        (format!("/proc/sys/net/ipv4/conf/{bridge}/proxy_arp"), "1"),
        (
            format!("/proc/sys/net/ipv4/neigh/{bridge}/proxy_delay"),
            "0",
        ),
    ] {
        let out = e.in_ns('A', &["cat", &path]);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want, "{path}");
    }

    // By name and by alias, from the other host, through 127.0.0.11.
    let want = vec![db_ip.to_string()];
    let took = wait("B's container resolved on A", 10.0, || {
        lookup(e, 'A', &cli, &db, None) == want
    });
    eprintln!(
        "{db} resolved on A {} ms after its start on B",
        took.as_millis()
    );
    assert_eq!(lookup(e, 'A', &cli, "database", None), want);
    assert_eq!(lookup(e, 'A', &cli, &db, Some(gw)), want);
    // Over TCP by name: the server sees the client's own address.
    assert_eq!(
        fetch(e, 'A', &cli, &format!("http://{db}/cgi-bin/ip")).as_deref(),
        Some(cli_ip.to_string().as_str())
    );
    // Names are per network: another network's container resolves
    // neither the name nor the alias (portless answers it, on its own
    // network's gateway, with nothing).
    assert!(lookup(e, 'A', &stranger, &db, Some(other_gw)).is_empty());
    assert!(lookup(e, 'A', &stranger, "database", Some(other_gw)).is_empty());
    // ... while it answers that network's own names there.
    let stranger_ip = e.ip_of('A', &stranger, other);
    assert_eq!(
        lookup(e, 'A', &stranger, &stranger, Some(other_gw)),
        vec![stranger_ip.to_string()]
    );

    // A's router routes to the container on B, from A's own address in
    // the network: inside the subnet, neither the gateway nor a
    // container's.
    let got = wait_get(e, 'A', "db.shop.test", "/cgi-bin/ip");
    let from: Ipv4Addr = cgi_client(&got)
        .parse()
        .unwrap_or_else(|_| panic!("{got:?}"));
    assert!(
        subnet.contains(&from) && from != gw && from != cli_ip && from != db_ip,
        "A's router reached {db} from {from}"
    );

    // Restart under traffic: the client pings the server on B ten times
    // a second while portless on A is killed and started again, and a
    // `docker run` on A comes while it is down.
    e.docker_ok(
        'A',
        &[
            "exec",
            "-d",
            &cli,
            "sh",
            "-c",
            &format!(
                "iping -i 0.1 -c 100 -W 1 {db_ip} >/tmp/ping.out 2>&1; echo end >>/tmp/ping.out"
            ),
        ],
    );
    std::thread::sleep(Duration::from_millis(1500));
    a.kill9();
    let late = format!("{}-late", e.pfx);
    made.push(('A', late.clone()));
    let run_late = std::thread::scope(|s| {
        let t = s.spawn(|| {
            e.docker(
                'A',
                &[
                    "run",
                    "-d",
                    "--name",
                    &late,
                    "--network",
                    shop,
                    "--dns",
                    &gw.to_string(),
                    image,
                    "sleep",
                    "100000",
                ],
            )
        });
        std::thread::sleep(Duration::from_secs(3));
        *a = Sidecar::start(e, 'A', TTL);
        t.join().unwrap()
    });
    assert!(
        run_late.status.success(),
        "docker run while portless was down: {}",
        String::from_utf8_lossy(&run_late.stderr)
    );
    let late_ip = e.ip_of('A', &late, shop);
    assert!(subnet.contains(&late_ip), "{late_ip}");
    wait("the pings done", 20.0, || {
        String::from_utf8_lossy(
            &e.docker('A', &["exec", &cli, "cat", "/tmp/ping.out"])
                .stdout,
        )
        .contains("end")
    });
    let out = e.docker_ok('A', &["exec", &cli, "cat", "/tmp/ping.out"]);
    assert!(
        out.contains("100 packets transmitted, 100 received"),
        "pings through the restart:\n{out}"
    );
    // After the restart: the new container reaches and resolves B's by
    // name, and A's router still routes to it.
    let took = wait("B's container resolved by the new one", 10.0, || {
        lookup(e, 'A', &late, &db, None) == want
    });
    eprintln!("resolved {} ms after the restart", took.as_millis());
    assert_eq!(
        fetch(e, 'A', &late, &format!("http://{db}/cgi-bin/ip")).as_deref(),
        Some(late_ip.to_string().as_str())
    );
    assert_eq!(wait_get(e, 'A', "db.shop.test", "/cgi-bin/ip"), got);

    // The networks' chains flushed by hand on A (a firewall reload): put
    // back within seconds, and the traffic flows again.
    for table in ["filter", "nat"] {
        let out = e.in_ns('A', &["iptables", "-w", "-t", table, "-F", "PORTLESS-NETS"]);
        assert!(out.status.success(), "{out:?}");
    }
    let took = wait("the flushed rules back", 15.0, || {
        let f = e.in_ns('A', &["iptables", "-w", "-S", "PORTLESS-NETS"]);
        let n = e.in_ns('A', &["iptables", "-w", "-t", "nat", "-S", "PORTLESS-NETS"]);
        let (f, n) = (
            String::from_utf8_lossy(&f.stdout),
            String::from_utf8_lossy(&n.stdout),
        );
        f.contains(&format!("-i {bridge} -o {bridge} -j ACCEPT"))
            && f.contains("-i pn-br+ -j ACCEPT")
            && n.contains("MASQUERADE")
    });
    eprintln!("flushed rules back after {} ms", took.as_millis());
    // One rule of the shared tail deleted by hand: the tail is written
    // again, and each of its rules is there once.
    let out = e.in_ns(
        'A',
        &[
            "iptables",
            "-w",
            "-D",
            "PORTLESS-NETS",
            "-o",
            "pn-vx+",
            "-j",
            "DROP",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let once = |rule: &str| {
        let f = e.in_ns('A', &["iptables", "-w", "-S", "PORTLESS-NETS"]);
        String::from_utf8_lossy(&f.stdout)
            .lines()
            .filter(|l| *l == format!("-A PORTLESS-NETS {rule}"))
            .count()
            == 1
    };
    // (The new tail goes in before the old one goes: wait for the end.)
    let tail = [
        "-i pn-+ -o pn-+ -j DROP",
        "-o pn-br+ -j DROP",
        "-o pn-vx+ -j DROP",
        "-i pn-br+ -j ACCEPT",
        "-i pn-+ -j DROP",
    ];
    wait("the tail written again, each rule once", 15.0, || {
        tail.iter().all(|r| once(r))
    });
    assert_eq!(
        fetch(e, 'A', &late, &format!("http://{db}/cgi-bin/ip")).as_deref(),
        Some(late_ip.to_string().as_str())
    );

    // Gone on B: gone from A's names within seconds.
    e.docker_ok('B', &["rm", "-f", &db]);
    wait("the removed container gone from A's names", 10.0, || {
        lookup(e, 'A', &cli, &db, Some(gw)).is_empty()
    });

    // The leaked address given back (after 15 s unused), and no other.
    let keys = |prefix: &str| {
        String::from_utf8_lossy(
            &e.etcdctl(&["get", "--prefix", "--keys-only", prefix])
                .stdout,
        )
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect::<Vec<_>>()
    };
    wait("the leaked address given back", 40.0, || {
        keys(&leaked_key).is_empty()
    });
    eprintln!(
        "leaked address given back {} s after it was written",
        leaked_at.elapsed().as_secs()
    );
    for (h, c) in [('A', &cli), ('A', &late)] {
        let ip = e.ip_of(h, c, shop);
        assert_eq!(
            keys(&format!(
                "/portless/v1/netaddrs/{}-{}/{ip}",
                subnet.network(),
                subnet.prefix_len()
            ))
            .len(),
            1,
            "{c}'s address {ip} given back"
        );
    }
}

/// GET `path` through `h`'s router with Host `host`, retrying for a few
/// seconds (routes follow the records); the body.
fn wait_get(e: &Engines, h: char, host: &str, path: &str) -> String {
    let mut body = None;
    wait(&format!("{host} routed on {h}"), 10.0, || {
        let out = e.in_ns(
            h,
            &[
                "curl",
                "-s",
                "-f",
                "-m",
                "3",
                "-H",
                &format!("Host: {host}"),
                &format!("http://127.0.0.1{path}"),
            ],
        );
        body = out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned());
        body.is_some()
    });
    body.unwrap()
}
