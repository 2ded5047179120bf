//! Router options: the HTTP(S) ingress. See `super` for the pattern.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use ipnet::IpNet;
use portless_router::RouterOptions;
use portless_router::access_log::Target;
use serde::{Deserialize, Serialize};

use super::{ConfigError, Merge, millis_of, value};

#[derive(Debug, Default, Clone, Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RouterOpts {
    /// Turn the HTTP(S) router off.
    #[arg(long, env = "PORTLESS_NO_ROUTER", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub no_router: Option<bool>,
    /// Plain HTTP listener (HTTP/1.1, and HTTP/2 with prior knowledge).
    /// [default: [::]:80 (IPv6 and IPv4); 0.0.0.0:80 on hosts without IPv6]
    #[arg(long, env = "PORTLESS_HTTP_LISTEN", value_name = "ADDR:PORT")]
    pub http_listen: Option<SocketAddr>,
    /// HTTPS listener, active with --cert-dir or --acme-directory. [default: [::]:443
    /// (IPv6 and IPv4); 0.0.0.0:443 on hosts without IPv6]
    #[arg(long, env = "PORTLESS_HTTPS_LISTEN", value_name = "ADDR:PORT")]
    pub https_listen: Option<SocketAddr>,
    /// Directory of PEM certificates (with keys in the same file or in
    /// NAME.key), matched to requests by their names, wildcards included;
    /// default.pem, if present, serves everything else. Reloaded on change.
    #[arg(long, env = "PORTLESS_CERT_DIR", value_name = "DIR")]
    pub cert_dir: Option<PathBuf>,
    /// Answer plain-HTTP requests for routed hosts with a 308 to https.
    #[arg(long, env = "PORTLESS_REDIRECT_HTTPS", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub redirect_https: Option<bool>,
    /// Peers whose X-Forwarded-* and Forwarded headers are kept (appended
    /// to); from anyone else they are replaced. Repeatable.
    #[arg(
        long,
        env = "PORTLESS_TRUSTED_PROXY",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub trusted_proxy: Vec<IpNet>,
    /// Every connection to the router's listeners starts with a PROXY
    /// protocol v1 or v2 header (from a load balancer in front).
    #[arg(long, env = "PORTLESS_PROXY_PROTOCOL", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub proxy_protocol: Option<bool>,
    /// Time a client has to send request headers (and TLS handshake, and
    /// PROXY header); a connection with no request in progress for one to
    /// two of these is shut down, whatever its protocol.
    #[arg(long, env = "PORTLESS_HEADER_TIMEOUT_MS", value_name = "MS")]
    pub header_timeout_ms: Option<u64>,
    /// Largest request header block; larger gets 431.
    #[arg(long, env = "PORTLESS_MAX_HEADER_BYTES", value_name = "BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Largest request body; larger gets 413. 0 means no limit.
    #[arg(long, env = "PORTLESS_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<u64>,
    /// Backend connect timeout.
    #[arg(long, env = "PORTLESS_CONNECT_TIMEOUT_MS", value_name = "MS")]
    pub connect_timeout_ms: Option<u64>,
    /// Time for a backend to answer with response headers; past it, 504.
    #[arg(long, env = "PORTLESS_UPSTREAM_TIMEOUT_MS", value_name = "MS")]
    pub upstream_timeout_ms: Option<u64>,
    /// How long a backend that refused a connection gets no requests.
    #[arg(long, env = "PORTLESS_EJECT_MS", value_name = "MS")]
    pub eject_ms: Option<u64>,
    /// A client connection whose writes make no progress for this long (a
    /// client that stopped reading) is closed, with the backend connection
    /// of its answer.
    #[arg(long, env = "PORTLESS_SEND_TIMEOUT_MS", value_name = "MS")]
    pub send_timeout_ms: Option<u64>,
    /// Log every request as one JSON line to this file (created, appended
    /// to, reopened when rotated away or on SIGHUP), or to standard output
    /// with `-`.
    #[arg(long, env = "PORTLESS_ACCESS_LOG", value_name = "PATH|-")]
    pub access_log: Option<String>,
    /// Router threads, each with its own listener socket (SO_REUSEPORT)
    /// and backend connection pool. [default: the number of CPUs]
    #[arg(long, env = "PORTLESS_ROUTER_THREADS", value_name = "N")]
    pub router_threads: Option<usize>,
}
crate::merge_fields!(RouterOpts {
    no_router,
    http_listen,
    https_listen,
    cert_dir,
    redirect_https,
    trusted_proxy,
    proxy_protocol,
    header_timeout_ms,
    max_header_bytes,
    max_body_bytes,
    connect_timeout_ms,
    upstream_timeout_ms,
    eject_ms,
    send_timeout_ms,
    access_log,
    router_threads,
});

