//! The running netplane of one host: a thin loop around the
//! [`Membership`] state machine.
//!
//! - On start it finds the underlay; then the machine leases a subnet
//!   (adopting this host's lease if it still lives; retrying while etcd is
//!   unreachable: whatever the kernel holds from an earlier run is left
//!   alone until then), keeps the lease alive, lists every host and
//!   container record and follows them with one watch, publishes this
//!   host's container records, and asks for kernel reconciles.
//! - This loop carries out the machine's actions as tasks whose results
//!   come back as inputs, feeds it kernel change events and this host's
//!   desired records ([`Agent::publish`]), and publishes two snapshots: the
//!   [`Status`] and the other hosts' checked records ([`Agent::remote`]).
//! - The last known own record and peers are kept in a state file, so that
//!   a host restarted while etcd is down still shows what its kernel keeps.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::access::EtcdAccess;
use crate::error::{Error, Result};
use crate::iptables::{self, Rules};
use crate::membership::{
    self, Action, Input, Membership, PublishError, Reconciled, RemoteView, Summary,
};
use crate::model::{HostRecord, Mac, Mode, Transport};
use crate::netlink::Kernel;
use crate::plan::{self, LocalSpec, Refusal, Underlay};
use crate::records::ContainerRecord;
use crate::store::{Claim, ClusterEvent, Store};

/// Everything the agent needs, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Where the last known own record and peers are kept between runs
    /// (`netplane-{host id}.json`); None: nowhere.
    pub state_dir: Option<PathBuf>,
}

impl Default for AgentConfig {
    /// The defaults of every tunable (the one home of each; portless's
    /// configuration reads them). The endpoints, the hostname and the
    /// state directory are the caller's to give.
    fn default() -> Self {
        AgentConfig {
            etcd: Vec::new(),
            etcd_access: EtcdAccess::default(),
            prefix: crate::store::PREFIX.to_owned(),
            cluster: Ipv4Net::new_assert(Ipv4Addr::new(10, 244, 0, 0), 16),
            subnet_len: 24,
            advertise: None,
            host_id: None,
            hostname: String::new(),
            mode: Mode::Vxlan,
            vxlan_port: 4789,
            vni: 1,
            vxlan_name: plan::VXLAN_DEVICE.to_owned(),
            lease_ttl: Duration::from_secs(10),
            bridge: None,
            resync: Duration::from_secs(10),
            netns: None,
            iptables: true,
            masquerade_outside: false,
            state_dir: None,
        }
    }
}

/// This host's lease as shown to people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// Container records: this host's published ones and the others' merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RecordsStatus {
    /// Own records etcd holds.
    pub published: usize,
    /// Own records not yet written (etcd away, or a write under way).
    pub pending: usize,
    /// Record writes done (puts and deletes).
    pub writes: u64,
    /// Other hosts' records answered and routed.
    pub merged: usize,
    /// Records refused now (forged, malformed), and since start by kind.
    pub refused: usize,
    pub refused_total: BTreeMap<String, u64>,
    /// Time from a change on its host to its record arriving here
    /// (publisher's clock against ours), as a histogram.
    pub watch_lag: LagHistogram,
}

/// Bucket upper bounds of [`LagHistogram`], in seconds (those of every
/// portless histogram: the binary checks that they agree).
pub const LAG_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Counts per bucket of [`LAG_BUCKETS`] (cumulative, as in Prometheus),
/// sum and count. The binary encodes it for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LagHistogram {
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum_us: u64,
}

/// The status snapshot, served as JSON at `/api/cluster`; its counters and
/// gauges are what the binary encodes as `portless_netplane_*` and
/// `portless_cluster_*` metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Status {
    /// None until the first lease is granted (or, after a restart with
    /// etcd away, the last known one: see `last_known`).
    pub host: Option<HostStatus>,
    /// `host` and `peers` are what the previous run knew: etcd has not
    /// answered since this start.
    #[serde(default)]
    pub last_known: bool,
    pub etcd_endpoints: Vec<String>,
    pub etcd_prefix: String,
    pub etcd_connected: bool,
    pub peers: Vec<PeerStatus>,
    pub refused: Vec<Refusal>,
    pub last_reconcile_unix_ms: Option<u64>,
    pub last_error: Option<String>,
    pub reconciles: u64,
    pub ops_applied: u64,
    pub records: RecordsStatus,
}

