//! Header rewriting between client and backend: hop-by-hop removal and the
//! forwarding headers. Pure functions over `http::HeaderMap`.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, never forwarded (RFC 9110 7.6.1).
fn fixed_hop_by_hop() -> [&'static HeaderName; 9] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ]
}

/// Whether a request asks to switch to WebSocket: `Connection` lists
/// `upgrade` and `Upgrade` offers `websocket`. This is the only upgrade the
/// router tunnels; any other (`h2c`, `TLS/1.x`, ...) would turn the
/// connection into a raw stream past routing, header rewriting and limits,
/// so such a request is forwarded as plain HTTP, its `Upgrade` removed.
pub fn wants_websocket(headers: &HeaderMap) -> bool {
    headers.get_all(header::UPGRADE).iter().any(|v| {
        connection_tokens(v).any(|t| {
            let name = t.split_once('/').map_or(t, |(n, _)| n);
            name.eq_ignore_ascii_case("websocket")
        })
    }) && headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| connection_tokens(v).any(|t| t.eq_ignore_ascii_case("upgrade")))
}

/// Whether the client said `TE: trailers` (gRPC needs it passed on over
/// HTTP/2).
pub fn te_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .any(|v| connection_tokens(v).any(|t| t.eq_ignore_ascii_case("trailers")))
}

fn connection_tokens(v: &HeaderValue) -> impl Iterator<Item = &str> {
    v.to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Remove hop-by-hop headers, including those the `Connection` header
/// names. With `keep_upgrade`, `Connection: upgrade` and `Upgrade` survive
/// (for a WebSocket handshake and its 101 answer).
///
/// This runs twice per proxied request, so it first finds which of the
/// fixed names are present in one pass over the keys (comparisons, no
/// hashing) and removes only those.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let fixed = fixed_hop_by_hop();
    let mut present = [false; 9];
    let mut any = false;
    for k in headers.keys() {
        if let Some(i) = fixed.iter().position(|f| *f == k) {
            present[i] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    let upgrade = if keep_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    // fixed[0] is Connection: the names it lists go too, except those
    // removed below anyway.
    // `Connection: keep-alive`, what most clients and backends send, names
    // only a header removed below anyway: skip the token parse for it.
    let only_keep_alive = || {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .all(|v| v.as_bytes().eq_ignore_ascii_case(b"keep-alive"))
    };
    if present[0] && !only_keep_alive() {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(connection_tokens)
            .filter(|t| !fixed.iter().any(|f| f.as_str().eq_ignore_ascii_case(t)))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (name, _) in fixed.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(*name);
    }
    if let Some(up) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, up);
    }
}

/// The client as the router sees it.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo {
    /// The client's address: from the PROXY header when there is one, else
    /// the TCP peer.
    pub addr: IpAddr,
    /// The peer is a trusted proxy (listed with `--trusted-proxy`, or a
    /// PROXY-protocol sender): its forwarding headers are kept and appended
    /// to. Otherwise whatever the client sent is dropped.
    pub trusted: bool,
    /// The request came over TLS.
    pub tls: bool,
}

/// Whether `name` (lower case, as `HeaderName` keeps it) is a client
/// address header that a backend might believe: `Forwarded`, `X-Real-IP`
/// or any `X-Forwarded-*`, spelled with dashes (`dashed`) or with some
/// underscores in their place (which some backends read as the dashed
/// name: CGI, PHP, WSGI turn both into `HTTP_X_FORWARDED_FOR`).
fn forwarding_name(name: &str) -> Option<Spelling> {
    fn same(a: &[u8], b: &[u8]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x == y || (*x == b'_' && *y == b'-'))
    }
    let n = name.as_bytes();
    let hit = same(n, b"forwarded")
        || same(n, b"x-real-ip")
        || (n.len() > 12 && same(&n[..12], b"x-forwarded-"));
    match hit {
        false => None,
        true if n.contains(&b'_') => Some(Spelling::Underscored),
        true => Some(Spelling::Dashed),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    Dashed,
    Underscored,
}

/// Drop the client address headers the router does not vouch for: from
/// anyone, their underscore spellings; from an untrusted client, every
/// `X-Forwarded-*` too (`-Port`, `-Prefix`, ...: the ones the router sets
/// are replaced anyway). One pass over the names, no allocation when there
/// is nothing to drop (the common case).
fn drop_spoofable(headers: &mut HeaderMap, trusted: bool) {
    let doomed = |k: &HeaderName| match forwarding_name(k.as_str()) {
        Some(Spelling::Underscored) => true,
        Some(Spelling::Dashed) => !trusted,
        None => false,
    };
    if !headers.keys().any(doomed) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|k| doomed(k)).cloned().collect();
    for n in names {
        headers.remove(n);
    }
}

