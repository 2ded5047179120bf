//! This host's membership of the cluster as a state machine without I/O:
//! its lease, its view of the other hosts and their container records, the
//! publishing of its own records, and when to reconcile the kernel.
//!
//! The agent ([`crate::agent`]) is a thin loop around it: it feeds
//! [`Input`]s (results of etcd calls, watch events, kernel changes, this
//! host's desired records) with the current time, carries out the
//! [`Action`]s it returns, and calls [`Membership::handle_timeout`] at
//! [`Membership::poll_timeout`]. Outages, restarts and expiry are therefore
//! unit-tested here in microseconds; the real-etcd tests stay as proof.
//!
//! Rules it keeps:
//! - Nothing is forgotten because etcd is away: the last known hosts and
//!   records stay in force (and the kernel keeps its entries) until etcd
//!   answers again; then a fresh listing replaces them.
//! - The kernel is not touched before the hosts were listed once (an empty
//!   peer set would tear down what an earlier run left in place).
//! - Own records are written only when they differ from what etcd holds
//!   (one write per change), under the live lease; an expired lease is
//!   claimed again and the records rewritten under the new one.
//! - Records from etcd are checked ([`records::check`]) before they count.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::HostRecord;
use crate::plan::Refusal;
use crate::records::{self, ContainerRecord, PubOp, Published, RecordRefusal};
use crate::store::{ClusterEvent, Lease, Listing, LiveHost, RawRecord};

/// Timing of the machine.
#[derive(Debug, Clone)]
pub struct Config {
    /// This host's id in etcd.
    pub host_id: String,
    pub lease_ttl: Duration,
    /// Periodic kernel drift repair.
    pub resync: Duration,
}

/// The outcome of one kernel reconcile, as the agent reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub peers_in_place: BTreeMap<String, bool>,
    pub refused: Vec<Refusal>,
    pub applied: u64,
    pub error: Option<String>,
}

/// Why a publish failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishError {
    /// etcd no longer knows the lease.
    LeaseGone,
    Other(String),
}

/// What happened.
#[derive(Debug, Clone)]
pub enum Input {
    Claimed(Lease),
    ClaimFailed(String),
    KeptAlive {
        lease: i64,
        ttl: i64,
    },
    KeepAliveFailed {
        lease: i64,
        error: String,
    },
    Listed(Listing),
    ListFailed(String),
    /// Changes from watch number `watch`.
    Watched {
        watch: u64,
        events: Vec<ClusterEvent>,
    },
    /// Watch number `watch` ended (etcd away, a compaction, a new token).
    WatchEnded {
        watch: u64,
        error: String,
    },
    Published {
        lease: i64,
        ops: Vec<PubOp>,
        result: Result<(), PublishError>,
    },
    /// The own host record was put back (true), or the subnet belongs to
    /// another host now (false).
    HostRestored(Result<bool, String>),
    Reconciled(Reconciled),
    /// A kernel object portless owns changed.
    KernelChanged,
    /// Something outside changed (a Docker network, and with it Docker's
    /// iptables rules): reconcile now.
    Wake,
    /// This host's containers on the cluster network, as they should be
    /// published, by container id.
    Local(BTreeMap<String, ContainerRecord>),
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Lease a subnet (adopting a live lease of this host).
    Claim,
    KeepAlive(i64),
    /// List every host and record; any running watch is stopped.
    List,
    /// Watch from revision `from` as watch number `watch`, replacing any
    /// running one.
    Watch {
        watch: u64,
        from: i64,
    },
    Publish {
        lease: i64,
        ops: Vec<PubOp>,
    },
    /// Put the own host record back under the live lease.
    RestoreHost(Lease),
    /// Make the kernel match this host and its peers.
    Reconcile {
        own: HostRecord,
        peers: Vec<HostRecord>,
    },
}

/// The containers of one remote host that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostContainers {
    pub host: HostRecord,
    pub records: BTreeMap<String, Arc<ContainerRecord>>,
}

/// Every other host's checked records; a host's entry is shared until it
/// changes, so a snapshot is cheap to take.
pub type RemoteView = BTreeMap<String, Arc<HostContainers>>;

/// A record refused, to be logged and counted by the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRecord {
    pub host: String,
    pub id: String,
    pub refusal: RecordRefusal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    /// List at this time.
    Idle(Instant),
    Listing,
    Watching(u64),
}

const RETRY_MIN: Duration = Duration::from_millis(100);
/// While etcd is away every host retries this often at most: a change
/// made meanwhile reaches etcd within about this long of its return.
const RETRY_MAX: Duration = Duration::from_millis(500);
const RELIST_AFTER: Duration = Duration::from_millis(250);
/// A burst of kernel changes (our own apply, containers starting) is one
/// reconcile.
const KERNEL_DEBOUNCE: Duration = Duration::from_millis(50);

