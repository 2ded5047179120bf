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

use common::engines::{Engines, Sidecar, cgi_client, fail_with_logs, plugin_sidecars, wait};

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
    out.status
        .success()
        .then(|| cgi_client(&String::from_utf8_lossy(&out.stdout)))
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

fn nat_rules(e: &Engines, h: char, chain: &str) -> Option<String> {
    let out = e.in_ns(h, &["iptables", "-w", "-t", "nat", "-S", chain]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The client address the busybox httpd at `ip` (port 80) saw, asked
/// from inside namespace `ns` (not a container); None when no answer came.
fn tcp_from_ns(ns: &str, ip: Ipv4Addr) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c"])
        .arg(format!(
            "printf 'GET /cgi-bin/ip HTTP/1.0\\r\\n\\r\\n' | timeout 3 busybox nc -w 2 {ip} 80"
        ))
        .output()
        .expect("ip netns exec");
    // The CGI's own header ends with a bare newline.
    let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    let body = text.split("\n\n").nth(1)?.trim();
    (!body.is_empty()).then(|| cgi_client(body))
}

/// The world outside the cluster, as the test makes it: a namespace
/// attached to host A's by a veth (A's end [`OUTSIDE_GW`], its own
/// [`OUTSIDE_IP`], its default route through A), running a busybox httpd
/// whose CGI prints the client address it sees. Dropped (httpd killed,
/// namespace and veth deleted) even when a step fails.
struct Outside {
    ns: String,
    httpd: Option<std::process::Child>,
}

const OUTSIDE_GW: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

impl Outside {
    fn up(e: &Engines) -> Outside {
        let ns = format!("{}-out", e.pfx);
        let mut o = Outside { ns, httpd: None };
        let (a_end, out_end) = (format!("{}-ao", e.pfx), format!("{}-oa", e.pfx));
        let ns_a = e.ns('A');
        let run = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        run(&["netns", "add", &o.ns]);
        run(&[
            "link", "add", &a_end, "netns", &ns_a, "type", "veth", "peer", "name", &out_end,
            "netns", &o.ns,
        ]);
        run(&[
            "-n",
            &ns_a,
            "addr",
            "add",
            &format!("{OUTSIDE_GW}/24"),
            "dev",
            &a_end,
        ]);
        run(&["-n", &ns_a, "link", "set", &a_end, "up"]);
        run(&[
            "-n",
            &o.ns,
            "addr",
            "add",
            &format!("{OUTSIDE_IP}/24"),
            "dev",
            &out_end,
        ]);
        run(&["-n", &o.ns, "link", "set", &out_end, "up"]);
        run(&["-n", &o.ns, "link", "set", "lo", "up"]);
        // Replies to an address that was not masqueraded would find
        // their way back too: the listener shows what arrived.
        run(&[
            "-n",
            &o.ns,
            "route",
            "add",
            "default",
            "via",
            &OUTSIDE_GW.to_string(),
        ]);
        o.httpd = Some(
            std::process::Command::new("ip")
                .args([
                    "netns", "exec", &o.ns, "busybox", "httpd", "-f", "-p", "80", "-h",
                ])
                .arg(format!("/var/lib/{}-rootfs/var/www", e.pfx))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("busybox httpd"),
        );
        // The listener answers from its own namespace.
        wait("the outside listener", 5.0, || {
            tcp_from_ns(&o.ns, OUTSIDE_IP).is_some()
        });
        o
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        if let Some(mut c) = self.httpd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The veth goes with the namespace.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .output();
    }
}

#[test]
fn containers_of_a_portless_network_reach_each_other_across_hosts_and_no_other_network() {
    let e = Engines::up();
    let (mut a, b) = plugin_sidecars(&e, &[]);
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
    fail_with_logs(result, &a, &b);
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
        let mut args = common::CREATE_PORTLESS_NETWORK.to_vec();
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
    let ip = |h, c: &str, net: &str| e.ip_of(h, c, net);
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

    // Out of the cluster, through the container's own host, as from a
    // Docker bridge: masqueraded to the host's address; the outside
    // cannot open a connection to the container.
    outside_and_nothing_else(e, image, red, red_a_ip, &red_a, made);

    // Published ports: refused, saying what to do instead.
    let published = format!("{}-published", e.pfx);
    made.push(('A', published.clone()));
    let out = e.docker(
        'A',
        &[
            "run",
            "-d",
            "--name",
            &published,
            "--network",
            red,
            "-p",
            "8080:80",
            image,
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/var/www",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("docker run -p on a portless network: {}", err.trim());
    assert!(
        !out.status.success()
            && err.contains("portless networks do not publish ports (asked: 8080->80/tcp)")
            && err.contains("portless.http.host"),
        "docker run -p on {red}: {err}"
    );
    e.docker_ok('A', &["rm", "-f", &published]);
    made.retain(|(_, c)| *c != published);

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
    let foreign_nat = ["-o", keep.as_str(), "-j", "RETURN"];
    let mut add = vec!["iptables", "-w", "-t", "nat", "-I", "POSTROUTING"];
    add.extend(foreign_nat);
    assert!(e.in_ns('A', &add).status.success());
    assert!(
        nat_rules(e, 'A', "POSTROUTING")
            .unwrap()
            .contains("-j PORTLESS-NETS")
    );
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
    assert_eq!(nat_rules(e, 'A', "PORTLESS-NETS"), None, "nat chain left");
    let post = nat_rules(e, 'A', "POSTROUTING").unwrap();
    assert!(!post.contains("PORTLESS-NETS"), "{post}");
    assert!(post.contains(&format!("-o {keep} -j RETURN")), "{post}");
    let mut del = vec!["iptables", "-w", "-D", "DOCKER-USER"];
    del.extend(foreign);
    let _ = e.in_ns('A', &del);
    let mut del = vec!["iptables", "-w", "-t", "nat", "-D", "POSTROUTING"];
    del.extend(foreign_nat);
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
            e.network_rules(h).is_empty()
        });
        let out = e.in_ns(h, &["ip", "-o", "route", "show", "proto", "150"]);
        assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
    }
}

