//! Counters of the DNS server. Plain atomics on the query path (nothing
//! here allocates per query); [`Metrics::snapshot`] copies them into a
//! plain [`Snapshot`], which the binary names and encodes for `/metrics`.

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

    /// A copy of every counter.
    pub fn snapshot(&self) -> Snapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut queries = Vec::new();
        for (ti, row) in self.queries.iter().enumerate() {
            for (oi, c) in row.iter().enumerate() {
                let n = load(c);
                if n > 0 {
                    queries.push(QueryCount {
                        qtype: QTYPES[ti],
                        outcome: OUTCOMES[oi],
                        count: n,
                    });
                }
            }
        }
        Snapshot {
            queries,
            forward_ok: load(&self.forward_ok),
            forward_failed: load(&self.forward_failed),
            forward_overloaded: load(&self.forward_overloaded),
            forward_tcp_retries: load(&self.forward_tcp_retries),
            rate_limited_slip: load(&self.rate_limited_slip),
            rate_limited_drop: load(&self.rate_limited_drop),
            tcp_refused: load(&self.tcp_refused),
        }
    }
}

/// Queries of one type that ended one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryCount {
    /// One of [`QTYPES`].
    pub qtype: &'static str,
    /// One of [`OUTCOMES`].
    pub outcome: &'static str,
    pub count: u64,
}

/// The counters of [`Metrics`] at one moment (the fields are those of
/// [`Metrics`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every (type, outcome) counted at least once.
    pub queries: Vec<QueryCount>,
    pub forward_ok: u64,
    pub forward_failed: u64,
    pub forward_overloaded: u64,
    pub forward_tcp_retries: u64,
    pub rate_limited_slip: u64,
    pub rate_limited_drop: u64,
    pub tcp_refused: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_lists_counted_queries_only() {
        let m = Metrics::default();
        m.record(RecordType::A, Outcome::Answer);
        m.record(RecordType::A, Outcome::Answer);
        m.record(RecordType::MX, Outcome::Forwarded);
        m.forward_ok.fetch_add(1, Ordering::Relaxed);
        let s = m.snapshot();
        assert_eq!(
            s.queries,
            vec![
                QueryCount {
                    qtype: "A",
                    outcome: "answer",
                    count: 2
                },
                QueryCount {
                    qtype: "other",
                    outcome: "forwarded",
                    count: 1
                },
            ]
        );
        assert_eq!(s.forward_ok, 1);
    }
}
