//! Automatic HTTPS through the real binary: a labelled container on the
//! real Docker Engine gets a certificate from a real ACME server (pebble on
//! loopback) that curl trusts through pebble's root; plain HTTP redirects
//! once the certificate is there; a restart serves the stored certificate
//! without a new order; a name no label claims is never ordered.

// Plain threads, no runtime here: blocking sleeps are fine; a panic in a
// helper is a failed test.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::pebble::{Pebble, PebbleConfig};
use common::*;

const WAIT: Duration = Duration::from_secs(60);

/// A busybox httpd answering `body` on port 8080.
fn web(cleanup: &Cleanup, name: &str, body: &str, args: &[&str]) -> String {
    let script =
        format!("mkdir -p /www && echo {body} > /www/index.html && exec httpd -f -p 8080 -h /www");
    let mut a = vec!["--expose", "8080"];
    a.extend_from_slice(args);
    container(cleanup, name, &a, &["sh", "-c", &script])
}

/// curl `url` with `host` resolved to 127.0.0.1: (status, body, redirect).
fn curl(url: &str, host: &str, port: u16, extra: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code} %{redirect_url}",
            "--resolve",
        ])
        .arg(format!("{host}:{port}:127.0.0.1"))
        .args(extra)
        .arg(url)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", "0 "));
    let (code, redirect) = tail.split_once(' ').unwrap_or((tail, ""));
    (
        code.trim().parse().unwrap_or(0),
        body.trim().to_owned(),
        redirect.trim().to_owned(),
    )
}

fn acme_status(p: &Portless, host: &str) -> Option<serde_json::Value> {
    let routes: serde_json::Value =
        serde_json::from_str(&http_get(p.admin, "/api/routes")?).ok()?;
    routes["acme"]
        .as_array()?
        .iter()
        .find(|c| c["host"] == host)
        .cloned()
}

fn start(http: SocketAddr, https: SocketAddr, pebble: &Pebble, dir: &Path) -> Portless {
    let (http_s, https_s) = (http.to_string(), https.to_string());
    Portless::start(&[
        "--dns-port",
        "0",
        "--upstream",
        "127.0.0.1:9",
        "--http-listen",
        &http_s,
        "--https-listen",
        &https_s,
        "--router-threads",
        "2",
        "--redirect-https",
        "--acme-directory",
        &pebble.directory,
        "--acme-ca",
        pebble.listener_ca.to_str().unwrap(),
        "--acme-dir",
        dir.to_str().unwrap(),
        "--acme-email",
        "ops@example.test",
    ])
}

