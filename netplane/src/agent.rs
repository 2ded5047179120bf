//! The running netplane of one host: lease, peer watch and reconcile loop.
//!
//! - On start it finds the underlay, then leases a subnet (retrying while
//!   etcd is unreachable: whatever the kernel holds from an earlier run is
//!   left alone until then).
//! - A keep-alive task refreshes the lease every third of its TTL and takes
//!   the subnet again if the lease expired (after a long etcd outage).
//! - A watch task lists every host record, then follows changes; after any
//!   error it lists again. It never forgets peers because etcd is away: the
//!   last known plan stays in force.
//! - A reconcile task compares the kernel with the plan on start, on every
//!   peer change and every `resync`, and applies the difference.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::EventType;
use ipnet::Ipv4Net;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::access::EtcdAccess;
use crate::error::{Error, Result};
use crate::iptables::{self, Rules};
use crate::model::{HostRecord, Mac, Mode, Transport};
use crate::netlink::Kernel;
use crate::plan::{self, LocalSpec, Refusal, Underlay};
use crate::store::{self, Claim, Lease, Store};

/// Everything the agent needs, already validated.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub etcd: Vec<String>,
    /// TLS and credentials for etcd.
    pub etcd_access: EtcdAccess,
    /// Key prefix, normally [`store::PREFIX`].
    pub prefix: String,
    pub cluster: Ipv4Net,
    pub subnet_len: u8,
    /// Underlay address; None: the address of the default route's interface.
    pub advertise: Option<Ipv4Addr>,
    /// Host identity in etcd; None: the advertise address.
    pub host_id: Option<String>,
    pub hostname: String,
    pub mode: Mode,
    pub vxlan_port: u16,
    pub vni: u32,
    pub vxlan_name: String,
    pub lease_ttl: Duration,
    /// A bridge of portless's own holding the subnet's gateway (no Docker).
    pub bridge: Option<String>,
    pub resync: Duration,
    /// Network namespace to work in (tests); None: the process's own.
    pub netns: Option<PathBuf>,
    /// Manage iptables rules.
    pub iptables: bool,
    /// Masquerade traffic from the subnet to outside the cluster (Docker
    /// does this itself for its networks).
    pub masquerade_outside: bool,
}

/// This host's lease as shown to people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostStatus {
    pub id: String,
    pub hostname: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub underlay: Ipv4Addr,
    pub interface: String,
    pub mode: Mode,
    pub vtep_mac: Mac,
    /// MTU for containers on this host's network.
    pub mtu: u32,
    pub lease_id: i64,
    pub lease_ttl: i64,
}

/// One peer as shown to people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerStatus {
    pub id: String,
    pub hostname: String,
    pub subnet: Ipv4Net,
    pub underlay: Ipv4Addr,
    pub mode: Mode,
    pub transport: Transport,
    /// All of its kernel entries are in place.
    pub in_place: bool,
}

/// The status snapshot, served as JSON at `/api/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Status {
    /// None until the first lease is granted.
    pub host: Option<HostStatus>,
    pub etcd_endpoints: Vec<String>,
    pub etcd_prefix: String,
    pub etcd_connected: bool,
    pub peers: Vec<PeerStatus>,
    pub refused: Vec<Refusal>,
    pub last_reconcile_unix_ms: Option<u64>,
    pub last_error: Option<String>,
    pub reconciles: u64,
    pub ops_applied: u64,
}

