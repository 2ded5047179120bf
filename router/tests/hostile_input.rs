//! What the outside audit of issue 12 found, each reproduced from outside:
//! real backends on loopback, real clients (raw TCP, curl).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use portless_router::RouterOptions;
use support::*;

#[tokio::test]
async fn two_host_headers_or_a_host_disagreeing_with_the_target_get_400() {
    let (a, bb) = (backend("a").await, backend("b").await);
    let r = router(
        RouterOptions::default(),
        vec![
            spec(&["a.example.test"], "/", vec![b("a", a.addr)]),
            spec(&["b.example.test"], "/", vec![b("b", bb.addr)]),
        ],
    )
    .await;
    let wait = Duration::from_secs(3);
    for req in [
        &b"GET / HTTP/1.1\r\nHost: a.example.test\r\nHost: b.example.test\r\nConnection: close\r\n\r\n"[..],
        // The same name twice is still two Host headers (RFC 9112 3.2).
        b"GET / HTTP/1.1\r\nHost: a.example.test\r\nHost: a.example.test\r\nConnection: close\r\n\r\n",
        b"GET http://a.example.test/ HTTP/1.1\r\nHost: b.example.test\r\nConnection: close\r\n\r\n",
        b"GET http://a.example.test:8080/ HTTP/1.1\r\nHost: a.example.test\r\nConnection: close\r\n\r\n",
    ] {
        let out = raw(r.addr, req, wait).await;
        assert!(
            out.starts_with("HTTP/1.1 400"),
            "{}\n=> {out}",
            String::from_utf8_lossy(req)
        );
    }
    assert_eq!(a.hits.load(Relaxed) + bb.hits.load(Relaxed), 0);
    // Agreeing forms still pass: case, a trailing dot and the default port
    // name the same host.
    for req in [
        &b"GET http://a.example.test/ HTTP/1.1\r\nHost: A.example.test.\r\nConnection: close\r\n\r\n"[..],
        b"GET http://a.example.test:80/ HTTP/1.1\r\nHost: a.example.test\r\nConnection: close\r\n\r\n",
        b"GET http://a.example.test/ HTTP/1.1\r\nConnection: close\r\n\r\n",
    ] {
        let out = raw(r.addr, req, wait).await;
        assert!(
            out.starts_with("HTTP/1.1 200"),
            "{}\n=> {out}",
            String::from_utf8_lossy(req)
        );
        assert!(out.contains("backend=a\n"), "{out}");
    }
}

#[tokio::test]
async fn only_websocket_upgrades_are_tunnelled_h2c_and_others_go_as_plain_http() {
    let be = backend("be").await;
    let r = router(
        RouterOptions::default(),
        vec![spec(&["a.test"], "/", vec![b("be", be.addr)])],
    )
    .await;
    let wait = Duration::from_secs(3);
    for token in ["h2c", "TLS/1.2", "foo"] {
        // The backend sees a plain request: no Upgrade, nothing Connection
        // named, and its answer is an ordinary one.
        let req = format!(
            "GET / HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {token}\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        );
        let (out, _) = raw_until(r.addr, req.as_bytes(), "body-bytes=", wait).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{token}: {out}");
        let lower = out.to_ascii_lowercase();
        assert!(!lower.contains("upgrade:"), "{token}: {out}");
        assert!(!lower.contains("http2-settings"), "{token}: {out}");
        // A backend that switches anyway (/ws answers 101 to anything) is
        // not tunnelled to: the client gets an error, not a raw stream.
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: {token}\r\n\r\n"
        );
        let (out, _) = raw_until(r.addr, req.as_bytes(), "\r\n\r\n", wait).await;
        assert!(out.starts_with("HTTP/1.1 502"), "{token}: {out}");
    }
    // A WebSocket handshake still switches, with its Upgrade as asked.
    let req = b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n";
    let (out, mut s) = raw_until(r.addr, req, "\r\n\r\n", wait).await;
    assert!(out.starts_with("HTTP/1.1 101"), "{out}");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(wait, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"be:ping");
}

