//! The upstream forwarder.
//!
//! Relays a question to the configured upstreams in order and hands back
//! their answer as it is: response code, records and TTLs. UDP first, TCP
//! when the UDP answer is truncated. An upstream that times out, fails, or
//! answers SERVFAIL or REFUSED makes way for the next one. The whole
//! exchange is bounded in time, and the number of exchanges in flight is
//! bounded too: past the bound the caller gets [`ForwardError::Overloaded`]
//! at once, never a queue.
//!
//! Upstream health is remembered, as dnsmasq and unbound do: an upstream
//! that times out or fails is *down*. Queries then go to the live ones
//! first, in the configured order (which stays meaningful: a first
//! upstream may know names the others do not), and to a down one only
//! when every live one has failed. A down upstream is probed in the
//! background (a root NS question; any answer will do) after a back-off
//! of 1 s doubling to 30 s, and is back in line as soon as it answers.
//! Round-trip times are kept per upstream for the status page.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
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
    /// One per upstream, same order.
    health: Arc<Vec<UpstreamHealth>>,
    /// The clock of `UpstreamHealth::retry_at_ms`.
    epoch: Instant,
    budget: Duration,
    inflight: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

/// What is remembered of one upstream.
#[derive(Debug, Default)]
struct UpstreamHealth {
    /// Failures (timeouts, errors) since its last answer; 0: live.
    fails: AtomicU32,
    /// While down: when (ms after `Forwarder::epoch`) to probe it next.
    retry_at_ms: AtomicU64,
    /// Smoothed round-trip time in microseconds; 0: none measured yet.
    srtt_us: AtomicU64,
    /// A probe is in flight.
    probing: AtomicBool,
}

impl UpstreamHealth {
    fn answered(&self, rtt: Duration) {
        self.fails.store(0, Ordering::Relaxed);
        let sample = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
        let old = self.srtt_us.load(Ordering::Relaxed);
        // An exponential average, 1/8 for the new sample, as TCP's SRTT.
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.srtt_us.store(new, Ordering::Relaxed);
    }

    fn failed(&self, now_ms: u64) {
        let fails = self.fails.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        self.retry_at_ms
            .store(now_ms + backoff_ms(fails), Ordering::Relaxed);
    }
}

/// How long a down upstream waits for its next probe after `fails`
/// failures in a row: 1 s, doubling, at most 30 s.
fn backoff_ms(fails: u32) -> u64 {
    (1000u64 << fails.saturating_sub(1).min(5)).min(30_000)
}

/// The order to try upstreams in: the live ones (`down[i]` false) in the
/// configured order, then the down ones, as a last resort.
fn try_order(down: &[bool]) -> Vec<usize> {
    let live = (0..down.len()).filter(|&i| !down[i]);
    live.chain((0..down.len()).filter(|&i| down[i])).collect()
}

/// One upstream as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamStatus {
    pub addr: SocketAddr,
    pub up: bool,
    /// Smoothed round-trip time; None until one was measured.
    pub srtt: Option<Duration>,
}

/// Largest UDP answer we ask upstreams for (the DNS flag day 2020 value).
const UDP_PAYLOAD: u16 = 1232;

/// Time budget of one forwarded query over all upstreams, unless
/// configured.
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(3);

/// Forwarded queries in flight at once, unless configured.
pub const DEFAULT_MAX_INFLIGHT: usize = 1024;

