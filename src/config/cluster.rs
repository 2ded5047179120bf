//! Cluster (netplane) options: on when `--cluster-etcd` is given. See
//! `super` for the pattern.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use ipnet::Ipv4Net;
use portless_netplane::Mode;
use portless_netplane::access::{Credentials, EtcdAccess, EtcdTls, TlsFileError};
use portless_netplane::agent::AgentConfig;
use serde::{Deserialize, Serialize};

use super::{ConfigError, Merge, value};

#[derive(Debug, Default, Clone, Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterOpts {
    /// etcd endpoints: http://host:port, or https://host:port (or host:port
    /// with --etcd-ca); turns cluster mode on.
    #[arg(
        long,
        env = "PORTLESS_CLUSTER_ETCD",
        value_name = "URL[,URL...]",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub cluster_etcd: Vec<String>,
    /// Address range shared by every host's container subnet.
    #[arg(long, env = "PORTLESS_CLUSTER_CIDR", value_name = "CIDR")]
    pub cluster_cidr: Option<Ipv4Net>,
    /// Prefix length of the subnet each host leases.
    #[arg(long, env = "PORTLESS_HOST_SUBNET_LEN", value_name = "N")]
    pub host_subnet_len: Option<u8>,
    /// This host's underlay address, where peers send its traffic.
    /// [default: the address of the interface holding the default route]
    #[arg(long, env = "PORTLESS_ADVERTISE_ADDR", value_name = "ADDR")]
    pub advertise_addr: Option<Ipv4Addr>,
    /// vxlan: kernel VXLAN to every peer; route: plain routes via peers,
    /// which must share a segment; auto: routes on the same segment, VXLAN
    /// to the rest.
    #[arg(long, env = "PORTLESS_NETPLANE_MODE", value_name = "vxlan|route|auto")]
    pub netplane_mode: Option<String>,
    /// UDP port of VXLAN.
    #[arg(long, env = "PORTLESS_VXLAN_PORT", value_name = "PORT")]
    pub vxlan_port: Option<u16>,
    /// VXLAN network identifier, the same on every host.
    #[arg(long, env = "PORTLESS_VNI", value_name = "VNI")]
    pub vni: Option<u32>,
    /// Docker bridge network that portless creates on the leased subnet.
    #[arg(long, env = "PORTLESS_DOCKER_NETWORK", value_name = "NAME")]
    pub docker_network: Option<String>,
    /// Lifetime of this host's lease in etcd: a host that stops refreshing
    /// it disappears from every peer this long after.
    #[arg(long, env = "PORTLESS_LEASE_TTL", value_name = "SECONDS")]
    pub lease_ttl: Option<u64>,
    /// With --docker-host none: the bridge of portless's own that holds the
    /// subnet's gateway, for local namespaces to attach to. Must start with
    /// "pl-".
    #[arg(long, env = "PORTLESS_BRIDGE", value_name = "NAME")]
    pub bridge: Option<String>,
    /// Identity of this host in etcd. [default: the advertise address]
    #[arg(long, env = "PORTLESS_HOST_ID", value_name = "ID")]
    pub host_id: Option<String>,
    /// Key prefix in etcd.
    #[arg(long, env = "PORTLESS_ETCD_PREFIX", value_name = "PREFIX")]
    pub etcd_prefix: Option<String>,
    /// How often the kernel is compared with the plan even when nothing
    /// changed, to repair drift.
    #[arg(long, env = "PORTLESS_NETPLANE_RESYNC", value_name = "SECONDS")]
    pub netplane_resync: Option<u64>,
    /// Directory where this host keeps what must outlive a restart (the
    /// last known lease and peers, shown while etcd is away).
    #[arg(long, env = "PORTLESS_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// On exit, give the lease back and remove every kernel object,
    /// iptables rule and Docker network portless created.
    #[arg(long, env = "PORTLESS_CLEANUP_ON_EXIT", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub cleanup_on_exit: Option<bool>,
    /// PEM CA bundle that etcd's certificate must chain to (and nothing
    /// else); turns TLS to etcd on. Without it, https:// endpoints are
    /// checked against the system's roots.
    #[arg(long, env = "PORTLESS_ETCD_CA", value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS with etcd; needs --etcd-key.
    #[arg(long, env = "PORTLESS_ETCD_CERT", value_name = "FILE")]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, env = "PORTLESS_ETCD_KEY", value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (etcd's RBAC auth); needs --etcd-password-file.
    #[arg(long, env = "PORTLESS_ETCD_USER", value_name = "NAME")]
    pub etcd_user: Option<String>,
    /// File holding the password of --etcd-user (a trailing newline is
    /// ignored). The password itself is never a flag: `ps` would show it.
    #[arg(long, env = "PORTLESS_ETCD_PASSWORD_FILE", value_name = "FILE")]
    pub etcd_password_file: Option<PathBuf>,
    // --- cluster networks (`docker network create -d portless`) ---
    /// Unix socket of the Docker network and IPAM plugin `portless`
    /// (served in cluster mode on a Docker host); "none" turns it off.
    #[arg(long, env = "PORTLESS_PLUGIN_SOCKET", value_name = "PATH|none")]
    pub plugin_socket: Option<String>,
    /// Range from which `docker network create -d portless` networks
    /// without --subnet get a /24 each; must not overlap --cluster-cidr.
    #[arg(long, env = "PORTLESS_NETWORK_POOL", value_name = "CIDR")]
    pub network_pool: Option<Ipv4Net>,
}
crate::merge_fields!(ClusterOpts {
    cluster_etcd,
    cluster_cidr,
    host_subnet_len,
    advertise_addr,
    netplane_mode,
    vxlan_port,
    vni,
    docker_network,
    lease_ttl,
    bridge,
    host_id,
    etcd_prefix,
    netplane_resync,
    state_dir,
    cleanup_on_exit,
    etcd_ca,
    etcd_cert,
    etcd_key,
    etcd_user,
    etcd_password_file,
    plugin_socket,
    network_pool,
});

