//! TLS: certificates from a directory, chosen per connection by SNI, and
//! replaced when the directory changes without touching open connections.
//!
//! Directory layout: every `*.pem` or `*.crt` file holds a certificate chain
//! (leaf first), and its private key either in the same file or in a file
//! of the same stem ending in `.key`. The names a certificate serves are the
//! DNS names in its subjectAltName, wildcards included. A file whose stem is
//! `default` is also the default certificate, for clients without SNI or with
//! a name nothing else covers; without one such handshakes fail.
//!
//! Choice: an exact name, then a wildcard for the name's parent (a TLS
//! wildcard covers one label only), then the default. When two files claim
//! the same name, the one whose file name sorts first wins.

use std::collections::HashMap;
use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

use crate::acme::AcmeState;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    File(PathBuf, String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Loaded certificates, indexed by name.
#[derive(Debug, Default)]
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    /// (name, file) pairs, for status and logs.
    pub names: Vec<(String, PathBuf)>,
}

impl CertStore {
    /// The certificate for an SNI name (any case).
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = sni else {
            return self.default.clone();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return Some(k.clone());
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(k) = self.wildcard.get(parent)
        {
            return Some(k.clone());
        }
        self.default.clone()
    }

    /// Whether an exact or wildcard certificate covers `name` (lower
    /// case, no trailing dot; `*.suffix`: a wildcard certificate for the
    /// same suffix); the default does not count.
    pub fn covers(&self, name: &str) -> bool {
        if let Some(suffix) = name.strip_prefix("*.") {
            return self.wildcard.contains_key(suffix);
        }
        self.exact.contains_key(name)
            || name
                .split_once('.')
                .is_some_and(|(_, parent)| self.wildcard.contains_key(parent))
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty() && self.default.is_none()
    }
}

/// The rustls resolver: reads the current [`CertStore`] per handshake, and
/// with ACME on, the issued certificates and the TLS-ALPN-01 challenge
/// certificates.
#[derive(Debug, Default)]
pub struct CertResolver {
    store: ArcSwap<CertStore>,
    acme: Option<Arc<AcmeState>>,
}

/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

impl CertResolver {
    pub fn new(store: CertStore) -> Self {
        CertResolver {
            store: ArcSwap::from_pointee(store),
            acme: None,
        }
    }

    /// Also serve ACME's certificates: a name a `--cert-dir` file covers
    /// (exactly or by wildcard) gets that file; then ACME's certificate;
    /// then the directory's default.
    pub fn with_acme(store: CertStore, acme: Arc<AcmeState>) -> Self {
        CertResolver {
            store: ArcSwap::from_pointee(store),
            acme: Some(acme),
        }
    }

    pub fn replace(&self, store: CertStore) {
        self.store.store(Arc::new(store));
    }

    pub fn names(&self) -> Vec<(String, PathBuf)> {
        self.store.load().names.clone()
    }

    /// Whether a `--cert-dir` file covers `name` (exactly or by wildcard):
    /// ACME orders nothing for it.
    pub fn dir_covers(&self, name: &str) -> bool {
        self.store.load().covers(name)
    }

