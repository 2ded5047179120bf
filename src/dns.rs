//! Wiring of portless-dns: the catalog becomes a zone, gateway addresses
//! become listeners, the hosts file is followed.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use arc_swap::ArcSwap;
use ipnet::IpNet;
use portless_dns::{
    Forwarder, Handler, Health as DnsHealth, Listeners, Member, Metrics, NetworkInput, Zone,
    ZoneHandle, ZoneInput,
};
use tokio::sync::watch;

use crate::catalog::{Catalog, Liveness, Snapshot};
use crate::config::dns::{DnsConfig, IngressZone};
use crate::metrics::Recorder;

type StaticHosts = Arc<BTreeMap<String, Vec<IpAddr>>>;

/// TXT records to serve, by exact name (no trailing dot): the ACME
/// DNS-01 challenges of wildcard hosts. Only names inside an ingress zone
/// are served (the zones the operator delegated to portless); others are
/// dropped with a warning.
pub type TxtRecords = Arc<BTreeMap<String, Vec<String>>>;

/// What the admin API reads from the running DNS service.
pub struct DnsState {
    pub zone: ZoneHandle,
    pub metrics: Arc<Metrics>,
    pub listeners: watch::Receiver<Vec<SocketAddr>>,
    pub upstreams: Vec<SocketAddr>,
    /// Upstream health, for `/metrics`.
    pub forwarder: Arc<Forwarder>,
    pub domain: String,
    /// Docker event emitted → zone with the change swapped in.
    pub event_to_answer: Arc<Recorder>,
    /// Publish TXT records here (replacing the previous set): the zone is
    /// rebuilt with them at once.
    pub txt: watch::Sender<TxtRecords>,
}

