//! hosts(5) parsing: `ADDRESS NAME [ALIAS...]`, `#` comments.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// A line that could not be used, with its 1-based number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct HostsError {
    pub line: usize,
    pub reason: String,
}

/// Parse a hosts file into name → addresses (names lower-cased, without a
/// trailing dot, addresses in file order without duplicates). Bad lines are
/// returned as errors beside the good entries, so one typo does not lose
/// the rest of the file.
pub fn parse(text: &str) -> (BTreeMap<String, Vec<IpAddr>>, Vec<HostsError>) {
    let mut names: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let content = line.split('#').next().unwrap_or("");
        let mut fields = content.split_whitespace();
        let Some(addr) = fields.next() else { continue };
        // Zone ids (fe80::1%eth0) cannot be served in DNS.
        let Ok(ip) = addr.parse::<IpAddr>() else {
            errors.push(HostsError {
                line: line_no,
                reason: format!("`{addr}` is not an IP address"),
            });
            continue;
        };
        let mut any = false;
        for name in fields {
            any = true;
            match normalize_name(name) {
                Ok(name) => {
                    let addrs = names.entry(name).or_default();
                    if !addrs.contains(&ip) {
                        addrs.push(ip);
                    }
                }
                Err(_) => errors.push(HostsError {
                    line: line_no,
                    reason: format!("`{name}` is not a valid host name"),
                }),
            }
        }
        if !any {
            errors.push(HostsError {
                line: line_no,
                reason: format!("`{addr}` has no names"),
            });
        }
    }
    (names, errors)
}

/// Lower-case a DNS name, drop one trailing dot, and check its labels:
/// 1 to 63 letters, digits, `-` or `_`, at most 253 characters in all.
pub fn normalize_name(name: &str) -> Result<String, String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if name.is_empty() {
        return Err("empty name".into());
    }
    if name.len() > 253 {
        return Err(format!("{name}: longer than 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{name}: every label needs 1 to 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "{name}: only letters, digits, '-' and '_' are allowed"
            ));
        }
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_aliases_and_comments_and_reports_bad_lines() {
        let (names, errors) = parse(
            "# comment\n10.0.0.1 db.example.test DB  # trailing\n\n::1 v6.test\nnot-an-ip x\n10.0.0.2\n10.0.0.3 db.example.test. bad/name\n",
        );
        assert_eq!(
            names["db.example.test"],
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "10.0.0.3".parse().unwrap()
            ]
        );
        assert_eq!(names["db"], vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(names["v6.test"], vec!["::1".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            errors.iter().map(|e| e.line).collect::<Vec<_>>(),
            vec![5, 6, 7]
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,200}") {
            let _ = parse(&s);
        }
    }
}
