//! Discovery: the Docker Engine's view, followed through its event stream.
//!
//! One session = connect, negotiate the API version, subscribe to events
//! from a moment just before the listing, list everything, publish the
//! catalog, then apply events one by one. Any break ends the session; the
//! next one starts after a backoff and replaces the catalog whole, so no
//! stale entry survives a reconnect and no container is missed.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bollard::Docker;
use bollard::models::{
    ContainerInspectResponse, EventMessage, EventMessageTypeEnum, HealthStatusEnum,
};
use bollard::query_parameters::{
    EventsOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptions,
};
use futures::StreamExt;
use tokio::sync::watch;

use crate::catalog::{Catalog, Container, Endpoint, Health, Network, Snapshot};
use crate::docker::{DockerHost, connect};

/// Counters shown on `/metrics`.
#[derive(Debug, Default)]
pub struct DiscoveryMetrics {
    pub reconnects: AtomicU64,
    pub events: AtomicU64,
    pub connected: AtomicU64,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Follow the Docker Engine forever, publishing every change into `tx`.
pub async fn run(host: DockerHost, tx: watch::Sender<Snapshot>, metrics: Arc<DiscoveryMetrics>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = tokio::time::Instant::now();
        match session(&host, &tx, &metrics).await {
            Ok(()) => tracing::warn!("Docker event stream ended; reconnecting"),
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "Docker discovery failed; reconnecting"
            ),
        }
        metrics.connected.store(0, Ordering::Relaxed);
        metrics.reconnects.fetch_add(1, Ordering::Relaxed);
        if started.elapsed() > Duration::from_secs(30) {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn session(
    host: &DockerHost,
    tx: &watch::Sender<Snapshot>,
    metrics: &DiscoveryMetrics,
) -> anyhow::Result<()> {
    let docker = connect(host)?
        .negotiate_version()
        .await
        .context("negotiating the Docker API version")?;
    // The event stream is opened (by a task that starts reading it at once)
    // before the listing, and replays from a second before it, so a change
    // made while we list is applied after it (applying is idempotent: every
    // event re-reads the object). bollard's stream sends its request only
    // when first polled, hence the task.
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        .saturating_sub(1);
    // Unbounded: the Engine's event rate is bounded by what happens on the
    // host, and this loop drains it continuously.
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let reader = docker.clone();
    let pump = AbortOnDrop(tokio::spawn(async move {
        let filters: HashMap<&str, Vec<&str>> =
            HashMap::from([("type", vec!["container", "network"])]);
        let options = EventsOptionsBuilder::new()
            .since(&since.to_string())
            .filters(&filters)
            .build();
        let mut stream = std::pin::pin!(reader.events(Some(options)));
        while let Some(event) = stream.next().await {
            let failed = event.is_err();
            if events_tx.send(event).is_err() || failed {
                return;
            }
        }
    }));
    tokio::task::yield_now().await;

    let listed_at_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i64;
    let mut catalog = list_all(&docker).await?;
    tx.send_replace(Snapshot {
        catalog: Arc::new(catalog.clone()),
        event_time_ns: None,
    });
    metrics.connected.store(1, Ordering::Relaxed);
    tracing::info!(
        containers = catalog.containers.len(),
        networks = catalog.networks.len(),
        "Docker catalog listed"
    );

    // A safety net under the event stream: list everything again now and
    // then, and publish if anything differs.
    let mut relist = tokio::time::interval(RELIST_EVERY);
    relist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    relist.tick().await;
    loop {
        let event = tokio::select! {
            event = events.recv() => match event {
                Some(event) => event.context("reading the Docker event stream")?,
                None => break,
            },
            _ = relist.tick() => {
                let mut fresh = list_all(&docker).await?;
                for (id, c) in &mut fresh.containers {
                    c.stopping = catalog.containers.get(id).is_some_and(|old| old.stopping);
                }
                if fresh != catalog {
                    tracing::warn!("a periodic listing differed from the event-built catalog; replaced");
                    catalog = fresh;
                    tx.send_replace(Snapshot { catalog: Arc::new(catalog.clone()), event_time_ns: None });
                }
                continue;
            }
        };
        metrics.events.fetch_add(1, Ordering::Relaxed);
        if apply(&docker, &mut catalog, &event).await? {
            // Events replayed from before the listing are already in it:
            // they do not count as event -> answer latency.
            tx.send_replace(Snapshot {
                catalog: Arc::new(catalog.clone()),
                event_time_ns: event.time_nano.filter(|t| *t >= listed_at_ns),
            });
        }
    }
    drop(pump);
    Ok(())
}

/// Whether `sent` (a `kill` event's signal, a number in current Engines)
/// ends a container whose stop signal is `stop_signal`: SIGKILL, SIGTERM
/// and its stop signal do.
fn ends_container(sent: &str, stop_signal: Option<&str>) -> bool {
    let Some(sent) = signal_number(sent) else {
        return false;
    };
    let stop = stop_signal.and_then(signal_number).unwrap_or(15);
    sent == 9 || sent == 15 || sent == stop
}

/// A signal as Docker writes it (`15`, `SIGTERM`, `TERM`, `SIGRTMIN+3`) as
/// its Linux number.
fn signal_number(s: &str) -> Option<u32> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    // Docker's own table for Linux: SIGRTMIN is 34, SIGRTMAX 64, and
    // RTMIN+n / RTMAX-n for n up to 30.
    let offset = |rest: &str, sign: char| -> Option<u32> {
        if rest.is_empty() {
            return Some(0);
        }
        rest.strip_prefix(sign)?
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= 30)
    };
    if let Some(rest) = name.strip_prefix("RTMIN") {
        return offset(rest, '+').map(|n| 34 + n);
    }
    if let Some(rest) = name.strip_prefix("RTMAX") {
        return offset(rest, '-').map(|n| 64 - n);
    }
    const NAMES: [&str; 31] = [
        "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
        "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
        "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
    ];
    let i = NAMES.iter().position(|n| *n == name).or(match name {
        "IOT" => Some(5),
        "POLL" => Some(28),
        "CLD" => Some(16),
        _ => None,
    })?;
    u32::try_from(i + 1).ok()
}

