//! The router against the real Docker Engine: labelled busybox httpd
//! containers, the real `portless` binary, real curl. Traffic goes only to
//! loopback (the router) and the tests' own containers.

// Plain threads, no runtime here: blocking sleeps are fine.
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(20);

/// portless with its router on a free loopback port, DNS on loopback only.
fn portless_router(extra: &[&str]) -> (Portless, SocketAddr) {
    let http = SocketAddr::new([127, 0, 0, 1].into(), free_port([127, 0, 0, 1].into()));
    let dns = SocketAddr::new([127, 0, 0, 1].into(), free_port([127, 0, 0, 1].into()));
    let (http_s, dns_s) = (http.to_string(), dns.to_string());
    let mut args = vec![
        "--dns-port",
        "0",
        "--dns-listen",
        &dns_s,
        "--upstream",
        "127.0.0.1:9",
        "--http-listen",
        &http_s,
        "--router-threads",
        "2",
    ];
    args.extend_from_slice(extra);
    (Portless::start(&args), http)
}

/// A busybox httpd answering `body` on port 8080 (exposed), under `/` and
/// under every path in `paths`.
fn web(cleanup: &Cleanup, name: &str, body: &str, paths: &[&str], args: &[&str]) -> String {
    let mut script = String::from("mkdir -p /www");
    for p in std::iter::once(&"").chain(paths) {
        script.push_str(&format!(
            " && mkdir -p /www{p} && echo {body} > /www{p}/index.html"
        ));
    }
    script.push_str(" && exec httpd -f -p 8080 -h /www");
    let mut a = vec!["--expose", "8080"];
    a.extend_from_slice(args);
    container(cleanup, name, &a, &["sh", "-c", &script])
}

/// `curl` to the router for `host` + `path`: (status, body).
fn get(router: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "-w", "\n%{http_code}", "--resolve"])
        .arg(format!("{host}:{}:{}", router.port(), router.ip()))
        .arg(format!("http://{host}:{}{path}", router.port()))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.trim().to_owned())
}

fn wait_body(router: SocketAddr, host: &str, path: &str, want: &str) {
    wait_until(&format!("{host}{path} to answer {want}"), WAIT, || {
        let (code, body) = get(router, host, path);
        (code == 200 && body == want).then_some(())
    });
}

/// The log without terminal colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... letter
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn label(k: &str, v: &str) -> String {
    format!("{k}={v}")
}

#[test]
#[ignore = "until main.rs calls router_task::start (see the router report)"]
fn labelled_containers_are_routed_by_exact_host_wildcard_and_path() {
    let cleanup = Cleanup::new();
    let (net, _) = network(&cleanup, &[]);
    let (p, router) = portless_router(&[]);
    let (shop, api, wild, plain) = (
        unique("shop"),
        unique("api"),
        unique("wild"),
        unique("plain"),
    );
    let (l_shop, l_api, l_path, l_wild) = (
        label("portless.http.host", "shop.test"),
        label("portless.http.host", "shop.test"),
        label("portless.http.path", "/api"),
        label("portless.http.host", "*.apps.test"),
    );
    web(
        &cleanup,
        &shop,
        "shop",
        &[],
        &["--network", &net, "--label", &l_shop],
    );
    web(
        &cleanup,
        &api,
        "api",
        &["/api"],
        &["--network", &net, "--label", &l_api, "--label", &l_path],
    );
    web(
        &cleanup,
        &wild,
        "wild",
        &[],
        &["--network", &net, "--label", &l_wild],
    );
    // Unlabelled: never routed, whatever the client asks for.
    web(&cleanup, &plain, "plain", &[], &["--network", &net]);

    wait_body(router, "shop.test", "/", "shop");
    wait_body(router, "SHOP.test.", "/api/", "api");
    wait_body(router, "blog.apps.test", "/", "wild");
    wait_body(router, "a.b.apps.test", "/", "wild");
    assert_eq!(get(router, "apps.test", "/"), (404, "404 Not Found".into()));
    let plain_ip = container_ip(&plain, &net).to_string();
    assert_eq!(get(router, &plain_ip, "/").0, 404);
    assert_eq!(get(router, &plain, "/").0, 404);

    // Removing the container removes its route.
    docker(&["rm", "-f", &shop]);
    wait_until("shop.test to go", WAIT, || {
        (get(router, "shop.test", "/").0 == 404).then_some(())
    });
    drop(p);
}

