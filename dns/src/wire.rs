//! The common query, read and answered straight on the wire.
//!
//! Nearly every query a container sends is one standard question, with at
//! most an OPT record, for a name answered with addresses or NXDOMAIN.
//! For those, [`Query::parse`] reads the few fields that matter from the
//! datagram and [`Reply`] writes the answer into a reused buffer: no
//! `Message`, no `Name`, no `Record`, no allocation. Anything else (other
//! opcodes or classes, several questions or records, EDNS options or
//! versions, compression in the question, a reply that would not fit) is
//! left to hickory's decoder and encoder by returning None, so the answers
//! are the same either way: the fast path only ever writes what the full
//! path would (with a tested equivalence in the handler's tests).

use std::net::IpAddr;

/// DNS header length.
const HEADER: usize = 12;
/// RR type of OPT, and of the answers we write.
const TYPE_OPT: u16 = 41;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_SOA: u16 = 6;
const CLASS_IN: u16 = 1;

/// A query of the common shape, borrowed from its datagram.
#[derive(Debug, PartialEq, Eq)]
pub struct Query<'a> {
    pub id: u16,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    /// The question section as received (name, type, class): echoed.
    pub question: &'a [u8],
    pub qtype: u16,
    /// Offsets in `question` where each label starts (length byte), the
    /// root's zero byte last.
    labels: [u8; 128],
    label_count: usize,
    /// EDNS: (the client's UDP payload size, DO bit); None without OPT.
    pub edns: Option<(u16, bool)>,
}

impl<'a> Query<'a> {
    /// The query, when `datagram` is of the common shape: QR=0, opcode
    /// QUERY, one question of class IN with an uncompressed name, no
    /// answer or authority records, and no additional record but an OPT
    /// of version 0 with no options. None otherwise.
    pub fn parse(datagram: &'a [u8]) -> Option<Self> {
        let header = datagram.get(..HEADER)?;
        let flags = u16::from_be_bytes([header[2], header[3]]);
        // QR=0 and opcode 0.
        if flags & 0xF800 != 0 {
            return None;
        }
        let count = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
        let (qd, an, ns, ar) = (count(4), count(6), count(8), count(10));
        if qd != 1 || an != 0 || ns != 0 || ar > 1 {
            return None;
        }
        let mut labels = [0u8; 128];
        let mut label_count = 0;
        let mut at = HEADER;
        loop {
            let len = usize::from(*datagram.get(at)?);
            // Compression pointers and extended label types: full path.
            if len > 63 {
                return None;
            }
            *labels.get_mut(label_count)? = u8::try_from(at - HEADER).ok()?;
            label_count += 1;
            at += 1 + len;
            if at - HEADER > 255 {
                return None;
            }
            if len == 0 {
                break;
            }
        }
        let fixed = datagram.get(at..at + 4)?;
        let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        if u16::from_be_bytes([fixed[2], fixed[3]]) != CLASS_IN {
            return None;
        }
        let question = &datagram[HEADER..at + 4];
        at += 4;
        let edns = if ar == 1 {
            // Root owner, type OPT, class = payload size, TTL = extended
            // rcode, version, flags; no options.
            let opt = datagram.get(at..at + 11)?;
            if opt[0] != 0 || u16::from_be_bytes([opt[1], opt[2]]) != TYPE_OPT {
                return None;
            }
            let payload = u16::from_be_bytes([opt[3], opt[4]]);
            let (ext_rcode, version) = (opt[5], opt[6]);
            let rdlength = u16::from_be_bytes([opt[9], opt[10]]);
            if ext_rcode != 0 || version != 0 || rdlength != 0 {
                return None;
            }
            at += 11;
            Some((payload, opt[7] & 0x80 != 0))
        } else {
            None
        };
        if at != datagram.len() {
            return None;
        }
        Some(Query {
            id: u16::from_be_bytes([header[0], header[1]]),
            recursion_desired: flags & 0x0100 != 0,
            checking_disabled: flags & 0x0010 != 0,
            question,
            qtype,
            labels,
            label_count,
            edns,
        })
    }