impl Status {
    /// The status as Prometheus text-format metrics (`portless_netplane_*`),
    /// for the admin API's `/metrics`.
    pub fn prometheus(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {v}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {v}");
                }
            }
        };
        metric(
            "portless_netplane_lease_held",
            "gauge",
            "1 when this host holds its subnet lease.",
            &[("", u64::from(self.host.is_some()))],
        );
        metric(
            "portless_netplane_etcd_connected",
            "gauge",
            "1 when etcd answered the last keep-alive.",
            &[("", u64::from(self.etcd_connected))],
        );
        let count = |t: Transport, in_place: Option<bool>| {
            self.peers
                .iter()
                .filter(|p| p.transport == t && in_place.is_none_or(|i| p.in_place == i))
                .count() as u64
        };
        metric(
            "portless_netplane_peers",
            "gauge",
            "Peers by transport.",
            &[
                ("transport=\"vxlan\"", count(Transport::Vxlan, None)),
                ("transport=\"route\"", count(Transport::Route, None)),
            ],
        );
        metric(
            "portless_netplane_peers_not_in_place",
            "gauge",
            "Peers whose kernel entries are not all in place.",
            &[
                ("transport=\"vxlan\"", count(Transport::Vxlan, Some(false))),
                ("transport=\"route\"", count(Transport::Route, Some(false))),
            ],
        );
        metric(
            "portless_netplane_peers_refused",
            "gauge",
            "Peers that cannot be reached in the configured mode.",
            &[("", self.refused.len() as u64)],
        );
        metric(
            "portless_netplane_reconciles_total",
            "counter",
            "Comparisons of the kernel with the plan.",
            &[("", self.reconciles)],
        );
        metric(
            "portless_netplane_netlink_ops_total",
            "counter",
            "Netlink changes applied.",
            &[("", self.ops_applied)],
        );
        out
    }
}

struct Shared {
    spec: Option<LocalSpec>,
    lease: Option<Lease>,
    peers: BTreeMap<String, HostRecord>,
    etcd_ok: bool,
    last_error: Option<String>,
    reconciles: u64,
    ops_applied: u64,
    /// Refusals already logged, so that each is said once, at warn.
    refused: Vec<Refusal>,
    /// The peers have been listed from etcd at least once. Until then the
    /// kernel is not touched: an empty peer set would tear down what a
    /// previous run left in place.
    listed: bool,
}

/// A running netplane. Dropping it stops its tasks and leaves the kernel
/// as it is; [`Agent::stop`] can also clean up.
pub struct Agent {
    cfg: AgentConfig,
    kernel: Kernel,
    store: Store,
    shared: Arc<Mutex<Shared>>,
    status: watch::Receiver<Status>,
    wake: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // A panic while holding the lock leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Agent {
    /// Start the netplane. Returns once the executor and the underlay are
    /// known; the lease and the first reconcile follow in the background
    /// (see [`Agent::ready`]).
    pub async fn start(cfg: AgentConfig) -> Result<Agent> {
        let kernel = Kernel::spawn(cfg.netns.as_deref())?;
        let underlay = kernel.underlay(cfg.advertise).await?;
        info!(
            interface = %underlay.ifname,
            addr = %underlay.addr,
            mtu = underlay.mtu,
            "netplane underlay"
        );
        if let Some(net) = underlay
            .connected
            .iter()
            .find(|n| n.contains(&cfg.cluster) || cfg.cluster.contains(*n))
        {
            return Err(Error::Underlay(format!(
                "the cluster range {} overlaps the underlay network {net} of {}; \
                 choose another --cluster-cidr",
                cfg.cluster, underlay.ifname
            )));
        }
        kernel.enable_forwarding().await?;
        let store = Store::connect_with(&cfg.etcd, &cfg.prefix, &cfg.etcd_access).await?;
        let shared = Arc::new(Mutex::new(Shared {
            spec: None,
            lease: None,
            peers: BTreeMap::new(),
            etcd_ok: false,
            last_error: None,
            reconciles: 0,
            ops_applied: 0,
            refused: Vec::new(),
            listed: false,
        }));
        let (status_tx, status) = watch::channel(Status {
            etcd_endpoints: cfg.etcd.clone(),
            etcd_prefix: store.prefix().to_owned(),
            ..Status::default()
        });
        let status_tx = Arc::new(status_tx);
        let wake = Arc::new(Notify::new());
        let record = HostRecord {
            id: cfg
                .host_id
                .clone()
                .unwrap_or_else(|| underlay.addr.to_string()),
            subnet: cfg.cluster,
            underlay: underlay.addr,
            vtep_mac: Mac::for_vtep(underlay.addr),
            mode: cfg.mode,
            vxlan_port: cfg.vxlan_port,
            hostname: cfg.hostname.clone(),
        };
        let claim = Claim {
            cluster: cfg.cluster,
            subnet_len: cfg.subnet_len,
            ttl: cfg.lease_ttl,
            record,
        };

        let main = tokio::spawn(run(
            cfg.clone(),
            kernel.clone(),
            store.clone(),
            underlay,
            claim,
            shared.clone(),
            status_tx,
            wake.clone(),
        ));
        Ok(Agent {
            cfg,
            kernel,
            store,
            shared,
            status,
            wake,
            tasks: vec![main],
        })
    }

