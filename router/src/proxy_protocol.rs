//! PROXY protocol v1 (text) and v2 (binary) headers, as sent by load
//! balancers in front of the router. Pure parser over a byte buffer; the
//! listener reads until [`parse`] says the header is complete.
//!
//! Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// v2 signature: the first 12 bytes of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included.
pub const V1_MAX: usize = 107;
/// v2 headers longer than this are refused (TLVs carry nothing we use).
pub const V2_MAX: usize = 16 + 1024;

/// What the header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A proxied TCP connection from `source` to `destination`.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// v2 LOCAL (a health check by the balancer itself), or v1 `UNKNOWN`, or
    /// a v2 family other than TCP over IPv4/IPv6: use the real peer address.
    Local,
}

/// The result of looking at the start of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of this many bytes.
    Complete(ProxyHeader, usize),
    /// Valid so far; read more.
    Incomplete,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyProtocolError {
    #[error("connection does not start with a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY v1 header")]
    BadV1,
    #[error("malformed PROXY v2 header")]
    BadV2,
    #[error("PROXY header too long")]
    TooLong,
}

/// Parse a PROXY v1 or v2 header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyProtocolError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if buf.len() < 16 {
            Ok(Parsed::Incomplete)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return parse_v1(buf);
    }
    Err(ProxyProtocolError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyProtocolError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(ProxyProtocolError::TooLong);
        }
        return Ok(Parsed::Incomplete);
    };
    let len = end + 2;
    if len > V1_MAX {
        return Err(ProxyProtocolError::TooLong);
    }
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyProtocolError::BadV1)?;
    let mut parts = line.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(ProxyProtocolError::BadV1);
    }
    let family = parts.next().ok_or(ProxyProtocolError::BadV1)?;
    if family == "UNKNOWN" {
        // The rest of the line is to be ignored.
        return Ok(Parsed::Complete(ProxyHeader::Local, len));
    }
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(ProxyProtocolError::BadV1);
    };
    let (src, dst): (IpAddr, IpAddr) = match family {
        "TCP4" => (
            IpAddr::V4(src.parse().map_err(|_| ProxyProtocolError::BadV1)?),
            IpAddr::V4(dst.parse().map_err(|_| ProxyProtocolError::BadV1)?),
        ),
        "TCP6" => (
            IpAddr::V6(src.parse().map_err(|_| ProxyProtocolError::BadV1)?),
            IpAddr::V6(dst.parse().map_err(|_| ProxyProtocolError::BadV1)?),
        ),
        _ => return Err(ProxyProtocolError::BadV1),
    };
    let port = |p: &str| -> Result<u16, ProxyProtocolError> {
        // The spec forbids leading zeros and signs.
        if p.is_empty()
            || (p.len() > 1 && p.starts_with('0'))
            || !p.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(ProxyProtocolError::BadV1);
        }
        p.parse().map_err(|_| ProxyProtocolError::BadV1)
    };
    Ok(Parsed::Complete(
        ProxyHeader::Proxied {
            source: SocketAddr::new(src, port(sport)?),
            destination: SocketAddr::new(dst, port(dport)?),
        },
        len,
    ))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyProtocolError> {
    let ver_cmd = buf[12];
    let fam = buf[13];
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if ver_cmd >> 4 != 2 {
        return Err(ProxyProtocolError::BadV2);
    }
    if 16 + len > V2_MAX {
        return Err(ProxyProtocolError::TooLong);
    }
    if buf.len() < 16 + len {
        return Ok(Parsed::Incomplete);
    }
    let total = 16 + len;
    let body = &buf[16..total];
    match ver_cmd & 0x0f {
        0 => return Ok(Parsed::Complete(ProxyHeader::Local, total)),
        1 => {}
        _ => return Err(ProxyProtocolError::BadV2),
    }
    let header = match fam {
        // TCP over IPv4
        0x11 => {
            if body.len() < 12 {
                return Err(ProxyProtocolError::BadV2);
            }
            let src = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let dst = Ipv4Addr::new(body[4], body[5], body[6], body[7]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(src.into(), u16::from_be_bytes([body[8], body[9]])),
                destination: SocketAddr::new(dst.into(), u16::from_be_bytes([body[10], body[11]])),
            }
        }
        // TCP over IPv6
        0x21 => {
            if body.len() < 36 {
                return Err(ProxyProtocolError::BadV2);
            }
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[0..16]);
            let mut b = [0u8; 16];
            b.copy_from_slice(&body[16..32]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(
                    Ipv6Addr::from(a).into(),
                    u16::from_be_bytes([body[32], body[33]]),
                ),
                destination: SocketAddr::new(
                    Ipv6Addr::from(b).into(),
                    u16::from_be_bytes([body[34], body[35]]),
                ),
            }
        }
        // UNSPEC, UDP, unix sockets: the spec says to accept and use the
        // real connection addresses.
        _ => ProxyHeader::Local,
    };
    Ok(Parsed::Complete(header, total))
}

