//! The data plane of `docker network create -d portless` networks, proved
//! with packets on two real Docker Engines (each in its own network
//! namespace), a real etcd and a real `portless run` per engine.
//!
//! One scenario, in steps, on one pair of engines: containers of one
//! network on A and on B reach each other by IP (ping, TCP, a full-MTU
//! ping that may not fragment), the source address arriving unchanged;
//! containers of two different networks reach each other neither on one
//! host nor across hosts (ping and TCP must fail) while a container on
//! both reaches both; a container given (`--ip`) an address inside the
//! other host's block reaches and is reached from both hosts; a route
//! deleted by hand comes back; removing
//! the networks takes their devices and rules along; and `portless
//! netplane cleanup` on a host whose portless is stopped removes the
//! networks' `pn-*` links and their chain, and nothing else. The harness
//! takes everything down at the end, even when a step fails.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::engines::{Engines, Sidecar};

fn wait(what: &str, secs: f64, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs_f64(secs),
            "{what}: not within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

fn ip_of(e: &Engines, h: char, c: &str, net: &str) -> Ipv4Addr {
    e.docker_ok(
        h,
        &[
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}"),
            c,
        ],
    )
    .parse()
    .unwrap()
}

fn ping(e: &Engines, h: char, c: &str, ip: Ipv4Addr) -> bool {
    e.docker(
        h,
        &["exec", c, "ping", "-c", "1", "-W", "1", &ip.to_string()],
    )
    .status
    .success()
}

/// The client address the busybox httpd of the container at `ip` saw
/// (its CGI `ip`), over TCP port 80; None when no answer came.
fn tcp(e: &Engines, h: char, c: &str, ip: Ipv4Addr) -> Option<String> {
    let out = e.docker(
        h,
        &[
            "exec",
            c,
            // busybox wget's own -T crashes (1.37)
            "timeout",
            "3",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{ip}/cgi-bin/ip"),
        ],
    );
    if !out.status.success() {
        eprintln!(
            "{c} on {h}: wget {ip}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // busybox httpd listens on IPv6 too: `[::ffff:10.112.0.2]`
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .trim_start_matches("[::ffff:")
            .trim_end_matches(']')
            .to_owned()
    })
}