/// Where a host keeps what must outlive a restart.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/portless";

/// The resolved cluster options: the netplane agent's own
/// [`AgentConfig`] and what the binary does around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Everything but what depends on the running host: `hostname`, and
    /// `bridge` and `masquerade_outside`, which hold only without Docker
    /// (filled in at start).
    pub agent: AgentConfig,
    pub docker_network: String,
    /// The bridge of portless's own, used with `--docker-host none`.
    pub bridge: String,
    pub cleanup_on_exit: bool,
    /// Cluster networks: the plugin socket (None: off) and the pool.
    pub plugin_socket: Option<PathBuf>,
    pub network_pool: Ipv4Net,
}

/// Where Docker looks for the `portless` plugin.
pub const DEFAULT_PLUGIN_SOCKET: &str = "/run/docker/plugins/portless.sock";
/// Where `-d portless` networks without `--subnet` get theirs.
pub const DEFAULT_NETWORK_POOL: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(10, 112, 0, 0), 12) {
    Ok(n) => n,
    Err(_) => panic!("a /12 is a valid prefix"),
};

const MAX_IFNAME: usize = 15;

impl ClusterOpts {
    /// Every fixed default of the cluster options, taken from the netplane
    /// library's [`AgentConfig::default`] where it keeps one: the one source
    /// that resolution, `--help` and the README's reference read.
    pub fn defaults() -> Self {
        let d = AgentConfig::default();
        ClusterOpts {
            cluster_cidr: Some(d.cluster),
            host_subnet_len: Some(d.subnet_len),
            netplane_mode: Some(d.mode.to_string()),
            vxlan_port: Some(d.vxlan_port),
            vni: Some(d.vni),
            docker_network: Some("portless".to_owned()),
            lease_ttl: Some(d.lease_ttl.as_secs()),
            bridge: Some(portless_netplane::plan::DEFAULT_BRIDGE.to_owned()),
            etcd_prefix: Some(d.prefix),
            netplane_resync: Some(d.resync.as_secs()),
            state_dir: Some(PathBuf::from(DEFAULT_STATE_DIR)),
            cleanup_on_exit: Some(false),
            plugin_socket: Some(DEFAULT_PLUGIN_SOCKET.to_owned()),
            network_pool: Some(DEFAULT_NETWORK_POOL),
            ..ClusterOpts::default()
        }
    }

