//! The router end to end: real backends on loopback, real clients.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portless_router::{BackendState, RouterOptions, Scheme};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn url(r: &TestRouter, host: &str, path: &str) -> String {
    format!("http://{host}:{}{path}", r.addr.port())
}

#[tokio::test]
async fn routes_by_exact_host_wildcard_and_longest_path() {
    let (shop, api, wild) = (
        backend("shop").await,
        backend("api").await,
        backend("wild").await,
    );
    let r = router(
        RouterOptions::default(),
        vec![
            spec(&["shop.example.test"], "/", vec![b("shop", shop.addr)]),
            spec(&["shop.example.test"], "/api", vec![b("api", api.addr)]),
            spec(&["*.example.test"], "/", vec![b("wild", wild.addr)]),
        ],
    )
    .await;
    let got = curl(&url(&r, "shop.example.test", "/"), &[]).await;
    assert_eq!(
        (got.status, got.header("x-backend").as_deref()),
        (200, Some("shop"))
    );
    let got = curl(&url(&r, "SHOP.example.test.", "/api/v1?q=1"), &[]).await;
    assert_eq!(got.header("x-backend").as_deref(), Some("api"));
    assert!(got.body.contains("uri=/api/v1?q=1"), "{}", got.body);
    let got = curl(&url(&r, "shop.example.test", "/apiary"), &[]).await;
    assert_eq!(got.header("x-backend").as_deref(), Some("shop"));
    let got = curl(&url(&r, "blog.example.test", "/"), &[]).await;
    assert_eq!(got.header("x-backend").as_deref(), Some("wild"));
    // Host passes unchanged, port included.
    assert!(
        got.body
            .contains(&format!("host: blog.example.test:{}", r.addr.port())),
        "{}",
        got.body
    );
}

