//! Cluster state in etcd.
//!
//! Layout under one versioned prefix (default [`PREFIX`]):
//!
//! | key                               | value              | bound to lease |
//! |-----------------------------------|--------------------|----------------|
//! | `{prefix}subnets/10.244.3.0-24`   | host id            | yes            |
//! | `{prefix}hosts/{id}`              | [`HostRecord`] JSON | yes           |
//! | `{prefix}reservations/10.244.3.0-24` | host id (last holder) | no       |
//! | `{prefix}containers/{id}/{container}` | [`ContainerRecord`] JSON | yes |
//!
//! A subnet is granted by one transaction that succeeds only if its
//! `subnets/` key does not exist (or still names this host, after a quick
//! restart), so two hosts never get the same subnet. The reservation
//! outlives the lease, so that a host coming back gets its own subnet again
//! and other hosts prefer subnets nobody reserved.
//!
//! A host's container records are bound to the same lease as its subnet,
//! so a dead host's records vanish with it. A host restarted within its
//! lease's life adopts that lease again (its records stay, and it rewrites
//! only what changed meanwhile).
//!
//! Readers get typed values: [`Store::list_cluster`] reads every host and
//! record at one revision (paged, so that 100,000 records fit in gRPC's
//! message limit), and [`Store::watch_cluster`] follows the whole prefix
//! from the next revision as [`ClusterEvent`]s.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions, WatchStream,
};
use ipnet::Ipv4Net;
use tokio::sync::OnceCell;
use tracing::{debug, info};

use crate::access::{self, Credentials, EtcdAccess, EtcdTls};
use crate::error::{Error, Result};
use crate::model::HostRecord;
use crate::plan::pick_subnet;
use crate::records::{ContainerRecord, PubOp, RecordRefusal};

mod acme;
mod networks;
pub use acme::AcmeListing;
pub use networks::{Holders, NetworkListing, NewNetwork};

/// Default key prefix; the version moves when the layout changes.
pub const PREFIX: &str = "/portless/v1/";

/// A subnet held under an etcd lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: i64,
    pub ttl: i64,
    pub record: HostRecord,
}

/// What to ask for.
#[derive(Debug, Clone)]
pub struct Claim {
    pub cluster: Ipv4Net,
    pub subnet_len: u8,
    pub ttl: Duration,
    /// The record to publish; its `subnet` is filled in by [`Store::claim`].
    pub record: HostRecord,
}

/// One etcd connection with the key layout.
#[derive(Clone)]
pub struct Store {
    client: Client,
    prefix: String,
    /// With credentials: signed in once, on first use (see [`Store::sign_in`]).
    auth: Option<Arc<SignIn>>,
    /// With a client certificate: the endpoints and TLS, to ask why a
    /// connection closed (see [`EtcdTls::refusal`]).
    mutual_tls: Option<Arc<(Vec<String>, EtcdTls)>>,
}

struct SignIn {
    credentials: Credentials,
    done: OnceCell<()>,
}

fn subnet_key(net: &Ipv4Net) -> String {
    format!("{}-{}", net.network(), net.prefix_len())
}

fn parse_subnet_key(s: &str) -> Option<Ipv4Net> {
    let (ip, len) = s.rsplit_once('-')?;
    Ipv4Net::new(ip.parse().ok()?, len.parse().ok()?).ok()
}

impl Store {
    /// Connect lazily, over plain http without auth: see
    /// [`Store::connect_with`].
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Store> {
        Self::connect_with(endpoints, prefix, &EtcdAccess::default()).await
    }

