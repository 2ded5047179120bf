//! The access log: one JSON line per request, to a file that can be
//! rotated under it. Real backends on loopback, real clients (curl).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use portless_router::RouterOptions;
use portless_router::access_log::{AccessLog, Target};
use support::*;

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

async fn wait_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let ok = eventually(Duration::from_secs(5), async || lines(path).len() >= n).await;
    let got = lines(path);
    assert!(ok, "{} lines, expected {n}: {got:?}", got.len());
    got
}

#[tokio::test]
async fn every_request_is_one_json_line_and_a_rotated_file_is_reopened() {
    let dir = TempDir::new("access-log");
    let path = dir.0.join("access.log");
    let be = backend("be").await;
    let opts = RouterOptions {
        access_log: Some(AccessLog::open(Target::File(path.clone())).unwrap()),
        ..Default::default()
    };
    let r = router(
        opts,
        vec![
            spec(&["a.test"], "/", vec![b("be", be.addr)]),
            spec(&["dead.test"], "/", vec![b("dead", dead_addr().await)]),
        ],
    )
    .await;
    let port = r.addr.port();
    let got = curl(&format!("http://a.test:{port}/x?q=1"), &[]).await;
    assert_eq!(got.status, 200);
    let l = &wait_lines(&path, 1).await[0];
    assert_eq!(l["client"], "127.0.0.1");
    assert_eq!(l["host"], format!("a.test:{port}"));
    assert_eq!(l["method"], "GET");
    assert_eq!(l["path"], "/x?q=1");
    assert_eq!(l["status"], 200);
    assert_eq!(l["bytes"], got.body.len() as u64);
    assert_eq!(l["route"], "a.test/");
    assert_eq!(l["backend"], be.addr.to_string());
    assert_eq!(l["tls"], false);
    assert_eq!(l["http"], "HTTP/1.1");
    assert_eq!(l["fault"], serde_json::Value::Null);
    let (dur, up) = (
        l["duration_ms"].as_f64().unwrap(),
        l["upstream_ms"].as_f64().unwrap(),
    );
    assert!(up > 0.0 && up <= dur, "{l}");
    assert!(l["time"].as_str().unwrap().ends_with('Z'), "{l}");

    // Failures say whose fault they were; a streamed answer is logged with
    // every byte once it has ended.
    assert_eq!(
        curl(&format!("http://nope.test:{port}/"), &[]).await.status,
        404
    );
    assert_eq!(
        curl(&format!("http://dead.test:{port}/"), &[]).await.status,
        502
    );
    let got = curl(
        &format!("http://a.test:{port}/stream"),
        &["--http2-prior-knowledge"],
    )
    .await;
    assert_eq!(got.status, 200);
    let all = wait_lines(&path, 4).await;
    assert_eq!(all[1]["status"], 404);
    assert_eq!(all[1]["fault"], "router");
    assert_eq!(all[1]["route"], serde_json::Value::Null);
    assert_eq!(all[2]["status"], 502);
    assert_eq!(all[2]["fault"], "backend");
    assert_eq!(all[2]["upstream_ms"], serde_json::Value::Null);
    assert_eq!(all[3]["http"], "HTTP/2.0");
    assert_eq!(all[3]["bytes"], got.body.len() as u64);
    assert!(
        all[3]["duration_ms"].as_f64().unwrap() >= 900.0,
        "{}",
        all[3]
    );

    // logrotate-style: the file is moved away; the next lines go to a new
    // file under the old name.
    let rotated = dir.0.join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    curl(&format!("http://a.test:{port}/after"), &[]).await;
    let fresh = wait_lines(&path, 1).await;
    assert_eq!(fresh[0]["path"], "/after");
    assert_eq!(lines(&rotated).len(), 4);
}

#[tokio::test]
async fn a_client_that_leaves_before_its_answer_is_logged_as_499() {
    use tokio::io::AsyncWriteExt;
    let dir = TempDir::new("access-log-499");
    let path = dir.0.join("access.log");
    let be = backend("be").await;
    let opts = RouterOptions {
        access_log: Some(AccessLog::open(Target::File(path.clone())).unwrap()),
        ..Default::default()
    };
    let r = router(opts, vec![spec(&["a.test"], "/", vec![b("be", be.addr)])]).await;
    let mut s = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    let l = &wait_lines(&path, 1).await[0];
    assert_eq!(l["status"], 499, "{l}");
    assert_eq!(l["fault"], "client", "{l}");
    assert_eq!(l["path"], "/slow", "{l}");
    assert_eq!(l["route"], "a.test/", "{l}");
    assert_eq!(l["backend"], be.addr.to_string(), "{l}");
    assert_eq!(l["upstream_ms"], serde_json::Value::Null, "{l}");
    assert!(l["duration_ms"].as_f64().unwrap() < 2000.0, "{l}");
}
