//! The ACME state on disk, under `--acme-dir`, one directory per ACME
//! server (so that staging certificates never serve for production):
//!
//! ```text
//! <acme-dir>/<server>/account.json     the account's id and key (0600)
//! <acme-dir>/<server>/certs/<host>.pem chain, leaf first, then its key (0600)
//! ```
//!
//! Every file is written whole to a temporary name (0600 from its
//! creation) and renamed over the old one, so a crash leaves the old file
//! or the new one, never half of one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;

use super::AcmeError;
use crate::tls::read_pem_bytes;

/// The file name prefix standing for `*.`.
const WILDCARD_FILE: &str = "_wildcard.";

/// A certificate as loaded or issued, ready to serve.
#[derive(Clone)]
pub struct StoredCert {
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The files of one ACME server's account and certificates.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A directory name for a server's directory URL: its host and path, with
/// anything but letters, digits, '.' and '-' made '_'.
fn server_slug(directory: &str) -> String {
    let rest = directory
        .split_once("://")
        .map_or(directory, |(_, rest)| rest);
    let slug: String = rest
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    slug.trim_matches('_').to_owned()
}

impl Store {
    /// The store of `directory`'s server under `dir` (created, 0700).
    pub fn open(dir: &Path, directory: &str) -> Result<Self, AcmeError> {
        let root = dir.join(server_slug(directory));
        let certs = root.join("certs");
        fs::create_dir_all(&certs).map_err(|e| AcmeError::Store(certs.clone(), e))?;
        for d in [dir, &root, &certs] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o700))
                .map_err(|e| AcmeError::Store(d.to_owned(), e))?;
        }
        Ok(Store { root })
    }

    pub fn account_path(&self) -> PathBuf {
        self.root.join("account.json")
    }

    /// `*.example.com` is kept as `_wildcard.example.com.pem`.
    pub fn cert_path(&self, host: &str) -> PathBuf {
        let file = match host.strip_prefix("*.") {
            Some(suffix) => format!("{WILDCARD_FILE}{suffix}.pem"),
            None => format!("{host}.pem"),
        };
        self.root.join("certs").join(file)
    }

    pub fn read_account(&self) -> Result<Option<Vec<u8>>, AcmeError> {
        let p = self.account_path();
        match fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AcmeError::Store(p, e)),
        }
    }

    pub fn write_account(&self, bytes: &[u8]) -> Result<(), AcmeError> {
        write_atomic(&self.account_path(), bytes)
    }

    /// Store `host`'s chain and key (PEM) and check that they serve.
    pub fn write_cert(
        &self,
        host: &str,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<StoredCert, AcmeError> {
        self.write_pem(host, &cert_pem(chain_pem, key_pem))
    }

    /// Store `host`'s chain and key in one PEM text (as [`cert_pem`] makes
    /// it) and check that they serve.
    pub fn write_pem(&self, host: &str, pem: &str) -> Result<StoredCert, AcmeError> {
        let cert = parse(&self.cert_path(host), pem.as_bytes())?;
        write_atomic(&self.cert_path(host), pem.as_bytes())?;
        Ok(cert)
    }

    /// Every stored certificate, by host; files that do not parse are
    /// returned as problems (they are ordered again).
    pub fn load_certs(&self) -> (Vec<(String, StoredCert)>, Vec<AcmeError>) {
        let dir = self.root.join("certs");
        let mut out = Vec::new();
        let mut problems = Vec::new();
        let Ok(entries) = fs::read_dir(&dir) else {
            return (out, problems);
        };
        for e in entries.filter_map(Result::ok) {
            let path = e.path();
            let Some(host) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".pem"))
                .filter(|h| !h.starts_with('.'))
            else {
                continue;
            };
            match fs::read(&path)
                .map_err(|e| AcmeError::Store(path.clone(), e))
                .and_then(|b| parse(&path, &b))
            {
                Ok(c) => {
                    let host = match host.strip_prefix(WILDCARD_FILE) {
                        Some(suffix) => format!("*.{suffix}"),
                        None => host.to_owned(),
                    };
                    out.push((host, c));
                }
                Err(e) => problems.push(e),
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        (out, problems)
    }
}

/// Write `bytes` to `path` through a temporary file created 0600, synced,
/// then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AcmeError> {
    let err = |e| AcmeError::Store(path.to_owned(), e);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    fs::rename(&tmp, path).map_err(err)?;
    if let Some(parent) = path.parent()
        && let Ok(d) = fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A chain and its key as one PEM text, as stored.
pub fn cert_pem(chain_pem: &str, key_pem: &str) -> String {
    let mut pem = chain_pem.trim_end().to_owned();
    pem.push('\n');
    pem.push_str(key_pem);
    pem
}

/// A PEM chain and key made ready to serve, with its validity.
pub fn parse(path: &Path, pem: &[u8]) -> Result<StoredCert, AcmeError> {
    let bad = |m: String| AcmeError::Certificate(path.to_owned(), m);
    let (certs, key) = read_pem_bytes(pem).map_err(bad)?;
    let key = key.ok_or_else(|| bad("no private key".into()))?;
    let leaf = certs.first().ok_or_else(|| bad("no certificate".into()))?;
    let (not_before, not_after) = validity(leaf).map_err(bad)?;
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad(format!("private key: {e}")))?;
    let certified = CertifiedKey::new(certs, signing);
    certified
        .keys_match()
        .map_err(|e| bad(format!("key does not match certificate: {e}")))?;
    Ok(StoredCert {
        key: Arc::new(certified),
        not_before,
        not_after,
    })
}

/// A certificate's notBefore and notAfter.
pub fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), String> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    let t = |ts: i64| {
        u64::try_from(ts)
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    Ok((
        t(x.validity().not_before.timestamp()),
        t(x.validity().not_after.timestamp()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_slug_keeps_host_and_path() {
        assert_eq!(
            server_slug("https://acme-v02.api.letsencrypt.org/directory"),
            "acme-v02.api.letsencrypt.org_directory"
        );
        assert_eq!(
            server_slug("https://127.0.0.1:14000/dir"),
            "127.0.0.1_14000_dir"
        );
    }

    #[test]
    fn atomic_write_is_0600_and_replaces() {
        let dir = std::env::temp_dir().join(format!("portless-acme-store-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary left");
        fs::remove_dir_all(&dir).unwrap();
    }
}
