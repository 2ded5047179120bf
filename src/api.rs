//! The admin API's schema: one typed struct per JSON endpoint, written by
//! the server (`crate::admin`) and read by `portless status`
//! (`crate::status`). Plain types, at the bottom of the binary's layers;
//! parts defined elsewhere (the catalog, the router plan's address choices
//! and refusals, the netplane agent's status) are used as they are.
//!
//! - `/api/status`: [`Status`]
//! - `/api/routes`: [`Routes`] (404 with `--no-router`)
//! - `/api/cluster`: [`Cluster`] (404 without `--cluster-etcd`)
//! - `portless status --json`: [`Report`], all of them and the problems.

use std::net::SocketAddr;
use std::sync::Arc;

use portless_netplane::agent;
use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
pub use crate::routes::{AddressChoice, RouteProblem};

/// `/api/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub docker: DockerStatus,
    pub dns: DnsStatus,
    pub catalog: Arc<Catalog>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerStatus {
    /// False with `--docker-host none`.
    pub enabled: bool,
    /// The event stream is followed now.
    pub connected: bool,
    pub reconnects: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStatus {
    pub domain: String,
    pub listeners: Vec<SocketAddr>,
    pub upstreams: Vec<SocketAddr>,
    /// Names in the live zone.
    pub names: usize,
}

/// `/api/routes`: every route and its backends with address and state,
/// the address choice per container, refused containers with reasons, and
/// TLS names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routes {
    pub http_listen: SocketAddr,
    pub https_listen: Option<SocketAddr>,
    pub routes: Vec<Route>,
    pub addresses: Vec<AddressChoice>,
    pub not_routed: Vec<RouteProblem>,
    pub certificates: Vec<Certificate>,
    /// Automatic HTTPS: each host's certificate; None when it is off.
    pub acme: Option<Vec<AcmeCertificate>>,
}

/// One automatic-HTTPS host's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeCertificate {
    pub host: String,
    /// `pending` (none yet), `valid` or `failed` (the last order failed).
    pub state: String,
    /// The served certificate's end (seconds since the Unix epoch).
    pub not_after: Option<u64>,
    /// When the next order is due (seconds since the Unix epoch).
    pub next_attempt: Option<u64>,
    /// The last order's error, with the server's problem document.
    pub last_error: Option<String>,
    /// Orders failed in a row.
    pub failures: u32,
    /// Orders made since the start.
    pub orders: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// `host/prefix`, the `route` label of the router's metrics.
    pub route: String,
    pub host: String,
    pub path: String,
    pub requests: u64,
    pub backends: Vec<Backend>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    /// The container's id (with `:group` for a named label group).
    pub id: String,
    pub container: String,
    pub addr: SocketAddr,
    /// `http` or `h2c`.
    pub scheme: String,
    /// `healthy`, `starting`, `unhealthy`, `draining` or `ejected`.
    pub state: String,
    /// Requests sent and not yet answered with headers.
    pub in_flight: i64,
    pub requests: u64,
    pub connect_failures: u64,
}

/// A certificate of the HTTPS listener: the name it serves and its file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub name: String,
    pub file: String,
}

/// `/api/cluster`: the netplane agent's status, and what the binary adds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    #[serde(flatten)]
    pub netplane: agent::Status,
    /// None with `--docker-host none`.
    pub docker_network: Option<DockerNetwork>,
    /// The bridge of portless's own (with `--docker-host none`).
    pub bridge: Option<String>,
}

/// The cluster's Docker network, as shown at `/api/cluster`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerNetwork {
    pub name: String,
    pub id: Option<String>,
    pub ready: bool,
    pub error: Option<String>,
}

