//! Two real Docker Engines on this one machine, each in a network
//! namespace of its own with its own socket, data root and bridge, plus a
//! real etcd in a switch namespace (`tests/twohost.sh`, with names unique
//! to this run), and a `portless run` per engine.
//!
//! Everything lives inside namespaces this harness makes: traffic never
//! leaves them, and `Drop` takes all of it down (`twohost.sh down`).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_portless");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/twohost.sh");

/// The engines, their namespaces and etcd.
pub struct Engines {
    pub pfx: String,
    pub dir: PathBuf,
}

impl Engines {
    /// Bring everything up; on failure take down what was made and panic
    /// with the reason.
    pub fn up() -> Engines {
        super::netns::require("dockerd");
        super::netns::require("etcd");
        super::netns::require("busybox");
        let pfx = format!("plc{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("portless-twohost-{pfx}"));
        let e = Engines { pfx, dir };
        let out = e.script(&["up"]);
        if !out.status.success() {
            let msg = format!(
                "twohost.sh up failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            drop(e);
            panic!("{msg}");
        }
        e
    }

    fn script(&self, args: &[&str]) -> Output {
        Command::new("bash")
            .arg(SCRIPT)
            .args(args)
            .env("TWOHOST_PFX", &self.pfx)
            .env("TWOHOST_DIR", &self.dir)
            .output()
            .expect("bash tests/twohost.sh")
    }

    /// The image imported into both engines.
    pub fn image(&self) -> String {
        format!("{}-bb", self.pfx)
    }

    pub fn ns(&self, h: char) -> String {
        format!("{}-h{h}", self.pfx)
    }

    /// The host's underlay address.
    pub fn addr(&self, h: char) -> Ipv4Addr {
        match h {
            'A' => Ipv4Addr::new(10, 251, 0, 1),
            'B' => Ipv4Addr::new(10, 251, 0, 2),
            _ => panic!("no host {h}"),
        }
    }

    pub fn sock(&self, h: char) -> String {
        format!("unix:///run/{}-{h}.sock", self.pfx)
    }

    /// The socket where host `h`'s portless serves the network plugin:
    /// in the plugin directory of that engine alone.
    pub fn plugin_socket(&self, h: char) -> String {
        self.dir
            .join(format!("plugins-{h}"))
            .join("portless.sock")
            .display()
            .to_string()
    }

    pub fn etcd_endpoint(&self) -> String {
        "http://10.251.0.10:27379".into()
    }

    /// `docker` against engine `h`.
    pub fn docker(&self, h: char, args: &[&str]) -> Output {
        Command::new("docker")
            .arg("-H")
            .arg(self.sock(h))
            .args(args)
            .output()
            .expect("docker")
    }

    /// `docker` against engine `h`; its stdout, or a panic with stderr.
    /// The IPv4 address of container `c` on network `net` of engine `h`.
    pub fn ip_of(&self, h: char, c: &str, net: &str) -> Ipv4Addr {
        self.docker_ok(
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

    pub fn docker_ok(&self, h: char, args: &[&str]) -> String {
        let out = self.docker(h, args);
        assert!(
            out.status.success(),
            "docker {args:?} on {h} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A command inside host `h`'s namespace.
    pub fn in_ns(&self, h: char, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(h)])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// The rules of the cluster networks' chains (`PORTLESS-NETS`, filter
    /// and nat) on host `h` that name one network's link (its bridge or
    /// VXLAN device): the ones that must go with the network. The rules
    /// every network shares name only `pn-+` wildcards.
    pub fn network_rules(&self, h: char) -> Vec<String> {
        ["filter", "nat"]
            .iter()
            .flat_map(|t| {
                let out = self.in_ns(h, &["iptables", "-w", "-t", t, "-S", "PORTLESS-NETS"]);
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| {
                        l.split_whitespace()
                            .any(|w| w.starts_with("pn-") && !w.ends_with('+'))
                    })
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// `etcdctl` against the harness's etcd.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &format!("{}-sw", self.pfx), "etcdctl"])
            .arg("--endpoints")
            .arg(self.etcd_endpoint())
            .args(args)
            .output()
            .expect("etcdctl")
    }

    pub fn etcd_stop(&self) {
        let out = self.script(&["etcd-stop"]);
        assert!(out.status.success(), "etcd-stop failed");
    }

    pub fn etcd_start(&self) {
        let out = self.script(&["etcd-start"]);
        assert!(
            out.status.success(),
            "etcd-start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Engines {
    fn drop(&mut self) {
        let out = self.script(&["down"]);
        if !out.status.success() {
            eprintln!(
                "twohost.sh down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `portless run` for one engine, inside its host's namespace; SIGTERM on
/// drop.
pub struct Sidecar {
    pub host: char,
    ns: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Sidecar {
    /// Start with cluster mode on, a short lease, DNS on the Docker
    /// gateways (port 53 inside the namespace) and the router on port 80
    /// there, and wait until the cluster Docker network is ready.
    pub fn start(e: &Engines, h: char, extra: &[&str]) -> Sidecar {
        let s = Self::start_unready(e, h, extra);
        s.wait_for("the cluster Docker network", 30, |st| {
            st["cluster"]["docker_network"]["ready"].as_bool() == Some(true)
                && st["cluster"]["host"].is_object()
                && st["cluster"]["last_known"].as_bool() != Some(true)
        });
        s
    }

    /// Start without waiting for anything.
    pub fn start_unready(e: &Engines, h: char, extra: &[&str]) -> Sidecar {
        let ns = e.ns(h);
        let log = e.dir.join(format!("portless-{h}.log"));
        let state = e.dir.join(format!("state-{h}"));
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let addr = e.addr(h).to_string();
        // This engine's own plugin directory (tests/twohost.sh), never the
        // machine's /run/docker/plugins.
        let plugin = e.plugin_socket(h);
        let plugin_args = ["--plugin-socket", plugin.as_str()];
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, BIN, "run"])
            .args(["--docker-host", &e.sock(h)])
            .args(["--cluster-etcd", &e.etcd_endpoint()])
            .args(["--advertise-addr", &addr])
            .args(if extra.contains(&"--lease-ttl") {
                &[][..]
            } else {
                &["--lease-ttl", "2"][..]
            })
            .arg("--state-dir")
            .arg(&state)
            .args(["--upstream", "127.0.0.1:9"])
            .args(if extra.contains(&"--plugin-socket") {
                &[][..]
            } else {
                &plugin_args[..]
            })
            .args(extra)
            .env(
                "PORTLESS_LOG",
                "info,portless_netplane=debug,portless::plugin=debug",
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("portless run");
        Sidecar {
            host: h,
            ns,
            child: Some(child),
            log,
        }
    }

    /// `portless status --json` of this sidecar (null when not answering).
    pub fn status(&self) -> serde_json::Value {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, BIN, "status", "--json"])
            .output()
            .expect("portless status");
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// `portless status` as text, and whether it exited 0.
    pub fn status_text(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, BIN, "status"])
            .output()
            .expect("portless status");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Poll the status until `f` holds; panic with the log after `secs`.
    pub fn wait_for(&self, what: &str, secs: u64, f: impl Fn(&serde_json::Value) -> bool) {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let st = self.status();
            if f(&st) {
                return;
            }
            if Instant::now() > end {
                panic!(
                    "host {}: {what} not seen in {secs} s; status: {st:#}\nlog:\n{}",
                    self.host,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The log's warnings and errors (the last 40), then its last 40
    /// lines: what a failed test prints.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let bad: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        format!(
            "-- warnings and errors ({} in all):\n{}\n-- last lines:\n{}",
            bad.len(),
            bad[bad.len().saturating_sub(40)..].join("\n"),
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): a portless that does nothing
    /// for a while, as on a host too busy to run it.
    pub fn freeze(&self, stop: bool) {
        if let Some(c) = &self.child {
            let sig = if stop { "-STOP" } else { "-CONT" };
            let ok = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} portless {}", self.host);
        }
    }

    /// SIGKILL: no lease given back, nothing cleaned.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The addresses in busybox `nslookup` output (after the `Name:` line, so
/// the server's own address is not counted).
pub fn nslookup_addrs(out: &str) -> Vec<String> {
    let mut seen_name = false;
    let mut addrs = Vec::new();
    for l in out.lines() {
        let l = l.trim();
        if l.starts_with("Name:") {
            seen_name = true;
        } else if seen_name && let Some(a) = l.strip_prefix("Address:") {
            let a = a.trim();
            let a = a.split_whitespace().next().unwrap_or(a);
            if !addrs.iter().any(|x: &String| x == a) {
                addrs.push(a.to_owned());
            }
        }
    }
    addrs.sort();
    addrs
}

/// Poll `f` until it holds, failing after `secs` with `what`; how long it
/// took.
/// portless on A and on B (`extra` arguments for both), once each serves
/// its network plugin socket.
pub fn plugin_sidecars(e: &Engines, extra: &[&str]) -> (Sidecar, Sidecar) {
    let a = Sidecar::start(e, 'A', extra);
    let b = Sidecar::start(e, 'B', extra);
    for h in ['A', 'B'] {
        let sock = e.plugin_socket(h);
        wait(&format!("plugin socket of {h}"), 10.0, || {
            std::path::Path::new(&sock).exists()
        });
    }
    (a, b)
}

/// A test's steps failed (`result`): print both hosts' portless logs, then
/// fail the test with the steps' panic.
pub fn fail_with_logs(result: std::thread::Result<()>, a: &Sidecar, b: &Sidecar) {
    if let Err(p) = result {
        eprintln!(
            "portless A:\n{}\nportless B:\n{}",
            a.log_tail(),
            b.log_tail()
        );
        std::panic::resume_unwind(p);
    }
}

pub fn wait(what: &str, secs: f64, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs_f64(secs),
            "{what}: not within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// The client address the image's CGI `/cgi-bin/ip` printed: busybox
/// httpd listens on IPv6 too and reports `[::ffff:10.112.0.2]`.
pub fn cgi_client(body: &str) -> String {
    body.trim()
        .trim_start_matches("[::ffff:")
        .trim_end_matches(']')
        .to_owned()
}
