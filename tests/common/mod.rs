//! Shared harness of the integration tests: the real Docker Engine, the
//! real `portless` binary, real clients (dig, nsenter, docker-compose).
//!
//! Every object a test creates has a unique name, carries the label
//! `portless-test=1`, and is removed by a guard's `Drop`, so it goes away
//! even when the test fails.
// Test harness: it may panic on a broken setup and block its own thread.
#![allow(dead_code, clippy::unwrap_used, clippy::disallowed_methods)]

pub mod dnsmasq;
pub mod docker_proxy;
pub mod engines;
pub mod netns;
/// pebble, the ACME test server: the router library's harness, shared.
#[path = "../../router/tests/support/pebble.rs"]
pub mod pebble;

/// `docker network create -d portless --ipam-driver portless`: a cluster
/// network (the name and any options follow).
pub const CREATE_PORTLESS_NETWORK: [&str; 6] = [
    "network",
    "create",
    "-d",
    "portless",
    "--ipam-driver",
    "portless",
];

use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const IMAGE: &str = "portless-test-busybox:latest";
pub const LABEL: &str = "portless-test=1";

pub use netns::require;

pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Run and return stdout; panic with stderr on failure.
pub fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn docker(args: &[&str]) -> String {
    ok("docker", args)
}

/// A short unique name: `prefix` + pid + counter (fits Linux interface names
/// when `prefix` has at most 4 characters).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The busybox test image, built once from Debian's busybox-static by
/// `docker import` (there is no registry).
pub fn busybox_image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        require("docker");
        if run("docker", &["image", "inspect", IMAGE]).status.success() {
            return;
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"].into_iter().find(|p| std::path::Path::new(p).exists());
        let busybox = busybox.expect("busybox-static is not installed: run ./test.sh, which installs it");
        let script = format!(
            "set -e; d=$(mktemp -d); trap 'rm -rf $d' EXIT; mkdir -p $d/bin $d/etc $d/tmp $d/www; cp {busybox} $d/bin/busybox; \
             for c in sh ls cat echo sleep nslookup wget httpd ping nc ip hostname env true false kill ps mkdir touch grep sed printf; do ln -s busybox $d/bin/$c; done; \
             echo 'root:x:0:0:root:/root:/bin/sh' > $d/etc/passwd; \
             tar -C $d -c . | docker import -c 'CMD [\"/bin/sh\"]' - {IMAGE}"
        );
        ok("sh", &["-c", &script]);
    });
    IMAGE
}

/// Runs cleanup commands when dropped, last registered first.
#[derive(Default)]
pub struct Cleanup(Mutex<Vec<Vec<String>>>);

