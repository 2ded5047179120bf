//! Whatever bytes a client sends, the router stays up, answers only HTTP,
//! closes what it refused, and never forwards to an address outside its
//! table, though requests name that address everywhere a client can.
//! Generated request streams (odd methods, targets in every form, hosts of
//! every shape, conflicting framing, pipelining, bare LF, random bytes,
//! single-byte corruptions) go to a router on loopback with two routed
//! backends and one that is running but in no route.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use portless_router::RouterOptions;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn pick(xs: &'static [&'static str]) -> impl Strategy<Value = String> {
    proptest::sample::select(xs).prop_map(String::from)
}

/// One request as a client might write it, well-formed or not; weighted
/// towards requests the router forwards, so that a run covers the
/// forwarding path and not only refusals.
fn request() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        6 => pick(&["GET", "GET", "HEAD", "POST", "PUT", "OPTIONS", "DELETE"]),
        2 => pick(&["CONNECT", "TRACE", "G\u{0}T", "GET ", "", "PRI"]),
        1 => "[A-Za-z]{1,10}",
    ];
    let target = prop_oneof![
        4 => pick(&["/", "/", "/api/x", "/x?y=z", "http://a.test/", "http://b.test/api"]),
        2 => pick(&[
            "http://HIDDEN/",
            "http://HIDDEN@a.test/",
            "http://a.test@HIDDEN/",
            "https://HIDDEN/",
            "HIDDEN",
            "a.test:80",
            "*",
            "//HIDDEN/",
            "/../../etc/passwd",
            "/%2e%2e/",
            "",
        ]),
        1 => "/[ -~]{0,40}",
    ];
    let version = prop_oneof![
        6 => pick(&["HTTP/1.1", "HTTP/1.0"]),
        1 => pick(&["HTTP/2.0", "HTTP/0.9", "HTTP/9.9", "HTTP/1.1 x", "", "http/1.1"]),
    ];
    let host = prop_oneof![
        6 => pick(&["a.test", "A.TEST:80", "a.test.", "x.wild.test", "b.test"]),
        2 => pick(&[
            "wild.test",
            "HIDDEN",
            "hidden.test",
            "",
            "a.test, HIDDEN",
            "a.test:99999",
            "a.test:",
            "[::1]",
            "127.0.0.1",
            "a.test\u{0}HIDDEN",
            "a..test",
            "*.wild.test",
        ]),
        1 => "[ -~]{0,30}",
    ];
    let header = prop_oneof![
        4 => pick(&["Accept: */*", "User-Agent: t", "X-Trace: 1", "Content-Length: 0"]),
        3 => pick(&[
            "Content-Length: 5",
            "Content-Length: -1",
            "Content-Length: 5, 6",
            "Content-Length: 99999999999999999999",
            "Transfer-Encoding: chunked",
            "Transfer-Encoding: gzip, chunked",
            "Transfer-Encoding: chunked, gzip",
            "Transfer-Encoding: xchunked",
            "Host: HIDDEN",
            "Host: a.test",
            "Connection: upgrade",
            "Connection: close, x-hop",
            "Upgrade: websocket",
            "Upgrade: h2c",
            "HTTP2-Settings: AAMAAABkAAQAAP__",
            "Expect: 100-continue",
            "X-Forwarded-For: 10.0.0.1",
            "Forwarded: for=10.0.0.1;host=HIDDEN",
            "X-Forwarded-Host: HIDDEN",
            " folded continuation",
            "Bad Header: x",
            ":",
            "X-Empty:",
        ]),
        1 => "[!-~&&[^:]]{1,12}: [ -~]{0,40}",
    ];
    let body = prop_oneof![
        6 => Just(Vec::new()),
        1 => Just(b"hello".to_vec()),
        1 => Just(b"5\r\nhello\r\n0\r\n\r\n".to_vec()),
        1 => Just(b"ffffffffffffffffff\r\nx\r\n".to_vec()),
        1 => Just(b"0\r\nTrailer: x\r\n\r\n".to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..64),
    ];
    (
        method,
        target,
        version,
        proptest::option::weighted(0.9, host),
        proptest::collection::vec(header, 0..4),
        body,
        proptest::bool::weighted(0.8),
    )
        .prop_map(|(m, t, v, host, headers, body, crlf)| {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut head = format!("{m} {t} {v}{eol}");
            if let Some(h) = host {
                head.push_str(&format!("Host: {h}{eol}"));
            }
            for h in headers {
                head.push_str(&h);
                head.push_str(eol);
            }
            head.push_str(eol);
            let mut out = head.into_bytes();
            out.extend_from_slice(&body);
            out
        })
}