#[tokio::test]
async fn unknown_host_gets_a_plain_404_that_reveals_nothing() {
    let shop = backend("shop").await;
    let r = router(
        RouterOptions::default(),
        vec![spec(&["shop.test"], "/", vec![b("shop", shop.addr)])],
    )
    .await;
    let got = curl(&url(&r, "other.test", "/"), &[]).await;
    assert_eq!(got.status, 404);
    assert_eq!(got.body, "404 Not Found\n");
    // A request naming a backend address directly still routes by host.
    let raw_req = format!(
        "GET http://{}/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        shop.addr, shop.addr
    );
    let out = raw(r.addr, raw_req.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    assert_eq!(shop.hits.load(std::sync::atomic::Ordering::Relaxed), 0);
    // An absolute-form URI routes by its own host, and the backend sees
    // that host (a Host header that disagrees gets 400: see
    // tests/hostile_input.rs).
    let abs = "GET http://shop.test/x HTTP/1.1\r\nHost: Shop.test\r\nConnection: close\r\n\r\n";
    let out = raw(r.addr, abs.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("host: shop.test\n"), "{out}");
    let out = raw(
        r.addr,
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
}

#[tokio::test]
async fn no_backend_is_503_refused_connect_is_502_slow_backend_is_504() {
    let slow = backend("slow").await;
    let mut draining = b("d", slow.addr);
    draining.state = BackendState::Draining;
    let opts = RouterOptions {
        upstream_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let r = router(
        opts,
        vec![
            spec(&["none.test"], "/", vec![]),
            spec(&["draining.test"], "/", vec![draining]),
            spec(&["dead.test"], "/", vec![b("dead", dead_addr().await)]),
            spec(&["slow.test"], "/", vec![b("slow", slow.addr)]),
        ],
    )
    .await;
    assert_eq!(curl(&url(&r, "none.test", "/"), &[]).await.status, 503);
    assert_eq!(curl(&url(&r, "draining.test", "/"), &[]).await.status, 503);
    assert_eq!(curl(&url(&r, "dead.test", "/"), &[]).await.status, 502);
    assert_eq!(curl(&url(&r, "slow.test", "/slow"), &[]).await.status, 504);
    assert_eq!(curl(&url(&r, "slow.test", "/"), &[]).await.status, 200);
}

#[tokio::test]
async fn idempotent_requests_retry_past_a_dead_backend_which_is_then_ejected() {
    let live = backend("live").await;
    let dead = dead_addr().await;
    let r = router(
        RouterOptions::default(),
        vec![spec(
            &["a.test"],
            "/",
            vec![b("dead", dead), b("live", live.addr)],
        )],
    )
    .await;
    for _ in 0..6 {
        let got = curl(&url(&r, "a.test", "/"), &[]).await;
        assert_eq!(
            (got.status, got.header("x-backend").as_deref()),
            (200, Some("live"))
        );
    }
    let status = r.router.status();
    let dead_b = status[0].backends.iter().find(|b| b.id == "dead").unwrap();
    assert_eq!(dead_b.state, "ejected");
    // Ejected: one connect failure, not one per request.
    assert_eq!(dead_b.connect_failures, 1);
    // A POST with a body is not retried; while "dead" is ejected it is not
    // even tried, so it succeeds too.
    let got = curl(&url(&r, "a.test", "/"), &["-d", "x=1"]).await;
    assert_eq!(got.status, 200);
}

#[tokio::test]
async fn round_robin_spreads_evenly_and_health_states_count() {
    let (a, bb, c) = (backend("a").await, backend("b").await, backend("c").await);
    let mut starting = b("c", c.addr);
    starting.state = BackendState::Starting;
    let mut unhealthy = b("u", c.addr);
    unhealthy.state = BackendState::Unhealthy;
    let r = router(
        RouterOptions::default(),
        vec![spec(
            &["a.test"],
            "/",
            vec![b("a", a.addr), b("b", bb.addr), starting, unhealthy],
        )],
    )
    .await;
    // One curl, many requests on one keep-alive connection.
    let u = url(&r, "a.test", "/");
    let urls: Vec<&str> = std::iter::repeat_n(u.as_str(), 40).collect();
    let _ = curl(&u, &urls).await;
    let (ha, hb, hc) = (
        a.hits.load(std::sync::atomic::Ordering::Relaxed),
        bb.hits.load(std::sync::atomic::Ordering::Relaxed),
        c.hits.load(std::sync::atomic::Ordering::Relaxed),
    );
    assert_eq!(ha + hb, 41);
    assert!(ha.abs_diff(hb) <= 1, "{ha} vs {hb}");
    assert_eq!(
        hc, 0,
        "starting/unhealthy got traffic while healthy ones exist"
    );
    // With no healthy backend left, the starting one serves.
    let mut starting = b("c", c.addr);
    starting.state = BackendState::Starting;
    r.router
        .update(vec![spec(&["a.test"], "/", vec![starting])]);
    assert_eq!(
        curl(&u, &[]).await.header("x-backend").as_deref(),
        Some("c")
    );
}

#[tokio::test]
async fn forwarded_headers_are_replaced_from_untrusted_clients_and_appended_from_trusted() {
    let be = backend("be").await;
    let specs = || vec![spec(&["a.test"], "/", vec![b("be", be.addr)])];
    let spoof = [
        "-H",
        "X-Forwarded-For: 6.6.6.6",
        "-H",
        "Forwarded: for=6.6.6.6",
        "-H",
        "X-Forwarded-Proto: https",
    ];
    let r = router(RouterOptions::default(), specs()).await;
    let got = curl(&url(&r, "a.test", "/"), &spoof).await;
    assert!(
        got.body.contains("x-forwarded-for: 127.0.0.1\n"),
        "{}",
        got.body
    );
    assert!(
        got.body.contains("x-forwarded-proto: http\n"),
        "{}",
        got.body
    );
    assert!(
        got.body
            .contains(&format!("x-forwarded-host: a.test:{}\n", r.addr.port())),
        "{}",
        got.body
    );
    assert!(!got.body.contains("6.6.6.6"), "{}", got.body);

    let trusted = RouterOptions {
        trusted_proxies: vec!["127.0.0.0/8".parse().unwrap()],
        ..Default::default()
    };
    let r = router(trusted, specs()).await;
    let got = curl(&url(&r, "a.test", "/"), &spoof).await;
    assert!(
        got.body.contains("x-forwarded-for: 6.6.6.6, 127.0.0.1\n"),
        "{}",
        got.body
    );
    assert!(
        got.body.contains("x-forwarded-proto: https\n"),
        "{}",
        got.body
    );
    assert!(
        got.body
            .contains("forwarded: for=6.6.6.6, for=127.0.0.1;proto=http"),
        "{}",
        got.body
    );
}

#[tokio::test]
async fn hop_by_hop_headers_do_not_reach_the_backend() {
    let be = backend("be").await;
    let r = router(
        RouterOptions::default(),
        vec![spec(&["a.test"], "/", vec![b("be", be.addr)])],
    )
    .await;
    let got = curl(
        &url(&r, "a.test", "/"),
        &[
            "-H",
            "Connection: keep-alive, X-Secret",
            "-H",
            "X-Secret: 1",
            "-H",
            "Keep-Alive: timeout=5",
            "-H",
            "Proxy-Authorization: x",
            "-H",
            "X-App: kept",
        ],
    )
    .await;
    for h in [
        "x-secret",
        "keep-alive",
        "proxy-authorization",
        "connection",
    ] {
        assert!(
            !got.body.contains(&format!("\n{h}:")),
            "{h} leaked: {}",
            got.body
        );
    }
    assert!(got.body.contains("x-app: kept"));
}

#[tokio::test]
async fn http2_prior_knowledge_from_clients_and_h2c_backends_keep_trailers() {
    let be = backend("grpc").await;
    let mut h2 = b("grpc", be.addr);
    h2.scheme = Scheme::H2c;
    let r = router(
        RouterOptions::default(),
        vec![
            spec(&["h1.test"], "/", vec![b("h1", be.addr)]),
            spec(&["grpc.test"], "/", vec![h2]),
        ],
    )
    .await;
    // curl speaking h2c with prior knowledge to an HTTP/1.1 backend.
    let got = curl(&url(&r, "h1.test", "/"), &["--http2-prior-knowledge"]).await;
    assert!(got.head.starts_with("HTTP/2 200"), "{}", got.head);
    assert!(got.body.contains("version=HTTP/1.1"), "{}", got.body);
    assert!(
        got.body
            .contains(&format!("host: h1.test:{}", r.addr.port())),
        "{}",
        got.body
    );

    // An HTTP/2 client to an h2c backend: trailers arrive intact.
    let stream = TcpStream::connect(r.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(format!("http://grpc.test:{}/trailers", r.addr.port()))
        .header("te", "trailers")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers forwarded");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), "hello trailers");
    // The h2c backend saw the client's host as :authority, over HTTP/2.
    let req = http::Request::builder()
        .uri(format!("http://grpc.test:{}/echo", r.addr.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let body = send
        .send_request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("version=HTTP/2.0"), "{body}");
    assert!(
        body.contains(&format!("uri=http://grpc.test:{}/echo", r.addr.port())),
        "{body}"
    );
}

#[tokio::test]
async fn websocket_echoes_both_ways_and_survives_a_route_change() {
    let (one, two) = (backend("one").await, backend("two").await);
    let r = router(
        RouterOptions::default(),
        vec![spec(&["ws.test"], "/", vec![b("one", one.addr)])],
    )
    .await;
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    s.write_all(b"ping").await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"one:ping");
    // Replace the route: the open tunnel stays with its backend.
    r.router
        .update(vec![spec(&["ws.test"], "/", vec![b("two", two.addr)])]);
    assert_eq!(
        curl(&url(&r, "ws.test", "/"), &[])
            .await
            .header("x-backend")
            .as_deref(),
        Some("two")
    );
    s.write_all(b"again").await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"one:again");
    r.router.update(vec![]);
    s.write_all(b"still").await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"one:still");
}

#[tokio::test]
async fn hostile_requests_get_431_413_400_and_slow_headers_time_out() {
    let be = backend("be").await;
    let opts = RouterOptions {
        header_read_timeout: Duration::from_millis(500),
        max_header_bytes: 16 * 1024,
        max_body_bytes: Some(1000),
        ..Default::default()
    };
    let r = router(opts, vec![spec(&["a.test"], "/", vec![b("be", be.addr)])]).await;
    let big = format!("X-Big: {}", "a".repeat(20_000));
    assert_eq!(
        curl(&url(&r, "a.test", "/"), &["-H", &big]).await.status,
        431
    );
    let body = "x".repeat(2000);
    assert_eq!(
        curl(&url(&r, "a.test", "/"), &["--data-binary", &body])
            .await
            .status,
        413
    );
    // Chunked (no Content-Length): the limit still holds.
    let got = curl(
        &url(&r, "a.test", "/"),
        &["--data-binary", &body, "-H", "Transfer-Encoding: chunked"],
    )
    .await;
    assert_eq!(got.status, 413, "{got:?}");
    assert_eq!(
        curl(&url(&r, "a.test", "/"), &["--data-binary", "small"])
            .await
            .status,
        200
    );
    // Conflicting Content-Length and Transfer-Encoding: 400, and nothing
    // behind it is served.
    let smuggle = b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /second HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let out = raw(r.addr, smuggle, Duration::from_secs(3)).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(out.matches("HTTP/1.1").count(), 1, "{out}");
    // Bad Transfer-Encoding: 400.
    let out = raw(
        r.addr,
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // Slow headers: the connection is closed after the timeout.
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a.te").await.unwrap();
    let start = std::time::Instant::now();
    let mut sink = Vec::new();
    let res = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
    assert!(res.is_ok(), "slow client was not cut off");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(be.hits.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// Send raw bytes on a new connection; the reply, and whether the router
/// closed the connection (rather than the wait running out).
async fn raw_closed(addr: std::net::SocketAddr, bytes: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out))
        .await
        .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

#[tokio::test]
async fn content_length_with_transfer_encoding_gets_400_and_a_closed_connection() {
    let be = backend("be").await;
    let r = router(
        RouterOptions::default(),
        vec![spec(&["a.test"], "/", vec![b("be", be.addr)])],
    )
    .await;
    for req in [
        &b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\ncontent-length: 4\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        // The same, with the request after it a backend would see if the
        // two framings were read differently.
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\nGET /second HTTP/1.1\r\nHost: a.test\r\n\r\n",
    ] {
        let (out, closed) = raw_closed(r.addr, req).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        assert!(out.to_lowercase().contains("connection: close"), "{out}");
        assert_eq!(out.matches("HTTP/1.1").count(), 1, "{out}");
        assert!(closed, "connection left open: {out}");
    }
    assert_eq!(be.hits.load(std::sync::atomic::Ordering::Relaxed), 0);
    let m = r.router.metrics();
    let unrouted = m.routes.iter().find(|s| s.route.is_empty()).unwrap();
    assert_eq!(unrouted.by_class[3], 3, "{m:?}");
}

#[tokio::test]
async fn a_keep_alive_connection_serves_then_refuses_the_conflicting_request() {
    let be = backend("be").await;
    let r = router(
        RouterOptions::default(),
        vec![spec(&["a.test"], "/", vec![b("be", be.addr)])],
    )
    .await;
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"POST /first HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    s.write_all(b"POST /second HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest))
        .await
        .is_ok();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 400"), "{rest}");
    assert!(closed, "connection left open");
    assert_eq!(be.hits.load(std::sync::atomic::Ordering::Relaxed), 1);

    // Pipelined: a GET, a chunked POST with extensions and trailers, a
    // POST whose body reads like a conflicting request, then one that is.
    let decoy = "GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    let pipelined = format!(
        "GET /1 HTTP/1.1\r\nHost: a.test\r\n\r\n\
         POST /2 HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x};ext=1\r\n{decoy}\r\n0\r\nX-Trailer: t\r\n\r\n\
         POST /3 HTTP/1.1\r\nHost: a.test\r\nContent-Length: {}\r\n\r\n{decoy}\
         POST /4 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
         GET /5 HTTP/1.1\r\nHost: a.test\r\n\r\n",
        decoy.len(),
        decoy.len()
    );
    let (out, closed) = raw_closed(r.addr, pipelined.as_bytes()).await;
    let statuses: Vec<&str> = out
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &out[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "200", "200", "400"], "{out}");
    assert!(
        out.contains(&format!("body-bytes={}", decoy.len())),
        "{out}"
    );
    assert!(closed);
    assert_eq!(be.hits.load(std::sync::atomic::Ordering::Relaxed), 4);
}

