//! The UDP serving loop.
//!
//! Datagrams are taken from the kernel in batches (`recvmmsg`), answered
//! from the zone inline, and the replies of a batch handed back in one
//! call (`sendmmsg`): on loopback most of a query's cost is the kernel's,
//! and a system call per datagram each way was a large part of it. No
//! task and no channel per query. Forwarded queries get a task of their
//! own on the forwarding runtime, so a slow upstream never stalls the
//! loop; how many may wait at once is bounded by the forwarder.
//!
//! One socket may be served by several loops at once (one per UDP thread,
//! see [`crate::listener`]): each takes whatever datagrams are queued when
//! it asks, so the load spreads over them whatever the clients' ports.
//!
//! The common query is answered on the wire ([`crate::wire`]); the rest is
//! decoded and encoded by hickory (`Request::from_bytes`,
//! `MessageResponse`), the same as on the TCP path, so both transports give
//! the same answers; only the I/O differs.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use hickory_proto::op::MessageType;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::handler::{Decision, Handler, formerr};
use crate::metrics::Outcome;
use crate::rrl::Verdict;
use crate::wire;

/// Largest datagram we read; anything longer is not a query we answer.
const MAX_DATAGRAM: usize = 4096;

/// Datagrams taken from the kernel in one call, at most. More amortizes the
/// call further but holds replies back longer; 32 is what knot uses.
const BATCH: usize = 32;

/// Batches served in a row before the loop yields to its runtime (and
/// looks at `shutdown`).
const BATCHES_PER_TURN: usize = 8;

/// Serve `socket` until `shutdown`. Forwarded queries are spawned on
/// `forwarding` (the runtime the forwarder's sockets and timers live on).
pub async fn serve(
    socket: UdpSocket,
    handler: Handler,
    forwarding: Handle,
    shutdown: CancellationToken,
) {
    let socket = Arc::new(socket);
    let fd = socket.as_raw_fd();
    let mut batch = Batch::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = socket.readable() => if let Err(e) = r {
                tracing::debug!(error = %e, "udp socket not readable");
                continue;
            },
        }
        for _ in 0..BATCHES_PER_TURN {
            let n = match socket.try_io(Interest::READABLE, || batch.receive(fd)) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // ICMP errors from earlier sends surface here; they are
                    // about some client, not about this socket.
                    tracing::debug!(error = %e, "udp receive error");
                    continue;
                }
            };
            for i in 0..n {
                answer(&socket, &handler, &forwarding, &mut batch, i);
            }
            batch.send(fd);
            if n < BATCH {
                break;
            }
        }
    }
}

/// Answer the `i`th datagram of `batch`: a reply queued in the batch, a
/// forwarding task, or nothing.
fn answer(
    socket: &Arc<UdpSocket>,
    handler: &Handler,
    forwarding: &Handle,
    batch: &mut Batch,
    i: usize,
) {
    let Some(src) = batch.source(i) else {
        return;
    };
    if src.port() == 0 {
        return;
    }
    // The common query: answered on the wire, or left to the full path
    // below, with the rate verdict already taken.
    let mut verdict = None;
    let (bytes, out, key) = batch.split(i);
    if let Some(query) = wire::Query::parse(bytes) {
        let v = handler.rate_verdict(src.ip());
        if v == Verdict::Answer && handler.answer_wire(&query, src.ip(), key, out) {
            return;
        }
        verdict = Some(v);
    }
    batch.unqueue();
    let bytes = batch.datagram(i);
    let request = match Request::from_bytes(bytes.to_vec(), src, Protocol::Udp) {
        Ok(r) => r,
        Err(_) => {
            if let Some(formerr) = formerr(bytes) {
                handler
                    .metrics()
                    .record(hickory_proto::rr::RecordType::NULL, Outcome::FormErr);
                let out = batch.reply_to(i);
                out.extend_from_slice(&formerr);
            }
            return;
        }
    };
    if request.metadata.message_type != MessageType::Query {
        return;
    }
    match verdict.unwrap_or_else(|| handler.rate_verdict(src.ip())) {
        Verdict::Answer => {}
        Verdict::Slip => {
            let slip = handler.slip(&request);
            let out = batch.reply_to(i);
            if slip.encode_udp(&request.queries, out).is_err() {
                batch.unqueue();
            }
            return;
        }
        Verdict::Drop => return,
    }
    match handler.decide(&request, src.ip()) {
        Decision::Reply(reply) => {
            let out = batch.reply_to(i);
            if reply.encode_udp(&request.queries, out).is_err() {
                batch.unqueue();
            }
        }
        Decision::Forward(pending) => {
            let handler = handler.clone();
            let socket = socket.clone();
            forwarding.spawn(async move {
                let reply = handler.forward(pending).await;
                let mut out = Vec::with_capacity(512);
                if reply.encode_udp(&request.queries, &mut out).is_ok() {
                    send(&socket, &out, src);
                }
            });
        }
    }
}

