//! Answering one request: decode, scope, answer or forward.
//!
//! [`Handler::decide`] is synchronous: it answers from the zone snapshot or
//! says the question must be forwarded. The UDP loop ([`crate::udp`]) calls
//! it inline, with no task per query; TCP goes through hickory-server's
//! `Server`, for which [`Handler`] is the `RequestHandler`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use hickory_proto::op::{Edns, Header, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};

use crate::forward::Forwarder;
use crate::metrics::{Metrics, Outcome};
use crate::rrl::{RateLimit, RateLimiter, Verdict};
use crate::wire;
use crate::zone::{Answer, Zone, ZoneHandle};

/// Answers from the live zone, forwards the rest.
#[derive(Clone)]
pub struct Handler {
    zone: ZoneHandle,
    forwarder: Arc<Forwarder>,
    metrics: Arc<Metrics>,
    /// Replies per UDP client address, with the start of its clock;
    /// None: unlimited.
    rate_limiter: Option<Arc<(RateLimiter, Instant)>>,
}

/// Largest UDP reply, whatever a client advertises: larger ones would be
/// IP fragments, which firewalls drop. More is there over TCP.
const MAX_UDP_REPLY: u16 = 4096;

/// The UDP payload size our own OPT record advertises: what we accept.
/// 1232 is the DNS Flag Day 2020 size, which needs no IP fragments on any
/// path.
pub const OUR_UDP_PAYLOAD: u16 = 1232;

/// A response ready to encode.
#[derive(Debug)]
pub struct Reply {
    pub metadata: Metadata,
    /// Our OPT record, when the query had one.
    pub edns: Option<Edns>,
    /// The largest UDP reply the client takes: its EDNS payload size
    /// (512 to 4096), or 512 without EDNS.
    pub udp_limit: u16,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

/// A question that must go upstream, with what its response needs.
#[derive(Debug)]
pub struct Pending {
    query: Query,
    qtype: RecordType,
    metadata: Metadata,
    edns: Option<Edns>,
    udp_limit: u16,
    recursion_desired: bool,
    /// Our place among the forwarded queries in flight.
    place: tokio::sync::OwnedSemaphorePermit,
}

/// What [`Handler::decide`] says.
#[derive(Debug)]
pub enum Decision {
    Reply(Reply),
    Forward(Pending),
}

impl Reply {
    fn empty(metadata: Metadata, edns: Option<Edns>, udp_limit: u16) -> Self {
        Reply {
            metadata,
            edns,
            udp_limit,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        }
    }

    /// Build the hickory response for `queries` (the request's question
    /// section, echoed).
    pub fn response<'q>(
        &'q self,
        queries: &'q Queries,
    ) -> MessageResponse<
        'q,
        'q,
        impl Iterator<Item = &'q Record> + Send + 'q,
        impl Iterator<Item = &'q Record> + Send + 'q,
        impl Iterator<Item = &'q Record> + Send + 'q,
        impl Iterator<Item = &'q Record> + Send + 'q,
    > {
        let mut builder = MessageResponseBuilder::new(queries, None);
        if let Some(edns) = &self.edns {
            builder.edns(edns);
        }
        builder.build(
            self.metadata,
            self.answers.iter(),
            self.authorities.iter(),
            std::iter::empty(),
            self.additionals.iter(),
        )
    }

    /// Encode into `out` (cleared first) for UDP: at most `udp_limit`
    /// bytes; what does not fit is left out and TC is set, by hickory's
    /// encoder. The OPT record goes last and is dropped by that encoder
    /// when the records leave less than its 11 bytes: then records are
    /// left out one by one until it fits, so a truncated reply still
    /// speaks EDNS.
    pub fn encode_udp(
        &self,
        queries: &Queries,
        out: &mut Vec<u8>,
    ) -> Result<(), hickory_proto::ProtoError> {
        let (mut an, mut ns, mut ar) = (
            self.answers.len(),
            self.authorities.len(),
            self.additionals.len(),
        );
        let mut truncated = self.metadata.truncation;
        loop {
            self.encode_parts(queries, (an, ns, ar), truncated, out)?;
            if self.edns.is_none() || out.len() < 12 {
                return Ok(());
            }
            let count = |i: usize| usize::from(u16::from_be_bytes([out[i], out[i + 1]]));
            let (got_an, got_ns, got_ar) = (count(6), count(8), count(10));
            if got_ar > ar {
                // Every additional that fitted, and the OPT after them.
                return Ok(());
            }
            // The OPT did not fit: keep what did, less one record.
            truncated = true;
            (an, ns, ar) = (got_an.min(an), got_ns.min(ns), got_ar.min(ar));
            if ar > 0 {
                ar -= 1;
            } else if ns > 0 {
                ns -= 1;
            } else if an > 0 {
                an -= 1;
            } else {
                return Ok(());
            }
        }
    }

