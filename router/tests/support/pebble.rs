//! A real ACME server for tests: Debian's `pebble` on free loopback ports,
//! with its own listener certificate (from a [`TestCa`]) and with
//! `pebble-challtestsrv` (same package) as its DNS server, answering every
//! name with 127.0.0.1, so that pebble validates challenges against the
//! router under test. Both are killed when the value is dropped. A missing
//! pebble fails the test with the reason, never skips it.
//!
//! Self-contained and blocking (std only, openssl and curl as commands):
//! the binary's tests use this same file (`tests/common/mod.rs`).
// Blocking waits only while pebble starts, before the test's traffic.
#![allow(clippy::disallowed_methods)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A scratch directory removed on drop.
pub struct PebbleDir(pub PathBuf);

impl Drop for PebbleDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.pem`) and a certificate for `localhost` it signed
/// (`listener.pem`, `listener.key`): pebble's own HTTPS.
fn listener_certificate(dir: &Path, ip: Option<std::net::Ipv4Addr>) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=pebble listener CA",
    ]);
    openssl(dir, &a);
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "listener.key",
        "-out",
        "listener.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &a);
    std::fs::write(
        dir.join("ext"),
        match ip {
            Some(ip) => format!("subjectAltName=DNS:localhost,IP:127.0.0.1,IP:{ip}\n"),
            None => "subjectAltName=DNS:localhost,IP:127.0.0.1\n".to_owned(),
        },
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "listener.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "listener.pem",
            "-extfile",
            "ext",
        ],
    );
}

/// What pebble validates against and how it behaves.
#[derive(Debug, Clone, Default)]
pub struct PebbleConfig {
    /// The port pebble sends HTTP-01 validations to (on 127.0.0.1).
    pub http_port: u16,
    /// The port pebble sends TLS-ALPN-01 validations to.
    pub tls_port: u16,
    /// Lifetime of the certificates it issues, in seconds (pebble's
    /// default is five years).
    pub validity_secs: Option<u64>,
    /// A DNS server of the test's own for pebble (`-dnsserver`); without
    /// it, pebble-challtestsrv answers every name with 127.0.0.1.
    pub dns_server: Option<SocketAddr>,
    /// Run pebble in this network namespace (the test's own), listening on
    /// `listen` there (ports 14000 and 15000) instead of on loopback.
    pub netns: Option<String>,
    pub listen: Option<std::net::Ipv4Addr>,
}

pub struct Pebble {
    pub dir: PebbleDir,
    /// The ACME directory URL.
    pub directory: String,
    /// The CA that signed pebble's own HTTPS certificate (for `--acme-ca`).
    pub listener_ca: PathBuf,
    /// Where pebble writes its log.
    pub log: PathBuf,
    management: SocketAddr,
    children: Vec<Child>,
    netns: Option<String>,
}

/// `bin` run in `netns` when one is given.
fn command(netns: &Option<String>, bin: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn need(bin: &str) -> PathBuf {
    let path = PathBuf::from("/usr/bin").join(bin);
    assert!(
        path.exists(),
        "{bin} is missing: install Debian's `pebble` package (./test.sh does)"
    );
    path
}

impl Pebble {
    pub fn start(cfg: PebbleConfig) -> Pebble {
        let pebble_bin = need("pebble");
        let challtestsrv = need("pebble-challtestsrv");
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = PebbleDir(std::env::temp_dir().join(format!(
            "portless-pebble-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )));
        std::fs::create_dir_all(&dir.0).unwrap();
        listener_certificate(&dir.0, cfg.listen);
        let (listen, management) = match cfg.listen {
            Some(ip) => (SocketAddr::from((ip, 14000)), SocketAddr::from((ip, 15000))),
            None => (
                SocketAddr::from(([127, 0, 0, 1], free_port())),
                SocketAddr::from(([127, 0, 0, 1], free_port())),
            ),
        };
        let mut children = Vec::new();
        let dns = match cfg.dns_server {
            Some(d) => d,
            None => {
                let dns = SocketAddr::from(([127, 0, 0, 1], free_port()));
                let child = command(&cfg.netns, &challtestsrv)
                    .args(["-dns01", &dns.to_string()])
                    .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                    .args(["-management", &format!("127.0.0.1:{}", free_port())])
                    .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("pebble-challtestsrv starts");
                children.push(child);
                dns
            }
        };
        let mut pcfg = serde_json::json!({
            "listenAddress": listen.to_string(),
            "managementListenAddress": management.to_string(),
            "certificate": dir.0.join("listener.pem"),
            "privateKey": dir.0.join("listener.key"),
            "httpPort": cfg.http_port,
            "tlsPort": cfg.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        });
        if let Some(v) = cfg.validity_secs {
            pcfg["certificateValidityPeriod"] = v.into();
        }
        let config = dir.0.join("pebble.json");
        std::fs::write(
            &config,
            serde_json::to_vec(&serde_json::json!({ "pebble": pcfg })).unwrap(),
        )
        .unwrap();
        let log = dir.0.join("pebble.log");
        let logf = std::fs::File::create(&log).unwrap();
        let child = command(&cfg.netns, &pebble_bin)
            .args(["-config", config.to_str().unwrap()])
            .args(["-dnsserver", &dns.to_string()])
            .args(["-strict", "false"])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_VA_ALWAYS_VALID", "0")
            // Every order validates afresh, and no nonce is refused on
            // purpose: the tests count orders.
            .env("PEBBLE_AUTHZREUSE", "0")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("pebble starts");
        children.push(child);
        let listener_ca = dir.0.join("ca.pem");
        let p = Pebble {
            dir,
            directory: match cfg.listen {
                Some(ip) => format!("https://{ip}:{}/dir", listen.port()),
                None => format!("https://localhost:{}/dir", listen.port()),
            },
            listener_ca,
            log,
            management,
            children,
            netns: cfg.netns.clone(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if p.get(&p.directory).is_some() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pebble did not come up; its log:\n{}",
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    /// GET with curl, trusting pebble's listener CA; the body on 200.
    fn get(&self, url: &str) -> Option<String> {
        let out = command(&self.netns, Path::new("curl"))
            .args(["-sS", "--fail", "--max-time", "5", "--cacert"])
            .arg(&self.listener_ca)
            .arg(url)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The root of the certificates pebble issues (new with every start),
    /// written to a file for `curl --cacert`.
    pub fn issuing_root(&self) -> PathBuf {
        let pem = self
            .get(&format!(
                "https://{}/roots/0",
                match self.netns {
                    Some(_) => self.management.to_string(),
                    None => format!("localhost:{}", self.management.port()),
                }
            ))
            .expect("pebble's management interface serves its root");
        let path = self.dir.0.join("issuing-root.pem");
        std::fs::write(&path, pem).unwrap();
        path
    }

    /// How many validations pebble ran for `name` (from its log): with no
    /// authorization reuse, one per order of `name` that got as far as a
    /// challenge. A wildcard's is counted under its base name.
    pub fn validations(&self, name: &str) -> usize {
        let needle = format!("Value:\"{name}\"");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Pulled a task") && l.contains(&needle))
            .count()
    }

    /// How many orders pebble was asked for so far (from its log).
    pub fn orders(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("POST /order-plz"))
            .count()
    }
}
