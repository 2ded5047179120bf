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