#[test]
#[ignore = "until main.rs calls router_task::start (see the router report)"]
fn bad_labels_refuse_the_whole_container_with_a_reason() {
    let cleanup = Cleanup::new();
    let (net, _) = network(&cleanup, &[]);
    let (p, router) = portless_router(&[]);
    let (bad, multi) = (unique("bad"), unique("multi"));
    let (h1, h2, port) = (
        label("portless.http.ok.host", "ok.test"),
        label("portless.http.bad.host", "bad.test"),
        label("portless.http.bad.port", "eighty"),
    );
    web(
        &cleanup,
        &bad,
        "bad",
        &[],
        &[
            "--network",
            &net,
            "--label",
            &h1,
            "--label",
            &h2,
            "--label",
            &port,
        ],
    );
    // Two exposed ports and no port label: refused, with the ports named.
    let mh = label("portless.http.host", "multi.test");
    web(
        &cleanup,
        &multi,
        "multi",
        &[],
        &["--network", &net, "--expose", "9090", "--label", &mh],
    );
    wait_until("the refusals to be logged", WAIT, || {
        let logs = strip_ansi(&p.logs());
        (logs.contains("container not routed")
            && logs.contains("portless.http.bad.port")
            && logs.contains("8080, 9090"))
        .then_some(())
    });
    // Never half-applied: the good group of the bad container is not routed.
    assert_eq!(get(router, "ok.test", "/").0, 404);
    assert_eq!(get(router, "bad.test", "/").0, 404);
    assert_eq!(get(router, "multi.test", "/").0, 404);
}

#[test]
#[ignore = "until main.rs calls router_task::start (see the router report)"]
fn a_container_on_two_networks_uses_the_label_or_the_documented_rule() {
    let cleanup = Cleanup::new();
    let (net_a, _) = network(&cleanup, &[]);
    let (net_b, _) = network(&cleanup, &["--internal"]);
    let (p, router) = portless_router(&[]);
    let (ruled, labelled) = (unique("rul"), unique("lab"));
    let (h1, h2, n2) = (
        label("portless.http.host", "ruled.test"),
        label("portless.http.host", "labelled.test"),
        label("portless.http.network", &net_b),
    );
    web(
        &cleanup,
        &ruled,
        "ruled",
        &[],
        &["--network", &net_b, "--label", &h1],
    );
    web(
        &cleanup,
        &labelled,
        "labelled",
        &[],
        &["--network", &net_a, "--label", &h2, "--label", &n2],
    );
    docker(&["network", "connect", &net_a, &ruled]);
    docker(&["network", "connect", &net_b, &labelled]);
    wait_body(router, "ruled.test", "/", "ruled");
    wait_body(router, "labelled.test", "/", "labelled");
    // The rule: not --internal first (net_a), whatever the names; the label
    // wins over the rule.
    let ruled_ip = container_ip(&ruled, &net_a).to_string();
    let labelled_ip = container_ip(&labelled, &net_b).to_string();
    wait_until("the address choices to be logged", WAIT, || {
        let logs = strip_ansi(&p.logs());
        let line = |ip: &str, by: &str| {
            logs.lines().any(|l| {
                l.contains("route address") && l.contains(&format!("{ip}:8080")) && l.contains(by)
            })
        };
        (line(&ruled_ip, "chosen_by=\"rule\"") && line(&labelled_ip, "chosen_by=\"label\""))
            .then_some(())
    });
}

#[test]
#[ignore = "until main.rs calls router_task::start (see the router report)"]
fn replicas_share_load_and_unhealthy_ones_get_none() {
    let cleanup = Cleanup::new();
    let (net, _) = network(&cleanup, &[]);
    let (_p, router) = portless_router(&[]);
    let h = label("portless.http.host", "rep.test");
    let (a, b, sick) = (unique("ra"), unique("rb"), unique("rs"));
    web(&cleanup, &a, "a", &[], &["--network", &net, "--label", &h]);
    web(&cleanup, &b, "b", &[], &["--network", &net, "--label", &h]);
    // Healthcheck that always fails: once unhealthy it gets nothing.
    web(
        &cleanup,
        &sick,
        "sick",
        &[],
        &[
            "--network",
            &net,
            "--label",
            &h,
            "--health-cmd",
            "false",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
        ],
    );
    wait_until("sick to be unhealthy", WAIT, || {
        (docker(&["inspect", "-f", "{{.State.Health.Status}}", &sick]) == "unhealthy").then_some(())
    });
    wait_until("a and b to both serve, sick never", WAIT, || {
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..20 {
            *seen.entry(get(router, "rep.test", "/").1).or_insert(0) += 1;
        }
        (seen.len() == 2 && seen.contains_key("a") && seen.contains_key("b")).then_some(())
    });
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..40 {
        *counts.entry(get(router, "rep.test", "/").1).or_insert(0) += 1;
    }
    assert_eq!(counts.get("sick"), None, "{counts:?}");
    assert!(
        counts.values().all(|&n| (15..=25).contains(&n)),
        "uneven: {counts:?}"
    );
}

