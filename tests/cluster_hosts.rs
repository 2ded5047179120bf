//! One namespace across hosts, on two real Docker Engines (each in its own
//! network namespace, with its own socket, data root and bridge), a real
//! etcd, and a real `portless run` per engine in cluster mode.
//!
//! The engines take seconds to start, so they are started once for the
//! whole file and the scenarios run one after another on them (a custom
//! harness, `libtest-mimic`, reports each by name). Each scenario removes
//! the containers it made; the harness takes everything down at the end,
//! even when a scenario fails. Traffic stays inside the namespaces.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::engines::{Engines, Sidecar, nslookup_addrs};
use libtest_mimic::{Arguments, Failed, Trial};

/// The lease TTL every sidecar starts with.
const TTL: Duration = Duration::from_secs(2);

struct World {
    e: Engines,
    sidecars: Mutex<BTreeMap<char, Sidecar>>,
    /// A long-lived client container on A's cluster network.
    client: Mutex<Option<String>>,
}

/// Removes containers (on either engine) when a scenario ends.
struct Containers<'w> {
    e: &'w Engines,
    made: Vec<(char, String)>,
}

impl<'w> Containers<'w> {
    fn new(e: &'w Engines) -> Self {
        Containers {
            e,
            made: Vec::new(),
        }
    }

    /// `docker run -d` on `h` on the cluster network; returns its address
    /// there. `args` go before the image; the container serves its own name
    /// over HTTP on port 80.
    fn web(&mut self, h: char, name: &str, args: &[&str]) -> String {
        let mut all = vec!["run", "-d", "--name", name, "--network", "portless"];
        all.extend_from_slice(args);
        let image = self.e.image();
        let script = format!("echo {name} > /var/www/index.html; exec httpd -f -p 80 -h /var/www");
        all.extend_from_slice(&[&image, "sh", "-c", &script]);
        self.e.docker_ok(h, &all);
        self.made.push((h, name.to_owned()));
        self.ip(h, name)
    }

    fn ip(&self, h: char, name: &str) -> String {
        self.e.docker_ok(
            h,
            &[
                "inspect",
                "-f",
                "{{.NetworkSettings.Networks.portless.IPAddress}}",
                name,
            ],
        )
    }
}

impl Drop for Containers<'_> {
    fn drop(&mut self) {
        for (h, name) in &self.made {
            let _ = self.e.docker(*h, &["rm", "-f", name]);
        }
    }
}

impl World {
    fn sidecar<R>(&self, h: char, f: impl FnOnce(&mut Sidecar) -> R) -> R {
        let mut s = self.sidecars.lock().unwrap_or_else(|e| e.into_inner());
        f(s.get_mut(&h).expect("sidecar"))
    }

    fn status(&self, h: char) -> serde_json::Value {
        self.sidecar(h, |s| s.status())
    }

    /// The gateway of `h`'s cluster network.
    fn gateway(&self, h: char) -> String {
        self.status(h)["cluster"]["host"]["gateway"]
            .as_str()
            .expect("gateway")
            .to_owned()
    }

