//! Header rewriting between client and backend: hop-by-hop removal and the
//! forwarding headers. Pure functions over `http::HeaderMap`.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
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

/// Whether a message asks for a protocol upgrade (WebSocket): `Connection`
/// lists `upgrade` and an `Upgrade` header is present.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
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
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = if keep_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(connection_tokens)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in fixed_hop_by_hop() {
        headers.remove(name);
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

/// Set `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and
/// `Forwarded` for a request to a backend. `host` is the request's host as
/// received (port included).
pub fn set_forwarded(headers: &mut HeaderMap, client: &ClientInfo, host: &str) {
    let proto = if client.tls { "https" } else { "http" };
    let ip = client.addr.to_string();
    if !client.trusted {
        headers.remove(&X_FORWARDED_FOR);
        headers.remove(&X_FORWARDED_PROTO);
        headers.remove(&X_FORWARDED_HOST);
        headers.remove(header::FORWARDED);
    }
    let xff = match joined(headers, &X_FORWARDED_FOR) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.clone(),
    };
    set(headers, &X_FORWARDED_FOR, &xff);
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !headers.contains_key(&X_FORWARDED_HOST) {
        set(headers, &X_FORWARDED_HOST, host);
    }
    let for_ = match client.addr {
        IpAddr::V4(_) => ip,
        IpAddr::V6(_) => format!("\"[{ip}]\""),
    };
    let element = format!("for={for_};proto={proto};host=\"{host}\"");
    let fwd = match joined(headers, &header::FORWARDED) {
        Some(prev) => format!("{prev}, {element}"),
        None => element,
    };
    set(headers, &header::FORWARDED, &fwd);
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

fn set(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    // Only characters valid in a header reach here (addresses, and a host
    // that came from a header); should one not, dropping beats failing.
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    } else {
        headers.remove(name);
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
    fn upgrade_survives_when_asked() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&h));
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
}
