//! The route table: which backends serve a request's host and path. Pure:
//! built from [`RouteSpec`]s, matched with plain functions, no I/O.
//!
//! Matching order: an exact host beats any wildcard, a longer wildcard
//! suffix beats a shorter one; then, among that host's routes only, the
//! longest path prefix wins. A request whose host matches but whose path
//! matches none of that host's prefixes does not fall back to a less
//! specific host: it gets 404, like a server block in nginx.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;

use crate::host::HostPattern;

/// How the router speaks to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheme {
    /// HTTP/1.1, pooled keep-alive connections.
    Http,
    /// HTTP/2 with prior knowledge (cleartext), for gRPC.
    H2c,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::H2c => "h2c",
        }
    }
}

/// What discovery says about a backend. The router adds its own passive
/// ejection on top (see [`crate::balance`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendState {
    /// Running, and healthy or without a healthcheck.
    Healthy,
    /// Healthcheck still starting: used only while no backend is healthy.
    Starting,
    /// Healthcheck failing: never used.
    Unhealthy,
    /// Being stopped: no new requests; in-flight ones finish.
    Draining,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Healthy => "healthy",
            BackendState::Starting => "starting",
            BackendState::Unhealthy => "unhealthy",
            BackendState::Draining => "draining",
        }
    }
}

/// One place a route's requests can go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Stable identity across table rebuilds (the container id, plus the
    /// label group for containers with several routes). Passive ejection
    /// state is kept by this id.
    pub id: String,
    /// For people: the container name.
    pub name: String,
    pub addr: SocketAddr,
    pub scheme: Scheme,
    pub state: BackendState,
}

/// The router's input: these hosts, under this path prefix, go to these
/// backends. Several specs with the same host and prefix are merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub hosts: Vec<HostPattern>,
    /// A normalised prefix from [`parse_path_prefix`].
    pub path_prefix: String,
    pub backends: Vec<Backend>,
}

/// Why a path prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("`{0}`: a path prefix starts with '/'")]
    NoSlash(String),
    #[error("`{0}`: a path prefix has no query, fragment, space or control characters")]
    BadChar(String),
}

/// Normalise a path prefix: it starts with `/`, and a trailing `/` is
/// dropped (`/api/` and `/api` are the same prefix).
pub fn parse_path_prefix(s: &str) -> Result<String, PathError> {
    let s = s.trim();
    if !s.starts_with('/') {
        return Err(PathError::NoSlash(s.to_owned()));
    }
    if s.bytes()
        .any(|b| b == b'?' || b == b'#' || b <= b' ' || b == 0x7f)
    {
        return Err(PathError::BadChar(s.to_owned()));
    }
    let trimmed = s.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    })
}

/// Whether a request path falls under a normalised prefix, on segment
/// boundaries: `/api` matches `/api` and `/api/x`, never `/apiary`.
pub fn path_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// One host pattern and path prefix, with every backend that serves it,
/// and what the table's user keeps per route (`payload`: the router's
/// runtime state; nothing for a plain table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<T = ()> {
    pub host: HostPattern,
    pub path_prefix: String,
    /// Sorted by id, no duplicates.
    pub backends: Vec<Backend>,
    pub payload: T,
}

impl<T> Route<T> {
    /// `host/prefix`, as used in metrics and status: `shop.example.com/`,
    /// `*.example.com/api`.
    pub fn key(&self) -> RouteKey {
        RouteKey(format!("{}{}", self.host, self.path_prefix))
    }
}

/// A route's name in status and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey(pub String);

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An immutable, indexed set of routes, each carrying a payload of type
/// `T` (see [`RouteTable::with_payload`]).
/// Names to route indices. foldhash, not SipHash: looked up once or more
/// on every request; its seed is random per process, and only the
/// operator's routes are inserted (clients only look up).
type Names = HashMap<String, Vec<usize>, foldhash::fast::RandomState>;

#[derive(Debug, Clone)]
pub struct RouteTable<T = ()> {
    routes: Vec<Route<T>>,
    /// Host → route indices, longest prefix first.
    exact: Names,
    /// Wildcard suffix → route indices, longest prefix first.
    wildcard: Names,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        RouteTable {
            routes: Vec::new(),
            exact: Names::default(),
            wildcard: Names::default(),
        }
    }
}