#[tokio::test]
async fn an_http2_header_block_over_the_limit_gets_431_once() {
    let be = backend("be").await;
    let opts = RouterOptions {
        max_header_bytes: 16 * 1024,
        ..Default::default()
    };
    let r = router(opts, vec![spec(&["a.test"], "/", vec![b("be", be.addr)])]).await;
    // One large field, and many fields over several CONTINUATION frames
    // (h2 used to end that connection with GOAWAY, which clients read as
    // "not processed, retry"). Both under curl's own 64 KiB send limit:
    // past it, curl refuses the stream itself and retries without sending.
    let one = vec![format!("X-Big: {}", "a".repeat(20_000))];
    let many: Vec<String> = (0..12)
        .map(|i| format!("X-Big-{i}: {}", "b".repeat(4000)))
        .collect();
    for fields in [one, many] {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args([
            "-sS",
            "-v",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
        ])
        .args(["--http2-prior-knowledge", "-H", "Host: a.test"]);
        for f in &fields {
            cmd.args(["-H", f]);
        }
        let out = cmd
            .arg(format!("http://127.0.0.1:{}/", r.addr.port()))
            .output()
            .await
            .expect("curl runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr: String = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| !l.contains("X-Big") && !l.contains("x-big"))
            .collect::<Vec<_>>()
            .join("\n");
        // One attempt, answered 431: nothing that invites a retry.
        assert_eq!(stdout, "431", "{stderr}");
        assert!(out.status.success(), "{stderr}");
        assert!(!stderr.contains("REFUSED_STREAM"), "{stderr}");
        assert!(!stderr.contains("retry"), "{stderr}");
        assert_eq!(stderr.matches("> GET / HTTP/2").count(), 1, "{stderr}");
    }
    // Under the limit still passes.
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--http2-prior-knowledge",
        ])
        .args([
            "-H",
            "Host: a.test",
            "-H",
            &format!("X-Ok: {}", "c".repeat(8000)),
        ])
        .arg(format!("http://127.0.0.1:{}/", r.addr.port()))
        .output()
        .await
        .expect("curl runs");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    assert_eq!(be.hits.load(Relaxed), 1);
}

#[tokio::test]
async fn a_malformed_or_aborted_request_body_is_the_clients_fault_not_the_backends() {
    let be = backend("be").await;
    let r = router(
        RouterOptions::default(),
        vec![spec(&["a.test"], "/", vec![b("be", be.addr)])],
    )
    .await;
    let wait = Duration::from_secs(3);
    // A bad chunk size, after a good chunk.
    let bad = b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n\r\n";
    let out = raw(r.addr, bad, wait).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // An upload cut short: the client is gone, nothing to answer.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(r.addr).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1000\r\n\r\n0123456789")
            .await
            .unwrap();
        // Let the request reach the backend, then leave.
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(s);
    }
    // Both counted as the client's (4xx), none as the backend's (5xx),
    // and the backend is neither ejected nor charged with a failure.
    let mut out = r.router.metrics();
    assert!(
        eventually(Duration::from_secs(3), async || {
            out = r.router.metrics();
            out.routes[0].route == "a.test/" && out.routes[0].by_class[3] == 2
        })
        .await,
        "{out:?}"
    );
    assert_eq!(out.routes[0].by_class[4], 0, "{out:?}");
    let st = r.router.status();
    assert_eq!(st[0].backends[0].state, "healthy");
    assert_eq!(st[0].backends[0].connect_failures, 0);
    assert_eq!(out.ejections, 0, "{out:?}");
    let fault = |name: &str| {
        out.failures
            .iter()
            .find(|(s, _)| s.as_str() == name)
            .map(|(_, n)| *n)
    };
    assert_eq!(fault("client"), Some(2), "{out:?}");
    assert_eq!(fault("backend"), Some(0), "{out:?}");
    // And the route still serves.
    assert_eq!(
        curl(&format!("http://a.test:{}/", r.addr.port()), &[])
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn x_real_ip_comes_from_the_connection_and_underscore_spellings_are_dropped() {
    let be = backend("be").await;
    let specs = || vec![spec(&["a.test"], "/", vec![b("be", be.addr)])];
    let spoof = [
        "-H",
        "X-Real-IP: 6.6.6.6",
        "-H",
        "X_Forwarded_For: 6.6.6.6",
        "-H",
        "x_real_ip: 6.6.6.6",
        "-H",
        "X_FORWARDED_HOST: evil.test",
        "-H",
        "X-Forwarded-Port: 6666",
        "-H",
        "X-Forwarded_Proto: https",
        "-H",
        "X_Real_Ip: 6.6.6.6",
        "-H",
        "X-App_Id: kept",
    ];
    let r = router(RouterOptions::default(), specs()).await;
    let got = curl(&format!("http://a.test:{}/", r.addr.port()), &spoof).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert!(got.body.contains("x-real-ip: 127.0.0.1\n"), "{}", got.body);
    assert!(
        got.body.contains("x-forwarded-for: 127.0.0.1\n"),
        "{}",
        got.body
    );
    assert!(!got.body.contains("6.6.6.6"), "{}", got.body);
    assert!(!got.body.contains("6666"), "{}", got.body);
    assert!(!got.body.contains("evil.test"), "{}", got.body);
    assert!(!got.body.contains("https"), "{}", got.body);
    // Other names with underscores are the application's business.
    assert!(got.body.contains("x-app_id: kept\n"), "{}", got.body);

    // A trusted proxy's X-Real-IP (and dashed X-Forwarded-*) are kept; an
    // underscore spelling is still dropped, whoever sent it.
    let trusted = RouterOptions {
        trusted_proxies: vec!["127.0.0.0/8".parse().unwrap()],
        ..Default::default()
    };
    let r = router(trusted, specs()).await;
    let got = curl(
        &format!("http://a.test:{}/", r.addr.port()),
        &[
            "-H",
            "X-Real-IP: 203.0.113.9",
            "-H",
            "X-Forwarded-Port: 443",
            "-H",
            "X_Forwarded_For: 6.6.6.6",
        ],
    )
    .await;
    assert!(
        got.body.contains("x-real-ip: 203.0.113.9\n"),
        "{}",
        got.body
    );
    assert!(got.body.contains("x-forwarded-port: 443\n"), "{}", got.body);
    assert!(!got.body.contains("6.6.6.6"), "{}", got.body);
}

#[tokio::test]
async fn idle_pooled_backend_connections_close_on_time_when_traffic_stops() {
    let be = backend("be").await;
    let opts = RouterOptions {
        pool_idle_timeout: Duration::from_millis(400),
        ..Default::default()
    };
    let r = router(opts, vec![spec(&["a.test"], "/", vec![b("be", be.addr)])]).await;
    // Some at once: some pooled connections.
    let u = format!("http://a.test:{}/", r.addr.port());
    let urls = [u.as_str(), "-Z", &u, &u, &u];
    let got = curl(&u, &urls).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert!(be.open.load(Relaxed) >= 1, "{}", be.open.load(Relaxed));
    // No traffic after: they are closed by the idle timeout all the same
    // (checked a quarter of it after, at worst).
    let start = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(3), async || be.open.load(Relaxed) == 0).await,
        "{} backend connections still open",
        be.open.load(Relaxed)
    );
    assert!(start.elapsed() >= Duration::from_millis(300));
    // And the pool still serves.
    assert_eq!(curl(&u, &[]).await.status, 200);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_after_the_send_timeout_and_frees_its_backend() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let be = backend("be").await;
    let opts = RouterOptions {
        send_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let r = router(opts, vec![spec(&["a.test"], "/", vec![b("be", be.addr)])]).await;
    // A small receive window, so that 8 MiB cannot all sit in buffers.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(r.addr).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    // Never read while the answer is being written.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(be.open.load(Relaxed), 1);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    // The router gave up on the client: its backend connection is gone
    // (an answer cut short cannot go back to the pool)...
    assert!(
        eventually(Duration::from_secs(3), async || be.open.load(Relaxed) == 0).await,
        "the backend connection is still held"
    );
    // ...and the client's connection ends before the whole answer.
    let mut got = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection is still open");
    assert!(got.len() < 8 << 20, "{} bytes: the whole answer", got.len());
    // A client that reads slowly but steadily is not cut off: each write
    // progresses within the timeout.
    let mut s = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"GET /stream HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.contains("chunk 9"), "{out}");
}