/// Lag observations, shared with the watch task.
#[derive(Default)]
struct Lag {
    buckets: [AtomicU64; LAG_BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Lag {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, le) in LAG_BUCKETS.iter().enumerate() {
            if s <= *le {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn snapshot(&self) -> LagHistogram {
        LagHistogram {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            count: self.count.load(Ordering::Relaxed),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// What a host keeps between runs (for status only).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Saved {
    own: HostRecord,
    peers: Vec<HostRecord>,
}

fn state_file(cfg: &AgentConfig, id: &str) -> Option<PathBuf> {
    let safe: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    cfg.state_dir
        .as_ref()
        .map(|d| d.join(format!("netplane-{safe}.json")))
}

fn load_saved(path: &std::path::Path) -> Option<Saved> {
    let text = std::fs::read(path).ok()?;
    match serde_json::from_slice(&text) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(file = %path.display(), error = %e, "ignoring an unreadable netplane state file");
            None
        }
    }
}

/// Write atomically: a temporary file, then rename.
fn store_saved(path: &std::path::Path, saved: &Saved) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_vec_pretty(saved).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

/// A running netplane. Dropping it stops its tasks and leaves the kernel
/// as it is; [`Agent::stop`] can also clean up.
pub struct Agent {
    cfg: AgentConfig,
    kernel: Kernel,
    store: Store,
    status: watch::Receiver<Status>,
    remote: watch::Receiver<Arc<RemoteView>>,
    local: watch::Sender<BTreeMap<String, ContainerRecord>>,
    /// The lease in force, for `stop`.
    lease: watch::Receiver<Option<i64>>,
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
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
        let id = cfg
            .host_id
            .clone()
            .unwrap_or_else(|| underlay.addr.to_string());
        let record = HostRecord {
            id: id.clone(),
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
        let state = state_file(&cfg, &id);
        let saved = state
            .as_deref()
            .and_then(load_saved)
            .filter(|s| s.own.id == id && cfg.cluster.contains(&s.own.subnet));
        let mut status0 = Status {
            etcd_endpoints: cfg.etcd.clone(),
            etcd_prefix: store.prefix().to_owned(),
            ..Status::default()
        };
        if let Some(s) = &saved {
            // What the kernel keeps from the previous run, shown until etcd
            // answers.
            let spec = spec_for(&cfg, &underlay, &s.own);
            let observed = kernel.observe().await.unwrap_or_default();
            let p = plan::plan(&spec, &s.peers);
            status0.host = Some(host_status(&spec, 0, 0));
            status0.peers = peer_statuses(&p, &s.peers, &observed);
            status0.last_known = true;
        }
        let machine = Membership::new(
            membership::Config {
                host_id: id.clone(),
                lease_ttl: cfg.lease_ttl,
                resync: cfg.resync,
            },
            Instant::now(),
            saved.map(|s| (s.own, s.peers)),
        );
        let (status_tx, status) = watch::channel(status0);
        let (remote_tx, remote) = watch::channel(Arc::new(RemoteView::new()));
        let (local, local_rx) = watch::channel(BTreeMap::new());
        let (lease_tx, lease) = watch::channel(None);
        let wake = Arc::new(Notify::new());
        let changes = match kernel.changes().await {
            Ok(rx) => Some(rx),
            Err(e) => {
                warn!(error = %e, "cannot follow kernel changes; drift is repaired every resync period only");
                None
            }
        };
        let driver = Driver {
            cfg: cfg.clone(),
            kernel: kernel.clone(),
            store: store.clone(),
            underlay,
            claim,
            host_id: id,
            state,
            status_tx,
            remote_tx,
            lease_tx,
            lag: Arc::new(Lag::default()),
            refused_total: BTreeMap::new(),
            saved: None,
            last_reconcile_ms: None,
            refused_peers: Vec::new(),
            hosts: (u64::MAX, Vec::new()),
            peers: ((u64::MAX, 0, 0), Vec::new()),
        };
        let main = tokio::spawn(driver.run(machine, local_rx, wake.clone(), changes));
        Ok(Agent {
            cfg,
            kernel,
            store,
            status,
            remote,
            local,
            lease,
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

    /// Other hosts' checked container records, following every change.
    pub fn remote(&self) -> watch::Receiver<Arc<RemoteView>> {
        self.remote.clone()
    }

    /// Where this host's desired container records go (by container id;
    /// the `host` field is filled in). Only what differs from etcd is
    /// written.
    pub fn publisher(&self) -> watch::Sender<BTreeMap<String, ContainerRecord>> {
        self.local.clone()
    }

    /// Wait until this host holds a lease and has reconciled once; returns
    /// its status.
    pub async fn ready(&self) -> HostStatus {
        let mut rx = self.status.clone();
        loop {
            {
                let s = rx.borrow_and_update();
                if let (Some(h), Some(_), false) = (&s.host, s.last_reconcile_unix_ms, s.last_known)
                {
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
    /// host and its records at once) and remove every kernel object and
    /// rule portless made.
    pub async fn stop(mut self, cleanup: bool) -> Result<()> {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if cleanup {
            let lease = *self.lease.borrow();
            if let Some(l) = lease
                && let Err(e) = self.store.release(l).await
            {
                warn!(error = %e, "could not give the lease back; it expires on its own");
            }
            cleanup_kernel(&self.kernel, self.cfg.iptables).await?;
            // Nothing of this host is left to remember.
            let id = self.status.borrow().host.as_ref().map(|h| h.id.clone());
            if let Some(path) = id.and_then(|id| state_file(&self.cfg, &id)) {
                let _ = std::fs::remove_file(path);
            }
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

fn spec_for(cfg: &AgentConfig, underlay: &Underlay, record: &HostRecord) -> LocalSpec {
    LocalSpec {
        record: record.clone(),
        underlay: underlay.clone(),
        vxlan_name: cfg.vxlan_name.clone(),
        vni: cfg.vni,
        bridge: cfg.bridge.clone(),
    }
}

fn host_status(spec: &LocalSpec, lease_id: i64, lease_ttl: i64) -> HostStatus {
    HostStatus {
        id: spec.record.id.clone(),
        hostname: spec.record.hostname.clone(),
        subnet: spec.record.subnet,
        gateway: spec.gateway().addr(),
        underlay: spec.underlay.addr,
        interface: spec.underlay.ifname.clone(),
        mode: spec.record.mode,
        vtep_mac: spec.record.vtep_mac,
        mtu: spec.container_mtu(),
        lease_id,
        lease_ttl,
    }
}

/// A planned peer as the status shows it, with its host record if known.
fn peer_status(pp: &plan::PeerPlan, rec: Option<&HostRecord>, in_place: bool) -> PeerStatus {
    PeerStatus {
        id: pp.id.clone(),
        hostname: rec.map(|r| r.hostname.clone()).unwrap_or_default(),
        subnet: pp.subnet,
        underlay: pp.underlay,
        mode: rec.map(|r| r.mode).unwrap_or(Mode::Vxlan),
        transport: pp.transport,
        in_place,
    }
}

fn peer_statuses(
    p: &plan::Plan,
    peers: &[HostRecord],
    observed: &plan::Observed,
) -> Vec<PeerStatus> {
    let by_id: BTreeMap<&str, &HostRecord> = peers.iter().map(|r| (r.id.as_str(), r)).collect();
    p.peers
        .iter()
        .map(|pp| {
            peer_status(
                pp,
                by_id.get(pp.id.as_str()).copied(),
                plan::peer_in_place(pp, observed),
            )
        })
        .collect()
}

struct AbortOnDrop(Option<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

/// The I/O shell around [`Membership`].
struct Driver {
    cfg: AgentConfig,
    kernel: Kernel,
    store: Store,
    underlay: Underlay,
    claim: Claim,
    host_id: String,
    state: Option<PathBuf>,
    status_tx: watch::Sender<Status>,
    remote_tx: watch::Sender<Arc<RemoteView>>,
    lease_tx: watch::Sender<Option<i64>>,
    lag: Arc<Lag>,
    refused_total: BTreeMap<String, u64>,
    /// What was last written to the state file, and the hosts version.
    saved: Option<(HostRecord, Vec<HostRecord>, u64)>,
    last_reconcile_ms: Option<u64>,
    /// Refused peers already logged, so that each is said once, at warn.
    refused_peers: Vec<Refusal>,
    /// The host records, as of a hosts version of the machine.
    hosts: (u64, Vec<HostRecord>),
    /// Peer statuses, as of (hosts version, lease, reconciles).
    peers: ((u64, i64, u64), Vec<PeerStatus>),
}

impl Driver {
    async fn run(
        mut self,
        mut m: Membership,
        mut local: watch::Receiver<BTreeMap<String, ContainerRecord>>,
        wake: Arc<Notify>,
        mut changes: Option<mpsc::UnboundedReceiver<()>>,
    ) {
        let (tx, mut inbox) = mpsc::unbounded_channel::<Input>();
        let mut watch_task = AbortOnDrop(None);
        let mut remote_version = u64::MAX;
        let mut local_open = true;
        loop {
            while let Some(action) = m.poll_action() {
                self.execute(action, &tx, &mut watch_task);
            }
            for r in m.take_refusals() {
                warn!(host = %r.host, container = %r.id, reason = %r.refusal, "container record refused");
                *self
                    .refused_total
                    .entry(r.refusal.kind().to_owned())
                    .or_default() += 1;
            }
            let (view, version) = m.remote();
            if version != remote_version {
                remote_version = version;
                self.remote_tx.send_replace(Arc::new(view.clone()));
            }
            let summary = m.summary();
            if self.hosts.0 != summary.hosts_version {
                self.hosts = (summary.hosts_version, m.hosts());
            }
            self.publish_status(&summary);
            self.save_state(&summary);

            let sleep = async {
                match m.poll_timeout() {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            let kernel_changed = async {
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
                Some(input) = inbox.recv() => {
                    if let Input::Reconciled(r) = &input {
                        self.last_reconcile_ms = Some(now_ms());
                        for p in &r.refused {
                            if !self.refused_peers.contains(p) {
                                warn!(peer = %p.id, subnet = %p.subnet, reason = %p.reason, "peer refused");
                            }
                        }
                        self.refused_peers = r.refused.clone();
                    }
                    m.handle(input, Instant::now());
                }
                _ = sleep => m.handle_timeout(Instant::now()),
                r = local.changed(), if local_open => match r {
                    Ok(()) => {
                        let records = local.borrow_and_update().clone();
                        m.handle(Input::Local(records), Instant::now());
                    }
                    Err(_) => local_open = false,
                },
                _ = wake.notified() => m.handle(Input::Wake, Instant::now()),
                _ = kernel_changed => {
                    if let Some(rx) = changes.as_mut() {
                        while rx.try_recv().is_ok() {}
                    }
                    m.handle(Input::KernelChanged, Instant::now());
                }
            }
        }
    }

    fn execute(
        &self,
        action: Action,
        tx: &mpsc::UnboundedSender<Input>,
        watch_task: &mut AbortOnDrop,
    ) {
        let store = self.store.clone();
        let tx = tx.clone();
        match action {
            Action::Claim => {
                let claim = self.claim.clone();
                tokio::spawn(async move {
                    let input = match store.claim(&claim).await {
                        Ok(l) => Input::Claimed(l),
                        Err(e) => {
                            warn!(error = %e, "cannot lease a subnet yet");
                            Input::ClaimFailed(e.to_string())
                        }
                    };
                    let _ = tx.send(input);
                });
            }
            Action::KeepAlive(lease) => {
                tokio::spawn(async move {
                    let input = match store.keep_alive(lease).await {
                        Ok(ttl) => {
                            if ttl <= 0 {
                                warn!(lease, "lease expired; leasing again");
                            }
                            Input::KeptAlive { lease, ttl }
                        }
                        Err(e) => Input::KeepAliveFailed {
                            lease,
                            error: e.to_string(),
                        },
                    };
                    let _ = tx.send(input);
                });
            }
            Action::List => {
                *watch_task = AbortOnDrop(None);
                tokio::spawn(async move {
                    let input = match store.list_cluster().await {
                        Ok(l) => {
                            debug!(
                                hosts = l.hosts.len(),
                                records = l.records.len(),
                                revision = l.revision,
                                "cluster listed"
                            );
                            Input::Listed(l)
                        }
                        Err(e) => {
                            debug!(error = %e, "listing the cluster failed; retrying");
                            Input::ListFailed(e.to_string())
                        }
                    };
                    let _ = tx.send(input);
                });
            }
            Action::Watch { watch, from } => {
                let lag = self.lag.clone();
                let me = self.host_id.clone();
                *watch_task = AbortOnDrop(Some(tokio::spawn(async move {
                    let error = match store.watch_cluster(from).await {
                        Err(e) => e.to_string(),
                        Ok(mut w) => loop {
                            match w.next().await {
                                Ok(Some(events)) => {
                                    let now = now_ns();
                                    for ev in &events {
                                        if let ClusterEvent::RecordPut(r) = ev
                                            && r.host != me
                                            && let Ok(rec) = &r.record
                                            && let Some(t) = rec.changed_ns
                                        {
                                            lag.observe(Duration::from_nanos(
                                                now.saturating_sub(t).max(0) as u64,
                                            ));
                                        }
                                    }
                                    if tx.send(Input::Watched { watch, events }).is_err() {
                                        return;
                                    }
                                }
                                Ok(None) => break "watch stream ended".to_owned(),
                                Err(e) => break e.to_string(),
                            }
                        },
                    };
                    debug!(error, "cluster watch ended; listing again");
                    let _ = tx.send(Input::WatchEnded { watch, error });
                })));
            }
            Action::Publish { lease, ops } => {
                let host = self.host_id.clone();
                tokio::spawn(async move {
                    let result = match store.publish(&host, lease, &ops).await {
                        Ok(()) => {
                            debug!(writes = ops.len(), "container records written");
                            Ok(())
                        }
                        Err(Error::LeaseGone(_)) => Err(PublishError::LeaseGone),
                        Err(e) => {
                            debug!(error = %e, "writing container records failed; retrying");
                            Err(PublishError::Other(e.to_string()))
                        }
                    };
                    let _ = tx.send(Input::Published { lease, ops, result });
                });
            }
            Action::RestoreHost(lease) => {
                tokio::spawn(async move {
                    let result = match store.republish(&lease).await {
                        Ok(true) => {
                            info!(host = %lease.record.id, subnet = %lease.record.subnet, "own record restored in etcd");
                            Ok(true)
                        }
                        Ok(false) => {
                            warn!(host = %lease.record.id, subnet = %lease.record.subnet, "own subnet is now held by another host; not restoring the record");
                            Ok(false)
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    let _ = tx.send(Input::HostRestored(result));
                });
            }
            Action::Reconcile { own, peers } => {
                let spec = spec_for(&self.cfg, &self.underlay, &own);
                let kernel = self.kernel.clone();
                let rules = self.cfg.iptables.then_some(Rules {
                    cluster: self.cfg.cluster,
                    subnet: own.subnet,
                    masquerade_outside: self.cfg.masquerade_outside,
                });
                tokio::spawn(async move {
                    let r = reconcile(&kernel, &spec, &peers, rules.as_ref()).await;
                    let _ = tx.send(Input::Reconciled(r));
                });
            }
        }
    }

    fn publish_status(&mut self, s: &Summary) {
        let lease_id = s.lease.as_ref().filter(|_| !s.lease_lost).map(|l| l.id);
        self.lease_tx.send_if_modified(|v| {
            let changed = *v != lease_id;
            *v = lease_id;
            changed
        });
        let (host, peers, last_known) = match (&s.lease, &s.last_known) {
            (Some(l), None) => {
                let spec = spec_for(&self.cfg, &self.underlay, &l.record);
                // The plan of 1,000 peers is not made again on every
                // record event: only when hosts, lease or kernel changed.
                let key = (s.hosts_version, l.id, s.reconciles);
                if self.peers.0 != key {
                    let hosts = &self.hosts.1;
                    let by_id: BTreeMap<&str, &HostRecord> =
                        hosts.iter().map(|h| (h.id.as_str(), h)).collect();
                    let p = plan::plan(&spec, hosts);
                    let in_place = s.last_reconcile.as_ref().map(|r| &r.peers_in_place);
                    let peers = p
                        .peers
                        .iter()
                        .map(|pp| {
                            peer_status(
                                pp,
                                by_id.get(pp.id.as_str()).copied(),
                                in_place
                                    .and_then(|m| m.get(&pp.id))
                                    .copied()
                                    .unwrap_or(false),
                            )
                        })
                        .collect();
                    self.peers = (key, peers);
                }
                (
                    Some(host_status(&spec, l.id, l.ttl)),
                    self.peers.1.clone(),
                    false,
                )
            }
            (_, Some(_)) => {
                // Keep the start-up view of the kept kernel entries.
                let cur = self.status_tx.borrow();
                (cur.host.clone(), cur.peers.clone(), cur.last_known)
            }
            (None, None) => (None, Vec::new(), false),
        };
        let status = Status {
            host,
            last_known,
            etcd_endpoints: self.cfg.etcd.clone(),
            etcd_prefix: self.store.prefix().to_owned(),
            etcd_connected: s.etcd_ok,
            peers,
            refused: s
                .last_reconcile
                .as_ref()
                .map(|r| r.refused.clone())
                .unwrap_or_default(),
            last_reconcile_unix_ms: self.last_reconcile_ms,
            last_error: s.last_error.clone(),
            reconciles: s.reconciles,
            ops_applied: s.ops_applied,
            records: RecordsStatus {
                published: s.published,
                pending: s.pending,
                writes: s.writes,
                merged: s.merged,
                refused: s.refused,
                refused_total: self.refused_total.clone(),
                watch_lag: self.lag.snapshot(),
            },
        };
        self.status_tx.send_if_modified(|cur| {
            let changed = *cur != status;
            if changed {
                *cur = status;
            }
            changed
        });
    }

    /// Keep the own record and peers on disk whenever they change.
    fn save_state(&mut self, s: &Summary) {
        let Some(path) = &self.state else { return };
        let (Some(l), true) = (&s.lease, s.listed) else {
            return;
        };
        if self
            .saved
            .as_ref()
            .is_some_and(|(own, _, v)| *own == l.record && *v == s.hosts_version)
        {
            return;
        }
        let peers: Vec<HostRecord> = self
            .hosts
            .1
            .iter()
            .filter(|h| h.id != self.host_id)
            .cloned()
            .collect();
        let now = (l.record.clone(), peers, s.hosts_version);
        let saved = Saved {
            own: now.0.clone(),
            peers: now.1.clone(),
        };
        if self
            .saved
            .as_ref()
            .is_some_and(|(own, peers, _)| *own == saved.own && *peers == saved.peers)
        {
            self.saved = Some(now);
            return;
        }
        match store_saved(path, &saved) {
            Ok(()) => self.saved = Some(now),
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot write the netplane state file");
                // Do not try again on every loop turn.
                self.saved = Some(now);
            }
        }
    }
}

/// Compare the kernel with the plan, apply the difference, and keep the
/// iptables rules in place.
async fn reconcile(
    kernel: &Kernel,
    spec: &LocalSpec,
    peers: &[HostRecord],
    rules: Option<&Rules>,
) -> Reconciled {
    let p = plan::plan(spec, peers);
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
    if let Some(rules) = rules
        && let Err(e) = iptables::ensure(kernel, rules).await
    {
        error.get_or_insert(e);
    }
    if let Some(e) = &error {
        warn!(error = %e, "reconcile incomplete; retrying at the next pass");
    }
    Reconciled {
        peers_in_place: p
            .peers
            .iter()
            .map(|pp| (pp.id.clone(), plan::peer_in_place(pp, &observed)))
            .collect(),
        refused: p.refused,
        applied,
        error: error.map(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_token_refusal_cancels_for_a_new_token() {
        use crate::store::cancel_needs_new_token;
        assert!(cancel_needs_new_token("etcdserver: permission denied"));
        assert!(cancel_needs_new_token("etcdserver: invalid auth token"));
        assert!(!cancel_needs_new_token(
            "etcdserver: mvcc: required revision has been compacted"
        ));
        assert!(!cancel_needs_new_token(""));
    }
}