impl RouteTable {
    /// Build a table. Specs that share a host and prefix are merged into one
    /// route whose backends are the union (by backend id); the order of
    /// `specs` does not matter.
    pub fn build(specs: impl IntoIterator<Item = RouteSpec>) -> Self {
        let mut merged: BTreeMap<(HostPattern, String), BTreeMap<String, Backend>> =
            BTreeMap::new();
        for spec in specs {
            for host in &spec.hosts {
                let slot = merged
                    .entry((host.clone(), spec.path_prefix.clone()))
                    .or_default();
                for b in &spec.backends {
                    slot.entry(b.id.clone()).or_insert_with(|| b.clone());
                }
            }
        }
        let routes: Vec<Route> = merged
            .into_iter()
            .map(|((host, path_prefix), backends)| Route {
                host,
                path_prefix,
                backends: backends.into_values().collect(),
                payload: (),
            })
            .collect();
        let mut exact = Names::default();
        let mut wildcard = Names::default();
        for (i, r) in routes.iter().enumerate() {
            let (map, name) = match &r.host {
                HostPattern::Exact(n) => (&mut exact, n),
                HostPattern::Wildcard(s) => (&mut wildcard, s),
            };
            map.entry(name.clone()).or_default().push(i);
        }
        for list in exact.values_mut().chain(wildcard.values_mut()) {
            list.sort_by_key(|&i| std::cmp::Reverse(routes[i].path_prefix.len()));
        }
        RouteTable {
            routes,
            exact,
            wildcard,
        }
    }
}

impl<T> RouteTable<T> {
    /// The same table, each route carrying `f(route)` as its payload (the
    /// index of a route does not change).
    pub fn with_payload<U>(self, mut f: impl FnMut(&Route<T>) -> U) -> RouteTable<U> {
        RouteTable {
            routes: self
                .routes
                .into_iter()
                .map(|r| {
                    let payload = f(&r);
                    Route {
                        host: r.host,
                        path_prefix: r.path_prefix,
                        backends: r.backends,
                        payload,
                    }
                })
                .collect(),
            exact: self.exact,
            wildcard: self.wildcard,
        }
    }

    pub fn routes(&self) -> &[Route<T>] {
        &self.routes
    }

