//! The hickory-server request handler: decode, scope, answer or forward.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::{Edns, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

use crate::forward::Forwarder;
use crate::metrics::{Metrics, Outcome};
use crate::zone::{Answer, Zone, ZoneHandle};

/// Answers from the live zone, forwards the rest.
#[derive(Clone)]
pub struct Handler {
    zone: ZoneHandle,
    forwarder: Arc<Forwarder>,
    metrics: Arc<Metrics>,
}

impl Handler {
    pub fn new(zone: ZoneHandle, forwarder: Arc<Forwarder>, metrics: Arc<Metrics>) -> Self {
        Self {
            zone,
            forwarder,
            metrics,
        }
    }
}

fn soa_record(zone: &Zone) -> Record {
    let apex = zone.domain().clone();
    let mname = Name::from_ascii("ns")
        .ok()
        .and_then(|n| n.append_domain(&apex).ok())
        .unwrap_or_else(|| apex.clone());
    let rname = Name::from_ascii("hostmaster")
        .ok()
        .and_then(|n| n.append_domain(&apex).ok())
        .unwrap_or_else(|| apex.clone());
    let ttl = zone.ttl();
    Record::from_rdata(
        apex,
        ttl,
        RData::SOA(SOA::new(
            mname,
            rname,
            zone.serial(),
            3600,
            600,
            86_400,
            ttl,
        )),
    )
}

