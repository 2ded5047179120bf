//! `portless status`: ask a running sidecar's admin API and print tables.

use std::fmt::Write;
use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::api::{Cluster, Routes, Status};

pub async fn get(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| {
            format!(
                "cannot reach the admin API at {admin} (is `portless run` running? see --admin)"
            )
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, admin.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    anyhow::ensure!(
        status.is_success(),
        "admin API answered {status} for {path}: {body}"
    );
    Ok(body)
}

/// Like [`get`], but None when the part is off (404).
pub async fn get_optional(admin: SocketAddr, path: &str) -> anyhow::Result<Option<String>> {
    match get(admin, path).await {
        Ok(body) => Ok(Some(body)),
        Err(e) if e.to_string().contains("answered 404") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Render rows as an aligned table with a header.
pub fn table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let _ = write!(s, "{c:<w$}  ", w = widths[i]);
            }
        }
        s.trim_end().to_owned()
    };
    let _ = writeln!(out, "{}", line(head.to_vec()));
    for r in rows {
        let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
    }
}

pub fn render(status: &Status) -> String {
    let catalog = &status.catalog;
    let mut out = String::new();
    let d = &status.docker;
    let _ = writeln!(
        out,
        "Docker: {}",
        if !d.enabled {
            "off (--docker-host none)".to_owned()
        } else if d.connected {
            format!("connected ({} reconnects)", d.reconnects)
        } else {
            format!("DISCONNECTED, retrying ({} reconnects)", d.reconnects)
        }
    );
    let _ = writeln!(
        out,
        "DNS: domain {}, {} names, upstreams {}",
        status.dns.domain,
        status.dns.names,
        join(&status.dns.upstreams)
    );
    let _ = writeln!(out, "\nLISTENERS");
    let rows: Vec<Vec<String>> = status
        .dns
        .listeners
        .iter()
        .map(|l| vec!["dns".into(), format!("{l} udp+tcp")])
        .collect();
    table(&mut out, &["KIND", "ADDRESS"], &rows);
    let _ = writeln!(out, "\nNETWORKS");
    let rows: Vec<Vec<String>> = catalog
        .networks
        .values()
        .map(|n| {
            vec![
                n.name.clone(),
                n.driver.clone(),
                join(&n.subnets),
                join(&n.gateways),
            ]
        })
        .collect();
    table(&mut out, &["NAME", "DRIVER", "SUBNETS", "GATEWAYS"], &rows);
    let _ = writeln!(out, "\nCONTAINERS");
    let mut rows = Vec::new();
    for c in catalog.all_containers() {
        for ep in &c.endpoints {
            let compose = match (&c.compose_service, &c.compose_project) {
                (Some(s), Some(p)) => format!("{s}.{p}"),
                _ => "-".into(),
            };
            let health = if c.stopping {
                "stopping".to_owned()
            } else {
                format!("{:?}", c.health).to_lowercase()
            };
            rows.push(vec![
                c.name.clone(),
                ep.network_name.clone(),
                join(&ep.addrs().collect::<Vec<_>>()),
                if ep.aliases.is_empty() {
                    "-".into()
                } else {
                    ep.aliases.join(",")
                },
                compose,
                health,
                c.host.clone().unwrap_or_else(|| "local".into()),
            ]);
        }
    }
    table(
        &mut out,
        &[
            "NAME",
            "NETWORK",
            "ADDRESSES",
            "ALIASES",
            "SERVICE",
            "HEALTH",
            "HOST",
        ],
        &rows,
    );
    out
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "-".into();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

fn or_dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// The ROUTES and NOT ROUTED tables from `/api/routes`.
pub fn render_routes(v: &Routes) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nROUTER: http {} https {}",
        v.http_listen,
        or_dash(v.https_listen)
    );
    let _ = writeln!(out, "\nROUTES");
    let mut rows = Vec::new();
    for r in &v.routes {
        if r.backends.is_empty() {
            rows.push(vec![
                r.host.clone(),
                r.path.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for b in &r.backends {
            rows.push(vec![
                r.host.clone(),
                r.path.clone(),
                b.container.clone(),
                b.addr.to_string(),
                b.scheme.clone(),
                b.state.clone(),
            ]);
        }
    }
    table(
        &mut out,
        &["HOST", "PATH", "CONTAINER", "ADDRESS", "SCHEME", "STATE"],
        &rows,
    );
    let choices: Vec<Vec<String>> = v
        .addresses
        .iter()
        .map(|c| {
            vec![
                c.container.clone(),
                c.group.clone(),
                c.network.clone(),
                c.addr.to_string(),
                c.chosen_by.as_str().to_owned(),
            ]
        })
        .collect();
    if !choices.is_empty() {
        let _ = writeln!(out, "\nADDRESS CHOICES");
        table(
            &mut out,
            &["CONTAINER", "GROUP", "NETWORK", "ADDRESS", "CHOSEN BY"],
            &choices,
        );
    }
    let problems: Vec<Vec<String>> = v
        .not_routed
        .iter()
        .map(|p| vec![p.container.clone(), p.reason.clone()])
        .collect();
    if !problems.is_empty() {
        let _ = writeln!(out, "\nNOT ROUTED");
        table(&mut out, &["CONTAINER", "REASON"], &problems);
    }
    render_acme(&mut out, v, unix_now());
    out
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A time as seen from `now`: `in 89d 23h`, `in 5m`, `3h ago`.
fn relative(t: u64, now: u64) -> String {
    let (d, suffix) = if t >= now {
        (t - now, false)
    } else {
        (now - t, true)
    };
    let text = if d >= 86_400 {
        format!("{}d {}h", d / 86_400, d % 86_400 / 3600)
    } else if d >= 3600 {
        format!("{}h {}m", d / 3600, d % 3600 / 60)
    } else if d >= 60 {
        format!("{}m {}s", d / 60, d % 60)
    } else {
        format!("{d}s")
    };
    if suffix {
        format!("{text} ago")
    } else {
        format!("in {text}")
    }
}

/// The AUTOMATIC HTTPS section: each host's certificate state.
fn render_acme(out: &mut String, v: &Routes, now: u64) {
    let Some(certs) = &v.acme else {
        return;
    };
    let _ = writeln!(out, "\nAUTOMATIC HTTPS (ACME)");
    let when = |x: Option<u64>| x.map_or("-".to_owned(), |t| relative(t, now));
    let rows: Vec<Vec<String>> = certs
        .iter()
        .map(|c| {
            vec![
                c.host.clone(),
                c.state.clone(),
                when(c.not_after),
                when(c.next_attempt),
                c.orders.to_string(),
                c.failures.to_string(),
                c.last_error.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    table(
        out,
        &[
            "HOST",
            "STATE",
            "EXPIRES",
            "NEXT ORDER",
            "ORDERS",
            "FAILURES",
            "LAST ERROR",
        ],
        &rows,
    );
}

/// The CLUSTER section from `/api/cluster`.
pub fn render_cluster(v: &Cluster) -> String {
    let mut out = String::new();
    let n = &v.netplane;
    let host = n.host.as_ref();
    let _ = writeln!(
        out,
        "\nCLUSTER: etcd {} ({}), this host {} subnet {} underlay {} mode {}",
        n.etcd_endpoints.join(","),
        if n.etcd_connected {
            "connected"
        } else {
            "DISCONNECTED"
        },
        or_dash(host.map(|h| &h.id)),
        or_dash(host.map(|h| h.subnet)),
        or_dash(host.map(|h| h.underlay)),
        or_dash(host.map(|h| h.mode)),
    );
    if n.last_known {
        let _ = writeln!(
            out,
            "  (this host and its peers as the previous run knew them: etcd has not answered since this start; the kernel keeps their entries)"
        );
    }
    if let Some(dn) = &v.docker_network {
        let state = match (dn.ready, &dn.error) {
            (true, _) => format!("ready (id {})", short(dn.id.as_deref().unwrap_or("-"))),
            (false, Some(e)) => format!("NOT READY: {e}"),
            (false, None) => "not ready yet (waiting for the lease)".into(),
        };
        let _ = writeln!(out, "Docker network {}: {state}", dn.name);
    } else if let Some(b) = &v.bridge {
        let _ = writeln!(out, "bridge {b} (no Docker)");
    }
    let r = &n.records;
    let _ = writeln!(
        out,
        "Records: {} published ({} pending, {} writes), {} merged from other hosts, {} refused",
        r.published, r.pending, r.writes, r.merged, r.refused,
    );
    let rows: Vec<Vec<String>> = n
        .peers
        .iter()
        .map(|p| {
            vec![
                p.id.clone(),
                p.subnet.to_string(),
                p.underlay.to_string(),
                p.transport.to_string(),
                if p.in_place { "yes" } else { "NO" }.into(),
            ]
        })
        .collect();
    let _ = writeln!(out, "\nPEERS");
    table(
        &mut out,
        &["HOST", "SUBNET", "UNDERLAY", "TRANSPORT", "IN KERNEL"],
        &rows,
    );
    let refused: Vec<Vec<String>> = n
        .refused
        .iter()
        .map(|r| vec![r.id.clone(), r.subnet.to_string(), r.reason.clone()])
        .collect();
    if !refused.is_empty() {
        let _ = writeln!(out, "\nREFUSED PEERS");
        table(&mut out, &["HOST", "SUBNET", "REASON"], &refused);
    }
    if let Some(err) = &n.last_error {
        let _ = writeln!(out, "\nlast netplane error: {err}");
    }
    out
}

/// What is wrong with the running sidecar, one line each; empty when every
/// part is healthy. `portless status` prints these and exits 2 when there
/// are any, so that scripts and health checks can use it.
pub fn problems(status: &Status, cluster: Option<&Cluster>) -> Vec<String> {
    let mut out = Vec::new();
    if status.docker.enabled && !status.docker.connected {
        out.push("Docker Engine not connected (names and routes are the last known)".into());
    }
    if let Some(v) = cluster {
        let n = &v.netplane;
        if !n.etcd_connected {
            out.push(
                "etcd not connected (names and routes of other hosts are the last known)".into(),
            );
        }
        if n.host.is_none() {
            out.push("no subnet leased yet".into());
        }
        if let Some(dn) = v.docker_network.as_ref().filter(|d| !d.ready) {
            match &dn.error {
                Some(e) => out.push(format!("cluster Docker network {} not ready: {e}", dn.name)),
                None => out.push(format!("cluster Docker network {} not ready yet", dn.name)),
            }
        }
        if let Some(e) = &n.last_error {
            out.push(format!("netplane: {e}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests read the JSON as the server writes it, through the typed
    /// structs `portless status` decodes.
    #[test]
    fn cluster_section_lists_peers_and_refusals() {
        let v: Cluster = serde_json::from_value(serde_json::json!({
            "host": {"id": "10.0.0.1", "hostname": "a", "subnet": "10.244.0.0/24",
                     "gateway": "10.244.0.1", "underlay": "10.0.0.1", "interface": "eth0",
                     "mode": "auto", "vtep_mac": "02:00:00:00:00:01", "mtu": 1450,
                     "lease_id": 1, "lease_ttl": 10},
            "etcd_endpoints": ["http://10.0.0.10:2379"],
            "etcd_prefix": "/portless",
            "etcd_connected": true,
            "peers": [{"id": "10.0.0.2", "hostname": "b", "subnet": "10.244.1.0/24", "underlay": "10.0.0.2",
                       "mode": "auto", "transport": "route", "in_place": true}],
            "refused": [{"id": "10.9.0.3", "subnet": "10.244.2.0/24", "reason": "not on a directly connected segment"}],
            "last_reconcile_unix_ms": null,
            "last_error": null,
            "reconciles": 1,
            "ops_applied": 2,
            "docker_network": {"name": "portless", "id": null, "ready": false, "error": "Docker network portless exists and was not created by portless"},
            "bridge": null,
            "records": {"published": 3, "pending": 0, "writes": 4, "merged": 7, "refused": 1,
                        "refused_total": {}, "watch_lag": {"buckets": [], "count": 0, "sum_us": 0}},
        }))
        .unwrap();
        let out = render_cluster(&v);
        assert!(
            out.contains("Docker network portless: NOT READY: Docker network portless exists"),
            "{out}"
        );
        assert!(
            out.contains("3 published") && out.contains("7 merged") && out.contains("1 refused"),
            "{out}"
        );
        assert!(
            out.contains("10.244.1.0/24") && out.contains("route") && out.contains("yes"),
            "{out}"
        );
        assert!(
            out.contains("REFUSED PEERS") && out.contains("not on a directly connected segment"),
            "{out}"
        );
        assert!(!out.contains("last netplane error"), "{out}");
        assert!(
            out.contains("etcd http://10.0.0.10:2379 (connected), this host 10.0.0.1 subnet 10.244.0.0/24 underlay 10.0.0.1 mode auto"),
            "{out}"
        );
        let st: Status = serde_json::from_value(serde_json::json!({
            "docker": {"enabled": true, "connected": true, "reconnects": 0},
            "dns": {"domain": "docker", "listeners": [], "upstreams": [], "names": 0},
            "catalog": {"networks": {}, "containers": {}},
        }))
        .unwrap();
        assert_eq!(
            problems(&st, Some(&v)),
            vec![
                "cluster Docker network portless not ready: Docker network portless exists and was not created by portless"
            ]
        );
    }

    #[test]
    fn routes_section_lists_backends_and_refused_containers() {
        let v: Routes = serde_json::from_value(serde_json::json!({
            "http_listen": "[::]:80",
            "https_listen": null,
            "routes": [{"route": "shop.example.com/", "host": "shop.example.com", "path": "/", "requests": 0, "backends": [
                {"id": "abc", "container": "shop-1", "addr": "172.18.0.2:8080", "scheme": "http", "state": "healthy",
                 "in_flight": 0, "requests": 0, "connect_failures": 0}]}],
            "not_routed": [{"container_id": "def", "container": "broken", "reason": "unknown label portless.http.hots"}],
            "addresses": [{"container": "shop-1", "group": "", "network": "front", "addr": "172.18.0.2:8080", "chosen_by": "rule"}],
            "certificates": [],
        }))
        .unwrap();
        let out = render_routes(&v);
        assert!(
            out.contains("shop.example.com")
                && out.contains("172.18.0.2:8080")
                && out.contains("healthy"),
            "{out}"
        );
        assert!(
            out.contains("NOT ROUTED") && out.contains("portless.http.hots"),
            "{out}"
        );
        assert!(
            out.contains("ADDRESS CHOICES") && out.contains("front") && out.contains("rule"),
            "{out}"
        );
        assert!(out.contains("ROUTER: http [::]:80 https -"), "{out}");
    }

    #[test]
    fn acme_section_shows_each_hosts_certificate_state() {
        let now = 1_000_000;
        let v: Routes = serde_json::from_value(serde_json::json!({
            "http_listen": "[::]:80",
            "https_listen": "[::]:443",
            "routes": [],
            "not_routed": [],
            "addresses": [],
            "certificates": [],
            "acme": [
                {"host": "shop.test", "state": "valid", "not_after": now + 89 * 86_400 + 7200,
                 "next_attempt": now + 59 * 86_400, "last_error": null, "failures": 0, "orders": 1},
                {"host": "new.test", "state": "failed", "not_after": null,
                 "next_attempt": now + 120, "last_error": "order failed: connection refused",
                 "failures": 2, "orders": 2},
            ]
        }))
        .unwrap();
        let mut out = String::new();
        render_acme(&mut out, &v, now);
        assert!(out.contains("AUTOMATIC HTTPS (ACME)"), "{out}");
        let shop = out.lines().find(|l| l.starts_with("shop.test")).unwrap();
        assert!(
            shop.contains("valid") && shop.contains("in 89d 2h") && shop.contains("in 59d 0h"),
            "{out}"
        );
        let new = out.lines().find(|l| l.starts_with("new.test")).unwrap();
        assert!(new.contains("failed") && new.contains("in 2m 0s"), "{out}");
        assert!(new.ends_with("order failed: connection refused"), "{out}");
        // Without ACME, no section.
        let mut out = String::new();
        let off = Routes { acme: None, ..v };
        render_acme(&mut out, &off, now);
        assert!(out.is_empty());
        assert_eq!(relative(now - 90, now), "1m 30s ago");
    }
}