    /// Encode the first `counts` records of each section, within
    /// `udp_limit`.
    fn encode_parts(
        &self,
        queries: &Queries,
        (an, ns, ar): (usize, usize, usize),
        truncated: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), hickory_proto::ProtoError> {
        out.clear();
        let mut encoder = BinEncoder::new(out);
        encoder.set_max_size(self.udp_limit.max(512));
        let mut builder = MessageResponseBuilder::new(queries, None);
        if let Some(edns) = &self.edns {
            builder.edns(edns);
        }
        let mut metadata = self.metadata;
        metadata.truncation = truncated;
        builder
            .build(
                metadata,
                self.answers[..an].iter(),
                self.authorities[..ns].iter(),
                std::iter::empty(),
                self.additionals[..ar].iter(),
            )
            .destructive_emit(&mut encoder)?;
        Ok(())
    }
}

fn soa_record(zone: &Zone) -> Record {
    let apex = zone.domain().clone();
    let child = |label: &str| {
        Name::from_ascii(label)
            .ok()
            .and_then(|n| n.append_domain(&apex).ok())
            .unwrap_or_else(|| apex.clone())
    };
    let ttl = zone.ttl();
    Record::from_rdata(
        apex.clone(),
        ttl,
        RData::SOA(SOA::new(
            child("ns"),
            child("hostmaster"),
            zone.serial(),
            3600,
            600,
            86_400,
            ttl,
        )),
    )
}

impl Handler {
    pub fn new(zone: ZoneHandle, forwarder: Arc<Forwarder>, metrics: Arc<Metrics>) -> Self {
        Self {
            zone,
            forwarder,
            metrics,
            rate_limiter: None,
        }
    }

