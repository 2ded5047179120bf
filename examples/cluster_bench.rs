//! The cluster namespace under measurement (run by `bench/cluster.sh`).
//!
//! `cluster_bench event ...`: inside host A's namespace of two real Docker
//! Engines, start containers on B one after another and measure, for each,
//! the time from B's Docker start event (the record's `changed-ns`, B's
//! clock, the same machine) to the first answer of A's portless for its
//! name (polled every millisecond); and etcd's writes per container event.
//!
//! `cluster_bench netrun ...`: inside host A's namespace, `docker run` on B
//! over a cluster network (`-d portless`), and the time until A resolves
//! the new container's name and reaches it over TCP.
//!
//! `cluster_bench fleet ...`: one etcd, one real portless, and this program
//! playing N hosts with M containers each (their host records and
//! container records bound to a lease per host, as portless writes them).
//! Measures portless's initial sync, its memory with every record merged,
//! and the time from a record written to the answer for its name, quiet and
//! under a steady churn of other records.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, PutOptions, Txn, TxnOp};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use portless_netplane::records::{ContainerRecord, RecordHealth};
use portless_netplane::{HostRecord, Mac, Mode};

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn arg<T: FromStr>(args: &[String], name: &str, default: Option<T>) -> T {
    let flag = format!("--{name}");
    match args.iter().position(|a| *a == flag) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad value for {flag}")),
        None => default.unwrap_or_else(|| panic!("{flag} is required")),
    }
}

/// Percentile of sorted samples (nearest rank).
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn summary(what: &str, mut ms: Vec<f64>) {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{what}: n={} p50={:.2} ms p90={:.2} ms p99={:.2} ms max={:.2} ms",
        ms.len(),
        pct(&ms, 50.0),
        pct(&ms, 90.0),
        pct(&ms, 99.0),
        ms.last().copied().unwrap_or(f64::NAN)
    );
}

/// One A query; true when answered with at least one address.
fn answers(sock: &UdpSocket, server: SocketAddr, name: &Name, id: u16) -> bool {
    first_a(sock, server, name, id).is_some()
}

/// One A query; the first address of the answer.
fn first_a(sock: &UdpSocket, server: SocketAddr, name: &Name, id: u16) -> Option<Ipv4Addr> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name.clone(), RecordType::A));
    let bytes = m.to_vec().unwrap();
    if sock.send_to(&bytes, server).is_err() {
        return None;
    }
    let mut buf = [0u8; 1500];
    let deadline = Instant::now() + Duration::from_millis(50);
    while Instant::now() < deadline {
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                if let Ok(resp) = Message::from_vec(&buf[..n])
                    && resp.metadata.id == id
                {
                    return resp.answers.iter().find_map(|r| match &r.data {
                        hickory_proto::rr::RData::A(a) => Some(a.0),
                        _ => None,
                    });
                }
            }
            Err(_) => return None,
        }
    }
    None
}

