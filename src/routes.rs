//! Catalog → router input: parse each container's `portless.http.*` labels
//! into [`RouteSpec`]s, pick the address to send to, and say why a
//! labelled container is not routed. Pure; see `docs/labels.md`.
//!
//! Label groups: keys without a group (`portless.http.host`) form the
//! default group; `portless.http.<group>.<field>` forms a named group, one
//! route each. Fields of the default group other than `host` are also the
//! defaults of every named group. A container with any bad label gets no
//! route at all (never half of its routes).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use portless_router::host::HostPattern;
use portless_router::table::parse_path_prefix;
use portless_router::{Backend, BackendState, RouteSpec, Scheme};
use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, Container, Endpoint, Liveness};

pub const LABEL_PREFIX: &str = "portless.http.";
const FIELDS: [&str; 5] = ["host", "port", "path", "network", "scheme"];

/// A labelled container that is not routed, and why (in `/api/routes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteProblem {
    pub container_id: String,
    pub container: String,
    pub reason: String,
}

/// The address chosen for one route of a container, for status (in
/// `/api/routes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressChoice {
    pub container: String,
    pub group: String,
    pub network: String,
    pub addr: SocketAddr,
    pub chosen_by: ChosenBy,
}

/// What chose a route's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChosenBy {
    /// The `portless.http.network` label.
    Label,
    /// The rule of docs/labels.md.
    Rule,
}

impl ChosenBy {
    pub fn as_str(self) -> &'static str {
        match self {
            ChosenBy::Label => "label",
            ChosenBy::Rule => "rule",
        }
    }
}

/// Everything the catalog says about routing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePlan {
    pub specs: Vec<RouteSpec>,
    pub choices: Vec<AddressChoice>,
    pub problems: Vec<RouteProblem>,
}

/// Build the router's input from a catalog snapshot.
pub fn plan(catalog: &Catalog) -> RoutePlan {
    let mut out = RoutePlan::default();
    for c in catalog.all_containers() {
        if !c.labels.keys().any(|k| k.starts_with(LABEL_PREFIX)) {
            continue;
        }
        match container_routes(catalog, c) {
            Ok(routes) => {
                for (spec, choice) in routes {
                    out.specs.push(spec);
                    out.choices.push(choice);
                }
            }
            Err(reason) => out.problems.push(RouteProblem {
                container_id: c.id.clone(),
                container: c.name.clone(),
                reason,
            }),
        }
    }
    out
}

type Groups<'a> = BTreeMap<&'a str, BTreeMap<&'a str, &'a str>>;

/// Split the labels into groups, refusing unknown keys.
fn groups(c: &Container) -> Result<Groups<'_>, String> {
    let mut groups: Groups<'_> = BTreeMap::new();
    for (key, value) in &c.labels {
        let Some(rest) = key.strip_prefix(LABEL_PREFIX) else {
            continue;
        };
        let (group, field) = match rest.split_once('.') {
            None => ("", rest),
            Some((g, f)) => {
                if g.is_empty()
                    || !g.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                    })
                {
                    return Err(format!(
                        "label {key}: a group name has only a-z, 0-9, '-' and '_'"
                    ));
                }
                (g, f)
            }
        };
        if !FIELDS.contains(&field) {
            return Err(format!(
                "label {key}: unknown field `{field}` (expected one of: {})",
                FIELDS.join(", ")
            ));
        }
        groups
            .entry(group)
            .or_default()
            .insert(field, value.as_str());
    }
    Ok(groups)
}