async fn send<R: ResponseHandler>(
    request: &Request,
    response_handle: &mut R,
    edns: Option<&Edns>,
    metadata: Metadata,
    answers: &[Record],
    authorities: &[Record],
    additionals: &[Record],
) -> ResponseInfo {
    let mut builder = MessageResponseBuilder::new(&request.queries, None);
    if let Some(edns) = edns {
        builder.edns(edns);
    }
    let response = builder.build(
        metadata,
        answers.iter(),
        authorities.iter(),
        std::iter::empty(),
        additionals.iter(),
    );
    match response_handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, src = %request.src(), "failed to send a response");
            let mut failed = metadata;
            failed.response_code = ResponseCode::ServFail;
            hickory_proto::op::Header {
                metadata: failed,
                counts: Default::default(),
            }
            .into()
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;

        let resp_edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().max(512));
            e.set_version(0);
            e.set_dnssec_ok(req.flags().dnssec_ok);
            e
        });
        let qtype = request
            .queries
            .queries()
            .first()
            .map(|q| q.query_type())
            .unwrap_or(RecordType::NULL);
        let mut fail = |code: ResponseCode, outcome: Outcome| {
            self.metrics.record(qtype, outcome);
            metadata.response_code = code;
            metadata
        };
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            let m = fail(ResponseCode::BADVERS, Outcome::FormErr);
            return send(
                request,
                &mut response_handle,
                resp_edns.as_ref(),
                m,
                &[],
                &[],
                &[],
            )
            .await;
        }
        if request.metadata.op_code != OpCode::Query {
            let m = fail(ResponseCode::NotImp, Outcome::NotImp);
            return send(
                request,
                &mut response_handle,
                resp_edns.as_ref(),
                m,
                &[],
                &[],
                &[],
            )
            .await;
        }
        let Ok(info) = request.request_info() else {
            let m = fail(ResponseCode::FormErr, Outcome::FormErr);
            return send(
                request,
                &mut response_handle,
                resp_edns.as_ref(),
                m,
                &[],
                &[],
                &[],
            )
            .await;
        };
        let query = info.query;
        let client: IpAddr = request.src().ip();
        let zone = self.zone.load();
        let answer = if query.query_class() == DNSClass::IN {
            zone.answer(client, query.name(), qtype)
        } else if zone.is_host_client(client) {
            Answer::Forward
        } else {
            Answer::Refused
        };
        let owner = query.original().name().clone();
        let ttl = zone.ttl();
        match answer {
            Answer::Addrs(addrs) => {
                self.metrics.record(qtype, Outcome::Answer);
                metadata.authoritative = true;
                let records: Vec<Record> = addrs
                    .into_iter()
                    .map(|a| match a {
                        IpAddr::V4(v4) => Record::from_rdata(owner.clone(), ttl, RData::A(A(v4))),
                        IpAddr::V6(v6) => {
                            Record::from_rdata(owner.clone(), ttl, RData::AAAA(AAAA(v6)))
                        }
                    })
                    .collect();
                send(
                    request,
                    &mut response_handle,
                    resp_edns.as_ref(),
                    metadata,
                    &records,
                    &[],
                    &[],
                )
                .await
            }
            Answer::Ptr(target) => {
                self.metrics.record(qtype, Outcome::Answer);
                metadata.authoritative = true;
                let records = [Record::from_rdata(owner, ttl, RData::PTR(PTR(target)))];
                send(
                    request,
                    &mut response_handle,
                    resp_edns.as_ref(),
                    metadata,
                    &records,
                    &[],
                    &[],
                )
                .await
            }
            Answer::Soa => {
                self.metrics.record(qtype, Outcome::Answer);
                metadata.authoritative = true;
                let records = [soa_record(&zone)];
                send(
                    request,
                    &mut response_handle,
                    resp_edns.as_ref(),
                    metadata,
                    &records,
                    &[],
                    &[],
                )
                .await
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
                metadata.authoritative = true;
                metadata.response_code = if nx {
                    ResponseCode::NXDomain
                } else {
                    ResponseCode::NoError
                };
                let soa = [soa_record(&zone)];
                send(
                    request,
                    &mut response_handle,
                    resp_edns.as_ref(),
                    metadata,
                    &[],
                    &soa,
                    &[],
                )
                .await
            }
            Answer::Refused => {
                let m = fail(ResponseCode::Refused, Outcome::Refused);
                send(
                    request,
                    &mut response_handle,
                    resp_edns.as_ref(),
                    m,
                    &[],
                    &[],
                    &[],
                )
                .await
            }
            Answer::Forward => {
                // Do not hold the zone snapshot across the upstream wait.
                drop(zone);
                let dnssec_ok = resp_edns.as_ref().is_some_and(|e| e.flags().dnssec_ok);
                match self
                    .forwarder
                    .forward(
                        query.original(),
                        request.metadata.recursion_desired,
                        dnssec_ok,
                    )
                    .await
                {
                    Ok(upstream) => {
                        self.metrics.record(qtype, Outcome::Forwarded);
                        metadata.response_code = upstream.metadata.response_code;
                        metadata.authoritative = upstream.metadata.authoritative;
                        metadata.recursion_available = upstream.metadata.recursion_available;
                        metadata.authentic_data = upstream.metadata.authentic_data;
                        send(
                            request,
                            &mut response_handle,
                            resp_edns.as_ref(),
                            metadata,
                            &upstream.answers,
                            &upstream.authorities,
                            &upstream.additionals,
                        )
                        .await
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, name = %query.name(), "forwarding failed");
                        let m = fail(ResponseCode::ServFail, Outcome::ServFail);
                        send(
                            request,
                            &mut response_handle,
                            resp_edns.as_ref(),
                            m,
                            &[],
                            &[],
                            &[],
                        )
                        .await
                    }
                }
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
        response: hickory_server::zone_handler::MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, hickory_server::net::NetError> {
        let mut buf = Vec::with_capacity(512);
        let mut encoder = hickory_proto::serialize::binary::BinEncoder::new(&mut buf);
        encoder.set_max_size(u16::MAX);
        let info = response.destructive_emit(&mut encoder)?;
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(buf);
        }
        Ok(info)
    }
}

impl Handler {
    /// Answer one message given as wire bytes from `src`, as the server
    /// would over TCP, and return the encoded response. `None` when the
    /// bytes are not a DNS message at all (the server then answers FORMERR
    /// from the header, or drops them). For property tests, fuzzing and
    /// benchmarks of the query path without sockets.
    pub async fn answer_bytes(&self, bytes: &[u8], src: std::net::SocketAddr) -> Option<Vec<u8>> {
        let request = Request::from_bytes(bytes.to_vec(), src, hickory_server::net::xfer::Protocol::Tcp).ok()?;
        let capture = Capture::default();
        self.handle_request::<_, hickory_server::net::runtime::TokioTime>(&request, capture.clone())
            .await;
        capture.0.lock().ok()?.take()
    }
}
