//! The router against the real Docker Engine: labelled busybox httpd
//! containers, the real `portless` binary, real curl. Traffic goes only to
//! loopback (the router) and the tests' own containers.

// Plain threads, no runtime here: blocking sleeps are fine; a panic in a
// helper is a failed test.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

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
    let (p, http, _) = portless_router_dns(extra);
    (p, http)
}

/// [`portless_router`], and the address of its DNS listener.
fn portless_router_dns(extra: &[&str]) -> (Portless, SocketAddr, SocketAddr) {
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
    (Portless::start(&args), http, dns)
}

#[test]
fn the_header_timeout_from_the_environment_closes_silent_connections() {
    use std::io::Read;
    let http = SocketAddr::new([127, 0, 0, 1].into(), free_port([127, 0, 0, 1].into()));
    let http_s = http.to_string();
    let _p = Portless::start_with_env(
        &[
            "--dns-port",
            "0",
            "--upstream",
            "127.0.0.1:9",
            "--http-listen",
            &http_s,
        ],
        &[("PORTLESS_HEADER_TIMEOUT_MS", "400")],
    );
    // A client that connects and sends nothing is let go after one to two
    // header timeouts (the default would keep it 10 to 20 s).
    let start = std::time::Instant::now();
    let mut s = std::net::TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(usize::MAX);
    let took = start.elapsed();
    assert_eq!(n, 0, "the router did not close the silent connection");
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(3),
        "{took:?}"
    );
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
    // Round-robin: one request after another alternates between a and b
    // (random picks would repeat one about every other time).
    let seen: Vec<String> = (0..40).map(|_| get(router, "rep.test", "/").1).collect();
    assert!(!seen.iter().any(|s| s == "sick"), "{seen:?}");
    let repeats = seen.windows(2).filter(|w| w[0] == w[1]).count();
    assert!(repeats <= 1, "not round-robin: {seen:?}");
}

#[test]
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

