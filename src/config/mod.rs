//! One typed configuration from three sources: flags, `PORTLESS_*`
//! environment variables (both through clap) and an optional TOML file.
//!
//! Precedence: flag, then environment, then the file, then the built-in
//! default. Every option section is a struct whose fields are all optional so
//! that the sources can be merged field by field; `resolve` then turns
//! the merged options into the typed, validated config that the rest of the
//! binary uses (the libraries' own option types where they have one).
//! Everything is validated before anything is bound.
//!
//! Defaults: each section's `defaults()` is the one source of its fixed
//! defaults, read from the libraries' `Default` impls and constants where
//! they keep one. Resolution merges it last; [`command`] shows it in
//! `--help` as `[default: VALUE]`; a test checks that the README's
//! reference says the same. Defaults that depend on the host (listen
//! addresses, thread count, upstreams) are described in the option's help.
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

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::{Deserialize, Serialize};

use crate::docker::DockerHost;

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

/// Every fixed default, by flag name (which is also its TOML key), as
/// `--help` and the README show it.
pub fn defaults_by_flag() -> BTreeMap<String, String> {
    fn shown<T: Serialize>(section: &T, out: &mut BTreeMap<String, String>) {
        // Each section serialises to a table of its TOML keys; options
        // with no fixed default are absent (None) or empty lists.
        let Ok(toml::Value::Table(table)) = toml::Value::try_from(section) else {
            unreachable!("an options section serialises to a TOML table")
        };
        for (key, v) in table {
            let text = match v {
                toml::Value::String(s) => s,
                toml::Value::Array(a) if a.is_empty() => continue,
                other => other.to_string(),
            };
            out.insert(key, text);
        }
    }
    let mut out = BTreeMap::new();
    shown(&GeneralOpts::defaults(), &mut out);
    shown(&dns::DnsOpts::defaults(), &mut out);
    shown(&router::RouterOpts::defaults(), &mut out);
    shown(&acme::AcmeOpts::defaults(), &mut out);
    shown(&cluster::ClusterOpts::defaults(), &mut out);
    out
}

/// The command line, with each option's fixed default shown at the end of
/// its help as `[default: VALUE]` (read from the sections' `defaults()`,
/// not given to clap as a value: a default given to clap would hide
/// whether the flag was set, and the file could no longer override it).
pub fn command() -> clap::Command {
    fn show_defaults(cmd: clap::Command) -> clap::Command {
        let defaults = defaults_by_flag();
        let shown: Vec<(clap::Id, String)> = cmd
            .get_arguments()
            .filter_map(|a| {
                let d = defaults.get(a.get_long()?)?;
                Some((a.get_id().clone(), d.clone()))
            })
            .collect();
        shown.into_iter().fold(cmd, |cmd, (id, d)| {
            cmd.mut_arg(id, |a| {
                let help = a.get_help().map(ToString::to_string).unwrap_or_default();
                a.help(format!("{help} [default: {d}]"))
            })
        })
    }
    Cli::command()
        .mut_subcommand("run", show_defaults)
        .mut_subcommand("netplane", |n| n.mut_subcommand("cleanup", show_defaults))
}

impl Cli {
    /// Parse the process's arguments (and environment) with [`command`],
    /// as `Parser::try_parse` does with the plain one.
    pub fn try_parse_args() -> Result<Cli, clap::Error> {
        let matches = command().try_get_matches()?;
        Cli::from_arg_matches(&matches)
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

/// An option's value once merged with its defaults: always there for an
/// option that has one (an error names the option otherwise).
pub fn value<T>(v: Option<T>, flag: &str) -> Result<T, ConfigError> {
    v.ok_or_else(|| ConfigError::new(format!("--{flag}: no value given and no default")))
}

/// A default kept by a library as a [`Duration`], as the option's
/// milliseconds.
pub fn millis_of(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The admin API's address unless `--admin-listen` says otherwise, for
/// `run` and `status` alike.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9053));

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
        default_value_t = DEFAULT_ADMIN_LISTEN,
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
    #[arg(
        long,
        env = "PORTLESS_CONFIG",
        value_name = "FILE",
        help_heading = HEADING_GENERAL
    )]
    pub config: Option<PathBuf>,
    #[command(flatten, next_help_heading = HEADING_GENERAL)]
    pub general: GeneralOpts,
    #[command(flatten, next_help_heading = HEADING_DNS)]
    pub dns: dns::DnsOpts,
    #[command(flatten, next_help_heading = HEADING_ROUTER)]
    pub router: router::RouterOpts,
    #[command(flatten, next_help_heading = HEADING_ACME)]
    pub acme: acme::AcmeOpts,
    #[command(flatten, next_help_heading = HEADING_CLUSTER)]
    pub cluster: cluster::ClusterOpts,
}

