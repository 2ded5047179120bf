//! Fuzz the whole query path: wire bytes in, from a host-side client, a
//! container client or a stranger (chosen by the first byte), through the
//! hickory request decoding, the zone and the response encoding.
//!
//! Run: `cd dns/fuzz && cargo fuzz run query` (cargo-fuzz needs a nightly
//! compiler, or RUSTC_BOOTSTRAP=1 on a stable one).
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use portless_dns::{Forwarder, Handler, Health, Member, Metrics, NetworkInput, Zone, ZoneInput};

fn handler() -> &'static (tokio::runtime::Runtime, Handler) {
    static H: OnceLock<(tokio::runtime::Runtime, Handler)> = OnceLock::new();
    H.get_or_init(|| {
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
            networks: vec![NetworkInput { name: "net".into(), members: vec![member("a", "10.0.0.2"), member("b", "fd00::3")], ..Default::default() }],
            ingress: vec![("apps.test".into(), vec!["192.0.2.80".parse().unwrap()])],
            ..ZoneInput::default()
        });
        let metrics = Arc::new(Metrics::default());
        let forwarder = Arc::new(Forwarder::new(vec![], Duration::from_millis(10), 4, metrics.clone()));
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        (rt, Handler::new(Arc::new(ArcSwap::from_pointee(zone)), forwarder, metrics))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&who, bytes)) = data.split_first() else { return };
    let src: SocketAddr = ["127.0.0.1:53", "10.0.0.2:53", "192.0.2.9:53"][usize::from(who % 3)].parse().unwrap();
    let (rt, h) = handler();
    if let Some(resp) = rt.block_on(h.answer_bytes(bytes, src)) {
        let m = Message::from_vec(&resp).expect("our own response must parse");
        assert_eq!(&resp[..2], &bytes[..2], "response id differs");
        if who % 3 == 2 {
            assert!(m.answers.is_empty(), "a stranger got data");
        }
    }
});
