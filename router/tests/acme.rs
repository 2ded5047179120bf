//! Automatic HTTPS against a real ACME server (Debian's pebble) on
//! loopback: the router answers HTTP-01 and TLS-ALPN-01 itself, serves the
//! certificates by SNI, keeps them across a restart, renews them without
//! dropping connections, retries failures with backoff, and never orders a
//! name no route claims.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use portless_router::RouterOptions;
use portless_router::acme::{AcmeOptions, AcmeState, CertPhase, CertStatus, ChallengeKind, Issuer};
use portless_router::tls::{CertResolver, CertStore, load_cert_dir, server_config};
use rustls::pki_types::ServerName;
use support::pebble::{Pebble, PebbleConfig};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// A router with ACME on: plain and HTTPS listeners on 127.0.0.1, and the
/// issuer task (aborted on drop).
struct AcmeRouter {
    r: TestRouter,
    https: SocketAddr,
    state: Arc<AcmeState>,
    resolver: Arc<CertResolver>,
    issuer: Option<JoinHandle<()>>,
}

impl Drop for AcmeRouter {
    fn drop(&mut self) {
        if let Some(t) = &self.issuer {
            t.abort();
        }
    }
}

async fn acme_router(opts: RouterOptions, specs: Vec<portless_router::RouteSpec>) -> AcmeRouter {
    acme_router_with_files(opts, specs, CertStore::default()).await
}

/// [`acme_router`] with certificates from a `--cert-dir` as well.
async fn acme_router_with_files(
    mut opts: RouterOptions,
    specs: Vec<portless_router::RouteSpec>,
    files: CertStore,
) -> AcmeRouter {
    let state = Arc::new(AcmeState::default());
    opts.acme = Some(state.clone());
    let resolver = Arc::new(CertResolver::with_acme(files, state.clone()));
    let mut r = router(opts, specs).await;
    let https = r.add_https(server_config(resolver.clone()).unwrap()).await;
    AcmeRouter {
        r,
        https,
        state,
        resolver,
        issuer: None,
    }
}

impl AcmeRouter {
    fn start_issuer(&mut self, opts: AcmeOptions) {
        let issuer = Issuer::new(opts, self.state.clone(), self.resolver.clone()).unwrap();
        self.issuer = Some(tokio::spawn(issuer.run(self.r.router.hosts())));
    }

    fn status(&self, host: &str) -> Option<CertStatus> {
        self.state.status().into_iter().find(|s| s.host == host)
    }

    async fn wait_phase(&self, host: &str, phase: CertPhase, max: Duration) -> CertStatus {
        let ok = eventually(max, async || {
            self.status(host).is_some_and(|s| s.phase == phase)
        })
        .await;
        assert!(ok, "{host} never {phase:?}: {:?}", self.state.status());
        self.status(host).unwrap()
    }
}

fn acme_opts(p: &Pebble, dir: &Path, challenges: &[ChallengeKind]) -> AcmeOptions {
    let mut o = AcmeOptions::new(p.directory.clone(), dir);
    o.ca_file = Some(p.listener_ca.clone());
    o.email = Some("ops@example.test".into());
    o.challenges = challenges.to_vec();
    o.retry_base = Duration::from_secs(1);
    o
}

fn pebble_for(ar: &AcmeRouter) -> PebbleConfig {
    PebbleConfig {
        http_port: ar.r.addr.port(),
        tls_port: ar.https.port(),
        validity_secs: None,
        dns_server: None,
        ..Default::default()
    }
}

/// curl over HTTPS to the router with `host` resolved to 127.0.0.1,
/// trusting only `root`.
async fn https_get(ar: &AcmeRouter, host: &str, root: &Path) -> Reply {
    curl(
        &format!("https://{host}:{}/", ar.https.port()),
        &["--cacert", root.to_str().unwrap()],
    )
    .await
}