    /// Fill in the defaults, then validate; None without `--cluster-etcd`.
    pub fn resolve(self) -> Result<Option<ClusterConfig>, ConfigError> {
        if self.cluster_etcd.is_empty() {
            return Ok(None);
        }
        let o = self.merge(Self::defaults());
        let (etcd, tls) = endpoints(&o.cluster_etcd, o.etcd_ca.is_some())?;
        let etcd_access = EtcdAccess {
            tls: etcd_tls(tls, &o)?,
            credentials: etcd_credentials(tls, &o)?,
        };
        let cidr = value(o.cluster_cidr, "cluster-cidr")?.trunc();
        let len = value(o.host_subnet_len, "host-subnet-len")?;
        if len <= cidr.prefix_len() || len > 30 {
            return Err(ConfigError::new(format!(
                "--host-subnet-len {len}: must be longer than the cluster CIDR's /{} and at most 30",
                cidr.prefix_len()
            )));
        }
        let mode = value(o.netplane_mode, "netplane-mode")?
            .parse::<Mode>()
            .map_err(|e| ConfigError::new(format!("--netplane-mode: {e}")))?;
        let vxlan_port = value(o.vxlan_port, "vxlan-port")?;
        if vxlan_port == 0 {
            return Err(ConfigError::new("--vxlan-port: must not be 0"));
        }
        let vni = value(o.vni, "vni")?;
        if vni == 0 || vni > 0x00ff_ffff {
            return Err(ConfigError::new("--vni: must be between 1 and 16777215"));
        }
        let docker_network = value(o.docker_network, "docker-network")?;
        if docker_network.is_empty() {
            return Err(ConfigError::new("--docker-network: must not be empty"));
        }
        let ttl = value(o.lease_ttl, "lease-ttl")?;
        if !(2..=3600).contains(&ttl) {
            return Err(ConfigError::new("--lease-ttl: between 2 and 3600 seconds"));
        }
        let bridge = value(o.bridge, "bridge")?;
        if !bridge.starts_with(portless_netplane::plan::LINK_PREFIX)
            || bridge.len() > MAX_IFNAME
            || bridge.contains(['/', ' '])
        {
            return Err(ConfigError::new(format!(
                "--bridge {bridge}: must start with \"pl-\" (so that cleanup finds it) and have at most {MAX_IFNAME} characters"
            )));
        }
        if let Some(id) = &o.host_id
            && (id.is_empty() || id.contains('/'))
        {
            return Err(ConfigError::new(
                "--host-id: must be non-empty and contain no '/'",
            ));
        }
        let etcd_prefix = value(o.etcd_prefix, "etcd-prefix")?;
        if !etcd_prefix.starts_with('/') {
            return Err(ConfigError::new("--etcd-prefix: must start with '/'"));
        }
        let resync = value(o.netplane_resync, "netplane-resync")?;
        if resync == 0 {
            return Err(ConfigError::new("--netplane-resync: at least 1 second"));
        }
        let plugin_socket = match value(o.plugin_socket, "plugin-socket")?.as_str() {
            "none" => None,
            p if p.starts_with('/') => Some(PathBuf::from(p)),
            p => {
                return Err(ConfigError::new(format!(
                    "--plugin-socket {p}: an absolute path, or none"
                )));
            }
        };
        let network_pool = value(o.network_pool, "network-pool")?.trunc();
        if network_pool.contains(&cidr) || cidr.contains(&network_pool) {
            return Err(ConfigError::new(format!(
                "--network-pool {network_pool}: overlaps the cluster range {cidr}"
            )));
        }
        if network_pool.prefix_len() > 24 {
            return Err(ConfigError::new(format!(
                "--network-pool {network_pool}: at least a /24 (networks get a /24 each)"
            )));
        }
        Ok(Some(ClusterConfig {
            plugin_socket,
            network_pool,
            agent: AgentConfig {
                etcd,
                etcd_access,
                prefix: etcd_prefix,
                cluster: cidr,
                subnet_len: len,
                advertise: o.advertise_addr,
                host_id: o.host_id,
                mode,
                vxlan_port,
                vni,
                lease_ttl: Duration::from_secs(ttl),
                resync: Duration::from_secs(resync),
                state_dir: Some(value(o.state_dir, "state-dir")?),
                ..AgentConfig::default()
            },
            docker_network,
            bridge,
            cleanup_on_exit: value(o.cleanup_on_exit, "cleanup-on-exit")?,
        }))
    }
}

