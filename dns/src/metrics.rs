//! Counters of the DNS server. Plain atomics, read by the binary's
//! `/metrics` endpoint; nothing here allocates per query.

use std::sync::atomic::{AtomicU64, Ordering};

use hickory_proto::rr::RecordType;

/// Query types that get a counter of their own; the rest count as `other`.
pub const QTYPES: [&str; 6] = ["A", "AAAA", "PTR", "SOA", "ANY", "other"];

/// How a query ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answer = 0,
    NoData,
    NxDomain,
    Forwarded,
    Refused,
    ServFail,
    FormErr,
    NotImp,
}

pub const OUTCOMES: [&str; 8] = [
    "answer",
    "nodata",
    "nxdomain",
    "forwarded",
    "refused",
    "servfail",
    "formerr",
    "notimp",
];

#[derive(Debug, Default)]
pub struct Metrics {
    queries: [[AtomicU64; OUTCOMES.len()]; QTYPES.len()],
    /// Forwarded queries by result: ok, failed (every upstream failed or
    /// timed out), overloaded (over the in-flight bound).
    pub forward_ok: AtomicU64,
    pub forward_failed: AtomicU64,
    pub forward_overloaded: AtomicU64,
    /// Retries over TCP after a truncated UDP answer.
    pub forward_tcp_retries: AtomicU64,
    /// UDP queries over their client's rate limit, answered with TC=1
    /// (slip) or dropped.
    pub rate_limited_slip: AtomicU64,
    pub rate_limited_drop: AtomicU64,
    /// TCP connections closed at once: the connection cap was reached.
    pub tcp_refused: AtomicU64,
}

fn qtype_index(t: RecordType) -> usize {
    match t {
        RecordType::A => 0,
        RecordType::AAAA => 1,
        RecordType::PTR => 2,
        RecordType::SOA => 3,
        RecordType::ANY => 4,
        _ => 5,
    }
}

impl Metrics {
    pub fn record(&self, qtype: RecordType, outcome: Outcome) {
        self.queries[qtype_index(qtype)][outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Every (qtype, outcome, count) with a non-zero count.
    pub fn queries(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::new();
        for (ti, row) in self.queries.iter().enumerate() {
            for (oi, c) in row.iter().enumerate() {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    out.push((QTYPES[ti], OUTCOMES[oi], n));
                }
            }
        }
        out
    }
}
