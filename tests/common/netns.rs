//! Network-namespace test topology: hosts, switches, routers and
//! "containers" built with iproute2, removed on drop even when a test fails.
//!
//! Every object has a name unique to the test run, and all traffic stays in
//! the test's own namespaces. Requires root.

#![allow(dead_code)]
// The harness is synchronous by design (it shells out to iproute2 and
// waits for processes); short sleeps while polling are fine here.
#![allow(clippy::disallowed_methods)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short tag unique to this process and call, for names.
pub fn unique_tag() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{n}", std::process::id() & 0xffff)
}

/// Whether the tests can build namespaces and probe them (root, iproute2,
/// ping).
pub fn can_run() -> bool {
    let has = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    has("ip") && has("ping") && nix_is_root()
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// Fail with a reason when a tool the tests need is missing: a test that
/// cannot run must not pass silently.
pub fn require(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed: run the test command from the README (./test.sh), which installs it"
    );
}

/// Run a command, panicking with its output on failure.
pub fn sh(args: &[&str]) -> Output {
    sh_in(Path::new("."), args)
}

/// [`sh`] with `dir` as the working directory.
pub fn sh_in(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a command and report whether it succeeded.
pub fn try_sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// One network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Netns {
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n NS ARGS...`, panicking on failure.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Run a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Run a command inside the namespace; whether it succeeded.
    pub fn try_exec(&self, args: &[&str]) -> bool {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        try_sh(&v)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// One ping that must get an answer within two seconds.
    pub fn ping(&self, to: Ipv4Addr) -> bool {
        self.try_exec(&["ping", "-c", "1", "-W", "2", &to.to_string()])
    }

    /// A ping of `size` bytes of IP packet with DF set.
    pub fn ping_size(&self, to: Ipv4Addr, ip_size: u32) -> bool {
        let payload = (ip_size - 28).to_string();
        self.try_exec(&[
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            &payload,
            &to.to_string(),
        ])
    }

    /// Ping until it answers, up to `secs` seconds.
    pub fn ping_until(&self, to: Ipv4Addr, secs: u64) -> bool {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < end {
            if self.try_exec(&["ping", "-c", "1", "-W", "1", &to.to_string()]) {
                return true;
            }
        }
        false
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill whatever still runs in it (a portless under test), then
        // delete it; links inside go with it.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// An L2 segment: a namespace holding one bridge that hosts plug into.
pub struct Segment {
    pub ns: Netns,
    pub net: ipnet::Ipv4Net,
    ports: AtomicU32,
}

impl Segment {
    pub fn new(tag: &str, name: &str, net: &str) -> Segment {
        let ns = Netns::new(format!("pl-{tag}-{name}"));
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["link", "set", "br0", "up"]);
        Segment {
            ns,
            net: net.parse().expect("segment CIDR"),
            ports: AtomicU32::new(0),
        }
    }

    /// The address `.n` of this segment.
    pub fn addr(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net.network()) + n)
    }

    /// Plug `host` in as interface `ifname` with address `.n`; returns it.
    pub fn plug(&self, host: &Netns, ifname: &str, n: u32) -> Ipv4Addr {
        let port = format!("p{}", self.ports.fetch_add(1, Ordering::Relaxed));
        sh(&[
            "ip",
            "link",
            "add",
            ifname,
            "netns",
            &host.name,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &self.ns.name,
        ]);
        self.ns.ip(&["link", "set", &port, "master", "br0", "up"]);
        let addr = self.addr(n);
        host.ip(&[
            "addr",
            "add",
            &format!("{addr}/{}", self.net.prefix_len()),
            "dev",
            ifname,
        ]);
        host.ip(&["link", "set", ifname, "up"]);
        addr
    }
}

/// A host: a namespace with an uplink `eth0` on a segment.
pub struct Host {
    pub ns: Netns,
    pub addr: Ipv4Addr,
}

impl Host {
    pub fn new(tag: &str, name: &str, seg: &Segment, n: u32) -> Host {
        let ns = Netns::new(format!("pl-{tag}-{name}"));
        let addr = seg.plug(&ns, "eth0", n);
        ns.sysctl("net.ipv4.ip_forward", "1");
        Host { ns, addr }
    }

    /// Default route via a router on the host's segment.
    pub fn default_via(&self, gw: Ipv4Addr) {
        self.ns
            .ip(&["route", "add", "default", "via", &gw.to_string()]);
    }
}

/// A router joining segments: forwards between its interfaces.
pub struct Router {
    pub ns: Netns,
}

impl Router {
    pub fn new(tag: &str, name: &str) -> Router {
        let ns = Netns::new(format!("pl-{tag}-{name}"));
        ns.sysctl("net.ipv4.ip_forward", "1");
        Router { ns }
    }
}

/// A TCP transfer of one second from `client` to `server` with iperf3:
/// whether it completed.
pub fn tcp_ok(client: &Container, server: &Container) -> bool {
    let addr = server.addr.to_string();
    let Ok(mut srv) = server
        .ns
        .command(&["iperf3", "-s", "-1", "-B", &addr])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return false;
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let ok = client.ns.try_exec(&[
        "iperf3",
        "-c",
        &addr,
        "-t",
        "1",
        "--connect-timeout",
        "2000",
    ]);
    let _ = srv.kill();
    let _ = srv.wait();
    ok
}

/// A "container": a namespace with `eth0` plugged into a bridge of a host.
pub struct Container {
    pub ns: Netns,
    pub addr: Ipv4Addr,
}

impl Container {
    /// Plug into `bridge` in `host`, with `addr/prefix`, default route via
    /// `gw`, and `mtu`.
    pub fn new(
        tag: &str,
        name: &str,
        host: &Netns,
        bridge: &str,
        addr: ipnet::Ipv4Net,
        gw: Ipv4Addr,
        mtu: u32,
    ) -> Container {
        let ns = Netns::new(format!("pl-{tag}-{name}"));
        let port = format!("v{name}");
        sh(&[
            "ip", "link", "add", "eth0", "netns", &ns.name, "type", "veth", "peer", "name", &port,
            "netns", &host.name,
        ]);
        let mtu = mtu.to_string();
        host.ip(&["link", "set", &port, "mtu", &mtu, "master", bridge, "up"]);
        ns.ip(&["link", "set", "eth0", "mtu", &mtu, "up"]);
        ns.ip(&["addr", "add", &addr.to_string(), "dev", "eth0"]);
        ns.ip(&["route", "add", "default", "via", &gw.to_string()]);
        Container {
            ns,
            addr: addr.addr(),
        }
    }
}

/// A single-member etcd (Debian's `etcd-server`) with a temporary data
/// directory, in the test process's namespace on loopback or inside a test
/// namespace. Killed and its directory removed on drop.
pub struct Etcd {
    pub ip: Ipv4Addr,
    pub client_port: u16,
    peer_port: u16,
    netns: Option<String>,
    dir: PathBuf,
    tls: Option<EtcdServerTls>,
    extra: Vec<String>,
    child: Option<std::process::Child>,
}

/// PEM files of a TLS etcd: its certificate and key, and the CA its
/// clients' certificates must chain to (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct EtcdServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// Two distinct free loopback ports (both held while picking, so that the
/// kernel cannot hand out the same one twice).
fn two_free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    let b = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    let port = |l: &std::net::TcpListener| l.local_addr().expect("bound").port();
    (port(&a), port(&b))
}

impl Etcd {
    /// On 127.0.0.1 with free ports.
    pub fn on_loopback() -> Etcd {
        let (client, peer) = two_free_ports();
        Self::start(None, Ipv4Addr::LOCALHOST, client, peer)
    }

    /// On 127.0.0.1 with free ports, serving clients over mutual TLS, with
    /// more etcd flags.
    pub fn on_loopback_tls(tls: EtcdServerTls, extra: &[&str]) -> Etcd {
        let (client_port, peer_port) = two_free_ports();
        let mut e = Etcd {
            ip: Ipv4Addr::LOCALHOST,
            client_port,
            peer_port,
            netns: None,
            dir: std::env::temp_dir().join(format!("portless-etcd-{}", unique_tag())),
            tls: Some(tls),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        e.restart();
        e
    }

    /// Inside a test namespace, on one of its addresses.
    pub fn in_netns(ns: &Netns, ip: Ipv4Addr) -> Etcd {
        Self::start(Some(ns.name.clone()), ip, 2379, 2380)
    }

    fn start(netns: Option<String>, ip: Ipv4Addr, client_port: u16, peer_port: u16) -> Etcd {
        let dir = std::env::temp_dir().join(format!("portless-etcd-{}", unique_tag()));
        let mut e = Etcd {
            ip,
            client_port,
            peer_port,
            netns,
            dir,
            tls: None,
            extra: Vec::new(),
            child: None,
        };
        e.restart();
        e
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.ip, self.client_port)
    }

    /// Start (again, on the same data) and wait until it serves.
    pub fn restart(&mut self) {
        self.stop();
        let client = self.endpoint();
        let peer = format!("http://{}:{}", self.ip, self.peer_port);
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
            None => Command::new("etcd"),
        };
        cmd.args([
            "--name",
            "t",
            "--data-dir",
            &self.dir.to_string_lossy(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("t={peer}"),
            "--log-level",
            "error",
        ]);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.client_ca)
                .arg("--client-cert-auth");
        }
        cmd.args(&self.extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        self.child = Some(cmd.spawn().expect("etcd (apt-get install etcd-server)"));
        let probe = format!("echo > /dev/tcp/{}/{}", self.ip, self.client_port);
        for _ in 0..100 {
            let ok = match &self.netns {
                Some(ns) => try_sh(&["ip", "netns", "exec", ns, "bash", "-c", &probe]),
                None => try_sh(&["bash", "-c", &probe]),
            };
            if ok {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("etcd did not come up on {}", self.endpoint());
    }

    /// Kill it (the data stays for a restart).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