/// Each backend of `route` in `/api/routes`: container name -> state.
fn backend_states(p: &Portless, route: &str) -> std::collections::BTreeMap<String, String> {
    let body = http_get(p.admin, "/api/routes").unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["route"] == route)
        .flat_map(|r| r["backends"].as_array().cloned().unwrap_or_default())
        .map(|b| {
            (
                b["container"].as_str().unwrap_or("").to_owned(),
                b["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// The value of the metrics line that starts with `prefix`.
fn metric(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn a_container_stopped_with_its_own_stop_signal_drains_as_the_api_and_metrics_show() {
    let cleanup = Cleanup::new();
    let (net, _) = network(&cleanup, &[]);
    let (p, router) = portless_router(&[]);
    let h = label("portless.http.host", "drain.test");
    let (a, b) = (unique("da"), unique("db"));
    // `docker stop` sends `a` SIGUSR1, which busybox httpd as PID 1
    // ignores: `a` keeps running, and answering, until the stop times out.
    web(
        &cleanup,
        &a,
        "a",
        &[],
        &["--network", &net, "--label", &h, "--stop-signal", "SIGUSR1"],
    );
    web(&cleanup, &b, "b", &[], &["--network", &net, "--label", &h]);
    wait_until("a and b to both serve", WAIT, || {
        let seen: std::collections::BTreeSet<_> =
            (0..10).map(|_| get(router, "drain.test", "/").1).collect();
        (seen.len() == 2).then_some(())
    });
    let states = backend_states(&p, "drain.test/");
    assert_eq!(
        states,
        [(a.clone(), "healthy".into()), (b.clone(), "healthy".into())].into(),
    );
    let a2 = a.clone();
    let stopper = std::thread::spawn(move || run("docker", &["stop", "-t", "60", &a2]));
    wait_until("a to show as draining", WAIT, || {
        (backend_states(&p, "drain.test/")
            .get(&a)
            .map(String::as_str)
            == Some("draining"))
        .then_some(())
    });
    assert_eq!(docker(&["inspect", "-f", "{{.State.Running}}", &a]), "true");
    assert_eq!(
        get(
            SocketAddr::new(container_ip(&a, &net), 8080),
            "drain.test",
            "/"
        )
        .1,
        "a"
    );
    // Still running and still answering, but given no new request.
    for _ in 0..20 {
        assert_eq!(get(router, "drain.test", "/"), (200, "b".into()));
    }
    // `portless status` shows it too: one row per backend, with its state.
    let out = ok(
        env!("CARGO_BIN_EXE_portless"),
        &["status", "--admin", &p.admin.to_string()],
    );
    let row = |name: &str| {
        out.lines()
            .find(|l| l.split_whitespace().nth(2) == Some(name))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
    };
    let (ra, rb) = (row(&a).expect(&out), row(&b).expect(&out));
    assert_eq!(
        (ra[0], ra[1], ra[5]),
        ("drain.test", "/", "draining"),
        "{out}"
    );
    assert_eq!(
        (rb[0], rb[1], rb[5]),
        ("drain.test", "/", "healthy"),
        "{out}"
    );
    assert!(ra[3].ends_with(":8080"), "{out}");
    // The router's metrics, through the admin API of the binary.
    let m = p.metrics();
    let ok = metric(
        &m,
        "portless_router_requests_total{route=\"drain.test/\",class=\"2xx\"} ",
    );
    assert!(ok.is_some_and(|n| n >= 30.0), "{m}");
    let timed = metric(
        &m,
        "portless_router_request_duration_seconds_count{route=\"drain.test/\"} ",
    );
    assert!(timed >= ok, "{m}");
    assert!(
        metric(&m, "portless_router_open_connections{listener=\"http\"} ").is_some(),
        "{m}"
    );
    // SIGKILL ends the stop; `a` leaves the table.
    docker(&["kill", &a]);
    stopper.join().unwrap();
    wait_until("a to leave the route", WAIT, || {
        (backend_states(&p, "drain.test/").keys().collect::<Vec<_>>() == [&b]).then_some(())
    });
}

#[test]
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
fn ingress_zone_names_resolve_through_portless_to_the_router() {
    let cleanup = Cleanup::new();
    let (net, _) = network(&cleanup, &[]);
    let (_p, http, dns) = portless_router_dns(&["--ingress-zone", "apps.test=127.0.0.1"]);
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

/// The project's own test backend (`router/examples/test_backend.rs`:
/// WebSocket echo, gRPC-style trailers over h2c, streaming) in a locally
/// imported image: the binary and the libraries it links, nothing else.
fn test_backend_image() -> &'static str {
    static IMAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        require("docker");
        // target/<profile>/deps/<this test> -> target/
        let exe = std::env::current_exe().unwrap();
        let target = exe.parent().and_then(|d| d.parent()).and_then(|d| d.parent()).unwrap().to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "-q", "-p", "portless-router", "--example", "test_backend", "--target-dir"])
            .arg(&target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("cargo runs");
        assert!(out.status.success(), "building test_backend: {}", String::from_utf8_lossy(&out.stderr));
        let bin = target.join("debug/examples/test_backend");
        let meta = std::fs::metadata(&bin).unwrap();
        let stamp = meta.modified().unwrap().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let image = format!("portless-test-backend:{}-{stamp}", meta.len());
        if run("docker", &["image", "inspect", &image]).status.success() {
            return image;
        }
        let script = format!(
            "set -e; d=$(mktemp -d); trap 'rm -rf $d' EXIT; mkdir -p $d/bin; cp {bin} $d/bin/test_backend; \
             for lib in $(ldd {bin} | grep -o '/[^ ]*'); do mkdir -p $d$(dirname $lib); cp -L $lib $d$lib; done; \
             tar -C $d -c . | docker import -c 'ENTRYPOINT [\"/bin/test_backend\"]' -c 'EXPOSE 8080' - {image}",
            bin = bin.display()
        );
        ok("sh", &["-c", &script]);
        // Earlier builds' images are ours and stale: remove them (one still
        // used by a concurrent test run stays, and goes next time).
        let tags = docker(&["images", "portless-test-backend", "--format", "{{.Repository}}:{{.Tag}}"]);
        for old in tags.lines().filter(|t| *t != image) {
            let _ = run("docker", &["rmi", old]);
        }
        image
    })
}

/// `docker run -d` the test backend answering as `name` (removed on drop).
fn test_backend(cleanup: &Cleanup, name: &str, args: &[&str]) -> String {
    let image = test_backend_image();
    let mut a = vec!["run", "-d", "--label", LABEL, "--name", name];
    a.extend_from_slice(args);
    a.push(image);
    a.push(name);
    cleanup.push(&["docker", "rm", "-f", name]);
    docker(&a)
}

#[test]
fn websocket_echoes_through_the_router_and_survives_route_changes() {
    use std::io::{Read, Write};
    let cleanup = Cleanup::new();
    let (net, _) = network(&cleanup, &[]);
    let (_p, router) = portless_router(&[]);
    let h = label("portless.http.host", "ws.test");
    let first = unique("wsa");
    test_backend(&cleanup, &first, &["--network", &net, "--label", &h]);
    wait_until("ws.test to route", WAIT, || {
        (get(router, "ws.test", "/").0 == 200).then_some(())
    });
    let mut s = std::net::TcpStream::connect(router).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let mut echo = |msg: &[u8]| {
        s.write_all(msg).unwrap();
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(echo(b"one"), format!("{first}:one"));
    // The table changes under it: a second replica joins its route, then
    // another route is added. The open tunnel stays with its backend.
    let second = unique("wsb");
    test_backend(&cleanup, &second, &["--network", &net, "--label", &h]);
    wait_until("the second replica to serve", WAIT, || {
        get(router, "ws.test", "/")
            .1
            .contains(&format!("backend={second}"))
            .then_some(())
    });
    assert_eq!(echo(b"two"), format!("{first}:two"));
    // A streamed answer (150 chunks over 15 s), under way (its first chunk
    // in) while the table changes again: it arrives whole.
    let mut st = std::net::TcpStream::connect(router).unwrap();
    st.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        st,
        "GET /stream?chunks=150 HTTP/1.1\r\nHost: ws.test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut streamed = Vec::new();
    let mut sbuf = [0u8; 4096];
    while !String::from_utf8_lossy(&streamed).contains("chunk 0\n") {
        let n = st.read(&mut sbuf).unwrap();
        assert!(
            n > 0,
            "the stream ended early: {}",
            String::from_utf8_lossy(&streamed)
        );
        streamed.extend_from_slice(&sbuf[..n]);
    }
    let stream = std::thread::spawn(move || {
        st.read_to_end(&mut streamed).unwrap();
        String::from_utf8_lossy(&streamed).into_owned()
    });
    let other = label("portless.http.host", "elsewhere.test");
    let third = unique("wsc");
    test_backend(&cleanup, &third, &["--network", &net, "--label", &other]);
    wait_until("elsewhere.test to route", WAIT, || {
        (get(router, "elsewhere.test", "/").0 == 200).then_some(())
    });
    assert_eq!(echo(b"three"), format!("{first}:three"));
    assert!(
        !stream.is_finished(),
        "the table changed only after the stream"
    );
    let streamed = stream.join().unwrap();
    assert!(streamed.starts_with("HTTP/1.1 200"), "{streamed}");
    // Chunked on the wire: every chunk of text, in order, and the end.
    let mut at = 0;
    for i in 0..150 {
        let want = format!("chunk {i}\n");
        at += streamed[at..]
            .find(&want)
            .unwrap_or_else(|| panic!("no {want:?}: {streamed}"));
    }
    assert!(streamed.ends_with("0\r\n\r\n"), "{streamed}");
    assert_eq!(echo(b"four"), format!("{first}:four"));
}

#[test]
fn h2c_backend_gets_grpc_style_requests_with_trailers_intact() {
    let cleanup = Cleanup::new();
    let (net, _) = network(&cleanup, &[]);
    let (_p, router) = portless_router(&[]);
    let (h, sch) = (
        label("portless.http.host", "grpc.test"),
        label("portless.http.scheme", "h2c"),
    );
    let c = unique("grpc");
    test_backend(
        &cleanup,
        &c,
        &["--network", &net, "--label", &h, "--label", &sch],
    );
    wait_until("grpc.test to route", WAIT, || {
        (get(router, "grpc.test", "/").0 == 200).then_some(())
    });
    // The backend saw HTTP/2 with the client's host as :authority.
    let (_, body) = get(router, "grpc.test", "/echo");
    assert!(body.contains("version=HTTP/2.0"), "{body}");
    assert!(
        body.contains(&format!("uri=http://grpc.test:{}/echo", router.port())),
        "{body}"
    );
    // An HTTP/2 client (curl, prior knowledge) gets the trailers.
    let out = Command::new("curl")
        .args([
            "-sv",
            "--http2-prior-knowledge",
            "-H",
            "te: trailers",
            "-H",
            "content-type: application/grpc",
            "--resolve",
        ])
        .arg(format!("grpc.test:{}:127.0.0.1", router.port()))
        .arg(format!("http://grpc.test:{}/trailers", router.port()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("grpc-status: 0"), "{err}");
    assert!(err.contains(&format!("grpc-message: {c}")), "{err}");
}

#[test]
fn https_with_a_cert_dir_sni_and_redirect() {
    let cleanup = Cleanup::new();
    let (net, _) = network(&cleanup, &[]);
    let certs = std::env::temp_dir().join(unique("plcerts"));
    std::fs::create_dir_all(&certs).unwrap();
    cleanup.push(&["rm", "-rf", certs.to_str().unwrap()]);
    // A CA and a wildcard certificate, made with openssl.
    let sh = format!(
        "set -e; cd {d}; \
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt.txt -days 2 -subj /CN=test-ca 2>/dev/null; \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout wild.key -out wild.csr -subj /CN=wild 2>/dev/null; \
         printf 'subjectAltName=DNS:*.tls.test\\n' > ext; \
         openssl x509 -req -in wild.csr -CA ca.crt.txt -CAkey ca.key -CAcreateserial -days 2 -out wild.pem -extfile ext 2>/dev/null; \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout exact.key -out exact.csr -subj /CN=exact 2>/dev/null; \
         printf 'subjectAltName=DNS:shop.tls.test\\n' > ext; \
         openssl x509 -req -in exact.csr -CA ca.crt.txt -CAkey ca.key -CAcreateserial -days 2 -out exact.pem -extfile ext 2>/dev/null",
        d = certs.display()
    );
    ok("sh", &["-c", &sh]);
    let certs_s = certs.to_str().unwrap().to_owned();
    // Port 0: the kernel picks one, and the redirect must name that one.
    let (p, router) = portless_router(&[
        "--cert-dir",
        &certs_s,
        "--https-listen",
        "127.0.0.1:0",
        "--redirect-https",
    ]);
    let routes: serde_json::Value =
        serde_json::from_str(&http_get(p.admin, "/api/routes").unwrap()).unwrap();
    let https: SocketAddr = routes["https_listen"].as_str().unwrap().parse().unwrap();
    assert_ne!(https.port(), 0);
    let c = unique("tls");
    let h = label("portless.http.host", "shop.tls.test,other.tls.test");
    test_backend(&cleanup, &c, &["--network", &net, "--label", &h]);
    let url = format!("https://shop.tls.test:{}/", https.port());
    let ca = certs.join("ca.crt.txt");
    wait_until("https to serve", WAIT, || {
        let out = Command::new("curl")
            .args(["-s", "--cacert", ca.to_str().unwrap(), "--resolve"])
            .arg(format!("shop.tls.test:{}:127.0.0.1", https.port()))
            .arg(&url)
            .output()
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        (body.contains(&format!("backend={c}")) && body.contains("x-forwarded-proto: https"))
            .then_some(())
    });
    // Plain HTTP for a routed host: 308 to https on the HTTPS port.
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "--resolve",
        ])
        .arg(format!("shop.tls.test:{}:127.0.0.1", router.port()))
        .arg(format!("http://shop.tls.test:{}/a?b=1", router.port()))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("308 https://shop.tls.test:{}/a?b=1", https.port())
    );
    // SNI: the exact certificate for its name, the wildcard for another
    // name under it; HTTP/2 by ALPN when the client offers it.
    for (name, cn, flag, version) in [
        ("shop.tls.test", "CN=exact", "--http2", "2"),
        ("other.tls.test", "CN=wild", "--http1.1", "1.1"),
    ] {
        let out = Command::new("curl")
            .args([
                "-sv",
                flag,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{http_version}",
            ])
            .args(["--cacert", ca.to_str().unwrap(), "--resolve"])
            .arg(format!("{name}:{}:127.0.0.1", https.port()))
            .arg(format!("https://{name}:{}/", https.port()))
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("200 {version}"),
            "{log}"
        );
        assert!(log.contains(&format!("subject: {cn}")), "{name}: {log}");
    }
}

