//! Property tests of the query path: whatever bytes arrive, the handler
//! answers with the same id and a parseable message, or nothing; it never
//! panics and never answers a stranger with data.

#![allow(clippy::unwrap_used)] // tests may panic on broken setup

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use portless_dns::{Forwarder, Handler, Health, Member, Metrics, NetworkInput, Zone, ZoneInput};
use proptest::prelude::*;

fn handler() -> Handler {
    let member = |id: &str, ip: &str| Member {
        id: id.into(),
        name: id.into(),
        addrs: vec![ip.parse().unwrap()],
        aliases: vec!["alias".into()],
        service: Some("svc".into()),
        project: Some("proj".into()),
        health: Health::Unknown,
    };
    let zone = Zone::build(&ZoneInput {
        domain: "docker.internal".into(),
        ttl: 5,
        networks: vec![NetworkInput {
            name: "net".into(),
            members: vec![member("a", "10.0.0.2"), member("b", "10.0.0.3")],
            ..Default::default()
        }],
        static_hosts: [(
            "static.test".to_string(),
            vec!["192.0.2.1".parse::<IpAddr>().unwrap()],
        )]
        .into(),
        ingress: vec![(
            "apps.test".into(),
            vec!["192.0.2.80".parse::<IpAddr>().unwrap()],
        )],
        private_ranges: vec!["10.0.0.0/24".parse().unwrap()],
        ..ZoneInput::default()
    });
    let metrics = Arc::new(Metrics::default());
    // No upstream: forwarding fails fast with SERVFAIL, and no packet leaves.
    let forwarder = Arc::new(Forwarder::new(
        vec![],
        Duration::from_millis(50),
        8,
        metrics.clone(),
    ));
    Handler::new(Arc::new(ArcSwap::from_pointee(zone)), forwarder, metrics)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn query_bytes(name: &str, t: RecordType, id: u16) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m.to_vec().unwrap()
}

const HOST: &str = "127.0.0.1:5000";
const CONTAINER: &str = "10.0.0.2:5000";
const STRANGER: &str = "192.0.2.200:5000";

#[test]
fn golden_answers() {
    let rt = rt();
    let h = handler();
    let ask = |name: &str, t: RecordType, src: &str| {
        let bytes = rt
            .block_on(h.answer_bytes(&query_bytes(name, t, 7), src.parse().unwrap()))
            .unwrap();
        Message::from_vec(&bytes).unwrap()
    };
    let m = ask("b.", RecordType::A, CONTAINER);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.answers[0].data.to_string(), "10.0.0.3");
    let m = ask("svc.proj.docker.internal.", RecordType::A, HOST);
    assert_eq!(m.answers.len(), 2);
    let m = ask("zzz.docker.internal.", RecordType::A, HOST);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
    let m = ask("b.docker.internal.", RecordType::TXT, HOST);
    assert_eq!(
        (m.metadata.response_code, m.answers.len()),
        (ResponseCode::NoError, 0)
    );
    let m = ask("static.test.", RecordType::A, STRANGER);
    assert_eq!(
        (m.metadata.response_code, m.answers.len()),
        (ResponseCode::Refused, 0)
    );
    let m = ask("example.com.", RecordType::A, HOST);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
}