/// A v1 header for `source` → `destination` (used by tests and benchmarks).
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let fam = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {fam} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

/// A v2 PROXY header for `source` → `destination` (both of one family).
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_golden() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET /";
        assert_eq!(
            parse(h).unwrap(),
            Parsed::Complete(
                ProxyHeader::Proxied {
                    source: sa("192.0.2.1:56324"),
                    destination: sa("198.51.100.2:443")
                },
                45
            )
        );
        let h6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n";
        assert!(matches!(
            parse(h6).unwrap(),
            Parsed::Complete(ProxyHeader::Proxied { .. }, 40)
        ));
        assert_eq!(
            parse(b"PROXY UNKNOWN ffff::1 x\r\n").unwrap(),
            Parsed::Complete(ProxyHeader::Local, 25)
        );
        assert_eq!(parse(b"PROXY TCP4 1.2").unwrap(), Parsed::Incomplete);
        assert_eq!(parse(b"PRO").unwrap(), Parsed::Incomplete);
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n"),
            Err(ProxyProtocolError::NotProxy)
        );
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"),
            Err(ProxyProtocolError::BadV1)
        );
        assert_eq!(
            parse(b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n"),
            Err(ProxyProtocolError::BadV1)
        );
        assert_eq!(
            parse(&[b'P', b'R', b'O', b'X', b'Y', b' ', b'x'].repeat(20)),
            Err(ProxyProtocolError::TooLong)
        );
    }

    #[test]
    fn v2_golden() {
        // TCP4 192.0.2.1:56324 -> 198.51.100.2:443, plus 3 bytes of TLV.
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0x00, 0x0f]);
        h.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 2, 0xdc, 0x04, 0x01, 0xbb]);
        h.extend_from_slice(&[0x04, 0x00, 0x00]);
        h.extend_from_slice(b"GET");
        assert_eq!(
            parse(&h).unwrap(),
            Parsed::Complete(
                ProxyHeader::Proxied {
                    source: sa("192.0.2.1:56324"),
                    destination: sa("198.51.100.2:443")
                },
                31
            )
        );
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(
            parse(&local).unwrap(),
            Parsed::Complete(ProxyHeader::Local, 16)
        );
        assert_eq!(parse(&h[..20]).unwrap(), Parsed::Incomplete);
        let mut bad = V2_SIGNATURE.to_vec();
        bad.extend_from_slice(&[0x11, 0x11, 0x00, 0x00]);
        assert_eq!(parse(&bad), Err(ProxyProtocolError::BadV2));
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        assert_eq!(parse(&short), Err(ProxyProtocolError::BadV2));
    }

    proptest! {
        #[test]
        fn round_trip(v6 in any::<bool>(), a in any::<[u8; 16]>(), b in any::<[u8; 16]>(), p in any::<u16>(), q in any::<u16>()) {
            let (s, d) = if v6 {
                (SocketAddr::new(Ipv6Addr::from(a).into(), p), SocketAddr::new(Ipv6Addr::from(b).into(), q))
            } else {
                (SocketAddr::new(Ipv4Addr::new(a[0], a[1], a[2], a[3]).into(), p),
                 SocketAddr::new(Ipv4Addr::new(b[0], b[1], b[2], b[3]).into(), q))
            };
            let want = ProxyHeader::Proxied { source: s, destination: d };
            let v1 = encode_v1(s, d);
            prop_assert_eq!(parse(&v1).unwrap(), Parsed::Complete(want, v1.len()));
            let v2 = encode_v2(s, d);
            prop_assert_eq!(parse(&v2).unwrap(), Parsed::Complete(want, v2.len()));
            // Every strict prefix is incomplete, never an error.
            for cut in 0..v2.len() {
                prop_assert_eq!(parse(&v2[..cut]).unwrap(), Parsed::Incomplete);
            }
            for cut in 0..v1.len() {
                prop_assert_eq!(parse(&v1[..cut]).unwrap(), Parsed::Incomplete);
            }
        }

        #[test]
        fn garbage_never_panics(buf in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&buf);
            let mut v2 = V2_SIGNATURE.to_vec();
            v2.extend_from_slice(&buf);
            let _ = parse(&v2);
            let mut v1 = b"PROXY ".to_vec();
            v1.extend_from_slice(&buf);
            let _ = parse(&v1);
        }
    }
}
