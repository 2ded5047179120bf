//! DNS options.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{ConfigError, Merge, millis_of, value};
use portless_dns::hosts::normalize_name;
use portless_dns::{RateLimit, forward, tcp, zone};

#[derive(Debug, Default, Clone, Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DnsOpts {
    /// DNS port on every Docker network's gateway address, followed live as
    /// networks come and go; 0 turns gateway listeners off.
    #[arg(long, env = "PORTLESS_DNS_PORT", value_name = "PORT")]
    pub dns_port: Option<u16>,
    /// Extra fixed DNS listen address (UDP and TCP); repeatable.
    #[arg(
        long,
        env = "PORTLESS_DNS_LISTEN",
        value_name = "ADDR:PORT",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub dns_listen: Vec<SocketAddr>,
    /// Domain suffix for host-side names.
    #[arg(long, env = "PORTLESS_DOMAIN", value_name = "SUFFIX")]
    pub domain: Option<String>,
    /// TTL of portless's own answers, in seconds.
    #[arg(long, env = "PORTLESS_TTL", value_name = "SECONDS")]
    pub ttl: Option<u32>,
    /// Upstream resolver for other names; repeatable, tried in order.
    /// [default: the nameservers of /etc/resolv.conf]
    #[arg(
        long,
        env = "PORTLESS_UPSTREAM",
        value_name = "ADDR[:PORT]",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub upstream: Vec<String>,
    /// Static names in hosts(5) format, reloaded when the file changes.
    #[arg(long, env = "PORTLESS_HOSTS_FILE", value_name = "PATH")]
    pub hosts_file: Option<PathBuf>,
    /// ZONE and every name under it answer these addresses; repeatable.
    #[arg(
        long,
        env = "PORTLESS_INGRESS_ZONE",
        value_name = "ZONE=ADDR[,ADDR...]"
    )]
    #[serde(default)]
    pub ingress_zone: Vec<String>,
    /// Clients in this CIDR are host-side clients too (loopback and the
    /// host's own addresses always are); repeatable.
    #[arg(
        long,
        env = "PORTLESS_DNS_ALLOW",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub dns_allow: Vec<IpNet>,
    /// Time budget of one forwarded query, over all upstreams, in
    /// milliseconds.
    #[arg(long, env = "PORTLESS_FORWARD_TIMEOUT_MS", value_name = "MS")]
    pub forward_timeout_ms: Option<u64>,
    /// Forwarded queries in flight at once; past it, SERVFAIL at once.
    #[arg(long, env = "PORTLESS_FORWARD_MAX_INFLIGHT", value_name = "N")]
    pub forward_max_inflight: Option<usize>,
    /// UDP replies per second to one client address (loopback excepted),
    /// in bursts of up to as many; 0 turns the limit off.
    #[arg(long, env = "PORTLESS_DNS_RATE_LIMIT", value_name = "N")]
    pub dns_rate_limit: Option<u32>,
    /// Over the rate limit, every Nth reply is a truncated one (TC=1, which
    /// sends a real client to TCP) and the others are dropped; 0 drops
    /// them all.
    #[arg(long, env = "PORTLESS_DNS_RATE_LIMIT_SLIP", value_name = "N")]
    pub dns_rate_limit_slip: Option<u32>,
    /// DNS TCP connections open at once, over every listener; past it a
    /// new connection is closed at once.
    #[arg(long, env = "PORTLESS_DNS_TCP_MAX_CONNECTIONS", value_name = "N")]
    pub dns_tcp_max_connections: Option<usize>,
}
crate::merge_fields!(DnsOpts {
    dns_port,
    dns_listen,
    domain,
    ttl,
    upstream,
    hosts_file,
    ingress_zone,
    dns_allow,
    forward_timeout_ms,
    forward_max_inflight,
    dns_rate_limit,
    dns_rate_limit_slip,
    dns_tcp_max_connections,
});

/// An ingress zone: the zone and every name under it answer `addrs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressZone {
    pub zone: String,
    pub addrs: Vec<IpAddr>,
}

#[derive(Debug, Clone)]
pub struct DnsConfig {
    pub port: u16,
    pub listen: Vec<SocketAddr>,
    /// Lower case, no trailing dot.
    pub domain: String,
    pub ttl: u32,
    /// Empty means: read /etc/resolv.conf at start.
    pub upstreams: Vec<SocketAddr>,
    pub hosts_file: Option<PathBuf>,
    pub ingress_zones: Vec<IngressZone>,
    pub allow: Vec<IpNet>,
    pub forward_timeout: Duration,
    pub forward_max_inflight: usize,
    /// None: no limit.
    pub rate_limit: Option<RateLimit>,
    pub tcp_max_connections: usize,
}

impl DnsOpts {
    /// Every fixed default of the DNS options, taken from the dns library
    /// where it keeps one: the one source that resolution, `--help` and
    /// the README's reference read.
    pub fn defaults() -> Self {
        let rate = RateLimit::default();
        DnsOpts {
            dns_port: Some(53),
            domain: Some(zone::DEFAULT_DOMAIN.to_owned()),
            ttl: Some(zone::DEFAULT_TTL),
            forward_timeout_ms: Some(millis_of(forward::DEFAULT_BUDGET)),
            forward_max_inflight: Some(forward::DEFAULT_MAX_INFLIGHT),
            dns_rate_limit: Some(rate.per_second),
            dns_rate_limit_slip: Some(rate.slip),
            dns_tcp_max_connections: Some(tcp::DEFAULT_MAX_CONNECTIONS),
            ..DnsOpts::default()
        }
    }