/// The SOA in a negative answer says which zone the name is missing from;
/// only names under the domain are in the domain's zone. Static names,
/// ingress zones and reverse names get no SOA of the domain.
#[test]
fn negative_answers_carry_the_domains_soa_only_under_the_domain() {
    let rt = rt();
    let h = handler();
    let ask = |name: &str, t: RecordType| {
        let bytes = rt
            .block_on(h.answer_bytes(&query_bytes(name, t, 9), HOST.parse().unwrap()))
            .unwrap();
        Message::from_vec(&bytes).unwrap()
    };
    for (name, t, code) in [
        ("static.test.", RecordType::AAAA, ResponseCode::NoError),
        ("shop.apps.test.", RecordType::AAAA, ResponseCode::NoError),
        ("shop.apps.test.", RecordType::MX, ResponseCode::NoError),
        (
            "9.0.0.10.in-addr.arpa.",
            RecordType::PTR,
            ResponseCode::NXDomain,
        ),
        (
            "2.0.0.10.in-addr.arpa.",
            RecordType::A,
            ResponseCode::NoError,
        ),
    ] {
        let m = ask(name, t);
        assert_eq!(m.metadata.response_code, code, "{name} {t}");
        assert!(m.answers.is_empty(), "{name} {t}");
        assert!(
            m.authorities.is_empty(),
            "{name} {t}: no SOA of docker.internal: {:?}",
            m.authorities
        );
    }
    for (name, t) in [
        ("zzz.docker.internal.", RecordType::A),
        ("a.docker.internal.", RecordType::AAAA),
    ] {
        let m = ask(name, t);
        assert_eq!(
            m.authorities.first().map(|r| r.record_type()),
            Some(RecordType::SOA),
            "{name} {t}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic_and_keep_the_id(bytes in proptest::collection::vec(any::<u8>(), 0..600), from in 0usize..3) {
        let src: SocketAddr = [HOST, CONTAINER, STRANGER][from].parse().unwrap();
        let rt = rt();
        if let Some(resp) = rt.block_on(handler().answer_bytes(&bytes, src)) {
            let m = Message::from_vec(&resp).expect("our response parses");
            prop_assert_eq!(m.metadata.message_type, MessageType::Response);
            prop_assert_eq!(&resp[..2], &bytes[..2]);
            if from == 2 {
                prop_assert!(m.answers.is_empty(), "a stranger got data");
            }
        }
    }

    #[test]
    fn mutated_queries_never_panic(flips in proptest::collection::vec((0usize..64, any::<u8>()), 1..6), name in "[a-z]{1,10}", t in 0u16..300) {
        let mut bytes = query_bytes(&format!("{name}.docker.internal."), RecordType::from(t), 0x4242);
        for (i, b) in flips {
            let len = bytes.len();
            bytes[i % len] = b;
        }
        let rt = rt();
        if let Some(resp) = rt.block_on(handler().answer_bytes(&bytes, HOST.parse().unwrap())) {
            prop_assert!(Message::from_vec(&resp).is_ok());
        }
    }
}

/// The UDP fast path's reply and the full path's (hickory's decoder and
/// encoder), for the same datagram from the same client: both None when
/// the fast path leaves it to the full one.
fn both_paths(h: &Handler, bytes: &[u8], src: SocketAddr) -> (Option<Message>, Option<Message>) {
    use hickory_server::net::xfer::Protocol;
    use hickory_server::server::Request;
    use portless_dns::handler::Decision;
    let fast = portless_dns::wire::Query::parse(bytes).and_then(|q| {
        let (mut key, mut out) = (String::new(), Vec::new());
        h.answer_wire(&q, src.ip(), &mut key, &mut out)
            .then(|| Message::from_vec(&out).unwrap())
    });
    if fast.is_none() {
        return (None, None);
    }
    let full = Request::from_bytes(bytes.to_vec(), src, Protocol::Udp)
        .ok()
        .and_then(|request| match h.decide(&request, src.ip()) {
            Decision::Reply(reply) => {
                let mut out = Vec::new();
                reply.encode_udp(&request.queries, &mut out).unwrap();
                Some(Message::from_vec(&out).unwrap())
            }
            Decision::Forward(_) => None,
        });
    // Addresses come in a fresh random order each time.
    let sorted = |m: Option<Message>| {
        m.map(|mut m| {
            m.answers.sort_by_key(|r| r.data.to_string());
            m
        })
    };
    (sorted(fast), sorted(full))
}

fn query_with(
    name: &str,
    t: RecordType,
    id: u16,
    edns: Option<(u16, bool)>,
    rd: bool,
    cd: bool,
) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = rd;
    m.metadata.checking_disabled = cd;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    if let Some((payload, dnssec_ok)) = edns {
        let mut e = hickory_proto::op::Edns::new();
        e.set_max_payload(payload);
        e.set_dnssec_ok(dnssec_ok);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

#[test]
fn the_fast_path_answers_the_common_queries() {
    let h = handler();
    let host: SocketAddr = HOST.parse().unwrap();
    let container: SocketAddr = CONTAINER.parse().unwrap();
    for (name, src) in [
        ("static.test", host),
        ("STATIC.test", host),
        ("b", container),
        ("b.docker.internal", container),
        ("nosuch.docker.internal", container),
        ("nosuch.docker.internal", host),
    ] {
        for edns in [None, Some((1232, false)), Some((4096, true))] {
            let q = query_with(name, RecordType::A, 7, edns, true, false);
            let (fast, full) = both_paths(&h, &q, src);
            assert!(
                fast.is_some(),
                "{name} from {src} ({edns:?}) not on the fast path"
            );
            assert_eq!(fast, full, "{name} from {src} ({edns:?})");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever the fast path answers, the full path answers the same
    /// (header, question, records, OPT).
    #[test]
    fn the_fast_path_answers_as_the_full_path(
        name in prop_oneof![
            Just("static.test".to_string()),
            Just("Static.Test".to_string()),
            Just("a".to_string()),
            Just("b.docker.internal".to_string()),
            Just("alias".to_string()),
            Just("svc".to_string()),
            Just("svc.proj.docker.internal".to_string()),
            Just("docker.internal".to_string()),
            Just("x.apps.test".to_string()),
            Just("2.0.0.10.in-addr.arpa".to_string()),
            "[a-z]{1,8}(\\.[a-z]{1,8}){0,2}(\\.docker\\.internal)?",
        ],
        t in prop_oneof![
            Just(RecordType::A), Just(RecordType::AAAA), Just(RecordType::ANY),
            Just(RecordType::SOA), Just(RecordType::MX), Just(RecordType::PTR),
        ],
        edns in proptest::option::of((0u16..5000, any::<bool>())),
        rd in any::<bool>(),
        cd in any::<bool>(),
        id in any::<u16>(),
        from in 0usize..3,
    ) {
        let h = handler();
        let src: SocketAddr = [HOST, CONTAINER, STRANGER][from].parse().unwrap();
        let q = query_with(&name, t, id, edns, rd, cd);
        let (fast, full) = both_paths(&h, &q, src);
        if fast.is_some() {
            prop_assert_eq!(fast, full);
        }
    }

    /// Mangled datagrams (bytes overwritten, cut or appended, EDNS or
    /// not): whatever the fast path accepts and answers, the full path
    /// answers the same; it never panics on the rest.
    #[test]
    fn the_fast_path_agrees_on_mangled_queries(
        flips in proptest::collection::vec((0usize..80, any::<u8>()), 0..4),
        cut in proptest::option::of(0usize..80),
        extra in proptest::collection::vec(any::<u8>(), 0..3),
        name in prop_oneof![Just("static.test".to_string()), Just("b".to_string()), "[a-z]{1,6}(\\.docker\\.internal)?"],
        edns in proptest::option::of((0u16..5000, any::<bool>())),
        from in 0usize..3,
    ) {
        let h = handler();
        let src: SocketAddr = [HOST, CONTAINER, STRANGER][from].parse().unwrap();
        let mut bytes = query_with(&name, RecordType::A, 0x4242, edns, true, false);
        for (i, b) in flips {
            let len = bytes.len();
            bytes[i % len] = b;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut);
        }
        bytes.extend_from_slice(&extra);
        let (fast, full) = both_paths(&h, &bytes, src);
        if fast.is_some() {
            prop_assert_eq!(fast, full);
        }
    }
}
