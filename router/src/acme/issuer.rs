//! The issuer: one task that follows the route table's exact hosts, orders
//! a certificate for each that has none (or whose renewal is due), answers
//! the challenges through [`AcmeState`], stores and installs what it gets,
//! and retries failures with backoff. Orders run one at a time: a host
//! with many names never bursts the server.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, Identifier, NewAccount, NewOrder,
    OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, CustomExtension, DistinguishedName, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tracing::{info, warn};

use super::client::AcmeHttp;
use super::cluster::{Coordinator, SharedAnswer, SharedCert};
use super::schedule::{renew_at, retry_delay};
use super::state::{AcmeState, CertPhase, CertStatus};
use super::store::{Store, StoredCert, cert_pem};
use super::{AcmeError, AcmeOptions, ChallengeKind};
use crate::tls::CertResolver;

/// TXT records to serve, by name (no trailing dot): the DNS-01 answers.
pub type TxtRecords = Arc<BTreeMap<String, Vec<String>>>;

/// The longest one order may take, start to end.
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);

/// How often the wanted names are looked at again even without a change
/// of routes (a `--cert-dir` file may have come to cover one).
const RECHECK: Duration = Duration::from_secs(30);

/// In a cluster: the wait between publishing a challenge answer and
/// telling the server to look, for the other hosts to take it up (they
/// follow the coordinator's changes within milliseconds when idle).
const CLUSTER_SETTLE: Duration = Duration::from_secs(1);

/// The ACME task's state. Build with [`Issuer::new`] (loads what is
/// stored, so a restart serves at once), then [`Issuer::run`].
pub struct Issuer {
    opts: AcmeOptions,
    state: Arc<AcmeState>,
    resolver: Arc<CertResolver>,
    store: Store,
    http: AcmeHttp,
    account: Option<Account>,
    /// Certificates served, by host.
    held: HashMap<String, StoredCert>,
    /// Where DNS-01 answers are published, when someone serves them.
    txt: Option<watch::Sender<TxtRecords>>,
    /// The failing state of hosts whose route went away: a route that
    /// comes back (a crash-looping container) resumes its backoff instead
    /// of ordering at once.
    gone: HashMap<String, CertStatus>,
    /// In a cluster: the other hosts' issuers, and the certificates they
    /// obtained.
    cluster: Option<Cluster>,
}

struct Cluster {
    coord: Arc<dyn Coordinator>,
    incoming: tokio::sync::mpsc::Receiver<SharedCert>,
    /// Issued here and not yet shared (the coordinator was away).
    unshared: BTreeMap<String, String>,
}

impl Issuer {
    /// Open the store, load the stored certificates into `state`, and
    /// prepare the transport. Fails on an unusable `--acme-dir` or
    /// `--acme-ca`.
    pub fn new(
        opts: AcmeOptions,
        state: Arc<AcmeState>,
        resolver: Arc<CertResolver>,
    ) -> Result<Self, AcmeError> {
        let store = Store::open(&opts.dir, &opts.directory)?;
        let http = AcmeHttp::new(opts.ca_file.as_deref())?;
        let (certs, problems) = store.load_certs();
        for p in problems {
            warn!(error = %p, "stored certificate unusable; it will be ordered again");
        }
        let mut held = HashMap::new();
        for (host, cert) in certs {
            state.put_certificate(&host, cert.key.clone());
            held.insert(host, cert);
        }
        if !held.is_empty() {
            info!(certificates = held.len(), "stored ACME certificates loaded");
        }
        Ok(Issuer {
            opts,
            state,
            resolver,
            store,
            http,
            account: None,
            held,
            txt: None,
            gone: HashMap::new(),
            cluster: None,
        })
    }

    /// Answer DNS-01 (wildcard hosts inside `opts.dns01_zones`) by
    /// publishing `_acme-challenge` TXT records on `txt`, whose receiver
    /// serves them (the binary feeds them into its DNS zone).
    pub fn with_dns01(mut self, txt: watch::Sender<TxtRecords>) -> Self {
        self.txt = Some(txt);
        self
    }

    /// Order in a cluster: one host per name orders (`coord.claim`), its
    /// challenge answers and certificate are shared through `coord`, and
    /// the certificates other hosts obtained arrive on `incoming` to be
    /// stored and served here. TLS-ALPN-01 is not used (see
    /// [`super::cluster`]).
    pub fn with_cluster(
        mut self,
        coord: Arc<dyn Coordinator>,
        incoming: tokio::sync::mpsc::Receiver<SharedCert>,
    ) -> Self {
        self.opts
            .challenges
            .retain(|c| *c != ChallengeKind::TlsAlpn01);
        if self.opts.challenges.is_empty() {
            self.opts.challenges.push(ChallengeKind::Http01);
        }
        self.cluster = Some(Cluster {
            coord,
            incoming,
            unshared: BTreeMap::new(),
        });
        self
    }

