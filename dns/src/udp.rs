//! The UDP serving loop.
//!
//! Queries answered from the zone are decoded, answered and encoded inline
//! in the receive loop: no task and no channel per query, which is most of
//! the cost of a small answer. Forwarded queries get a task of their own,
//! so a slow upstream never stalls the loop; how many may wait at once is
//! bounded by the forwarder.
//!
//! Decoding and encoding are hickory's (`Request::from_bytes`,
//! `MessageResponse`), the same as on the TCP path, so both transports give
//! the same answers; only the I/O differs.

use std::net::SocketAddr;
use std::sync::Arc;

use hickory_proto::op::MessageType;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::handler::{Decision, Handler, formerr};
use crate::metrics::Outcome;
use crate::rrl::Verdict;

/// Largest datagram we read; anything longer is not a query we answer.
const MAX_DATAGRAM: usize = 4096;

pub async fn serve(socket: UdpSocket, handler: Handler, shutdown: CancellationToken) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut out = Vec::with_capacity(1232);
    loop {
        let (n, src) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    // ICMP errors from earlier sends surface here; they are
                    // about some client, not about this socket.
                    tracing::debug!(error = %e, "udp receive error");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        if src.port() == 0 {
            continue;
        }
        let bytes = &buf[..n];
        let request = match Request::from_bytes(bytes.to_vec(), src, Protocol::Udp) {
            Ok(r) => r,
            Err(_) => {
                if let Some(formerr) = formerr(bytes) {
                    handler
                        .metrics()
                        .record(hickory_proto::rr::RecordType::NULL, Outcome::FormErr);
                    let _ = socket.try_send_to(&formerr, src);
                }
                continue;
            }
        };
        if request.metadata.message_type != MessageType::Query {
            continue;
        }
        match handler.rate_verdict(src.ip()) {
            Verdict::Answer => {}
            Verdict::Slip => {
                if handler
                    .slip(&request)
                    .encode_udp(&request.queries, &mut out)
                    .is_ok()
                {
                    send(&socket, &out, src);
                }
                continue;
            }
            Verdict::Drop => continue,
        }
        match handler.decide(&request, src.ip()) {
            Decision::Reply(reply) => {
                if reply.encode_udp(&request.queries, &mut out).is_ok() {
                    send(&socket, &out, src);
                }
            }
            Decision::Forward(pending) => {
                let handler = handler.clone();
                let socket = socket.clone();
                tokio::spawn(async move {
                    let reply = handler.forward(pending).await;
                    let mut out = Vec::with_capacity(512);
                    if reply.encode_udp(&request.queries, &mut out).is_ok() {
                        send(&socket, &out, src);
                    }
                });
            }
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