/// `c` on `h` reaches `ip` (ping within a few seconds, as the other
/// host's entries may be on their way, then TCP), and the server sees
/// `from` as the client.
fn reaches(e: &Engines, h: char, c: &str, ip: Ipv4Addr, from: Ipv4Addr) {
    let start = Instant::now();
    while !ping(e, h, c, ip) {
        if start.elapsed() > Duration::from_secs(5) {
            for (on, cmd) in [
                ('A', &["ip", "route"][..]),
                ('A', &["ip", "neigh"][..]),
                ('B', &["ip", "route"][..]),
                ('B', &["ip", "neigh"][..]),
                ('A', &["bridge", "fdb", "show"][..]),
                (
                    'A',
                    &["iptables", "-w", "-L", "PORTLESS-NETS", "-v", "-n"][..],
                ),
                (
                    'B',
                    &["iptables", "-w", "-L", "PORTLESS-NETS", "-v", "-n"][..],
                ),
            ] {
                let o = e.in_ns(on, cmd);
                eprintln!("DIAG {on} {cmd:?}:\n{}", String::from_utf8_lossy(&o.stdout));
            }
            let o = e.docker(h, &["exec", c, "ip", "neigh"]);
            eprintln!("DIAG {c} ip neigh:\n{}", String::from_utf8_lossy(&o.stdout));
            let o = e.docker(h, &["exec", c, "ip", "route"]);
            eprintln!("DIAG {c} ip route:\n{}", String::from_utf8_lossy(&o.stdout));
            panic!("{c} on {h} pings {ip}: not within 5 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "{c} on {h} -> {ip}: first ping after {} ms",
        start.elapsed().as_millis()
    );
    // The server may still be starting (`docker run -d` returns first).
    let mut seen = None;
    wait(&format!("{c} on {h} -> {ip} over TCP"), 5.0, || {
        seen = tcp(e, h, c, ip);
        seen.is_some()
    });
    assert_eq!(
        seen.as_deref(),
        Some(from.to_string().as_str()),
        "{c} on {h} -> {ip} over TCP: the client address the server saw"
    );
}

/// `c` on `h` reaches `ip` neither by ping nor by TCP.
fn isolated(e: &Engines, h: char, c: &str, ip: Ipv4Addr) {
    let out = e.docker(
        h,
        &["exec", c, "ping", "-c", "2", "-W", "2", &ip.to_string()],
    );
    assert!(
        !out.status.success(),
        "{c} on {h} pinged {ip} on another network: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(tcp(e, h, c, ip), None, "{c} on {h} reached {ip} over TCP");
}

fn links(e: &Engines, h: char) -> String {
    let out = e.in_ns(h, &["ip", "-o", "link", "show"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rules(e: &Engines, h: char, chain: &str) -> Option<String> {
    let out = e.in_ns(h, &["iptables", "-w", "-S", chain]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn containers_of_a_portless_network_reach_each_other_across_hosts_and_no_other_network() {
    let e = Engines::up();
    let mut a = Sidecar::start(&e, 'A', &[]);
    let b = Sidecar::start(&e, 'B', &[]);
    for h in ['A', 'B'] {
        let sock = e.plugin_socket(h);
        wait(&format!("plugin socket of {h}"), 10.0, || {
            std::path::Path::new(&sock).exists()
        });
    }
    let image = e.image();
    let nets = [format!("{}-red", e.pfx), format!("{}-blue", e.pfx)];
    let mut made: Vec<(char, String)> = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        steps(&e, &mut a, &image, &nets, &mut made)
    }));
    if result.is_err() {
        // A may have been stopped by the cleanup step: start it again so
        // that Docker's removals below reach a plugin.
        a.stop();
        a = Sidecar::start_unready(&e, 'A', &[]);
        std::thread::sleep(Duration::from_secs(2));
    }
    for (h, c) in &made {
        let _ = e.docker(*h, &["rm", "-f", c]);
    }
    for net in &nets {
        let _ = e.docker('A', &["network", "rm", net]);
    }
    if let Err(p) = result {
        eprintln!(
            "portless A:\n{}\nportless B:\n{}",
            a.log_tail(),
            b.log_tail()
        );
        std::panic::resume_unwind(p);
    }
}

fn steps(
    e: &Engines,
    a: &mut Sidecar,
    image: &str,
    nets: &[String; 2],
    made: &mut Vec<(char, String)>,
) {
    let [red, blue] = nets;
    // red with --subnet, so that Docker on A takes --ip for it too.
    for (net, subnet) in [(red, Some("10.113.7.0/24")), (blue, None)] {
        let mut args = vec![
            "network",
            "create",
            "-d",
            "portless",
            "--ipam-driver",
            "portless",
        ];
        args.extend(subnet.iter().flat_map(|s| ["--subnet", *s]));
        args.push(net);
        e.docker_ok('A', &args);
    }
    wait("both networks on B", 3.0, || {
        nets.iter()
            .all(|n| e.docker('B', &["network", "inspect", n]).status.success())
    });
    // One web server per host and network, and one container on A on
    // both networks.
    let run = |made: &mut Vec<(char, String)>, h: char, name: &str, net: &str| {
        let c = format!("{}-{name}", e.pfx);
        made.push((h, c.clone()));
        e.docker_ok(
            h,
            &[
                "run",
                "-d",
                "--name",
                &c,
                "--network",
                net,
                image,
                "httpd",
                "-f",
                "-p",
                "80",
                "-h",
                "/var/www",
            ],
        );
        c
    };
    let red_a = run(made, 'A', "red-a", red);
    let red_b = run(made, 'B', "red-b", red);
    let blue_a = run(made, 'A', "blue-a", blue);
    let blue_b = run(made, 'B', "blue-b", blue);
    let both = run(made, 'A', "both", red);
    e.docker_ok('A', &["network", "connect", blue, &both]);
    let ip = |h, c: &str, net: &str| ip_of(e, h, c, net);
    let (red_a_ip, red_b_ip) = (ip('A', &red_a, red), ip('B', &red_b, red));
    let (blue_a_ip, blue_b_ip) = (ip('A', &blue_a, blue), ip('B', &blue_b, blue));

    // One network across hosts: ping and TCP both ways, with the
    // client's own address arriving (no NAT inside the network).
    reaches(e, 'A', &red_a, red_b_ip, red_a_ip);
    reaches(e, 'B', &red_b, red_a_ip, red_b_ip);
    reaches(e, 'B', &blue_b, blue_a_ip, blue_b_ip);
    reaches(e, 'A', &blue_a, blue_b_ip, blue_a_ip);

    // Full MTU, not fragmented: the largest ping fits the VXLAN, one
    // byte more is refused at the sender.
    let mtu: usize = e
        .docker_ok('A', &["exec", &red_a, "cat", "/sys/class/net/eth0/mtu"])
        .parse()
        .unwrap();
    let iface = a.status()["cluster"]["host"]["interface"]
        .as_str()
        .unwrap()
        .to_owned();
    let underlay: usize = String::from_utf8_lossy(
        &e.in_ns('A', &["cat", &format!("/sys/class/net/{iface}/mtu")])
            .stdout,
    )
    .trim()
    .parse()
    .unwrap();
    assert_eq!(mtu, underlay - 50, "the network's MTU");
    let iping = |size: usize| {
        e.docker(
            'A',
            &[
                "exec",
                &red_a,
                "iping",
                "-M",
                "do",
                "-c",
                "2",
                "-W",
                "2",
                "-s",
                &(size - 28).to_string(),
                &red_b_ip.to_string(),
            ],
        )
    };
    let out = iping(mtu);
    assert!(
        out.status.success(),
        "full-MTU ping ({mtu} bytes) A -> B: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!iping(mtu + 1).status.success(), "{} bytes passed", mtu + 1);

    // Isolation: red and blue reach each other neither on one host nor
    // across hosts, either way.
    isolated(e, 'A', &red_a, blue_a_ip);
    isolated(e, 'A', &red_a, blue_b_ip);
    isolated(e, 'B', &blue_b, red_a_ip);
    isolated(e, 'B', &red_b, blue_b_ip);
    // ... unless a container is on both.
    let both_red = ip('A', &both, red);
    let both_blue = ip('A', &both, blue);
    reaches(e, 'A', &both, red_b_ip, both_red);
    reaches(e, 'A', &both, blue_b_ip, both_blue);
    reaches(e, 'A', &both, blue_a_ip, both_blue);

    // A container on A with an address (--ip) inside B's block: both
    // hosts route it to A (a /32 each), so it reaches and is reached
    // from both.
    let b_block = u32::from(red_b_ip) & !0xf;
    let pinned_ip = Ipv4Addr::from(b_block + 13);
    let pinned = format!("{}-pinned", e.pfx);
    made.push(('A', pinned.clone()));
    e.docker_ok(
        'A',
        &[
            "run",
            "-d",
            "--name",
            &pinned,
            "--network",
            red,
            "--ip",
            &pinned_ip.to_string(),
            image,
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/var/www",
        ],
    );
    reaches(e, 'A', &red_a, pinned_ip, red_a_ip);
    reaches(e, 'B', &red_b, pinned_ip, red_b_ip);
    reaches(e, 'A', &pinned, red_b_ip, pinned_ip);
    reaches(e, 'A', &pinned, red_a_ip, pinned_ip);

    // A route of the network deleted by hand comes back.
    let routes = String::from_utf8_lossy(
        &e.in_ns('A', &["ip", "-o", "route", "show", "proto", "150"])
            .stdout,
    )
    .into_owned();
    let first = routes
        .lines()
        .next()
        .expect("a network route on A")
        .to_owned();
    let dst = first.split_whitespace().next().unwrap().to_owned();
    let dev = first
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .unwrap()
        .to_owned();
    assert!(dev.starts_with("pn-vx"), "{first}");
    let out = e.in_ns(
        'A',
        &["ip", "route", "del", &dst, "dev", &dev, "proto", "150"],
    );
    assert!(out.status.success(), "{out:?}");
    wait("the deleted route back", 4.0, || {
        String::from_utf8_lossy(
            &e.in_ns('A', &["ip", "-o", "route", "show", "proto", "150"])
                .stdout,
        )
        .contains(&dst)
    });
    reaches(e, 'A', &red_a, red_b_ip, red_a_ip);

    // `portless netplane cleanup` on A with its portless stopped: the
    // networks' links and chain go; a link and a DOCKER-USER rule of
    // someone else's stay.
    let keep = format!("{}-keep", e.pfx);
    assert!(
        e.in_ns('A', &["ip", "link", "add", &keep, "type", "bridge"])
            .status
            .success()
    );
    let foreign = ["-i", keep.as_str(), "-j", "RETURN"];
    let mut add = vec!["iptables", "-w", "-I", "DOCKER-USER"];
    add.extend(foreign);
    assert!(e.in_ns('A', &add).status.success());
    a.stop();
    assert!(links(e, 'A').contains("pn-vx"), "{}", links(e, 'A'));
    let bin = env!("CARGO_BIN_EXE_portless");
    let out = e.in_ns(
        'A',
        &[bin, "netplane", "cleanup", "--docker-host", &e.sock('A')],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("links of cluster networks (pn-*) removed:"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = links(e, 'A');
    assert!(!left.contains("pn-"), "left on A: {left}");
    assert!(left.contains(&keep), "cleanup removed {keep}: {left}");
    assert_eq!(rules(e, 'A', "PORTLESS-NETS"), None, "chain left");
    let user = rules(e, 'A', "DOCKER-USER").unwrap();
    assert!(!user.contains("PORTLESS-NETS"), "{user}");
    assert!(user.contains(&format!("-i {keep} -j RETURN")), "{user}");
    let mut del = vec!["iptables", "-w", "-D", "DOCKER-USER"];
    del.extend(foreign);
    let _ = e.in_ns('A', &del);
    let _ = e.in_ns('A', &["ip", "link", "del", &keep]);

    // portless back on A: it takes the Engine's networks up again and
    // programs their data plane (the containers' own veths went with the
    // cleanup, so a new container shows it).
    *a = Sidecar::start(e, 'A', &[]);
    let again = run(made, 'A', "again", red);
    let again_ip = ip('A', &again, red);
    reaches(e, 'A', &again, red_b_ip, again_ip);
    reaches(e, 'B', &red_b, again_ip, red_b_ip);

    // The networks removed: their devices and rules on both hosts go.
    for (h, c) in made.drain(..) {
        e.docker_ok(h, &["rm", "-f", &c]);
    }
    for net in nets {
        e.docker_ok('A', &["network", "rm", net]);
    }
    for h in ['A', 'B'] {
        wait(&format!("the networks' links gone from {h}"), 5.0, || {
            !links(e, h).contains("pn-")
        });
        wait(&format!("the networks' rules gone from {h}"), 5.0, || {
            let chain = rules(e, h, "PORTLESS-NETS").unwrap_or_default();
            !chain.contains("pn-br") && !chain.contains("pn-vx")
        });
        let out = e.in_ns(h, &["ip", "-o", "route", "show", "proto", "150"]);
        assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
    }
}
