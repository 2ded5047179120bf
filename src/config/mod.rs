//! One typed configuration from three sources: flags, `PORTLESS_*`
//! environment variables (both through clap) and an optional TOML file.
//!
//! Precedence: flag, then environment, then the file, then the built-in
//! default. Every option section is a struct whose fields are all optional so
//! that the three sources can be merged field by field; `resolve` then turns
//! the merged options into the typed, validated config that the rest of the
//! binary uses. Everything is validated before anything is bound.
//!
//! TOML layout: general keys at the top level, then one table per part,
//! each key spelled as its flag without the dashes in front:
//!
//! ```toml
//! docker-host = "unix:///var/run/docker.sock"
//! [dns]
//! dns-port = 53
//! [router]
//! http-listen = "0.0.0.0:80"
//! [acme]
//! acme-directory = "letsencrypt"
//! [cluster]
//! cluster-etcd = ["http://10.0.0.1:2379"]
//! ```

pub mod acme;
pub mod cluster;
pub mod dns;
pub mod router;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

/// Exit code for a configuration or usage error (EX_USAGE from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// A configuration that cannot be used, with a message meant for a person.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// Merge two sources of the same option: `self` (flags or environment) wins
/// over `file`.
pub trait Merge {
    fn merge(self, file: Self) -> Self;
}

impl<T> Merge for Option<T> {
    fn merge(self, file: Self) -> Self {
        self.or(file)
    }
}

impl<T> Merge for Vec<T> {
    fn merge(self, file: Self) -> Self {
        if self.is_empty() { file } else { self }
    }
}

/// Implements [`Merge`] for an options struct, field by field.
#[macro_export]
macro_rules! merge_fields {
    ($ty:ty { $($field:ident),* $(,)? }) => {
        impl $crate::config::Merge for $ty {
            fn merge(self, file: Self) -> Self {
                Self { $($field: $crate::config::Merge::merge(self.$field, file.$field)),* }
            }
        }
    };
}

#[derive(Debug, Parser)]
#[command(
    name = "portless",
    version,
    about = "Containers reachable by name and by domain, with no port mapping",
    long_about = "portless is a sidecar for Docker hosts: a per-network DNS server for container \
names, a Host-header HTTP(S) ingress straight to container addresses, and cross-host container \
networking over VXLAN or plain routes."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar: discovery, DNS, router and (with --cluster-etcd) netplane.
    Run(Box<RunArgs>),
    /// Print what a running sidecar knows, by asking its admin API.
    Status(StatusArgs),
    /// Cross-host networking maintenance.
    #[command(subcommand)]
    Netplane(NetplaneCommand),
}

#[derive(Debug, Subcommand)]
pub enum NetplaneCommand {
    /// Remove every kernel object, iptables rule and Docker network that
    /// portless created, and nothing else.
    Cleanup(Box<RunArgs>),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Admin API of the running sidecar (the same flag as `run`'s;
    /// `--admin` is an alias).
    #[arg(
        long = "admin-listen",
        visible_alias = "admin",
        env = "PORTLESS_ADMIN_LISTEN",
        default_value = "127.0.0.1:9053",
        value_name = "ADDR:PORT"
    )]
    pub admin: SocketAddr,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML configuration file; flags and PORTLESS_* variables override it.
    #[arg(long, env = "PORTLESS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub general: GeneralOpts,
    #[command(flatten)]
    pub dns: dns::DnsOpts,
    #[command(flatten)]
    pub router: router::RouterOpts,
    #[command(flatten)]
    pub acme: acme::AcmeOpts,
    #[command(flatten)]
    pub cluster: cluster::ClusterOpts,
}