    /// The latest status snapshot.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver that sees every new status snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Wait until this host holds a lease and has reconciled once; returns
    /// its status.
    pub async fn ready(&self) -> HostStatus {
        let mut rx = self.status.clone();
        loop {
            {
                let s = rx.borrow_and_update();
                if let (Some(h), Some(_)) = (&s.host, s.last_reconcile_unix_ms) {
                    return h.clone();
                }
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as the agent's task; wait forever
                // rather than spin if it ended.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Reconcile now rather than at the next period: something outside
    /// the agent changed (a Docker network appeared, and with it Docker's
    /// iptables rules).
    pub fn reconcile_now(&self) {
        self.wake.notify_one();
    }

    /// A handle that triggers a reconcile, for tasks that outlive a borrow
    /// of the agent.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// Stop the tasks. With `cleanup`, give the lease back (peers drop this
    /// host at once) and remove every kernel object and rule portless made.
    pub async fn stop(mut self, cleanup: bool) -> Result<()> {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if cleanup {
            let lease = lock(&self.shared).lease.clone();
            if let Some(l) = lease
                && let Err(e) = self.store.release(l.id).await
            {
                warn!(error = %e, "could not give the lease back; it expires on its own");
            }
            cleanup_kernel(&self.kernel, self.cfg.iptables).await?;
        }
        Ok(())
    }
}

/// Remove every link, route and rule portless owns in the executor's
/// namespace; returns the number of netlink ops applied.
pub async fn cleanup_kernel(kernel: &Kernel, with_iptables: bool) -> Result<usize> {
    let obs = kernel.observe().await?;
    let ops = plan::cleanup(&obs);
    let n = ops.len();
    let mut first_err = None;
    for a in kernel.apply(ops).await? {
        if let Err(e) = a.result {
            first_err.get_or_insert(e);
        }
    }
    if with_iptables {
        iptables::cleanup(kernel).await?;
    }
    info!(ops = n, "netplane cleaned up");
    match first_err {
        Some(e) => Err(e),
        None => Ok(n),
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    cfg: AgentConfig,
    kernel: Kernel,
    store: Store,
    underlay: Underlay,
    claim: Claim,
    shared: Arc<Mutex<Shared>>,
    status_tx: Arc<watch::Sender<Status>>,
    wake: Arc<Notify>,
) {
    // 1. A lease, however long etcd takes to answer.
    let mut backoff = Duration::from_millis(200);
    let lease = loop {
        match store.claim(&claim).await {
            Ok(l) => break l,
            Err(e) => {
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot lease a subnet yet");
                lock(&shared).last_error = Some(e.to_string());
                // The reconcile loop, which publishes the status, starts
                // with the lease: say why there is none (a certificate or
                // password etcd refuses) now.
                status_tx.send_modify(|s| s.last_error = Some(e.to_string()));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    {
        let mut s = lock(&shared);
        s.spec = Some(spec_for(&cfg, &underlay, &lease.record));
        s.lease = Some(lease);
        s.etcd_ok = true;
        s.last_error = None;
    }

    let keepalive = tokio::spawn(keep_alive(
        store.clone(),
        claim,
        cfg.clone(),
        underlay,
        shared.clone(),
        wake.clone(),
    ));
    let watcher = tokio::spawn(watch_peers(store, shared.clone(), wake.clone()));
    // Aborting `run` drops these handles without stopping the tasks, so
    // they are tied to a guard that aborts them.
    let _guard = AbortOnDrop(vec![keepalive, watcher]);

    // Kernel changes by anyone wake the loop too, so that drift is
    // repaired at once; the period stays as the safety net.
    let mut changes = match kernel.changes().await {
        Ok(rx) => Some(rx),
        Err(e) => {
            warn!(error = %e, "cannot follow kernel changes; drift is repaired every resync period only");
            None
        }
    };
    loop {
        reconcile(&cfg, &kernel, &shared, &status_tx).await;
        let changed = async {
            match changes.as_mut() {
                Some(rx) => {
                    if rx.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = changed => {
                // A burst (our own apply, a container starting) is one
                // reconcile: wait a moment, then drop what piled up. A peer
                // change does not wait.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = wake.notified() => {}
                }
                if let Some(rx) = changes.as_mut() {
                    while rx.try_recv().is_ok() {}
                }
            }
            _ = tokio::time::sleep(cfg.resync) => {}
        }
    }
}

struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn spec_for(cfg: &AgentConfig, underlay: &Underlay, record: &HostRecord) -> LocalSpec {
    LocalSpec {
        record: record.clone(),
        underlay: underlay.clone(),
        vxlan_name: cfg.vxlan_name.clone(),
        vni: cfg.vni,
        bridge: cfg.bridge.clone(),
    }
}

async fn keep_alive(
    store: Store,
    claim: Claim,
    cfg: AgentConfig,
    underlay: Underlay,
    shared: Arc<Mutex<Shared>>,
    wake: Arc<Notify>,
) {
    let period = (cfg.lease_ttl / 3).max(Duration::from_millis(300));
    loop {
        tokio::time::sleep(period).await;
        let Some(lease_id) = lock(&shared).lease.as_ref().map(|l| l.id) else {
            continue;
        };
        match store.keep_alive(lease_id).await {
            Ok(ttl) if ttl > 0 => {
                let mut s = lock(&shared);
                if !s.etcd_ok {
                    info!(lease = lease_id, "etcd reachable again; lease kept");
                    s.etcd_ok = true;
                    s.last_error = None;
                    drop(s);
                    wake.notify_one();
                }
            }
            Ok(_) => {
                warn!(lease = lease_id, "lease expired; leasing again");
                match store.claim(&claim).await {
                    Ok(l) => {
                        let mut s = lock(&shared);
                        if s.lease.as_ref().map(|o| o.record.subnet) != Some(l.record.subnet) {
                            warn!(subnet = %l.record.subnet, "subnet changed after the lease expired");
                        }
                        s.spec = Some(spec_for(&cfg, &underlay, &l.record));
                        s.lease = Some(l);
                        s.etcd_ok = true;
                        s.last_error = None;
                        drop(s);
                        wake.notify_one();
                    }
                    Err(e) => {
                        warn!(error = %e, "leasing again failed");
                        lock(&shared).last_error = Some(e.to_string());
                    }
                }
            }
            Err(e) => etcd_down(&shared, &wake, &e),
        }
    }
}

/// Put this host's own record back if it vanished from etcd (or changed)
/// while its lease lives: etcd is reconciled like the kernel.
async fn republish_if_gone(store: &Store, shared: &Mutex<Shared>) {
    let lease = {
        let s = lock(shared);
        match &s.lease {
            Some(l) if s.peers.get(&l.record.id) != Some(&l.record) => l.clone(),
            _ => return,
        }
    };
    match store.republish(&lease).await {
        Ok(true) => {
            info!(host = %lease.record.id, subnet = %lease.record.subnet, "own record restored in etcd")
        }
        Ok(false) => warn!(
            host = %lease.record.id,
            subnet = %lease.record.subnet,
            "own subnet is now held by another host; not restoring the record"
        ),
        // An expired lease is taken care of by the keep-alive task.
        Err(e) => debug!(error = %e, "restoring own record failed"),
    }
}

/// Note that etcd is away (whoever saw it first). Nothing is torn down; the
/// reconcile loop is woken only to publish the status.
fn etcd_down(shared: &Mutex<Shared>, wake: &Notify, e: &Error) {
    let mut s = lock(shared);
    let was_ok = s.etcd_ok;
    s.etcd_ok = false;
    s.last_error = Some(e.to_string());
    drop(s);
    if was_ok {
        warn!(error = %e, "etcd unreachable; keeping the last known plan");
        wake.notify_one();
    }
}

/// Whether etcd canceled a watch for its token (expired, or forgotten by a
/// restarted etcd): it then says "permission denied" or "invalid auth
/// token", not "required revision has been compacted".
fn cancel_needs_new_token(reason: &str) -> bool {
    reason.contains("permission denied") || reason.contains("invalid auth token")
}

async fn watch_peers(store: Store, shared: Arc<Mutex<Shared>>, wake: Arc<Notify>) {
    loop {
        let (hosts, rev) = match store.hosts().await {
            Ok(v) => v,
            Err(e) => {
                debug!(error = %e, "listing hosts failed; retrying");
                etcd_down(&shared, &wake, &e);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        {
            let mut s = lock(&shared);
            if s.peers != hosts || !s.listed {
                debug!(hosts = hosts.len(), "host list replaced");
                s.peers = hosts;
                s.listed = true;
                drop(s);
                wake.notify_one();
            }
        }
        republish_if_gone(&store, &shared).await;
        let mut stream = match store.watch_hosts(rev + 1).await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "watch failed; listing again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        debug!(
                            reason = resp.cancel_reason(),
                            "watch canceled; listing again"
                        );
                        // etcd checks a watch's token when it creates the
                        // watch and refuses by canceling it, not by failing
                        // the request, so etcd-client's own refresh (on
                        // failed requests) misses a stale token here. Other
                        // cancels (compaction) need no new token.
                        if cancel_needs_new_token(resp.cancel_reason())
                            && let Err(e) = store.refresh_token().await
                        {
                            debug!(error = %e, "getting a new etcd token failed");
                        }
                        break;
                    }
                    let changed = {
                        let mut changed = false;
                        let mut s = lock(&shared);
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let Some(id) = kv.key_str().ok().and_then(|k| store.host_id_of_key(k))
                            else {
                                continue;
                            };
                            match ev.event_type() {
                                EventType::Put => {
                                    if let Some(r) = store::decode_host(kv.value())
                                        && s.peers.get(id) != Some(&r)
                                    {
                                        info!(host = %id, subnet = %r.subnet, underlay = %r.underlay, "peer up");
                                        s.peers.insert(id.to_owned(), r);
                                        changed = true;
                                    }
                                }
                                EventType::Delete => {
                                    if s.peers.remove(id).is_some() {
                                        info!(host = %id, "peer gone");
                                        changed = true;
                                    }
                                }
                            }
                        }
                        changed
                    };
                    if changed {
                        wake.notify_one();
                    }
                    republish_if_gone(&store, &shared).await;
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(error = %e, "watch broke; listing again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
    }
}

async fn reconcile(
    cfg: &AgentConfig,
    kernel: &Kernel,
    shared: &Mutex<Shared>,
    status_tx: &watch::Sender<Status>,
) {
    let (spec, lease, peers) = {
        let s = lock(shared);
        if !s.listed {
            return;
        }
        let Some(spec) = s.spec.clone() else { return };
        (
            spec,
            s.lease.clone(),
            s.peers.values().cloned().collect::<Vec<_>>(),
        )
    };
    let p = plan::plan(&spec, &peers);
    let mut error: Option<Error> = None;
    let mut applied = 0u64;
    let observed = match kernel.observe().await {
        Ok(obs) => {
            let ops = plan::diff(&p, &obs);
            if !ops.is_empty() {
                debug!(ops = ops.len(), "applying netlink ops");
                match kernel.apply(ops).await {
                    Ok(results) => {
                        for a in results {
                            match a.result {
                                Ok(()) => applied += 1,
                                Err(e) => {
                                    error.get_or_insert(e);
                                }
                            }
                        }
                    }
                    Err(e) => error = Some(e),
                }
            }
            kernel.observe().await.unwrap_or(obs)
        }
        Err(e) => {
            error = Some(e);
            Default::default()
        }
    };
    if cfg.iptables {
        let rules = Rules {
            cluster: cfg.cluster,
            subnet: spec.record.subnet,
            masquerade_outside: cfg.masquerade_outside,
        };
        if let Err(e) = iptables::ensure(kernel, &rules).await {
            error.get_or_insert(e);
        }
    }
    let by_id: BTreeMap<&str, &HostRecord> = peers.iter().map(|r| (r.id.as_str(), r)).collect();
    let peer_status = p
        .peers
        .iter()
        .map(|pp| {
            let rec = by_id.get(pp.id.as_str());
            PeerStatus {
                id: pp.id.clone(),
                hostname: rec.map(|r| r.hostname.clone()).unwrap_or_default(),
                subnet: pp.subnet,
                underlay: pp.underlay,
                mode: rec.map(|r| r.mode).unwrap_or(Mode::Vxlan),
                transport: pp.transport,
                in_place: plan::peer_in_place(pp, &observed),
            }
        })
        .collect();
    let mut s = lock(shared);
    for r in &p.refused {
        if !s.refused.contains(r) {
            warn!(peer = %r.id, subnet = %r.subnet, reason = %r.reason, "peer refused");
        }
    }
    s.refused = p.refused.clone();
    s.reconciles += 1;
    s.ops_applied += applied;
    if let Some(e) = &error {
        warn!(error = %e, "reconcile incomplete; retrying at the next pass");
        s.last_error = Some(e.to_string());
    } else if s.etcd_ok {
        s.last_error = None;
    }
    let host = lease.as_ref().map(|l| HostStatus {
        id: spec.record.id.clone(),
        hostname: spec.record.hostname.clone(),
        subnet: spec.record.subnet,
        gateway: spec.gateway().addr(),
        underlay: spec.underlay.addr,
        interface: spec.underlay.ifname.clone(),
        mode: spec.record.mode,
        vtep_mac: spec.record.vtep_mac,
        mtu: spec.container_mtu(),
        lease_id: l.id,
        lease_ttl: l.ttl,
    });
    let status = Status {
        host,
        etcd_endpoints: cfg.etcd.clone(),
        etcd_prefix: cfg.prefix.clone(),
        etcd_connected: s.etcd_ok,
        peers: peer_status,
        refused: p.refused.clone(),
        last_reconcile_unix_ms: Some(now_ms()),
        last_error: s.last_error.clone(),
        reconciles: s.reconciles,
        ops_applied: s.ops_applied,
    };
    drop(s);
    status_tx.send_replace(status);
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_token_refusal_cancels_for_a_new_token() {
        use super::cancel_needs_new_token;
        assert!(cancel_needs_new_token("etcdserver: permission denied"));
        assert!(cancel_needs_new_token("etcdserver: invalid auth token"));
        assert!(!cancel_needs_new_token(
            "etcdserver: mvcc: required revision has been compacted"
        ));
        assert!(!cancel_needs_new_token(""));
    }

    use super::*;

    #[test]
    fn prometheus_text_counts_peers_by_transport() {
        let peer = |id: &str, t: Transport, in_place: bool| PeerStatus {
            id: id.into(),
            hostname: String::new(),
            subnet: "10.244.2.0/24".parse().unwrap(),
            underlay: Ipv4Addr::new(192, 0, 2, 2),
            mode: Mode::Auto,
            transport: t,
            in_place,
        };
        let s = Status {
            etcd_connected: true,
            peers: vec![
                peer("a", Transport::Vxlan, true),
                peer("b", Transport::Vxlan, false),
                peer("c", Transport::Route, true),
            ],
            reconciles: 7,
            ops_applied: 12,
            ..Status::default()
        };
        let text = s.prometheus();
        for line in [
            "portless_netplane_lease_held 0",
            "portless_netplane_etcd_connected 1",
            "portless_netplane_peers{transport=\"vxlan\"} 2",
            "portless_netplane_peers{transport=\"route\"} 1",
            "portless_netplane_peers_not_in_place{transport=\"vxlan\"} 1",
            "portless_netplane_peers_refused 0",
            "portless_netplane_reconciles_total 7",
            "portless_netplane_netlink_ops_total 12",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
    }
}