    fn restart(&self, h: char, extra: &[&str]) {
        let mut s = self.sidecars.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut old) = s.remove(&h) {
            old.stop();
        }
        s.insert(h, Sidecar::start(&self.e, h, extra));
    }

    /// A client container on A's cluster network (made once).
    fn client(&self) -> String {
        let mut c = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(name) = &*c {
            return name.clone();
        }
        let name = format!("{}-client", self.e.pfx);
        let gw = self.gateway('A');
        self.e.docker_ok(
            'A',
            &[
                "run",
                "-d",
                "--name",
                &name,
                "--network",
                "portless",
                "--dns",
                &gw,
                &self.e.image(),
                "sleep",
                "100000",
            ],
        );
        *c = Some(name.clone());
        name
    }

    fn drop_client(&self) {
        if let Some(name) = self.client.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = self.e.docker('A', &["rm", "-f", &name]);
        }
    }

    /// What a container on A resolves `name` to (through Docker's own
    /// 127.0.0.11, which forwards to portless what it does not know).
    fn lookup(&self, name: &str) -> Vec<String> {
        let out = self
            .e
            .docker('A', &["exec", &self.client(), "nslookup", name]);
        nslookup_addrs(&String::from_utf8_lossy(&out.stdout))
    }

    /// The same, asking portless on A's gateway directly (Docker's
    /// 127.0.0.11 answers names of its own network itself and forwards
    /// only the rest).
    fn lookup_direct(&self, name: &str) -> Vec<String> {
        let gw = self.gateway('A');
        let out = self
            .e
            .docker('A', &["exec", &self.client(), "nslookup", name, &gw]);
        nslookup_addrs(&String::from_utf8_lossy(&out.stdout))
    }

    /// Wait until `f` holds for what A's client resolves `name` to.
    fn wait_lookup(&self, name: &str, secs: u64, f: impl Fn(&[String]) -> bool) -> Vec<String> {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.lookup(name);
            if f(&got) || Instant::now() > end {
                return got;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An HTTP GET through host `h`'s router; the body, or None.
    fn get(&self, h: char, host: &str) -> Option<String> {
        let out = self.e.in_ns(
            h,
            &[
                "curl",
                "-s",
                "-f",
                "-m",
                "3",
                "-H",
                &format!("Host: {host}"),
                "http://127.0.0.1/",
            ],
        );
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Names of the remote containers host `h` has merged.
    fn remote_names(&self, h: char) -> Vec<String> {
        let st = self.status(h);
        let mut names = Vec::new();
        for host in st["status"]["catalog"]["remote"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
        {
            for c in host["containers"].as_array().into_iter().flatten() {
                names.push(c["name"].as_str().unwrap_or_default().to_owned());
            }
        }
        names
    }
}

fn check(cond: bool, msg: impl Into<String>) -> Result<(), Failed> {
    if cond { Ok(()) } else { Err(msg.into().into()) }
}

fn names_cross_hosts(w: &World) -> Result<(), Failed> {
    let mut c = Containers::new(&w.e);
    let db = c.web(
        'B',
        "db",
        &[
            "--network-alias",
            "database",
            "--label",
            "com.docker.compose.project=shop",
            "--label",
            "com.docker.compose.service=pg",
        ],
    );
    let dup_a = c.web('A', "dup", &[]);
    let dup_b = c.web('B', "dup", &[]);
    // On a host-local network of B: never published.
    let net = format!("{}-private", w.e.pfx);
    w.e.docker_ok('B', &["network", "create", &net]);
    let _net = NetGuard(&w.e, 'B', net.clone());
    w.e.docker_ok(
        'B',
        &[
            "run",
            "-d",
            "--name",
            "hidden",
            "--network",
            &net,
            &w.e.image(),
            "sleep",
            "10000",
        ],
    );
    c.made.push(('B', "hidden".into()));

    let got = w.wait_lookup("db", 10, |a| a == [db.clone()]);
    check(
        got == [db.clone()],
        format!("db from A: {got:?}, want {db}"),
    )?;
    for name in [
        "database",
        "pg",
        "pg.shop",
        "db.portless",
        "db.docker.internal",
    ] {
        let got = w.lookup(name);
        check(
            got == [db.clone()],
            format!("{name} from A: {got:?}, want {db}"),
        )?;
    }
    // A name held on both hosts: portless answers both (Docker's own
    // resolver answers its local one itself, first).
    let mut want = vec![dup_a.clone(), dup_b];
    want.sort();
    let got = w.lookup_direct("dup");
    check(
        got == want,
        format!("dup from A, asking portless: {got:?}, want {want:?}"),
    )?;
    let got = w.lookup("dup");
    check(
        got == [dup_a.clone()],
        format!("dup from A through 127.0.0.11: {got:?}, want Docker's own answer {dup_a}"),
    )?;
    // PTR of the remote address.
    let out = w.e.docker('A', &["exec", &w.client(), "nslookup", &db]);
    let text = String::from_utf8_lossy(&out.stdout);
    check(
        text.contains("db.portless.docker.internal"),
        format!("PTR of {db} from A: {text}"),
    )?;
    // Host-side name on A's host.
    let gw = w.gateway('A');
    let out = w.e.in_ns(
        'A',
        &["dig", "+short", &format!("@{gw}"), "db.docker.internal"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    check(
        text.trim() == db,
        format!("host-side db.docker.internal on A: {text:?}"),
    )?;
    // The container on B's private network stays invisible to A.
    let got = w.lookup("hidden");
    check(got.is_empty(), format!("hidden resolved on A: {got:?}"))?;
    check(
        !w.remote_names('A').contains(&"hidden".to_owned()),
        "hidden merged on A",
    )
}

struct NetGuard<'e>(&'e Engines, char, String);

impl Drop for NetGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.docker(self.1, &["rm", "-f", "hidden"]);
        let _ = self.0.docker(self.1, &["network", "rm", &self.2]);
    }
}

fn route_spans_hosts(w: &World) -> Result<(), Failed> {
    let mut c = Containers::new(&w.e);
    let labels = [
        "--label",
        "portless.http.host=shop.cluster.test",
        "--label",
        "portless.http.port=80",
    ];
    c.web('A', "shop-a", &labels);
    c.web('B', "shop-b", &labels);
    for h in ['A', 'B'] {
        w.sidecar(h, |s| {
            s.wait_for("both shop replicas routed", 10, |st| {
                st["routes"]["routes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|r| r["host"] == "shop.cluster.test")
                    .flat_map(|r| r["backends"].as_array().cloned().unwrap_or_default())
                    .count()
                    == 2
            })
        });
        let mut seen = BTreeMap::new();
        for _ in 0..8 {
            let body = w.get(h, "shop.cluster.test");
            *seen
                .entry(body.unwrap_or_else(|| "FAILED".into()))
                .or_insert(0) += 1;
        }
        check(
            seen.get("shop-a") == Some(&4) && seen.get("shop-b") == Some(&4),
            format!("8 requests through {h}'s router: {seen:?}"),
        )?;
    }
    Ok(())
}

fn draining_crosses_hosts(w: &World) -> Result<(), Failed> {
    let mut c = Containers::new(&w.e);
    let labels = [
        "--label",
        "portless.http.host=drain.cluster.test",
        "--label",
        "portless.http.port=80",
    ];
    c.web('A', "drain-a", &labels);
    // httpd as PID 1 ignores SIGUSR1: `docker stop` then waits 4 s before
    // SIGKILL, and the replica must get no new request from that moment.
    let mut b_args = labels.to_vec();
    b_args.extend_from_slice(&["--stop-signal", "SIGUSR1", "--stop-timeout", "4"]);
    c.web('B', "drain-b", &b_args);
    w.sidecar('A', |s| {
        s.wait_for("both drain replicas routed", 10, |st| {
            st["routes"]["routes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r["host"] == "drain.cluster.test")
                .flat_map(|r| r["backends"].as_array().cloned().unwrap_or_default())
                .count()
                == 2
        })
    });
    // Load on A's router for 9 s, one request after another.
    let load = Command::new("ip")
        .args(["netns", "exec", &w.e.ns('A'), "bash", "-c"])
        .arg(
            r#"end=$((SECONDS+9)); ok=0; bad=0; a=0; b=0
               while ((SECONDS < end)); do
                 body=$(curl -s -f -m 5 -H 'Host: drain.cluster.test' http://127.0.0.1/) \
                   && { ok=$((ok+1)); [[ $body == drain-b ]] && b=$((b+1)) || a=$((a+1)); } \
                   || bad=$((bad+1))
               done
               echo "$ok $bad $a $b""#,
        )
        .stdout(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    let stopped = Instant::now();
    w.e.docker_ok('B', &["stop", "drain-b"]);
    // Draining shows on A while the replica still runs on B.
    let out = load.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let n: Vec<u64> = text
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    check(n.len() == 4, format!("load output: {text:?}"))?;
    let (ok, bad, _a, b) = (n[0], n[1], n[2], n[3]);
    check(
        bad == 0,
        format!(
            "{bad} failed requests of {} while drain-b stopped",
            ok + bad
        ),
    )?;
    check(b > 0, "drain-b got no request before it was stopped")?;
    check(
        stopped.elapsed() >= Duration::from_secs(3),
        "docker stop returned before its timeout: the replica was not draining long",
    )?;
    Ok(())
}

/// `/metrics` of a portless running every part (DNS, router, cluster) is
/// valid Prometheus text by `promtool check metrics`, and every metric the
/// Grafana dashboard (docs/grafana-dashboard.json) queries is in it. A
/// route whose path holds `"` and `\` (a label value the text must escape)
/// is among them.
fn metrics_pass_promtool_and_the_dashboard_queries_exist(w: &World) -> Result<(), Failed> {
    use std::io::Write;
    let mut c = Containers::new(&w.e);
    c.web(
        'A',
        "escape-a",
        &[
            "--label",
            "portless.http.host=escape.cluster.test",
            "--label",
            "portless.http.port=80",
            "--label",
            "portless.http.path=/q\"uote\\back",
        ],
    );
    w.sidecar('A', |s| {
        s.wait_for("the escape route", 10, |st| {
            st["routes"]["routes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r["host"] == "escape.cluster.test")
        })
    });
    let out =
        w.e.in_ns('A', &["curl", "-s", "http://127.0.0.1:9053/metrics"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    check(
        text.contains("portless_netplane_peers"),
        "no cluster metrics",
    )?;
    check(
        text.lines().any(|l| {
            l == "portless_router_requests_total{route=\"escape.cluster.test/q\\\"uote\\\\back\",class=\"2xx\"} 0"
        }),
        format!("the escape route's label is not escaped:\n{text}"),
    )?;
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("promtool (Debian's prometheus package; ./test.sh installs it): {e}")
        })?;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let res = promtool.wait_with_output().unwrap();
    check(
        res.status.success(),
        format!(
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr)
        ),
    )?;
    let dash = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/grafana-dashboard.json"
    ))
    .unwrap();
    let declared: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut queried = std::collections::BTreeSet::new();
    for (i, _) in dash.match_indices("portless_") {
        let name: String = dash[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_owned();
        queried.insert(base);
    }
    check(
        queried.len() >= 15,
        format!("only {} metrics queried", queried.len()),
    )?;
    let missing: Vec<&String> = queried
        .iter()
        .filter(|q| !declared.contains(q.as_str()))
        .collect();
    check(
        missing.is_empty(),
        format!("the dashboard queries metrics /metrics does not have: {missing:?}"),
    )
}

fn forged_records_are_refused(w: &World) -> Result<(), Failed> {
    let b = w.e.addr('B').to_string();
    let out =
        w.e.etcdctl(&["get", &format!("/portless/v1/hosts/{b}"), "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let lease = v["kvs"][0]["lease"]
        .as_i64()
        .ok_or("no lease on B's host key")?;
    let b_subnet = w.status('B')["cluster"]["host"]["subnet"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let a_gw: std::net::Ipv4Addr = w.gateway('A').parse()?;
    // Under B's key and lease, but with an address in A's subnet.
    let outside = std::net::Ipv4Addr::from(u32::from(a_gw) + 100);
    let id1 = format!("{:064x}", 0xf0f1u32);
    let id2 = format!("{:064x}", 0xf0f2u32);
    let rec = |id: &str, name: &str, addr: &str| {
        serde_json::json!({"host": b, "id": id, "name": name, "addr": addr}).to_string()
    };
    let key1 = format!("/portless/v1/containers/{b}/{id1}");
    let key2 = format!("/portless/v1/containers/{b}/{id2}");
    let inside = b_subnet.replace(".0/24", ".200");
    let put1 = w.e.etcdctl(&[
        "put",
        &format!("--lease={lease:x}"),
        &key1,
        &rec(&id1, "forged-outside", &outside.to_string()),
    ]);
    check(put1.status.success(), "etcdctl put")?;
    // Inside B's subnet but not on B's lease: not written by B.
    let put2 =
        w.e.etcdctl(&["put", &key2, &rec(&id2, "forged-nolease", &inside)]);
    check(put2.status.success(), "etcdctl put")?;
    let cleanup = || {
        let _ = w.e.etcdctl(&["del", &key1]);
        let _ = w.e.etcdctl(&["del", &key2]);
    };
    let result = (|| {
        w.sidecar('A', |s| {
            s.wait_for("both forged records refused", 10, |st| {
                let t = &st["cluster"]["records"]["refused_total"];
                t["address-outside-subnet"].as_u64() >= Some(1)
                    && t["not-the-hosts"].as_u64() >= Some(1)
            })
        });
        // B owns its prefix: it deletes records there it did not write.
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let left =
                w.e.etcdctl(&["get", "--prefix", "--keys-only", &key1[..key1.len() - 64]]);
            let text = String::from_utf8_lossy(&left.stdout).to_string();
            if !text.contains(&id1) && !text.contains(&id2) {
                break;
            }
            check(
                Instant::now() < end,
                format!("B left forged records: {text}"),
            )?;
            std::thread::sleep(Duration::from_millis(100));
        }
        for name in ["forged-outside", "forged-nolease"] {
            check(w.lookup(name).is_empty(), format!("{name} answered on A"))?;
        }
        let metrics =
            w.e.in_ns('A', &["curl", "-s", "http://127.0.0.1:9053/metrics"]);
        let text = String::from_utf8_lossy(&metrics.stdout);
        check(
            text.lines().any(|l| {
                l.starts_with(
                    "portless_cluster_records_refused_total{reason=\"address-outside-subnet\"}",
                ) && !l.ends_with(" 0")
            }),
            "refusal not counted in /metrics",
        )
    })();
    cleanup();
    result
}

fn network_is_made_again(w: &World) -> Result<(), Failed> {
    let before = w.status('B')["cluster"]["docker_network"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    w.e.docker_ok('B', &["network", "rm", "portless"]);
    let start = Instant::now();
    w.sidecar('B', |s| {
        s.wait_for("the network made again", 10, |st| {
            let n = &st["cluster"]["docker_network"];
            n["ready"].as_bool() == Some(true) && n["id"].as_str() != Some(before.as_str())
        })
    });
    let took = start.elapsed();
    let id =
        w.e.docker_ok('B', &["network", "inspect", "-f", "{{.Id}}", "portless"]);
    check(id != before, "the network was not made again")?;
    // And it works across hosts: a container on it answers A's client.
    let mut c = Containers::new(&w.e);
    let ip = c.web('B', "again", &[]);
    let out = w.e.docker(
        'A',
        &["exec", &w.client(), "ping", "-c", "1", "-W", "3", &ip],
    );
    check(
        out.status.success(),
        format!("ping {ip} after the network was made again"),
    )?;
    let text = w.sidecar('B', |s| s.status_text());
    check(
        text.contains("Docker network portless: ready"),
        format!("status text: {text}"),
    )?;
    eprintln!("network made again in {took:?}");
    Ok(())
}

fn data_path(w: &World, mode: &str) -> Result<(), Failed> {
    let mut c = Containers::new(&w.e);
    let ip = c.web('B', &format!("target-{mode}"), &[]);
    let mtu = w.status('A')["cluster"]["host"]["mtu"]
        .as_u64()
        .unwrap_or(0);
    check(mtu >= 1280, format!("mtu {mtu}"))?;
    let client = w.client();
    let exec = |args: &[&str]| {
        let mut all = vec!["exec", client.as_str()];
        all.extend_from_slice(args);
        w.e.docker('A', &all)
    };
    let ping = exec(&["ping", "-c", "2", "-W", "3", &ip]);
    check(ping.status.success(), format!("{mode}: ping {ip}"))?;
    let tcp = exec(&[
        "sh",
        "-c",
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} 80"),
    ]);
    let body = String::from_utf8_lossy(&tcp.stdout);
    check(
        body.contains(&format!("target-{mode}")),
        format!("{mode}: HTTP over TCP to {ip}: {body:?}"),
    )?;
    // A full-size packet that may not be fragmented.
    let size = (mtu - 28).to_string();
    let full = exec(&["iping", "-M", "do", "-s", &size, "-c", "1", "-W", "3", &ip]);
    check(
        full.status.success(),
        format!(
            "{mode}: unfragmented ping of {mtu} bytes: {}{}",
            String::from_utf8_lossy(&full.stdout),
            String::from_utf8_lossy(&full.stderr)
        ),
    )?;
    let over = exec(&[
        "iping",
        "-M",
        "do",
        "-s",
        &(mtu - 27).to_string(),
        "-c",
        "1",
        "-W",
        "2",
        &ip,
    ]);
    check(
        !over.status.success(),
        format!("{mode}: a packet over the MTU passed"),
    )
}

fn data_path_vxlan(w: &World) -> Result<(), Failed> {
    data_path(w, "vxlan")
}

fn a_dead_hosts_names_and_backends_vanish(w: &World) -> Result<(), Failed> {
    let mut c = Containers::new(&w.e);
    let labels = [
        "--label",
        "portless.http.host=victim.cluster.test",
        "--label",
        "portless.http.port=80",
    ];
    let ip = c.web('B', "victim", &labels);
    let got = w.wait_lookup("victim", 10, |a| a == [ip.clone()]);
    check(got == [ip.clone()], format!("victim before: {got:?}"))?;
    check(
        w.get('A', "victim.cluster.test").as_deref() == Some("victim"),
        "victim not routed through A before the kill",
    )?;
    w.sidecar('B', |s| s.kill9());
    let killed = Instant::now();
    let mut gone_after = None;
    while killed.elapsed() < Duration::from_secs(10) {
        if !w.remote_names('A').contains(&"victim".to_owned()) {
            gone_after = Some(killed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = gone_after.ok_or("B's records still on A 10 s after its portless died")?;
    eprintln!("B's records gone from A {took:?} after kill -9 (TTL {TTL:?})");
    check(
        took <= TTL + Duration::from_secs(1),
        format!("B's records vanished {took:?} after kill -9, more than TTL + 1 s"),
    )?;
    let got = w.lookup("victim");
    check(
        got.is_empty(),
        format!("victim still resolves on A: {got:?}"),
    )?;
    check(
        w.get('A', "victim.cluster.test").is_none(),
        "victim still routed through A",
    )?;
    // B comes back: its running containers are published again.
    w.restart('B', &[]);
    let got = w.wait_lookup("victim", 10, |a| a == [ip.clone()]);
    check(
        got == [ip.clone()],
        format!("victim after B's return: {got:?}"),
    )
}

fn a_restart_writes_only_what_changed(w: &World) -> Result<(), Failed> {
    let mut c = Containers::new(&w.e);
    // A long lease, so that the restart below happens while it lives.
    w.restart('B', &["--lease-ttl", "15"]);
    c.web('B', "keep-1", &[]);
    c.web('B', "keep-2", &[]);
    c.web('B', "goes", &[]);
    w.sidecar('B', |s| {
        s.wait_for("three records published", 10, |st| {
            st["cluster"]["records"]["published"].as_u64() >= Some(3)
        })
    });
    let published = w.status('B')["cluster"]["records"]["published"]
        .as_u64()
        .unwrap_or(0);
    w.sidecar('B', |s| s.stop());
    // While B's portless is away: one container goes, one comes.
    w.e.docker_ok('B', &["rm", "-f", "goes"]);
    let new_ip = c.web('B', "comes", &[]);
    w.restart('B', &["--lease-ttl", "15"]);
    w.sidecar('B', |s| {
        s.wait_for("the change published", 10, |st| {
            st["cluster"]["records"]["pending"].as_u64() == Some(0)
                && st["cluster"]["records"]["writes"].as_u64() >= Some(2)
        })
    });
    let st = w.status('B');
    let writes = st["cluster"]["records"]["writes"].as_u64().unwrap_or(0);
    check(
        writes == 2,
        format!(
            "{writes} writes after the restart (one delete and one put expected; {published} records were published)"
        ),
    )?;
    let got = w.wait_lookup("comes", 10, |a| a == [new_ip.clone()]);
    check(got == [new_ip], format!("comes on A: {got:?}"))?;
    let got = w.wait_lookup("goes", 10, |a| a.is_empty());
    check(got.is_empty(), format!("goes still on A: {got:?}"))?;
    drop(c);
    w.restart('B', &[]);
    Ok(())
}

fn etcd_outage_keeps_names_and_routes(w: &World) -> Result<(), Failed> {
    let mut c = Containers::new(&w.e);
    let labels = [
        "--label",
        "portless.http.host=steady.cluster.test",
        "--label",
        "portless.http.port=80",
    ];
    let on_b = c.web('B', "steady-b", &labels);
    let on_a = c.web('A', "steady-a", &[]);
    let got = w.wait_lookup("steady-b", 10, |a| a == [on_b.clone()]);
    check(got == [on_b.clone()], format!("before: {got:?}"))?;
    w.sidecar('B', |s| {
        s.wait_for("steady-a merged on B", 10, |st| {
            st["status"]["catalog"]["remote"]
                .to_string()
                .contains("steady-a")
        })
    });
    let gw_b = w.gateway('B');
    w.e.etcd_stop();
    let outage = Instant::now();
    let mut late_ip = None;
    let result = (|| {
        for at in [2u64, 10, 20, 29] {
            while outage.elapsed() < Duration::from_secs(at) {
                std::thread::sleep(Duration::from_millis(200));
            }
            let got = w.lookup("steady-b");
            check(
                got == [on_b.clone()],
                format!("A at {at} s of the outage: {got:?}"),
            )?;
            check(
                w.get('A', "steady.cluster.test").as_deref() == Some("steady-b"),
                format!("A's route to B's replica at {at} s of the outage"),
            )?;
            let out = w.e.in_ns(
                'B',
                &[
                    "dig",
                    "+short",
                    &format!("@{gw_b}"),
                    "steady-a.docker.internal",
                ],
            );
            let text = String::from_utf8_lossy(&out.stdout);
            check(
                text.trim() == on_a,
                format!("B at {at} s of the outage resolves steady-a: {text:?}"),
            )?;
            if at == 10 {
                late_ip = Some(c.web('B', "late", &[]));
            }
        }
        Ok::<(), Failed>(())
    })();
    while outage.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    w.e.etcd_start();
    result?;
    let back = Instant::now();
    let late_ip = late_ip.ok_or("late not started")?;
    let mut seen = None;
    while back.elapsed() < Duration::from_secs(15) {
        if w.remote_names('A').contains(&"late".to_owned()) {
            seen = Some(back.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = seen.ok_or("the container started during the outage never reached A")?;
    eprintln!("late reached A {took:?} after etcd's return");
    check(
        took <= Duration::from_secs(1),
        format!("late reached A {took:?} after etcd's return, more than 1 s"),
    )?;
    let got = w.lookup("late");
    check(got == [late_ip], format!("late on A: {got:?}"))?;
    w.sidecar('A', |s| {
        s.wait_for("etcd connected again", 10, |st| {
            st["cluster"]["etcd_connected"].as_bool() == Some(true)
        })
    });
    Ok(())
}

fn a_restart_with_etcd_down_shows_the_last_known_state(w: &World) -> Result<(), Failed> {
    w.e.etcd_stop();
    let result = (|| {
        let mut s = w.sidecars.lock().unwrap_or_else(|e| e.into_inner());
        let mut old = s.remove(&'A').ok_or_else(|| Failed::from("no sidecar A"))?;
        old.stop();
        drop(old);
        // Start without waiting for etcd.
        let side = common::engines::Sidecar::start_unready(&w.e, 'A', &[]);
        side.wait_for("the last known host", 10, |st| {
            st["cluster"]["last_known"].as_bool() == Some(true) && st["cluster"]["host"].is_object()
        });
        let st = side.status();
        let peers = st["cluster"]["peers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let b = w.e.addr('B').to_string();
        check(
            peers
                .iter()
                .any(|p| p["id"] == b.as_str() && p["in_place"].as_bool() == Some(true)),
            format!("peers while etcd is down after a restart: {peers:?}"),
        )?;
        let text = side.status_text();
        check(
            text.contains("previous run") && text.contains(&b),
            format!("status text: {text}"),
        )?;
        s.insert('A', side);
        Ok::<(), Failed>(())
    })();
    w.e.etcd_start();
    result?;
    w.sidecar('A', |s| {
        s.wait_for("a fresh lease after etcd's return", 15, |st| {
            st["cluster"]["last_known"].as_bool() == Some(false)
                && st["cluster"]["etcd_connected"].as_bool() == Some(true)
        })
    });
    Ok(())
}

fn data_path_route_mode(w: &World) -> Result<(), Failed> {
    // The network's MTU changes with the mode: nothing may be attached.
    w.drop_client();
    w.restart('A', &["--netplane-mode", "route"]);
    w.restart('B', &["--netplane-mode", "route"]);
    for h in ['A', 'B'] {
        w.sidecar(h, |s| {
            s.wait_for("route mode with the peer in place", 15, |st| {
                st["cluster"]["peers"].as_array().is_some_and(|p| {
                    p.len() == 1
                        && p[0]["transport"] == "route"
                        && p[0]["in_place"].as_bool() == Some(true)
                })
            })
        });
    }
    data_path(w, "route")
}

fn cleanup_reports_what_it_did(w: &World) -> Result<(), Failed> {
    // B's portless is stopped; a container still on the network keeps the
    // network from being removed, and the rest is removed anyway.
    w.sidecar('B', |s| s.stop());
    let mut c = Containers::new(&w.e);
    c.web('B', "still-there", &[]);
    let bin = env!("CARGO_BIN_EXE_portless");
    let out = w.e.in_ns(
        'B',
        &[bin, "netplane", "cleanup", "--docker-host", &w.e.sock('B')],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    check(
        !out.status.success(),
        "cleanup said success with a network it could not remove",
    )?;
    check(
        text.contains("kernel objects removed:") && err.contains("still attached"),
        format!("cleanup report: {text}\nerror: {err}"),
    )?;
    let links = w.e.in_ns('B', &["ip", "-o", "link"]);
    check(
        !String::from_utf8_lossy(&links.stdout).contains("pl-vx0"),
        "pl-vx0 left behind",
    )
}

fn main() {
    let args = Arguments::from_args();
    if args.list {
        // Listing must not start engines.
        let trials = scenarios(None);
        libtest_mimic::run(&args, trials).exit();
    }
    let e = Engines::up();
    let w = Arc::new(World {
        sidecars: Mutex::new(BTreeMap::new()),
        client: Mutex::new(None),
        e,
    });
    for h in ['A', 'B'] {
        let s = Sidecar::start(&w.e, h, &[]);
        w.sidecars
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(h, s);
    }
    let mut args = args;
    // One world: one scenario at a time, in this order.
    args.test_threads = Some(1);
    let conclusion = libtest_mimic::run(&args, scenarios(Some(w.clone())));
    if conclusion.has_failed() {
        for h in ['A', 'B'] {
            if let Some(s) = w.sidecars.lock().unwrap_or_else(|e| e.into_inner()).get(&h) {
                eprintln!("---- portless on {h}, last lines ----\n{}", s.log_tail());
            }
        }
    }
    w.drop_client();
    w.sidecars.lock().unwrap_or_else(|e| e.into_inner()).clear();
    drop(w);
    conclusion.exit();
}

type Scenario = fn(&World) -> Result<(), Failed>;

fn scenarios(w: Option<Arc<World>>) -> Vec<Trial> {
    let list: [(&str, Scenario); 12] = [
        (
            "a_container_on_a_resolves_containers_on_b_by_every_name",
            names_cross_hosts,
        ),
        (
            "a_route_spreads_over_replicas_on_both_hosts",
            route_spans_hosts,
        ),
        (
            "a_replica_stopped_on_b_drains_on_as_router_with_no_failed_request",
            draining_crosses_hosts,
        ),
        (
            "forged_records_are_refused_counted_and_never_answered",
            forged_records_are_refused,
        ),
        (
            "metrics_pass_promtool_and_the_dashboard_queries_exist",
            metrics_pass_promtool_and_the_dashboard_queries_exist,
        ),
        (
            "a_removed_cluster_network_is_made_again",
            network_is_made_again,
        ),
        (
            "containers_reach_each_other_across_hosts_over_vxlan",
            data_path_vxlan,
        ),
        (
            "a_killed_hosts_names_and_backends_vanish_within_ttl_plus_1s",
            a_dead_hosts_names_and_backends_vanish,
        ),
        (
            "a_restart_within_the_lease_writes_only_what_changed",
            a_restart_writes_only_what_changed,
        ),
        (
            "an_etcd_outage_of_30s_keeps_names_and_routes_and_converges_after",
            etcd_outage_keeps_names_and_routes,
        ),
        (
            "a_restart_while_etcd_is_down_shows_the_last_known_host_and_peers",
            a_restart_with_etcd_down_shows_the_last_known_state,
        ),
        (
            "containers_reach_each_other_across_hosts_over_routes",
            data_path_route_mode,
        ),
    ];
    let mut trials: Vec<Trial> = list
        .into_iter()
        .map(|(name, f)| {
            let w = w.clone();
            Trial::test(name, move || match &w {
                Some(w) => f(w),
                None => Err("no world".into()),
            })
        })
        .collect();
    let w2 = w.clone();
    trials.push(Trial::test(
        "netplane_cleanup_reports_what_it_did_when_a_part_fails",
        move || match &w2 {
            Some(w) => cleanup_reports_what_it_did(w),
            None => Err("no world".into()),
        },
    ));
    trials
}