/// Options that belong to no single part.
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GeneralOpts {
    /// Docker Engine to follow: unix:///path, tcp://host:port or http://host:port, or "none"
    /// to run without Docker (only static names, ingress zones and netplane).
    /// [default: $DOCKER_HOST, else unix:///var/run/docker.sock]
    #[arg(long, env = "PORTLESS_DOCKER_HOST", value_name = "URL")]
    pub docker_host: Option<String>,
    /// Admin API (status, /metrics) listen address. [default: 127.0.0.1:9053]
    #[arg(long, env = "PORTLESS_ADMIN_LISTEN", value_name = "ADDR:PORT")]
    pub admin_listen: Option<SocketAddr>,
    /// Log filter in tracing's EnvFilter syntax; hickory-server's
    /// per-query lines stay out unless it names `hickory_server`.
    /// [default: info]
    #[arg(long, env = "PORTLESS_LOG", value_name = "FILTER")]
    pub log: Option<String>,
    /// Log lines as `text` (colours only on a terminal) or `json` (one
    /// object a line, for log shippers). [default: text]
    #[arg(long, env = "PORTLESS_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}
merge_fields!(GeneralOpts {
    docker_host,
    admin_listen,
    log,
    log_format
});

/// How log lines are written.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The log filter to use for `--log`: the given one (default `info`),
/// with hickory-server held to warnings unless the filter says otherwise.
/// hickory-server logs two INFO lines per TCP query, refused ones
/// included: at `info` a client could fill the disk (anything per query is
/// debug or trace here).
fn log_filter(given: Option<&str>) -> String {
    let filter = given.unwrap_or("info");
    if filter.contains("hickory_server") {
        filter.to_owned()
    } else if filter.trim().is_empty() {
        "hickory_server=warn".to_owned()
    } else {
        format!("{filter},hickory_server=warn")
    }
}

/// The TOML file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    #[serde(flatten)]
    general: GeneralFile,
    #[serde(default)]
    dns: dns::DnsOpts,
    #[serde(default)]
    router: router::RouterOpts,
    #[serde(default)]
    acme: acme::AcmeOpts,
    #[serde(default)]
    cluster: cluster::ClusterOpts,
}

// serde cannot combine `flatten` with `deny_unknown_fields`, so the general
// keys are listed here once more and checked by hand in `load_file`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct GeneralFile {
    docker_host: Option<String>,
    admin_listen: Option<SocketAddr>,
    log: Option<String>,
    log_format: Option<LogFormat>,
}

const GENERAL_KEYS: &[&str] = &[
    "docker-host",
    "admin-listen",
    "log",
    "log-format",
    "dns",
    "router",
    "acme",
    "cluster",
];

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(format!("cannot read config file {}: {e}", path.display()))
    })?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| ConfigError::new(format!("config file {}: {e}", path.display())))?;
    if let Some(key) = table.keys().find(|k| !GENERAL_KEYS.contains(&k.as_str())) {
        return Err(ConfigError::new(format!(
            "config file {}: unknown key `{key}` (expected one of: {})",
            path.display(),
            GENERAL_KEYS.join(", ")
        )));
    }
    toml::from_str(&text)
        .map_err(|e| ConfigError::new(format!("config file {}: {e}", path.display())))
}

/// Where to find the Docker Engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerHost {
    /// No Docker Engine: discovery is off.
    None,
    Unix(PathBuf),
    /// `tcp://` or `http://`, kept as an http URL.
    Http(String),
}

/// The resolved configuration of `portless run`.
#[derive(Debug, Clone)]
pub struct Config {
    pub docker: DockerHost,
    pub admin_listen: SocketAddr,
    pub log: String,
    pub log_format: LogFormat,
    pub dns: dns::DnsConfig,
    pub router: router::RouterConfig,
    pub cluster: Option<cluster::ClusterConfig>,
}

impl RunArgs {
    /// Merge flags, environment and file, then validate.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let general = self.general.merge(GeneralOpts {
            docker_host: file.general.docker_host,
            admin_listen: file.general.admin_listen,
            log: file.general.log,
            log_format: file.general.log_format,
        });
        let docker = parse_docker_host(
            general
                .docker_host
                .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|s| !s.is_empty())),
        )?;
        let cluster = self.cluster.merge(file.cluster).resolve()?;
        Ok(Config {
            docker,
            admin_listen: general
                .admin_listen
                .unwrap_or(([127, 0, 0, 1], 9053).into()),
            log: {
                let log = log_filter(general.log.as_deref());
                tracing_subscriber::EnvFilter::try_new(&log)
                    .map_err(|e| ConfigError::new(format!("--log {log}: {e}")))?;
                log
            },
            log_format: general.log_format.unwrap_or_default(),
            dns: self.dns.merge(file.dns).resolve()?,
            router: self
                .router
                .merge(file.router)
                .resolve(self.acme.merge(file.acme).resolve()?)?,
            cluster,
        })
    }
}