/// How often the whole catalog is listed again while events flow.
const RELIST_EVERY: Duration = Duration::from_secs(300);

/// Aborts the task when the session ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Apply one event; true when the catalog changed.
async fn apply(
    docker: &Docker,
    catalog: &mut Catalog,
    event: &EventMessage,
) -> anyhow::Result<bool> {
    let action = event.action.as_deref().unwrap_or("");
    let actor = event.actor.as_ref();
    let id = actor.and_then(|a| a.id.clone()).unwrap_or_default();
    let attr = |k: &str| {
        actor
            .and_then(|a| a.attributes.as_ref())
            .and_then(|m| m.get(k))
            .cloned()
    };
    tracing::debug!(?event.typ, action, id, "docker event");
    let before = catalog.clone();
    match event.typ {
        Some(EventMessageTypeEnum::CONTAINER) => {
            // `health_status: healthy` and `exec_start: sh -c ...` carry a suffix.
            let verb = action.split(':').next().unwrap_or("");
            match verb {
                "die" | "destroy" => {
                    catalog.containers.remove(&id);
                }
                "kill" => {
                    // Only a signal that ends the container means "going
                    // away": SIGKILL, SIGTERM, or the container's own stop
                    // signal (what `docker stop` sends); `docker kill -s
                    // HUP` (a reload) does not.
                    let signal = attr("signal").unwrap_or_default();
                    if let Some(c) = catalog.containers.get_mut(&id)
                        && ends_container(&signal, c.stop_signal.as_deref())
                    {
                        c.stopping = true;
                    }
                }
                "start" | "restart" | "unpause" | "pause" | "health_status" | "rename"
                | "update" => {
                    refresh_container(docker, catalog, &id).await?;
                }
                _ => return Ok(false),
            }
        }
        Some(EventMessageTypeEnum::NETWORK) => match action {
            "create" | "destroy" | "remove" => {
                catalog.networks = list_networks(docker).await?;
                if action != "create" {
                    for c in catalog.containers.values_mut() {
                        c.endpoints.retain(|e| e.network_id != id);
                    }
                }
            }
            "connect" | "disconnect" => {
                // Only for containers already running. `docker run` connects
                // a container before it starts, and inspecting it then waits
                // inside the Engine until the start is done, stalling every
                // other event behind it; its `start` event brings it in.
                match attr("container") {
                    Some(container) if catalog.containers.contains_key(&container) => {
                        refresh_container(docker, catalog, &container).await?;
                    }
                    _ => return Ok(false),
                }
            }
            _ => return Ok(false),
        },
        _ => return Ok(false),
    }
    Ok(*catalog != before)
}