    /// Connect lazily: this succeeds while etcd is down, and requests fail
    /// fast (seconds, not minutes) until it is back. With TLS, endpoints are
    /// `https://host:port` or `host:port`.
    ///
    /// With credentials, the first request signs in (etcd-client would do
    /// it inside `connect`, which then fails while etcd is down); after
    /// that etcd-client gets a new token by itself whenever etcd refuses
    /// the current one (it expired, or etcd restarted and forgot it).
    pub async fn connect_with(
        endpoints: &[String],
        prefix: &str,
        access: &EtcdAccess,
    ) -> Result<Store> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            .with_auto_token_refresh(true);
        let client = Client::connect(endpoints, Some(access.apply(opts))).await?;
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let auth = access.credentials.clone().map(|credentials| {
            Arc::new(SignIn {
                credentials,
                done: OnceCell::new(),
            })
        });
        let mutual_tls = access
            .tls
            .clone()
            .filter(EtcdTls::mutual)
            .map(|tls| Arc::new((endpoints.to_vec(), tls)));
        Ok(Store {
            client,
            prefix,
            auth,
            mutual_tls,
        })
    }

    /// A request failed: when a client certificate is in use and etcd
    /// refused it, say so instead of "transport error" or "connection
    /// closed". The alert is in the error when the request read it; when
    /// the connection closed under the request instead, every endpoint is
    /// asked again at once (see [`EtcdTls::refusal`]; about one round trip
    /// each). Not when etcd itself answered: its TLS session was fine.
    async fn explain(&self, e: Error) -> Error {
        let Some(mutual) = &self.mutual_tls else {
            return e;
        };
        let (endpoints, tls) = &**mutual;
        let Error::Etcd(inner) = &e else {
            return e;
        };
        match refused_alert(inner) {
            Refusal::Alert(alert) => {
                return Error::CertificateRefused(access::certificate_refused(
                    &endpoints.join(", "),
                    alert,
                ));
            }
            Refusal::NotTls => return e,
            Refusal::Closed => {}
        }
        let mut probes = tokio::task::JoinSet::new();
        for endpoint in endpoints {
            let (tls, endpoint) = (tls.clone(), endpoint.clone());
            probes.spawn(async move { tls.refusal(&endpoint, Duration::from_secs(2)).await });
        }
        while let Some(done) = probes.join_next().await {
            if let Ok(Some(why)) = done {
                return Error::CertificateRefused(why);
            }
        }
        e
    }

    /// Authenticate with the credentials, once; a no-op without them or
    /// once done. Every method of the store calls it first; callers of
    /// [`Store::client`] call it themselves.
    pub async fn sign_in(&self) -> Result<()> {
        let Some(auth) = &self.auth else {
            return Ok(());
        };
        auth.done
            .get_or_try_init(|| async {
                let mut client = self.client.clone();
                // Sets the credentials in the state every clone of the
                // client shares, so that later refreshes use them too.
                client
                    .update_user(Some(auth.credentials.pair()))
                    .await
                    .map_err(|e| auth_error(&auth.credentials.user, e))
            })
            .await?;
        Ok(())
    }

    /// Get a new token now (after etcd canceled a watch, which the
    /// automatic refresh does not see).
    pub async fn refresh_token(&self) -> Result<()> {
        let Some(auth) = &self.auth else {
            return Ok(());
        };
        if auth.done.get().is_none() {
            return self.sign_in().await;
        }
        self.client
            .refresh_token()
            .await
            .map_err(|e| auth_error(&auth.credentials.user, e))
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, kind: &str, rest: &str) -> String {
        format!("{}{kind}/{rest}", self.prefix)
    }

    /// Grant a lease and take a subnet under it: this host's own subnet if
    /// it still holds it or it is free, else a free one.
    pub async fn claim(&self, claim: &Claim) -> Result<Lease> {
        // The first request of an agent: where a refused client
        // certificate shows.
        match self.claim_once(claim).await {
            Err(e) => Err(self.explain(e).await),
            ok => ok,
        }
    }

    async fn claim_once(&self, claim: &Claim) -> Result<Lease> {
        self.sign_in().await?;
        let mut kv = self.client.kv_client();
        let mut leases = self.client.lease_client();
        let id = claim.record.id.clone();
        let ttl = claim.ttl.as_secs().max(1) as i64;
        // A lease granted here that no transaction used yet.
        let mut granted: Option<i64> = None;
        for attempt in 0..16 {
            let (held, reserved) = self.subnets().await?;
            let mine = held
                .iter()
                .find(|(n, (owner, _, _))| {
                    owner == &id && claim.cluster.contains(*n) && n.prefix_len() == claim.subnet_len
                })
                .map(|(n, v)| (*n, v.clone()));
            // Restarted while the previous run's lease still lives: adopt
            // it, so that the container records bound to it stay and only
            // what changed meanwhile is written again.
            let adopted = match &mine {
                Some((_, (_, _, old))) if *old != 0 => {
                    self.lease_alive(*old, ttl).await?.then_some(*old)
                }
                _ => None,
            };
            let lease_id = match (adopted, granted) {
                (Some(old), _) => old,
                (None, Some(g)) => g,
                (None, None) => {
                    let g = leases.grant(ttl, None).await?.id();
                    granted = Some(g);
                    g
                }
            };
            let (subnet, guard) = match mine {
                // Still ours from before a restart: take it over if nobody
                // touched it since we looked.
                Some((n, (_, rev, _))) => (
                    n,
                    vec![Compare::mod_revision(
                        self.key("subnets", &subnet_key(&n)),
                        CompareOp::Equal,
                        rev,
                    )],
                ),
                None => {
                    let taken: BTreeSet<Ipv4Net> = held.keys().copied().collect();
                    let n = pick_subnet(claim.cluster, claim.subnet_len, &id, &taken, &reserved)
                        .ok_or_else(|| {
                            Error::Store(format!(
                                "no free /{} left in {}",
                                claim.subnet_len, claim.cluster
                            ))
                        })?;
                    (
                        n,
                        vec![Compare::create_revision(
                            self.key("subnets", &subnet_key(&n)),
                            CompareOp::Equal,
                            0,
                        )],
                    )
                }
            };
            let mut record = claim.record.clone();
            record.subnet = subnet;
            let json = serde_json::to_string(&record)
                .map_err(|e| Error::Store(format!("encoding host record: {e}")))?;
            let on_lease = Some(PutOptions::new().with_lease(lease_id));
            let txn = Txn::new().when(guard).and_then(vec![
                TxnOp::put(
                    self.key("subnets", &subnet_key(&subnet)),
                    id.clone(),
                    on_lease.clone(),
                ),
                TxnOp::put(self.key("hosts", &id), json, on_lease),
                TxnOp::put(
                    self.key("reservations", &subnet_key(&subnet)),
                    id.clone(),
                    None,
                ),
            ]);
            if kv.txn(txn).await?.succeeded() {
                if let Some((_, (_, _, old))) = mine
                    && old != 0
                    && old != lease_id
                {
                    // The previous run's lease holds nothing any more.
                    let _ = leases.revoke(old).await;
                }
                if adopted.is_some() {
                    if let Some(g) = granted {
                        let _ = leases.revoke(g).await;
                    }
                    info!(host = %id, subnet = %subnet, lease = lease_id, "subnet and the previous run's lease adopted");
                } else {
                    info!(host = %id, subnet = %subnet, lease = lease_id, "subnet leased");
                }
                return Ok(Lease {
                    id: lease_id,
                    ttl,
                    record,
                });
            }
            debug!(host = %id, subnet = %subnet, attempt, "subnet taken meanwhile; retrying");
        }
        if let Some(g) = granted {
            let _ = leases.revoke(g).await;
        }
        Err(Error::Store(
            "could not win a subnet after 16 attempts".into(),
        ))
    }

    /// Whether lease `id` still lives and was granted with `ttl` (a lease
    /// of another TTL is not adopted: the configuration changed).
    async fn lease_alive(&self, id: i64, ttl: i64) -> Result<bool> {
        let mut leases = self.client.lease_client();
        match leases.time_to_live(id, None).await {
            Ok(r) => Ok(r.ttl() > 0 && r.granted_ttl() == ttl),
            // etcd answers an unknown lease with an error on some versions.
            Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::NotFound => {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Live subnets (owner, mod revision, lease) and reservations.
    #[allow(clippy::type_complexity)]
    async fn subnets(
        &self,
    ) -> Result<(
        BTreeMap<Ipv4Net, (String, i64, i64)>,
        BTreeMap<Ipv4Net, String>,
    )> {
        let mut kv = self.client.kv_client();
        let mut held = BTreeMap::new();
        let prefix = self.key("subnets", "");
        let resp = kv
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        for item in resp.kvs() {
            let Ok(k) = item.key_str() else { continue };
            let Some(net) = k.strip_prefix(&prefix).and_then(parse_subnet_key) else {
                continue;
            };
            let owner = item.value_str().unwrap_or_default().to_owned();
            held.insert(net, (owner, item.mod_revision(), item.lease()));
        }
        let mut reserved = BTreeMap::new();
        let prefix = self.key("reservations", "");
        let resp = kv
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        for item in resp.kvs() {
            let Ok(k) = item.key_str() else { continue };
            if let Some(net) = k.strip_prefix(&prefix).and_then(parse_subnet_key) {
                reserved.insert(net, item.value_str().unwrap_or_default().to_owned());
            }
        }
        Ok((held, reserved))
    }

    /// Refresh a lease once; the remaining TTL, 0 or less once it expired.
    pub async fn keep_alive(&self, lease_id: i64) -> Result<i64> {
        // Where a certificate that expired while running shows.
        match self.keep_alive_once(lease_id).await {
            Err(e) => Err(self.explain(e).await),
            ok => ok,
        }
    }

    async fn keep_alive_once(&self, lease_id: i64) -> Result<i64> {
        self.sign_in().await?;
        let mut leases = self.client.lease_client();
        let once = async {
            let (mut keeper, mut stream) = leases.keep_alive(lease_id).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        let once = tokio::time::timeout(Duration::from_secs(3), once);
        let Ok(result) = once.await else {
            return Err(Error::Store("keep-alive timed out".into()));
        };
        match result {
            Ok(Some(resp)) => Ok(resp.ttl()),
            Ok(None) => Err(Error::Store("keep-alive stream closed".into())),
            // etcd answered: the lease is gone.
            Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Put this host's keys back under its live lease after someone deleted
    /// or changed them (by hand, a restore). Refuses, returning false, when
    /// the subnet now belongs to another host.
    pub async fn republish(&self, lease: &Lease) -> Result<bool> {
        self.sign_in().await?;
        let mut kv = self.client.kv_client();
        let id = lease.record.id.clone();
        let sk = self.key("subnets", &subnet_key(&lease.record.subnet));
        let hk = self.key("hosts", &id);
        let json = serde_json::to_string(&lease.record)
            .map_err(|e| Error::Store(format!("encoding host record: {e}")))?;
        let on_lease = Some(PutOptions::new().with_lease(lease.id));
        let puts = vec![
            TxnOp::put(sk.clone(), id.clone(), on_lease.clone()),
            TxnOp::put(hk, json, on_lease),
        ];
        let ours = Txn::new()
            .when(vec![Compare::value(
                sk.clone(),
                CompareOp::Equal,
                id.clone(),
            )])
            .and_then(puts.clone());
        if kv.txn(ours).await?.succeeded() {
            return Ok(true);
        }
        let free = Txn::new()
            .when(vec![Compare::create_revision(sk, CompareOp::Equal, 0)])
            .and_then(puts);
        Ok(kv.txn(free).await?.succeeded())
    }

    /// Give a lease back: its subnet and record vanish at once.
    pub async fn release(&self, lease_id: i64) -> Result<()> {
        self.sign_in().await?;
        self.client.lease_client().revoke(lease_id).await?;
        Ok(())
    }

    /// Every live host record, and the revision they were read at.
    pub async fn hosts(&self) -> Result<(BTreeMap<String, HostRecord>, i64)> {
        self.sign_in().await?;
        let mut kv = self.client.kv_client();
        let prefix = self.key("hosts", "");
        let resp = kv
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut out = BTreeMap::new();
        for item in resp.kvs() {
            if let Some(r) = decode_host(item.value()) {
                out.insert(r.id.clone(), r);
            }
        }
        Ok((out, rev))
    }

    /// Watch host records from `revision` on.
    pub async fn watch_hosts(&self, revision: i64) -> Result<WatchStream> {
        self.sign_in().await?;
        let mut w = self.client.watch_client();
        Ok(w.watch(
            self.key("hosts", ""),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision)
                    .with_prev_key()
                    .with_progress_notify(),
            ),
        )
        .await?)
    }

    /// The host id of a `hosts/` key.
    pub fn host_id_of_key<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(&self.key("hosts", ""))
    }

    /// The key of one container record.
    pub fn record_key(&self, host: &str, container: &str) -> String {
        self.key("containers", &format!("{host}/{container}"))
    }

    /// The key of a host's own record (`hosts/{id}`).
    pub fn host_key(&self, host: &str) -> String {
        self.key("hosts", host)
    }

    /// Every live host and container record, read at one revision (paged:
    /// a large cluster does not fit in one gRPC message).
    pub async fn list_cluster(&self) -> Result<Listing> {
        self.sign_in().await?;
        let mut kv = self.client.kv_client();
        let mut revision = 0i64;
        let mut out = Listing::default();
        for kind in ["hosts", "containers"] {
            let prefix = self.key(kind, "");
            let end = prefix_end(&prefix);
            let mut from = prefix.clone().into_bytes();
            loop {
                let mut opts = GetOptions::new()
                    .with_range(end.clone())
                    .with_limit(LIST_PAGE);
                if revision != 0 {
                    opts = opts.with_revision(revision);
                }
                let resp = kv.get(from.clone(), Some(opts)).await?;
                if revision == 0 {
                    revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                }
                for item in resp.kvs() {
                    let Ok(key) = item.key_str() else { continue };
                    match self.parse_key(key) {
                        Some(Key::Host(id)) => {
                            if let Some(record) = decode_host(item.value()) {
                                out.hosts.insert(
                                    id.to_owned(),
                                    LiveHost {
                                        record,
                                        lease: item.lease(),
                                    },
                                );
                            }
                        }
                        Some(Key::Record(host, id)) => out.records.push(RawRecord {
                            host: host.to_owned(),
                            id: id.to_owned(),
                            lease: item.lease(),
                            record: ContainerRecord::decode(item.value()).map(Arc::new),
                        }),
                        None => {}
                    }
                }
                match (resp.more(), resp.kvs().last()) {
                    (true, Some(last)) => {
                        from = last.key().to_vec();
                        from.push(0);
                    }
                    _ => break,
                }
            }
        }
        out.revision = revision;
        Ok(out)
    }

    /// Follow every host and container record from `revision` on.
    pub async fn watch_cluster(&self, revision: i64) -> Result<ClusterWatch> {
        self.sign_in().await?;
        // A burst (a host with many containers expiring) can be one large
        // response.
        let mut w = self
            .client
            .watch_client()
            .max_decoding_message_size(64 << 20);
        let stream = w
            .watch(
                self.prefix.clone(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision)
                        .with_progress_notify(),
                ),
            )
            .await?;
        Ok(ClusterWatch {
            store: self.clone(),
            stream,
        })
    }

    /// Apply this host's record writes under `lease`, in transactions of
    /// at most [`TXN_OPS`] operations (etcd's default limit is 128). An
    /// expired lease is [`Error::LeaseGone`].
    pub async fn publish(&self, host: &str, lease: i64, ops: &[PubOp]) -> Result<()> {
        self.sign_in().await?;
        let mut kv = self.client.kv_client();
        for chunk in ops.chunks(TXN_OPS) {
            let txn_ops: Vec<TxnOp> = chunk
                .iter()
                .map(|op| match op {
                    PubOp::Put(r) => TxnOp::put(
                        self.record_key(host, &r.id),
                        r.encode(),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    PubOp::Delete(id) => TxnOp::delete(self.record_key(host, id), None),
                })
                .collect();
            match kv.txn(Txn::new().and_then(txn_ops)).await {
                Ok(_) => {}
                Err(etcd_client::Error::GRpcStatus(s))
                    if s.message().contains("requested lease not found") =>
                {
                    return Err(Error::LeaseGone(lease));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn parse_key<'k>(&self, key: &'k str) -> Option<Key<'k>> {
        let rest = key.strip_prefix(self.prefix.as_str())?;
        if let Some(id) = rest.strip_prefix("hosts/") {
            return (!id.is_empty()).then_some(Key::Host(id));
        }
        let rest = rest.strip_prefix("containers/")?;
        // Container ids never hold a '/'; a host id might.
        let (host, id) = rest.rsplit_once('/')?;
        (!host.is_empty() && !id.is_empty()).then_some(Key::Record(host, id))
    }

    /// The raw client, for tests and tools; with credentials, call
    /// [`Store::sign_in`] first.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// Keys per page of a listing.
const LIST_PAGE: i64 = 2000;
/// Operations per transaction (etcd's `--max-txn-ops` defaults to 128).
pub const TXN_OPS: usize = 100;

/// The smallest key after every key with this prefix.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

enum Key<'k> {
    Host(&'k str),
    Record(&'k str, &'k str),
}

/// A host's record and the lease its key is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveHost {
    pub record: HostRecord,
    pub lease: i64,
}

/// A container record as read from etcd, not yet checked
/// ([`crate::records::check`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    /// The host and container of its key.
    pub host: String,
    pub id: String,
    pub lease: i64,
    /// Shared with the checked view, so that a record is held once.
    pub record: std::result::Result<Arc<ContainerRecord>, RecordRefusal>,
}

/// Every host and record at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub hosts: BTreeMap<String, LiveHost>,
    pub records: Vec<RawRecord>,
    pub revision: i64,
}

/// One change under the prefix, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// A host record written (None: malformed, treated as absent).
    HostPut {
        id: String,
        host: Option<LiveHost>,
    },
    HostDeleted {
        id: String,
    },
    RecordPut(RawRecord),
    RecordDeleted {
        host: String,
        id: String,
    },
}

/// A running watch of the whole prefix.
pub struct ClusterWatch {
    store: Store,
    stream: WatchStream,
}

impl ClusterWatch {
    /// The next batch of changes (empty for a progress notification);
    /// None when the stream ended. A canceled watch (compaction, a refused
    /// token) is an error: list again.
    pub async fn next(&mut self) -> Result<Option<Vec<ClusterEvent>>> {
        let Some(resp) = self.stream.message().await? else {
            return Ok(None);
        };
        if resp.canceled() {
            let reason = resp.cancel_reason().to_owned();
            // etcd checks a watch's token when it creates the watch and
            // refuses by canceling it, not by failing the request, so
            // etcd-client's own refresh (on failed requests) misses a
            // stale token here. Other cancels (compaction) need none.
            if cancel_needs_new_token(&reason) {
                self.store.refresh_token().await?;
            }
            return Err(Error::Store(format!("watch canceled: {reason}")));
        }
        let mut out = Vec::with_capacity(resp.events().len());
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let Ok(key) = kv.key_str() else { continue };
            let put = ev.event_type() == EventType::Put;
            match self.store.parse_key(key) {
                Some(Key::Host(id)) if put => out.push(ClusterEvent::HostPut {
                    id: id.to_owned(),
                    host: decode_host(kv.value()).map(|record| LiveHost {
                        record,
                        lease: kv.lease(),
                    }),
                }),
                Some(Key::Host(id)) => out.push(ClusterEvent::HostDeleted { id: id.to_owned() }),
                Some(Key::Record(host, id)) if put => {
                    out.push(ClusterEvent::RecordPut(RawRecord {
                        host: host.to_owned(),
                        id: id.to_owned(),
                        lease: kv.lease(),
                        record: ContainerRecord::decode(kv.value()).map(Arc::new),
                    }))
                }
                Some(Key::Record(host, id)) => out.push(ClusterEvent::RecordDeleted {
                    host: host.to_owned(),
                    id: id.to_owned(),
                }),
                None => {}
            }
        }
        Ok(Some(out))
    }
}