/// `--help` groups the options of `run` by section, each named with its
/// TOML table (as the README's reference is).
const HEADING_GENERAL: &str = "General (top level)";
const HEADING_DNS: &str = "DNS ([dns])";
const HEADING_ROUTER: &str = "Router ([router])";
const HEADING_ACME: &str = "Automatic HTTPS ([acme])";
const HEADING_CLUSTER: &str = "Cluster ([cluster])";

/// Options that belong to no single part. Unknown keys are refused by
/// `load_file` (serde cannot with `flatten`).
#[derive(Debug, Default, Clone, Args, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GeneralOpts {
    /// Docker Engine to follow: unix:///path, tcp://host:port or http://host:port, or "none"
    /// to run without Docker (only static names, ingress zones and netplane).
    /// [default: $DOCKER_HOST, else unix:///var/run/docker.sock]
    #[arg(long, env = "PORTLESS_DOCKER_HOST", value_name = "URL")]
    pub docker_host: Option<String>,
    /// Admin API (status, /metrics) listen address.
    #[arg(long, env = "PORTLESS_ADMIN_LISTEN", value_name = "ADDR:PORT")]
    pub admin_listen: Option<SocketAddr>,
    /// Log filter in tracing's EnvFilter syntax; hickory-server's
    /// per-query lines stay out unless it names `hickory_server`.
    #[arg(long, env = "PORTLESS_LOG", value_name = "FILTER")]
    pub log: Option<String>,
    /// Log lines as `text` (colours only on a terminal) or `json` (one
    /// object a line, for log shippers).
    #[arg(long, env = "PORTLESS_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}
merge_fields!(GeneralOpts {
    docker_host,
    admin_listen,
    log,
    log_format
});

impl GeneralOpts {
    /// Every fixed default of the general options: the one source that
    /// resolution, `--help` and the README's reference read.
    pub fn defaults() -> Self {
        GeneralOpts {
            docker_host: None,
            admin_listen: Some(DEFAULT_ADMIN_LISTEN),
            log: Some("info".to_owned()),
            log_format: Some(LogFormat::default()),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The log filter to use for `--log`: the given one, with hickory-server
/// held to warnings unless the filter says otherwise.
/// hickory-server logs two INFO lines per TCP query, refused ones
/// included: at `info` a client could fill the disk (anything per query is
/// debug or trace here).
fn log_filter(filter: &str) -> String {
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
#[serde(rename_all = "kebab-case")]
struct FileConfig {
    #[serde(flatten)]
    general: GeneralOpts,
    #[serde(default)]
    dns: dns::DnsOpts,
    #[serde(default)]
    router: router::RouterOpts,
    #[serde(default)]
    acme: acme::AcmeOpts,
    #[serde(default)]
    cluster: cluster::ClusterOpts,
}

/// The keys allowed at the top level of the file: the general options
/// (spelled as their flags) and the sections' tables.
fn top_level_keys() -> Vec<String> {
    let general = GeneralOpts::augment_args(clap::Command::new("general"));
    general
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .chain(["dns", "router", "acme", "cluster"].map(str::to_owned))
        .collect()
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(format!("cannot read config file {}: {e}", path.display()))
    })?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| ConfigError::new(format!("config file {}: {e}", path.display())))?;
    let allowed = top_level_keys();
    if let Some(key) = table.keys().find(|k| !allowed.contains(k)) {
        return Err(ConfigError::new(format!(
            "config file {}: unknown key `{key}` (expected one of: {})",
            path.display(),
            allowed.join(", ")
        )));
    }
    toml::from_str(&text)
        .map_err(|e| ConfigError::new(format!("config file {}: {e}", path.display())))
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
        let general = self
            .general
            .merge(file.general)
            .merge(GeneralOpts::defaults());
        let docker = parse_docker_host(
            general
                .docker_host
                .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|s| !s.is_empty())),
        )?;
        let cluster = self.cluster.merge(file.cluster).resolve()?;
        Ok(Config {
            docker,
            admin_listen: value(general.admin_listen, "admin-listen")?,
            log: {
                let log = log_filter(&value(general.log, "log")?);
                tracing_subscriber::EnvFilter::try_new(&log)
                    .map_err(|e| ConfigError::new(format!("--log {log}: {e}")))?;
                log
            },
            log_format: value(general.log_format, "log-format")?,
            dns: self.dns.merge(file.dns).resolve()?,
            router: {
                let router = self
                    .router
                    .merge(file.router)
                    .resolve(self.acme.merge(file.acme).resolve()?)?;
                // One host orders each certificate and the others take it
                // from etcd, sealed: every host needs the same key.
                if router
                    .acme
                    .as_ref()
                    .is_some_and(|a| a.cluster_key.is_none())
                    && cluster.is_some()
                {
                    return Err(ConfigError::new(
                        "--acme-directory in cluster mode needs --acme-cluster-key FILE \
                         (the same key on every host: openssl rand -hex 32 > FILE)",
                    ));
                }
                router
            },
            cluster,
        })
    }
}