/// The endpoints as etcd-client takes them, and whether they use TLS. With
/// `--etcd-ca` every endpoint is https (given as `https://host:port` or
/// `host:port`); without it, all are `http://` or all `https://` (checked
/// against the system's roots).
fn endpoints(urls: &[String], ca: bool) -> Result<(Vec<String>, bool), ConfigError> {
    let mut out = Vec::new();
    let mut schemes = BTreeSet::new();
    for url in urls {
        let url = url.trim();
        // Checked first, so that no message below repeats the password.
        if let Some((_, host)) = url.rsplit_once('@') {
            let scheme = url.split_once("://").map_or("", |(s, _)| s);
            return Err(ConfigError::new(format!(
                "--cluster-etcd {scheme}://…@{host}: no user or password in the endpoint \
                 (it would show in /api/cluster and is never used to sign in); \
                 use --etcd-user and --etcd-password-file"
            )));
        }
        let (scheme, rest) = match url.split_once("://") {
            Some((s @ ("http" | "https"), rest)) => (s, rest),
            Some(_) => {
                return Err(ConfigError::new(format!(
                    "--cluster-etcd {url}: expected http://host:port or https://host:port"
                )));
            }
            None if ca => ("https", url),
            None => {
                return Err(ConfigError::new(format!(
                    "--cluster-etcd {url}: expected http://host:port or https://host:port \
                     (host:port alone only with --etcd-ca)"
                )));
            }
        };
        if rest.is_empty() || !rest.contains(':') || rest.contains('/') {
            return Err(ConfigError::new(format!(
                "--cluster-etcd {url}: expected {scheme}://host:port"
            )));
        }
        if scheme == "http" && ca {
            return Err(ConfigError::new(format!(
                "--cluster-etcd {url}: plain http, but --etcd-ca turns TLS on; \
                 use https://{rest} or {rest}"
            )));
        }
        schemes.insert(scheme);
        out.push(format!("{scheme}://{rest}"));
    }
    if schemes.len() > 1 {
        return Err(ConfigError::new(
            "--cluster-etcd: all endpoints http:// or all https://, not both",
        ));
    }
    Ok((out, schemes.contains("https")))
}

fn read_file(option: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError::new(format!("{option} {}: cannot read: {e}", path.display())))
}

fn etcd_tls(tls: bool, o: &ClusterOpts) -> Result<Option<EtcdTls>, ConfigError> {
    let identity = match (&o.etcd_cert, &o.etcd_key) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::new(
                "--etcd-cert needs --etcd-key (the certificate's private key)",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "--etcd-key needs --etcd-cert (the certificate it belongs to)",
            ));
        }
        (Some(c), Some(k)) => Some((c, k)),
    };
    if !tls {
        if identity.is_some() {
            return Err(ConfigError::new(
                "--etcd-cert: a client certificate needs TLS to etcd: \
                 give --etcd-ca or https:// endpoints",
            ));
        }
        return Ok(None);
    }
    let ca = o
        .etcd_ca
        .as_deref()
        .map(|p| read_file("--etcd-ca", p))
        .transpose()?;
    let identity = match identity {
        Some((c, k)) => Some((read_file("--etcd-cert", c)?, read_file("--etcd-key", k)?)),
        None => None,
    };
    EtcdTls::new(ca, identity).map(Some).map_err(|e| {
        let (option, path) = match &e {
            TlsFileError::Ca(_) => ("--etcd-ca", &o.etcd_ca),
            TlsFileError::Cert(_) => ("--etcd-cert", &o.etcd_cert),
            TlsFileError::Key(_) => ("--etcd-key", &o.etcd_key),
        };
        let path = path.as_deref().unwrap_or(Path::new("")).display();
        ConfigError::new(format!("{option} {path}: {e}"))
    })
}