/// Whether etcd canceled a watch for its token (expired, or forgotten by a
/// restarted etcd): it then says "permission denied" or "invalid auth
/// token", not "required revision has been compacted".
pub fn cancel_needs_new_token(reason: &str) -> bool {
    reason.contains("permission denied") || reason.contains("invalid auth token")
}

/// What an etcd-client error says about a refused client certificate.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// The server's alert refusing it is in the error.
    Alert(rustls::AlertDescription),
    /// The connection closed or failed under the request: maybe.
    Closed,
    /// etcd answered, or the error is not about the connection.
    NotTls,
}

fn refused_alert(e: &etcd_client::Error) -> Refusal {
    let alert = match e {
        etcd_client::Error::GRpcStatus(s) => access::alert_in(s),
        etcd_client::Error::TransportError(t) => access::alert_in(t),
        etcd_client::Error::IoError(io) => access::alert_in(io),
        _ => None,
    };
    if let Some(a) = alert.filter(|a| access::refuses_certificate(*a)) {
        return Refusal::Alert(a);
    }
    match e {
        etcd_client::Error::GRpcStatus(s) if s.message().starts_with("etcdserver:") => {
            Refusal::NotTls
        }
        etcd_client::Error::GRpcStatus(s) => match s.code() {
            tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown => {
                Refusal::Closed
            }
            _ => Refusal::NotTls,
        },
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => Refusal::Closed,
        _ => Refusal::NotTls,
    }
}