#[test]
fn a_labelled_container_gets_a_certificate_from_the_acme_server_and_keeps_it_across_a_restart() {
    let cleanup = Cleanup::new();
    let (net, _) = network(&cleanup, &[]);
    let lo = [127, 0, 0, 1].into();
    let http = SocketAddr::new(lo, free_port(lo));
    let https = SocketAddr::new(lo, free_port(lo));
    let pebble = Pebble::start(PebbleConfig {
        http_port: http.port(),
        tls_port: https.port(),
        validity_secs: None,
        dns_server: None,
        ..Default::default()
    });
    let dir = std::env::temp_dir().join(unique("placme"));
    cleanup.push(&["rm", "-rf", dir.to_str().unwrap()]);
    let host = format!("{}.example.test", unique("shop"));
    let p = start(http, https, &pebble, &dir);
    let c = unique("acme");
    web(
        &cleanup,
        &c,
        "shop",
        &[
            "--network",
            &net,
            "--label",
            &format!("portless.http.host={host}"),
        ],
    );
    // An unlabelled container: its name is routed nowhere and never ordered.
    let plain = unique("plain");
    web(&cleanup, &plain, "plain", &["--network", &net]);

    let root = pebble.issuing_root();
    let url = format!("https://{host}:{}/", https.port());
    let cacert = ["--cacert", root.to_str().unwrap()];
    wait_until("https with pebble's certificate", WAIT, || {
        let (code, body, _) = curl(&url, &host, https.port(), &cacert);
        (code == 200 && body == "shop").then_some(())
    });
    let st = acme_status(&p, &host).unwrap();
    assert_eq!(st["state"], "valid", "{st}");
    assert_eq!(st["orders"], 1, "{st}");
    // Pebble's certificates last five years (unless told otherwise).
    let m = p.metrics();
    let left = metric(
        &m,
        &format!("portless_acme_certificate_expiry_seconds{{host=\"{host}\"}}"),
    );
    assert!(left > Some(4.0 * 365.0 * 86_400.0), "{m}");
    assert!(
        metric(&m, "portless_acme_orders_total{result=\"issued\"}") >= Some(1.0),
        "{m}"
    );
    promtool_check(&m);
    // Asking for other names orders nothing.
    for name in [plain.as_str(), "stranger.example.test"] {
        let _ = curl(
            &format!("https://{name}:{}/", https.port()),
            name,
            https.port(),
            &["-k"],
        );
        let _ = curl(
            &format!("http://{name}:{}/", http.port()),
            name,
            http.port(),
            &[],
        );
    }
    // With the certificate there, plain HTTP redirects.
    let (code, _, redirect) = curl(
        &format!("http://{host}:{}/a", http.port()),
        &host,
        http.port(),
        &[],
    );
    assert_eq!(
        (code, redirect.as_str()),
        (308, format!("https://{host}:{}/a", https.port()).as_str())
    );
    // (The Engine is shared: other tests' labelled containers are routed,
    // and ordered, too; so the counts are per name.)
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(pebble.validations(&host), 1);
    for name in [plain.as_str(), "stranger.example.test"] {
        assert_eq!(pebble.validations(name), 0, "{name} was ordered");
        assert!(acme_status(&p, name).is_none());
    }
    drop(p);

    // A restart serves the stored certificate from the start.
    let p = start(http, https, &pebble, &dir);
    wait_until("https after the restart", WAIT, || {
        let (code, body, _) = curl(&url, &host, https.port(), &cacert);
        (code == 200 && body == "shop").then_some(())
    });
    wait_until("the host's ACME state", WAIT, || {
        acme_status(&p, &host).filter(|s| s["state"] == "valid")
    });
    assert_eq!(acme_status(&p, &host).unwrap()["orders"], 0);
    assert_eq!(pebble.validations(&host), 1);
    // A new site after the restart is ordered with the stored account
    // (0600), not a new one.
    let second = format!("{}.example.test", unique("blog"));
    let c2 = unique("acme");
    web(
        &cleanup,
        &c2,
        "blog",
        &[
            "--network",
            &net,
            "--label",
            &format!("portless.http.host={second}"),
        ],
    );
    let url2 = format!("https://{second}:{}/", https.port());
    wait_until("https for a site added after the restart", WAIT, || {
        let (code, body, _) = curl(&url2, &second, https.port(), &cacert);
        (code == 200 && body == "blog").then_some(())
    });
    let log = std::fs::read_to_string(&pebble.log).unwrap();
    assert!(log.contains("There are now 1 accounts"), "{log}");
    assert!(
        !log.contains("There are now 2 accounts"),
        "a second account: {log}"
    );
    let accounts = Command::new("find")
        .arg(&dir)
        .args(["-name", "account.json", "-perm", "0600"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&accounts.stdout).lines().count(), 1);
}

#[test]
fn a_wildcard_host_in_an_ingress_zone_gets_its_certificate_by_dns01_from_portless_own_dns() {
    let cleanup = Cleanup::new();
    let (net, _) = network(&cleanup, &[]);
    let lo = [127, 0, 0, 1].into();
    let http = SocketAddr::new(lo, free_port(lo));
    let https = SocketAddr::new(lo, free_port(lo));
    let dns = SocketAddr::new(lo, free_port(lo));
    // Pebble asks portless's DNS: the ingress zone's names are the router
    // (for HTTP-01), its TXT records the DNS-01 answers.
    let pebble = Pebble::start(PebbleConfig {
        http_port: http.port(),
        tls_port: https.port(),
        validity_secs: None,
        dns_server: Some(dns),
        ..Default::default()
    });
    let dir = std::env::temp_dir().join(unique("placme"));
    cleanup.push(&["rm", "-rf", dir.to_str().unwrap()]);
    let zone = format!("{}.example.test", unique("apps"));
    let (http_s, https_s, dns_s) = (http.to_string(), https.to_string(), dns.to_string());
    let ingress = format!("{zone}=127.0.0.1");
    let p = Portless::start(&[
        "--dns-port",
        "0",
        "--dns-listen",
        &dns_s,
        "--upstream",
        "127.0.0.1:9",
        "--ingress-zone",
        &ingress,
        "--http-listen",
        &http_s,
        "--https-listen",
        &https_s,
        "--router-threads",
        "2",
        "--acme-directory",
        &pebble.directory,
        "--acme-ca",
        pebble.listener_ca.to_str().unwrap(),
        "--acme-dir",
        dir.to_str().unwrap(),
    ]);
    let (wild, shop) = (unique("wild"), unique("shop"));
    web(
        &cleanup,
        &wild,
        "wild",
        &[
            "--network",
            &net,
            "--label",
            &format!("portless.http.host=*.{zone}"),
        ],
    );
    web(
        &cleanup,
        &shop,
        "shop",
        &[
            "--network",
            &net,
            "--label",
            &format!("portless.http.host=shop.{zone}"),
        ],
    );

    let root = pebble.issuing_root();
    let cacert = ["--cacert", root.to_str().unwrap()];
    for (name, body) in [
        (format!("blog.{zone}"), "wild"),
        (format!("shop.{zone}"), "shop"),
    ] {
        let url = format!("https://{name}:{}/", https.port());
        wait_until(&format!("https for {name}"), WAIT, || {
            let (code, got, _) = curl(&url, &name, https.port(), &cacert);
            (code == 200 && got == body).then_some(())
        });
    }
    let st = acme_status(&p, &format!("*.{zone}")).unwrap();
    assert_eq!(st["state"], "valid", "{st}");
    let log = std::fs::read_to_string(&pebble.log).unwrap();
    assert!(
        !log.contains(&format!("validate w/ HTTP: http://{zone}")),
        "{log}"
    );
    // The challenge's TXT record is gone once the order is done.
    let txt = dig(dns, &format!("_acme-challenge.{zone}"), "TXT", &[]);
    assert!(txt.sorted().is_empty(), "{txt:?}");
    assert_eq!(pebble.validations(&zone), 1);
    assert_eq!(st["orders"], 1, "{st}");
}