#[test]
fn forwarded_headers_proxy_protocol_and_hostile_requests_through_the_binary() {
    let cleanup = Cleanup::new();
    let (net, _) = network(&cleanup, &[]);
    let c = unique("fwd");
    let h = label("portless.http.host", "fwd.test");
    test_backend(&cleanup, &c, &["--network", &net, "--label", &h]);
    let curl = |router: SocketAddr, extra: &[&str]| -> (u16, String) {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "5", "-w", "\n%{http_code}", "--resolve"])
            .arg(format!("fwd.test:{}:127.0.0.1", router.port()))
            .args(extra)
            .arg(format!("http://fwd.test:{}/", router.port()))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    };
    let spoof = [
        "-H",
        "X-Forwarded-For: 6.6.6.6",
        "-H",
        "Forwarded: for=6.6.6.6",
    ];

    // Untrusted client: what it claims is replaced; oversized headers get
    // 431, bodies over the limit 413.
    let (_p, router) =
        portless_router(&["--max-header-bytes", "16384", "--max-body-bytes", "1000"]);
    wait_until("fwd.test to route", WAIT, || {
        (curl(router, &[]).0 == 200).then_some(())
    });
    let (_, body) = curl(router, &spoof);
    assert!(body.contains("x-forwarded-for: 127.0.0.1\n"), "{body}");
    assert!(!body.contains("6.6.6.6"), "{body}");
    assert!(
        body.contains(&format!("x-forwarded-host: fwd.test:{}\n", router.port())),
        "{body}"
    );
    let big = format!("X-Big: {}", "a".repeat(20_000));
    assert_eq!(curl(router, &["-H", &big]).0, 431);
    let payload = "x".repeat(2000);
    assert_eq!(curl(router, &["--data-binary", &payload]).0, 413);
    // Both Content-Length and Transfer-Encoding (curl sends both as
    // given): 400, not forwarded.
    let both = [
        "--data-binary",
        "hello",
        "-H",
        "Content-Length: 5",
        "-H",
        "Transfer-Encoding: chunked",
    ];
    assert_eq!(curl(router, &both).0, 400);

    // Behind a PROXY-protocol balancer: every connection needs the header,
    // and the balancer's forwarding headers are kept.
    let (_p2, router2) = portless_router(&["--proxy-protocol"]);
    wait_until("fwd.test to route (PROXY)", WAIT, || {
        (curl(router2, &["--haproxy-protocol"]).0 == 200).then_some(())
    });
    let mut with_proxy = vec!["--haproxy-protocol"];
    with_proxy.extend_from_slice(&spoof);
    let (_, body) = curl(router2, &with_proxy);
    assert!(
        body.contains("x-forwarded-for: 6.6.6.6, 127.0.0.1\n"),
        "{body}"
    );
    assert_eq!(
        curl(router2, &[]).0,
        0,
        "a connection without a PROXY header was served"
    );
    // PROXY v2 (binary, as haproxy and cloud balancers send it): the client
    // address is the header's source.
    {
        use std::io::{Read, Write};
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
        v2.extend_from_slice(&[203, 0, 113, 7, 127, 0, 0, 1]);
        v2.extend_from_slice(&40000u16.to_be_bytes());
        v2.extend_from_slice(&router2.port().to_be_bytes());
        v2.extend_from_slice(
            format!(
                "GET / HTTP/1.1\r\nHost: fwd.test:{}\r\nConnection: close\r\n\r\n",
                router2.port()
            )
            .as_bytes(),
        );
        let mut s = std::net::TcpStream::connect(router2).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&v2).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("x-forwarded-for: 203.0.113.7\n"), "{reply}");
    }

    // A trusted proxy by address.
    let (_p3, router3) = portless_router(&["--trusted-proxy", "127.0.0.0/8"]);
    wait_until("fwd.test to route (trusted)", WAIT, || {
        (curl(router3, &[]).0 == 200).then_some(())
    });
    let (_, body) = curl(router3, &spoof);
    assert!(
        body.contains("forwarded: for=6.6.6.6, for=127.0.0.1;proto=http"),
        "{body}"
    );
}