/// The network's container `c` on A (at `c_ip`, on network `net`)
/// reaches the outside world through A, masqueraded to A's address, and
/// the outside cannot open a connection to it. Neither can it reach, nor
/// be reached from, a container of Docker's own bridge on A or of the
/// cluster network (`portless`) on A and on B, each of which A's and B's
/// own namespaces do reach.
fn outside_and_nothing_else(
    e: &Engines,
    image: &str,
    net: &str,
    c_ip: Ipv4Addr,
    c: &str,
    made: &mut Vec<(char, String)>,
) {
    let outside = Outside::up(e);
    let subnet = format!("{}.0/24", {
        let o = c_ip.octets();
        format!("{}.{}.{}", o[0], o[1], o[2])
    });
    let mut seen = None;
    wait(&format!("{c} on A -> the outside over TCP"), 5.0, || {
        seen = tcp(e, 'A', c, OUTSIDE_IP);
        seen.is_some()
    });
    assert_eq!(
        seen.as_deref(),
        Some(OUTSIDE_GW.to_string().as_str()),
        "{c} -> the outside: the client address the listener saw (A's, masqueraded)"
    );
    let masq = e.network_rules('A');
    assert!(
        masq.iter()
            .any(|r| r.contains("MASQUERADE") && r.contains(&format!("-s {subnet}"))),
        "no MASQUERADE of {subnet} on A: {masq:?}"
    );
    assert_eq!(
        tcp_from_ns(&outside.ns, c_ip),
        None,
        "the outside opened a connection to {c} on {net}"
    );

    let mut others = Vec::new();
    for (h, name, on) in [
        ('A', "bridged", "bridge"),
        ('A', "cluster-a", "portless"),
        ('B', "cluster-b", "portless"),
        ('B', "bridged-b", "bridge"),
    ] {
        let other = format!("{}-{name}", e.pfx);
        made.push((h, other.clone()));
        e.docker_ok(
            h,
            &[
                "run",
                "-d",
                "--name",
                &other,
                "--network",
                on,
                image,
                "httpd",
                "-f",
                "-p",
                "80",
                "-h",
                "/var/www",
            ],
        );
        let ip = e.ip_of(h, &other, on);
        // Up and reachable from its own host.
        wait(&format!("{other} from host {h}"), 5.0, || {
            tcp_from_ns(&e.ns(h), ip).is_some()
        });
        others.push((h, other, ip));
    }
    for (h, other, ip) in &others {
        assert_eq!(
            tcp(e, 'A', c, *ip),
            None,
            "{c} on {net} reached {other} on {h}"
        );
        // From either host: B routes the network's addresses in A's
        // blocks into its VXLAN device, which only the network's own
        // bridge may send into.
        assert_eq!(
            tcp(e, *h, other, c_ip),
            None,
            "{other} on {h} reached {c} on {net}"
        );
    }
    for (h, other, _) in others {
        e.docker_ok(h, &["rm", "-f", &other]);
        made.retain(|(_, x)| *x != other);
    }
}