async fn refresh_container(docker: &Docker, catalog: &mut Catalog, id: &str) -> anyhow::Result<()> {
    match docker.inspect_container(id, None).await {
        Ok(resp) => {
            let stopping = catalog.containers.get(id).is_some_and(|c| c.stopping);
            match container_from(resp) {
                Some(mut c) => {
                    // A health or pause event while stopping keeps it draining.
                    c.stopping = stopping;
                    catalog.containers.insert(c.id.clone(), c);
                }
                None => {
                    catalog.containers.remove(id);
                }
            }
            Ok(())
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {
            catalog.containers.remove(id);
            Ok(())
        }
        Err(e) => Err(e).context(format!("inspecting container {id}")),
    }
}

async fn list_all(docker: &Docker) -> anyhow::Result<Catalog> {
    let networks = list_networks(docker).await?;
    let summaries = docker
        .list_containers(Some(ListContainersOptionsBuilder::new().all(false).build()))
        .await
        .context("listing containers")?;
    let mut containers = BTreeMap::new();
    for s in summaries {
        let Some(id) = s.id else { continue };
        match docker.inspect_container(&id, None).await {
            Ok(resp) => {
                if let Some(c) = container_from(resp) {
                    containers.insert(c.id.clone(), c);
                }
            }
            // Removed between the listing and now.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            // The daemon answered with an error for this one container: it
            // must not keep every other one from being known. Skip it; its
            // next event or the next listing brings it in.
            Err(e @ bollard::errors::Error::DockerResponseServerError { .. }) => {
                tracing::warn!(container = %id, error = %e, "cannot inspect a container; skipped")
            }
            // The daemon is gone: a partial listing would drop names.
            Err(e) => return Err(e).context(format!("inspecting container {id}")),
        }
    }
    Ok(Catalog {
        networks,
        containers,
        remote: Default::default(),
    })
}

async fn list_networks(docker: &Docker) -> anyhow::Result<BTreeMap<String, Network>> {
    let list = docker
        .list_networks(None::<ListNetworksOptions>)
        .await
        .context("listing networks")?;
    let mut out = BTreeMap::new();
    for n in list {
        let (Some(id), Some(name)) = (n.id, n.name) else {
            continue;
        };
        let mut subnets = Vec::new();
        let mut gateways = Vec::new();
        for cfg in n.ipam.and_then(|i| i.config).unwrap_or_default() {
            if let Some(net) = cfg
                .subnet
                .as_deref()
                .and_then(|s| s.parse::<ipnet::IpNet>().ok())
            {
                subnets.push(net);
            }
            if let Some(gw) = cfg
                .gateway
                .as_deref()
                .and_then(|g| g.parse::<IpAddr>().ok())
            {
                gateways.push(gw);
            }
        }
        // The default `bridge` network lists no gateway in its IPAM config.
        // Neither do user-defined networks created without --gateway. The
        // bridge device is named in the options, or `br-` + the short id.
        let driver = n.driver.unwrap_or_default();
        if driver == "bridge" {
            let dev = n
                .options
                .as_ref()
                .and_then(|o| o.get("com.docker.network.bridge.name").cloned())
                .unwrap_or_else(|| format!("br-{}", id.chars().take(12).collect::<String>()));
            for a in crate::ifaddrs::addrs(Some(&dev)) {
                if !gateways.contains(&a) && subnets.iter().any(|s| s.contains(&a)) {
                    gateways.push(a);
                }
            }
        }
        out.insert(
            id.clone(),
            Network {
                id,
                name,
                driver,
                subnets,
                gateways,
                internal: n.internal.unwrap_or(false),
            },
        );
    }
    Ok(out)
}

/// A running container from its inspect output; None when it is not
/// running.
pub fn container_from(resp: ContainerInspectResponse) -> Option<Container> {
    let state = resp.state.as_ref()?;
    if state.running != Some(true) {
        return None;
    }
    let id = resp.id.clone()?;
    let health = match state.health.as_ref().and_then(|h| h.status) {
        Some(HealthStatusEnum::STARTING) => Health::Starting,
        Some(HealthStatusEnum::HEALTHY) => Health::Healthy,
        Some(HealthStatusEnum::UNHEALTHY) => Health::Unhealthy,
        _ => Health::None,
    };
    let config = resp.config.unwrap_or_default();
    let labels: BTreeMap<String, String> = config.labels.unwrap_or_default().into_iter().collect();
    let mut exposed_tcp_ports: Vec<u16> = config
        .exposed_ports
        .unwrap_or_default()
        .iter()
        .filter_map(|p| {
            let (port, proto) = p.split_once('/').unwrap_or((p.as_str(), "tcp"));
            (proto == "tcp").then(|| port.parse().ok()).flatten()
        })
        .collect();
    exposed_tcp_ports.sort_unstable();
    exposed_tcp_ports.dedup();
    let short_id: String = id.chars().take(12).collect();
    let mut endpoints: Vec<Endpoint> = resp
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(network_name, ep)| {
            let ipv4 = ep.ip_address.as_deref().and_then(|a| a.parse().ok());
            let ipv6 = ep
                .global_ipv6_address
                .as_deref()
                .and_then(|a| a.parse().ok());
            if ipv4.is_none() && ipv6.is_none() {
                // host or none networking: no address of its own.
                return None;
            }
            let mut aliases: Vec<String> = ep
                .aliases
                .unwrap_or_default()
                .into_iter()
                .filter(|a| *a != short_id && *a != id)
                .collect();
            aliases.sort();
            aliases.dedup();
            Some(Endpoint {
                network_id: ep.network_id.unwrap_or_default(),
                network_name,
                ipv4,
                ipv6,
                aliases,
            })
        })
        .collect();
    endpoints.sort_by(|a, b| a.network_name.cmp(&b.network_name));
    Some(Container {
        name: resp
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        compose_project: labels.get("com.docker.compose.project").cloned(),
        compose_service: labels.get("com.docker.compose.service").cloned(),
        id,
        labels,
        health,
        stopping: false,
        stop_signal: config.stop_signal.filter(|s| !s.is_empty()),
        exposed_tcp_ports,
        endpoints,
        host: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_read_in_every_form_docker_writes() {
        for (s, n) in [
            ("15", Some(15)),
            ("SIGTERM", Some(15)),
            ("term", Some(15)),
            ("SIGKILL", Some(9)),
            ("SIGQUIT", Some(3)),
            ("USR1", Some(10)),
            ("SIGWINCH", Some(28)),
            ("SIGRTMIN", Some(34)),
            ("SIGRTMIN+3", Some(37)),
            ("RTMAX-1", Some(63)),
            ("SIGRTMAX", Some(64)),
            ("37", Some(37)),
            ("0", None),
            ("65", None),
            ("SIGNOPE", None),
            ("RTMIN+x", None),
            ("", None),
        ] {
            assert_eq!(signal_number(s), n, "{s:?}");
        }
    }

    #[test]
    fn draining_follows_the_containers_own_stop_signal() {
        // No STOPSIGNAL: SIGTERM (docker stop) and SIGKILL end it.
        assert!(ends_container("15", None));
        assert!(ends_container("9", None));
        assert!(!ends_container("1", None), "a reload is not a stop");
        assert!(!ends_container("3", None));
        // An image that stops on SIGWINCH (httpd) or SIGRTMIN+3 (systemd).
        assert!(ends_container("28", Some("SIGWINCH")));
        assert!(ends_container("37", Some("SIGRTMIN+3")));
        assert!(ends_container("15", Some("SIGWINCH")));
        assert!(!ends_container("10", Some("SIGWINCH")));
        // A signal Docker did not name: not a stop.
        assert!(!ends_container("", Some("SIGQUIT")));
    }
}