#[test]
fn a_failing_order_shows_in_the_status_and_is_retried_with_backoff() {
    let cleanup = Cleanup::new();
    let (net, _) = network(&cleanup, &[]);
    let lo = [127, 0, 0, 1].into();
    let http = SocketAddr::new(lo, free_port(lo));
    let https = SocketAddr::new(lo, free_port(lo));
    // Pebble validates HTTP-01 on a port where nothing listens.
    let pebble = Pebble::start(PebbleConfig {
        http_port: free_port(lo),
        tls_port: https.port(),
        validity_secs: None,
        dns_server: None,
        ..Default::default()
    });
    let dir = std::env::temp_dir().join(unique("placme"));
    cleanup.push(&["rm", "-rf", dir.to_str().unwrap()]);
    let (http_s, https_s) = (http.to_string(), https.to_string());
    let p = Portless::start(&[
        "--dns-port",
        "0",
        "--upstream",
        "127.0.0.1:9",
        "--http-listen",
        &http_s,
        "--https-listen",
        &https_s,
        "--redirect-https",
        "--acme-directory",
        &pebble.directory,
        "--acme-ca",
        pebble.listener_ca.to_str().unwrap(),
        "--acme-dir",
        dir.to_str().unwrap(),
        "--acme-challenge",
        "http-01",
        "--acme-retry-ms",
        "1000",
    ]);
    let host = format!("{}.example.test", unique("fail"));
    let c = unique("acme");
    web(
        &cleanup,
        &c,
        "shop",
        &[
            "--network",
            &net,
            "--label",
            &format!("portless.http.host={host}"),
        ],
    );
    let st = wait_until("a failed order", WAIT, || {
        acme_status(&p, &host).filter(|s| s["state"] == "failed")
    });
    let err = st["last_error"].as_str().unwrap();
    assert!(
        err.contains("urn:ietf:params:acme:error:connection"),
        "{st}"
    );
    // Still pending: plain HTTP serves the site, no redirect to an https
    // without a certificate.
    let (code, body, _) = curl(
        &format!("http://{host}:{}/", http.port()),
        &host,
        http.port(),
        &[],
    );
    assert_eq!((code, body.as_str()), (200, "shop"));
    // Retried after 1 s, then 2 s, then 4 s: the third failure comes 3 s
    // or more after the first.
    let first = std::time::Instant::now();
    let st = wait_until("three failed orders", WAIT, || {
        acme_status(&p, &host).filter(|s| s["failures"].as_u64() >= Some(3))
    });
    assert!(first.elapsed() >= Duration::from_millis(2500), "{st}");
    assert_eq!(st["orders"], st["failures"], "{st}");
    assert_eq!(
        pebble.validations(&host),
        st["orders"].as_u64().unwrap() as usize
    );
    let next = st["next_attempt"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        next >= now + 2,
        "next attempt in {}s: {st}",
        next.saturating_sub(now)
    );
    // The same in /metrics and in `portless status`.
    let m = p.metrics();
    let failures = metric(
        &m,
        &format!("portless_acme_order_failures{{host=\"{host}\"}}"),
    );
    assert!(failures >= Some(3.0), "{m}");
    assert!(
        metric(&m, "portless_acme_orders_total{result=\"failed\"}") >= Some(3.0),
        "{m}"
    );
    assert!(
        metric(&m, "portless_acme_certificates{state=\"failed\"}") >= Some(1.0),
        "{m}"
    );
    let out = ok(
        env!("CARGO_BIN_EXE_portless"),
        &["status", "--admin", &p.admin.to_string()],
    );
    let line = out
        .lines()
        .find(|l| l.starts_with(&host) && l.contains(" failed "))
        .unwrap_or_else(|| panic!("{host}'s certificate not in the status:\n{out}"));
    assert!(
        line.contains("failed") && line.contains("urn:ietf:params:acme:error:connection"),
        "{out}"
    );
}

/// `promtool check metrics` (Debian's prometheus package) accepts `text`.
fn promtool_check(text: &str) {
    use std::io::Write;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; ./test.sh installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let res = promtool.wait_with_output().unwrap();
    assert!(
        res.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
}

/// A sample's value in Prometheus text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}