    /// Limit UDP replies per client address (see [`crate::rrl`]).
    pub fn with_rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limiter = Some(Arc::new((RateLimiter::new(limit), Instant::now())));
        self
    }

    /// May a UDP reply go to `client` now? Counts the limited ones.
    /// Loopback is never limited: it cannot be spoofed from outside, and
    /// it is the host's own resolver, asking for every process of the host.
    pub fn rate_verdict(&self, client: IpAddr) -> Verdict {
        let Some((limiter, epoch)) = self.rate_limiter.as_deref() else {
            return Verdict::Answer;
        };
        if client.to_canonical().is_loopback() {
            return Verdict::Answer;
        }
        let verdict = limiter.check(client, epoch.elapsed());
        let counter = match verdict {
            Verdict::Answer => return verdict,
            Verdict::Slip => &self.metrics.rate_limited_slip,
            Verdict::Drop => &self.metrics.rate_limited_drop,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        verdict
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The reply to a query over its client's rate limit, when it slips:
    /// header and question only, with TC=1, so a real client asks again
    /// over TCP. Never larger than the query (no OPT record either).
    pub fn slip(&self, request: &Request) -> Reply {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.truncation = true;
        metadata.recursion_available = true;
        Reply::empty(metadata, None, 512)
    }

    /// The UDP fast path ([`crate::wire`]): when the zone answers `query`
    /// with addresses, NODATA or NXDOMAIN, the reply is written into `out`
    /// (as [`Self::decide`] and [`Reply::encode_udp`] would write it) and
    /// true returned; false for anything else, to be asked of
    /// [`Self::decide`]. `key` is scratch space for the name's text.
    pub fn answer_wire(
        &self,
        query: &wire::Query<'_>,
        client: IpAddr,
        key: &mut String,
        out: &mut Vec<u8>,
    ) -> bool {
        query.key_into(key);
        let zone = self.zone.load();
        let qtype = RecordType::from(query.qtype);
        let Some(answer) = zone.answer_text(client, key, qtype) else {
            return false;
        };
        let (rcode, addrs, outcome) = match &answer {
            Answer::Addrs(addrs) => (wire::Rcode::NoError, addrs.as_slice(), Outcome::Answer),
            Answer::NoData => (wire::Rcode::NoError, &[][..], Outcome::NoData),
            Answer::NxDomain => (wire::Rcode::NxDomain, &[][..], Outcome::NxDomain),
            _ => return false,
        };
        let ttl = zone.ttl();
        // As in decide: negative answers carry our SOA only for names
        // under our domain.
        let soa = (addrs.is_empty() && zone.in_domain(key)).then(|| wire::Soa {
            labels: usize::from(zone.domain().num_labels()),
            ttl,
            serial: zone.serial(),
        });
        let limit = query.udp_limit(MAX_UDP_REPLY);
        if !wire::write_reply(
            query,
            rcode,
            addrs,
            ttl,
            soa.as_ref(),
            OUR_UDP_PAYLOAD,
            limit,
            out,
        ) {
            return false;
        }
        self.metrics.record(qtype, outcome);
        true
    }

    /// Answer from the zone, or say that the question goes upstream.
    pub fn decide(&self, request: &Request, client: IpAddr) -> Decision {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        let edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(OUR_UDP_PAYLOAD);
            e.set_version(0);
            e.set_dnssec_ok(req.flags().dnssec_ok);
            e
        });
        let udp_limit = request
            .edns
            .as_ref()
            .map_or(512, |e| e.max_payload().clamp(512, MAX_UDP_REPLY));
        let qtype = request
            .queries
            .queries()
            .first()
            .map_or(RecordType::NULL, |q| q.query_type());
        let fail = |code: ResponseCode, outcome: Outcome, edns: Option<Edns>| {
            self.metrics.record(qtype, outcome);
            let mut m = metadata;
            m.response_code = code;
            Decision::Reply(Reply::empty(m, edns, udp_limit))
        };
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return fail(ResponseCode::BADVERS, Outcome::FormErr, edns);
        }
        if request.metadata.op_code != OpCode::Query {
            return fail(ResponseCode::NotImp, Outcome::NotImp, edns);
        }
        let Ok(info) = request.request_info() else {
            return fail(ResponseCode::FormErr, Outcome::FormErr, edns);
        };
        let query = info.query;
        let zone = self.zone.load();
        let answer = if query.query_class() == DNSClass::IN {
            zone.answer(client, query.name(), qtype)
        } else if zone.is_host_client(client) {
            Answer::Forward
        } else {
            Answer::Refused
        };
        let owner = || query.original().name().clone();
        let ttl = zone.ttl();
        let mut reply = Reply::empty(metadata, edns, udp_limit);
        match answer {
            Answer::Addrs(addrs) => {
                self.metrics.record(qtype, Outcome::Answer);
                reply.metadata.authoritative = true;
                reply.answers = addrs
                    .into_iter()
                    .map(|a| match a {
                        IpAddr::V4(v4) => Record::from_rdata(owner(), ttl, RData::A(A(v4))),
                        IpAddr::V6(v6) => Record::from_rdata(owner(), ttl, RData::AAAA(AAAA(v6))),
                    })
                    .collect();
            }
            Answer::Txt(values) => {
                self.metrics.record(qtype, Outcome::Answer);
                reply.metadata.authoritative = true;
                reply.answers = values
                    .into_iter()
                    .map(|v| Record::from_rdata(owner(), ttl, RData::TXT(TXT::new(vec![v]))))
                    .collect();
            }
            Answer::Ptr(target) => {
                self.metrics.record(qtype, Outcome::Answer);
                reply.metadata.authoritative = true;
                reply.answers = vec![Record::from_rdata(owner(), ttl, RData::PTR(PTR(target)))];
            }
            Answer::Soa => {
                self.metrics.record(qtype, Outcome::Answer);
                reply.metadata.authoritative = true;
                reply.answers = vec![soa_record(&zone)];
            }
            Answer::NoData | Answer::NxDomain => {
                let nx = answer == Answer::NxDomain;
                self.metrics.record(
                    qtype,
                    if nx {
                        Outcome::NxDomain
                    } else {
                        Outcome::NoData
                    },
                );
                reply.metadata.authoritative = true;
                reply.metadata.response_code = if nx {
                    ResponseCode::NXDomain
                } else {
                    ResponseCode::NoError
                };
                // The SOA says which zone the name is missing from: ours
                // only for names under the domain. Static names, ingress
                // zones and reverse names belong to no zone we have an SOA
                // for, so they get none (RFC 2308 then says not to cache).
                if zone.domain().zone_of(query.original().name()) {
                    reply.authorities = vec![soa_record(&zone)];
                }
            }
            Answer::Refused => return fail(ResponseCode::Refused, Outcome::Refused, reply.edns),
            Answer::Forward => {
                // Over the in-flight bound: SERVFAIL now, never a queue.
                let Some(place) = self.forwarder.try_reserve() else {
                    return fail(ResponseCode::ServFail, Outcome::ServFail, reply.edns);
                };
                return Decision::Forward(Pending {
                    query: query.original().clone(),
                    qtype,
                    metadata,
                    recursion_desired: request.metadata.recursion_desired,
                    edns: reply.edns,
                    udp_limit,
                    place,
                });
            }
        }
        Decision::Reply(reply)
    }

    /// Ask upstream and turn its answer (or failure) into our reply.
    pub async fn forward(&self, pending: Pending) -> Reply {
        let Pending {
            query,
            qtype,
            mut metadata,
            edns,
            udp_limit,
            recursion_desired,
            place,
        } = pending;
        let dnssec_ok = edns.as_ref().is_some_and(|e| e.flags().dnssec_ok);
        match self
            .forwarder
            .forward(place, &query, recursion_desired, dnssec_ok)
            .await
        {
            Ok(upstream) => {
                self.metrics.record(qtype, Outcome::Forwarded);
                metadata.response_code = upstream.metadata.response_code;
                metadata.authoritative = upstream.metadata.authoritative;
                metadata.recursion_available = upstream.metadata.recursion_available;
                metadata.authentic_data = upstream.metadata.authentic_data;
                metadata.truncation = upstream.metadata.truncation;
                Reply {
                    metadata,
                    edns,
                    udp_limit,
                    answers: upstream.answers,
                    authorities: upstream.authorities,
                    additionals: upstream.additionals,
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, name = %query.name(), "forwarding failed");
                self.metrics.record(qtype, Outcome::ServFail);
                metadata.response_code = ResponseCode::ServFail;
                Reply::empty(metadata, edns, udp_limit)
            }
        }
    }

    /// Answer one message given as wire bytes from `src`, as the server
    /// would over TCP, and return the encoded response. `None` when the
    /// bytes are not a DNS message at all (the server then answers FORMERR
    /// from the header, or drops them). For property tests, fuzzing and
    /// benchmarks of the query path without sockets.
    pub async fn answer_bytes(&self, bytes: &[u8], src: SocketAddr) -> Option<Vec<u8>> {
        let request = Request::from_bytes(
            bytes.to_vec(),
            src,
            hickory_server::net::xfer::Protocol::Tcp,
        )
        .ok()?;
        let capture = Capture::default();
        self.handle_request::<_, hickory_server::net::runtime::TokioTime>(
            &request,
            capture.clone(),
        )
        .await;
        capture.0.lock().ok()?.take()
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let reply = match self.decide(request, request.src().ip()) {
            Decision::Reply(reply) => reply,
            Decision::Forward(pending) => self.forward(pending).await,
        };
        match response_handle
            .send_response(reply.response(&request.queries))
            .await
        {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, src = %request.src(), "failed to send a response");
                let mut failed = reply.metadata;
                failed.response_code = ResponseCode::ServFail;
                Header {
                    metadata: failed,
                    counts: Default::default(),
                }
                .into()
            }
        }
    }
}

/// Collects the encoded response instead of sending it.
#[derive(Clone, Default)]
struct Capture(Arc<std::sync::Mutex<Option<Vec<u8>>>>);

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, hickory_server::net::NetError> {
        let mut buf = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut buf);
        encoder.set_max_size(u16::MAX);
        let info = response.destructive_emit(&mut encoder)?;
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(buf);
        }
        Ok(info)
    }
}

/// FORMERR for a message whose header is readable but whose body is not;
/// None when not even the header is (such packets are dropped).
pub(crate) fn formerr(bytes: &[u8]) -> Option<Vec<u8>> {
    let header = Header::read(&mut BinDecoder::new(bytes)).ok()?;
    if header.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut metadata = Metadata::response_from_request(&header.metadata);
    metadata.response_code = ResponseCode::FormErr;
    let mut out = Vec::with_capacity(12);
    Header {
        metadata,
        counts: Default::default(),
    }
    .emit(&mut BinEncoder::new(&mut out))
    .ok()?;
    Some(out)
}