/// A refusal by etcd to sign in is [`Error::Auth`]; anything else (etcd
/// unreachable, or busy: "leader changed", "too many requests") stays what
/// it was. By gRPC code, not by message: every etcd message starts with
/// "etcdserver:". etcd answers a wrong user or password with
/// InvalidArgument, sign-in with auth off with FailedPrecondition, and a
/// bad token with Unauthenticated.
fn auth_error(user: &str, e: etcd_client::Error) -> Error {
    match e {
        etcd_client::Error::GRpcStatus(s) if refuses_sign_in(s.code()) => Error::Auth {
            user: user.to_owned(),
            reason: s.message().to_owned(),
        },
        e => e.into(),
    }
}

fn refuses_sign_in(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition
            | tonic::Code::Unauthenticated
    )
}

/// A host record from its JSON; None (and ignored) when malformed, so that
/// one bad key cannot stop a cluster.
pub fn decode_host(bytes: &[u8]) -> Option<HostRecord> {
    match serde_json::from_slice(bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring malformed host record");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// etcd-client's errors as a refused certificate reaches them: the
    /// alert inside an I/O error inside tonic's status.
    #[test]
    fn a_refused_certificate_is_read_from_etcd_client_errors() {
        let alert = || {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate),
            )
        };
        let status = tonic::Status::from_error(Box::new(alert()));
        assert_eq!(
            refused_alert(&etcd_client::Error::GRpcStatus(status)),
            Refusal::Alert(rustls::AlertDescription::BadCertificate)
        );
        assert_eq!(
            refused_alert(&etcd_client::Error::IoError(alert())),
            Refusal::Alert(rustls::AlertDescription::BadCertificate)
        );
        // A connection closed under the request: worth asking.
        let closed = tonic::Status::cancelled("operation was canceled");
        assert_eq!(
            refused_alert(&etcd_client::Error::GRpcStatus(closed)),
            Refusal::Closed
        );
        // etcd itself answered: its TLS session was fine.
        let busy = tonic::Status::unavailable("etcdserver: leader changed");
        assert_eq!(
            refused_alert(&etcd_client::Error::GRpcStatus(busy)),
            Refusal::NotTls
        );
        let denied = tonic::Status::permission_denied("etcdserver: permission denied");
        assert_eq!(
            refused_alert(&etcd_client::Error::GRpcStatus(denied)),
            Refusal::NotTls
        );
        // Another alert (our own handshake failure, say) is not a refusal.
        let other = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
        );
        assert_eq!(
            refused_alert(&etcd_client::Error::IoError(other)),
            Refusal::Closed
        );
    }

    #[test]
    fn subnet_keys_round_trip() {
        let n: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        assert_eq!(subnet_key(&n), "10.244.3.0-24");
        assert_eq!(parse_subnet_key("10.244.3.0-24"), Some(n));
        assert_eq!(parse_subnet_key("10.244.3.0/24"), None);
        assert_eq!(parse_subnet_key("garbage"), None);
    }

    #[test]
    fn only_a_refusal_to_sign_in_is_an_auth_error() {
        let status = |code, msg| etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg));
        for (code, msg) in [
            (
                tonic::Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
            ),
            (
                tonic::Code::FailedPrecondition,
                "etcdserver: authentication is not enabled",
            ),
            (
                tonic::Code::Unauthenticated,
                "etcdserver: invalid auth token",
            ),
        ] {
            let e = auth_error("portless", status(code, msg));
            assert!(
                matches!(&e, Error::Auth { user, .. } if user == "portless"),
                "{e}"
            );
        }
        for (code, msg) in [
            (tonic::Code::Unavailable, "etcdserver: leader changed"),
            (
                tonic::Code::ResourceExhausted,
                "etcdserver: too many requests",
            ),
            (
                tonic::Code::DeadlineExceeded,
                "etcdserver: request timed out",
            ),
        ] {
            let e = auth_error("portless", status(code, msg));
            assert!(!matches!(e, Error::Auth { .. }), "{e}");
            assert!(e.to_string().contains(msg), "{e}");
        }
    }
}