async fn issued_for_with(kind: ChallengeKind) {
    let be = backend("shop").await;
    // A --cert-dir file covers files.example.test: it wins, and the name
    // is not ordered.
    let ca = TestCa::new();
    let files = TempDir::new("certs");
    ca.issue(&files.0, "files", &["files.example.test"]);
    let (store, problems) = load_cert_dir(&files.0).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let mut ar = acme_router_with_files(
        RouterOptions::default(),
        vec![
            spec(&["shop.example.test"], "/", vec![b("be", be.addr)]),
            spec(&["files.example.test"], "/", vec![b("be", be.addr)]),
            // Wildcards need DNS-01: never ordered here.
            spec(&["*.apps.example.test"], "/", vec![b("be", be.addr)]),
        ],
        store,
    )
    .await;
    let pebble = Pebble::start(pebble_for(&ar));
    let dir = TempDir::new("acme");
    ar.start_issuer(acme_opts(&pebble, &dir.0, &[kind]));
    // A path under the challenge prefix that is no live token is the
    // site's, as before.
    let got = curl(
        &format!(
            "http://shop.example.test:{}/.well-known/acme-challenge/not-a-token",
            ar.r.addr.port()
        ),
        &[],
    )
    .await;
    assert_eq!(got.header("x-backend").as_deref(), Some("shop"), "{got:?}");
    // A stranger asks for names no route claims, over both listeners.
    let _ = curl(&format!("http://stranger.test:{}/", ar.r.addr.port()), &[]).await;
    let _ = curl(
        &format!("https://stranger.test:{}/", ar.https.port()),
        &["-k"],
    )
    .await;

    let st = ar
        .wait_phase(
            "shop.example.test",
            CertPhase::Valid,
            Duration::from_secs(60),
        )
        .await;
    assert!(st.not_after.unwrap() > SystemTime::now());
    assert_eq!(st.orders, 1);
    let root = pebble.issuing_root();
    let got = https_get(&ar, "shop.example.test", &root).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.header("x-backend").as_deref(), Some("shop"));
    let got = https_get(&ar, "files.example.test", &ca.ca_path()).await;
    assert_eq!(
        got.status, 200,
        "the --cert-dir file serves its name: {got:?}"
    );
    // Only the claimed exact name was ever ordered.
    let hosts: Vec<String> = ar.state.status().into_iter().map(|s| s.host).collect();
    assert_eq!(hosts, ["shop.example.test"]);
    assert_eq!(
        pebble.orders(),
        1,
        "{}",
        std::fs::read_to_string(&pebble.log).unwrap()
    );
    // The challenge type asked for is the one pebble validated (pebble
    // logs its HTTP-01 attempts, and nothing for TLS-ALPN-01).
    let log = std::fs::read_to_string(&pebble.log).unwrap();
    let over_http = log.contains("Attempting to validate w/ HTTP: http://shop.example.test:");
    assert_eq!(over_http, kind == ChallengeKind::Http01, "{log}");
    assert!(log.contains("set VALID by completed challenge"), "{log}");
    // Stored for the next start: 0600.
    let stored = find_files(&dir.0, "shop.example.test.pem");
    assert_eq!(stored.len(), 1, "{stored:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&stored[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

fn find_files(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(find_files(&p, name));
        } else if p.file_name().and_then(|n| n.to_str()) == Some(name) {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_host_gets_a_certificate_by_http01_and_nothing_else_is_ordered() {
    issued_for_with(ChallengeKind::Http01).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_host_gets_a_certificate_by_tls_alpn01() {
    issued_for_with(ChallengeKind::TlsAlpn01).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_serves_the_stored_certificate_without_a_new_order() {
    let be = backend("shop").await;
    let routes = || vec![spec(&["shop.example.test"], "/", vec![b("be", be.addr)])];
    let dir = TempDir::new("acme");
    let mut ar = acme_router(RouterOptions::default(), routes()).await;
    let pebble = Pebble::start(pebble_for(&ar));
    let opts = acme_opts(&pebble, &dir.0, &[ChallengeKind::Http01]);
    ar.start_issuer(opts.clone());
    let first = ar
        .wait_phase(
            "shop.example.test",
            CertPhase::Valid,
            Duration::from_secs(60),
        )
        .await;
    drop(ar);

    // A new router on other ports: pebble could not validate it, and need
    // not.
    let mut ar = acme_router(RouterOptions::default(), routes()).await;
    ar.start_issuer(opts);
    let again = ar
        .wait_phase(
            "shop.example.test",
            CertPhase::Valid,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(again.orders, 0, "{again:?}");
    assert_eq!(again.not_after, first.not_after);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(pebble.orders(), 1);
    let root = pebble.issuing_root();
    let got = https_get(&ar, "shop.example.test", &root).await;
    assert_eq!(got.status, 200, "{got:?}");
}

/// A TLS client trusting `root`, with http/1.1 by ALPN.
fn client_config(root: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(root).unwrap();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn tls_connect(addr: SocketAddr, host: &str, cfg: Arc<rustls::ClientConfig>) -> Tls {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from(host.to_owned()).unwrap(), tcp)
        .await
        .unwrap()
}

/// One keep-alive request on an open connection; the status line.
async fn request_on(s: &mut Tls, host: &str) -> String {
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "connection closed");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if body.len() >= len {
                return head.lines().next().unwrap().to_owned();
            }
        }
    }
}

fn served_not_after(s: &Tls) -> SystemTime {
    let leaf = &s.get_ref().1.peer_certificates().unwrap()[0];
    portless_router::acme::store::validity(leaf).unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_certificate_is_renewed_without_dropping_open_connections() {
    let be = backend("shop").await;
    let mut ar = acme_router(
        RouterOptions {
            header_read_timeout: Duration::from_secs(60),
            ..RouterOptions::default()
        },
        vec![spec(&["shop.example.test"], "/", vec![b("be", be.addr)])],
    )
    .await;
    let pebble = Pebble::start(PebbleConfig {
        validity_secs: Some(15),
        ..pebble_for(&ar)
    });
    let dir = TempDir::new("acme");
    ar.start_issuer(acme_opts(&pebble, &dir.0, &[ChallengeKind::Http01]));
    let first = ar
        .wait_phase(
            "shop.example.test",
            CertPhase::Valid,
            Duration::from_secs(60),
        )
        .await;
    let root = pebble.issuing_root();
    // A new client config per connection: no TLS session resumption, so
    // every handshake shows the certificate served now.
    let mut open = tls_connect(ar.https, "shop.example.test", client_config(&root)).await;
    let before = served_not_after(&open);
    assert!(before >= first.not_after.unwrap());
    assert!(
        request_on(&mut open, "shop.example.test")
            .await
            .contains("200")
    );

    // Renewed at two thirds of 15 s.
    let renewed = eventually(Duration::from_secs(40), async || {
        ar.status("shop.example.test")
            .is_some_and(|s| s.not_after > Some(before) && s.phase == CertPhase::Valid)
    })
    .await;
    assert!(renewed, "{:?}", ar.state.status());
    let st = ar.status("shop.example.test").unwrap();
    assert!(st.orders >= 2, "{st:?}");
    assert_eq!(st.failures, 0);
    // The open connection goes on; a new one gets the new certificate.
    assert!(
        request_on(&mut open, "shop.example.test")
            .await
            .contains("200")
    );
    let fresh = tls_connect(ar.https, "shop.example.test", client_config(&root)).await;
    assert!(served_not_after(&fresh) > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_order_is_reported_retried_with_backoff_and_not_redirected() {
    let be = backend("shop").await;
    let mut ar = acme_router(
        RouterOptions {
            redirect_https_port: Some(443),
            ..RouterOptions::default()
        },
        vec![spec(&["shop.example.test"], "/", vec![b("be", be.addr)])],
    )
    .await;
    // Pebble validates HTTP-01 on a port where nothing listens.
    let pebble = Pebble::start(PebbleConfig {
        http_port: dead_addr().await.port(),
        ..pebble_for(&ar)
    });
    let dir = TempDir::new("acme");
    let started = std::time::Instant::now();
    ar.start_issuer(acme_opts(&pebble, &dir.0, &[ChallengeKind::Http01]));
    let st = ar
        .wait_phase(
            "shop.example.test",
            CertPhase::Failed,
            Duration::from_secs(60),
        )
        .await;
    let err = st.last_error.clone().unwrap();
    assert!(
        err.contains("http-01") && err.contains("urn:ietf:params:acme:error"),
        "{err}"
    );
    // Pending: plain HTTP still reaches the site (no redirect to an https
    // that has no certificate).
    let got = curl(
        &format!("http://shop.example.test:{}/", ar.r.addr.port()),
        &[],
    )
    .await;
    assert_eq!(got.status, 200, "{got:?}");

    // Retried after 1 s, then 2 s: the third order comes no sooner than
    // 3 s after the first failure, and the next wait is 4 s.
    let third = eventually(Duration::from_secs(60), async || {
        ar.status("shop.example.test")
            .is_some_and(|s| s.failures >= 3)
    })
    .await;
    assert!(third, "{:?}", ar.state.status());
    assert!(started.elapsed() >= Duration::from_secs(3));
    let st = ar.status("shop.example.test").unwrap();
    assert_eq!(st.failures, 3);
    let wait = st
        .next_attempt
        .unwrap()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(
        wait > Duration::from_secs(2) && wait <= Duration::from_secs(4),
        "{wait:?}"
    );
    assert_eq!(pebble.orders(), 3);
    assert_eq!(st.orders, 3);

    // The route goes and comes back (a crash-looping container): its
    // backoff goes on, no order at once.
    ar.r.router.update(vec![]);
    let gone = eventually(Duration::from_secs(5), async || {
        ar.status("shop.example.test").is_none()
    })
    .await;
    assert!(gone, "{:?}", ar.state.status());
    ar.r.router.update(vec![spec(
        &["shop.example.test"],
        "/",
        vec![b("be", be.addr)],
    )]);
    let back = eventually(Duration::from_secs(5), async || {
        ar.status("shop.example.test").is_some()
    })
    .await;
    assert!(back);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = ar.status("shop.example.test").unwrap();
    assert_eq!((st.failures, st.orders), (3, 3), "{st:?}");
    assert_eq!(pebble.orders(), 3);
}
