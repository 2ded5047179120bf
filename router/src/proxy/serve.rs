//! Serving threads and listeners: bind, accept, hand each connection on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::Router;
use super::state::Worker;

/// Threads serving the router's listeners, one single-threaded runtime
/// each. Dropping this stops them (their open connections are closed).
pub struct RouterThreads {
    stop: tokio::sync::watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl RouterThreads {
    /// Stop every thread and wait for them to end.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for RouterThreads {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Bind `n` listening sockets to the same address with `SO_REUSEPORT`, so
/// that the kernel spreads new connections over [`Router::spawn_threads`]'s
/// threads. With port 0, all get the port the first one was given.
pub fn bind_reuseport(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    if addr.port() != 0 {
        // SO_REUSEPORT would let this bind share a port that another
        // process of the same user already serves (another portless, say),
        // silently splitting its connections. A plain bind first makes
        // "address in use" an error, as it should be.
        drop(std::net::TcpListener::bind(addr)?);
    }
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    let mut bind_to = addr;
    for _ in 0..n.max(1) {
        let s = Socket::new(
            Domain::for_address(bind_to),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        if bind_to.is_ipv6() && bind_to.ip().is_unspecified() {
            // `[::]` means every address, IPv4 included.
            s.set_only_v6(false)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&bind_to.into())?;
        s.listen(1024)?;
        let l: std::net::TcpListener = s.into();
        bind_to = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

impl Router {
    /// Serve on `max(http.len(), https.len())` threads, thread `i` taking
    /// `http[i]` and `https[i]` (from [`bind_reuseport`]). Each thread runs
    /// its own single-threaded runtime and upstream pool; all share the
    /// route table. `tls` is needed when `https` is not empty.
    pub fn spawn_threads(
        &self,
        http: Vec<std::net::TcpListener>,
        https: Vec<std::net::TcpListener>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<RouterThreads> {
        if !https.is_empty() && tls.is_none() {
            return Err(std::io::Error::other(
                "HTTPS listeners without a TLS config",
            ));
        }
        let n = http.len().max(https.len());
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut http = http.into_iter();
        let mut https = https.into_iter();
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let h = http.next();
            let s = https.next();
            let shared = self.shared.clone();
            let tls = tls.clone();
            let mut stop_rx = stop_rx.clone();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let t = std::thread::Builder::new()
                .name(format!("router-{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        let worker = Arc::new(Worker::new(shared));
                        for (l, tls) in [(h, None), (s, tls.map(TlsAcceptor::from))] {
                            let Some(l) = l else { continue };
                            match l
                                .set_nonblocking(true)
                                .and_then(|()| TcpListener::from_std(l))
                            {
                                Ok(l) => {
                                    tokio::spawn(worker.clone().accept_loop(l, tls));
                                }
                                Err(e) => warn!(error = %e, "router listener unusable"),
                            }
                        }
                        // Until stopped, or until the handle is gone.
                        let _ = stop_rx.wait_for(|s| *s).await;
                    });
                })?;
            threads.push(t);
        }
        info!(threads = n, "router serving");
        Ok(RouterThreads { stop, threads })
    }

    /// Serve plain HTTP (HTTP/1.1, and HTTP/2 with prior knowledge) on a
    /// bound listener until the task is dropped.
    pub async fn serve_http(&self, listener: TcpListener) {
        self.serve(listener, None).await
    }

    /// Serve HTTPS on a bound listener until the task is dropped.
    /// `tls` comes from [`crate::tls::server_config`].
    pub async fn serve_https(&self, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        self.serve(listener, Some(TlsAcceptor::from(tls))).await
    }

    async fn serve(&self, listener: TcpListener, tls: Option<TlsAcceptor>) {
        let worker = Arc::new(Worker::new(self.shared.clone()));
        worker.accept_loop(listener, tls).await
    }
}

impl Worker {
    async fn accept_loop(self: Arc<Self>, listener: TcpListener, tls: Option<TlsAcceptor>) {
        let local = listener.local_addr().ok();
        debug!(listen = ?local, tls = tls.is_some(), "router accepting");
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off a
                    // little instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let worker = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move { worker.connection(stream, peer, tls).await });
        }
    }
}
