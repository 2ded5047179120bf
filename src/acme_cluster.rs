//! Automatic HTTPS across a cluster's hosts (see
//! `portless_router::acme::cluster`): the coordinator over etcd. One host
//! takes the right to order a name (a key bound to its lease: it goes with
//! the host), its challenge answers are published for every host, and the
//! certificate is stored in etcd sealed with the key every host shares
//! (`--acme-cluster-key`, AES-256-GCM, a fresh nonce per write, the name as
//! associated data): never the private key in clear in etcd.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use portless_netplane::agent;
use portless_netplane::store::{AcmeListing, Store};
use portless_router::acme::AcmeState;
use portless_router::acme::TxtRecords;
use portless_router::acme::cluster::{CoordFuture, Coordinator, SharedAnswer, SharedCert};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// How often the ACME keys are listed again besides the watch.
const RELIST: Duration = Duration::from_secs(2);

/// The shared key that seals certificates in etcd.
pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl Sealer {
    /// Read the key file: 32 random bytes written as 64 hex digits
    /// (`openssl rand -hex 32`).
    pub fn from_file(path: &Path) -> anyhow::Result<Sealer> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --acme-cluster-key {}", path.display()))?;
        Sealer::from_hex(text.trim()).with_context(|| {
            format!(
                "--acme-cluster-key {}: 64 hex digits expected (openssl rand -hex 32)",
                path.display()
            )
        })
    }

    fn from_hex(hex: &str) -> anyhow::Result<Sealer> {
        anyhow::ensure!(hex.len() == 64, "{} characters", hex.len());
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).context("not hex")?;
        }
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| anyhow::anyhow!("bad key"))?;
        Ok(Sealer {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
        })
    }

    /// nonce ‖ ciphertext ‖ tag, bound to `name`.
    pub fn seal(&self, name: &str, plain: &[u8]) -> anyhow::Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| anyhow::anyhow!("no randomness"))?;
        let mut out = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut out,
            )
            .map_err(|_| anyhow::anyhow!("sealing failed"))?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&out);
        Ok(sealed)
    }

    pub fn open(&self, name: &str, sealed: &[u8]) -> anyhow::Result<Vec<u8>> {
        anyhow::ensure!(sealed.len() > NONCE_LEN, "too short");
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| anyhow::anyhow!("nonce"))?;
        let mut buf = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut buf)
            .map_err(|_| {
                anyhow::anyhow!("does not open with this key (another --acme-cluster-key?)")
            })?;
        Ok(plain.to_vec())
    }
}

/// The etcd side of [`Coordinator`].
pub struct EtcdCoordinator {
    store: Store,
    lease: watch::Receiver<agent::Status>,
    sealer: Arc<Sealer>,
}

impl EtcdCoordinator {
    /// This host's id and lease; an error while it holds none.
    fn host(&self) -> Result<(String, i64), String> {
        match &self.lease.borrow().host {
            Some(h) if h.lease_id != 0 => Ok((h.id.clone(), h.lease_id)),
            _ => Err("this host holds no cluster lease (is etcd reachable?)".into()),
        }
    }
}

impl Coordinator for EtcdCoordinator {
    fn claim<'a>(&'a self, host: &'a str) -> CoordFuture<'a, bool> {
        Box::pin(async move {
            let (me, lease) = self.host()?;
            self.store
                .acme_claim(host, &me, lease)
                .await
                .map_err(|e| format!("etcd: {e}"))
        })
    }

    fn publish<'a>(&'a self, id: &'a str, answer: &'a SharedAnswer) -> CoordFuture<'a, ()> {
        Box::pin(async move {
            let (me, lease) = self.host()?;
            let value = serde_json::to_vec(answer).map_err(|e| e.to_string())?;
            self.store
                .acme_put_challenge(&me, lease, id, &value)
                .await
                .map_err(|e| format!("etcd: {e}"))
        })
    }

    fn withdraw<'a>(&'a self, id: &'a str) -> CoordFuture<'a, ()> {
        Box::pin(async move {
            let (me, _) = self.host()?;
            self.store
                .acme_delete_challenge(&me, id)
                .await
                .map_err(|e| format!("etcd: {e}"))
        })
    }

    fn share<'a>(&'a self, host: &'a str, pem: &'a str) -> CoordFuture<'a, ()> {
        Box::pin(async move {
            let sealed = self
                .sealer
                .seal(host, pem.as_bytes())
                .map_err(|e| e.to_string())?;
            self.store
                .acme_put_cert(host, &sealed)
                .await
                .map_err(|e| format!("etcd: {e}"))
        })
    }
}

/// What the issuer of this host needs to take part.
pub struct Link {
    pub coord: Arc<dyn Coordinator>,
    pub incoming: mpsc::Receiver<SharedCert>,
}

/// Ready to start once the router's ACME state exists.
pub struct Setup {
    store: Store,
    lease: watch::Receiver<agent::Status>,
    sealer: Arc<Sealer>,
}

impl Setup {
    pub fn new(store: Store, lease: watch::Receiver<agent::Status>, sealer: Sealer) -> Setup {
        Setup {
            store,
            lease,
            sealer: Arc::new(sealer),
        }
    }

    /// Follow the other hosts' answers and certificates into `state`, `txt`
    /// and the issuer's incoming channel; the coordinator for the issuer.
    pub fn start(self, state: Arc<AcmeState>, txt: watch::Sender<TxtRecords>) -> Link {
        let (tx, incoming) = mpsc::channel(64);
        let coord = Arc::new(EtcdCoordinator {
            store: self.store.clone(),
            lease: self.lease.clone(),
            sealer: self.sealer.clone(),
        });
        tokio::spawn(follow(self, state, txt, tx));
        Link { coord, incoming }
    }
}