#[tokio::test]
async fn chunked_and_sized_posts_still_pass() {
    let be = backend("be").await;
    let r = router(
        RouterOptions::default(),
        vec![spec(&["a.test"], "/", vec![b("be", be.addr)])],
    )
    .await;
    let u = url(&r, "a.test", "/");
    let got = curl(&u, &["--data-binary", "hello"]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert!(got.body.contains("body-bytes=5"), "{}", got.body);
    let got = curl(
        &u,
        &["--data-binary", "hello", "-H", "Transfer-Encoding: chunked"],
    )
    .await;
    assert_eq!(got.status, 200, "{got:?}");
    assert!(got.body.contains("body-bytes=5"), "{}", got.body);
    assert!(
        got.body.contains("transfer-encoding: chunked"),
        "{}",
        got.body
    );
    // Both on one connection, twice.
    let got = curl(
        &u,
        &[
            "--data-binary",
            "abc",
            &u,
            "--next",
            "--data-binary",
            "defg",
            "-H",
            "Transfer-Encoding: chunked",
            &u,
        ],
    )
    .await;
    assert!(got.body.contains("body-bytes=4"), "{}", got.body);
}

#[tokio::test]
async fn a_refused_upgrade_does_not_hide_the_conflicting_request_behind_it() {
    let be = backend("be").await;
    let r = router(
        RouterOptions::default(),
        vec![spec(&["a.test"], "/", vec![b("be", be.addr)])],
    )
    .await;
    // The backend answers this upgrade with a plain 200 (only /ws
    // switches), so the bytes after it are requests again.
    let stream = b"GET /no-ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\
        CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n\
        POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
        GET /after HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let (out, closed) = raw_closed(r.addr, stream).await;
    let statuses: Vec<&str> = out
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &out[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "405", "400"], "{out}");
    assert!(closed);
    assert_eq!(be.hits.load(std::sync::atomic::Ordering::Relaxed), 1);
    // An accepted upgrade is a tunnel: what follows is not read as HTTP.
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 101"));
    let tunnelled = b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
    s.write_all(tunnelled).await.unwrap();
    let mut got = Vec::new();
    while got.len() < tunnelled.len() + 3 {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "tunnel closed");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(&got[3..], tunnelled);
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_set_the_client_address() {
    use portless_router::proxy_protocol::{encode_v1, encode_v2};
    let be = backend("be").await;
    let opts = RouterOptions {
        proxy_protocol: true,
        ..Default::default()
    };
    let r = router(opts, vec![spec(&["a.test"], "/", vec![b("be", be.addr)])]).await;
    let req = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 198.51.100.1\r\nConnection: close\r\n\r\n";
    for (enc, src) in [
        (encode_v1 as fn(_, _) -> Vec<u8>, "203.0.113.7:4000"),
        (encode_v2, "[2001:db8::7]:4000"),
    ] {
        let mut bytes = enc(src.parse().unwrap(), r.addr);
        bytes.extend_from_slice(req);
        let out = raw(r.addr, &bytes, Duration::from_secs(5)).await;
        let ip = src.rsplit_once(':').unwrap().0.trim_matches(['[', ']']);
        // The PROXY sender is trusted: its X-Forwarded-For is kept.
        assert!(
            out.contains(&format!("x-forwarded-for: 198.51.100.1, {ip}\n")),
            "{out}"
        );
    }
    // curl's own PROXY v1 support.
    let got = curl(&url(&r, "a.test", "/"), &["--haproxy-protocol"]).await;
    assert_eq!(got.status, 200);
    // Without a PROXY header the connection is dropped.
    let out = raw(r.addr, req, Duration::from_secs(5)).await;
    assert_eq!(out, "");
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_class() {
    let be = backend("be").await;
    let r = router(
        RouterOptions::default(),
        vec![spec(&["a.test"], "/", vec![b("be", be.addr)])],
    )
    .await;
    curl(&url(&r, "a.test", "/"), &[]).await;
    curl(&url(&r, "nope.test", "/"), &[]).await;
    let out = r.router.metrics();
    let class = |route: &str, i: usize| {
        out.routes
            .iter()
            .find(|s| s.route == route)
            .map(|s| s.by_class[i])
    };
    assert_eq!(class("a.test/", 1), Some(1), "{out:?}");
    assert_eq!(class("", 3), Some(1), "{out:?}");
    assert_eq!(out.connections_total, 2, "{out:?}");
}

/// Load: `workers` clients in a loop, each on its own keep-alive
/// connection, until `stop`; returns (ok, failed, failures seen).
async fn load(
    addr: std::net::SocketAddr,
    host: &'static str,
    workers: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (u64, u64, Vec<String>) {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let stop = stop.clone();
        set.spawn(async move {
            let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .build_http::<Empty<Bytes>>();
            let (mut ok, mut failed, mut seen) = (0u64, 0u64, Vec::new());
            while !*stop.borrow() {
                let req = http::Request::builder()
                    .uri(format!("http://{addr}/"))
                    .header("host", host)
                    .body(Empty::new())
                    .unwrap();
                match client.request(req).await {
                    Ok(resp) if resp.status() == 200 => {
                        let _ = resp.into_body().collect().await;
                        ok += 1;
                    }
                    Ok(resp) => {
                        failed += 1;
                        seen.push(resp.status().to_string());
                    }
                    Err(e) => {
                        failed += 1;
                        seen.push(e.to_string());
                    }
                }
            }
            (ok, failed, seen)
        });
    }
    let mut total = (0, 0, Vec::new());
    while let Some(Ok((ok, failed, seen))) = set.join_next().await {
        total.0 += ok;
        total.1 += failed;
        total.2.extend(seen);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_replacement_of_three_replicas_under_load_fails_no_request() {
    let names = ["old1", "old2", "old3", "new1", "new2", "new3"];
    let mut old = Vec::new();
    for n in &names[..3] {
        old.push(backend(n).await);
    }
    let mut live: Vec<(String, std::net::SocketAddr, BackendState)> = old
        .iter()
        .map(|t| (t.name.to_owned(), t.addr, BackendState::Healthy))
        .collect();
    let table = |live: &Vec<(String, std::net::SocketAddr, BackendState)>| {
        let backends = live
            .iter()
            .map(|(id, addr, st)| {
                let mut x = b(id, *addr);
                x.state = *st;
                x
            })
            .collect();
        vec![spec(&["roll.test"], "/", backends)]
    };
    let r = router(RouterOptions::default(), table(&live)).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let loader = tokio::spawn(load(r.addr, "roll.test", 8, stop_rx));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut new = Vec::new();
    for (i, old_b) in old.into_iter().enumerate() {
        // Docker order: the new container starts, the old one is told to
        // stop (draining), then its process exits.
        let nb = backend(names[3 + i]).await;
        live.push((nb.name.to_owned(), nb.addr, BackendState::Healthy));
        new.push(nb);
        r.router.update(table(&live));
        tokio::time::sleep(Duration::from_millis(200)).await;
        live[i].2 = BackendState::Draining;
        r.router.update(table(&live));
        old_b.graceful_stop().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The stopped ones leave the catalog.
    live.retain(|(_, _, st)| *st != BackendState::Draining);
    r.router.update(table(&live));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_tx.send(true).unwrap();
    let (ok, failed, seen) = loader.await.unwrap();
    assert!(ok > 100, "too little load: {ok}");
    assert_eq!(failed, 0, "{ok} ok, {failed} failed: {seen:?}");
    assert!(
        new.iter()
            .all(|n| n.hits.load(std::sync::atomic::Ordering::Relaxed) > 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_without_warning_fails_no_idempotent_request() {
    let (a, bb) = (backend("a").await, backend("b").await);
    let r = router(
        RouterOptions::default(),
        vec![spec(
            &["kill.test"],
            "/",
            vec![b("a", a.addr), b("b", bb.addr)],
        )],
    )
    .await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let loader = tokio::spawn(load(r.addr, "kill.test", 8, stop_rx));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Every connection reset, the port closed, no draining first.
    drop(a);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(true).unwrap();
    let (ok, failed, seen) = loader.await.unwrap();
    assert!(ok > 100, "too little load: {ok}");
    assert_eq!(failed, 0, "{ok} ok, {failed} failed: {seen:?}");
    let st = r.router.status();
    assert_eq!(st[0].backends[0].state, "ejected");
}

#[tokio::test]
async fn spawned_threads_share_one_table_and_refuse_a_port_in_use() {
    let be = backend("be").await;
    let r = portless_router::Router::new(RouterOptions::default());
    r.update(vec![spec(&["t.test"], "/", vec![b("be", be.addr)])]);
    let listeners = portless_router::bind_reuseport("127.0.0.1:0".parse().unwrap(), 2).unwrap();
    let addr = listeners[0].local_addr().unwrap();
    assert_eq!(listeners[1].local_addr().unwrap(), addr);
    // The port is now served: binding it again is refused.
    assert!(portless_router::bind_reuseport(addr, 2).is_err());
    let threads = r.spawn_threads(listeners, Vec::new(), None).unwrap();
    let u = format!("http://t.test:{}/", addr.port());
    for _ in 0..4 {
        assert_eq!(
            curl(&u, &[]).await.header("x-backend").as_deref(),
            Some("be")
        );
    }
    // A table update reaches every thread.
    r.update(vec![]);
    for _ in 0..4 {
        assert_eq!(curl(&u, &[]).await.status, 404);
    }
    threads.stop();
    assert_eq!(curl(&u, &[]).await.status, 0, "still serving after stop");
}

#[tokio::test]
async fn unspecified_v6_listener_takes_ipv4_too() {
    let Ok(ls) = portless_router::bind_reuseport("[::]:0".parse().unwrap(), 1) else {
        // No IPv6 on this host: nothing to check.
        return;
    };
    let port = ls[0].local_addr().unwrap().port();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
}

#[tokio::test]
async fn a_streaming_response_finishes_after_its_route_is_removed() {
    let be = backend("be").await;
    let r = router(
        RouterOptions::default(),
        vec![spec(&["s.test"], "/", vec![b("be", be.addr)])],
    )
    .await;
    let stream = TcpStream::connect(r.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("/stream")
        .header("host", "s.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let mut body = send.send_request(req).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "chunk 0\n");
    // The route goes away mid-stream; the response still completes.
    r.router.update(vec![]);
    assert_eq!(curl(&url(&r, "s.test", "/"), &[]).await.status, 404);
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(
        rest.ends_with(b"chunk 9\n"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
}

#[tokio::test]
async fn a_post_survives_the_backend_closing_its_idle_pooled_connection() {
    // The backend drops keep-alive connections after 200 ms idle; the
    // router's pooled connection is then closed under it. A POST (not
    // idempotent, with a body) must still go through: the pool notices the
    // closed connection, or hyper hands back the unsent request.
    let be = support::backend_with_idle("be", Some(Duration::from_millis(200))).await;
    let r = router(
        RouterOptions::default(),
        vec![spec(&["idle.test"], "/", vec![b("be", be.addr)])],
    )
    .await;
    let u = url(&r, "idle.test", "/");
    for _ in 0..5 {
        let got = curl(&u, &["--data-binary", "payload"]).await;
        assert_eq!(got.status, 200, "{got:?}");
        assert!(got.body.contains("body-bytes=7"), "{}", got.body);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let st = r.router.status();
    assert_eq!(st[0].backends[0].state, "healthy");
}

#[tokio::test]
async fn body_limit_gives_413_towards_h2c_backends_too() {
    let be = backend("grpc").await;
    let mut h2 = b("grpc", be.addr);
    h2.scheme = Scheme::H2c;
    let opts = RouterOptions {
        max_body_bytes: Some(1000),
        ..Default::default()
    };
    let r = router(opts, vec![spec(&["g.test"], "/", vec![h2])]).await;
    let body = "x".repeat(2000);
    let u = url(&r, "g.test", "/");
    assert_eq!(curl(&u, &["--data-binary", &body]).await.status, 413);
    let chunked = curl(
        &u,
        &["--data-binary", &body, "-H", "Transfer-Encoding: chunked"],
    )
    .await;
    assert_eq!(chunked.status, 413, "{chunked:?}");
    assert_eq!(curl(&u, &["--data-binary", "small"]).await.status, 200);
}

/// A client that leaves before its answer comes (closing the connection,
/// or only its sending side) aborts its request: the router closes the
/// backend connection it was using instead of holding it until the backend
/// answers.
#[tokio::test]
async fn a_client_gone_mid_request_aborts_the_backend_request() {
    for half in [false, true] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let r = router(
            RouterOptions::default(),
            vec![spec(&["a.test"], "/", vec![b("be", addr)])],
        )
        .await;
        let mut client = TcpStream::connect(r.addr).await.unwrap();
        client
            .write_all(b"GET /never HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        let (mut up, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("the request reaches the backend")
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = up.read(&mut buf).await.unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("GET /never "),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        if half {
            client.shutdown().await.unwrap();
        } else {
            drop(client);
        }
        let gone = tokio::time::timeout(Duration::from_secs(5), up.read(&mut buf))
            .await
            .expect("backend connection still open 5 s after the client left");
        assert!(matches!(gone, Ok(0) | Err(_)), "{gone:?}");
    }
}

#[tokio::test]
async fn connections_with_no_request_are_closed_whatever_their_protocol() {
    let be = backend("be").await;
    let opts = RouterOptions {
        header_read_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let r = router(opts, vec![spec(&["a.test"], "/", vec![b("be", be.addr)])]).await;
    // Nothing at all, and part of the HTTP/2 preface: hyper's own header
    // timeout starts only once it knows the protocol.
    for sent in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let start = std::time::Instant::now();
        let (_, closed) = raw_closed(r.addr, sent).await;
        assert!(closed, "a connection that sent {sent:?} was kept open");
        assert!(start.elapsed() >= Duration::from_millis(250), "{sent:?}");
    }
    // The whole preface and nothing more: HTTP/2, no request, so GOAWAY
    // (frame type 7) once a header timeout has passed.
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let goaway = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut head = [0u8; 9];
            s.read_exact(&mut head).await?;
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await?;
            if head[3] == 7 {
                return Ok::<_, std::io::Error>(());
            }
        }
    })
    .await;
    assert!(matches!(goaway, Ok(Ok(()))), "no GOAWAY: {goaway:?}");
    assert!(start.elapsed() >= Duration::from_millis(250));
    // An HTTP/2 connection that served a request and then sends nothing
    // more: GOAWAY, then closed.
    let stream = TcpStream::connect(r.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(format!("http://a.test:{}/", r.addr.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection was kept open");
    assert!(send.is_closed());
    // An answer in progress when the connection falls idle is still
    // written whole (the backend takes 3 s; ten header timeouts).
    let got = curl(&url(&r, "a.test", "/slow"), &["--http2-prior-knowledge"]).await;
    assert_eq!((got.status, got.body.as_str()), (200, "slow"), "{got:?}");
    let got = curl(&url(&r, "a.test", "/slow"), &[]).await;
    assert_eq!((got.status, got.body.as_str()), (200, "slow"), "{got:?}");
    // A keep-alive connection that keeps sending requests stays open past
    // several header timeouts.
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    for _ in 0..24 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client socket read at most 64 KiB every 20 ms: a slow link.
struct SlowReader {
    inner: TcpStream,
    delay: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl tokio::io::AsyncRead for SlowReader {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        let this = self.get_mut();
        std::task::ready!(this.delay.as_mut().poll(cx));
        let mut chunk = vec![0u8; 64 * 1024];
        let n = buf.remaining().min(chunk.len());
        let mut small = tokio::io::ReadBuf::new(&mut chunk[..n]);
        std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut small))?;
        buf.put_slice(small.filled());
        let next = tokio::time::Instant::now() + Duration::from_millis(20);
        this.delay.as_mut().reset(next);
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for SlowReader {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn an_http2_client_on_a_slow_link_gets_all_of_its_answer() {
    let be = backend("be").await;
    let opts = RouterOptions {
        header_read_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let r = router(opts, vec![spec(&["a.test"], "/", vec![b("be", be.addr)])]).await;
    // Wide HTTP/2 windows but a slow socket (3.2 MB/s): 8 MiB, more than
    // the kernel's socket buffers take, need about 2.6 s, and the router
    // hands the last of the body to HTTP/2 well before it is all written:
    // the connection has no request in progress for several header
    // timeouts while it is still sending.
    let stream = SlowReader {
        inner: TcpStream::connect(r.addr).await.unwrap(),
        delay: Box::pin(tokio::time::sleep(Duration::ZERO)),
    };
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(8 << 20)
        .adaptive_window(false)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(format!("http://a.test:{}/big", r.addr.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap_or_else(|e| panic!("the answer was cut after {got} bytes: {e}"));
        got += frame.data_ref().map_or(0, |d| d.len());
    }
    assert_eq!(got, 8 << 20);
}

#[tokio::test]
async fn an_open_websocket_counts_as_an_open_connection() {
    let be = backend("be").await;
    let r = router(
        RouterOptions::default(),
        vec![spec(&["ws.test"], "/", vec![b("be", be.addr)])],
    )
    .await;
    let open = |r: &TestRouter| r.router.metrics().open_http;
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 101"));
    s.write_all(b"ping").await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"be:ping");
    // hyper has let go of the connection by now; the tunnel is open.
    assert_eq!(open(&r), 1);
    drop(s);
    assert!(eventually(Duration::from_secs(5), async || open(&r) == 0).await);
}

#[tokio::test]
async fn round_robin_carries_over_table_rebuilds() {
    let (x, y) = (backend("x").await, backend("y").await);
    let specs = || {
        vec![
            spec(&["a.test"], "/", vec![b("x", x.addr), b("y", y.addr)]),
            spec(&["other.test"], "/", vec![b("x", x.addr)]),
        ]
    };
    let r = router(RouterOptions::default(), specs()).await;
    // A rebuild (as any container event makes) between every request: the
    // requests still alternate instead of all going to the first backend.
    let mut seen = Vec::new();
    for _ in 0..6 {
        r.router.update(specs());
        let got = curl(&url(&r, "a.test", "/"), &[]).await;
        seen.push(got.header("x-backend").unwrap());
    }
    let xs = seen.iter().filter(|n| *n == "x").count();
    assert_eq!(xs, 3, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] != w[1]), "{seen:?}");
}