fn parse_docker_host(value: Option<String>) -> Result<DockerHost, ConfigError> {
    let Some(value) = value else {
        return Ok(DockerHost::Unix(PathBuf::from("/var/run/docker.sock")));
    };
    if value == "none" {
        return Ok(DockerHost::None);
    }
    if let Some(path) = value.strip_prefix("unix://") {
        if path.is_empty() {
            return Err(ConfigError::new(
                "--docker-host unix:// needs a socket path",
            ));
        }
        return Ok(DockerHost::Unix(PathBuf::from(path)));
    }
    for scheme in ["tcp://", "http://"] {
        if let Some(rest) = value.strip_prefix(scheme) {
            if rest.is_empty() {
                return Err(ConfigError::new(format!(
                    "--docker-host {value}: missing host:port"
                )));
            }
            return Ok(DockerHost::Http(format!("http://{rest}")));
        }
    }
    Err(ConfigError::new(format!(
        "--docker-host {value}: expected unix:///path, tcp://host:port, http://host:port or none"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hickory_per_query_lines_stay_out_unless_asked_for() {
        assert_eq!(log_filter(None), "info,hickory_server=warn");
        assert_eq!(log_filter(Some("debug")), "debug,hickory_server=warn");
        assert_eq!(
            log_filter(Some("info,hickory_server=info")),
            "info,hickory_server=info"
        );
    }

    #[test]
    fn docker_host_forms_parse() {
        assert_eq!(
            parse_docker_host(Some("none".into())).unwrap(),
            DockerHost::None
        );
        assert_eq!(
            parse_docker_host(Some("unix:///run/d.sock".into())).unwrap(),
            DockerHost::Unix("/run/d.sock".into())
        );
        assert_eq!(
            parse_docker_host(Some("tcp://1.2.3.4:2375".into())).unwrap(),
            DockerHost::Http("http://1.2.3.4:2375".into())
        );
        assert!(parse_docker_host(Some("ftp://x".into())).is_err());
        assert!(parse_docker_host(Some("unix://".into())).is_err());
    }

    fn run_args(args: &[&str]) -> RunArgs {
        let mut all = vec!["portless", "run"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all).expect("arguments parse").command {
            Command::Run(args) => *args,
            _ => unreachable!("run was asked for"),
        }
    }

    #[test]
    fn example_config_parses_and_flags_win_over_it() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/examples/portless.toml");
        let cfg = run_args(&["--config", example])
            .resolve()
            .expect("the example config is valid");
        assert_eq!(cfg.dns.domain, "docker.internal");
        assert_eq!(cfg.dns.listen, vec!["127.0.0.1:5353".parse().unwrap()]);
        assert_eq!(cfg.dns.upstreams, vec!["127.0.0.53:53".parse().unwrap()]);
        assert_eq!(cfg.router.threads, 2);
        assert_eq!(
            cfg.router.trusted_proxies,
            vec!["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]
        );
        let cluster = cfg
            .cluster
            .as_ref()
            .expect("the example turns cluster mode on");
        assert_eq!(cluster.etcd, vec!["http://10.0.0.10:2379".to_owned()]);
        assert_eq!(cluster.host_id.as_deref(), Some("host-a"));
        let cfg = run_args(&[
            "--config",
            example,
            "--ttl",
            "9",
            "--domain",
            "lan.internal",
        ])
        .resolve()
        .unwrap();
        assert_eq!((cfg.dns.ttl, cfg.dns.domain.as_str()), (9, "lan.internal"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = std::env::temp_dir().join(format!("portless-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text, needle) in [
            ("top.toml", "dns-port = 53\n", "dns-port"),
            ("section.toml", "[dns]\nttl = 5\nbogus = 1\n", "bogus"),
            ("type.toml", "[dns]\nttl = \"five\"\n", "ttl"),
            ("syntax.toml", "[dns\n", "config file"),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            let err = run_args(&["--config", path.to_str().unwrap()])
                .resolve()
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{name}: {err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