/// The state machine; see the module docs.
#[derive(Debug)]
pub struct Membership {
    cfg: Config,
    // Lease.
    lease: Option<Lease>,
    /// etcd said the lease expired; a new claim is under way or due.
    lease_lost: bool,
    claiming: bool,
    claim_at: Option<Instant>,
    claim_backoff: Duration,
    keepalive_at: Option<Instant>,
    keeping_alive: bool,
    etcd_ok: bool,
    last_error: Option<String>,
    // View of etcd.
    view: View,
    watch_seq: u64,
    listed: bool,
    hosts: BTreeMap<String, LiveHost>,
    /// Changes whenever `hosts` does.
    hosts_version: u64,
    /// Every record read, by host then container id (own ones included).
    raw: BTreeMap<String, BTreeMap<String, RawRecord>>,
    remote: RemoteView,
    remote_version: u64,
    refused: BTreeMap<(String, String), RecordRefusal>,
    new_refusals: Vec<RefusedRecord>,
    restoring_host: bool,
    // Publishing.
    desired: BTreeMap<String, ContainerRecord>,
    /// Whether `desired` came from the host (an `Input::Local`) yet.
    desired_known: bool,
    own: Published,
    publishing: bool,
    publish_at: Option<Instant>,
    publish_backoff: Duration,
    writes: u64,
    // Kernel.
    reconcile_at: Option<Instant>,
    reconciling: bool,
    last_reconcile: Option<Reconciled>,
    reconciles: u64,
    ops_applied: u64,
    /// Own record and peers from before a restart (shown while etcd is
    /// away; never used to change the kernel).
    last_known: Option<(HostRecord, Vec<HostRecord>)>,
    actions: VecDeque<Action>,
}

/// A read-only summary for status and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub lease: Option<Lease>,
    pub lease_lost: bool,
    pub etcd_ok: bool,
    pub last_error: Option<String>,
    pub listed: bool,
    /// Changes whenever the host records do ([`Membership::hosts`]).
    pub hosts_version: u64,
    pub last_reconcile: Option<Reconciled>,
    pub reconciles: u64,
    pub ops_applied: u64,
    /// Own records etcd holds, and records waiting to be written.
    pub published: usize,
    pub pending: usize,
    /// Record writes (puts and deletes) done.
    pub writes: u64,
    /// Remote records answered and routed, and records refused now.
    pub merged: usize,
    pub refused: usize,
    /// Own record and peers from before a restart, while nothing newer is
    /// known.
    pub last_known: Option<(HostRecord, Vec<HostRecord>)>,
}

impl Membership {
    /// A new member at `now`: it claims and lists at once. `last_known`:
    /// what an earlier run saw, for status only.
    pub fn new(
        cfg: Config,
        now: Instant,
        last_known: Option<(HostRecord, Vec<HostRecord>)>,
    ) -> Membership {
        let mut m = Membership {
            cfg,
            lease: None,
            lease_lost: false,
            claiming: false,
            claim_at: Some(now),
            claim_backoff: RETRY_MIN,
            keepalive_at: None,
            keeping_alive: false,
            etcd_ok: false,
            last_error: None,
            view: View::Idle(now),
            watch_seq: 0,
            listed: false,
            hosts: BTreeMap::new(),
            hosts_version: 0,
            raw: BTreeMap::new(),
            remote: RemoteView::new(),
            remote_version: 0,
            refused: BTreeMap::new(),
            new_refusals: Vec::new(),
            restoring_host: false,
            desired: BTreeMap::new(),
            desired_known: false,
            own: Published::new(),
            publishing: false,
            publish_at: None,
            publish_backoff: RETRY_MIN,
            writes: 0,
            reconcile_at: None,
            reconciling: false,
            last_reconcile: None,
            reconciles: 0,
            ops_applied: 0,
            last_known,
            actions: VecDeque::new(),
        };
        m.handle_timeout(now);
        m
    }