#[test]
fn the_readme_compose_example_two_apps_on_two_domains_through_the_router() {
    let cleanup = Cleanup::new();
    let image = busybox_image();
    // As in the README: shop (3 replicas, its port by label) and blog (its
    // one exposed port), on two domains, no port published.
    let httpd = |body: &str| {
        format!(
            "[\"sh\", \"-c\", \"mkdir -p /www && echo {body} > /www/index.html && exec httpd -f -p 8080 -h /www\"]"
        )
    };
    let compose = format!(
        "version: '2.4'\nservices:\n  shop:\n    image: {image}\n    command: {shop}\n    scale: 3\n    labels:\n      portless-test: '1'\n      portless.http.host: shop.example.com,www.shop.example.com\n      portless.http.port: '8080'\n  blog:\n    image: {image}\n    command: {blog}\n    expose: ['8080']\n    labels:\n      portless-test: '1'\n      portless.http.host: blog.example.org\nnetworks:\n  default:\n    labels: ['portless-test=1']\n",
        shop = httpd("shop"),
        blog = httpd("blog"),
    );
    let (p, http, dns) = portless_router_dns(&[
        "--ingress-zone",
        "example.com=127.0.0.1",
        "--ingress-zone",
        "example.org=127.0.0.1",
    ]);
    compose_up(&cleanup, "two", &compose);
    // Both names resolve through portless to the router, which reaches the
    // apps; shop's requests spread over its three replicas.
    for (name, body) in [
        ("shop.example.com", "shop"),
        ("www.shop.example.com", "shop"),
        ("blog.example.org", "blog"),
    ] {
        let answer = dig(dns, name, "A", &[]);
        assert_eq!(
            answer.answers,
            vec!["127.0.0.1".to_owned()],
            "{}",
            answer.raw
        );
        wait_body(http, name, "/", body);
    }
    wait_until("three shop backends", WAIT, || {
        let states = backend_states(&p, "shop.example.com/");
        (states.len() == 3 && states.values().all(|s| s == "healthy")).then_some(())
    });
    let mut replicas = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let (code, _) = get(http, "shop.example.com", "/");
        assert_eq!(code, 200);
    }
    let v: serde_json::Value =
        serde_json::from_str(&http_get(p.admin, "/api/routes").unwrap()).unwrap();
    for r in v["routes"].as_array().unwrap() {
        if r["route"] == "shop.example.com/" {
            for b in r["backends"].as_array().unwrap() {
                if b["requests"].as_u64().unwrap_or(0) > 0 {
                    replicas.insert(b["container"].as_str().unwrap().to_owned());
                }
            }
        }
    }
    assert_eq!(replicas.len(), 3, "{v:#}");
}