impl Cleanup {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&self, cmd: &[&str]) {
        self.0
            .lock()
            .unwrap()
            .push(cmd.iter().map(|s| s.to_string()).collect());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let cmds = std::mem::take(&mut *self.0.lock().unwrap());
        for c in cmds.into_iter().rev() {
            let _ = Command::new(&c[0])
                .args(&c[1..])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Start a docker-compose project from `yaml` (written to a directory of
/// its own) under a fresh name starting with `prefix`; `docker-compose
/// down` and the directory go with `cleanup`. Returns the project name.
pub fn compose_up(cleanup: &Cleanup, prefix: &str, yaml: &str) -> String {
    require("docker-compose");
    let project = unique(prefix);
    let dir = std::env::temp_dir().join(&project);
    std::fs::create_dir_all(&dir).unwrap();
    cleanup.push(&["rm", "-rf", dir.to_str().unwrap()]);
    let file = dir.join("docker-compose.yml");
    std::fs::write(&file, yaml).unwrap();
    let f = file.to_str().unwrap();
    cleanup.push(&[
        "docker-compose",
        "-f",
        f,
        "-p",
        &project,
        "down",
        "-v",
        "-t",
        "0",
    ]);
    ok("docker-compose", &["-f", f, "-p", &project, "up", "-d"]);
    project
}

/// Create a bridge network with a free /24 subnet picked by the test, and
/// register its removal. Returns (name, gateway).
pub fn network(cleanup: &Cleanup, extra: &[&str]) -> (String, IpAddr) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = unique("pln");
    for _ in 0..200 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let third = (std::process::id() + n * 7) % 250;
        let subnet = format!("10.213.{third}.0/24");
        let gateway = format!("10.213.{third}.1");
        // No --gateway: Docker then lists none in the IPAM config, and
        // portless must find it on the bridge device (the common case).
        let mut args = vec!["network", "create", "--label", LABEL, "--subnet", &subnet];
        args.extend_from_slice(extra);
        args.push(&name);
        let out = run("docker", &args);
        if out.status.success() {
            cleanup.push(&["docker", "network", "rm", &name]);
            return (name, gateway.parse().unwrap());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("overlap") || err.contains("in use"),
            "docker network create: {err}"
        );
    }
    panic!("no free 10.213.x.0/24 subnet for a test network");
}

/// `docker run -d` a busybox container (labelled, removed on drop);
/// `args` go before the image, `cmd` after it (default: sleep).
pub fn container(cleanup: &Cleanup, name: &str, args: &[&str], cmd: &[&str]) -> String {
    let image = busybox_image();
    let mut a = vec!["run", "-d", "--label", LABEL, "--name", name];
    a.extend_from_slice(args);
    a.push(image);
    if cmd.is_empty() {
        a.extend_from_slice(&["sleep", "3600"]);
    } else {
        a.extend_from_slice(cmd);
    }
    cleanup.push(&["docker", "rm", "-f", name]);
    docker(&a)
}

pub fn container_ip(name: &str, network: &str) -> IpAddr {
    let fmt = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
    docker(&["inspect", "-f", &fmt, name])
        .parse()
        .unwrap_or_else(|e| panic!("ip of {name} on {network}: {e}"))
}

pub fn container_pid(name: &str) -> String {
    docker(&["inspect", "-f", "{{.State.Pid}}", name])
}

/// A port free for both UDP and TCP on `ip`.
pub fn free_port(ip: IpAddr) -> u16 {
    for _ in 0..100 {
        let udp = UdpSocket::bind((ip, 0)).expect("bind udp");
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {ip}");
}

pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running `portless run`, killed on drop.
pub struct Portless {
    child: Child,
    pub admin: SocketAddr,
    pub log: std::path::PathBuf,
}

impl Portless {
    /// Start the real binary with `args` plus a free admin port, and wait
    /// until it serves its admin API (and, unless `--docker-host none`, has
    /// listed Docker).
    pub fn start(args: &[&str]) -> Portless {
        Self::start_with_env(args, &[])
    }

    /// [`Portless::start`] with more environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Portless {
        Self::start_logging(args, env, Some("info,portless=debug"))
    }

    /// [`Portless::start_with_env`] with this `--log` filter; None: the
    /// default one.
    pub fn start_logging(args: &[&str], env: &[(&str, &str)], filter: Option<&str>) -> Portless {
        let admin = SocketAddr::new([127, 0, 0, 1].into(), free_port([127, 0, 0, 1].into()));
        let log = std::env::temp_dir().join(format!("{}.log", unique("portless-")));
        let file = std::fs::File::create(&log).unwrap();
        let admin_s = admin.to_string();
        let mut all = vec!["run", "--admin-listen", &admin_s];
        if let Some(filter) = filter {
            all.extend_from_slice(&["--log", filter]);
        }
        all.extend_from_slice(args);
        let child = Command::new(env!("CARGO_BIN_EXE_portless"))
            .args(&all)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn portless");
        let mut p = Portless { child, admin, log };
        let docker = !args.windows(2).any(|w| w == ["--docker-host", "none"]);
        wait_until("portless to start", Duration::from_secs(20), || {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("portless exited with {status}: {}", p.logs());
            }
            let body = http_get(p.admin, "/api/status")?;
            (!docker || body.contains("\"connected\": true")).then_some(())
        });
        p
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Portless {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- portless log ({}) ----\n{}",
                self.log.display(),
                self.logs()
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A plain HTTP/1.0 GET on loopback; None when unreachable or not 200.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?;
    (code == "200").then(|| body.to_owned())
}

/// The result of one `dig`.
#[derive(Debug, Clone)]
pub struct Dig {
    pub status: String,
    pub flags: String,
    /// Answer section rdata, in order.
    pub answers: Vec<String>,
    /// TTLs of the answer section, in order.
    pub ttls: Vec<u32>,
    pub authority: Vec<String>,
    pub raw: String,
}

impl Dig {
    pub fn sorted(&self) -> Vec<String> {
        let mut v = self.answers.clone();
        v.sort();
        v
    }
}

fn parse_dig(raw: String) -> Dig {
    let mut status = String::new();
    let mut flags = String::new();
    let mut answers = Vec::new();
    let mut ttls = Vec::new();
    let mut authority = Vec::new();
    let mut section = "";
    for line in raw.lines() {
        if let Some(i) = line.find("status: ") {
            status = line[i + 8..].split(',').next().unwrap_or("").to_owned();
        }
        if let Some(i) = line.find(";; flags: ") {
            flags = line[i + 10..].split(';').next().unwrap_or("").to_owned();
        }
        if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
            continue;
        }
        if line.starts_with(";; AUTHORITY SECTION") {
            section = "authority";
            continue;
        }
        if line.starts_with(";;") || line.trim().is_empty() {
            if line.trim().is_empty() {
                section = "";
            }
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() >= 5 {
            let rdata = fields[4..].join(" ");
            match section {
                "answer" => {
                    answers.push(rdata);
                    ttls.push(fields[1].parse().unwrap_or(u32::MAX));
                }
                "authority" => authority.push(format!("{} {}", fields[3], rdata)),
                _ => {}
            }
        }
    }
    Dig {
        status,
        flags,
        answers,
        ttls,
        authority,
        raw,
    }
}

/// `dig` from the host.
pub fn dig(server: SocketAddr, name: &str, qtype: &str, extra: &[&str]) -> Dig {
    let at = format!("@{}", server.ip());
    let port = server.port().to_string();
    let mut args = vec![at.as_str(), "-p", &port, name, qtype, "+tries=1", "+time=3"];
    args.extend_from_slice(extra);
    let out = run("dig", &args);
    parse_dig(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `dig` run inside a container's network namespace: the query leaves from
/// the container's own address, as its own resolver's would.
pub fn dig_from(container: &str, server: SocketAddr, name: &str, qtype: &str) -> Dig {
    let pid = container_pid(container);
    let at = format!("@{}", server.ip());
    let port = server.port().to_string();
    let out = run(
        "nsenter",
        &[
            "-t", &pid, "-n", "dig", &at, "-p", &port, name, qtype, "+tries=1", "+time=3",
        ],
    );
    parse_dig(String::from_utf8_lossy(&out.stdout).into_owned())
}