/// What this host serves of the other hosts' answers, to withdraw what goes.
#[derive(Default)]
struct Served {
    tokens: BTreeSet<String>,
    txt: BTreeSet<(String, String)>,
    /// The sealed bytes last handed to the issuer, by name.
    certs: BTreeMap<String, Vec<u8>>,
}

async fn follow(
    setup: Setup,
    state: Arc<AcmeState>,
    txt: watch::Sender<TxtRecords>,
    certs: mpsc::Sender<SharedCert>,
) {
    let mut served = Served::default();
    loop {
        if let Err(e) = follow_once(&setup, &state, &txt, &certs, &mut served).await {
            if certs.is_closed() {
                return;
            }
            warn!(error = %e, "automatic HTTPS: the cluster's shared state is out of reach; retrying");
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

async fn follow_once(
    setup: &Setup,
    state: &AcmeState,
    txt: &watch::Sender<TxtRecords>,
    certs: &mpsc::Sender<SharedCert>,
    served: &mut Served,
) -> anyhow::Result<()> {
    let listing = setup.store.acme_list().await?;
    let mut watch = setup.store.acme_watch(listing.revision + 1).await?;
    apply(setup, &listing, state, txt, certs, served).await;
    loop {
        tokio::select! {
            m = watch.message() => {
                let Some(resp) = m? else { anyhow::bail!("watch ended") };
                if resp.canceled() {
                    anyhow::bail!("watch canceled: {}", resp.cancel_reason());
                }
            }
            // Every 2 s regardless: a missed event, a lease that came, and
            // traffic on the connection (etcd closes a connection that only
            // carries our keep-alive pings, which come more often than its
            // --grpc-keepalive-min-time: "too many pings").
            () = tokio::time::sleep(RELIST) => {}
        }
        let listing = setup.store.acme_list().await?;
        apply(setup, &listing, state, txt, certs, served).await;
    }
}

/// Serve the other hosts' answers, withdraw those gone, hand new
/// certificates to the issuer.
async fn apply(
    setup: &Setup,
    listing: &AcmeListing,
    state: &AcmeState,
    txt: &watch::Sender<TxtRecords>,
    certs: &mpsc::Sender<SharedCert>,
    served: &mut Served,
) {
    let me = setup.lease.borrow().host.as_ref().map(|h| h.id.clone());
    let mut tokens = BTreeSet::new();
    let mut records = BTreeSet::new();
    for ((host, id), value) in &listing.challenges {
        // Our own answers are served by our issuer already.
        if me.as_deref() == Some(host.as_str()) {
            continue;
        }
        match serde_json::from_slice::<SharedAnswer>(value) {
            Ok(SharedAnswer::Http01 {
                token,
                host,
                key_authorization,
            }) => {
                state.put_token(&token, &host, &key_authorization);
                tokens.insert(token);
            }
            Ok(SharedAnswer::Dns01 { name, value }) => {
                records.insert((name, value));
            }
            Err(e) => warn!(%host, %id, error = %e, "a shared challenge answer does not parse"),
        }
    }
    for gone in served.tokens.difference(&tokens) {
        state.drop_token(gone);
    }
    if records != served.txt {
        txt.send_modify(|recs| {
            let mut next = BTreeMap::clone(recs);
            for (name, value) in served.txt.difference(&records) {
                if let Some(values) = next.get_mut(name) {
                    values.retain(|v| v != value);
                    if values.is_empty() {
                        next.remove(name);
                    }
                }
            }
            for (name, value) in records.difference(&served.txt) {
                next.entry(name.clone()).or_default().push(value.clone());
            }
            *recs = Arc::new(next);
        });
    }
    served.tokens = tokens;
    served.txt = records;
    for (name, sealed) in &listing.certs {
        if served.certs.get(name) == Some(sealed) {
            continue;
        }
        match setup.sealer.open(name, sealed) {
            Ok(plain) => match String::from_utf8(plain) {
                Ok(pem) => {
                    info!(host = %name, "certificate shared by the cluster");
                    let _ = certs
                        .send(SharedCert {
                            host: name.clone(),
                            pem,
                        })
                        .await;
                }
                Err(_) => warn!(host = %name, "a shared certificate is not PEM text"),
            },
            Err(e) => warn!(host = %name, error = %e, "a shared certificate does not open"),
        }
        served.certs.insert(name.clone(), sealed.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_certificates_open_only_with_the_key_and_for_their_name() {
        let key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let s = Sealer::from_hex(key).unwrap();
        let pem = b"-----BEGIN PRIVATE KEY-----\nsecret\n";
        let a = s.seal("shop.example.com", pem).unwrap();
        let b = s.seal("shop.example.com", pem).unwrap();
        assert_ne!(a, b, "a fresh nonce per seal");
        assert!(
            !a.windows(6).any(|w| w == b"secret"),
            "the key is not in clear"
        );
        assert_eq!(s.open("shop.example.com", &a).unwrap(), pem);
        // Another name (a value moved to another key) or another key: refused.
        assert!(s.open("evil.example.com", &a).is_err());
        let other = Sealer::from_hex(&key.replace('0', "1")).unwrap();
        assert!(other.open("shop.example.com", &a).is_err());
        let mut tampered = a.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(s.open("shop.example.com", &tampered).is_err());
        assert!(Sealer::from_hex("abcd").is_err());
        assert!(Sealer::from_hex(&"zz".repeat(32)).is_err());
    }
}