    /// The certificate a handshake for `sni` gets (no challenge).
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let store = self.store.load();
        if let (Some(acme), Some(name)) = (&self.acme, sni) {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if !store.covers(&name)
                && let Some(k) = acme.certificate(&name)
            {
                return Some(k);
            }
        }
        store.lookup(sni)
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(acme) = &self.acme
            && let Some(mut alpn) = hello.alpn()
            && alpn.any(|p| p == ACME_TLS_ALPN)
        {
            // A validation handshake: only the challenge certificate (RFC
            // 8737 3: the server offers acme-tls/1 alone).
            let name = hello.server_name()?.to_ascii_lowercase();
            return acme.alpn_certificate(&name);
        }
        self.lookup(hello.server_name())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config over `resolver`, offering h2 and http/1.1 by ALPN (and
/// acme-tls/1 when the resolver serves ACME challenges).
pub fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<ServerConfig>, TlsError> {
    let acme = resolver.acme.is_some();
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if acme {
        cfg.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    Ok(Arc::new(cfg))
}

/// Load every certificate in `dir`. Files that cannot be used are skipped
/// and reported in the second value; only an unreadable directory fails.
pub fn load_cert_dir(dir: &Path) -> Result<(CertStore, Vec<TlsError>), TlsError> {
    let provider = provider();
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| TlsError::Dir(dir.to_owned(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("pem" | "crt")))
        .collect();
    files.sort();
    let mut store = CertStore::default();
    let mut problems = Vec::new();
    for path in files {
        match load_one(&path, &provider) {
            Ok((key, names)) => {
                if path.file_stem().and_then(|s| s.to_str()) == Some("default")
                    && store.default.is_none()
                {
                    store.default = Some(key.clone());
                }
                for name in names {
                    let name = name.to_ascii_lowercase();
                    let inserted = match name.strip_prefix("*.") {
                        Some(suffix) => store
                            .wildcard
                            .entry(suffix.to_owned())
                            .or_insert_with(|| key.clone()),
                        None => store
                            .exact
                            .entry(name.clone())
                            .or_insert_with(|| key.clone()),
                    };
                    if Arc::ptr_eq(inserted, &key) {
                        store.names.push((name, path.clone()));
                    }
                }
            }
            Err(e) => problems.push(e),
        }
    }
    Ok((store, problems))
}

fn load_one(
    path: &Path,
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, Vec<String>), TlsError> {
    let bad = |msg: String| TlsError::File(path.to_owned(), msg);
    let (certs, mut key) = read_pem(path).map_err(bad)?;
    if key.is_none() {
        let key_path = path.with_extension("key");
        if key_path.exists() {
            key = read_pem(&key_path)
                .map_err(|m| TlsError::File(key_path.clone(), m))?
                .1;
        }
    }
    let key = key.ok_or_else(|| bad("no private key in the file or beside it (.key)".into()))?;
    let leaf = certs.first().ok_or_else(|| bad("no certificate".into()))?;
    let names: Vec<String> = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| bad(format!("certificate does not parse: {e}")))?
        .valid_dns_names()
        .map(str::to_owned)
        .collect();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad(format!("private key: {e}")))?;
    let certified = CertifiedKey::new(certs, signing);
    // Catches a key that belongs to another certificate.
    certified
        .keys_match()
        .map_err(|e| bad(format!("key does not match certificate: {e}")))?;
    Ok((Arc::new(certified), names))
}

type PemContents = (Vec<CertificateDer<'static>>, Option<PrivateKeyDer<'static>>);

fn read_pem(path: &Path) -> Result<PemContents, String> {
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    read_pem_bytes(&bytes)
}

/// Certificates (in order) and the first private key of a PEM text.
pub(crate) fn read_pem_bytes(pem: &[u8]) -> Result<PemContents, String> {
    let mut certs = Vec::new();
    let mut key = None;
    for item in rustls_pemfile::read_all(&mut BufReader::new(pem)) {
        match item.map_err(|e| e.to_string())? {
            rustls_pemfile::Item::X509Certificate(c) => certs.push(c),
            rustls_pemfile::Item::Pkcs1Key(k) if key.is_none() => key = Some(k.into()),
            rustls_pemfile::Item::Pkcs8Key(k) if key.is_none() => key = Some(k.into()),
            rustls_pemfile::Item::Sec1Key(k) if key.is_none() => key = Some(k.into()),
            _ => {}
        }
    }
    Ok((certs, key))
}

/// What changes in the directory: names, sizes and modification times.
fn fingerprint(dir: &Path) -> Option<Vec<(PathBuf, u64, Option<SystemTime>)>> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            // Follow symlinks: mounted secrets (Kubernetes, Docker configs)
            // swap a symlinked directory under files that keep their names.
            let path = e.path();
            let md = fs::metadata(&path).ok()?;
            Some((path, md.len(), md.modified().ok()))
        })
        .collect();
    v.sort();
    Some(v)
}

/// Reload `dir` into `resolver` whenever its contents change, checking
/// every `every`. Runs until dropped. A directory that cannot be read keeps
/// the certificates already loaded.
pub async fn watch_cert_dir(dir: PathBuf, resolver: Arc<CertResolver>, every: Duration) {
    let mut last = fingerprint(&dir);
    loop {
        tokio::time::sleep(every).await;
        let now = fingerprint(&dir);
        if now == last || now.is_none() {
            continue;
        }
        last = now;
        // Parsing keys is blocking file I/O and some CPU: keep it off the
        // runtime's workers.
        let d = dir.clone();
        match tokio::task::spawn_blocking(move || load_cert_dir(&d)).await {
            Ok(Ok((store, problems))) => {
                for p in &problems {
                    warn!(error = %p, "certificate skipped");
                }
                info!(dir = %dir.display(), names = store.names.len(), "certificates reloaded");
                resolver.replace(store);
            }
            Ok(Err(e)) => warn!(error = %e, "certificate reload failed; keeping the old ones"),
            Err(e) => warn!(error = %e, "certificate reload task failed"),
        }
    }
}