/// Set `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`,
/// `Forwarded` and `X-Real-IP` for a request to a backend. `host` is the
/// request's host as received (port included).
///
/// Once per proxied request: no `format!`, and for an untrusted client
/// (the common case) one `insert` per header, which also drops whatever
/// the client sent under that name.
pub fn set_forwarded(headers: &mut HeaderMap, client: &ClientInfo, host: &str) {
    let proto: &'static str = if client.tls { "https" } else { "http" };
    let mut ip_buf = IpText::default();
    let ip = ip_buf.format(client.addr);
    drop_spoofable(headers, client.trusted);
    // Room for the six set below at once: the map hyper built holds about
    // the client's headers only, and grew (rehashing) on the way.
    headers.reserve(6);
    // The address alone, once: X-Real-IP and (from an untrusted client)
    // X-Forwarded-For share it.
    let ip_value = HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(ip)).ok();

    // As Traefik does: the connection's address, unless a trusted proxy
    // said who its client was.
    if !(client.trusted && headers.contains_key(&X_REAL_IP))
        && let Some(v) = &ip_value
    {
        headers.insert(&X_REAL_IP, v.clone());
    }

    let prev_xff = client
        .trusted
        .then(|| joined(headers, &X_FORWARDED_FOR))
        .flatten();
    match (prev_xff, ip_value) {
        (Some(prev), _) => set(
            headers,
            &X_FORWARDED_FOR,
            [prev.as_bytes(), b", ", ip].concat(),
        ),
        (None, Some(v)) => {
            headers.insert(&X_FORWARDED_FOR, v);
        }
        (None, None) => {
            headers.remove(&X_FORWARDED_FOR);
        }
    }

    if !(client.trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !(client.trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        set(headers, &X_FORWARDED_HOST, host.as_bytes().to_vec());
    }

    let prev_fwd = client
        .trusted
        .then(|| joined(headers, &header::FORWARDED))
        .flatten();
    let mut fwd = Vec::with_capacity(
        prev_fwd.as_ref().map_or(0, |p| p.len() + 2) + ip.len() + host.len() + 32,
    );
    if let Some(prev) = &prev_fwd {
        fwd.extend_from_slice(prev.as_bytes());
        fwd.extend_from_slice(b", ");
    }
    fwd.extend_from_slice(b"for=");
    match client.addr {
        IpAddr::V4(_) => fwd.extend_from_slice(ip),
        IpAddr::V6(_) => {
            fwd.extend_from_slice(b"\"[");
            fwd.extend_from_slice(ip);
            fwd.extend_from_slice(b"]\"");
        }
    }
    fwd.extend_from_slice(b";proto=");
    fwd.extend_from_slice(proto.as_bytes());
    fwd.extend_from_slice(b";host=\"");
    fwd.extend_from_slice(host.as_bytes());
    fwd.push(b'"');
    set(headers, &header::FORWARDED, fwd);
}

/// An address as text, formatted on the stack (IPv4 by hand: `Display`
/// for `Ipv4Addr` pads and was a visible share of the request path).
pub(crate) struct IpText {
    buf: [u8; 48],
    len: usize,
}

impl Default for IpText {
    fn default() -> Self {
        IpText {
            buf: [0; 48],
            len: 0,
        }
    }
}

impl IpText {
    pub(crate) fn format(&mut self, addr: IpAddr) -> &[u8] {
        self.len = 0;
        match addr {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.push(b'.');
                    }
                    if octet >= 100 {
                        self.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        self.push(b'0' + octet / 10 % 10);
                    }
                    self.push(b'0' + octet % 10);
                }
            }
            IpAddr::V6(v6) => {
                use std::fmt::Write;
                // An IPv6 address is at most 45 characters: it fits.
                let _ = write!(self, "{v6}");
            }
        }
        &self.buf[..self.len]
    }

    fn push(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }
}

impl std::fmt::Write for IpText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let slot = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// All values of a header joined by ", " (a header may arrive on several
/// lines), or `None` if absent.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let s = String::from_utf8_lossy(v.as_bytes());
        match &mut out {
            Some(o) => {
                o.push_str(", ");
                o.push_str(&s);
            }
            None => out = Some(s.into_owned()),
        }
    }
    out
}

