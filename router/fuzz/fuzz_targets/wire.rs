//! Everything the router parses from the network or from labels, fed
//! arbitrary bytes: PROXY headers, request authorities and paths against a
//! route table, host patterns and path prefixes. None may panic, and a
//! matched route must really match.
//!
//! `cargo +nightly fuzz run wire router/fuzz/seeds/wire` (from router/).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portless_router::host::{HostPattern, normalize_authority};
use portless_router::proxy_protocol;
use portless_router::table::{parse_path_prefix, path_matches};
use portless_router::{RouteSpec, RouteTable};

fuzz_target!(|data: &[u8]| {
    let _ = proxy_protocol::parse(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // "pattern|prefix|authority|path", routes from the first two.
    let mut parts = text.splitn(4, '|');
    let (Some(pattern), Some(prefix), Some(authority), Some(path)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        let _ = normalize_authority(text);
        let _ = HostPattern::parse(text);
        let _ = parse_path_prefix(text);
        return;
    };
    let mut specs = Vec::new();
    if let (Ok(h), Ok(p)) = (HostPattern::parse(pattern), parse_path_prefix(prefix)) {
        specs.push(RouteSpec { hosts: vec![h], path_prefix: p, backends: vec![] });
    }
    let table = RouteTable::build(specs);
    if let Some(host) = normalize_authority(authority)
        && let Some(i) = table.find(&host, path)
    {
        let r = &table.routes()[i];
        assert!(r.host.matches(&host), "{host} does not match {}", r.host);
        assert!(path_matches(&r.path_prefix, path));
    }
});
