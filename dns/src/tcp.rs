//! The TCP serving loop: RFC 1035 length-prefixed messages, answered in
//! order on each connection, with a cap on connections.
//!
//! Every connection holds a task, buffers and a file descriptor until its
//! idle timeout, so their number is bounded: past the cap (shared by every
//! listener) a new connection is closed at once and counted. Queries go
//! through the same [`Handler`] as UDP; only the I/O differs. Connections
//! are never rate limited: over TCP no address can be spoofed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::handler::{Handler, formerr};
use crate::metrics::Outcome;

/// Idle time after which a TCP client is dropped; also the time a query
/// or a reply may take to cross.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections open at once over every listener, unless configured.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

pub async fn serve(
    listener: TcpListener,
    handler: Handler,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, src) = tokio::select! {
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    // Out of descriptors or memory: wait rather than spin.
                    tracing::debug!(error = %e, "tcp accept error");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            handler
                .metrics()
                .tcp_refused
                .fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = connection(stream, src, &handler) => {}
                _ = shutdown.cancelled() => {}
            }
            drop(slot);
        });
    }
}

/// Serve one connection until the client closes it, goes idle, or sends
/// what is not a DNS message.
async fn connection(stream: TcpStream, src: SocketAddr, handler: &Handler) {
    let _ = stream.set_nodelay(true);
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let mut out = Vec::with_capacity(514);
    loop {
        let mut len = [0u8; 2];
        if !matches!(
            tokio::time::timeout(TCP_TIMEOUT, reader.read_exact(&mut len)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if !matches!(
            tokio::time::timeout(TCP_TIMEOUT, reader.read_exact(&mut msg)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        // A response (QR set) is no question: nothing to answer.
        if msg.get(2).is_some_and(|b| b & 0x80 != 0) {
            continue;
        }
        let reply = match handler.answer_bytes(&msg, src).await {
            Some(reply) => reply,
            None => match formerr(&msg) {
                Some(reply) => {
                    handler
                        .metrics()
                        .record(hickory_proto::rr::RecordType::NULL, Outcome::FormErr);
                    reply
                }
                // Not even a header: this is no DNS client.
                None => return,
            },
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            return;
        };
        out.clear();
        out.extend_from_slice(&reply_len.to_be_bytes());
        out.extend_from_slice(&reply);
        if !matches!(
            tokio::time::timeout(TCP_TIMEOUT, writer.write_all(&out)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}