    pub fn route(&self, index: usize) -> Option<&Route<T>> {
        self.routes.get(index)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The route for a normalised host (see
    /// [`crate::host::normalize_authority`]) and a request path, as an
    /// index into [`RouteTable::routes`].
    pub fn find(&self, host: &str, path: &str) -> Option<usize> {
        let candidates = self.host_routes(host)?;
        candidates
            .iter()
            .copied()
            .find(|&i| path_matches(&self.routes[i].path_prefix, path))
    }

    fn host_routes(&self, host: &str) -> Option<&Vec<usize>> {
        if let Some(list) = self.exact.get(host) {
            return Some(list);
        }
        // Walk the suffixes from the longest: the first hit is the most
        // specific wildcard.
        let mut rest = host;
        while let Some((_, suffix)) = rest.split_once('.') {
            if let Some(list) = self.wildcard.get(suffix) {
                return Some(list);
            }
            rest = suffix;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn backend(id: &str) -> Backend {
        Backend {
            id: id.into(),
            name: id.into(),
            addr: "127.0.0.1:80".parse().unwrap(),
            scheme: Scheme::Http,
            state: BackendState::Healthy,
        }
    }

    fn spec(hosts: &[&str], path: &str, ids: &[&str]) -> RouteSpec {
        RouteSpec {
            hosts: hosts
                .iter()
                .map(|h| HostPattern::parse(h).unwrap())
                .collect(),
            path_prefix: parse_path_prefix(path).unwrap(),
            backends: ids.iter().map(|i| backend(i)).collect(),
        }
    }

    fn found<'a>(t: &'a RouteTable, host: &str, path: &str) -> Option<&'a str> {
        t.find(host, path)
            .map(|i| t.routes()[i].backends[0].id.as_str())
    }

    #[test]
    fn payloads_ride_with_their_routes() {
        let t = RouteTable::build([
            spec(&["a.test"], "/", &["a"]),
            spec(&["a.test"], "/api", &["api"]),
            spec(&["*.test"], "/", &["w"]),
        ])
        .with_payload(|r| r.key().0);
        for (host, path, key) in [
            ("a.test", "/x", "a.test/"),
            ("a.test", "/api/v1", "a.test/api"),
            ("b.test", "/", "*.test/"),
        ] {
            let i = t.find(host, path).unwrap();
            assert_eq!(t.routes()[i].payload, key);
        }
    }

    #[test]
    fn exact_beats_wildcard_and_specific_wildcard_beats_general() {
        let t = RouteTable::build([
            spec(&["*.example.com"], "/", &["wild"]),
            spec(&["*.apps.example.com"], "/", &["apps"]),
            spec(&["shop.apps.example.com"], "/", &["shop"]),
        ]);
        assert_eq!(found(&t, "shop.apps.example.com", "/"), Some("shop"));
        assert_eq!(found(&t, "blog.apps.example.com", "/"), Some("apps"));
        assert_eq!(found(&t, "x.y.apps.example.com", "/"), Some("apps"));
        assert_eq!(found(&t, "www.example.com", "/"), Some("wild"));
        assert_eq!(found(&t, "example.com", "/"), None);
        assert_eq!(found(&t, "other.org", "/"), None);
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let t = RouteTable::build([
            spec(&["a.test"], "/", &["root"]),
            spec(&["a.test"], "/api/", &["api"]),
            spec(&["a.test"], "/api/v2", &["v2"]),
        ]);
        assert_eq!(found(&t, "a.test", "/"), Some("root"));
        assert_eq!(found(&t, "a.test", "/api"), Some("api"));
        assert_eq!(found(&t, "a.test", "/api/x"), Some("api"));
        assert_eq!(found(&t, "a.test", "/apiary"), Some("root"));
        assert_eq!(found(&t, "a.test", "/api/v2/x"), Some("v2"));
        assert_eq!(found(&t, "a.test", "/api/v23"), Some("api"));
    }

    #[test]
    fn exact_host_without_matching_path_does_not_fall_back() {
        let t = RouteTable::build([
            spec(&["*.example.com"], "/", &["wild"]),
            spec(&["shop.example.com"], "/api", &["api"]),
        ]);
        assert_eq!(found(&t, "shop.example.com", "/api/1"), Some("api"));
        assert_eq!(found(&t, "shop.example.com", "/"), None);
    }

    #[test]
    fn specs_with_same_host_and_path_merge_backends() {
        let t = RouteTable::build([
            spec(&["a.test", "b.test"], "/", &["c1"]),
            spec(&["a.test"], "/", &["c2", "c1"]),
        ]);
        assert_eq!(t.len(), 2);
        let a = &t.routes()[t.find("a.test", "/").unwrap()];
        let ids: Vec<_> = a.backends.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(ids, ["c1", "c2"]);
        assert_eq!(a.key().0, "a.test/");
    }

    #[test]
    fn path_prefixes_are_checked() {
        assert_eq!(parse_path_prefix("/api/").unwrap(), "/api");
        assert_eq!(parse_path_prefix("///").unwrap(), "/");
        assert!(parse_path_prefix("api").is_err());
        assert!(parse_path_prefix("/a?b").is_err());
        assert!(parse_path_prefix("/a b").is_err());
    }

    proptest! {
        // The table's answer equals a brute-force scan of the same rules.
        #[test]
        fn find_agrees_with_brute_force(
            routes in prop::collection::vec(
                (any::<bool>(), prop::sample::select(vec!["a.x", "b.a.x", "x", "c.b.a.x"]),
                 prop::sample::select(vec!["/", "/p", "/p/q", "/q"])), 0..12),
            host in prop::sample::select(vec!["a.x", "b.a.x", "x", "c.b.a.x", "d.c.b.a.x", "y"]),
            path in prop::sample::select(vec!["/", "/p", "/p/q", "/pq", "/q/1", "/p/q/r"]),
        ) {
            let specs: Vec<RouteSpec> = routes.iter().enumerate().map(|(i, (wild, h, p))| {
                let h = if *wild { format!("*.{h}") } else { (*h).to_owned() };
                spec(&[h.as_str()], p, &[&i.to_string()])
            }).collect();
            let t = RouteTable::build(specs);
            // Brute force: best host class, then longest prefix.
            let host_rank = |r: &Route| -> Option<usize> {
                match &r.host {
                    HostPattern::Exact(n) if n == host => Some(usize::MAX),
                    HostPattern::Wildcard(s) if r.host.matches(host) => Some(s.len()),
                    _ => None,
                }
            };
            let best_host = t.routes().iter().filter_map(host_rank).max();
            let expected = best_host.and_then(|rank| {
                t.routes().iter().enumerate()
                    .filter(|(_, r)| host_rank(r) == Some(rank) && path_matches(&r.path_prefix, path))
                    .max_by_key(|(_, r)| r.path_prefix.len())
                    .map(|(i, _)| i)
            });
            prop_assert_eq!(t.find(host, path), expected);
        }
    }
}