impl Forwarder {
    pub fn new(
        upstreams: Vec<SocketAddr>,
        budget: Duration,
        max_inflight: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            health: Arc::new(
                upstreams
                    .iter()
                    .map(|_| UpstreamHealth::default())
                    .collect(),
            ),
            epoch: Instant::now(),
            upstreams,
            budget,
            inflight: Arc::new(Semaphore::new(max_inflight)),
            metrics,
        }
    }

    /// Every upstream with its health, in the configured order.
    pub fn upstream_status(&self) -> Vec<UpstreamStatus> {
        self.upstreams
            .iter()
            .zip(self.health.iter())
            .map(|(addr, h)| {
                let srtt = h.srtt_us.load(Ordering::Relaxed);
                UpstreamStatus {
                    addr: *addr,
                    up: h.fails.load(Ordering::Relaxed) == 0,
                    srtt: (srtt > 0).then(|| Duration::from_micros(srtt)),
                }
            })
            .collect()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Probe, in the background, the down upstreams whose back-off has run
    /// out; at most one probe per upstream at a time.
    fn probe_due(&self) {
        let now = self.now_ms();
        for (i, h) in self.health.iter().enumerate() {
            if h.fails.load(Ordering::Relaxed) == 0
                || h.retry_at_ms.load(Ordering::Relaxed) > now
                || h.probing.swap(true, Ordering::Relaxed)
            {
                continue;
            }
            let (health, upstream, epoch) = (self.health.clone(), self.upstreams[i], self.epoch);
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                h.probing.store(false, Ordering::Relaxed);
                return;
            };
            runtime.spawn(async move {
                let h = &health[i];
                let root = Query::query(
                    hickory_proto::rr::Name::root(),
                    hickory_proto::rr::RecordType::NS,
                );
                let started = Instant::now();
                let probe = exchange_udp_query(upstream, &root);
                match tokio::time::timeout(Duration::from_secs(2), probe).await {
                    Ok(Ok(_)) => {
                        tracing::info!(%upstream, "upstream answers again");
                        h.answered(started.elapsed());
                    }
                    _ => h.failed(u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)),
                }
                h.probing.store(false, Ordering::Relaxed);
            });
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
        self.probe_due();
        let down: Vec<bool> = self
            .health
            .iter()
            .map(|h| h.fails.load(Ordering::Relaxed) > 0)
            .collect();
        let order = try_order(&down);
        for (tried, &u) in order.iter().enumerate() {
            let upstream = &self.upstreams[u];
            let health = &self.health[u];
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let left = (order.len() - tried) as u32;
            let attempt_deadline = now + (deadline - now) / left;
            let result = timeout_at(
                attempt_deadline,
                self.exchange(*upstream, query, rd, dnssec_ok),
            )
            .await;
            match &result {
                Ok(Ok(_)) => health.answered(now.elapsed()),
                // A down upstream tried as a last resort keeps its probe
                // schedule; a live one that fails goes down.
                _ if down[u] => {}
                _ => {
                    tracing::info!(%upstream, "upstream down: passed over until a probe gets an answer");
                    health.failed(self.now_ms());
                }
            }
            match result {
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

/// A single question over UDP, for probes.
async fn exchange_udp_query(upstream: SocketAddr, query: &Query) -> std::io::Result<Message> {
    let id: u16 = rand::random();
    let mut msg = Message::query();
    msg.metadata.id = id;
    msg.metadata.recursion_desired = true;
    msg.add_query(query.clone());
    let bytes = msg.to_vec().map_err(std::io::Error::other)?;
    exchange_udp(upstream, &bytes, id, query).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_upstreams_go_first_in_their_order_and_down_ones_last() {
        assert_eq!(try_order(&[false, false, false]), vec![0, 1, 2]);
        assert_eq!(try_order(&[true, false, false]), vec![1, 2, 0]);
        assert_eq!(try_order(&[false, true, false]), vec![0, 2, 1]);
        assert_eq!(try_order(&[true, true]), vec![0, 1]);
    }

    #[test]
    fn probes_back_off_from_one_second_to_thirty() {
        let got: Vec<u64> = (1..=8).map(backoff_ms).collect();
        assert_eq!(
            got,
            vec![1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]
        );
    }

    #[test]
    fn an_answer_brings_an_upstream_back_and_averages_its_rtt() {
        let h = UpstreamHealth::default();
        h.failed(0);
        h.failed(0);
        assert_eq!(h.fails.load(Ordering::Relaxed), 2);
        assert_eq!(h.retry_at_ms.load(Ordering::Relaxed), 2000);
        h.answered(Duration::from_millis(8));
        assert_eq!(h.fails.load(Ordering::Relaxed), 0);
        assert_eq!(h.srtt_us.load(Ordering::Relaxed), 8000);
        h.answered(Duration::from_millis(16));
        assert_eq!(h.srtt_us.load(Ordering::Relaxed), 9000);
    }
}
