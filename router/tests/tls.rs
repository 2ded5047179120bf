//! HTTPS: SNI picks exact, then wildcard, then default certificates from a
//! directory that is reloaded on change; ALPN h2; redirect to https.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use portless_router::RouterOptions;
use portless_router::tls::{CertResolver, load_cert_dir, server_config, watch_cert_dir};
use support::*;

#[tokio::test]
async fn sni_picks_exact_then_wildcard_then_default_and_reloads_on_change() {
    let ca = TestCa::new();
    let certs = TempDir::new("certs");
    ca.issue(&certs.0, "shop", &["shop.example.test"]);
    ca.issue(&certs.0, "wild", &["*.example.test"]);
    ca.issue(&certs.0, "default", &["fallback.test"]);
    let (store, problems) = load_cert_dir(&certs.0).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let resolver = Arc::new(CertResolver::new(store));
    let watcher = tokio::spawn(watch_cert_dir(
        certs.0.clone(),
        resolver.clone(),
        Duration::from_millis(200),
    ));

    let be = backend("be").await;
    let mut r = router(
        RouterOptions::default(),
        vec![spec(
            &["shop.example.test", "*.example.test", "new.test"],
            "/",
            vec![b("be", be.addr)],
        )],
    )
    .await;
    let https = r.add_https(server_config(resolver.clone()).unwrap()).await;
    let ca_path = ca.ca_path();
    let cacert = ca_path.to_str().unwrap();
    let u = |host: &str| format!("https://{host}:{}/", https.port());

    // curl verifies the name: success means the right certificate.
    let got = curl(&u("shop.example.test"), &["--cacert", cacert]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert!(
        got.head.starts_with("HTTP/2 200"),
        "ALPN h2 expected: {}",
        got.head
    );
    assert!(
        got.body.contains("x-forwarded-proto: https"),
        "{}",
        got.body
    );
    let got = curl(&u("blog.example.test"), &["--cacert", cacert, "--http1.1"]).await;
    assert!(got.head.starts_with("HTTP/1.1 200"), "{got:?}");
    // Which certificate came back, by its subject.
    let subject = |host: &'static str| {
        let port = https.port();
        async move {
            let out = tokio::process::Command::new("curl")
                .args([
                    "-sS",
                    "-v",
                    "-k",
                    "-o",
                    "/dev/null",
                    "--resolve",
                    &format!("{host}:{port}:127.0.0.1"),
                ])
                .arg(format!("https://{host}:{port}/"))
                .output()
                .await
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            err.lines()
                .find(|l| l.contains("subject:"))
                .unwrap_or("")
                .to_owned()
        }
    };
    assert!(
        subject("shop.example.test")
            .await
            .contains("CN=shop.example.test")
    );
    assert!(
        subject("a.example.test")
            .await
            .contains("CN=*.example.test")
    );
    // A wildcard covers one label only: deeper names get the default.
    assert!(
        subject("a.b.example.test")
            .await
            .contains("CN=fallback.test")
    );
    assert!(subject("new.test").await.contains("CN=fallback.test"));

    // A certificate dropped in is picked up without a restart, and open
    // connections are not affected.
    ca.issue(&certs.0, "new", &["new.test"]);
    let ok = eventually(Duration::from_secs(5), async || {
        subject("new.test").await.contains("CN=new.test")
    })
    .await;
    assert!(ok, "new certificate not picked up");
    let got = curl(&u("new.test"), &["--cacert", cacert]).await;
    assert_eq!(got.status, 200);
    watcher.abort();
}

#[tokio::test]
async fn redirect_https_sends_308_for_routed_hosts_only() {
    let be = backend("be").await;
    let opts = RouterOptions {
        redirect_https_port: Some(8443),
        ..Default::default()
    };
    let r = router(opts, vec![spec(&["a.test"], "/", vec![b("be", be.addr)])]).await;
    let got = curl(&format!("http://A.test:{}/x?y=1", r.addr.port()), &[]).await;
    assert_eq!(got.status, 308);
    assert_eq!(
        got.header("location").as_deref(),
        Some("https://a.test:8443/x?y=1")
    );
    let got = curl(&format!("http://other.test:{}/", r.addr.port()), &[]).await;
    assert_eq!(got.status, 404);
}

#[tokio::test]
async fn an_open_tls_connection_survives_a_certificate_change() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = TestCa::new();
    let certs = TempDir::new("certs-keep");
    ca.issue(&certs.0, "keep", &["keep.test"]);
    let (store, _) = load_cert_dir(&certs.0).unwrap();
    let resolver = Arc::new(CertResolver::new(store));
    let watcher = tokio::spawn(watch_cert_dir(
        certs.0.clone(),
        resolver.clone(),
        Duration::from_millis(200),
    ));
    let be = backend("be").await;
    let mut r = router(
        RouterOptions::default(),
        vec![spec(&["keep.test"], "/", vec![b("be", be.addr)])],
    )
    .await;
    let https = r.add_https(server_config(resolver.clone()).unwrap()).await;

    // A real TLS client (rustls) trusting the test CA.
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca.ca_path()).unwrap();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("keep.test").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let req = b"GET / HTTP/1.1\r\nHost: keep.test\r\n\r\n";
    let mut buf = vec![0u8; 8192];
    tls.write_all(req).await.unwrap();
    let n = tls.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    // Replace the certificate (new key) and wait for the reload.
    std::fs::remove_file(certs.0.join("keep.pem")).unwrap();
    std::fs::remove_file(certs.0.join("keep.key")).unwrap();
    ca.issue(&certs.0, "keep", &["keep.test", "other.keep.test"]);
    let reloaded = eventually(Duration::from_secs(5), async || {
        resolver.names().iter().any(|(n, _)| n == "other.keep.test")
    })
    .await;
    assert!(reloaded, "certificate change not picked up");
    // The open connection carries on.
    tls.write_all(req).await.unwrap();
    let n = tls.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    watcher.abort();
}

#[tokio::test]
async fn https_http1_requests_with_both_lengths_get_400_and_h2_is_untouched() {
    let ca = TestCa::new();
    let certs = TempDir::new("certs-cl-te");
    ca.issue(&certs.0, "a", &["a.test"]);
    let (store, _) = load_cert_dir(&certs.0).unwrap();
    let resolver = Arc::new(CertResolver::new(store));
    let be = backend("be").await;
    let mut r = router(
        RouterOptions::default(),
        vec![spec(&["a.test"], "/", vec![b("be", be.addr)])],
    )
    .await;
    let https = r.add_https(server_config(resolver).unwrap()).await;
    let ca_path = ca.ca_path();
    let cacert = ca_path.to_str().unwrap();
    let u = format!("https://a.test:{}/", https.port());
    // curl sends both headers as given, the body chunked.
    let got = curl(
        &u,
        &[
            "--cacert",
            cacert,
            "--http1.1",
            "--data-binary",
            "hello",
            "-H",
            "Content-Length: 5",
            "-H",
            "Transfer-Encoding: chunked",
        ],
    )
    .await;
    assert!(got.head.starts_with("HTTP/1.1 400"), "{got:?}");
    assert_eq!(be.hits.load(std::sync::atomic::Ordering::Relaxed), 0);
    // h2 (by ALPN) has no such framing; its requests pass as before.
    let got = curl(&u, &["--cacert", cacert, "--data-binary", "hello"]).await;
    assert!(got.head.starts_with("HTTP/2 200"), "{got:?}");
    assert!(got.body.contains("body-bytes=5"), "{}", got.body);
}
