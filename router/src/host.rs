//! Host names as the router compares them: from a request's `:authority` or
//! `Host`, and from route labels (exact or `*.suffix`). Pure functions.

use std::borrow::Cow;
use std::fmt;

/// Why a host pattern from a label was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("empty host")]
    Empty,
    #[error("`{0}`: longer than 253 characters")]
    TooLong(String),
    #[error("`{0}`: every label needs 1 to 63 characters")]
    BadLabel(String),
    #[error("`{0}`: only letters, digits, '-', '_' and a leading `*.` are allowed")]
    BadChar(String),
    #[error("`{0}`: a wildcard must be the whole first label, as in `*.example.com`")]
    BadWildcard(String),
}

/// A host a route answers for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    /// One name, lower case, without a trailing dot.
    Exact(String),
    /// `*.suffix`: any name with at least one more label in front of
    /// `suffix` (so `*.example.com` matches `a.example.com` and
    /// `a.b.example.com`, never `example.com`). Stored without the `*.`.
    Wildcard(String),
}

impl HostPattern {
    /// Parse `shop.example.com` or `*.example.com` (case and one trailing
    /// dot are ignored).
    pub fn parse(s: &str) -> Result<Self, HostError> {
        let s = s.trim();
        let lower = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
        if lower.is_empty() {
            return Err(HostError::Empty);
        }
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, lower.clone()),
        };
        if name.contains('*') {
            return Err(HostError::BadWildcard(s.to_owned()));
        }
        check_name(&name).map_err(|e| match e {
            HostError::Empty => HostError::BadWildcard(s.to_owned()),
            other => other,
        })?;
        Ok(if wild {
            HostPattern::Wildcard(name)
        } else {
            HostPattern::Exact(name)
        })
    }

    /// Whether a normalised request host matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => name == host,
            HostPattern::Wildcard(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix.as_str())
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(n) => f.write_str(n),
            HostPattern::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

fn check_name(name: &str) -> Result<(), HostError> {
    if name.is_empty() {
        return Err(HostError::Empty);
    }
    if name.len() > 253 {
        return Err(HostError::TooLong(name.to_owned()));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(HostError::BadLabel(name.to_owned()));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(HostError::BadChar(name.to_owned()));
        }
    }
    Ok(())
}

/// Normalise a request's `:authority` or `Host` value for matching: port and
/// one trailing dot dropped, lower case. `None` for anything that is not a
/// plausible host (such a request can never match a route).
///
/// Borrowed when the value is already in normal form, so the common case
/// does not allocate.
pub fn normalize_authority(authority: &str) -> Option<Cow<'_, str>> {
    // userinfo has no place in a Host header; refuse rather than guess.
    if authority.contains('@') {
        return None;
    }
    let host = if let Some(rest) = authority.strip_prefix('[') {
        // IPv6 literal: routes never name one, but answer 404, not 400.
        let end = rest.find(']')?;
        let after = &rest[end + 1..];
        if !(after.is_empty() || valid_port(after.strip_prefix(':')?)) {
            return None;
        }
        &authority[..end + 2]
    } else {
        match authority.rsplit_once(':') {
            Some((h, port)) => {
                if !valid_port(port) {
                    return None;
                }
                h
            }
            None => authority,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > 253 {
        return None;
    }
    // No empty label: `.a.example.com` or `a..example.com` would otherwise
    // reach a wildcard route that HostPattern::matches refuses (found by
    // the fuzzer).
    if host.starts_with('.') || host.contains("..") {
        return None;
    }
    let ok = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'[' | b']' | b':'));
    if !ok {
        return None;
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(host))
    }
}