/// Nameservers of a resolv.conf, port 53.
pub fn resolv_conf_upstreams(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("nameserver")).then(|| f.next()).flatten()
        })
        // A scoped link-local (fe80::1%eth0) cannot be parsed into a SocketAddr
        // without its interface index; skip it rather than guess.
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Start the DNS service: bind the fixed listeners now (an error here stops
/// start-up), then follow catalog and hosts-file changes in the background.
pub async fn start(
    cfg: &DnsConfig,
    snapshots: watch::Receiver<Snapshot>,
) -> anyhow::Result<DnsState> {
    let metrics = Arc::new(Metrics::default());
    let mut upstreams = cfg.upstreams.clone();
    if upstreams.is_empty() {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        upstreams = resolv_conf_upstreams(&text);
        // Never forward to ourselves.
        upstreams.retain(|u| !cfg.listen.contains(u));
        if upstreams.is_empty() {
            tracing::warn!(
                "no upstream resolver in /etc/resolv.conf: names portless does not serve will get SERVFAIL"
            );
        }
    }
    let forwarder = Arc::new(Forwarder::new(
        upstreams.clone(),
        cfg.forward_timeout,
        cfg.forward_max_inflight,
        metrics.clone(),
    ));
    let hosts = match &cfg.hosts_file {
        Some(path) => {
            let initial = read_hosts(path)
                .with_context(|| format!("reading --hosts-file {}", path.display()))?;
            let (tx, rx) = watch::channel(Arc::new(initial));
            tokio::spawn(follow_hosts_file(path.clone(), tx));
            rx
        }
        None => watch::channel(StaticHosts::default()).1,
    };

    let zone: ZoneHandle = Arc::new(ArcSwap::from_pointee(Zone::default()));
    let mut handler = Handler::new(zone.clone(), forwarder.clone(), metrics.clone());
    if let Some(limit) = cfg.rate_limit {
        handler = handler.with_rate_limit(limit);
    }
    let mut listeners = Listeners::new(handler, cfg.tcp_max_connections);
    let mut fixed = Vec::new();
    for addr in &cfg.listen {
        let bound = listeners
            .add(*addr)
            .await
            .with_context(|| format!("binding DNS listener {addr}"))?;
        fixed.push(bound);
    }
    let (listeners_tx, listeners_rx) = watch::channel(listeners.addrs());

    let event_to_answer = Arc::new(Recorder::default());
    let (txt_tx, txt) = watch::channel(TxtRecords::default());
    let state = DnsState {
        zone: zone.clone(),
        metrics,
        listeners: listeners_rx,
        upstreams,
        forwarder,
        domain: cfg.domain.clone(),
        event_to_answer: event_to_answer.clone(),
        txt: txt_tx,
    };
    let cfg = cfg.clone();
    // Build the first zone before returning, so that a fixed listener never
    // answers from an empty zone after start-up.
    let mut builder = ZoneBuilder {
        cfg: Arc::new(cfg),
        worker: BuildThread::start()?,
        zone,
        listeners,
        listeners_tx,
        fixed,
        serial: 0,
        last_input: None,
        last_event: None,
        event_to_answer,
    };
    let mut inputs = Inputs {
        snapshots,
        hosts,
        txt,
    };
    builder.rebuild(&inputs.current()).await;
    tokio::spawn(builder.run(inputs));
    Ok(state)
}

/// What the zone is built from, besides the configuration.
struct Inputs {
    snapshots: watch::Receiver<Snapshot>,
    hosts: watch::Receiver<StaticHosts>,
    txt: watch::Receiver<TxtRecords>,
}

/// One look at [`Inputs`].
struct Current {
    snapshot: Snapshot,
    static_hosts: StaticHosts,
    txt: TxtRecords,
}

impl Inputs {
    fn current(&mut self) -> Current {
        Current {
            snapshot: self.snapshots.borrow_and_update().clone(),
            static_hosts: self.hosts.borrow_and_update().clone(),
            txt: self.txt.borrow_and_update().clone(),
        }
    }
}

struct ZoneBuilder {
    cfg: Arc<DnsConfig>,
    worker: BuildThread,
    zone: ZoneHandle,
    listeners: Listeners,
    listeners_tx: watch::Sender<Vec<SocketAddr>>,
    fixed: Vec<SocketAddr>,
    serial: u32,
    /// A hash of what the live zone was built from (serial aside): a
    /// rebuild from the same input (a periodic look, a hosts file
    /// rewritten as it was) swaps nothing and keeps the serial. A hash,
    /// not a copy: the input of a large cluster is megabytes.
    last_input: Option<u64>,
    /// The Docker event last counted in `event_to_answer`.
    last_event: Option<i64>,
    event_to_answer: Arc<Recorder>,
}

impl ZoneBuilder {
    async fn run(mut self, mut inputs: Inputs) {
        // Host addresses change without any Docker event (DHCP, a new
        // interface): look again now and then.
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Without --hosts-file nobody ever sends on `hosts`; a closed channel
        // then just means "no change", not "stop".
        let mut hosts_open = true;
        // The sender lives in `DnsState`: gone when nobody publishes.
        let mut txt_open = true;
        loop {
            tokio::select! {
                r = inputs.snapshots.changed() => if r.is_err() { return },
                r = inputs.hosts.changed(), if hosts_open => hosts_open = r.is_ok(),
                r = inputs.txt.changed(), if txt_open => txt_open = r.is_ok(),
                _ = tick.tick() => {}
            }
            self.rebuild(&inputs.current()).await;
        }
    }

    async fn rebuild(&mut self, current: &Current) {
        let snapshot = &current.snapshot;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let (cfg, catalog, statics, txt) = (
            self.cfg.clone(),
            snapshot.catalog.clone(),
            current.static_hosts.clone(),
            current.txt.clone(),
        );
        let (last, serial) = (self.last_input, self.serial.wrapping_add(1));
        self.worker.run(Box::new(move || {
            let mut input = zone_input(&cfg, &catalog, &statics, host_addrs(), 0);
            input.txt = ingress_txt(&cfg.ingress_zones, &txt);
            let hash = {
                use std::hash::{BuildHasher, BuildHasherDefault};
                BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                    .hash_one(&input)
            };
            let built = (last != Some(hash)).then(|| {
                input.serial = serial;
                Arc::new(Zone::build(&input))
            });
            let _ = done_tx.send((hash, built));
        }));
        match done_rx.await {
            Ok((hash, Some(zone))) => {
                self.serial = serial;
                self.last_input = Some(hash);
                let old = self.zone.swap(zone);
                // Freed where it was made, unless a query still holds it.
                self.worker.run(Box::new(move || drop(old)));
            }
            Ok((_, None)) => {}
            Err(_) => tracing::error!("the zone build failed; answering from the previous zone"),
        }
        // Each event once: later rebuilds see the same snapshot again.
        if let Some(ns) = snapshot.event_time_ns
            && self.last_event != Some(ns)
        {
            self.last_event = Some(ns);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as i64;
            self.event_to_answer
                .observe(Duration::from_nanos(now.saturating_sub(ns).max(0) as u64));
        }
        self.reconcile_listeners(&snapshot.catalog).await;
    }

    async fn reconcile_listeners(&mut self, catalog: &Catalog) {
        let mut wanted = self.fixed.clone();
        if self.cfg.port != 0 {
            for net in catalog.networks.values().filter(|n| n.is_bridge()) {
                for gw in &net.gateways {
                    let a = SocketAddr::new(*gw, self.cfg.port);
                    if !wanted.contains(&a) {
                        wanted.push(a);
                    }
                }
            }
        }
        // A fixed wildcard listener on the same port already covers gateways
        // (`[::]` covers IPv4 too: Linux sockets are dual-stack by default).
        let wildcards: Vec<SocketAddr> = self
            .fixed
            .iter()
            .filter(|a| a.ip().is_unspecified())
            .copied()
            .collect();
        let covered = |a: &SocketAddr| {
            wildcards
                .iter()
                .any(|w| w.port() == a.port() && (w.is_ipv6() || a.is_ipv4()))
        };
        wanted.retain(|a| self.fixed.contains(a) || !covered(a));
        for (addr, e) in self.listeners.reconcile(&wanted).await {
            tracing::warn!(%addr, error = %e, "cannot listen for DNS on a gateway address (will retry on the next change)");
        }
        self.listeners_tx.send_replace(self.listeners.addrs());
    }
}

/// Zone builds run on a thread of their own. A build of a large cluster
/// (100,000 records) takes most of a second of CPU: on a runtime worker it
/// would stall the tasks sharing that worker, and building and freeing
/// zones on one thread lets the allocator reuse the same pages instead of
/// keeping freed ones on whichever worker ran the last build.
struct BuildThread {
    jobs: std::sync::mpsc::Sender<Job>,
}

type Job = Box<dyn FnOnce() + Send>;

impl BuildThread {
    fn start() -> anyhow::Result<BuildThread> {
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("zone-build".into())
            .spawn(move || {
                for job in rx {
                    // A panicking build loses that build (its caller keeps
                    // the previous zone), not the thread.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .context("starting the zone build thread")?;
        Ok(BuildThread { jobs })
    }

    /// Run `job` on the build thread (here, should that thread be gone).
    fn run(&self, job: Job) {
        if let Err(std::sync::mpsc::SendError(job)) = self.jobs.send(job) {
            job();
        }
    }
}

fn zone_input(
    cfg: &DnsConfig,
    catalog: &Catalog,
    static_hosts: &StaticHosts,
    host_addrs: Vec<IpAddr>,
    serial: u32,
) -> ZoneInput {
    let mut networks: BTreeMap<&str, NetworkInput> = BTreeMap::new();
    // Every network, members or not: a container's first query can come
    // before discovery has seen it start, and its address's subnet then
    // says which network it is on. Only on bridges: nothing but the
    // network's containers and the host lives in their subnets, while a
    // macvlan or ipvlan subnet is the LAN.
    for (id, n) in &catalog.networks {
        networks.insert(
            id.as_str(),
            NetworkInput {
                name: n.name.clone(),
                members: Vec::new(),
                client_subnets: if n.is_bridge() {
                    n.subnets.clone()
                } else {
                    Vec::new()
                },
                internal: n.internal,
            },
        );
    }
    for c in catalog.all_containers() {
        for ep in &c.endpoints {
            let net = networks
                .entry(ep.network_id.as_str())
                .or_insert_with(|| NetworkInput {
                    name: ep.network_name.clone(),
                    ..NetworkInput::default()
                });
            net.members.push(Member {
                id: c.id.clone(),
                name: c.name.clone(),
                addrs: ep.addrs().collect(),
                aliases: ep.aliases.clone(),
                service: c.compose_service.clone(),
                project: c.compose_project.clone(),
                health: match c.liveness() {
                    Liveness::Ready => DnsHealth::Healthy,
                    Liveness::Starting => DnsHealth::Unknown,
                    Liveness::Unhealthy => DnsHealth::Unhealthy,
                    Liveness::Draining => DnsHealth::Draining,
                },
            });
        }
    }
    let mut host_clients: Vec<IpNet> = cfg.allow.clone();
    // Bridge gateways are this host's own addresses. Other drivers'
    // gateways (macvlan, ipvlan) are routers on the LAN: not host-side.
    let bridges = || catalog.networks.values().filter(|n| n.is_bridge());
    let gateways = bridges().flat_map(|n| n.gateways.iter().copied());
    host_clients.extend(gateways.chain(host_addrs).map(IpNet::from));
    ZoneInput {
        domain: cfg.domain.clone(),
        ttl: cfg.ttl,
        networks: networks.into_values().collect(),
        static_hosts: (**static_hosts).clone(),
        ingress: cfg
            .ingress_zones
            .iter()
            .map(|z| (z.zone.clone(), z.addrs.clone()))
            .collect(),
        host_clients,
        private_ranges: bridges().flat_map(|n| n.subnets.iter().copied()).collect(),
        serial,
        txt: BTreeMap::new(),
    }
}

/// The TXT records of `txt` whose names lie inside an ingress zone (or
/// are one); others are dropped with a warning: portless is authoritative
/// only there.
fn ingress_txt(zones: &[IngressZone], txt: &TxtRecords) -> BTreeMap<String, Vec<String>> {
    let inside = |name: &str| {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        zones.iter().any(|z| {
            let zone = z.zone.trim_start_matches("*.").trim_end_matches('.');
            let zone = zone.to_ascii_lowercase();
            name == zone
                || name
                    .strip_suffix(zone.as_str())
                    .is_some_and(|r| r.ends_with('.'))
        })
    };
    let mut out = BTreeMap::new();
    for (name, values) in txt.iter() {
        if inside(name) {
            out.insert(name.clone(), values.clone());
        } else {
            tracing::warn!(%name, "TXT record outside every --ingress-zone not served");
        }
    }
    out
}

/// The host's own interface addresses: clients from them are host-side.
fn host_addrs() -> Vec<IpAddr> {
    crate::ifaddrs::addrs(None)
}

fn read_hosts(path: &Path) -> anyhow::Result<BTreeMap<String, Vec<IpAddr>>> {
    let text = std::fs::read_to_string(path)?;
    let (names, errors) = portless_dns::hosts::parse(&text);
    for e in errors {
        tracing::warn!(file = %path.display(), error = %e, "hosts file line ignored");
    }
    Ok(names)
}

type FileStamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Poll the hosts file; on a change, parse it and publish. A file that
/// vanishes or cannot be read keeps the last good contents.
async fn follow_hosts_file(path: PathBuf, tx: watch::Sender<StaticHosts>) {
    let mut last = stamp(&path);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match read_hosts(&path) {
            Ok(names) => {
                tracing::info!(file = %path.display(), names = names.len(), "hosts file reloaded");
                if tx.send(Arc::new(names)).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "hosts file unreadable; keeping the last good contents")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_are_read() {
        let ups = resolv_conf_upstreams(
            "# x\nnameserver 127.0.0.53\nsearch lan\nnameserver ::1\nnameserver fe80::1%eth0\noptions edns0\n",
        );
        assert_eq!(
            ups,
            vec![
                "127.0.0.53:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn only_txt_records_inside_an_ingress_zone_are_served() {
        let zones = [
            IngressZone {
                zone: "*.apps.example.com".into(),
                addrs: vec![],
            },
            IngressZone {
                zone: "lab.test.".into(),
                addrs: vec![],
            },
        ];
        let txt: TxtRecords = Arc::new(
            [
                "_acme-challenge.apps.example.com",
                "_acme-challenge.shop.APPS.example.com.",
                "_acme-challenge.lab.test",
                "_acme-challenge.example.com",
                "_acme-challenge.badapps.example.com",
                "lab.test.evil.com",
            ]
            .into_iter()
            .map(|n| (n.to_string(), vec!["v".to_string()]))
            .collect(),
        );
        let kept: Vec<String> = ingress_txt(&zones, &txt).into_keys().collect();
        assert_eq!(
            kept,
            vec![
                "_acme-challenge.apps.example.com",
                "_acme-challenge.lab.test",
                "_acme-challenge.shop.APPS.example.com.",
            ]
        );
    }
}