/// The resolved router options: the library's own [`RouterOptions`] and
/// what the binary does with them (listeners, certificates, threads).
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub enabled: bool,
    pub http_listen: SocketAddr,
    /// Some when certificates are configured.
    pub https_listen: Option<SocketAddr>,
    pub cert_dir: Option<PathBuf>,
    pub redirect_https: bool,
    /// The tunables as the router takes them; its access log is opened
    /// (from `access_log`) and its redirect port known (from the bound
    /// HTTPS listener) only at start.
    pub options: RouterOptions,
    pub access_log: Option<Target>,
    pub threads: usize,
    /// Automatic HTTPS, when on (`[acme]`, `--acme-*`).
    pub acme: Option<super::acme::AcmeConfig>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        // The defaults are those of an empty set of options, which always
        // resolves.
        RouterOpts::default()
            .resolve(None)
            .unwrap_or_else(|_| unreachable!("empty router options resolve"))
    }
}

/// `[::]:port`, which also takes IPv4, where the host has IPv6; else
/// `0.0.0.0:port`.
fn all_addresses(port: u16) -> SocketAddr {
    let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
    if std::net::TcpListener::bind(v6).is_ok() {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))
    } else {
        SocketAddr::from(([0, 0, 0, 0], port))
    }
}

fn millis(name: &str, v: Option<u64>, max: u64) -> Result<Duration, ConfigError> {
    let v = value(v, name)?;
    if !(1..=max).contains(&v) {
        return Err(ConfigError::new(format!("--{name}: between 1 and {max}")));
    }
    Ok(Duration::from_millis(v))
}

impl RouterOpts {
    /// Every fixed default of the router options, taken from the router
    /// library's [`RouterOptions::default`]: the one source that
    /// resolution, `--help` and the README's reference read. The listeners
    /// and threads depend on the host, and are documented in their help.
    pub fn defaults() -> Self {
        let d = RouterOptions::default();
        RouterOpts {
            no_router: Some(false),
            redirect_https: Some(false),
            proxy_protocol: Some(d.proxy_protocol),
            header_timeout_ms: Some(millis_of(d.header_read_timeout)),
            max_header_bytes: Some(d.max_header_bytes),
            max_body_bytes: Some(d.max_body_bytes.unwrap_or(0)),
            connect_timeout_ms: Some(millis_of(d.connect_timeout)),
            upstream_timeout_ms: Some(millis_of(d.upstream_timeout)),
            eject_ms: Some(millis_of(d.eject_for)),
            send_timeout_ms: Some(millis_of(d.send_timeout)),
            ..RouterOpts::default()
        }
    }