    /// Whether `host` is to be ordered: an exact name not covered by a
    /// `--cert-dir` file, or a wildcard inside a DNS-01 zone when TXT
    /// records are served.
    fn wanted(&self, host: &str) -> bool {
        if self.resolver.dir_covers(host) {
            return false;
        }
        match host.strip_prefix("*.") {
            None => true,
            Some(suffix) => {
                self.txt.is_some()
                    && self.opts.dns01_zones.iter().any(|z| {
                        suffix == z
                            || suffix
                                .strip_suffix(z.as_str())
                                .is_some_and(|r| r.ends_with('.'))
                    })
            }
        }
    }

    /// Follow `hosts` (the route table's hosts, wildcards as `*.suffix`)
    /// until the sender is gone.
    pub async fn run(mut self, mut hosts: watch::Receiver<Arc<BTreeSet<String>>>) {
        loop {
            let wanted: BTreeSet<String> = hosts
                .borrow_and_update()
                .iter()
                .filter(|h| self.wanted(h))
                .cloned()
                .collect();
            let now = SystemTime::now();
            self.sync_status(&wanted, now);
            let due = self.state.with_status(|st| {
                st.values()
                    .filter(|s| s.next_attempt.is_some_and(|t| t <= now))
                    .min_by_key(|s| s.next_attempt)
                    .map(|s| s.host.clone())
            });
            if let Some(host) = due {
                self.attempt(&host).await;
                continue;
            }
            let next = self
                .state
                .with_status(|st| st.values().filter_map(|s| s.next_attempt).min());
            let wait = next
                .and_then(|t| t.duration_since(now).ok())
                .unwrap_or(RECHECK)
                .min(RECHECK);
            self.share_pending().await;
            let incoming = async {
                match &mut self.cluster {
                    Some(c) => c.incoming.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = hosts.changed() => if changed.is_err() { return },
                Some(cert) = incoming => self.install_shared(cert, &wanted),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Status entries for exactly the wanted hosts; the pending set.
    fn sync_status(&mut self, wanted: &BTreeSet<String>, now: SystemTime) {
        let gone = &mut self.gone;
        // Backoffs that ran out need no keeping.
        gone.retain(|_, s| s.next_attempt.is_some_and(|t| t > now));
        self.state.with_status(|st| {
            st.retain(|h, s| {
                let keep = wanted.contains(h);
                if !keep && s.failures > 0 {
                    gone.insert(h.clone(), s.clone());
                }
                keep
            });
            for h in wanted {
                st.entry(h.clone()).or_insert_with(|| {
                    if let Some(s) = gone.remove(h) {
                        return s;
                    }
                    let mut s = CertStatus::new(h);
                    match self.held.get(h) {
                        Some(c) if c.not_after > now => {
                            s.phase = CertPhase::Valid;
                            s.not_after = Some(c.not_after);
                            s.next_attempt = Some(renew_at(c.not_before, c.not_after));
                        }
                        _ => s.next_attempt = Some(now),
                    }
                    s
                });
            }
        });
        let pending: HashSet<String> = wanted
            .iter()
            .filter(|h| self.held.get(*h).is_none_or(|c| c.not_after <= now))
            .cloned()
            .collect();
        self.state.set_pending(pending);
    }

    /// Share what was issued here while the coordinator was away.
    async fn share_pending(&mut self) {
        let Some(c) = &mut self.cluster else { return };
        let pending = std::mem::take(&mut c.unshared);
        for (host, pem) in pending {
            if let Err(e) = c.coord.share(&host, &pem).await {
                warn!(%host, error = %e, "cannot share the certificate with the cluster yet");
                c.unshared.insert(host, pem);
            }
        }
    }

    /// A certificate another host of the cluster obtained: kept and served
    /// when it is newer than the one held.
    fn install_shared(&mut self, cert: SharedCert, wanted: &BTreeSet<String>) {
        let SharedCert { host, pem } = cert;
        if self.resolver.dir_covers(&host) {
            return;
        }
        let parsed = match super::store::parse(&self.store.cert_path(&host), pem.as_bytes()) {
            Ok(c) => c,
            Err(e) => {
                warn!(%host, error = %e, "a certificate from the cluster is unusable");
                return;
            }
        };
        if self
            .held
            .get(&host)
            .is_some_and(|h| h.not_after >= parsed.not_after)
        {
            return;
        }
        let cert = match self.store.write_pem(&host, &pem) {
            Ok(c) => c,
            Err(e) => {
                warn!(%host, error = %e, "cannot keep a certificate from the cluster; serving it anyway");
                parsed
            }
        };
        info!(%host, not_after = ?cert.not_after, "certificate from another host of the cluster");
        self.serve(&host, cert);
        self.sync_status(wanted, SystemTime::now());
    }

    /// Serve `cert` for `host` from now on, and mark it valid until its
    /// renewal is due.
    fn serve(&mut self, host: &str, cert: StoredCert) {
        self.state.put_certificate(host, cert.key.clone());
        self.state.with_status(|st| {
            if let Some(s) = st.get_mut(host) {
                s.phase = CertPhase::Valid;
                s.not_after = Some(cert.not_after);
                s.next_attempt = Some(renew_at(cert.not_before, cert.not_after));
                s.last_error = None;
                s.failures = 0;
            }
        });
        self.held.insert(host.to_owned(), cert);
    }

    /// Mark `host` failed with `e`, and when to try again: backing off with
    /// its failures in a row, never before `retry_after`.
    fn fail(&mut self, host: &str, e: &AcmeError, retry_after: Option<SystemTime>, what: &str) {
        let now = SystemTime::now();
        let failures = self
            .state
            .with_status(|st| st.get(host).map_or(0, |s| s.failures))
            + 1;
        let delay = retry_delay(
            failures,
            self.opts.retry_base,
            self.opts.retry_max,
            retry_after,
            now,
        );
        warn!(%host, error = %e, failures, retry_in = ?delay, "{what}");
        self.state.with_status(|st| {
            if let Some(s) = st.get_mut(host) {
                s.phase = CertPhase::Failed;
                s.last_error = Some(e.to_string());
                s.failures = failures;
                s.next_attempt = Some(now + delay);
            }
        });
    }

    /// In a cluster: may this host order `host` now? Another host that
    /// holds the name orders it; this one looks again later.
    async fn may_order(&mut self, host: &str) -> Result<bool, AcmeError> {
        let Some(c) = &self.cluster else {
            return Ok(true);
        };
        let mine = c
            .coord
            .claim(host)
            .await
            .map_err(|e| AcmeError::Order(format!("cluster: {e}")))?;
        if !mine {
            let later = SystemTime::now() + RECHECK;
            self.state.with_status(|st| {
                if let Some(s) = st.get_mut(host) {
                    // Renewal or first order: the holder's result arrives
                    // on `incoming`; until then ask again now and then.
                    s.next_attempt = Some(later);
                }
            });
            tracing::debug!(%host, "another host of the cluster orders this certificate");
        }
        Ok(mine)
    }

    async fn attempt(&mut self, host: &str) {
        match self.may_order(host).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                self.fail(
                    host,
                    &e,
                    None,
                    "cannot coordinate the order with the cluster",
                );
                return;
            }
        }
        self.state.with_status(|st| {
            if let Some(s) = st.get_mut(host) {
                s.orders += 1;
            }
        });
        // A server that stops answering mid-order must not stall every
        // other host's certificate.
        let result = match tokio::time::timeout(ORDER_TIMEOUT, self.order(host)).await {
            Ok(r) => r,
            Err(_) => Err(AcmeError::Order(format!(
                "no result within {}s",
                ORDER_TIMEOUT.as_secs()
            ))),
        };
        match result {
            Ok((cert, pem)) => {
                self.state.count_order(true);
                info!(%host, not_after = ?cert.not_after, "certificate issued");
                if let Some(c) = &mut self.cluster {
                    c.unshared.insert(host.to_owned(), pem);
                }
                self.serve(host, cert);
            }
            Err(e) => {
                self.state.count_order(false);
                let retry_after = self.http.take_retry_after();
                self.fail(host, &e, retry_after, "certificate order failed");
            }
        }
    }

    async fn account(&mut self) -> Result<Account, AcmeError> {
        if let Some(a) = &self.account {
            return Ok(a.clone());
        }
        let builder = || Account::builder_with_http(Box::new(self.http.clone()));
        let account = match self.store.read_account()? {
            Some(bytes) => {
                let creds: AccountCredentials = serde_json::from_slice(&bytes).map_err(|e| {
                    AcmeError::Certificate(self.store.account_path(), e.to_string())
                })?;
                builder().from_credentials(creds).await?
            }
            None => {
                let contact = self.opts.email.as_ref().map(|e| format!("mailto:{e}"));
                let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
                let (account, creds) = builder()
                    .create(
                        &NewAccount {
                            contact: &contacts,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.opts.directory.clone(),
                        None,
                    )
                    .await?;
                let bytes = serde_json::to_vec(&creds)
                    .map_err(|e| AcmeError::Acme(format!("account credentials: {e}")))?;
                self.store.write_account(&bytes)?;
                info!(directory = %self.opts.directory, "ACME account created");
                account
            }
        };
        self.account = Some(account.clone());
        Ok(account)
    }

    /// One order for `host`, start to end.
    async fn order(&mut self, host: &str) -> Result<(StoredCert, String), AcmeError> {
        let account = self.account().await?;
        let ids = [Identifier::Dns(host.to_owned())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await?;
        // Challenge answers are withdrawn however the order ends.
        let mut answers = Answers {
            state: self.state.clone(),
            tokens: Vec::new(),
            alpn: Vec::new(),
            txt: self.txt.clone().map(|tx| (tx, Vec::new())),
            shared: self.cluster.as_ref().map(|c| (c.coord.clone(), Vec::new())),
        };
        let wildcard = host.starts_with("*.");
        {
            let mut authzs = order.authorizations();
            while let Some(a) = authzs.next().await {
                let mut a = a?;
                match a.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    s => return Err(AcmeError::Order(format!("authorization is {s:?}"))),
                }
                let offered: Vec<_> = a.challenges.iter().map(|c| c.r#type.clone()).collect();
                // A wildcard can only be proven by DNS-01.
                let dns01 = [ChallengeKind::Dns01];
                let preference: &[ChallengeKind] = if wildcard {
                    &dns01
                } else {
                    &self.opts.challenges
                };
                let Some(kind) = preference
                    .iter()
                    .copied()
                    .find(|k| offered.contains(&k.acme_type()))
                else {
                    return Err(AcmeError::Order(format!(
                        "the server offers {offered:?}, none of the challenges configured"
                    )));
                };
                let base = match a.identifier().identifier {
                    Identifier::Dns(name) => name.clone(),
                    other => format!("{other:?}"),
                };
                let mut ch = a
                    .challenge(kind.acme_type())
                    .ok_or_else(|| AcmeError::Order("challenge vanished".into()))?;
                let ka = ch.key_authorization();
                match kind {
                    ChallengeKind::Http01 => {
                        self.state.put_token(&ch.token, host, ka.as_str());
                        answers.tokens.push(ch.token.clone());
                        answers
                            .share(SharedAnswer::Http01 {
                                token: ch.token.clone(),
                                host: host.to_owned(),
                                key_authorization: ka.as_str().to_owned(),
                            })
                            .await?;
                    }
                    ChallengeKind::TlsAlpn01 => {
                        let cert = alpn_certificate(host, ka.digest().as_ref())?;
                        self.state.put_alpn(host, Some(cert));
                        answers.alpn.push(host.to_owned());
                    }
                    ChallengeKind::Dns01 => {
                        let name = format!("_acme-challenge.{base}");
                        answers
                            .share(SharedAnswer::Dns01 {
                                name: name.clone(),
                                value: ka.dns_value(),
                            })
                            .await?;
                        answers.publish(name, ka.dns_value());
                        tokio::time::sleep(self.opts.dns01_settle).await;
                    }
                }
                if self.cluster.is_some() {
                    // The server may ask any host: give the others time to
                    // take the answer from the coordinator first.
                    tokio::time::sleep(CLUSTER_SETTLE).await;
                }
                info!(%host, challenge = kind.as_str(), "answering ACME challenge");
                ch.set_ready().await?;
            }
        }
        let polled = order
            .poll_ready(&RetryPolicy::new().timeout(Duration::from_secs(90)))
            .await;
        let ready = matches!(polled, Ok(OrderStatus::Ready));
        if !ready {
            let mut why = match polled {
                Ok(s) => format!("order is {s:?}"),
                Err(e) => e.to_string(),
            };
            // The problem documents are on the challenges.
            let mut authzs = order.authorizations();
            while let Some(Ok(mut a)) = authzs.next().await {
                if let Ok(state) = a.refresh().await {
                    for c in state.challenges.iter().filter(|c| c.error.is_some()) {
                        if let Some(p) = &c.error {
                            why.push_str(&format!(
                                "; {}: {}",
                                serde_json_type(&c.r#type),
                                problem_text(p)
                            ));
                        }
                    }
                }
            }
            return Err(AcmeError::Order(why));
        }
        drop(answers);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![host.to_owned()])?;
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(&key)?;
        order.finalize_csr(csr.der()).await?;
        let chain = order
            .poll_certificate(&RetryPolicy::new().timeout(Duration::from_secs(90)))
            .await?;
        let pem = cert_pem(&chain, &key.serialize_pem());
        Ok((self.store.write_pem(host, &pem)?, pem))
    }
}

/// A problem document as one line: type, detail, status.
fn problem_text(p: &instant_acme::Problem) -> String {
    format!(
        "{} ({}, status {})",
        p.detail.as_deref().unwrap_or("no detail"),
        p.r#type.as_deref().unwrap_or("no type"),
        p.status.map_or_else(|| "-".to_owned(), |s| s.to_string())
    )
}

fn serde_json_type(t: &instant_acme::ChallengeType) -> String {
    match t {
        instant_acme::ChallengeType::Http01 => "http-01".into(),
        instant_acme::ChallengeType::TlsAlpn01 => "tls-alpn-01".into(),
        instant_acme::ChallengeType::Dns01 => "dns-01".into(),
        other => format!("{other:?}"),
    }
}

/// The TLS-ALPN-01 certificate (RFC 8737 3): self-signed for `host`, with
/// the critical acmeIdentifier extension holding the key authorization's
/// digest.
fn alpn_certificate(host: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, AcmeError> {
    let mut params = CertificateParams::new(vec![host.to_owned()])?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| AcmeError::Key(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// The challenge answers of one order, withdrawn when dropped.
struct Answers {
    state: Arc<AcmeState>,
    tokens: Vec<String>,
    alpn: Vec<String>,
    /// The TXT channel and the records (name, value) this order added to
    /// it.
    txt: Option<(watch::Sender<TxtRecords>, Vec<TxtRecord>)>,
    /// In a cluster: the coordinator and the ids of the answers published
    /// through it.
    shared: Option<(Arc<dyn Coordinator>, Vec<String>)>,
}

type TxtRecord = (String, String);

impl Answers {
    /// Publish `answer` for the cluster's other hosts (no-op alone).
    async fn share(&mut self, answer: SharedAnswer) -> Result<(), AcmeError> {
        let Some((coord, ids)) = &mut self.shared else {
            return Ok(());
        };
        let id = match &answer {
            SharedAnswer::Http01 { token, .. } => format!("http-01-{token}"),
            // The value is base64url: a fine key, and unique per order.
            SharedAnswer::Dns01 { value, .. } => format!("dns-01-{value}"),
        };
        coord.publish(&id, &answer).await.map_err(|e| {
            AcmeError::Order(format!("cluster: publishing a challenge answer: {e}"))
        })?;
        ids.push(id);
        Ok(())
    }

    /// Serve TXT `value` at `name` (beside any others there).
    fn publish(&mut self, name: String, value: String) {
        let Some((tx, added)) = &mut self.txt else {
            return;
        };
        tx.send_modify(|recs| {
            let mut next = BTreeMap::clone(recs);
            next.entry(name.clone()).or_default().push(value.clone());
            *recs = Arc::new(next);
        });
        added.push((name, value));
    }
}

impl Drop for Answers {
    fn drop(&mut self) {
        if let Some((tx, added)) = &self.txt
            && !added.is_empty()
        {
            tx.send_modify(|recs| {
                let mut next = BTreeMap::clone(recs);
                for (name, value) in added {
                    if let Some(values) = next.get_mut(name) {
                        values.retain(|v| v != value);
                        if values.is_empty() {
                            next.remove(name);
                        }
                    }
                }
                *recs = Arc::new(next);
            });
        }
        for t in &self.tokens {
            self.state.drop_token(t);
        }
        if let Some((coord, ids)) = self.shared.take()
            && !ids.is_empty()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            // Withdrawn in the background; answers left by a failure here
            // go with this host's lease.
            rt.spawn(async move {
                for id in ids {
                    if let Err(e) = coord.withdraw(&id).await {
                        warn!(%id, error = %e, "cannot withdraw a shared challenge answer");
                    }
                }
            });
        }
        for h in &self.alpn {
            self.state.put_alpn(h, None);
        }
    }
}
