//! Automatic HTTPS across a cluster: two real Docker Engines (each in its
//! own network namespace), a real etcd, a real `portless run` per engine,
//! and a real ACME server (Debian's pebble) in the namespace of the
//! harness's switch, which validates against the hosts' own addresses.
//!
//! One name, routed on both hosts (a replica on each). The name's
//! DNS (B's portless, an ingress zone) points at B only, while A takes the
//! right to order: the ACME server reaches B, which answers A's HTTP-01
//! challenge from etcd; A's certificate reaches B sealed through etcd, so
//! both serve it, and B never orders. The certificates live 30 s: A renews
//! and B takes the renewal; then A dies, its lock goes with its lease, and
//! B orders the next renewal itself.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use common::engines::{Engines, Sidecar};
use common::pebble::{Pebble, PebbleConfig};

const NAME: &str = "shop.acme.test";

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    wait_or(what, secs, &mut f, &|| String::new())
}

/// [`wait`], with `diag` (logs) in the failure.
fn wait_or(what: &str, secs: u64, f: &mut dyn FnMut() -> bool, diag: &dyn Fn() -> String) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what}: not within {secs} s\n{}",
            diag()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The ACME status of `NAME` on a sidecar (from `portless status --json`).
fn acme(s: &Sidecar) -> serde_json::Value {
    s.status()["routes"]["acme"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["host"] == NAME)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// GET https://NAME/ at `addr`, trusting pebble's issuing root, from the
/// switch's namespace; the body and the served certificate's end date.
fn https_get(e: &Engines, root: &std::path::Path, addr: Ipv4Addr) -> Option<(String, String)> {
    let sw = format!("{}-sw", e.pfx);
    let out = Command::new("ip")
        .args(["netns", "exec", &sw, "curl", "-sS", "--max-time", "5"])
        .args(["--resolve", &format!("{NAME}:443:{addr}"), "--cacert"])
        .arg(root)
        .arg(format!("https://{NAME}/"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let body = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .to_owned();
    // The served certificate's end, as openssl reads it off the handshake.
    let cert = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ip netns exec {sw} openssl s_client -connect {addr}:443 -servername {NAME} </dev/null 2>/dev/null \
             | openssl x509 -noout -enddate"
        ))
        .output()
        .ok()?;
    let end = String::from_utf8_lossy(&cert.stdout).trim().to_owned();
    Some((body, end))
}

#[test]
fn one_host_orders_every_host_answers_and_serves_and_a_survivor_takes_over() {
    let e = Engines::up();
    let a_addr = e.addr('A');
    let b_addr = e.addr('B');
    let key = e.dir.join("acme-cluster.key");
    std::fs::write(
        &key,
        "00112233445566778899aabbccddeeff102132435465768798a9bacbdcedfe0f\n",
    )
    .unwrap();
    let dns = SocketAddr::from((b_addr, 5353));
    let pebble = Pebble::start(PebbleConfig {
        http_port: 80,
        tls_port: 443,
        validity_secs: Some(30),
        dns_server: Some(dns),
        netns: Some(format!("{}-sw", e.pfx)),
        listen: Some(Ipv4Addr::new(10, 251, 0, 10)),
    });
    let root = pebble.issuing_root();
    let acme_args = |h: char| -> Vec<String> {
        let mut v: Vec<String> = [
            "--acme-directory",
            &pebble.directory,
            "--acme-ca",
            pebble.listener_ca.to_str().unwrap(),
            "--acme-cluster-key",
            key.to_str().unwrap(),
            "--acme-challenge",
            "http-01",
            "--acme-retry-ms",
            "300",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push("--acme-dir".into());
        v.push(e.dir.join(format!("acme-{h}")).to_str().unwrap().into());
        v
    };
    let a_args = acme_args('A');
    let a_ref: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let mut a = Sidecar::start(&e, 'A', &a_ref);

    // The site, on A.
    let image = e.image();
    let web = [
        "run",
        "-d",
        "--name",
        "acme-web",
        "--network",
        "portless",
        "--label",
        &format!("portless.http.host={NAME}"),
        "--label",
        "portless.http.port=80",
        &image,
        "sh",
        "-c",
        "echo acme-web > /var/www/index.html; exec httpd -f -p 80 -h /var/www",
    ];
    e.docker_ok('A', &web);
    let _rm = RemoveOnDrop(&e);

    // A takes the right to order NAME before B runs.
    let a_id = a.status()["cluster"]["host"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let lock_key = format!("/portless/v1/acmelock/{NAME}");
    let holder = || {
        let out = e.etcdctl(&["get", &lock_key, "--print-value-only"]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    wait("A holds the order lock", 30, || holder() == a_id);

    // B: the name's DNS (pebble asks it) answers B's address only.
    let mut b_args = acme_args('B');
    for s in [
        "--dns-listen",
        &dns.to_string(),
        "--dns-allow",
        "10.251.0.0/24",
        "--ingress-zone",
        &format!("{NAME}={b_addr}"),
    ] {
        b_args.push(s.to_owned());
    }
    let b_ref: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let b = Sidecar::start(&e, 'B', &b_ref);
    // A replica on B too (on the cluster network B's portless made): the
    // route stays on B when A dies.
    let mut web_b = web;
    web_b[3] = "acme-web-b";
    e.docker_ok('B', &web_b);

    // Both serve pebble's certificate: B answered A's challenge, and took
    // A's certificate from etcd.
    let mut first = (String::new(), String::new());
    let pebble_log = || {
        let text = std::fs::read_to_string(&pebble.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    let diag = || {
        format!(
            "A: {}\nA log:\n{}\nB: {}\nB log:\n{}\npebble log:\n{}",
            acme(&a),
            a.log_tail(),
            acme(&b),
            b.log_tail(),
            pebble_log()
        )
    };
    wait_or(
        "HTTPS with pebble's certificate through both hosts",
        // A's orders fail (backing off) until B, which the name's DNS
        // points at, is up.
        150,
        &mut || match (https_get(&e, &root, a_addr), https_get(&e, &root, b_addr)) {
            (Some(x), Some(y)) if x.0 == "acme-web" && y.0 == "acme-web" => {
                first = x;
                true
            }
            _ => false,
        },
        &diag,
    );
    assert!(!first.1.is_empty(), "the served certificate's end is read");
    let (a_st, b_st) = (acme(&a), acme(&b));
    assert!(
        a_st["orders"].as_u64().unwrap_or(0) >= 1,
        "A ordered: {a_st}"
    );
    assert_eq!(b_st["orders"], 0, "B never ordered: {b_st}");
    assert_eq!(b_st["state"], "valid", "B serves the shared one: {b_st}");
    assert_eq!(holder(), a_id);

    // In etcd the certificate is sealed: no PEM, no key in clear.
    let stored = e.etcdctl(&[
        "get",
        &format!("/portless/v1/acmecert/{NAME}"),
        "--print-value-only",
    ]);
    assert!(stored.status.success() && stored.stdout.len() > 100);
    assert!(
        !stored.stdout.windows(10).any(|w| w == b"-----BEGIN"),
        "a certificate in clear in etcd"
    );

    // A renews (2/3 of 30 s) and B serves the renewal without ordering.
    wait_or(
        "B serves A's renewal",
        60,
        &mut || https_get(&e, &root, b_addr).is_some_and(|(_, end)| end != first.1),
        &diag,
    );
    assert_eq!(acme(&b)["orders"], 0, "B still never ordered");

    // The coordinators kept their etcd connections (an idle watch alone
    // was cut by etcd every ~10 s for too many keep-alive pings).
    for s in [&a, &b] {
        let log = std::fs::read_to_string(&s.log).unwrap_or_default();
        let cut = log.matches("shared state is out of reach").count();
        assert_eq!(
            cut, 0,
            "host {}: the coordinator lost etcd {cut} times",
            s.host
        );
    }

    // A dies: its lock goes with its lease, and B orders the next renewal.
    a.kill9();
    wait("A's lock gone with its lease", 30, || holder().is_empty());
    wait("B orders and serves a renewal of its own", 90, || {
        acme(&b)["orders"].as_u64().unwrap_or(0) >= 1 && holder() != a_id && !holder().is_empty()
    });
    let after = https_get(&e, &root, b_addr).expect("B serves HTTPS");
    assert_eq!(after.0, "acme-web");
    drop(b);
}

struct RemoveOnDrop<'e>(&'e Engines);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.docker('A', &["rm", "-f", "acme-web"]);
        let _ = self.0.docker('B', &["rm", "-f", "acme-web-b"]);
    }
}