    /// The next action to carry out.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Membership::handle_timeout`] wants to be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        if !self.claiming && (self.lease.is_none() || self.lease_lost) {
            at(self.claim_at);
        }
        if !self.keeping_alive && self.lease.is_some() && !self.lease_lost {
            at(self.keepalive_at);
        }
        if let View::Idle(when) = self.view {
            at(Some(when));
        }
        if !self.publishing {
            at(self.publish_at);
        }
        if !self.reconciling {
            at(self.reconcile_at);
        }
        t
    }

    /// Time passed: start whatever is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due = |t: Option<Instant>| t.is_some_and(|t| t <= now);
        if !self.claiming && (self.lease.is_none() || self.lease_lost) && due(self.claim_at) {
            self.claiming = true;
            self.claim_at = None;
            self.actions.push_back(Action::Claim);
        }
        if !self.keeping_alive
            && !self.lease_lost
            && due(self.keepalive_at)
            && let Some(l) = &self.lease
        {
            self.keeping_alive = true;
            self.keepalive_at = None;
            self.actions.push_back(Action::KeepAlive(l.id));
        }
        if let View::Idle(when) = self.view
            && when <= now
        {
            self.view = View::Listing;
            self.actions.push_back(Action::List);
        }
        if !self.publishing && due(self.publish_at) {
            self.publish_at = None;
            self.maybe_publish(now);
        }
        if !self.reconciling && due(self.reconcile_at) {
            self.start_reconcile(now);
        }
    }

    pub fn handle(&mut self, input: Input, now: Instant) {
        match input {
            Input::Claimed(lease) => {
                self.claiming = false;
                self.claim_backoff = RETRY_MIN;
                self.lease_lost = false;
                self.keepalive_at = Some(now + self.keepalive_period());
                self.lease = Some(lease);
                self.etcd_up(now);
                self.last_error = None;
                self.reconcile_soon(now);
                self.publish_at = Some(now);
                self.check_own_host();
            }
            Input::ClaimFailed(error) => {
                self.claiming = false;
                self.claim_at = Some(now + self.claim_backoff);
                self.claim_backoff = (self.claim_backoff * 2).min(RETRY_MAX);
                self.last_error = Some(error);
            }
            Input::KeptAlive { lease, ttl } => {
                if self.lease.as_ref().map(|l| l.id) != Some(lease) {
                    return;
                }
                self.keeping_alive = false;
                self.keepalive_at = Some(now + self.keepalive_period());
                if ttl > 0 {
                    if !self.etcd_ok {
                        // The status says so at once.
                        self.reconcile_soon(now);
                    }
                    self.etcd_up(now);
                } else {
                    self.lose_lease(now);
                }
            }
            Input::KeepAliveFailed { lease, error } => {
                if self.lease.as_ref().map(|l| l.id) != Some(lease) {
                    return;
                }
                self.keeping_alive = false;
                self.keepalive_at = Some(now + self.keepalive_period());
                self.etcd_down(error, now);
            }
            Input::Listed(listing) => self.listed(listing, now),
            Input::ListFailed(error) => {
                self.view = View::Idle(now + RELIST_AFTER);
                self.etcd_down(error, now);
            }
            Input::Watched { watch, events } => {
                if self.view == View::Watching(watch) {
                    self.apply_events(events, now);
                }
            }
            Input::WatchEnded { watch, error: _ } => {
                if self.view == View::Watching(watch) {
                    self.view = View::Idle(now + RELIST_AFTER);
                }
            }
            Input::Published { lease, ops, result } => {
                self.publishing = false;
                match result {
                    Ok(()) => {
                        self.etcd_up(now);
                        self.publish_backoff = RETRY_MIN;
                        self.writes += ops.len() as u64;
                        for op in ops {
                            match op {
                                PubOp::Put(r) => {
                                    self.own.insert(r.id.clone(), (*r, lease));
                                }
                                PubOp::Delete(id) => {
                                    self.own.remove(&id);
                                }
                            }
                        }
                        // Whatever changed while these were written.
                        self.maybe_publish(now);
                    }
                    Err(PublishError::LeaseGone) => {
                        if self.lease.as_ref().map(|l| l.id) == Some(lease) {
                            self.lose_lease(now);
                        }
                    }
                    Err(PublishError::Other(e)) => {
                        self.publish_at = Some(now + self.publish_backoff);
                        self.publish_backoff = (self.publish_backoff * 2).min(RETRY_MAX);
                        self.etcd_down(e, now);
                    }
                }
            }
            Input::HostRestored(result) => {
                self.restoring_host = false;
                if let Err(e) = result {
                    self.last_error = Some(e);
                }
            }
            Input::Reconciled(r) => {
                self.reconciling = false;
                self.reconciles += 1;
                self.ops_applied += r.applied;
                if let Some(e) = &r.error {
                    self.last_error = Some(e.clone());
                } else if self.etcd_ok {
                    self.last_error = None;
                }
                self.last_reconcile = Some(r);
                // The periodic drift repair, unless something is due sooner.
                let next = now + self.cfg.resync;
                self.reconcile_at = Some(self.reconcile_at.map_or(next, |t| t.min(next)));
            }
            Input::KernelChanged => {
                let t = now + KERNEL_DEBOUNCE;
                self.reconcile_at = Some(self.reconcile_at.map_or(t, |x| x.min(t)));
            }
            Input::Wake => self.reconcile_soon(now),
            Input::Local(mut records) => {
                for r in records.values_mut() {
                    r.host = self.cfg.host_id.clone();
                }
                if records != self.desired || !self.desired_known {
                    self.desired = records;
                    self.desired_known = true;
                    self.maybe_publish(now);
                }
            }
        }
        self.handle_timeout(now);
    }

    /// Refusals found since the last call, for the log and metrics.
    pub fn take_refusals(&mut self) -> Vec<RefusedRecord> {
        std::mem::take(&mut self.new_refusals)
    }

    /// Other hosts' checked records, and a number that changes whenever
    /// they do.
    pub fn remote(&self) -> (&RemoteView, u64) {
        (&self.remote, self.remote_version)
    }

    /// Every live host record, this host's included.
    pub fn hosts(&self) -> Vec<HostRecord> {
        self.hosts.values().map(|h| h.record.clone()).collect()
    }

    pub fn summary(&self) -> Summary {
        let pending = match &self.lease {
            _ if !self.desired_known => 0,
            None => self.desired.len(),
            Some(l) => records::publish_ops(&self.desired, &self.own, l.id).len(),
        };
        Summary {
            lease: self.lease.clone(),
            lease_lost: self.lease_lost,
            etcd_ok: self.etcd_ok,
            last_error: self.last_error.clone(),
            listed: self.listed,
            hosts_version: self.hosts_version,
            last_reconcile: self.last_reconcile.clone(),
            reconciles: self.reconciles,
            ops_applied: self.ops_applied,
            published: self.own.len(),
            pending,
            writes: self.writes,
            merged: self.remote.values().map(|h| h.records.len()).sum(),
            refused: self.refused.len(),
            last_known: if self.lease.is_none() || !self.listed {
                self.last_known.clone()
            } else {
                None
            },
        }
    }

    fn keepalive_period(&self) -> Duration {
        (self.cfg.lease_ttl / 3).max(Duration::from_millis(300))
    }

    /// etcd answered. After an outage, everything that was waiting for it
    /// is tried again now rather than at its next backoff.
    fn etcd_up(&mut self, now: Instant) {
        if !self.etcd_ok {
            if !self.claiming && (self.lease.is_none() || self.lease_lost) {
                self.claim_at = Some(now);
            }
            if self.publish_at.is_some() {
                self.publish_at = Some(now);
            }
            self.publish_backoff = RETRY_MIN;
            if let View::Idle(_) = self.view {
                self.view = View::Idle(now);
            }
        }
        self.etcd_ok = true;
    }

    /// etcd is away: nothing is torn down; the status says so.
    fn etcd_down(&mut self, error: String, now: Instant) {
        if self.etcd_ok {
            self.reconcile_soon(now);
        }
        self.etcd_ok = false;
        self.last_error = Some(error);
    }

    fn lose_lease(&mut self, now: Instant) {
        self.lease_lost = true;
        self.claim_at = Some(now);
        self.claim_backoff = RETRY_MIN;
    }

    fn reconcile_soon(&mut self, now: Instant) {
        self.reconcile_at = Some(now);
    }

    fn start_reconcile(&mut self, now: Instant) {
        let Some(lease) = &self.lease else {
            return;
        };
        if !self.listed {
            return;
        }
        let _ = now;
        self.reconciling = true;
        self.reconcile_at = None;
        self.actions.push_back(Action::Reconcile {
            own: lease.record.clone(),
            peers: self.hosts.values().map(|h| h.record.clone()).collect(),
        });
    }

    fn maybe_publish(&mut self, now: Instant) {
        // Until the host has said what it runs, its records in etcd (from
        // before a restart) stand: publishing an empty wish would delete
        // them all.
        if self.publishing
            || self.publish_at.is_some_and(|t| t > now)
            || !self.listed
            || !self.desired_known
        {
            return;
        }
        let Some(lease) = &self.lease else { return };
        if self.lease_lost {
            return;
        }
        let subnet = lease.record.subnet;
        let desired: BTreeMap<String, ContainerRecord> = self
            .desired
            .iter()
            // Not published: an address on the cluster network outside
            // this lease's subnet, or no address at all.
            .filter(|(_, r)| match r.addr {
                Some(a) => subnet.contains(&a),
                None => !r.networks.is_empty(),
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let ops = records::publish_ops(&desired, &self.own, lease.id);
        if ops.is_empty() {
            return;
        }
        self.publishing = true;
        self.actions.push_back(Action::Publish {
            lease: lease.id,
            ops,
        });
    }

    /// Put the own host record back when it vanished or changed while the
    /// lease lives (etcd is reconciled like the kernel).
    fn check_own_host(&mut self) {
        if self.restoring_host || !self.listed || self.lease_lost {
            return;
        }
        let Some(lease) = &self.lease else { return };
        let ok = self
            .hosts
            .get(&self.cfg.host_id)
            .is_some_and(|h| h.record == lease.record && h.lease == lease.id);
        if !ok {
            self.restoring_host = true;
            self.actions.push_back(Action::RestoreHost(lease.clone()));
        }
    }

    fn listed(&mut self, listing: Listing, now: Instant) {
        self.etcd_up(now);
        let Listing {
            hosts,
            records,
            revision,
        } = listing;
        let hosts_changed = !self.listed || hosts != self.hosts;
        if hosts_changed {
            self.hosts_version += 1;
        }
        self.hosts = hosts;
        self.raw.clear();
        self.own.clear();
        for r in records {
            self.put_raw(r);
        }
        self.refused.clear();
        self.listed = true;
        self.last_known = None;
        let all: Vec<String> = self.raw.keys().chain(self.remote.keys()).cloned().collect();
        for h in all {
            self.recheck_host(&h);
        }
        self.watch_seq += 1;
        self.view = View::Watching(self.watch_seq);
        self.actions.push_back(Action::Watch {
            watch: self.watch_seq,
            from: revision + 1,
        });
        if hosts_changed {
            self.reconcile_soon(now);
        }
        self.check_own_host();
        self.maybe_publish(now);
    }

    fn put_raw(&mut self, r: RawRecord) {
        if r.host == self.cfg.host_id {
            if let Ok(rec) = &r.record {
                self.own.insert(r.id.clone(), ((**rec).clone(), r.lease));
            } else {
                // Unreadable under our own key: rewrite it.
                self.own.remove(&r.id);
            }
            return;
        }
        self.raw
            .entry(r.host.clone())
            .or_default()
            .insert(r.id.clone(), r);
    }

    fn apply_events(&mut self, events: Vec<ClusterEvent>, now: Instant) {
        let mut touched: Vec<String> = Vec::new();
        let mut hosts_changed = false;
        let mut own_changed = false;
        for ev in events {
            match ev {
                ClusterEvent::HostPut { id, host } => {
                    let changed = match host {
                        Some(h) => self.hosts.insert(id.clone(), h.clone()) != Some(h),
                        None => self.hosts.remove(&id).is_some(),
                    };
                    if changed {
                        hosts_changed = true;
                        touched.push(id);
                    }
                }
                ClusterEvent::HostDeleted { id } => {
                    if self.hosts.remove(&id).is_some() {
                        hosts_changed = true;
                        touched.push(id);
                    }
                }
                ClusterEvent::RecordPut(r) => {
                    if r.host == self.cfg.host_id {
                        own_changed = true;
                    } else {
                        touched.push(r.host.clone());
                    }
                    self.put_raw(r);
                }
                ClusterEvent::RecordDeleted { host, id } => {
                    if host == self.cfg.host_id {
                        own_changed |= self.own.remove(&id).is_some();
                    } else if let Some(m) = self.raw.get_mut(&host) {
                        m.remove(&id);
                        if m.is_empty() {
                            self.raw.remove(&host);
                        }
                        touched.push(host);
                    }
                }
            }
        }
        touched.sort();
        touched.dedup();
        for h in touched {
            self.recheck_host(&h);
        }
        if hosts_changed {
            self.hosts_version += 1;
            self.reconcile_soon(now);
            self.check_own_host();
        }
        if own_changed {
            // Someone else wrote or deleted one of ours: put it right.
            self.maybe_publish(now);
        }
    }

    /// Check every record of `host` again and update its remote entry.
    fn recheck_host(&mut self, host: &str) {
        if host == self.cfg.host_id {
            return;
        }
        // Refusals already reported stay quiet when checked again.
        let mut before = BTreeMap::new();
        self.refused.retain(|(h, id), r| {
            if h == host {
                before.insert(id.clone(), r.clone());
                false
            } else {
                true
            }
        });
        let live = self.hosts.get(host);
        let mut valid = BTreeMap::new();
        if let Some(records) = self.raw.get(host) {
            let hosts: BTreeMap<String, (HostRecord, i64)> = live
                .map(|h| (host.to_owned(), (h.record.clone(), h.lease)))
                .into_iter()
                .collect();
            for (id, raw) in records {
                let verdict = match &raw.record {
                    Ok(rec) => {
                        records::check(rec, &raw.host, id, raw.lease, &hosts).map(|()| rec.clone())
                    }
                    Err(e) => Err(e.clone()),
                };
                match verdict {
                    Ok(rec) => {
                        valid.insert(id.clone(), rec);
                    }
                    Err(refusal) => {
                        // A host's records may arrive before its host
                        // record in one listing order; not yet refusals
                        // worth a log line unless the host is known.
                        let known = live.is_some();
                        let reported = before.get(id) == Some(&refusal);
                        if !reported && (known || !matches!(refusal, RecordRefusal::NotTheHosts(_)))
                        {
                            self.new_refusals.push(RefusedRecord {
                                host: host.to_owned(),
                                id: id.clone(),
                                refusal: refusal.clone(),
                            });
                        }
                        self.refused.insert((host.to_owned(), id.clone()), refusal);
                    }
                }
            }
        }
        let new = match (live, valid.is_empty()) {
            (Some(h), false) => Some(HostContainers {
                host: h.record.clone(),
                records: valid,
            }),
            _ => None,
        };
        let old = self.remote.get(host).map(|a| &**a);
        if old != new.as_ref() {
            match new {
                Some(n) => {
                    self.remote.insert(host.to_owned(), Arc::new(n));
                }
                None => {
                    self.remote.remove(host);
                }
            }
            self.remote_version += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{Mac, Mode};
    use crate::records::RecordHealth;

    const ME: &str = "10.0.0.1";
    const B: &str = "10.0.0.2";

    fn cfg() -> Config {
        Config {
            host_id: ME.into(),
            lease_ttl: Duration::from_secs(3),
            resync: Duration::from_secs(10),
        }
    }

    fn host_record(id: &str, third: u8) -> HostRecord {
        let underlay: Ipv4Addr = id.parse().unwrap();
        HostRecord {
            id: id.into(),
            subnet: format!("10.244.{third}.0/24").parse().unwrap(),
            underlay,
            vtep_mac: Mac::for_vtep(underlay),
            mode: Mode::Vxlan,
            vxlan_port: 4789,
            hostname: String::new(),
        }
    }

    fn lease(id: i64) -> Lease {
        Lease {
            id,
            ttl: 3,
            record: host_record(ME, 1),
        }
    }

    fn cid(n: u8) -> String {
        format!("{n:064x}")
    }

    fn rec(host: &str, third: u8, n: u8) -> ContainerRecord {
        ContainerRecord {
            host: host.into(),
            id: cid(n),
            name: format!("c{n}"),
            project: None,
            service: None,
            aliases: vec![],
            addr: Some(Ipv4Addr::new(10, 244, third, 10 + n)),
            networks: Vec::new(),
            health: RecordHealth::None,
            draining: false,
            labels: BTreeMap::new(),
            ports: vec![],
            changed_ns: None,
        }
    }

    fn raw(r: &ContainerRecord, lease: i64) -> RawRecord {
        RawRecord {
            host: r.host.clone(),
            id: r.id.clone(),
            lease,
            record: Ok(Arc::new(r.clone())),
        }
    }

    fn live(id: &str, third: u8, lease: i64) -> (String, LiveHost) {
        (
            id.to_owned(),
            LiveHost {
                record: host_record(id, third),
                lease,
            },
        )
    }

    fn drain(m: &mut Membership) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    /// A member that holds lease 1 and has listed: itself and B (lease 2,
    /// one record).
    fn settled(t0: Instant) -> Membership {
        let mut m = Membership::new(cfg(), t0, None);
        assert_eq!(drain(&mut m), vec![Action::Claim, Action::List]);
        m.handle(Input::Claimed(lease(1)), t0);
        m.handle(
            Input::Listed(Listing {
                hosts: BTreeMap::from([
                    (
                        ME.to_owned(),
                        LiveHost {
                            record: host_record(ME, 1),
                            lease: 1,
                        },
                    ),
                    live(B, 2, 2),
                ]),
                records: vec![raw(&rec(B, 2, 1), 2)],
                revision: 10,
            }),
            t0,
        );
        m
    }

    #[test]
    fn claims_and_lists_at_once_then_watches_and_reconciles() {
        let t0 = Instant::now();
        let mut m = settled(t0);
        let actions = drain(&mut m);
        assert!(actions.contains(&Action::Watch { watch: 1, from: 11 }));
        assert!(actions.iter().any(|a| matches!(
            a,
            Action::Reconcile { peers, .. } if peers.len() == 2
        )));
        let (remote, _) = m.remote();
        assert_eq!(remote[B].records.len(), 1);
    }

    #[test]
    fn the_kernel_is_not_touched_before_the_first_listing() {
        let t0 = Instant::now();
        let mut m = Membership::new(cfg(), t0, None);
        drain(&mut m);
        m.handle(Input::Claimed(lease(1)), t0);
        m.handle(Input::KernelChanged, t0);
        m.handle_timeout(t0 + Duration::from_secs(60));
        assert!(
            !drain(&mut m)
                .iter()
                .any(|a| matches!(a, Action::Reconcile { .. }))
        );
    }

    #[test]
    fn a_local_change_is_one_write_and_unchanged_records_none() {
        let t0 = Instant::now();
        let mut m = settled(t0);
        drain(&mut m);
        let a = rec(ME, 1, 1);
        m.handle(
            Input::Local(BTreeMap::from([(a.id.clone(), a.clone())])),
            t0,
        );
        let acts = drain(&mut m);
        let ops = match &acts[..] {
            [Action::Publish { lease: 1, ops }] => ops.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(ops, vec![PubOp::Put(Box::new(a.clone()))]);
        m.handle(
            Input::Published {
                lease: 1,
                ops,
                result: Ok(()),
            },
            t0,
        );
        // Our own put comes back through the watch: nothing more to do.
        m.handle(
            Input::Watched {
                watch: 1,
                events: vec![ClusterEvent::RecordPut(raw(&a, 1))],
            },
            t0,
        );
        // The same records again (another event time): nothing written.
        let again = ContainerRecord {
            changed_ns: Some(5),
            ..a.clone()
        };
        m.handle(Input::Local(BTreeMap::from([(a.id.clone(), again)])), t0);
        assert!(drain(&mut m).is_empty());
        assert_eq!(m.summary().writes, 1);
    }

    /// etcd's listing after a restart: this host alone (lease 1) and
    /// `records`, its records from before.
    fn listed_alone(records: Vec<RawRecord>) -> Input {
        Input::Listed(Listing {
            hosts: BTreeMap::from([(
                ME.to_owned(),
                LiveHost {
                    record: host_record(ME, 1),
                    lease: 1,
                },
            )]),
            records,
            revision: 3,
        })
    }

    #[test]
    fn records_in_etcd_stand_until_the_host_says_what_it_runs() {
        // After a restart the listing can come before discovery's first
        // catalog: nothing may be deleted meanwhile, then only the
        // difference is written. An empty first catalog deletes all.
        for (local_ids, expect_deletes) in [(vec![1u8, 3], 1usize), (vec![], 2)] {
            let t0 = Instant::now();
            let mut m = Membership::new(cfg(), t0, None);
            drain(&mut m);
            let (a, b) = (rec(ME, 1, 1), rec(ME, 1, 2));
            m.handle(Input::Claimed(lease(1)), t0);
            m.handle(listed_alone(vec![raw(&a, 1), raw(&b, 1)]), t0);
            let early = drain(&mut m);
            assert!(
                !early.iter().any(|x| matches!(x, Action::Publish { .. })),
                "{early:?}"
            );
            assert_eq!(m.summary().pending, 0);
            let local: BTreeMap<_, _> = local_ids
                .iter()
                .map(|&n| {
                    let r = rec(ME, 1, n);
                    (r.id.clone(), r)
                })
                .collect();
            m.handle(Input::Local(local), t0);
            let ops: Vec<PubOp> = drain(&mut m)
                .into_iter()
                .filter_map(|x| match x {
                    Action::Publish { ops, .. } => Some(ops),
                    _ => None,
                })
                .flatten()
                .collect();
            let deletes = ops.iter().filter(|o| matches!(o, PubOp::Delete(_))).count();
            assert_eq!(deletes, expect_deletes, "{ops:?}");
            assert_eq!(ops.len() - deletes, local_ids.len().saturating_sub(1));
        }
    }

    #[test]
    fn a_restart_rewrites_only_what_changed() {
        // The previous run left records a (unchanged) and b (gone since);
        // c is new. The lease was adopted (same id).
        let t0 = Instant::now();
        let mut m = Membership::new(cfg(), t0, None);
        drain(&mut m);
        let (a, b, c) = (rec(ME, 1, 1), rec(ME, 1, 2), rec(ME, 1, 3));
        m.handle(
            Input::Local(BTreeMap::from([
                (a.id.clone(), a.clone()),
                (c.id.clone(), c.clone()),
            ])),
            t0,
        );
        m.handle(Input::Claimed(lease(1)), t0);
        // Nothing is written before the listing says what etcd holds.
        assert!(
            !drain(&mut m)
                .iter()
                .any(|x| matches!(x, Action::Publish { .. }))
        );
        m.handle(listed_alone(vec![raw(&a, 1), raw(&b, 1)]), t0);
        let publish: Vec<_> = drain(&mut m)
            .into_iter()
            .filter_map(|x| match x {
                Action::Publish { ops, .. } => Some(ops),
                _ => None,
            })
            .collect();
        assert_eq!(
            publish,
            vec![vec![
                PubOp::Delete(b.id.clone()),
                PubOp::Put(Box::new(c.clone()))
            ]]
        );
    }

    #[test]
    fn an_expired_lease_is_claimed_again_and_every_record_rewritten() {
        let t0 = Instant::now();
        let mut m = settled(t0);
        drain(&mut m);
        let a = rec(ME, 1, 1);
        m.handle(
            Input::Local(BTreeMap::from([(a.id.clone(), a.clone())])),
            t0,
        );
        let ops = match &drain(&mut m)[..] {
            [Action::Publish { ops, .. }] => ops.clone(),
            other => panic!("{other:?}"),
        };
        m.handle(
            Input::Published {
                lease: 1,
                ops,
                result: Ok(()),
            },
            t0,
        );
        // A keep-alive: etcd says the lease is gone.
        let t1 = t0 + Duration::from_secs(1);
        m.handle_timeout(t1);
        assert_eq!(drain(&mut m), vec![Action::KeepAlive(1)]);
        m.handle(Input::KeptAlive { lease: 1, ttl: 0 }, t1);
        assert_eq!(drain(&mut m), vec![Action::Claim]);
        m.handle(Input::Claimed(lease(9)), t1);
        let acts = drain(&mut m);
        assert!(acts.contains(&Action::Publish {
            lease: 9,
            ops: vec![PubOp::Put(Box::new(a.clone()))]
        }));
    }

    #[test]
    fn a_lease_gone_on_publish_is_claimed_again() {
        let t0 = Instant::now();
        let mut m = settled(t0);
        drain(&mut m);
        let a = rec(ME, 1, 1);
        m.handle(
            Input::Local(BTreeMap::from([(a.id.clone(), a.clone())])),
            t0,
        );
        let ops = match &drain(&mut m)[..] {
            [Action::Publish { ops, .. }] => ops.clone(),
            other => panic!("{other:?}"),
        };
        m.handle(
            Input::Published {
                lease: 1,
                ops,
                result: Err(PublishError::LeaseGone),
            },
            t0,
        );
        assert_eq!(drain(&mut m), vec![Action::Claim]);
    }

    #[test]
    fn an_etcd_outage_keeps_every_remote_record_and_retries() {
        let t0 = Instant::now();
        let mut m = settled(t0);
        drain(&mut m);
        m.handle(
            Input::WatchEnded {
                watch: 1,
                error: "connection reset".into(),
            },
            t0,
        );
        // Re-listing fails for 30 s.
        let mut t = t0;
        for _ in 0..60 {
            t += Duration::from_millis(500);
            m.handle_timeout(t);
            for a in drain(&mut m) {
                match a {
                    Action::List => m.handle(Input::ListFailed("unreachable".into()), t),
                    Action::KeepAlive(l) => m.handle(
                        Input::KeepAliveFailed {
                            lease: l,
                            error: "unreachable".into(),
                        },
                        t,
                    ),
                    Action::Reconcile { peers, .. } => {
                        // Peers are still all there.
                        assert_eq!(peers.len(), 2);
                        m.handle(Input::Reconciled(Reconciled::default()), t);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        assert!(!m.summary().etcd_ok);
        assert_eq!(m.remote().0[B].records.len(), 1);
        // etcd is back: B started a container meanwhile.
        t += Duration::from_millis(500);
        m.handle_timeout(t);
        assert!(drain(&mut m).contains(&Action::List));
        m.handle(
            Input::Listed(Listing {
                hosts: BTreeMap::from([
                    (
                        ME.to_owned(),
                        LiveHost {
                            record: host_record(ME, 1),
                            lease: 1,
                        },
                    ),
                    live(B, 2, 2),
                ]),
                records: vec![raw(&rec(B, 2, 1), 2), raw(&rec(B, 2, 2), 2)],
                revision: 40,
            }),
            t,
        );
        assert!(m.summary().etcd_ok);
        assert_eq!(m.remote().0[B].records.len(), 2);
    }

    #[test]
    fn a_dead_hosts_records_vanish_with_it() {
        let t0 = Instant::now();
        let mut m = settled(t0);
        drain(&mut m);
        m.handle(Input::Reconciled(Reconciled::default()), t0);
        let (_, v0) = m.remote();
        m.handle(
            Input::Watched {
                watch: 1,
                events: vec![
                    ClusterEvent::HostDeleted { id: B.into() },
                    ClusterEvent::RecordDeleted {
                        host: B.into(),
                        id: cid(1),
                    },
                ],
            },
            t0,
        );
        let (remote, v1) = m.remote();
        assert!(remote.is_empty());
        assert_ne!(v0, v1);
        assert!(
            drain(&mut m)
                .iter()
                .any(|a| matches!(a, Action::Reconcile { peers, .. } if peers.len() == 1))
        );
    }

    #[test]
    fn forged_records_are_refused_and_reported_once_each() {
        let t0 = Instant::now();
        let mut m = settled(t0);
        drain(&mut m);
        // Under B's key, but outside B's subnet; and one not on B's lease.
        let outside = ContainerRecord {
            addr: Some(Ipv4Addr::new(10, 244, 1, 50)),
            ..rec(B, 2, 7)
        };
        let other_lease = rec(B, 2, 8);
        m.handle(
            Input::Watched {
                watch: 1,
                events: vec![
                    ClusterEvent::RecordPut(raw(&outside, 2)),
                    ClusterEvent::RecordPut(raw(&other_lease, 99)),
                ],
            },
            t0,
        );
        let refused = m.take_refusals();
        let kinds: Vec<_> = refused.iter().map(|r| r.refusal.kind()).collect();
        assert!(kinds.contains(&"address-outside-subnet"), "{kinds:?}");
        assert!(kinds.contains(&"not-the-hosts"), "{kinds:?}");
        assert_eq!(refused.len(), 2);
        assert_eq!(m.remote().0[B].records.len(), 1);
        assert_eq!(m.summary().refused, 2);
        // Another record of B arrives: B's records are checked again, and
        // the refused ones are not reported a second time.
        m.handle(
            Input::Watched {
                watch: 1,
                events: vec![ClusterEvent::RecordPut(raw(&rec(B, 2, 3), 2))],
            },
            t0,
        );
        assert!(m.take_refusals().is_empty());
        assert_eq!(m.remote().0[B].records.len(), 2);
        assert_eq!(m.summary().refused, 2);
    }

    #[test]
    fn a_record_before_its_host_counts_once_the_host_arrives() {
        let t0 = Instant::now();
        let mut m = settled(t0);
        drain(&mut m);
        let c = rec("10.0.0.3", 3, 1);
        m.handle(
            Input::Watched {
                watch: 1,
                events: vec![ClusterEvent::RecordPut(raw(&c, 5))],
            },
            t0,
        );
        assert!(!m.remote().0.contains_key("10.0.0.3"));
        assert!(m.take_refusals().is_empty(), "not yet a refusal");
        let (id, h) = live("10.0.0.3", 3, 5);
        m.handle(
            Input::Watched {
                watch: 1,
                events: vec![ClusterEvent::HostPut { id, host: Some(h) }],
            },
            t0,
        );
        assert_eq!(m.remote().0["10.0.0.3"].records.len(), 1);
    }

    #[test]
    fn own_records_deleted_by_someone_else_are_written_again() {
        let t0 = Instant::now();
        let mut m = settled(t0);
        drain(&mut m);
        let a = rec(ME, 1, 1);
        m.handle(
            Input::Local(BTreeMap::from([(a.id.clone(), a.clone())])),
            t0,
        );
        let ops = match &drain(&mut m)[..] {
            [Action::Publish { ops, .. }] => ops.clone(),
            other => panic!("{other:?}"),
        };
        m.handle(
            Input::Published {
                lease: 1,
                ops,
                result: Ok(()),
            },
            t0,
        );
        m.handle(
            Input::Watched {
                watch: 1,
                events: vec![ClusterEvent::RecordDeleted {
                    host: ME.into(),
                    id: a.id.clone(),
                }],
            },
            t0,
        );
        assert_eq!(
            drain(&mut m),
            vec![Action::Publish {
                lease: 1,
                ops: vec![PubOp::Put(Box::new(a))]
            }]
        );
    }

    #[test]
    fn the_own_host_record_is_restored_when_deleted() {
        let t0 = Instant::now();
        let mut m = settled(t0);
        drain(&mut m);
        m.handle(
            Input::Watched {
                watch: 1,
                events: vec![ClusterEvent::HostDeleted { id: ME.into() }],
            },
            t0,
        );
        assert!(drain(&mut m).contains(&Action::RestoreHost(lease(1))));
    }

    #[test]
    fn events_of_a_replaced_watch_are_ignored() {
        let t0 = Instant::now();
        let mut m = settled(t0);
        drain(&mut m);
        m.handle(
            Input::WatchEnded {
                watch: 1,
                error: "compacted".into(),
            },
            t0,
        );
        m.handle(
            Input::Watched {
                watch: 1,
                events: vec![ClusterEvent::HostDeleted { id: B.into() }],
            },
            t0,
        );
        assert!(m.remote().0.contains_key(B));
    }

    #[test]
    fn kernel_changes_are_debounced_and_resync_is_periodic() {
        let t0 = Instant::now();
        let mut m = settled(t0);
        drain(&mut m);
        m.handle(Input::Reconciled(Reconciled::default()), t0);
        m.handle(Input::KernelChanged, t0);
        m.handle(Input::KernelChanged, t0 + Duration::from_millis(10));
        assert!(drain(&mut m).is_empty());
        assert_eq!(m.poll_timeout(), Some(t0 + KERNEL_DEBOUNCE));
        m.handle_timeout(t0 + KERNEL_DEBOUNCE);
        let acts = drain(&mut m);
        assert_eq!(acts.len(), 1);
        m.handle(
            Input::Reconciled(Reconciled::default()),
            t0 + KERNEL_DEBOUNCE,
        );
        // Keep-alives aside, the next reconcile is the periodic one.
        let t = t0 + KERNEL_DEBOUNCE + Duration::from_secs(10);
        m.handle_timeout(t);
        assert!(
            drain(&mut m)
                .iter()
                .any(|a| matches!(a, Action::Reconcile { .. }))
        );
    }

    #[test]
    fn last_known_state_shows_until_etcd_answers() {
        let t0 = Instant::now();
        let known = (host_record(ME, 1), vec![host_record(B, 2)]);
        let mut m = Membership::new(cfg(), t0, Some(known.clone()));
        drain(&mut m);
        m.handle(Input::ClaimFailed("unreachable".into()), t0);
        m.handle(Input::ListFailed("unreachable".into()), t0);
        assert_eq!(m.summary().last_known, Some(known));
        m.handle(Input::Claimed(lease(1)), t0);
        m.handle(
            Input::Listed(Listing {
                revision: 1,
                ..Listing::default()
            }),
            t0,
        );
        assert_eq!(m.summary().last_known, None);
    }
}