    /// Fill in the defaults, then validate.
    pub fn resolve(self) -> Result<DnsConfig, ConfigError> {
        let o = self.merge(Self::defaults());
        let domain = normalize_name(&value(o.domain, "domain")?)
            .map_err(|e| ConfigError::new(format!("--domain: {e}")))?;
        let ttl = value(o.ttl, "ttl")?;
        if ttl > 86_400 {
            return Err(ConfigError::new("--ttl: at most 86400 seconds"));
        }
        let upstreams = o
            .upstream
            .iter()
            .map(|u| parse_upstream(u))
            .collect::<Result<Vec<_>, _>>()?;
        let ingress_zones = o
            .ingress_zone
            .iter()
            .map(|z| parse_ingress_zone(z))
            .collect::<Result<Vec<_>, _>>()?;
        let forward_timeout_ms = value(o.forward_timeout_ms, "forward-timeout-ms")?;
        if !(10..=60_000).contains(&forward_timeout_ms) {
            return Err(ConfigError::new(
                "--forward-timeout-ms: between 10 and 60000",
            ));
        }
        let forward_max_inflight = value(o.forward_max_inflight, "forward-max-inflight")?;
        if !(1..=65_536).contains(&forward_max_inflight) {
            return Err(ConfigError::new(
                "--forward-max-inflight: between 1 and 65536",
            ));
        }
        let per_second = value(o.dns_rate_limit, "dns-rate-limit")?;
        if per_second > 1_000_000 {
            return Err(ConfigError::new("--dns-rate-limit: at most 1000000"));
        }
        let slip = value(o.dns_rate_limit_slip, "dns-rate-limit-slip")?;
        if slip > 100 {
            return Err(ConfigError::new("--dns-rate-limit-slip: at most 100"));
        }
        let tcp_max_connections = value(o.dns_tcp_max_connections, "dns-tcp-max-connections")?;
        if !(1..=65_536).contains(&tcp_max_connections) {
            return Err(ConfigError::new(
                "--dns-tcp-max-connections: between 1 and 65536",
            ));
        }
        if let Some(path) = &o.hosts_file {
            // Read once here, so that a missing or unreadable file is a
            // configuration error before anything is bound.
            if let Err(e) = std::fs::read_to_string(path) {
                return Err(ConfigError::new(format!(
                    "--hosts-file {}: {e}",
                    path.display()
                )));
            }
        }
        Ok(DnsConfig {
            port: value(o.dns_port, "dns-port")?,
            listen: o.dns_listen,
            domain,
            ttl,
            upstreams,
            hosts_file: o.hosts_file,
            ingress_zones,
            allow: o.dns_allow,
            forward_timeout: Duration::from_millis(forward_timeout_ms),
            forward_max_inflight,
            rate_limit: (per_second > 0).then_some(RateLimit { per_second, slip }),
            tcp_max_connections,
        })
    }
}

/// `ADDR` or `ADDR:PORT` or `[V6]:PORT`; the port defaults to 53.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    Err(ConfigError::new(format!(
        "--upstream {s}: expected an IP address, optionally with :PORT"
    )))
}

fn parse_ingress_zone(s: &str) -> Result<IngressZone, ConfigError> {
    let (zone, addrs) = s.split_once('=').ok_or_else(|| {
        ConfigError::new(format!("--ingress-zone {s}: expected ZONE=ADDR[,ADDR...]"))
    })?;
    let zone = normalize_name(zone.trim_start_matches("*."))
        .map_err(|e| ConfigError::new(format!("--ingress-zone {s}: {e}")))?;
    let addrs = addrs
        .split(',')
        .map(|a| {
            a.trim().parse::<IpAddr>().map_err(|_| {
                ConfigError::new(format!("--ingress-zone {s}: `{a}` is not an IP address"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(IngressZone { zone, addrs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingress_zone_parses_addresses_and_strips_wildcard() {
        let z = parse_ingress_zone("*.Apps.Example.com.=10.0.0.1,fd00::1").unwrap();
        assert_eq!(z.zone, "apps.example.com");
        assert_eq!(
            z.addrs,
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert!(parse_ingress_zone("apps.example.com").is_err());
        assert!(parse_ingress_zone("apps.example.com=nope").is_err());
    }

    #[test]
    fn upstream_port_defaults_to_53() {
        assert_eq!(
            parse_upstream("127.0.0.53").unwrap(),
            "127.0.0.53:53".parse().unwrap()
        );
        assert_eq!(
            parse_upstream("[::1]:5353").unwrap(),
            "[::1]:5353".parse().unwrap()
        );
        assert!(parse_upstream("resolver.example").is_err());
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(
            normalize_name("Docker.Internal.").unwrap(),
            "docker.internal"
        );
        assert!(normalize_name("a..b").is_err());
        assert!(normalize_name("bad name").is_err());
    }
}