#[tokio::test]
async fn an_idle_h2c_backend_connection_closes_on_time_too() {
    let be = backend("be").await;
    let opts = RouterOptions {
        pool_idle_timeout: Duration::from_millis(400),
        ..Default::default()
    };
    let mut h2c = b("be", be.addr);
    h2c.scheme = portless_router::Scheme::H2c;
    let r = router(opts, vec![spec(&["a.test"], "/", vec![h2c])]).await;
    let u = format!("http://a.test:{}/", r.addr.port());
    let got = curl(&u, &[]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert!(got.body.contains("version=HTTP/2.0"), "{}", got.body);
    assert_eq!(be.open.load(Relaxed), 1);
    assert!(
        eventually(Duration::from_secs(3), async || be.open.load(Relaxed) == 0).await,
        "the idle h2c connection is still open"
    );
    // The next request opens a new one.
    assert_eq!(curl(&u, &[]).await.status, 200);
}

#[tokio::test]
async fn a_pooled_connection_is_idle_from_the_end_of_its_answer_not_its_start() {
    let be = backend("be").await;
    let opts = RouterOptions {
        pool_idle_timeout: Duration::from_millis(600),
        ..Default::default()
    };
    let r = router(opts, vec![spec(&["a.test"], "/", vec![b("be", be.addr)])]).await;
    // An answer that takes a second, then at once another request: the
    // connection was busy all along, so it is reused, not closed as idle.
    let stream = format!("http://a.test:{}/stream", r.addr.port());
    assert_eq!(curl(&stream, &[]).await.status, 200);
    assert_eq!(
        curl(&format!("http://a.test:{}/", r.addr.port()), &[])
            .await
            .status,
        200
    );
    assert_eq!(be.accepted.load(Relaxed), 1);
}

#[tokio::test]
async fn over_http2_a_host_disagreeing_with_authority_gets_400() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let (a, bb) = (backend("a").await, backend("b").await);
    let r = router(
        RouterOptions::default(),
        vec![
            spec(&["a.example.test"], "/", vec![b("a", a.addr)]),
            spec(&["b.example.test"], "/", vec![b("b", bb.addr)]),
        ],
    )
    .await;
    let stream = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let port = r.addr.port();
    for (host, want) in [
        (format!("b.example.test:{port}"), 400),
        (format!("A.example.test:{port}"), 200),
    ] {
        let req = http::Request::builder()
            .uri(format!("http://a.example.test:{port}/"))
            .header("host", host.as_str())
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, want, "{host}: {}", String::from_utf8_lossy(&body));
    }
    assert_eq!(bb.hits.load(Relaxed), 0);
    assert_eq!(a.hits.load(Relaxed), 1);
}
