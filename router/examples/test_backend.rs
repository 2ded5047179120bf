//! The project's own test backend, run in containers by the integration
//! tests (a locally built image; there is no registry).
//!
//! ```text
//! test_backend NAME [PORT]     (default port 8080)
//! ```
//! HTTP/1.1 and HTTP/2 with prior knowledge on one port:
//! - `/ws`: upgrade, then echo every read back prefixed with `NAME:`;
//! - `/trailers`: a gRPC-style body followed by trailers (`grpc-status: 0`);
//! - `/stream`: ten chunks, 100 ms apart;
//! - `/slow`: answers after 3 s;
//! - anything else: `backend=NAME`, the request line and every header.
//!
//! SIGTERM stops it gracefully: no new connections, in-flight requests end.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Body = BoxBody<Bytes, Infallible>;

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).boxed()
}

async fn serve(name: &'static str, mut req: Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Response::new(full(format!("backend={name} slow\n")))
        }
        "/ws" => {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = on.await else { return };
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 4096];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut out = format!("{name}:").into_bytes();
                    out.extend_from_slice(&buf[..n]);
                    if io.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(full(""))
                .unwrap()
        }
        "/trailers" => {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            trailers.insert("grpc-message", HeaderValue::from_static(name));
            let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x05hello"))),
                Ok(Frame::trailers(trailers)),
            ];
            let mut resp = Response::new(StreamBody::new(futures::stream::iter(frames)).boxed());
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            resp
        }
        "/stream" => {
            // `?chunks=N`: how many chunks, 100 ms apart (default 10).
            let chunks: u32 = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("chunks="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(10);
            let s = futures::stream::unfold(0u32, move |i| async move {
                if i == chunks {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from(format!("chunk {i}\n")))),
                    i + 1,
                ))
            });
            Response::new(StreamBody::new(s).boxed())
        }
        _ => {
            let mut out = format!(
                "backend={name}\nversion={:?}\nuri={}\n",
                req.version(),
                req.uri()
            );
            for (k, v) in req.headers() {
                out.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
            }
            let n = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            out.push_str(&format!("body-bytes={n}\n"));
            Response::new(full(out))
        }
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let name: &'static str = Box::leak(
        args.next()
            .unwrap_or_else(|| "backend".into())
            .into_boxed_str(),
    );
    let port: u16 = args.next().map_or(8080, |p| p.parse().unwrap());
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .unwrap();
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            _ = term.recv() => break,
        };
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let svc =
                service_fn(move |req| async move { Ok::<_, Infallible>(serve(name, req).await) });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
}
