//! The upstream forwarder.
//!
//! Relays a question to the configured upstreams in order and hands back
//! their answer as it is: response code, records and TTLs. UDP first, TCP
//! when the UDP answer is truncated. An upstream that times out, fails, or
//! answers SERVFAIL or REFUSED makes way for the next one. The whole
//! exchange is bounded in time, and the number of exchanges in flight is
//! bounded too: past the bound the caller gets [`ForwardError::Overloaded`]
//! at once, never a queue.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, timeout_at};

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("too many forwarded queries in flight")]
    Overloaded,
    #[error("no upstream resolver is configured")]
    NoUpstreams,
    #[error("no upstream answered: {0}")]
    Failed(String),
}

#[derive(Debug)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    budget: Duration,
    inflight: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

/// Largest UDP answer we ask upstreams for (the DNS flag day 2020 value).
const UDP_PAYLOAD: u16 = 1232;

impl Forwarder {
    pub fn new(
        upstreams: Vec<SocketAddr>,
        budget: Duration,
        max_inflight: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            upstreams,
            budget,
            inflight: Arc::new(Semaphore::new(max_inflight)),
            metrics,
        }
    }

    /// Take a place among the queries in flight, or None (counted as
    /// overloaded) when the bound is reached. Taken before any task is
    /// spawned for the query, so the bound holds for tasks too.
    pub fn try_reserve(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.inflight.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.metrics
                .forward_overloaded
                .fetch_add(1, Ordering::Relaxed);
        }
        permit
    }

    /// Ask the upstreams `query`. `Ok` carries the first usable answer, or
    /// when every upstream answered SERVFAIL/REFUSED, the last of those.
    /// Holds `_place` (from [`Self::try_reserve`])
    /// until done.
    pub async fn forward(
        &self,
        _place: OwnedSemaphorePermit,
        query: &Query,
        recursion_desired: bool,
        dnssec_ok: bool,
    ) -> Result<Message, ForwardError> {
        if self.upstreams.is_empty() {
            self.metrics.forward_failed.fetch_add(1, Ordering::Relaxed);
            return Err(ForwardError::NoUpstreams);
        }
        let result = self
            .try_upstreams(query, recursion_desired, dnssec_ok)
            .await;
        let counter = if result.is_ok() {
            &self.metrics.forward_ok
        } else {
            &self.metrics.forward_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    async fn try_upstreams(
        &self,
        query: &Query,
        rd: bool,
        dnssec_ok: bool,
    ) -> Result<Message, ForwardError> {
        let deadline = Instant::now() + self.budget;
        // Each upstream gets an equal share of what is left, so that a dead
        // first upstream does not eat the whole budget.
        let mut last_answer: Option<Message> = None;
        let mut last_error = String::from("timed out");
        for (i, upstream) in self.upstreams.iter().enumerate() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let left = (self.upstreams.len() - i) as u32;
            let attempt_deadline = now + (deadline - now) / left;
            match timeout_at(
                attempt_deadline,
                self.exchange(*upstream, query, rd, dnssec_ok),
            )
            .await
            {
                Ok(Ok(answer)) => match answer.metadata.response_code {
                    ResponseCode::ServFail | ResponseCode::Refused => {
                        tracing::debug!(%upstream, rcode = %answer.metadata.response_code, "upstream declined, trying the next");
                        last_answer = Some(answer);
                    }
                    _ => return Ok(answer),
                },
                Ok(Err(e)) => {
                    tracing::debug!(%upstream, error = %e, "upstream failed");
                    last_error = format!("{upstream}: {e}");
                }
                Err(_) => {
                    tracing::debug!(%upstream, "upstream timed out");
                    last_error = format!("{upstream}: timed out");
                }
            }
        }
        last_answer.ok_or(ForwardError::Failed(last_error))
    }

    async fn exchange(
        &self,
        upstream: SocketAddr,
        query: &Query,
        rd: bool,
        dnssec_ok: bool,
    ) -> std::io::Result<Message> {
        let id: u16 = rand::random();
        let mut msg = Message::query();
        msg.metadata.id = id;
        msg.metadata.recursion_desired = rd;
        msg.add_query(query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_PAYLOAD);
        edns.set_dnssec_ok(dnssec_ok);
        msg.set_edns(edns);
        let bytes = msg.to_vec().map_err(std::io::Error::other)?;

        let answer = exchange_udp(upstream, &bytes, id, query).await?;
        if !answer.metadata.truncation {
            return Ok(answer);
        }
        self.metrics
            .forward_tcp_retries
            .fetch_add(1, Ordering::Relaxed);
        match exchange_tcp(upstream, &bytes, id, query).await {
            Ok(full) => Ok(full),
            // The truncated answer is still an answer: relayed with TC set,
            // the client can try TCP itself.
            Err(e) => {
                tracing::debug!(%upstream, error = %e, "TCP retry failed; relaying the truncated answer");
                Ok(answer)
            }
        }
    }
}

fn matches(answer: &Message, id: u16, query: &Query) -> bool {
    answer.metadata.id == id
        && answer.queries.len() == 1
        && answer.queries[0].query_type() == query.query_type()
        && answer.queries[0].name().eq_case(query.name())
            | (answer.queries[0].name() == query.name())
}

async fn exchange_udp(
    upstream: SocketAddr,
    bytes: &[u8],
    id: u16,
    query: &Query,
) -> std::io::Result<Message> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(upstream).await?;
    socket.send(bytes).await?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Anything that is not the answer to our question (wrong id, wrong
        // question, garbage) is ignored, as a resolver must.
        match Message::from_vec(&buf[..n]) {
            Ok(answer) if matches(&answer, id, query) => return Ok(answer),
            _ => continue,
        }
    }
}

async fn exchange_tcp(
    upstream: SocketAddr,
    bytes: &[u8],
    id: u16,
    query: &Query,
) -> std::io::Result<Message> {
    let mut stream = TcpStream::connect(upstream).await?;
    let len = u16::try_from(bytes.len()).map_err(std::io::Error::other)?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    let answer = Message::from_vec(&buf).map_err(std::io::Error::other)?;
    if !matches(&answer, id, query) {
        return Err(std::io::Error::other(
            "upstream answered another question over TCP",
        ));
    }
    Ok(answer)
}