fn etcd_credentials(tls: bool, o: &ClusterOpts) -> Result<Option<Credentials>, ConfigError> {
    let (user, file) = match (&o.etcd_user, &o.etcd_password_file) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(ConfigError::new(
                "--etcd-user needs --etcd-password-file (the password is read from a file, \
                 never given on the command line)",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::new("--etcd-password-file needs --etcd-user"));
        }
        (Some(u), Some(f)) => (u, f),
    };
    if user.is_empty() {
        return Err(ConfigError::new("--etcd-user: must not be empty"));
    }
    if !tls {
        return Err(ConfigError::new(
            "--etcd-user: needs TLS (--etcd-ca or https:// endpoints): \
             the password would cross the network in clear",
        ));
    }
    let bytes = read_file("--etcd-password-file", file)?;
    let text = String::from_utf8(bytes).map_err(|_| {
        ConfigError::new(format!(
            "--etcd-password-file {}: not UTF-8 text",
            file.display()
        ))
    })?;
    // Files written by `echo` or an editor end in a newline that is not
    // part of the password.
    let password = text
        .strip_suffix('\n')
        .map(|p| p.strip_suffix('\r').unwrap_or(p))
        .unwrap_or(&text);
    if password.is_empty() {
        return Err(ConfigError::new(format!(
            "--etcd-password-file {}: empty",
            file.display()
        )));
    }
    Ok(Some(Credentials::new(user.clone(), password)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ClusterOpts {
        ClusterOpts {
            cluster_etcd: vec!["http://10.0.0.1:2379".into()],
            ..Default::default()
        }
    }

    #[test]
    fn off_without_etcd() {
        assert_eq!(ClusterOpts::default().resolve().unwrap(), None);
    }

    #[test]
    fn defaults() {
        let c = opts().resolve().unwrap().unwrap();
        assert_eq!(c.agent.cluster, "10.244.0.0/16".parse().unwrap());
        assert_eq!(c.agent.subnet_len, 24);
        assert_eq!(c.agent.mode, Mode::Vxlan);
        assert_eq!(c.agent.vxlan_port, 4789);
        assert_eq!(c.agent.vni, 1);
        assert_eq!(c.docker_network, "portless");
        assert_eq!(c.agent.lease_ttl, Duration::from_secs(10));
        assert_eq!(c.bridge, "pl-br0");
        assert_eq!(c.agent.prefix, "/portless/v1/");
        assert_eq!(
            c.plugin_socket.as_deref(),
            Some(Path::new(DEFAULT_PLUGIN_SOCKET))
        );
        assert_eq!(c.network_pool, "10.112.0.0/12".parse().unwrap());
        assert!(!c.cleanup_on_exit);
    }

    #[test]
    fn bad_values_are_refused() {
        let bad = [
            ClusterOpts {
                cluster_etcd: vec!["10.0.0.1:2379".into()],
                ..opts()
            },
            ClusterOpts {
                cluster_etcd: vec!["ftp://10.0.0.1:2379".into()],
                ..opts()
            },
            ClusterOpts {
                cluster_etcd: vec!["http://10.0.0.1".into()],
                ..opts()
            },
            ClusterOpts {
                host_subnet_len: Some(16),
                ..opts()
            },
            ClusterOpts {
                host_subnet_len: Some(31),
                ..opts()
            },
            ClusterOpts {
                netplane_mode: Some("gre".into()),
                ..opts()
            },
            ClusterOpts {
                vni: Some(0),
                ..opts()
            },
            ClusterOpts {
                vni: Some(1 << 24),
                ..opts()
            },
            ClusterOpts {
                lease_ttl: Some(1),
                ..opts()
            },
            ClusterOpts {
                network_pool: Some("10.0.0.0/8".parse().unwrap()),
                ..opts()
            },
            ClusterOpts {
                network_pool: Some("10.112.0.0/25".parse().unwrap()),
                ..opts()
            },
            ClusterOpts {
                plugin_socket: Some("portless.sock".into()),
                ..opts()
            },
            ClusterOpts {
                bridge: Some("br0".into()),
                ..opts()
            },
            ClusterOpts {
                bridge: Some("pl-waytoolongname".into()),
                ..opts()
            },
            ClusterOpts {
                host_id: Some("a/b".into()),
                ..opts()
            },
        ];
        for o in bad {
            let dbg = format!("{o:?}");
            assert!(o.resolve().is_err(), "accepted: {dbg}");
        }
    }

    #[test]
    fn toml_table_parses() {
        let o: ClusterOpts = toml::from_str(
            r#"
            cluster-etcd = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
            cluster-cidr = "10.50.0.0/16"
            host-subnet-len = 26
            netplane-mode = "auto"
            lease-ttl = 5
            cleanup-on-exit = true
            "#,
        )
        .unwrap();
        let c = o.resolve().unwrap().unwrap();
        assert_eq!(c.agent.etcd.len(), 2);
        assert_eq!(c.agent.subnet_len, 26);
        assert_eq!(c.agent.mode, Mode::Auto);
        assert!(c.cleanup_on_exit);
        assert!(toml::from_str::<ClusterOpts>("cluster-etc = []").is_err());
        // The etcd security keys; files are read by resolve.
        let o: ClusterOpts = toml::from_str(
            r#"
            etcd-ca = "/etc/portless/etcd-ca.pem"
            etcd-cert = "/etc/portless/etcd-client.pem"
            etcd-key = "/etc/portless/etcd-client-key.pem"
            etcd-user = "portless"
            etcd-password-file = "/etc/portless/etcd-password"
            "#,
        )
        .unwrap();
        assert_eq!(o.etcd_user.as_deref(), Some("portless"));
        assert_eq!(
            o.etcd_password_file.as_deref(),
            Some(Path::new("/etc/portless/etcd-password"))
        );
        assert!(o.etcd_ca.is_some() && o.etcd_cert.is_some() && o.etcd_key.is_some());
    }

    /// A temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "portless-cluster-cfg-{name}-{}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn file(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }

        /// A self-signed CA certificate made by openssl.
        fn ca(&self) -> PathBuf {
            let path = self.0.join("ca.pem");
            let key = self.0.join("ca-key.pem");
            let out = std::process::Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
                .args(["-subj", "/CN=portless-test-ca", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&path)
                .output()
                .expect("openssl is needed (./test.sh installs it)");
            assert!(out.status.success(), "{out:?}");
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tls_opts(endpoint: &str) -> ClusterOpts {
        ClusterOpts {
            cluster_etcd: vec![endpoint.into()],
            ..Default::default()
        }
    }

    #[test]
    fn etcd_tls_and_auth_mistakes_are_refused_naming_the_option() {
        let dir = TempDir::new("bad");
        let garbage = dir.file("garbage.pem", "not a certificate");
        let password = dir.file("password", "s3cret\n");
        let empty = dir.file("empty", "\n");
        let missing = dir.0.join("missing");
        let cases = [
            (
                ClusterOpts {
                    etcd_ca: Some(garbage.clone()),
                    etcd_cert: Some(garbage.clone()),
                    ..tls_opts("https://10.0.0.1:2379")
                },
                "--etcd-cert needs --etcd-key",
            ),
            (
                ClusterOpts {
                    etcd_key: Some(garbage.clone()),
                    ..tls_opts("https://10.0.0.1:2379")
                },
                "--etcd-key needs --etcd-cert",
            ),
            (
                ClusterOpts {
                    etcd_cert: Some(garbage.clone()),
                    etcd_key: Some(garbage.clone()),
                    ..tls_opts("http://10.0.0.1:2379")
                },
                "--etcd-cert: a client certificate needs TLS",
            ),
            (
                ClusterOpts {
                    etcd_ca: Some(garbage.clone()),
                    ..tls_opts("10.0.0.1:2379")
                },
                "--etcd-ca",
            ),
            (
                ClusterOpts {
                    etcd_ca: Some(missing.clone()),
                    ..tls_opts("10.0.0.1:2379")
                },
                "--etcd-ca",
            ),
            (
                ClusterOpts {
                    etcd_ca: Some(garbage.clone()),
                    ..tls_opts("http://10.0.0.1:2379")
                },
                "--etcd-ca turns TLS on",
            ),
            (tls_opts("10.0.0.1:2379"), "only with --etcd-ca"),
            (
                ClusterOpts {
                    cluster_etcd: vec![
                        "http://10.0.0.1:2379".into(),
                        "https://10.0.0.2:2379".into(),
                    ],
                    ..Default::default()
                },
                "not both",
            ),
            (
                ClusterOpts {
                    etcd_user: Some("portless".into()),
                    ..opts()
                },
                "--etcd-user needs --etcd-password-file",
            ),
            (
                ClusterOpts {
                    etcd_password_file: Some(password.clone()),
                    ..opts()
                },
                "--etcd-password-file needs --etcd-user",
            ),
            (
                ClusterOpts {
                    etcd_user: Some("portless".into()),
                    etcd_password_file: Some(missing.clone()),
                    ..tls_opts("https://10.0.0.1:2379")
                },
                "--etcd-password-file",
            ),
            (
                ClusterOpts {
                    etcd_user: Some("portless".into()),
                    etcd_password_file: Some(empty.clone()),
                    ..tls_opts("https://10.0.0.1:2379")
                },
                "--etcd-password-file",
            ),
            (
                ClusterOpts {
                    etcd_user: Some("portless".into()),
                    etcd_password_file: Some(password.clone()),
                    ..opts()
                },
                "--etcd-user: needs TLS (--etcd-ca or https:// endpoints)",
            ),
            (
                tls_opts("https://portless:s3cret@10.0.0.1:2379"),
                "use --etcd-user and --etcd-password-file",
            ),
            (
                tls_opts("http://portless@10.0.0.1:2379"),
                "no user or password in the endpoint",
            ),
        ];
        for (o, needle) in cases {
            let dbg = format!("{o:?}");
            let err = o.resolve().expect_err(&dbg).to_string();
            assert!(err.contains(needle), "{dbg}: {err}");
            assert!(!err.contains("s3cret"), "the password shows: {err}");
        }
    }

    #[test]
    fn etcd_tls_endpoints_and_password_resolve() {
        let dir = TempDir::new("good");
        let ca = dir.ca();
        let password = dir.file("password", "s3cret\n");
        // host:port and https:// with --etcd-ca: https to each, only that CA.
        let c = ClusterOpts {
            cluster_etcd: vec!["10.0.0.1:2379".into(), "https://10.0.0.2:2379".into()],
            etcd_ca: Some(ca),
            etcd_user: Some("portless".into()),
            etcd_password_file: Some(password),
            ..Default::default()
        }
        .resolve()
        .unwrap()
        .unwrap();
        assert_eq!(
            c.agent.etcd,
            ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
        );
        let tls = c.agent.etcd_access.tls.as_ref().expect("TLS on");
        assert!(!tls.system_roots() && !tls.mutual());
        assert_eq!(
            c.agent.etcd_access.credentials,
            Some(Credentials::new("portless", "s3cret"))
        );
        // The password never shows, whoever prints the configuration.
        assert!(!format!("{c:?}").contains("s3cret"));

        // https:// alone: the system's roots.
        let c = tls_opts("https://etcd.example.com:2379")
            .resolve()
            .unwrap()
            .unwrap();
        assert!(c.agent.etcd_access.tls.unwrap().system_roots());
        // Plain http: no TLS, no auth, as before.
        assert_eq!(
            opts().resolve().unwrap().unwrap().agent.etcd_access,
            EtcdAccess::default()
        );
    }
}

#[cfg(test)]
mod example_tests {
    use clap::Parser;

    use crate::config::{Cli, Command};

    fn resolve(args: &[&str]) -> super::ClusterConfig {
        let mut all = vec!["portless", "run"];
        all.extend_from_slice(args);
        let Command::Run(run) = Cli::try_parse_from(all).expect("arguments parse").command else {
            unreachable!("run was asked for")
        };
        run.resolve()
            .expect("valid")
            .cluster
            .expect("cluster mode on")
    }

    #[test]
    fn example_cluster_config_parses_and_flags_win_over_it() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/examples/cluster.toml");
        let c = resolve(&["--config", example]);
        assert_eq!(c.agent.etcd.len(), 2);
        assert_eq!(c.agent.mode, portless_netplane::Mode::Auto);
        assert_eq!(c.agent.advertise, Some("10.0.0.1".parse().unwrap()));
        let c = resolve(&[
            "--config",
            example,
            "--netplane-mode",
            "route",
            "--cluster-etcd",
            "http://127.0.0.1:2379",
        ]);
        assert_eq!(c.agent.mode, portless_netplane::Mode::Route);
        assert_eq!(c.agent.etcd, vec!["http://127.0.0.1:2379".to_owned()]);
    }
}
