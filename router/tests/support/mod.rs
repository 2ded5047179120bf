//! Test harness: real backends (hyper servers on 127.0.0.1:0), a router on
//! 127.0.0.1:0, and real clients (curl, raw TCP, hyper's HTTP/2 client).
#![allow(dead_code, clippy::unwrap_used)]

pub mod pebble;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use portless_router::host::HostPattern;
use portless_router::table::parse_path_prefix;
use portless_router::{Backend, BackendState, RouteSpec, Router, RouterOptions, Scheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A backend server; killed (every connection reset) when dropped.
pub struct TestBackend {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    /// Connections open to this backend now.
    pub open: Arc<std::sync::atomic::AtomicI64>,
    /// Connections accepted, ever.
    pub accepted: Arc<AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestBackend {
    /// Stop like a well-behaved server on SIGTERM: close the listener,
    /// finish requests in flight, close keep-alive connections.
    pub async fn graceful_stop(mut self) {
        let _ = self.stop.send(true);
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = task.await;
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).boxed()
}

async fn serve_backend(
    name: &'static str,
    hits: Arc<AtomicU64>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    hits.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Response::new(full("slow"))
        }
        "/ws" => {
            // A WebSocket-style upgrade that echoes raw bytes.
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 1024];
                    loop {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                let mut out = format!("{name}:").into_bytes();
                                out.extend_from_slice(&buf[..n]);
                                if io.write_all(&out).await.is_err() {
                                    break;
                                }
                            }
                        }
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
        "/stream" => {
            // Ten chunks, 100 ms apart.
            let s = futures::stream::unfold(0u32, |i| async move {
                if i == 10 {
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
        "/big" => {
            // 8 MiB at once, to be taken slowly: more than the kernel's
            // socket buffers hold.
            Response::new(full(vec![b'x'; 8 << 20]))
        }
        "/trailers" => {
            // gRPC-style: a body, then trailers.
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            trailers.insert("x-backend", HeaderValue::from_static(name));
            let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                Ok(Frame::data(Bytes::from_static(b"hello "))),
                Ok(Frame::data(Bytes::from_static(b"trailers"))),
                Ok(Frame::trailers(trailers)),
            ];
            let mut resp = Response::new(StreamBody::new(futures::stream::iter(frames)).boxed());
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            resp
        }
        _ => {
            // Echo: who answered, the request line, and every header.
            let mut out = format!(
                "backend={name}\nversion={:?}\nuri={}\n",
                req.version(),
                req.uri()
            );
            for (k, v) in req.headers() {
                out.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
            }
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            out.push_str(&format!("body-bytes={body}\n"));
            let mut resp = Response::new(full(out));
            resp.headers_mut()
                .insert("x-backend", HeaderValue::from_static(name));
            resp
        }
    }
}

/// Start a backend speaking HTTP/1.1 and HTTP/2 (prior knowledge).
pub async fn backend(name: &'static str) -> TestBackend {
    backend_with_idle(name, None).await
}

/// A backend that closes HTTP/1.1 keep-alive connections idle for `idle`.
pub async fn backend_with_idle(name: &'static str, idle: Option<Duration>) -> TestBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    let open = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let open_count = open.clone();
    let accepted = Arc::new(AtomicU64::new(0));
    let accepted_count = accepted.clone();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        // Dropping the set (when this task is aborted) aborts every
        // connection: a killed process.
        let mut conns = tokio::task::JoinSet::new();
        let mut stop_accept = stop_rx.clone();
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                _ = stop_accept.changed() => break,
            };
            let h = h.clone();
            let mut stop_conn = stop_rx.clone();
            open_count.fetch_add(1, Ordering::Relaxed);
            accepted_count.fetch_add(1, Ordering::Relaxed);
            let open_conn = OpenGuard(open_count.clone());
            conns.spawn(async move {
                let _open = open_conn;
                let svc = service_fn(move |req| {
                    let h = h.clone();
                    async move { Ok::<_, Infallible>(serve_backend(name, h, req).await) }
                });
                let mut builder = auto::Builder::new(TokioExecutor::new());
                if let Some(idle) = idle {
                    builder
                        .http1()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(idle);
                }
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = stop_conn.changed() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
        drop(listener);
        while conns.join_next().await.is_some() {}
    });
    TestBackend {
        name,
        addr,
        hits,
        open,
        accepted,
        stop,
        task,
    }
}

/// Counts a backend connection open until dropped.
struct OpenGuard(Arc<std::sync::atomic::AtomicI64>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An address where nothing listens (bound, then closed).
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

pub fn b(id: &str, addr: SocketAddr) -> Backend {
    Backend {
        id: id.into(),
        name: id.into(),
        addr,
        scheme: Scheme::Http,
        state: BackendState::Healthy,
    }
}

pub fn spec(hosts: &[&str], path: &str, backends: Vec<Backend>) -> RouteSpec {
    RouteSpec {
        hosts: hosts
            .iter()
            .map(|h| HostPattern::parse(h).unwrap())
            .collect(),
        path_prefix: parse_path_prefix(path).unwrap(),
        backends,
    }
}

/// A router serving plain HTTP on 127.0.0.1:0.
pub struct TestRouter {
    pub router: Router,
    pub addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub async fn router(opts: RouterOptions, specs: Vec<RouteSpec>) -> TestRouter {
    let router = Router::new(opts);
    router.update(specs);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let r = router.clone();
    let task = tokio::spawn(async move { r.serve_http(l).await });
    TestRouter {
        router,
        addr,
        tasks: vec![task],
    }
}

impl TestRouter {
    /// Add an HTTPS listener on 127.0.0.1:0.
    pub async fn add_https(&mut self, cfg: Arc<rustls::ServerConfig>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let r = self.router.clone();
        self.tasks
            .push(tokio::spawn(async move { r.serve_https(l, cfg).await }));
        addr
    }
}

/// What curl saw.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// Run curl against `url`, resolving its host to 127.0.0.1 (`--resolve`),
/// with extra arguments.
pub async fn curl(url: &str, extra: &[&str]) -> Reply {
    let u: http::Uri = url.parse().unwrap();
    let host = u.host().unwrap();
    let port = u.port_u16().unwrap();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-i", "--max-time", "20", "--resolve"])
        .arg(format!("{host}:{port}:127.0.0.1"))
        .args(extra)
        .arg(url)
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Reply {
            status: 0,
            head: String::from_utf8_lossy(&out.stderr).into_owned(),
            body: text,
        };
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// Send raw bytes, read until the peer closes or `wait` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "portless-router-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA, and certificates it signs, made with the openssl CLI.
pub struct TestCa {
    pub dir: TempDir,
}

impl TestCa {
    pub fn new() -> Self {
        let dir = TempDir::new("ca");
        run_openssl(
            &dir.0,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=portless test CA",
            ],
        );
        TestCa { dir }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.0.join("ca.pem")
    }

    /// Write `<out_dir>/<stem>.pem` (chain) and `<stem>.key` for `names`.
    pub fn issue(&self, out_dir: &Path, stem: &str, names: &[&str]) {
        let d = &self.dir.0;
        let key = d.join(format!("{stem}.key"));
        let csr = d.join(format!("{stem}.csr"));
        let crt = d.join(format!("{stem}.pem"));
        let ext = d.join(format!("{stem}.ext"));
        let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
        std::fs::write(&ext, format!("subjectAltName={}\n", san.join(","))).unwrap();
        run_openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                csr.to_str().unwrap(),
                "-subj",
                &format!("/CN={}", names[0]),
            ],
        );
        run_openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                csr.to_str().unwrap(),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                crt.to_str().unwrap(),
                "-extfile",
                ext.to_str().unwrap(),
            ],
        );
        // Key first into a temporary name, then the certificate: a reload
        // in between must not see a certificate without its key.
        std::fs::copy(&key, out_dir.join(format!("{stem}.key"))).unwrap();
        std::fs::copy(&crt, out_dir.join(format!("{stem}.pem"))).unwrap();
    }
}

fn run_openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
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

/// Wait until `f` holds, up to `max`.
pub async fn eventually(max: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + max;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Send raw bytes on a new connection and read until `until` has been
/// seen (or the peer closes, or `wait` passes); the text and the stream.
pub async fn raw_until(
    addr: SocketAddr,
    bytes: &[u8],
    until: &str,
    wait: Duration,
) -> (String, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).contains(until) {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), s)
}