fn parse_docker_host(value: Option<String>) -> Result<DockerHost, ConfigError> {
    let Some(value) = value else {
        return Ok(DockerHost::default());
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
        assert_eq!(log_filter("info"), "info,hickory_server=warn");
        assert_eq!(log_filter("debug"), "debug,hickory_server=warn");
        assert_eq!(
            log_filter("info,hickory_server=info"),
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
    fn acme_in_cluster_mode_needs_the_shared_key() {
        let acme = ["--acme-directory", "https://acme.test/dir"];
        let etcd = ["--cluster-etcd", "http://127.0.0.1:2379"];
        let both: Vec<&str> = acme.iter().chain(&etcd).copied().collect();
        let err = run_args(&both)
            .resolve()
            .expect_err("refused without a key");
        assert!(err.to_string().contains("--acme-cluster-key"), "{err}");
        // Alone, ACME needs no key; a key that is no file is refused.
        assert!(run_args(&acme).resolve().is_ok());
        let mut bad = both.clone();
        bad.extend(["--acme-cluster-key", "/nonexistent/key"]);
        let err = run_args(&bad).resolve().expect_err("no such file");
        assert!(err.to_string().contains("not a readable file"), "{err}");
        let key = std::env::temp_dir().join(format!("portless-test-key-{}", std::process::id()));
        std::fs::write(&key, "00".repeat(32)).unwrap();
        let mut good = both.clone();
        let path = key.to_str().unwrap().to_owned();
        good.extend(["--acme-cluster-key", path.as_str()]);
        let cfg = run_args(&good).resolve();
        let _ = std::fs::remove_file(&key);
        let cfg = cfg.expect("with a key");
        assert_eq!(cfg.router.acme.unwrap().cluster_key, Some(key));
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
            cfg.router.options.trusted_proxies,
            vec!["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]
        );
        let cluster = cfg
            .cluster
            .as_ref()
            .expect("the example turns cluster mode on");
        assert_eq!(cluster.agent.etcd, vec!["http://10.0.0.10:2379".to_owned()]);
        assert_eq!(cluster.agent.host_id.as_deref(), Some("host-a"));
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

    /// A temporary config file, removed on drop.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> TempFile {
            let path = std::env::temp_dir()
                .join(format!("portless-cfg-{}-{name}.toml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            TempFile(path)
        }

        fn arg(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// The long flags of one section, from its clap definition.
    fn flags<A: Args>() -> Vec<String> {
        A::augment_args(clap::Command::new("section"))
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect()
    }

    /// Each section's TOML table ("" for the top level) and its flags.
    fn sections() -> Vec<(&'static str, Vec<String>)> {
        vec![
            ("", flags::<GeneralOpts>()),
            ("dns", flags::<dns::DnsOpts>()),
            ("router", flags::<router::RouterOpts>()),
            ("acme", flags::<acme::AcmeOpts>()),
            ("cluster", flags::<cluster::ClusterOpts>()),
        ]
    }

    #[test]
    fn every_flag_is_a_key_of_its_toml_table() {
        let mut checked = 0;
        for (table, keys) in sections() {
            let table = if table.is_empty() {
                String::new()
            } else {
                format!("[{table}]\n")
            };
            for key in keys {
                // A value of the wrong type for most keys: the error must
                // be about the value, never an unknown key.
                let file = TempFile::new("key", &format!("{table}{key} = -1\n"));
                if let Err(e) = load_file(&file.0) {
                    let e = e.to_string();
                    assert!(!e.contains("unknown"), "{table}{key}: {e}");
                }
                checked += 1;
            }
        }
        assert!(checked >= 45, "only {checked} keys");
    }

    #[test]
    fn the_example_config_shows_every_key_in_its_table() {
        // Keys naming files are commented out (`# key = ...`): they count.
        let example = include_str!("../../tests/examples/portless.toml");
        let mut shown = Vec::new();
        let mut table = String::new();
        for line in example.lines() {
            let line = line.trim_start_matches("# ");
            if let Some(t) = line.strip_prefix('[') {
                table = t.trim_end_matches(']').to_owned();
            } else if let Some((key, _)) = line.split_once(" = ") {
                shown.push(format!("{table}.{key}"));
            }
        }
        let missing: Vec<String> = sections()
            .iter()
            .flat_map(|(table, keys)| keys.iter().map(move |k| format!("{table}.{k}")))
            .filter(|k| !shown.contains(k))
            .collect();
        assert!(
            missing.is_empty(),
            "tests/examples/portless.toml lacks {missing:?}"
        );
    }

    /// Every fixed default, as a TOML file that spells each one out.
    fn defaults_file() -> String {
        fn table<T: Serialize>(name: &str, section: &T) -> String {
            let text = toml::to_string(section).unwrap();
            if name.is_empty() {
                text
            } else {
                format!("[{name}]\n{text}")
            }
        }
        [
            table("", &GeneralOpts::defaults()),
            table("dns", &dns::DnsOpts::defaults()),
            table("router", &router::RouterOpts::defaults()),
            table("acme", &acme::AcmeOpts::defaults()),
            table("cluster", &cluster::ClusterOpts::defaults()),
        ]
        .join("\n")
    }

    #[test]
    fn the_defaults_shown_are_the_ones_used() {
        // Nothing given, and every shown default given in a file: the same
        // configuration. A default kept anywhere else than `defaults()`
        // (a literal in a resolver) would make them differ.
        let etcd = ["--cluster-etcd", "http://127.0.0.1:2379"];
        let implicit = run_args(&etcd).resolve().expect("the defaults resolve");
        let file = TempFile::new("defaults", &defaults_file());
        let mut args = vec!["--config", file.arg()];
        args.extend_from_slice(&etcd);
        let explicit = run_args(&args)
            .resolve()
            .expect("the shown defaults resolve");
        assert_eq!(format!("{implicit:?}"), format!("{explicit:?}"));
        // And what `--help` shows is that file's values.
        let defaults = defaults_by_flag();
        let mut run = command();
        let run = run.find_subcommand_mut("run").unwrap();
        for arg in run.get_arguments() {
            let (Some(long), Some(help)) = (arg.get_long(), arg.get_help()) else {
                continue;
            };
            let help = help.to_string();
            match defaults.get(long) {
                Some(d) => assert!(
                    help.ends_with(&format!(" [default: {d}]")),
                    "--{long}: {help}"
                ),
                None => assert!(
                    !help.contains("[default: ") || help.contains(". [default: "),
                    "--{long}: a fixed default in its help text, not in defaults(): {help}"
                ),
            }
        }
        assert_eq!(defaults["ttl"], "5");
        assert_eq!(defaults["header-timeout-ms"], "10000");
        assert_eq!(defaults["cluster-cidr"], "10.244.0.0/16");
    }
}
