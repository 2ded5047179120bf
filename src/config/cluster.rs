//! Cluster (netplane) options: on when `--cluster-etcd` is given. See
//! `super` for the pattern.

use std::net::Ipv4Addr;
use std::time::Duration;

use clap::Args;
use ipnet::Ipv4Net;
use portless_netplane::Mode;
use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterOpts {
    /// etcd endpoints (http://host:port); turns cluster mode on.
    #[arg(
        long,
        env = "PORTLESS_CLUSTER_ETCD",
        value_name = "URL[,URL...]",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub cluster_etcd: Vec<String>,
    /// Address range shared by every host's container subnet.
    /// [default: 10.244.0.0/16]
    #[arg(long, env = "PORTLESS_CLUSTER_CIDR", value_name = "CIDR")]
    pub cluster_cidr: Option<Ipv4Net>,
    /// Prefix length of the subnet each host leases. [default: 24]
    #[arg(long, env = "PORTLESS_HOST_SUBNET_LEN", value_name = "N")]
    pub host_subnet_len: Option<u8>,
    /// This host's underlay address, where peers send its traffic.
    /// [default: the address of the interface holding the default route]
    #[arg(long, env = "PORTLESS_ADVERTISE_ADDR", value_name = "ADDR")]
    pub advertise_addr: Option<Ipv4Addr>,
    /// vxlan: kernel VXLAN to every peer; route: plain routes via peers,
    /// which must share a segment; auto: routes on the same segment, VXLAN
    /// to the rest. [default: vxlan]
    #[arg(long, env = "PORTLESS_NETPLANE_MODE", value_name = "vxlan|route|auto")]
    pub netplane_mode: Option<String>,
    /// UDP port of VXLAN. [default: 4789]
    #[arg(long, env = "PORTLESS_VXLAN_PORT", value_name = "PORT")]
    pub vxlan_port: Option<u16>,
    /// VXLAN network identifier, the same on every host. [default: 1]
    #[arg(long, env = "PORTLESS_VNI", value_name = "VNI")]
    pub vni: Option<u32>,
    /// Docker bridge network that portless creates on the leased subnet.
    /// [default: portless]
    #[arg(long, env = "PORTLESS_DOCKER_NETWORK", value_name = "NAME")]
    pub docker_network: Option<String>,
    /// Lifetime of this host's lease in etcd: a host that stops refreshing
    /// it disappears from every peer this long after. [default: 10]
    #[arg(long, env = "PORTLESS_LEASE_TTL", value_name = "SECONDS")]
    pub lease_ttl: Option<u64>,
    /// With --docker-host none: the bridge of portless's own that holds the
    /// subnet's gateway, for local namespaces to attach to. Must start with
    /// "pl-". [default: pl-br0]
    #[arg(long, env = "PORTLESS_BRIDGE", value_name = "NAME")]
    pub bridge: Option<String>,
    /// Identity of this host in etcd. [default: the advertise address]
    #[arg(long, env = "PORTLESS_HOST_ID", value_name = "ID")]
    pub host_id: Option<String>,
    /// Key prefix in etcd. [default: /portless/v1/]
    #[arg(long, env = "PORTLESS_ETCD_PREFIX", value_name = "PREFIX")]
    pub etcd_prefix: Option<String>,
    /// How often the kernel is compared with the plan even when nothing
    /// changed, to repair drift. [default: 10]
    #[arg(long, env = "PORTLESS_NETPLANE_RESYNC", value_name = "SECONDS")]
    pub netplane_resync: Option<u64>,
    /// On exit, give the lease back and remove every kernel object,
    /// iptables rule and Docker network portless created.
    #[arg(long, env = "PORTLESS_CLEANUP_ON_EXIT", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub cleanup_on_exit: Option<bool>,
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
    cleanup_on_exit,
});

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub etcd: Vec<String>,
    pub cidr: Ipv4Net,
    pub host_subnet_len: u8,
    pub advertise_addr: Option<Ipv4Addr>,
    pub mode: Mode,
    pub vxlan_port: u16,
    pub vni: u32,
    pub docker_network: String,
    pub lease_ttl: Duration,
    pub bridge: String,
    pub host_id: Option<String>,
    pub etcd_prefix: String,
    pub resync: Duration,
    pub cleanup_on_exit: bool,
}

const MAX_IFNAME: usize = 15;