/// Poll `name` every millisecond until answered; the wall time (ns) of the
/// answer, or None after `limit`.
fn poll_until_answered(server: SocketAddr, name: &str, limit: Duration) -> Option<i64> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    let name = Name::from_str(name).unwrap();
    let start = Instant::now();
    let mut id = 1u16;
    while start.elapsed() < limit {
        id = id.wrapping_add(1);
        if answers(&sock, server, &name, id) {
            return Some(now_ns());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

async fn revision(c: &mut Client) -> i64 {
    c.get("/", None)
        .await
        .unwrap()
        .header()
        .map(|h| h.revision())
        .unwrap_or(0)
}

fn docker(host: &str, args: &[&str]) -> String {
    let out = Command::new("docker")
        .arg("-H")
        .arg(host)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Event on B to answer on A, over `n` container starts.
async fn event(args: &[String]) {
    let docker_b: String = arg(args, "docker", None);
    let dns: SocketAddr = arg(args, "dns", None);
    let etcd: String = arg(args, "etcd", None);
    let image: String = arg(args, "image", None);
    let host_b: String = arg(args, "host-b", None);
    let n: usize = arg(args, "n", Some(100));
    let mut client = Client::connect([etcd.as_str()], None).await.unwrap();
    let prefix = format!("/portless/v1/containers/{host_b}/");
    let tag = std::process::id();
    let mut lat = Vec::new();
    let mut names = Vec::new();
    let rev0 = revision(&mut client).await;
    for i in 0..n {
        let name = format!("ev{i}-{tag}");
        let fq = format!("{name}.docker.internal.");
        let probe =
            std::thread::spawn(move || poll_until_answered(dns, &fq, Duration::from_secs(10)));
        let id = docker(
            &docker_b,
            &[
                "run",
                "-d",
                "--network",
                "portless",
                "--name",
                &name,
                &image,
                "sleep",
                "100000",
            ],
        );
        names.push(name.clone());
        let answered = probe.join().unwrap().expect("never answered on A");
        let rec = client
            .get(format!("{prefix}{id}"), None)
            .await
            .unwrap()
            .kvs()
            .first()
            .map(|kv| ContainerRecord::decode(kv.value()).unwrap())
            .expect("B's record");
        let event_ns = rec.changed_ns.expect("changed-ns");
        lat.push((answered - event_ns) as f64 / 1e6);
    }
    let rev1 = revision(&mut client).await;
    summary(
        &format!("event on B -> answer on A, {n} container starts"),
        lat,
    );
    println!(
        "etcd writes during {n} starts: {} ({:.2} per start)",
        rev1 - rev0,
        (rev1 - rev0) as f64 / n as f64
    );
    // Stopping: `docker stop` is a kill (draining) then a die (gone).
    let rev2 = revision(&mut client).await;
    for name in &names {
        docker(&docker_b, &["stop", "-t", "0", name]);
    }
    // Let the last events through.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rev3 = revision(&mut client).await;
    println!(
        "etcd writes during {n} stops: {} ({:.2} per stop: the draining mark, then the removal)",
        rev3 - rev2,
        (rev3 - rev2) as f64 / n as f64
    );
    for name in &names {
        docker(&docker_b, &["rm", "-f", name]);
    }
}

fn fake_host(i: usize) -> HostRecord {
    let underlay = Ipv4Addr::new(
        172,
        20 + (i / 62500) as u8,
        ((i / 250) % 250) as u8,
        (i % 250 + 1) as u8,
    );
    let base = u32::from(Ipv4Addr::new(10, 64, 0, 0)) + ((i as u32 + 1) << 8);
    HostRecord {
        id: format!("fake-{i}"),
        subnet: ipnet::Ipv4Net::new(Ipv4Addr::from(base), 24).unwrap(),
        underlay,
        vtep_mac: Mac::for_vtep(underlay),
        mode: Mode::Vxlan,
        vxlan_port: 4789,
        hostname: format!("fake-{i}"),
    }
}

fn fake_record(h: &HostRecord, j: usize, name: &str, unhealthy: bool) -> ContainerRecord {
    let mut labels = BTreeMap::new();
    if j.is_multiple_of(10) {
        labels.insert(
            "portless.http.host".to_owned(),
            format!("{name}.fleet.test"),
        );
        labels.insert("portless.http.port".to_owned(), "80".to_owned());
    }
    ContainerRecord {
        host: h.id.clone(),
        id: format!(
            "{:0>64x}",
            ((h.subnet.network().to_bits() as u128) << 16) | j as u128
        ),
        name: name.to_owned(),
        project: Some(format!("p{}", h.id)),
        service: Some(format!("svc{}", j % 10)),
        aliases: vec![],
        addr: Some(Ipv4Addr::from(u32::from(h.subnet.network()) + 2 + j as u32)),
        networks: Vec::new(),
        health: if unhealthy {
            RecordHealth::Unhealthy
        } else {
            RecordHealth::Healthy
        },
        draining: false,
        labels,
        ports: vec![80],
        changed_ns: Some(now_ns()),
    }
}

fn http_get(admin: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).ok()?;
    let text = String::from_utf8_lossy(&body);
    let json = text.split("\r\n\r\n").nth(1)?;
    serde_json::from_str(json).ok()
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A simulated fleet against one real portless.
async fn fleet(args: &[String]) {
    let etcd: String = arg(args, "etcd", None);
    let dns: SocketAddr = arg(args, "dns", None);
    let admin: SocketAddr = arg(args, "admin", None);
    let hosts: usize = arg(args, "hosts", Some(1000));
    let per: usize = arg(args, "per-host", Some(100));
    let churn_rate: u64 = arg(args, "churn-rate", Some(100));
    let churn_secs: u64 = arg(args, "churn-secs", Some(20));
    let probes: usize = arg(args, "probes", Some(50));
    let portless: Vec<String> = args
        .iter()
        .skip_while(|a| *a != "--")
        .skip(1)
        .cloned()
        .collect();
    assert!(!portless.is_empty(), "give the portless command after --");
    let mut client = Client::connect([etcd.as_str()], None).await.unwrap();

    // 1. The fleet: per host one lease, its subnet and host keys and its
    //    records in one transaction, as a host of portless writes them.
    let started = Instant::now();
    let mut leases = Vec::new();
    let mut fakes = Vec::new();
    for i in 0..hosts {
        let h = fake_host(i);
        let lease = client.lease_grant(3600, None).await.unwrap().id();
        let on = Some(PutOptions::new().with_lease(lease));
        let sk = format!(
            "/portless/v1/subnets/{}-{}",
            h.subnet.network(),
            h.subnet.prefix_len()
        );
        let mut ops = vec![
            TxnOp::put(sk, h.id.clone(), on.clone()),
            TxnOp::put(
                format!("/portless/v1/hosts/{}", h.id),
                serde_json::to_string(&h).unwrap(),
                on.clone(),
            ),
        ];
        for j in 0..per {
            let r = fake_record(&h, j, &format!("h{i}-c{j}"), false);
            ops.push(TxnOp::put(
                format!("/portless/v1/containers/{}/{}", h.id, r.id),
                r.encode(),
                on.clone(),
            ));
        }
        client.txn(Txn::new().and_then(ops)).await.unwrap();
        leases.push(lease);
        fakes.push(h);
    }
    println!(
        "fleet written: {hosts} hosts x {per} records = {} records in {:.1} s",
        hosts * per,
        started.elapsed().as_secs_f64()
    );

    // 2. Start portless and wait for every record merged and answered.
    let t0 = Instant::now();
    let child = Command::new(&portless[0])
        .args(&portless[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("portless");
    let child = Killed(child);
    let pid = child.0.id();
    let want = hosts * per;
    let last = format!("h{}-c{}.docker.internal.", hosts - 1, per - 1);
    let mut merged_at = None;
    while t0.elapsed() < Duration::from_secs(120) {
        let merged = http_get(admin, "/api/cluster")
            .and_then(|v| v["records"]["merged"].as_u64())
            .unwrap_or(0);
        if merged as usize >= want {
            merged_at = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let merged_at = merged_at.expect("portless never merged every record");
    let answered = poll_until_answered(dns, &last, Duration::from_secs(60))
        .expect("the last record never answered");
    let _ = answered;
    let answered_at = t0.elapsed();
    println!(
        "initial sync: all {want} records merged {:.2} s after start, answered by {:.2} s",
        merged_at.as_secs_f64(),
        answered_at.as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(2));
    let (rss, hwm) = rss_kib(pid);
    println!(
        "memory with {want} remote records: RSS {:.1} MiB (peak {:.1} MiB)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );

    // 3. Record change -> answer: a new record on a random host, polled.
    let probe_once = |client: Client, k: usize, h: HostRecord, lease: i64| async move {
        let mut client = client;
        let name = format!("probe-{k}");
        let r = fake_record(&h, 200 + (k % 50), &name, false);
        let key = format!("/portless/v1/containers/{}/{}", h.id, r.id);
        let fq = format!("{name}.docker.internal.");
        let probe =
            std::thread::spawn(move || poll_until_answered(dns, &fq, Duration::from_secs(10)));
        let put_at = now_ns();
        client
            .put(
                key.clone(),
                r.encode(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .unwrap();
        let answered = tokio::task::spawn_blocking(move || probe.join().unwrap())
            .await
            .unwrap()
            .expect("probe never answered");
        client.delete(key, None).await.unwrap();
        (answered - put_at) as f64 / 1e6
    };
    let mut quiet = Vec::new();
    for k in 0..probes {
        let i = (k * 7919) % hosts;
        quiet.push(probe_once(client.clone(), k, fakes[i].clone(), leases[i]).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    summary("record written -> answered, quiet", quiet);

    // 4. The same under churn: `churn_rate` other records change a second
    //    (health flips), spread over the fleet.
    let stop = Arc::new(AtomicBool::new(false));
    let changes = Arc::new(AtomicU64::new(0));
    let churner = {
        let (stop, changes) = (stop.clone(), changes.clone());
        let mut client = client.clone();
        let fakes = fakes.clone();
        let leases = leases.clone();
        tokio::spawn(async move {
            let every = Duration::from_micros(1_000_000 / churn_rate.max(1));
            let mut tick = tokio::time::interval(every);
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let i = (k * 104_729) % fakes.len();
                let j = (k * 31) % per;
                let r = fake_record(&fakes[i], j, &format!("h{i}-c{j}"), k.is_multiple_of(2));
                let key = format!("/portless/v1/containers/{}/{}", fakes[i].id, r.id);
                let _ = client
                    .put(
                        key,
                        r.encode(),
                        Some(PutOptions::new().with_lease(leases[i])),
                    )
                    .await;
                changes.fetch_add(1, Ordering::Relaxed);
                k += 1;
            }
        })
    };
    let churn_start = Instant::now();
    let mut busy = Vec::new();
    let mut k = probes;
    while churn_start.elapsed() < Duration::from_secs(churn_secs) {
        let i = (k * 7919) % hosts;
        busy.push(probe_once(client.clone(), k, fakes[i].clone(), leases[i]).await);
        k += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = churner.await;
    let done = changes.load(Ordering::Relaxed);
    summary(
        &format!(
            "record written -> answered, under churn of {:.0} record changes/s",
            done as f64 / churn_start.elapsed().as_secs_f64()
        ),
        busy,
    );
    let (rss, hwm) = rss_kib(pid);
    println!(
        "memory after the churn: RSS {:.1} MiB (peak {:.1} MiB)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = cpu.split_whitespace().collect();
    if f.len() > 15 {
        let ticks: f64 = f[13].parse::<f64>().unwrap_or(0.0) + f[14].parse::<f64>().unwrap_or(0.0);
        println!(
            "portless CPU time over the whole run: {:.1} s",
            ticks / 100.0
        );
    }
    drop(child);
    for l in leases {
        let _ = client.lease_revoke(l).await;
    }
    let _ = client
        .delete(
            "/portless/v1/",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await;
}

/// `docker run` on B until the new container is resolvable (A's portless
/// answers its name) and reachable (a TCP connection from A's namespace to
/// its port 80 succeeds), over the cluster network `--network`
/// (`-d portless`), `n` times one after the other.
fn netrun(args: &[String]) {
    let docker_b: String = arg(args, "docker", None);
    let dns: SocketAddr = arg(args, "dns", None);
    let image: String = arg(args, "image", None);
    let network: String = arg(args, "network", None);
    let n: usize = arg(args, "n", Some(30));
    let tag = std::process::id();
    let (mut ran, mut resolved, mut reached) = (Vec::new(), Vec::new(), Vec::new());
    let mut names = Vec::new();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    for i in 0..n {
        let name = format!("nr{i}-{tag}");
        let fq = Name::from_str(&format!("{name}.docker.internal.")).unwrap();
        let t0 = Instant::now();
        let probe = std::thread::spawn(move || {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(5)))
                .unwrap();
            let mut id = 1u16;
            let addr = loop {
                if t0.elapsed() > Duration::from_secs(20) {
                    return None;
                }
                id = id.wrapping_add(1);
                if let Some(a) = first_a(&sock, dns, &fq, id) {
                    break a;
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            let resolved = t0.elapsed();
            let to = SocketAddr::from((addr, 80));
            while t0.elapsed() < Duration::from_secs(20) {
                if TcpStream::connect_timeout(&to, Duration::from_millis(50)).is_ok() {
                    return Some((resolved, t0.elapsed()));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            None
        });
        docker(
            &docker_b,
            &[
                "run",
                "-d",
                "--name",
                &name,
                "--network",
                &network,
                &image,
                "httpd",
                "-f",
                "-p",
                "80",
                "-h",
                "/var/www",
            ],
        );
        ran.push(ms(t0.elapsed()));
        names.push(name.clone());
        let (res, reach) = probe
            .join()
            .unwrap()
            .unwrap_or_else(|| panic!("{name} never resolvable and reachable from A"));
        resolved.push(ms(res));
        reached.push(ms(reach));
    }
    summary("docker run on B returned", ran);
    summary("docker run on B -> resolvable from A", resolved);
    summary(
        "docker run on B -> resolvable and reachable (TCP) from A",
        reached,
    );
    for name in &names {
        docker(&docker_b, &["rm", "-f", name]);
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("event") => event(&args).await,
        Some("fleet") => fleet(&args).await,
        Some("netrun") => netrun(&args),
        _ => {
            eprintln!(
                "usage: cluster_bench event --docker URL --dns ADDR --etcd URL --image IMG --host-b ID [--n 100]\n       cluster_bench netrun --docker URL --dns ADDR --image IMG --network NAME [--n 30]\n       cluster_bench fleet --etcd URL --dns ADDR --admin ADDR [--hosts 1000] [--per-host 100] [--churn-rate 100] [--churn-secs 20] [--probes 50] -- PORTLESS COMMAND..."
            );
            std::process::exit(2);
        }
    }
}
