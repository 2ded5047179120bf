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
