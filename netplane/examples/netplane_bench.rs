//! netplane benchmark, run by `bench/netplane.sh` (root, iperf3, etcd):
//!
//! 1. TCP throughput container to container across two namespace hosts:
//!    over the same path with hand-made routes and no overlay (baseline),
//!    over portless route mode, and over portless VXLAN; rounds in rotated
//!    order, median per path, ratios to the baseline.
//! 2. Time from a new host's lease appearing in etcd to every peer's kernel
//!    entries being in place.
//! 3. Time to program 1,000 peers (3,000 netlink entries) into one host,
//!    to reconcile them when nothing changed, and to remove them; and, end
//!    to end through etcd, 1,000 host records until all are in place.
//!
//! Every namespace and process it makes is removed on exit.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

#[path = "../../tests/common/netns.rs"]
mod netns;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use netns::{Container, Etcd, Host, Segment};
use portless_netplane::agent::{Agent, AgentConfig};
use portless_netplane::netlink::Kernel;
use portless_netplane::plan::{self, LocalSpec, VXLAN_DEVICE};
use portless_netplane::store::Store;
use portless_netplane::{HostRecord, Mac, Mode};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(etcd: &Etcd, host: &Host, mode: Mode, bridge: bool) -> AgentConfig {
    AgentConfig {
        etcd: vec![etcd.endpoint()],
        etcd_access: Default::default(),
        prefix: "/portless/v1/".into(),
        cluster: "10.80.0.0/16".parse().unwrap(),
        subnet_len: 24,
        advertise: Some(host.addr),
        host_id: None,
        hostname: host.ns.name.clone(),
        mode,
        vxlan_port: 4789,
        vni: 1,
        vxlan_name: VXLAN_DEVICE.into(),
        lease_ttl: Duration::from_secs(5),
        bridge: bridge.then(|| "pl-br0".to_owned()),
        resync: Duration::from_secs(10),
        netns: Some(host.ns.path()),
        iptables: false,
        masquerade_outside: false,
        state_dir: None,
    }
}

fn container(tag: &str, name: &str, host: &Host, subnet: Ipv4Net, mtu: u32) -> Container {
    let gw = Ipv4Addr::from(u32::from(subnet.network()) + 1);
    let addr = Ipv4Net::new(
        Ipv4Addr::from(u32::from(subnet.network()) + 10),
        subnet.prefix_len(),
    )
    .unwrap();
    Container::new(tag, name, &host.ns, "pl-br0", addr, gw, mtu)
}

