//! What the ACME issuer shares with the request path and the TLS resolver:
//! the HTTP-01 answers, the TLS-ALPN-01 certificates, the issued
//! certificates, the hosts still waiting for one, and each host's state for
//! status. The request path only loads `ArcSwap`s; the issuer writes them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;

/// Where a host's certificate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertPhase {
    /// No certificate yet; an order is due or running.
    Pending,
    /// A certificate is served.
    Valid,
    /// The last order failed (a certificate may still be served, when a
    /// renewal failed).
    Failed,
}

impl CertPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            CertPhase::Pending => "pending",
            CertPhase::Valid => "valid",
            CertPhase::Failed => "failed",
        }
    }
}

/// One host's certificate, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertStatus {
    pub host: String,
    pub phase: CertPhase,
    /// The served certificate's end of validity.
    pub not_after: Option<SystemTime>,
    /// When the next order (first, renewal or retry) is due.
    pub next_attempt: Option<SystemTime>,
    /// The last order's error, with the server's problem document.
    pub last_error: Option<String>,
    /// Orders failed in a row.
    pub failures: u32,
    /// Orders made for this host since the start (each is one new-order
    /// request to the server).
    pub orders: u64,
}

impl CertStatus {
    pub(crate) fn new(host: &str) -> Self {
        CertStatus {
            host: host.to_owned(),
            phase: CertPhase::Pending,
            not_after: None,
            next_attempt: None,
            last_error: None,
            failures: 0,
            orders: 0,
        }
    }
}

type Certs = HashMap<String, Arc<CertifiedKey>>;

/// Shared ACME state; one per router.
#[derive(Default)]
pub struct AcmeState {
    /// HTTP-01: token → (host, key authorization).
    tokens: ArcSwap<HashMap<String, (String, String)>>,
    /// TLS-ALPN-01: host → the self-signed challenge certificate.
    alpn: ArcSwap<Certs>,
    /// Issued certificates, by host.
    certs: ArcSwap<Certs>,
    /// Hosts ACME should cover that have no certificate yet: plain HTTP is
    /// not redirected to https for them.
    pending: ArcSwap<HashSet<String>>,
    status: Mutex<BTreeMap<String, CertStatus>>,
    issued: AtomicU64,
    failed: AtomicU64,
    /// Writers are the issuer task only; the lock keeps their
    /// read-modify-write of the maps whole.
    write: Mutex<()>,
}

impl fmt::Debug for AcmeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcmeState")
            .field("certs", &self.certs.load().len())
            .field("pending", &self.pending.load().len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps: a panic half-way leaves nothing inconsistent to fear.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AcmeState {
    /// The HTTP-01 answer for `token` when `host` asked for it.
    pub fn http01_answer(&self, host: &str, token: &str) -> Option<String> {
        let tokens = self.tokens.load();
        let (h, ka) = tokens.get(token)?;
        (h == host).then(|| ka.clone())
    }

    /// The TLS-ALPN-01 certificate for `host`, while its challenge runs.
    pub fn alpn_certificate(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        self.alpn.load().get(host).cloned()
    }

    /// The issued certificate for `host`: its own, else a wildcard's for
    /// its parent (a TLS wildcard covers one label).
    pub fn certificate(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.load();
        if certs.is_empty() {
            return None;
        }
        if let Some(k) = certs.get(host) {
            return Some(k.clone());
        }
        let (_, parent) = host.split_once('.')?;
        certs.get(&format!("*.{parent}")).cloned()
    }

    /// Whether `host` (or the wildcard covering it) is waiting for its
    /// first certificate.
    pub fn is_pending(&self, host: &str) -> bool {
        let pending = self.pending.load();
        if pending.is_empty() {
            return false;
        }
        pending.contains(host)
            || host
                .split_once('.')
                .is_some_and(|(_, parent)| pending.contains(&format!("*.{parent}")))
    }

    /// Every host's certificate state, by host.
    pub fn status(&self) -> Vec<CertStatus> {
        lock(&self.status).values().cloned().collect()
    }

    /// Orders since the start: (issued, failed).
    pub fn orders(&self) -> (u64, u64) {
        (self.issued.load(Relaxed), self.failed.load(Relaxed))
    }

    pub(crate) fn count_order(&self, issued: bool) {
        if issued { &self.issued } else { &self.failed }.fetch_add(1, Relaxed);
    }

    pub(crate) fn with_status<R>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, CertStatus>) -> R,
    ) -> R {
        f(&mut lock(&self.status))
    }

    /// Answer HTTP-01 `token` for `host` (the issuer's own, or another
    /// host's in a cluster) until [`Self::drop_token`].
    pub fn put_token(&self, token: &str, host: &str, key_authorization: &str) {
        let _w = lock(&self.write);
        let mut next = HashMap::clone(&self.tokens.load());
        next.insert(
            token.to_owned(),
            (host.to_owned(), key_authorization.to_owned()),
        );
        self.tokens.store(Arc::new(next));
    }

    pub fn drop_token(&self, token: &str) {
        let _w = lock(&self.write);
        let mut next = HashMap::clone(&self.tokens.load());
        next.remove(token);
        self.tokens.store(Arc::new(next));
    }

    pub(crate) fn put_alpn(&self, host: &str, key: Option<Arc<CertifiedKey>>) {
        let _w = lock(&self.write);
        let mut next = Certs::clone(&self.alpn.load());
        match key {
            Some(k) => next.insert(host.to_owned(), k),
            None => next.remove(host),
        };
        self.alpn.store(Arc::new(next));
    }

    /// Serve `key` for `host` from now on: new handshakes get it, open
    /// connections keep the one they were made with.
    pub(crate) fn put_certificate(&self, host: &str, key: Arc<CertifiedKey>) {
        let _w = lock(&self.write);
        let mut next = Certs::clone(&self.certs.load());
        next.insert(host.to_owned(), key);
        self.certs.store(Arc::new(next));
    }

    pub(crate) fn set_pending(&self, pending: HashSet<String>) {
        if **self.pending.load() != pending {
            self.pending.store(Arc::new(pending));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http01_answer_is_only_for_its_token_and_its_host() {
        let s = AcmeState::default();
        s.put_token("tok", "shop.test", "tok.thumb");
        assert_eq!(
            s.http01_answer("shop.test", "tok").as_deref(),
            Some("tok.thumb")
        );
        assert_eq!(s.http01_answer("other.test", "tok"), None);
        assert_eq!(s.http01_answer("shop.test", "nope"), None);
        s.drop_token("tok");
        assert_eq!(s.http01_answer("shop.test", "tok"), None);
    }

    #[test]
    fn pending_covers_a_wildcards_names_and_nothing_else() {
        let s = AcmeState::default();
        assert!(!s.is_pending("shop.test"));
        s.set_pending(["shop.test".to_owned(), "*.apps.test".to_owned()].into());
        assert!(s.is_pending("shop.test"));
        assert!(s.is_pending("blog.apps.test"));
        assert!(!s.is_pending("apps.test"));
        assert!(!s.is_pending("a.blog.apps.test"));
        assert!(!s.is_pending("other.test"));
    }
}