    /// Fill in the defaults, then validate. `acme`: the resolved `[acme]`
    /// options; with them HTTPS is served even without `--cert-dir`.
    pub fn resolve(
        self,
        acme: Option<super::acme::AcmeConfig>,
    ) -> Result<RouterConfig, ConfigError> {
        let o = self.merge(Self::defaults());
        let tls = o.cert_dir.is_some() || acme.is_some();
        let enabled = !value(o.no_router, "no-router")?;
        let http_listen = o.http_listen.unwrap_or_else(|| all_addresses(80));
        if let Some(dir) = &o.cert_dir
            && !dir.is_dir()
        {
            return Err(ConfigError::new(format!(
                "--cert-dir {}: not a directory",
                dir.display()
            )));
        }
        let https_listen = tls.then(|| o.https_listen.unwrap_or_else(|| all_addresses(443)));
        if o.https_listen.is_some() && !tls {
            return Err(ConfigError::new(
                "--https-listen needs --cert-dir or --acme-directory: there is nothing to serve TLS with",
            ));
        }
        let redirect_https = value(o.redirect_https, "redirect-https")?;
        if redirect_https && !tls {
            return Err(ConfigError::new(
                "--redirect-https needs --cert-dir or --acme-directory: there would be no https to redirect to",
            ));
        }
        if acme.is_some() && !enabled {
            return Err(ConfigError::new(
                "--acme-directory needs the router: it is off (--no-router)",
            ));
        }
        if let Some(https) = https_listen
            && https == http_listen
        {
            return Err(ConfigError::new(
                "--http-listen and --https-listen must differ",
            ));
        }
        let threads = match o.router_threads {
            Some(n) if (1..=256).contains(&n) => n,
            Some(_) => return Err(ConfigError::new("--router-threads: between 1 and 256")),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let max_header_bytes = value(o.max_header_bytes, "max-header-bytes")?;
        if !(8192..=1024 * 1024).contains(&max_header_bytes) {
            return Err(ConfigError::new(
                "--max-header-bytes: between 8192 and 1048576",
            ));
        }
        let options = RouterOptions {
            header_read_timeout: millis("header-timeout-ms", o.header_timeout_ms, 600_000)?,
            max_header_bytes,
            max_body_bytes: o.max_body_bytes.filter(|&n| n > 0),
            connect_timeout: millis("connect-timeout-ms", o.connect_timeout_ms, 600_000)?,
            upstream_timeout: millis("upstream-timeout-ms", o.upstream_timeout_ms, 3_600_000)?,
            eject_for: millis("eject-ms", o.eject_ms, 3_600_000)?,
            send_timeout: millis("send-timeout-ms", o.send_timeout_ms, 3_600_000)?,
            trusted_proxies: o.trusted_proxy,
            proxy_protocol: value(o.proxy_protocol, "proxy-protocol")?,
            ..RouterOptions::default()
        };
        Ok(RouterConfig {
            enabled,
            http_listen,
            https_listen,
            cert_dir: o.cert_dir,
            redirect_https,
            options,
            access_log: match o.access_log.as_deref() {
                None => None,
                Some("") => return Err(ConfigError::new("--access-log: a path, or - for stdout")),
                Some(s) => Some(Target::parse(s)),
            },
            threads,
            acme,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic in a test is a failed test
mod tests {
    use super::*;

    #[test]
    fn acme_alone_serves_https_and_allows_the_redirect() {
        let acme = super::super::acme::AcmeConfig {
            options: portless_router::acme::AcmeOptions::new("https://acme.test/dir", "/tmp/acme"),
            cluster_key: None,
        };
        let o = RouterOpts {
            redirect_https: Some(true),
            ..Default::default()
        };
        let c = o.clone().resolve(Some(acme.clone())).unwrap();
        assert!(c.redirect_https);
        assert_eq!(c.https_listen.map(|a| a.port()), Some(443));
        assert!(o.resolve(None).is_err());
        let off = RouterOpts {
            no_router: Some(true),
            ..Default::default()
        };
        assert!(off.resolve(Some(acme)).is_err());
    }

    #[test]
    fn defaults_resolve() {
        let c = RouterOpts::default().resolve(None).unwrap();
        assert!(c.enabled);
        assert_eq!(c.http_listen.port(), 80);
        assert!(c.http_listen.ip().is_unspecified());
        assert_eq!(c.https_listen, None);
        assert_eq!(c.options.max_body_bytes, None);
        assert_eq!(c.options.upstream_timeout, Duration::from_secs(60));
        assert_eq!(c.options.send_timeout, Duration::from_secs(60));
        assert_eq!(c.access_log, None);
    }

    #[test]
    fn bad_combinations_are_refused() {
        let o = RouterOpts {
            redirect_https: Some(true),
            ..Default::default()
        };
        assert!(o.resolve(None).is_err());
        let o = RouterOpts {
            cert_dir: Some("/nonexistent/portless-certs".into()),
            ..Default::default()
        };
        assert!(o.resolve(None).is_err());
        let o = RouterOpts {
            max_header_bytes: Some(100),
            ..Default::default()
        };
        assert!(o.resolve(None).is_err());
        let o = RouterOpts {
            upstream_timeout_ms: Some(0),
            ..Default::default()
        };
        assert!(o.resolve(None).is_err());
    }

    #[test]
    fn toml_table_parses_and_rejects_unknown_keys() {
        let o: RouterOpts = toml::from_str(
            "http-listen = \"127.0.0.1:8080\"\ntrusted-proxy = [\"10.0.0.0/8\"]\nproxy-protocol = true\nmax-body-bytes = 1048576\nsend-timeout-ms = 5000\naccess-log = \"-\"\n",
        )
        .unwrap();
        let c = o.resolve(None).unwrap();
        assert_eq!(c.http_listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.options.trusted_proxies.len(), 1);
        assert!(c.options.proxy_protocol);
        assert_eq!(c.options.max_body_bytes, Some(1_048_576));
        assert_eq!(c.options.send_timeout, Duration::from_secs(5));
        assert_eq!(c.access_log, Some(Target::Stdout));
        assert!(toml::from_str::<RouterOpts>("listen = 1").is_err());
    }
}
