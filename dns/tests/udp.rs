//! The UDP path over real loopback sockets: bursts that the server takes
//! in batches (recvmmsg) and answers in batches (sendmmsg), from several
//! client sockets at once, served by several UDP threads.

#![allow(clippy::unwrap_used)] // tests may panic on broken setup
#![allow(clippy::disallowed_methods)] // std::thread::sleep: a test thread, no tokio worker

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use portless_dns::{Forwarder, Handler, Listeners, Metrics, Zone, ZoneInput};

fn handler() -> Handler {
    let zone = Zone::build(&ZoneInput {
        domain: "docker.internal".into(),
        ttl: 5,
        static_hosts: [(
            "static.test".to_string(),
            vec!["192.0.2.1".parse::<IpAddr>().unwrap()],
        )]
        .into(),
        txt: [(
            "_acme-challenge.static.test".to_string(),
            vec!["first".to_string(), "second".to_string()],
        )]
        .into(),
        ..ZoneInput::default()
    });
    let metrics = Arc::new(Metrics::default());
    // No upstream: nothing leaves the host.
    let forwarder = Arc::new(Forwarder::new(
        vec![],
        Duration::from_millis(50),
        8,
        metrics.clone(),
    ));
    Handler::new(Arc::new(ArcSwap::from_pointee(zone)), forwarder, metrics)
}

fn query(name: &str, id: u16) -> Vec<u8> {
    query_type(name, id, RecordType::A)
}

fn query_type(name: &str, id: u16, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

/// Send queries `ids` from `socket` without reading, then read every reply
/// into `good` (ids answered with 192.0.2.1); returns the count of other
/// replies.
fn burst(
    socket: &UdpSocket,
    server: SocketAddr,
    ids: std::ops::Range<u16>,
    good: &mut HashSet<u16>,
) -> usize {
    let n = ids.len();
    for id in ids {
        socket.send_to(&query("static.test", id), server).unwrap();
    }
    let before = good.len();
    let mut other = 0;
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while good.len() - before + other < n && Instant::now() < deadline {
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            break;
        };
        assert_eq!(from, server, "a reply from another address");
        let reply = Message::from_vec(&buf[..len]).unwrap();
        let answered = reply.metadata.response_code == ResponseCode::NoError
            && reply.answers.len() == 1
            && matches!(reply.answers[0].data, RData::A(a) if a.0 == std::net::Ipv4Addr::new(192, 0, 2, 1));
        if answered && good.insert(reply.metadata.id) {
            continue;
        }
        other += 1;
    }
    other
}

#[test]
fn bursts_from_many_sockets_are_all_answered_to_their_own_source() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut listeners, server) = rt.block_on(async {
        let mut l = Listeners::with_udp_threads(handler(), 16, 2);
        let addr = l.add("127.0.0.1:0".parse().unwrap()).await.unwrap();
        (l, addr)
    });
    // Several client sockets at once, each with bursts larger than one
    // batch, so the server's receive queue holds datagrams of several
    // sources when it takes a batch. 100 at a time: the replies wait in
    // the client's receive buffer (~200 KiB by default) until read.
    let clients: Vec<std::thread::JoinHandle<(HashSet<u16>, usize)>> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                let mut good = HashSet::new();
                let mut other = 0;
                for round in 0..5 {
                    other += burst(&socket, server, round * 100..round * 100 + 100, &mut good);
                }
                (good, other)
            })
        })
        .collect();
    for c in clients {
        let (good, other) = c.join().unwrap();
        assert_eq!(other, 0, "replies that were not the answer, or twice");
        assert_eq!(good.len(), 500, "every query of the burst answered");
    }

    // A datagram that is no DNS message among good ones: FORMERR for the
    // readable header, and the queries around it still answered.
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    socket.send_to(&query("static.test", 1), server).unwrap();
    let mut bad = query("static.test", 2);
    bad.truncate(14);
    socket.send_to(&bad, server).unwrap();
    socket.send_to(&query("static.test", 3), server).unwrap();
    let mut codes = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..3 {
        let (len, _) = socket.recv_from(&mut buf).unwrap();
        let reply = Message::from_vec(&buf[..len]).unwrap();
        codes.push((reply.metadata.id, reply.metadata.response_code));
    }
    codes.sort_by_key(|c| c.0);
    assert_eq!(
        codes,
        vec![
            (1, ResponseCode::NoError),
            (2, ResponseCode::FormErr),
            (3, ResponseCode::NoError)
        ]
    );

    // Removed: no thread answers any more.
    listeners.remove(&server);
    std::thread::sleep(Duration::from_millis(200));
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    for id in 10..20 {
        let _ = socket.send_to(&query("static.test", id), server);
    }
    assert!(
        socket.recv_from(&mut buf).is_err(),
        "a removed listener still answers"
    );
    drop(listeners);
    drop(rt);
}

/// TXT records of the zone (ACME DNS-01 challenges) over a real socket:
/// one record per value for TXT, NODATA for an address type.
#[test]
fn txt_records_are_answered_over_udp() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (listeners, server) = rt.block_on(async {
        let mut l = Listeners::with_udp_threads(handler(), 16, 1);
        let addr = l.add("127.0.0.1:0".parse().unwrap()).await.unwrap();
        (l, addr)
    });
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let ask = |qtype| {
        socket
            .send_to(
                &query_type("_acme-challenge.static.test.", 7, qtype),
                server,
            )
            .unwrap();
        let mut buf = [0u8; 4096];
        let (len, _) = socket.recv_from(&mut buf).unwrap();
        Message::from_vec(&buf[..len]).unwrap()
    };
    let txt = ask(RecordType::TXT);
    assert_eq!(txt.metadata.response_code, ResponseCode::NoError);
    let mut values: Vec<String> = txt
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::TXT(t) => t.to_string(),
            other => panic!("not a TXT record: {other:?}"),
        })
        .collect();
    values.sort();
    assert_eq!(values, vec!["first", "second"]);
    let a = ask(RecordType::A);
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(
        a.answers.is_empty(),
        "an address for a TXT-only name: {a:?}"
    );
    drop(listeners);
    drop(rt);
}
