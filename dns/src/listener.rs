//! The set of DNS listeners, changed live.
//!
//! Every address gets a UDP socket (served by [`crate::udp`]) and a TCP
//! listener (served by [`crate::tcp`]) of its own, so one address can be
//! added or removed without touching the others (Docker networks come and
//! go while we run).
//!
//! UDP is served by threads of its own, one per CPU this process may run
//! on, each with a single-threaded runtime: every UDP socket is served by
//! a loop on each of them, so queries to one address use every core (one
//! loop on the shared runtime held UDP to one core while the peers used
//! all). TCP and forwarded queries stay on the runtime `Listeners` was
//! made on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::handler::Handler;

pub struct Listeners {
    handler: Handler,
    /// TCP connections open at once, over every address.
    tcp_slots: Arc<Semaphore>,
    /// Per address: stops its UDP loops, its TCP loop and its connections.
    active: BTreeMap<SocketAddr, CancellationToken>,
    udp: UdpThreads,
    /// Where TCP and forwarded queries run.
    runtime: Handle,
}

/// The threads that serve UDP, each running a single-threaded runtime
/// until the `Listeners` is dropped.
struct UdpThreads {
    runtimes: Vec<Handle>,
    stop: CancellationToken,
}

impl UdpThreads {
    /// `n` threads; fewer if the system refuses more (none: UDP is then
    /// served on the caller's runtime).
    fn start(n: usize) -> Self {
        let stop = CancellationToken::new();
        let mut runtimes = Vec::with_capacity(n);
        for i in 0..n {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a DNS UDP runtime");
                    break;
                }
            };
            let handle = rt.handle().clone();
            let stop = stop.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                // The loops keep their buffers on the heap.
                .stack_size(256 << 10)
                .spawn(move || rt.block_on(stop.cancelled()));
            match spawned {
                Ok(_) => runtimes.push(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a DNS UDP thread");
                    break;
                }
            }
        }
        UdpThreads { runtimes, stop }
    }
}

impl Drop for UdpThreads {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// UDP threads, unless configured: one per CPU this process may run on
/// (its affinity: a server pinned to one core gets one).
pub fn default_udp_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Listeners {
    /// `max_tcp_connections`: open TCP connections at once, over every
    /// address ([`crate::tcp::DEFAULT_MAX_CONNECTIONS`] is a sound value).
    /// UDP gets [`default_udp_threads`] threads. Must be called within a
    /// tokio runtime: TCP and forwarding run there.
    pub fn new(handler: Handler, max_tcp_connections: usize) -> Self {
        Self::with_udp_threads(handler, max_tcp_connections, default_udp_threads())
    }

    /// [`Self::new`] with `udp_threads` threads serving UDP (at least 1).
    pub fn with_udp_threads(
        handler: Handler,
        max_tcp_connections: usize,
        udp_threads: usize,
    ) -> Self {
        Self {
            handler,
            tcp_slots: Arc::new(Semaphore::new(max_tcp_connections)),
            active: BTreeMap::new(),
            udp: UdpThreads::start(udp_threads.max(1)),
            runtime: Handle::current(),
        }
    }

    /// Addresses served now.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.active.keys().copied().collect()
    }

    /// Serve on `addr` (UDP and TCP). Port 0 picks a free port, the same for
    /// both protocols; the bound address is returned.
    pub async fn add(&mut self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        self.add_with(addr, false).await
    }

    /// [`Self::add`]; with `freebind`, an address the host does not have
    /// in a usable state yet is bound anyway (IP_FREEBIND): a new IPv6
    /// network's gateway stays *tentative* for seconds, while duplicate
    /// address detection runs, and would otherwise refuse the bind.
    async fn add_with(&mut self, addr: SocketAddr, freebind: bool) -> std::io::Result<SocketAddr> {
        if addr.port() != 0 && self.active.contains_key(&addr) {
            return Ok(addr);
        }
        let (udp, tcp) = bind_pair(addr, freebind).await?;
        let bound = udp.local_addr()?;
        let stop = CancellationToken::new();
        self.serve_udp(udp, &stop)?;
        self.runtime.spawn(crate::tcp::serve(
            tcp,
            self.handler.clone(),
            self.tcp_slots.clone(),
            stop.clone(),
        ));
        self.active.insert(bound, stop);
        tracing::info!(addr = %bound, "dns listening");
        Ok(bound)
    }