fn set(headers: &mut HeaderMap, name: &HeaderName, value: Vec<u8>) {
    // Only characters valid in a header reach here (addresses, and a host
    // that came from a header); should one not, dropping beats failing.
    match HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        Ok(v) => {
            headers.insert(name, v);
        }
        Err(_) => {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("x-app", "kept"),
        ]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-app"], "kept");
    }

    #[test]
    fn only_websocket_is_an_upgrade() {
        for (conn, up, ws) in [
            ("Upgrade", "websocket", true),
            ("keep-alive, upgrade", "WebSocket", true),
            ("Upgrade", "h2c, websocket/13", true),
            ("Upgrade, HTTP2-Settings", "h2c", false),
            ("Upgrade", "TLS/1.2", false),
            ("keep-alive", "websocket", false),
        ] {
            let h = map(&[("connection", conn), ("upgrade", up)]);
            assert_eq!(wants_websocket(&h), ws, "{conn} / {up}");
        }
        assert!(!wants_websocket(&map(&[("connection", "upgrade")])));
    }

    #[test]
    fn upgrade_survives_when_asked() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_websocket(&h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
    }

    #[test]
    fn untrusted_client_forwarding_headers_are_replaced() {
        let mut h = map(&[("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=6.6.6.6")]);
        let c = ClientInfo {
            addr: "192.0.2.7".parse().unwrap(),
            trusted: false,
            tls: true,
        };
        set_forwarded(&mut h, &c, "shop.example.com");
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "shop.example.com");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.7;proto=https;host=\"shop.example.com\""
        );
    }

    #[test]
    fn forwarding_names_in_every_spelling() {
        use Spelling::*;
        for (name, want) in [
            ("x-forwarded-for", Some(Dashed)),
            ("x-forwarded-prefix", Some(Dashed)),
            ("forwarded", Some(Dashed)),
            ("x-real-ip", Some(Dashed)),
            ("x_forwarded_for", Some(Underscored)),
            ("x-forwarded_host", Some(Underscored)),
            ("x_real_ip", Some(Underscored)),
            ("x_forwarded_", None),
            ("x-forwarded-", None),
            ("x-forwardedfor", None),
            ("x-app_id", None),
            ("forwarded-x", None),
            ("host", None),
        ] {
            assert_eq!(forwarding_name(name), want, "{name}");
        }
    }

    #[test]
    fn untrusted_spellings_and_extras_go_trusted_underscores_go() {
        let src = [
            ("x-forwarded-port", "1"),
            ("x_forwarded_for", "6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            ("x-app_id", "kept"),
        ];
        let mut h = map(&src);
        let c = ClientInfo {
            addr: "192.0.2.7".parse().unwrap(),
            trusted: false,
            tls: false,
        };
        set_forwarded(&mut h, &c, "a.test");
        assert_eq!(h["x-real-ip"], "192.0.2.7");
        assert!(!h.contains_key("x-forwarded-port"));
        assert!(!h.contains_key("x_forwarded_for"));
        assert_eq!(h["x-app_id"], "kept");
        let mut h = map(&src);
        let c = ClientInfo { trusted: true, ..c };
        set_forwarded(&mut h, &c, "a.test");
        assert_eq!(h["x-real-ip"], "6.6.6.6");
        assert_eq!(h["x-forwarded-port"], "1");
        assert!(!h.contains_key("x_forwarded_for"));
    }

    #[test]
    fn trusted_proxy_headers_are_appended_to() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-proto", "https"),
        ]);
        let c = ClientInfo {
            addr: "2001:db8::1".parse().unwrap(),
            trusted: true,
            tls: false,
        };
        set_forwarded(&mut h, &c, "a.test");
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.0.0.1, 2001:db8::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(
            h["forwarded"],
            "for=\"[2001:db8::1]\";proto=http;host=\"a.test\""
        );
    }

    #[test]
    fn addresses_format_as_display_does() {
        let mut t = IpText::default();
        for a in [0u8, 1, 9, 10, 42, 99, 100, 199, 200, 255] {
            for b in [0u8, 7, 10, 100, 255] {
                let v4 = IpAddr::from([a, b, a, b]);
                assert_eq!(t.format(v4), v4.to_string().as_bytes());
            }
        }
        for v6 in [
            "::1",
            "2001:db8::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
        ] {
            let v6: IpAddr = v6.parse().unwrap();
            assert_eq!(t.format(v6), v6.to_string().as_bytes());
        }
    }

    proptest::proptest! {
        /// The one-pass removal removes exactly what removing every
        /// hop-by-hop name (and every name `Connection` lists) one by one
        /// does.
        #[test]
        fn hop_by_hop_removal_matches_the_plain_rule(
            picks in proptest::collection::vec((0usize..14, 0usize..5), 0..10),
            keep_upgrade: bool,
        ) {
            let names = [
                "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
                "x-app", "x-secret", "host", "content-length", "cookie",
            ];
            let values = ["keep-alive", "x-secret, Upgrade", "close", "websocket", "Keep-Alive"];
            let mut h = HeaderMap::new();
            for (n, v) in picks {
                h.append(
                    HeaderName::from_static(names[n]),
                    HeaderValue::from_static(values[v]),
                );
            }
            let mut expected = h.clone();
            let upgrade = keep_upgrade.then(|| expected.get(header::UPGRADE).cloned()).flatten();
            let listed: Vec<HeaderName> = expected
                .get_all(header::CONNECTION)
                .iter()
                .flat_map(connection_tokens)
                .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
                .collect();
            for n in listed {
                expected.remove(n);
            }
            for n in fixed_hop_by_hop() {
                expected.remove(n);
            }
            if let Some(up) = upgrade {
                expected.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                expected.insert(header::UPGRADE, up);
            }
            remove_hop_by_hop(&mut h, keep_upgrade);
            proptest::prop_assert_eq!(h, expected);
        }
    }
}