/// Send without waiting. A full send buffer means the kernel cannot
/// deliver (a burst, or replies to spoofed sources stuck on ARP); waiting
/// for room would stall every client of this socket, so the reply is
/// dropped and the client retries, as a UDP client does.
fn send(socket: &UdpSocket, bytes: &[u8], to: SocketAddr) {
    if let Err(e) = socket.try_send_to(bytes, to) {
        tracing::debug!(error = %e, %to, "udp reply dropped");
    }
}

/// The buffers of one `recvmmsg` and one `sendmmsg`, reused from batch to
/// batch: nothing is allocated per datagram once they have grown.
struct Batch {
    /// `BATCH` receive buffers of `MAX_DATAGRAM` bytes, back to back.
    input: Box<[u8]>,
    /// Per received datagram: its length and its source, as the kernel
    /// gave it (sent back as is with the reply).
    lengths: [usize; BATCH],
    sources: Box<[libc::sockaddr_storage; BATCH]>,
    source_lengths: [libc::socklen_t; BATCH],
    /// Replies queued: (index of the datagram answered, encoded reply).
    queued: usize,
    reply_of: [usize; BATCH],
    replies: Vec<Vec<u8>>,
    /// Scratch space for a name's text.
    key: String,
}

// The one place of the crate with unsafe code: recvmmsg and sendmmsg
// through libc, on buffers this struct owns. nix's wrappers would do, but
// counting the results of its sendmmsg reads addresses it never
// initialized.
#[allow(unsafe_code)]
impl Batch {
    fn new() -> Self {
        Batch {
            input: vec![0u8; BATCH * MAX_DATAGRAM].into_boxed_slice(),
            lengths: [0; BATCH],
            // SAFETY: sockaddr_storage is plain old data; all zeroes is a
            // valid (AF_UNSPEC) value.
            sources: Box::new(unsafe { MaybeUninit::zeroed().assume_init() }),
            source_lengths: [0; BATCH],
            queued: 0,
            reply_of: [0; BATCH],
            replies: (0..BATCH).map(|_| Vec::with_capacity(512)).collect(),
            key: String::with_capacity(256),
        }
    }