/// Whether two authorities (a request target's and a `Host` header's) name
/// the same host and port: compared as [`normalize_authority`] does, a
/// missing or empty port standing for `default_port` (the scheme's).
/// Anything that does not normalise is never the same.
pub fn same_authority(a: &str, b: &str, default_port: u16) -> bool {
    let port = |s: &str| -> Option<u16> {
        let tail = match s.strip_prefix('[') {
            Some(rest) => &rest[rest.find(']')? + 1..],
            None => s.rsplit_once(':').map_or("", |(_, p)| p),
        };
        let p = tail.strip_prefix(':').unwrap_or(tail);
        if p.is_empty() {
            Some(default_port)
        } else {
            p.parse().ok()
        }
    };
    match (normalize_authority(a), normalize_authority(b)) {
        (Some(ha), Some(hb)) => ha == hb && port(a).is_some() && port(a) == port(b),
        _ => false,
    }
}

fn valid_port(p: &str) -> bool {
    // An empty port (`host:`) is allowed by RFC 3986.
    p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn patterns_parse() {
        assert_eq!(
            HostPattern::parse("Shop.Example.COM.").unwrap(),
            HostPattern::Exact("shop.example.com".into())
        );
        assert_eq!(
            HostPattern::parse("*.example.com").unwrap(),
            HostPattern::Wildcard("example.com".into())
        );
        for bad in [
            "",
            "*",
            "*.",
            "a.*.com",
            "sh op.com",
            "a..b",
            "x*.com",
            "*.*.a",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn wildcard_matches_subdomains_only() {
        let w = HostPattern::parse("*.example.com").unwrap();
        assert!(w.matches("a.example.com"));
        assert!(w.matches("a.b.example.com"));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("aexample.com"));
        assert!(!w.matches(".example.com"));
    }

    #[test]
    fn authority_is_normalised() {
        let n = |s| normalize_authority(s).map(|c| c.into_owned());
        assert_eq!(
            n("Shop.Example.com:8080").as_deref(),
            Some("shop.example.com")
        );
        assert_eq!(n("shop.example.com.").as_deref(), Some("shop.example.com"));
        assert_eq!(
            n("shop.example.com.:80").as_deref(),
            Some("shop.example.com")
        );
        assert_eq!(n("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(n("a:b:c"), None);
        assert_eq!(n(".st"), None);
        assert_eq!(n("a..st:80"), None);
        assert_eq!(n("user@host"), None);
        assert_eq!(n(""), None);
        assert_eq!(n("a b"), None);
        assert!(matches!(
            normalize_authority("shop.example.com"),
            Some(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn authorities_compare_by_host_and_port() {
        assert!(same_authority("a.test", "A.test.", 80));
        assert!(same_authority("a.test:80", "a.test", 80));
        assert!(same_authority("a.test:", "a.test:80", 80));
        assert!(same_authority("[::1]:443", "[::1]", 443));
        assert!(!same_authority("a.test", "b.test", 80));
        assert!(!same_authority("a.test:8080", "a.test", 80));
        assert!(!same_authority("a.test:443", "a.test", 80));
        assert!(!same_authority("a.test:99999", "a.test:99999", 80));
        assert!(!same_authority("u@a.test", "u@a.test", 80));
    }

    proptest! {
        #[test]
        fn normalise_never_panics(s in ".{0,300}") {
            let _ = normalize_authority(&s);
            let _ = HostPattern::parse(&s);
        }

        #[test]
        fn normalised_host_matches_its_exact_pattern(
            labels in prop::collection::vec("[a-zA-Z0-9][a-zA-Z0-9-]{0,10}", 1..5),
            port in prop::option::of(0u16..),
            dot in any::<bool>(),
        ) {
            let name = labels.join(".");
            let mut authority = name.clone();
            if dot { authority.push('.'); }
            if let Some(p) = port { authority.push_str(&format!(":{p}")); }
            let pattern = HostPattern::parse(&name).unwrap();
            let host = normalize_authority(&authority).unwrap();
            prop_assert!(pattern.matches(&host));
            let wild = HostPattern::parse(&format!("*.{name}")).unwrap();
            prop_assert!(!wild.matches(&host));
            let sub = format!("x.{host}");
            prop_assert!(wild.matches(&sub));
        }
    }
}