fn container_routes(
    catalog: &Catalog,
    c: &Container,
) -> Result<Vec<(RouteSpec, AddressChoice)>, String> {
    let groups = groups(c)?;
    let defaults = groups.get("").cloned().unwrap_or_default();
    let mut routes = Vec::new();
    for (&group, fields) in &groups {
        if group.is_empty() && !fields.contains_key("host") {
            // Only defaults for named groups; needs at least one of those.
            if groups.len() == 1 {
                return Err(format!("no {LABEL_PREFIX}host label"));
            }
            continue;
        }
        let get = |f: &str| fields.get(f).or_else(|| defaults.get(f)).copied();
        let label = |f: &str| {
            if group.is_empty() {
                format!("{LABEL_PREFIX}{f}")
            } else {
                format!("{LABEL_PREFIX}{group}.{f}")
            }
        };
        let hosts_raw = fields
            .get("host")
            .copied()
            .ok_or_else(|| format!("no {} label", label("host")))?;
        let hosts = hosts_raw
            .split(',')
            .filter(|h| !h.trim().is_empty())
            .map(|h| HostPattern::parse(h).map_err(|e| format!("{}: {e}", label("host"))))
            .collect::<Result<Vec<_>, _>>()?;
        if hosts.is_empty() {
            return Err(format!("{}: no host given", label("host")));
        }
        let port = match get("port") {
            Some(p) => match p.trim().parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(format!("{}: `{p}` is not a port (1-65535)", label("port"))),
            },
            None => match c.exposed_tcp_ports.as_slice() {
                [p] => *p,
                [] => {
                    return Err(format!(
                        "no {} label and the image exposes no TCP port",
                        label("port")
                    ));
                }
                many => {
                    return Err(format!(
                        "no {} label and the image exposes {} TCP ports ({}): say which",
                        label("port"),
                        many.len(),
                        many.iter()
                            .map(u16::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            },
        };
        let path_prefix = match get("path") {
            Some(p) => parse_path_prefix(p).map_err(|e| format!("{}: {e}", label("path")))?,
            None => "/".to_owned(),
        };
        let scheme = match get("scheme").map(str::trim) {
            None | Some("http") => Scheme::Http,
            Some("h2c") => Scheme::H2c,
            Some(other) => {
                return Err(format!(
                    "{}: `{other}` is not a scheme (http or h2c)",
                    label("scheme")
                ));
            }
        };
        let (endpoint, ip, chosen_by) = match get("network") {
            Some(net) => {
                let net = net.trim();
                let ep = network_endpoint(&c.endpoints, net)
                    .map_err(|why| format!("{}: {why} network `{net}`", label("network")))?;
                let ip = ep.addrs().next().ok_or_else(|| {
                    format!(
                        "{}: the container has no address on network `{net}`",
                        label("network")
                    )
                })?;
                (ep, ip, ChosenBy::Label)
            }
            None => {
                let (ep, ip) = choose_endpoint(catalog, &c.endpoints).ok_or_else(|| {
                    "the container has no IP address on any network (host or none network mode?)"
                        .to_owned()
                })?;
                (ep, ip, ChosenBy::Rule)
            }
        };
        let addr = SocketAddr::new(ip, port);
        let id = if group.is_empty() {
            c.id.clone()
        } else {
            format!("{}/{group}", c.id)
        };
        routes.push((
            RouteSpec {
                hosts,
                path_prefix,
                backends: vec![Backend {
                    id,
                    name: c.name.clone(),
                    addr,
                    scheme,
                    state: backend_state(c),
                }],
            },
            AddressChoice {
                container: c.name.clone(),
                group: group.to_owned(),
                network: endpoint.network_name.clone(),
                addr,
                chosen_by,
            },
        ));
    }
    Ok(routes)
}

/// The documented rule for a container on several networks, when no
/// `portless.http.network` label says which: networks that are not
/// `internal` first, then bridges (Docker's and cluster networks), then by
/// network name; on the chosen network, IPv4 before IPv6.
pub fn choose_endpoint<'a>(
    catalog: &Catalog,
    endpoints: &'a [Endpoint],
) -> Option<(&'a Endpoint, IpAddr)> {
    endpoints
        .iter()
        .filter_map(|e| e.addrs().next().map(|ip| (e, ip)))
        .min_by_key(|(e, _)| {
            let net = catalog.networks.get(&e.network_id);
            let internal = net.is_some_and(|n| n.internal);
            let not_bridge = net.is_some_and(|n| !n.is_bridge());
            (internal, not_bridge, e.network_name.clone())
        })
}

fn backend_state(c: &Container) -> BackendState {
    match c.liveness() {
        Liveness::Ready => BackendState::Healthy,
        Liveness::Starting => BackendState::Starting,
        Liveness::Unhealthy => BackendState::Unhealthy,
        Liveness::Draining => BackendState::Draining,
    }
}

/// The endpoint on the network `net` names, as Docker's CLI reads it: a
/// name, a full id, or an id prefix at least as long as the short ids
/// `docker network ls` shows (12), when only one network has it.
fn network_endpoint<'a>(
    endpoints: &'a [Endpoint],
    net: &str,
) -> Result<&'a Endpoint, &'static str> {
    if let Some(ep) = endpoints
        .iter()
        .find(|e| e.network_name == net || e.network_id == net)
    {
        return Ok(ep);
    }
    if net.len() < 12 {
        return Err("the container is not attached to");
    }
    let mut found = endpoints.iter().filter(|e| e.network_id.starts_with(net));
    match (found.next(), found.next()) {
        (Some(ep), None) => Ok(ep),
        (Some(_), Some(_)) => Err("more than one of the container's networks has the id prefix of"),
        (None, _) => Err("the container is not attached to"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic in a test is a failed test
mod tests {
    use super::*;
    use crate::catalog::{Health, Network};
    use proptest::prelude::*;

    fn container(labels: &[(&str, &str)], ports: &[u16]) -> Container {
        Container {
            id: "c1".into(),
            name: "shop".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            health: Health::None,
            stopping: false,
            stop_signal: None,
            exposed_tcp_ports: ports.to_vec(),
            compose_project: None,
            compose_service: None,
            host: None,
            endpoints: vec![
                Endpoint {
                    network_id: "n-back".into(),
                    network_name: "back".into(),
                    ipv4: Some("172.20.0.5".parse().unwrap()),
                    ipv6: None,
                    aliases: vec![],
                },
                Endpoint {
                    network_id: "n-front".into(),
                    network_name: "front".into(),
                    ipv4: Some("172.21.0.5".parse().unwrap()),
                    ipv6: Some("fd00::5".parse().unwrap()),
                    aliases: vec![],
                },
            ],
        }
    }

    fn catalog(c: Container) -> Catalog {
        let mut cat = Catalog::default();
        for (id, name, internal) in [("n-back", "back", true), ("n-front", "front", false)] {
            cat.networks.insert(
                id.into(),
                Network {
                    id: id.into(),
                    name: name.into(),
                    driver: "bridge".into(),
                    subnets: vec![],
                    gateways: vec![],
                    internal,
                },
            );
        }
        cat.containers.insert(c.id.clone(), c);
        cat
    }

    #[test]
    fn single_route_uses_the_one_exposed_port_and_the_rule_network() {
        let p = plan(&catalog(container(
            &[("portless.http.host", "Shop.Example.com")],
            &[8080],
        )));
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(p.specs.len(), 1);
        let b = &p.specs[0].backends[0];
        // "back" sorts first but is internal: "front" wins.
        assert_eq!(b.addr, "172.21.0.5:8080".parse().unwrap());
        assert_eq!(p.choices[0].chosen_by, ChosenBy::Rule);
        assert_eq!(
            p.specs[0].hosts,
            vec![HostPattern::Exact("shop.example.com".into())]
        );
    }

    #[test]
    fn network_label_overrides_the_rule() {
        let p = plan(&catalog(container(
            &[
                ("portless.http.host", "a.test"),
                ("portless.http.port", "80"),
                ("portless.http.network", "back"),
            ],
            &[],
        )));
        assert_eq!(
            p.specs[0].backends[0].addr,
            "172.20.0.5:80".parse().unwrap()
        );
        assert_eq!(p.choices[0].chosen_by, ChosenBy::Label);
    }

    #[test]
    fn the_address_rule_is_non_internal_then_bridge_then_lowest_name_then_ipv4() {
        let net = |id: &str, driver: &str, internal: bool| Network {
            id: id.into(),
            name: id.into(),
            driver: driver.into(),
            subnets: vec![],
            gateways: vec![],
            internal,
        };
        let ep = |name: &str, v4: Option<&str>, v6: Option<&str>| Endpoint {
            network_id: name.into(),
            network_name: name.into(),
            ipv4: v4.map(|a| a.parse().unwrap()),
            ipv6: v6.map(|a| a.parse().unwrap()),
            aliases: vec![],
        };
        let mut cat = Catalog::default();
        for n in [
            net("a-internal", "bridge", true),
            net("b-overlay", "overlay", false),
            net("c-bridge", "bridge", false),
            net("d-bridge", "bridge", false),
        ] {
            cat.networks.insert(n.id.clone(), n);
        }
        let pick = |eps: &[Endpoint]| {
            choose_endpoint(&cat, eps).map(|(e, ip)| (e.network_name.clone(), ip.to_string()))
        };
        let all = [
            ep("a-internal", Some("10.0.0.1"), None),
            ep("b-overlay", Some("10.0.1.1"), None),
            ep("d-bridge", None, Some("fd00::4")),
            ep("c-bridge", Some("10.0.2.1"), Some("fd00::3")),
        ];
        // Non-internal bridge networks first, the lowest name, its IPv4.
        assert_eq!(pick(&all), Some(("c-bridge".into(), "10.0.2.1".into())));
        // An IPv6-only endpoint gives its IPv6.
        assert_eq!(pick(&all[..3]), Some(("d-bridge".into(), "fd00::4".into())));
        // No bridge left: another driver before an internal network.
        assert_eq!(
            pick(&all[..2]),
            Some(("b-overlay".into(), "10.0.1.1".into()))
        );
        assert_eq!(
            pick(&all[..1]),
            Some(("a-internal".into(), "10.0.0.1".into()))
        );
        // The order Docker lists them in changes nothing.
        let mut rev = all.clone();
        rev.reverse();
        assert_eq!(pick(&rev), pick(&all));
        // No address at all: nothing to route to.
        assert_eq!(pick(&[ep("c-bridge", None, None)]), None);
    }

    #[test]
    fn network_label_takes_a_name_an_id_or_a_short_id() {
        let mut c = container(&[], &[]);
        c.endpoints[0].network_id =
            "3f1c0a9b7d2e5f60a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e".into();
        c.endpoints[1].network_id =
            "3f1c0a9b7d2e9999a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e".into();
        let eps = &c.endpoints;
        for (net, want) in [
            ("back", Some("back")),
            ("front", Some("front")),
            (eps[0].network_id.as_str(), Some("back")),
            ("3f1c0a9b7d2e5f", Some("back")),
            ("3f1c0a9b7d2e99", Some("front")),
            // Too short to be a short id, or shared by both networks.
            ("3f1c", None),
            ("3f1c0a9b7d2e", None),
            ("nope", None),
        ] {
            let got = network_endpoint(eps, net)
                .ok()
                .map(|e| e.network_name.as_str());
            assert_eq!(got, want, "{net}");
        }
        assert!(
            network_endpoint(eps, "3f1c0a9b7d2e")
                .unwrap_err()
                .contains("more than one")
        );
    }

    #[test]
    fn named_groups_inherit_defaults_and_make_one_route_each() {
        let p = plan(&catalog(container(
            &[
                ("portless.http.port", "80"),
                ("portless.http.web.host", "a.test,*.a.test"),
                ("portless.http.api.host", "api.test"),
                ("portless.http.api.port", "9000"),
                ("portless.http.api.scheme", "h2c"),
                ("portless.http.api.path", "/v1/"),
            ],
            &[],
        )));
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(p.specs.len(), 2);
        let api = &p.specs[0];
        assert_eq!(api.path_prefix, "/v1");
        assert_eq!(api.backends[0].scheme, Scheme::H2c);
        assert_eq!(api.backends[0].id, "c1/api");
        assert_eq!(api.backends[0].addr.port(), 9000);
        let web = &p.specs[1];
        assert_eq!(web.hosts.len(), 2);
        assert_eq!(web.backends[0].addr.port(), 80);
    }

    #[test]
    fn bad_labels_refuse_the_whole_container() {
        for labels in [
            vec![
                ("portless.http.host", "a.test"),
                ("portless.http.port", "http"),
            ],
            vec![("portless.http.host", "a b")],
            vec![
                ("portless.http.host", "a.test"),
                ("portless.http.colour", "red"),
            ],
            vec![
                ("portless.http.host", "a.test"),
                ("portless.http.scheme", "https"),
            ],
            vec![
                ("portless.http.host", "a.test"),
                ("portless.http.network", "nope"),
            ],
            vec![
                ("portless.http.host", "a.test"),
                ("portless.http.path", "v1"),
            ],
            vec![
                ("portless.http.web.host", "a.test"),
                ("portless.http.bad.port", "1"),
            ],
        ] {
            let mut labels = labels.clone();
            labels.push(("portless.http.ok.host", "ok.test"));
            labels.push(("portless.http.ok.port", "81"));
            let p = plan(&catalog(container(&labels, &[80])));
            assert!(p.specs.is_empty(), "{labels:?} gave {:?}", p.specs);
            assert_eq!(p.problems.len(), 1, "{labels:?}");
        }
    }

    #[test]
    fn defaults_without_any_host_are_refused() {
        let p = plan(&catalog(container(&[("portless.http.port", "80")], &[])));
        assert!(p.specs.is_empty());
        assert!(p.problems[0].reason.contains("no portless.http.host"));
    }

    #[test]
    fn port_is_required_with_several_or_no_exposed_ports() {
        let p = plan(&catalog(container(
            &[("portless.http.host", "a.test")],
            &[80, 443],
        )));
        assert!(p.problems[0].reason.contains("80, 443"), "{:?}", p.problems);
        let p = plan(&catalog(container(
            &[("portless.http.host", "a.test")],
            &[],
        )));
        assert_eq!(p.problems.len(), 1);
    }

    #[test]
    fn unlabelled_containers_are_ignored_and_states_map() {
        let mut c = container(&[("other", "x")], &[80]);
        assert_eq!(plan(&catalog(c.clone())), RoutePlan::default());
        c.labels
            .insert("portless.http.host".into(), "a.test".into());
        c.stopping = true;
        assert_eq!(
            plan(&catalog(c.clone())).specs[0].backends[0].state,
            BackendState::Draining
        );
        c.stopping = false;
        c.health = Health::Starting;
        assert_eq!(
            plan(&catalog(c)).specs[0].backends[0].state,
            BackendState::Starting
        );
    }

    proptest! {
        // Any label set either routes the container whole or refuses it
        // with one reason; it never panics or half-applies.
        #[test]
        fn labels_route_whole_or_not_at_all(
            labels in prop::collection::btree_map(
                prop::sample::select(vec![
                    "portless.http.host", "portless.http.port", "portless.http.path",
                    "portless.http.scheme", "portless.http.network", "portless.http.a.host",
                    "portless.http.a.port", "portless.http.B.host", "portless.http.x",
                ]),
                prop::sample::select(vec!["a.test", "*.b.test", "80", "0", "/p", "h2c", "front", "", "x y"]),
                0..6,
            ),
        ) {
            let pairs: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, *v)).collect();
            let p = plan(&catalog(container(&pairs, &[80])));
            let has_host = labels.keys().any(|k| k.ends_with(".host"));
            if labels.is_empty() {
                prop_assert_eq!(p, RoutePlan::default());
            } else if p.problems.is_empty() {
                prop_assert!(has_host);
                prop_assert!(!p.specs.is_empty());
            } else {
                prop_assert!(p.specs.is_empty());
                prop_assert_eq!(p.problems.len(), 1);
            }
        }
    }
}