/// iperf3 from namespace `client` to `server` at `addr` for `secs`; Gbit/s
/// received.
fn iperf(client: &str, server: &str, addr: Ipv4Addr, secs: u64) -> f64 {
    let addr = addr.to_string();
    let mut srv = std::process::Command::new("ip")
        .args([
            "netns", "exec", server, "nice", "-n", "-10", "iperf3", "-s", "-1", "-B", &addr,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let secs = secs.to_string();
    let out = netns::sh(&[
        "ip", "netns", "exec", client, "nice", "-n", "-10", "iperf3", "-c", &addr, "-t", &secs,
        "-O", "1", "-J",
    ]);
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap()
        / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One pair of namespace hosts with one container each; `how` says how the
/// containers' subnets are joined.
struct Pair {
    _seg: Segment,
    _hosts: (Host, Host),
    c1: Container,
    c2: Container,
    _agents: Vec<Agent>,
}

async fn pair(etcd: &Etcd, how: &str) -> Pair {
    let tag = netns::unique_tag();
    let seg = Segment::new(&tag, "sw", "192.168.90.0/24");
    let h1 = Host::new(&tag, "h1", &seg, 1);
    let h2 = Host::new(&tag, "h2", &seg, 2);
    if std::env::var_os("BENCH_NO_GRO").is_none() {
        // GRO on the underlay veths, as a real NIC would do: the same for
        // every path.
        for h in [&h1, &h2] {
            h.ns.exec(&["ethtool", "-K", "eth0", "gro", "on"]);
        }
        for p in ["p0", "p1"] {
            seg.ns.exec(&["ethtool", "-K", p, "gro", "on"]);
        }
    }
    let (c1, c2, agents) = if how == "plain" {
        // The same path, set up by hand: bridges with the gateways and one
        // route each way. No portless, no overlay.
        let mut cs = Vec::new();
        for (h, n, other, via) in [(&h1, 1, 2, h2.addr), (&h2, 2, 1, h1.addr)] {
            h.ns.ip(&["link", "add", "pl-br0", "type", "bridge"]);
            h.ns.ip(&["addr", "add", &format!("10.80.{n}.1/24"), "dev", "pl-br0"]);
            h.ns.ip(&["link", "set", "pl-br0", "up"]);
            h.ns.ip(&[
                "route",
                "add",
                &format!("10.80.{other}.0/24"),
                "via",
                &via.to_string(),
            ]);
            cs.push(container(
                &tag,
                &format!("c{n}"),
                h,
                format!("10.80.{n}.0/24").parse().unwrap(),
                1500,
            ));
        }
        let c2 = cs.pop().unwrap();
        let c1 = cs.pop().unwrap();
        (c1, c2, vec![])
    } else {
        let mode = if how == "route" {
            Mode::Route
        } else {
            Mode::Vxlan
        };
        let a1 = Agent::start(config(etcd, &h1, mode, true)).await.unwrap();
        let a2 = Agent::start(config(etcd, &h2, mode, true)).await.unwrap();
        let s1 = a1.ready().await;
        let s2 = a2.ready().await;
        let c1 = container(&tag, "c1", &h1, s1.subnet, s1.mtu);
        let c2 = container(&tag, "c2", &h2, s2.subnet, s2.mtu);
        assert!(c1.ns.ping_until(c2.addr, 10), "{how}: no connectivity");
        (c1, c2, vec![a1, a2])
    };
    assert!(c1.ns.ping_until(c2.addr, 10), "{how}: no connectivity");
    Pair {
        _seg: seg,
        _hosts: (h1, h2),
        c1,
        c2,
        _agents: agents,
    }
}

async fn throughput(secs: u64, rounds: u64) {
    println!("== TCP throughput, container to container across two namespace hosts");
    println!(
        "iperf3 -t {secs} (1 s omitted, nice -10), {rounds} rounds in rotated order over three \
         topologies built once, median per path\n"
    );
    let paths = ["plain", "route", "vxlan"];
    // Separate etcds: each pair is a cluster of its own.
    let etcds: Vec<Etcd> = (0..3).map(|_| Etcd::on_loopback()).collect();
    let mut pairs = Vec::new();
    for (i, how) in paths.iter().enumerate() {
        pairs.push(pair(&etcds[i], how).await);
    }
    let mut results: Vec<Vec<f64>> = vec![vec![]; 3];
    for round in 0..rounds as usize {
        for k in 0..3 {
            let i = (round + k) % 3;
            let p = &pairs[i];
            let (c1, c2, addr) = (p.c1.ns.name.clone(), p.c2.ns.name.clone(), p.c2.addr);
            let g = tokio::task::spawn_blocking(move || iperf(&c1, &c2, addr, secs))
                .await
                .unwrap();
            println!("round {round} {:<6} {g:.2} Gbit/s", paths[i]);
            results[i].push(g);
        }
    }
    drop(pairs);
    // The machine is shared and its load drifts: compare each path with
    // the plain run of the same round, then take the median of those ratios.
    let ratios = |i: usize| {
        median(
            (0..rounds as usize)
                .map(|r| results[i][r] / results[0][r])
                .collect(),
        )
    };
    let plain = median(results[0].clone());
    println!("\n| path | median Gbit/s | median of per-round ratios to plain | goal |");
    println!("|---|---|---|---|");
    println!("| plain (hand-made routes, no overlay) | {plain:.2} | 1.000 | |");
    let route = median(results[1].clone());
    println!(
        "| portless route mode | {route:.2} | {:.3} | >= 0.97 |",
        ratios(1)
    );
    let vx = median(results[2].clone());
    println!("| portless VXLAN | {vx:.2} | {:.3} | >= 0.90 |", ratios(2));
    println!();
}

fn peers_with(status: &portless_netplane::agent::Status, subnet: Ipv4Net) -> bool {
    status
        .peers
        .iter()
        .any(|p| p.subnet == subnet && p.in_place)
}

async fn join_latency(samples: u64) {
    println!("== New host's lease -> every peer's kernel entries in place");
    println!(
        "3 running hosts (VXLAN); a 4th joins {samples} times (leaving with its lease released in between)\n"
    );
    let tag = netns::unique_tag();
    let etcd = Etcd::on_loopback();
    let seg = Segment::new(&tag, "sw", "192.168.91.0/24");
    let hosts: Vec<Host> = (1..=4)
        .map(|n| Host::new(&tag, &format!("h{n}"), &seg, n))
        .collect();
    let mut agents = Vec::new();
    for h in &hosts[..3] {
        let a = Agent::start(config(&etcd, h, Mode::Vxlan, true))
            .await
            .unwrap();
        a.ready().await;
        agents.push(a);
    }
    let store = Store::connect(&[etcd.endpoint()], "/portless/v1/")
        .await
        .unwrap();
    let mut times = Vec::new();
    for _ in 0..samples {
        let mut watch = store
            .client()
            .clone()
            .watch(
                "/portless/v1/subnets/",
                Some(etcd_client::WatchOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        let mut rxs: Vec<_> = agents.iter().map(|a| a.subscribe()).collect();
        let newcomer = Agent::start(config(&etcd, &hosts[3], Mode::Vxlan, true))
            .await
            .unwrap();
        // The lease appears: the subnets/ key is put.
        let (subnet, t0) = loop {
            let resp = watch.message().await.unwrap().unwrap();
            let put = resp.events().iter().find_map(|e| {
                (e.event_type() == etcd_client::EventType::Put).then(|| {
                    e.kv()
                        .unwrap()
                        .key_str()
                        .unwrap()
                        .rsplit('/')
                        .next()
                        .unwrap()
                        .to_owned()
                })
            });
            if let Some(k) = put {
                let (ip, len) = k.rsplit_once('-').unwrap();
                break (
                    Ipv4Net::new(ip.parse().unwrap(), len.parse().unwrap()).unwrap(),
                    Instant::now(),
                );
            }
        };
        for rx in &mut rxs {
            while !peers_with(&rx.borrow_and_update(), subnet) {
                rx.changed().await.unwrap();
            }
        }
        let dt = t0.elapsed();
        times.push(dt.as_secs_f64() * 1000.0);
        newcomer.stop(true).await.unwrap();
        for a in &agents {
            let mut rx = a.subscribe();
            while peers_with(&rx.borrow_and_update(), subnet) {
                rx.changed().await.unwrap();
            }
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "lease -> all 3 peers in place: median {:.1} ms, max {:.1} ms over {} samples (goal: < 1000 ms)\n",
        median(times.clone()),
        times[times.len() - 1],
        times.len()
    );
}

fn fake_peer(i: u32) -> HostRecord {
    // Underlay addresses off the host's segment: all VXLAN.
    let underlay = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 30, 0, 0)) + i + 1);
    HostRecord {
        id: underlay.to_string(),
        subnet: Ipv4Net::new(
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 81, 0, 0)) + ((i + 1) << 8)),
            24,
        )
        .unwrap(),
        underlay,
        vtep_mac: Mac::for_vtep(underlay),
        mode: Mode::Vxlan,
        vxlan_port: 4789,
        hostname: String::new(),
    }
}