#[test]
fn the_access_log_flag_writes_json_lines_and_sighup_reopens_the_file() {
    let cleanup = Cleanup::new();
    let (net, _) = network(&cleanup, &[]);
    let c = unique("alog");
    let h = label("portless.http.host", "alog.test");
    test_backend(&cleanup, &c, &["--network", &net, "--label", &h]);
    let dir = std::env::temp_dir().join(unique("portless-access-log-"));
    std::fs::create_dir_all(&dir).unwrap();
    cleanup.push(&["rm", "-rf", dir.to_str().unwrap()]);
    let path = dir.join("access.log");
    let (p, router) = portless_router(&["--access-log", path.to_str().unwrap()]);
    let lines = |path: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    wait_until("alog.test to route, logged", WAIT, || {
        (get(router, "alog.test", "/first").0 == 200).then_some(())?;
        lines(&path)
            .iter()
            .any(|l| l["path"] == "/first" && l["status"] == 200)
            .then_some(())
    });
    let l = lines(&path)
        .into_iter()
        .find(|l| l["path"] == "/first")
        .unwrap();
    assert_eq!(l["host"], format!("alog.test:{}", router.port()), "{l}");
    assert_eq!(l["route"], "alog.test/", "{l}");
    assert!(l["backend"].as_str().unwrap().ends_with(":8080"), "{l}");

    // logrotate's way: move the file, then SIGHUP. portless lives on (no
    // handler would let SIGHUP kill it) and writes to a new file.
    let rotated = dir.join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    ok("kill", &["-HUP", &p.pid().to_string()]);
    wait_until("the SIGHUP to be taken", WAIT, || {
        p.logs().contains("reopening the access log").then_some(())
    });
    wait_until("a line in the new file", WAIT, || {
        (get(router, "alog.test", "/second").0 == 200).then_some(())?;
        lines(&path)
            .iter()
            .any(|l| l["path"] == "/second")
            .then_some(())
    });
    assert!(lines(&rotated).iter().all(|l| l["path"] != "/second"));
    assert!(
        p.metrics()
            .contains("portless_router_access_log_dropped_total 0")
    );
}