/// `portless status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub status: Status,
    /// None with the router off.
    pub routes: Option<Routes>,
    /// None without cluster mode.
    pub cluster: Option<Cluster>,
    /// What is unhealthy, one line each (empty: healthy).
    pub problems: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::ChosenBy;

    fn routes() -> Routes {
        Routes {
            http_listen: "[::]:80".parse().unwrap(),
            https_listen: Some("0.0.0.0:443".parse().unwrap()),
            routes: vec![Route {
                route: "shop.example.com/".into(),
                host: "shop.example.com".into(),
                path: "/".into(),
                requests: 7,
                backends: vec![Backend {
                    id: "abc".into(),
                    container: "shop-1".into(),
                    addr: "172.18.0.2:8080".parse().unwrap(),
                    scheme: "http".into(),
                    state: "healthy".into(),
                    in_flight: 1,
                    requests: 7,
                    connect_failures: 0,
                }],
            }],
            addresses: vec![AddressChoice {
                container: "shop-1".into(),
                group: String::new(),
                network: "front".into(),
                addr: "172.18.0.2:8080".parse().unwrap(),
                chosen_by: ChosenBy::Rule,
            }],
            not_routed: vec![RouteProblem {
                container_id: "def".into(),
                container: "broken".into(),
                reason: "unknown label".into(),
            }],
            certificates: vec![Certificate {
                name: "shop.example.com".into(),
                file: "/certs/shop.pem".into(),
            }],
            acme: Some(vec![AcmeCertificate {
                host: "blog.example.com".into(),
                state: "failed".into(),
                not_after: None,
                next_attempt: Some(1_800_000_000),
                last_error: Some("order failed: connection refused".into()),
                failures: 2,
                orders: 2,
            }]),
        }
    }

    fn cluster() -> Cluster {
        let mut netplane = agent::Status {
            etcd_endpoints: vec!["http://10.0.0.10:2379".into()],
            etcd_prefix: "/portless".into(),
            etcd_connected: true,
            last_error: Some("boom".into()),
            reconciles: 3,
            ..agent::Status::default()
        };
        netplane.records.published = 2;
        netplane.records.refused_total.insert("malformed".into(), 1);
        netplane.records.watch_lag.buckets = vec![1; agent::LAG_BUCKETS.len()];
        netplane.records.watch_lag.count = 1;
        Cluster {
            netplane,
            docker_network: Some(DockerNetwork {
                name: "portless".into(),
                id: None,
                ready: false,
                error: Some("exists".into()),
            }),
            bridge: None,
        }
    }

    fn status() -> Status {
        Status {
            docker: DockerStatus {
                enabled: true,
                connected: true,
                reconnects: 2,
            },
            dns: DnsStatus {
                domain: "docker".into(),
                listeners: vec!["127.0.0.1:53".parse().unwrap()],
                upstreams: vec![],
                names: 4,
            },
            catalog: Arc::new(Catalog::default()),
        }
    }

    #[test]
    fn every_endpoint_round_trips_through_json() {
        let report = Report {
            status: status(),
            routes: Some(routes()),
            cluster: Some(cluster()),
            problems: vec!["netplane: boom".into()],
        };
        let text = serde_json::to_string_pretty(&report).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back, report);
        let none = Report {
            routes: None,
            cluster: None,
            ..report
        };
        let back: Report = serde_json::from_str(&serde_json::to_string(&none).unwrap()).unwrap();
        assert_eq!(back, none);
    }

    /// The field names scripts and the tests read stay where they were.
    #[test]
    fn the_json_shape_is_the_one_served_before() {
        let r = serde_json::to_value(routes()).unwrap();
        assert_eq!(r["http_listen"], "[::]:80");
        assert_eq!(r["routes"][0]["path"], "/");
        assert_eq!(r["routes"][0]["backends"][0]["container"], "shop-1");
        assert_eq!(r["routes"][0]["backends"][0]["addr"], "172.18.0.2:8080");
        assert_eq!(r["addresses"][0]["chosen_by"], "rule");
        assert_eq!(r["not_routed"][0]["reason"], "unknown label");
        assert_eq!(r["certificates"][0]["file"], "/certs/shop.pem");
        let c = serde_json::to_value(cluster()).unwrap();
        // The agent's status is flattened into the top level.
        assert_eq!(c["etcd_connected"], true);
        assert_eq!(c["host"], serde_json::Value::Null);
        assert_eq!(c["records"]["refused_total"]["malformed"], 1);
        assert_eq!(c["docker_network"]["error"], "exists");
        let s = serde_json::to_value(status()).unwrap();
        assert_eq!(s["docker"]["connected"], true);
        assert_eq!(s["dns"]["listeners"][0], "127.0.0.1:53");
        assert!(s["catalog"]["containers"].is_object(), "{s}");
    }
}