    /// Take up to `BATCH` datagrams without waiting; how many.
    fn receive(&mut self, fd: RawFd) -> io::Result<usize> {
        self.queued = 0;
        let mut iovecs: [MaybeUninit<libc::iovec>; BATCH] = [MaybeUninit::uninit(); BATCH];
        // SAFETY: mmsghdr is plain old data; all zeroes is valid (null
        // pointers, zero lengths), and every pointer set below is valid for
        // the length given with it until recvmmsg returns.
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
        for (i, (iov, header)) in iovecs.iter_mut().zip(headers.iter_mut()).enumerate() {
            let iov = iov.write(libc::iovec {
                iov_base: self.input[i * MAX_DATAGRAM..].as_mut_ptr().cast(),
                iov_len: MAX_DATAGRAM,
            });
            header.msg_hdr.msg_name = (&raw mut self.sources[i]).cast();
            header.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `headers` holds BATCH valid headers (above).
        let n = unsafe {
            libc::recvmmsg(
                fd,
                headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, header) in headers.iter().take(n).enumerate() {
            self.lengths[i] = (header.msg_len as usize).min(MAX_DATAGRAM);
            self.source_lengths[i] = header.msg_hdr.msg_namelen;
        }
        Ok(n)
    }

    fn datagram(&self, i: usize) -> &[u8] {
        &self.input[i * MAX_DATAGRAM..i * MAX_DATAGRAM + self.lengths[i]]
    }

    fn source(&self, i: usize) -> Option<SocketAddr> {
        let storage = &self.sources[i];
        match i32::from(storage.ss_family) {
            libc::AF_INET => {
                // SAFETY: the kernel wrote a sockaddr_in (family AF_INET),
                // which sockaddr_storage is large and aligned enough for.
                let sin = unsafe { &*(&raw const *storage).cast::<libc::sockaddr_in>() };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: as above, for AF_INET6 and sockaddr_in6.
                let sin6 = unsafe { &*(&raw const *storage).cast::<libc::sockaddr_in6>() };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }

    /// A cleared buffer for the reply to datagram `i`, queued for
    /// [`Self::send`].
    fn reply_to(&mut self, i: usize) -> &mut Vec<u8> {
        let slot = self.queued;
        self.queued += 1;
        self.reply_of[slot] = i;
        let out = &mut self.replies[slot];
        out.clear();
        out
    }

    /// Datagram `i`, a reply to it queued (as [`Self::reply_to`]), and the
    /// scratch string, at once.
    fn split(&mut self, i: usize) -> (&[u8], &mut Vec<u8>, &mut String) {
        let slot = self.queued;
        self.queued += 1;
        self.reply_of[slot] = i;
        let out = &mut self.replies[slot];
        out.clear();
        let bytes = &self.input[i * MAX_DATAGRAM..i * MAX_DATAGRAM + self.lengths[i]];
        (bytes, out, &mut self.key)
    }

    /// Take back the reply last queued (it could not be encoded).
    fn unqueue(&mut self) {
        self.queued -= 1;
    }

    /// Send the queued replies, each to the source of its datagram, without
    /// waiting (see [`send`]): one that the kernel refuses is dropped, and
    /// the rest still go.
    fn send(&mut self, fd: RawFd) {
        let count = std::mem::take(&mut self.queued);
        if count == 0 {
            return;
        }
        let mut iovecs: [MaybeUninit<libc::iovec>; BATCH] = [MaybeUninit::uninit(); BATCH];
        // SAFETY: as in receive.
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { MaybeUninit::zeroed().assume_init() };
        for slot in 0..count {
            let i = self.reply_of[slot];
            let iov = iovecs[slot].write(libc::iovec {
                iov_base: self.replies[slot].as_mut_ptr().cast(),
                iov_len: self.replies[slot].len(),
            });
            let header = &mut headers[slot].msg_hdr;
            header.msg_name = (&raw mut self.sources[i]).cast();
            header.msg_namelen = self.source_lengths[i];
            header.msg_iov = iov;
            header.msg_iovlen = 1;
        }
        let mut done = 0;
        while done < count {
            // SAFETY: headers[done..count] are valid (above).
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    headers[done..].as_mut_ptr(),
                    (count - done) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                done += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if e.kind() == io::ErrorKind::WouldBlock {
                tracing::debug!(
                    dropped = count - done,
                    "udp send buffer full: replies dropped"
                );
                return;
            }
            // This one reply cannot go (its destination, say): skip it.
            tracing::debug!(error = %e, "udp reply dropped");
            done += 1;
        }
    }
}