    /// A UDP loop on every UDP thread, each on its own descriptor of the
    /// one socket.
    fn serve_udp(&self, udp: std::net::UdpSocket, stop: &CancellationToken) -> std::io::Result<()> {
        let mut runtimes = self.udp.runtimes.iter();
        let first = runtimes.next().unwrap_or(&self.runtime);
        for rt in runtimes {
            self.spawn_udp(rt, udp.try_clone()?, stop);
        }
        self.spawn_udp(first, udp, stop);
        Ok(())
    }

    fn spawn_udp(&self, rt: &Handle, udp: std::net::UdpSocket, stop: &CancellationToken) {
        let (handler, forwarding, stop) =
            (self.handler.clone(), self.runtime.clone(), stop.clone());
        rt.spawn(async move {
            // Registered with the runtime of the thread that serves it.
            match tokio::net::UdpSocket::from_std(udp) {
                Ok(udp) => crate::udp::serve(udp, handler, forwarding, stop).await,
                Err(e) => tracing::warn!(error = %e, "cannot serve a DNS UDP socket"),
            }
        });
    }

    /// Stop serving on `addr`.
    pub fn remove(&mut self, addr: &SocketAddr) {
        if let Some(stop) = self.active.remove(addr) {
            stop.cancel();
            tracing::info!(%addr, "dns listener closed");
        }
    }

    /// Make the served set equal `wanted` (fixed ports only), and return the
    /// addresses that could not be bound with the reason. These are
    /// addresses Docker has announced (gateways): bound even while not yet
    /// usable, and served as soon as they are.
    pub async fn reconcile(&mut self, wanted: &[SocketAddr]) -> Vec<(SocketAddr, std::io::Error)> {
        let gone: Vec<SocketAddr> = self
            .active
            .keys()
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        for a in gone {
            self.remove(&a);
        }
        let mut failed = Vec::new();
        for a in wanted {
            if !self.active.contains_key(a)
                && let Err(e) = self.add_with(*a, true).await
            {
                failed.push((*a, e));
            }
        }
        failed
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for stop in self.active.values() {
            stop.cancel();
        }
    }
}

async fn bind_pair(
    addr: SocketAddr,
    freebind: bool,
) -> std::io::Result<(std::net::UdpSocket, tokio::net::TcpListener)> {
    let (udp, tcp) = bind_pair_tokio(addr, freebind).await?;
    Ok((udp.into_std()?, tcp))
}

async fn bind_pair_tokio(
    addr: SocketAddr,
    freebind: bool,
) -> std::io::Result<(tokio::net::UdpSocket, tokio::net::TcpListener)> {
    if freebind && addr.port() != 0 {
        let udp = tokio::net::UdpSocket::from_std(bind_free(addr, socket2::Type::DGRAM)?.into())?;
        grow_buffers(&udp);
        let tcp = bind_free(addr, socket2::Type::STREAM)?;
        tcp.listen(1024)?;
        let tcp = tokio::net::TcpListener::from_std(tcp.into())?;
        return Ok((udp, tcp));
    }
    if addr.port() != 0 {
        let udp = tokio::net::UdpSocket::bind(addr).await?;
        grow_buffers(&udp);
        let tcp = tokio::net::TcpListener::bind(addr).await?;
        return Ok((udp, tcp));
    }
    // Port 0: find a port free for both protocols.
    let mut last = None;
    for _ in 0..16 {
        let udp = tokio::net::UdpSocket::bind(addr).await?;
        grow_buffers(&udp);
        let port_addr = udp.local_addr()?;
        match tokio::net::TcpListener::bind(port_addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free port for UDP and TCP")))
}

/// A non-blocking socket bound to `addr` with IP_FREEBIND (or
/// IPV6_FREEBIND), as tokio's own bind would make it otherwise.
fn bind_free(addr: SocketAddr, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    if addr.is_ipv4() {
        socket.set_freebind_v4(true)?;
    } else {
        socket.set_freebind_v6(true)?;
    }
    if ty == socket2::Type::STREAM {
        socket.set_reuse_address(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Receive buffer of a DNS socket: room for a burst of a few thousand
/// queries while the loop is descheduled (the kernel default of ~200 KiB
/// holds about a thousand and drops the rest).
const RECV_BUFFER: usize = 4 << 20;

fn grow_buffers(socket: &tokio::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    // As root, past net.core.rmem_max; otherwise as much as it allows.
    if setsockopt(socket, sockopt::RcvBufForce, &RECV_BUFFER).is_err()
        && let Err(e) = setsockopt(socket, sockopt::RcvBuf, &RECV_BUFFER)
    {
        tracing::debug!(error = %e, "cannot grow the DNS receive buffer");
    }
}