async fn thousand_peers(n: u32) {
    println!(
        "== Programming {n} peers into one host (VXLAN: {} netlink entries)\n",
        3 * n
    );
    let tag = netns::unique_tag();
    let seg = Segment::new(&tag, "sw", "192.168.92.0/24");
    let h = Host::new(&tag, "h1", &seg, 1);
    let kernel = Kernel::spawn(Some(&h.ns.path())).unwrap();
    let underlay = kernel.underlay(Some(h.addr)).await.unwrap();
    let spec = LocalSpec {
        record: HostRecord {
            id: h.addr.to_string(),
            subnet: "10.81.0.0/24".parse().unwrap(),
            underlay: h.addr,
            vtep_mac: Mac::for_vtep(h.addr),
            mode: Mode::Vxlan,
            vxlan_port: 4789,
            hostname: String::new(),
        },
        underlay,
        vxlan_name: VXLAN_DEVICE.into(),
        vni: 1,
        bridge: Some("pl-br0".into()),
    };
    let peers: Vec<HostRecord> = (0..n).map(fake_peer).collect();
    let t = Instant::now();
    let p = plan::plan(&spec, &peers);
    let obs = kernel.observe().await.unwrap();
    let ops = plan::diff(&p, &obs);
    let nops = ops.len();
    for a in kernel.apply(ops).await.unwrap() {
        a.result.unwrap();
    }
    let program = t.elapsed();
    let t = Instant::now();
    let obs = kernel.observe().await.unwrap();
    assert!(plan::diff(&plan::plan(&spec, &peers), &obs).is_empty());
    let noop = t.elapsed();
    assert!(p.peers.iter().all(|pp| plan::peer_in_place(pp, &obs)));
    let t = Instant::now();
    let ops = plan::diff(&plan::plan(&spec, &[]), &obs);
    let ndel = ops.len();
    for a in kernel.apply(ops).await.unwrap() {
        a.result.unwrap();
    }
    let remove = t.elapsed();
    println!("| step | ops | time |");
    println!("|---|---|---|");
    println!(
        "| plan + read kernel + apply {n} peers from scratch | {nops} | {:.0} ms |",
        program.as_secs_f64() * 1e3
    );
    println!(
        "| reconcile with nothing to do (read back + diff) | 0 | {:.0} ms |",
        noop.as_secs_f64() * 1e3
    );
    println!(
        "| remove all {n} peers | {ndel} | {:.0} ms |",
        remove.as_secs_f64() * 1e3
    );

    // End to end: host records in etcd -> agent -> kernel.
    let etcd = Etcd::on_loopback();
    let a = Agent::start(config(&etcd, &h, Mode::Vxlan, true))
        .await
        .unwrap();
    a.ready().await;
    let store = Store::connect(&[etcd.endpoint()], "/portless/v1/")
        .await
        .unwrap();
    let mut rx = a.subscribe();
    let lease = store
        .client()
        .clone()
        .lease_grant(120, None)
        .await
        .unwrap()
        .id();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(n.div_ceil(50) as usize) {
        let mut kv = store.client().kv_client();
        let chunk = chunk.to_vec();
        tasks.push(tokio::spawn(async move {
            for i in chunk {
                let mut r = fake_peer(i);
                // /26s from 10.80.4.0 on: clear of the agent's own /24.
                r.subnet = Ipv4Net::new(
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 80, 4, 0)) + i * 64),
                    26,
                )
                .unwrap();
                kv.put(
                    format!("/portless/v1/hosts/{}", r.id),
                    serde_json::to_string(&r).unwrap(),
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let leased = t.elapsed();
    loop {
        let s = rx.borrow_and_update().clone();
        if s.peers.len() == n as usize && s.peers.iter().all(|p| p.in_place) {
            break;
        }
        rx.changed().await.unwrap();
    }
    println!(
        "| end to end: {n} host records put in etcd (50 writers) until all in place on one host | - | {:.0} ms (of which writing {:.0} ms) |",
        t.elapsed().as_secs_f64() * 1e3,
        leased.as_secs_f64() * 1e3
    );
    println!();
    drop(a);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    assert!(netns::can_run(), "run as root with iproute2 and ping");
    let what = std::env::args()
        .nth(1)
        .filter(|a| !a.starts_with("--"))
        .unwrap_or_else(|| "all".into());
    let secs = arg("--secs", 5);
    let rounds = arg("--rounds", 3);
    let samples = arg("--samples", 10);
    let peers = arg("--peers", 1000) as u32;
    if what == "all" || what == "throughput" {
        throughput(secs, rounds).await;
    }
    if what == "all" || what == "join" {
        join_latency(samples).await;
    }
    if what == "all" || what == "peers" {
        thousand_peers(peers).await;
    }
}