impl ClusterOpts {
    pub fn resolve(self) -> Result<Option<ClusterConfig>, ConfigError> {
        if self.cluster_etcd.is_empty() {
            return Ok(None);
        }
        let mut etcd = Vec::new();
        for url in &self.cluster_etcd {
            let url = url.trim();
            if url.starts_with("https://") {
                return Err(ConfigError::new(format!(
                    "--cluster-etcd {url}: TLS to etcd is not supported yet; use http://"
                )));
            }
            let rest = url.strip_prefix("http://").ok_or_else(|| {
                ConfigError::new(format!("--cluster-etcd {url}: expected http://host:port"))
            })?;
            if rest.is_empty() || !rest.contains(':') {
                return Err(ConfigError::new(format!(
                    "--cluster-etcd {url}: expected http://host:port"
                )));
            }
            etcd.push(url.to_owned());
        }
        let cidr = self
            .cluster_cidr
            .unwrap_or_else(|| Ipv4Net::new(Ipv4Addr::new(10, 244, 0, 0), 16).unwrap_or_default())
            .trunc();
        let len = self.host_subnet_len.unwrap_or(24);
        if len <= cidr.prefix_len() || len > 30 {
            return Err(ConfigError::new(format!(
                "--host-subnet-len {len}: must be longer than the cluster CIDR's /{} and at most 30",
                cidr.prefix_len()
            )));
        }
        let mode = match self.netplane_mode.as_deref() {
            None => Mode::Vxlan,
            Some(m) => m
                .parse::<Mode>()
                .map_err(|e| ConfigError::new(format!("--netplane-mode: {e}")))?,
        };
        let vxlan_port = self.vxlan_port.unwrap_or(4789);
        if vxlan_port == 0 {
            return Err(ConfigError::new("--vxlan-port: must not be 0"));
        }
        let vni = self.vni.unwrap_or(1);
        if vni == 0 || vni > 0x00ff_ffff {
            return Err(ConfigError::new("--vni: must be between 1 and 16777215"));
        }
        let docker_network = self.docker_network.unwrap_or_else(|| "portless".to_owned());
        if docker_network.is_empty() {
            return Err(ConfigError::new("--docker-network: must not be empty"));
        }
        let ttl = self.lease_ttl.unwrap_or(10);
        if !(2..=3600).contains(&ttl) {
            return Err(ConfigError::new("--lease-ttl: between 2 and 3600 seconds"));
        }
        let bridge = self.bridge.unwrap_or_else(|| "pl-br0".to_owned());
        if !bridge.starts_with(portless_netplane::plan::LINK_PREFIX)
            || bridge.len() > MAX_IFNAME
            || bridge.contains(['/', ' '])
        {
            return Err(ConfigError::new(format!(
                "--bridge {bridge}: must start with \"pl-\" (so that cleanup finds it) and have at most {MAX_IFNAME} characters"
            )));
        }
        if let Some(id) = &self.host_id
            && (id.is_empty() || id.contains('/'))
        {
            return Err(ConfigError::new(
                "--host-id: must be non-empty and contain no '/'",
            ));
        }
        let etcd_prefix = self
            .etcd_prefix
            .unwrap_or_else(|| portless_netplane::store::PREFIX.to_owned());
        if !etcd_prefix.starts_with('/') {
            return Err(ConfigError::new("--etcd-prefix: must start with '/'"));
        }
        let resync = self.netplane_resync.unwrap_or(10);
        if resync == 0 {
            return Err(ConfigError::new("--netplane-resync: at least 1 second"));
        }
        Ok(Some(ClusterConfig {
            etcd,
            cidr,
            host_subnet_len: len,
            advertise_addr: self.advertise_addr,
            mode,
            vxlan_port,
            vni,
            docker_network,
            lease_ttl: Duration::from_secs(ttl),
            bridge,
            host_id: self.host_id,
            etcd_prefix,
            resync: Duration::from_secs(resync),
            cleanup_on_exit: self.cleanup_on_exit.unwrap_or(false),
        }))
    }
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
        assert_eq!(c.cidr, "10.244.0.0/16".parse().unwrap());
        assert_eq!(c.host_subnet_len, 24);
        assert_eq!(c.mode, Mode::Vxlan);
        assert_eq!(c.vxlan_port, 4789);
        assert_eq!(c.vni, 1);
        assert_eq!(c.docker_network, "portless");
        assert_eq!(c.lease_ttl, Duration::from_secs(10));
        assert_eq!(c.bridge, "pl-br0");
        assert_eq!(c.etcd_prefix, "/portless/v1/");
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
                cluster_etcd: vec!["https://10.0.0.1:2379".into()],
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
        assert_eq!(c.etcd.len(), 2);
        assert_eq!(c.host_subnet_len, 26);
        assert_eq!(c.mode, Mode::Auto);
        assert!(c.cleanup_on_exit);
        assert!(toml::from_str::<ClusterOpts>("cluster-etc = []").is_err());
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
        assert_eq!(c.etcd.len(), 2);
        assert_eq!(c.mode, portless_netplane::Mode::Auto);
        assert_eq!(c.advertise_addr, Some("10.0.0.1".parse().unwrap()));
        let c = resolve(&[
            "--config",
            example,
            "--netplane-mode",
            "route",
            "--cluster-etcd",
            "http://127.0.0.1:2379",
        ]);
        assert_eq!(c.mode, portless_netplane::Mode::Route);
        assert_eq!(c.etcd, vec!["http://127.0.0.1:2379".to_owned()]);
    }
}