#[test]
#[ignore = "until main.rs calls router_task::start (see the router report)"]
fn rolling_replacement_of_three_replicas_under_load_fails_no_request() {
    let cleanup = Cleanup::new();
    let (net, _) = network(&cleanup, &[]);
    let (_p, router) = portless_router(&[]);
    let h = label("portless.http.host", "roll.test");
    let old: Vec<String> = (0..3).map(|i| unique(&format!("o{i}"))).collect();
    for o in &old {
        web(&cleanup, o, "v1", &[], &["--network", &net, "--label", &h]);
    }
    wait_body(router, "roll.test", "/", "v1");
    // Continuous load from 4 clients until the replacement is done.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let loaders: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed, failures) =
                (stop.clone(), ok.clone(), failed.clone(), failures.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (code, body) = get(router, "roll.test", "/");
                    if code == 200 && (body == "v1" || body == "v2") {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        failures.lock().unwrap().push(format!("{code} {body}"));
                    }
                }
            })
        })
        .collect();
    for o in &old {
        let n = unique("n");
        web(&cleanup, &n, "v2", &[], &["--network", &net, "--label", &h]);
        let n_ip = container_ip(&n, &net);
        wait_until("the new replica to take traffic", WAIT, || {
            // Its own address answers, and the router has had time to add it.
            let (c, _) = get(SocketAddr::new(n_ip, 8080), "roll.test", "/");
            (c == 200).then_some(())
        });
        std::thread::sleep(Duration::from_millis(500));
        docker(&["stop", "-t", "5", o]);
        docker(&["rm", "-f", o]);
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 50, "too little load: {ok}");
    assert_eq!(
        failed,
        0,
        "{ok} ok, {failed} failed: {:?}",
        failures.lock().unwrap()
    );
    assert_eq!(get(router, "roll.test", "/"), (200, "v2".into()));
}

#[test]
#[ignore = "until main.rs calls router_task::start (see the router report)"]
fn closed_port_gives_502_unhealthy_only_replica_503_paused_backend_504() {
    let cleanup = Cleanup::new();
    let (net, _) = network(&cleanup, &[]);
    let (_p, router) = portless_router(&[
        "--connect-timeout-ms",
        "1000",
        "--upstream-timeout-ms",
        "1500",
    ]);
    // Labelled for a port nothing listens on: connect refused, 502.
    let (closed, sick, paused) = (unique("cl"), unique("sk"), unique("pa"));
    let (h1, port) = (
        label("portless.http.host", "closed.test"),
        label("portless.http.port", "9999"),
    );
    web(
        &cleanup,
        &closed,
        "x",
        &[],
        &["--network", &net, "--label", &h1, "--label", &port],
    );
    wait_until("502 from a closed port", WAIT, || {
        (get(router, "closed.test", "/").0 == 502).then_some(())
    });
    // The only replica is unhealthy: no backend left, 503.
    let h2 = label("portless.http.host", "sick.test");
    web(
        &cleanup,
        &sick,
        "sick",
        &[],
        &[
            "--network",
            &net,
            "--label",
            &h2,
            "--health-cmd",
            "false",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
        ],
    );
    wait_until("503 from an unhealthy-only route", WAIT, || {
        (get(router, "sick.test", "/").0 == 503).then_some(())
    });
    // A paused container accepts TCP (the kernel does) but never answers.
    let h3 = label("portless.http.host", "paused.test");
    web(
        &cleanup,
        &paused,
        "paused",
        &[],
        &["--network", &net, "--label", &h3],
    );
    wait_body(router, "paused.test", "/", "paused");
    docker(&["pause", &paused]);
    assert_eq!(get(router, "paused.test", "/").0, 504);
    docker(&["unpause", &paused]);
    // Removal: no route at all, 404.
    docker(&["rm", "-f", &closed]);
    wait_until("route removed", WAIT, || {
        (get(router, "closed.test", "/").0 == 404).then_some(())
    });
}

#[test]
#[ignore = "until main.rs calls router_task::start (see the router report)"]
fn ingress_zone_names_resolve_through_portless_to_the_router() {
    let cleanup = Cleanup::new();
    let (net, _) = network(&cleanup, &[]);
    let dns_port = free_port([127, 0, 0, 1].into());
    let dns = SocketAddr::new([127, 0, 0, 1].into(), dns_port);
    let http = SocketAddr::new([127, 0, 0, 1].into(), free_port([127, 0, 0, 1].into()));
    let (dns_s, http_s) = (dns.to_string(), http.to_string());
    let _p = Portless::start(&[
        "--dns-port",
        "0",
        "--dns-listen",
        &dns_s,
        "--upstream",
        "127.0.0.1:9",
        "--ingress-zone",
        "apps.test=127.0.0.1",
        "--http-listen",
        &http_s,
        "--router-threads",
        "1",
    ]);
    let c = unique("zone");
    let h = label("portless.http.host", "shop.apps.test");
    web(
        &cleanup,
        &c,
        "zoned",
        &[],
        &["--network", &net, "--label", &h],
    );
    // A client that resolves through portless reaches the container.
    let answer = dig(dns, "shop.apps.test", "A", &[]);
    assert_eq!(
        answer.answers,
        vec!["127.0.0.1".to_owned()],
        "{}",
        answer.raw
    );
    let ip: IpAddr = answer.answers[0].parse().unwrap();
    wait_body(
        SocketAddr::new(ip, http.port()),
        "shop.apps.test",
        "/",
        "zoned",
    );
}