    /// The name's lookup text into `key` (cleared first): labels joined by
    /// dots, ASCII lowercased, other bytes U+FFFD; as the zone's
    /// `lookup_key` makes it of a `Name`.
    pub fn key_into(&self, key: &mut String) {
        key.clear();
        for (i, &start) in self.labels[..self.label_count - 1].iter().enumerate() {
            if i > 0 {
                key.push('.');
            }
            let start = usize::from(start);
            let len = usize::from(self.question[start]);
            for &b in &self.question[start + 1..start + 1 + len] {
                key.push(if b.is_ascii() {
                    char::from(b.to_ascii_lowercase())
                } else {
                    '\u{FFFD}'
                });
            }
        }
    }

    /// Offset in the message of the name's last `n` labels (the root
    /// excluded), for a compression pointer; None if it has fewer.
    fn suffix_offset(&self, n: usize) -> Option<u16> {
        let i = (self.label_count - 1).checked_sub(n)?;
        Some(HEADER as u16 + u16::from(self.labels[i]))
    }

    /// The largest reply the client takes over UDP.
    pub fn udp_limit(&self, max: u16) -> usize {
        usize::from(self.edns.map_or(512, |(p, _)| p.clamp(512, max)))
    }
}

/// The SOA of the domain, for negative answers.
pub struct Soa {
    /// Labels of the domain (the root excluded).
    pub labels: usize,
    pub ttl: u32,
    pub serial: u32,
}

/// Reply codes the fast path writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rcode {
    NoError = 0,
    NxDomain = 3,
}

/// Write the authoritative reply to `q` into `out` (cleared first): the
/// question echoed, `addrs` as A/AAAA records of `ttl` (owner: the
/// question's name), the domain's SOA in the authority section when given
/// (whose owner is the question name's last `soa.labels` labels), and an
/// OPT record of `our_payload` when the query had one. False when it
/// would be longer than `limit` (the full path then truncates it).
#[allow(clippy::too_many_arguments)] // one call site, each a plain field
pub fn write_reply(
    q: &Query<'_>,
    rcode: Rcode,
    addrs: &[IpAddr],
    ttl: u32,
    soa: Option<&Soa>,
    our_payload: u16,
    limit: usize,
    out: &mut Vec<u8>,
) -> bool {
    out.clear();
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR, AA, RD as asked; RA, CD as asked; the rcode.
    let mut flags: u16 = 0x8000 | 0x0400 | 0x0080 | rcode as u16;
    if q.recursion_desired {
        flags |= 0x0100;
    }
    if q.checking_disabled {
        flags |= 0x0010;
    }
    out.extend_from_slice(&flags.to_be_bytes());
    let soa_owner = match soa {
        Some(soa) => match q.suffix_offset(soa.labels) {
            Some(at) => Some((soa, at)),
            None => return false,
        },
        None => None,
    };
    let ancount = addrs.len() as u16;
    let nscount = u16::from(soa_owner.is_some());
    let arcount = u16::from(q.edns.is_some());
    for c in [1, ancount, nscount, arcount] {
        out.extend_from_slice(&c.to_be_bytes());
    }
    out.extend_from_slice(q.question);
    for addr in addrs {
        // Owner: a pointer to the question's name.
        out.extend_from_slice(&(0xC000u16 | HEADER as u16).to_be_bytes());
        let (rtype, data): (u16, &[u8]) = match addr {
            IpAddr::V4(v4) => (TYPE_A, &v4.octets()[..]),
            IpAddr::V6(v6) => (TYPE_AAAA, &v6.octets()[..]),
        };
        // `data` borrows a temporary: copied before the next iteration.
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
    }
    if let Some((soa, at)) = soa_owner {
        let apex = (0xC000u16 | at).to_be_bytes();
        out.extend_from_slice(&apex);
        out.extend_from_slice(&TYPE_SOA.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&soa.ttl.to_be_bytes());
        // RDATA: ns.<apex>, hostmaster.<apex>, five numbers.
        let rdlength: u16 = (1 + 2 + 2) + (1 + 10 + 2) + 20;
        out.extend_from_slice(&rdlength.to_be_bytes());
        out.push(2);
        out.extend_from_slice(b"ns");
        out.extend_from_slice(&apex);
        out.push(10);
        out.extend_from_slice(b"hostmaster");
        out.extend_from_slice(&apex);
        for n in [soa.serial, 3600, 600, 86_400, soa.ttl] {
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
    if let Some((_, dnssec_ok)) = q.edns {
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&our_payload.to_be_bytes());
        // Extended rcode 0, version 0, DO echoed.
        out.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0]);
        out.extend_from_slice(&0u16.to_be_bytes());
    }
    out.len() <= limit
}