/// What goes on one connection: requests pipelined, random bytes, or a
/// request with one byte replaced.
fn wire() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => proptest::collection::vec(request(), 1..4).prop_map(|v| v.concat()),
        1 => proptest::collection::vec(any::<u8>(), 0..512),
        2 => (request(), any::<proptest::sample::Index>(), any::<u8>()).prop_map(|(mut r, i, b)| {
            if !r.is_empty() {
                let k = i.index(r.len());
                r[k] = b;
            }
            r
        }),
    ]
}

/// `HIDDEN` in generated bytes stands for the address of the backend
/// outside the table, so that requests name it in every place a client
/// can (Host, absolute-form and CONNECT targets, forwarding headers).
fn with_hidden(bytes: &[u8], hidden: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.starts_with(b"HIDDEN") {
            out.extend_from_slice(hidden.as_bytes());
            rest = &rest[6..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

/// Write the bytes and then a request that asks to close, and read what
/// comes back until the router closes (None: not within 3 s). Write errors
/// are expected: the router may close a connection it refused.
async fn send(addr: std::net::SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let _ = s
        .write_all(b"GET /end HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await {
        Ok(_) => Some(out),
        Err(_) => None,
    }
}

#[test]
fn hostile_bytes_never_stop_the_router_nor_reach_a_backend_outside_the_table() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (be, be_api, hidden, r) = rt.block_on(async {
        let be = backend("be").await;
        let be_api = backend("be-api").await;
        // Running, reachable, and in no route: nothing may ever get here.
        let hidden = backend("hidden").await;
        let opts = RouterOptions {
            header_read_timeout: Duration::from_millis(500),
            upstream_timeout: Duration::from_secs(1),
            max_header_bytes: 8 * 1024,
            max_body_bytes: Some(64 * 1024),
            ..Default::default()
        };
        let r = router(
            opts,
            vec![
                spec(&["a.test", "*.wild.test"], "/", vec![b("be", be.addr)]),
                spec(&["b.test"], "/api", vec![b("be-api", be_api.addr)]),
            ],
        )
        .await;
        (be, be_api, hidden, r)
    });
    let addr = r.addr;
    let hidden_addr = hidden.addr.to_string();
    // Generated connections with at least one generated request answered
    // by a backend; connections the router left open past 3 s.
    let forwarded = std::cell::Cell::new(0u32);
    let hung = std::cell::Cell::new(0u32);
    let total = std::cell::Cell::new(0u32);
    let mut runner = TestRunner::new(Config {
        cases: 2000,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&wire(), |bytes| {
        let bytes = with_hidden(&bytes, &hidden_addr);
        total.set(total.get() + 1);
        let Some(reply) = rt.block_on(send(addr, &bytes)) else {
            hung.set(hung.get() + 1);
            return Ok(());
        };
        // HTTP/1 answers (1.0 to a 1.0 request), or HTTP/2 frames when the
        // bytes began with the HTTP/2 preface; never anything else.
        prop_assert!(
            reply.is_empty()
                || reply.starts_with(b"HTTP/1.1 ")
                || reply.starts_with(b"HTTP/1.0 ")
                || bytes.starts_with(b"PRI * HTTP/2.0"),
            "reply {:?} to {:?}",
            String::from_utf8_lossy(&reply),
            String::from_utf8_lossy(&bytes)
        );
        let text = String::from_utf8_lossy(&reply).to_ascii_lowercase();
        let answered = text.matches("x-backend:").count();
        if answered > usize::from(text.contains("uri=/end")) {
            forwarded.set(forwarded.get() + 1);
        }
        // Still serving, on a new connection.
        let ok = rt
            .block_on(send(addr, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"))
            .unwrap_or_default();
        prop_assert!(
            ok.starts_with(b"HTTP/1.1 200"),
            "router stopped answering after {:?}: {:?}",
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&ok)
        );
        prop_assert_eq!(hidden.hits.load(Relaxed), 0);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert_eq!(hidden.hits.load(Relaxed), 0);
    eprintln!(
        "{} of {} connections forwarded, {} left open past 3 s",
        forwarded.get(),
        total.get(),
        hung.get()
    );
    // Enough of the generated traffic was well-formed and routed for the
    // run to mean something (most of it is refused)...
    assert!(
        forwarded.get() >= total.get() / 10,
        "only {} of {} connections forwarded",
        forwarded.get(),
        total.get()
    );
    // ...and the router closes what it refuses or has answered: with the
    // header timeout at 0.5 s and the upstream timeout at 1 s, nothing
    // stays open for 3 s.
    assert_eq!(hung.get(), 0, "connections left open");
    drop((r, be, be_api));
}
