//! How portless proves itself to etcd and etcd to portless: TLS (a CA to
//! verify the server, a client certificate for mutual TLS) and RBAC
//! credentials.
//!
//! [`EtcdAccess`] is plain data, checked when the configuration is read
//! ([`EtcdTls::new`] parses the PEM and matches the client key with its
//! certificate), so that a bad file is a configuration error and not a
//! failure once portless runs. [`crate::store::Store`] turns it into
//! etcd-client's `ConnectOptions`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::PrivateKeyDer;
use rustls::sign::CertifiedKey;

/// How long the TLS handshake with etcd may take; past it, the request
/// fails with "TLS handshake timeout".
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// TLS and credentials for etcd; the default is plain http without auth.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdAccess {
    pub tls: Option<EtcdTls>,
    pub credentials: Option<Credentials>,
}

/// TLS to etcd, from PEM files already read.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// CA bundle that etcd's certificate must chain to; None: the system's
    /// roots.
    ca: Option<Vec<u8>>,
    /// Client certificate (chain) and its key, for mutual TLS.
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Which of the PEM inputs of [`EtcdTls::new`] is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsFileError {
    #[error("{0}")]
    Ca(String),
    #[error("{0}")]
    Cert(String),
    #[error("{0}")]
    Key(String),
}

impl EtcdTls {
    /// Check the PEM inputs: the CA bundle and the client certificate hold
    /// at least one certificate each, the key file one private key, and the
    /// key belongs to the certificate.
    pub fn new(
        ca: Option<Vec<u8>>,
        identity: Option<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Self, TlsFileError> {
        if let Some(ca) = &ca {
            certificates(ca).map_err(TlsFileError::Ca)?;
        }
        if let Some((cert, key)) = &identity {
            let chain = certificates(cert).map_err(TlsFileError::Cert)?;
            let key = private_key(key).map_err(TlsFileError::Key)?;
            let provider = rustls::crypto::ring::default_provider();
            CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
                TlsFileError::Key(format!("does not belong to the client certificate ({e})"))
            })?;
        }
        Ok(EtcdTls { ca, identity })
    }

    /// Whether the server is verified against the system's roots.
    pub fn system_roots(&self) -> bool {
        self.ca.is_none()
    }

    /// Whether a client certificate is presented.
    pub fn mutual(&self) -> bool {
        self.identity.is_some()
    }

    fn options(&self) -> TlsOptions {
        // tonic waits for a handshake forever by default, and requests wait
        // for the channel, so the request timeout would never start: a peer
        // that takes the TCP connection but never answers would hang.
        let mut tls = TlsOptions::new().timeout(HANDSHAKE_TIMEOUT);
        tls = match &self.ca {
            // Only the given CA: a certificate from some public CA for the
            // same name must not pass.
            Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        tls
    }
}

impl EtcdTls {
    /// After a request failed on a closed connection: did etcd at
    /// `endpoint` refuse this client certificate? With TLS 1.3 a server
    /// checks the client's certificate after the handshake has finished
    /// for the client, and says so with an alert that tonic and hyper may
    /// report only as "connection closed". This redoes the handshake alone,
    /// sends the HTTP/2 client preface and reads: the alert (refused), or
    /// the server's HTTP/2 settings (accepted), within `wait`. None: not
    /// refused, or no answer, or nothing to ask with (no client
    /// certificate, or no `--etcd-ca`: the system's roots are not loaded
    /// here).
    pub async fn refusal(&self, endpoint: &str, wait: Duration) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (cert, key) = self.identity.as_ref()?;
        let ca = self.ca.as_ref()?;
        let (host, port) = host_port(endpoint)?;
        let name = rustls::pki_types::ServerName::try_from(host.to_owned()).ok()?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(certificates(ca).ok()?);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(roots)
            .with_client_auth_cert(certificates(cert).ok()?, private_key(key).ok()?)
            .ok()?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let probe = async {
            let tcp = tokio::net::TcpStream::connect((host, port)).await?;
            let mut tls = connector.connect(name, tcp).await?;
            // The HTTP/2 preface and an empty SETTINGS frame: a server
            // that took the certificate answers with its own settings.
            tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                .await?;
            let mut buf = [0u8; 64];
            tls.read(&mut buf).await
        };
        let err = match tokio::time::timeout(wait, probe).await {
            Ok(Err(e)) => e,
            // Data (accepted), a close without an alert, or no answer.
            _ => return None,
        };
        let alert = alert_in(&err).filter(|a| refuses_certificate(*a))?;
        Some(certificate_refused(endpoint, alert))
    }
}

/// Host and port of an etcd endpoint (`https://host:port`, `host:port`,
/// `[v6]:port`; 2379 when no port is given).
fn host_port(endpoint: &str) -> Option<(&str, u16)> {
    let authority = endpoint
        .strip_prefix("https://")
        .unwrap_or(endpoint)
        .trim_end_matches('/');
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            _ => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => 2379,
    };
    (!host.is_empty()).then_some((host, port))
}

/// The alerts with which a TLS server refuses a client certificate.
pub(crate) fn refuses_certificate(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired
    )
}

pub(crate) fn certificate_refused(endpoint: &str, alert: rustls::AlertDescription) -> String {
    use rustls::AlertDescription as A;
    let hint = match alert {
        A::CertificateExpired => "it has expired or is not valid yet",
        A::CertificateRevoked => "it was revoked",
        _ => {
            "it must be signed by a CA that etcd trusts (its --trusted-ca-file), be valid for \
             client authentication, and match etcd's --client-cert-allowed-cn or \
             --client-cert-allowed-hostname when those are set"
        }
    };
    format!(
        "etcd at {endpoint} refused this host's client certificate (TLS alert {alert:?}): {hint}"
    )
}

/// A TLS alert received from the peer, anywhere in an error's chain of
/// sources (rustls's error, or an I/O error wrapping it).
pub(crate) fn alert_in(
    err: &(dyn std::error::Error + 'static),
) -> Option<rustls::AlertDescription> {
    let mut next = Some(err);
    while let Some(e) = next {
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::AlertReceived(a)) = tls {
            return Some(*a);
        }
        next = e.source();
    }
    None
}

impl fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdTls")
            .field(
                "ca",
                &if self.ca.is_some() {
                    "given"
                } else {
                    "system roots"
                },
            )
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

/// An etcd user and its password. The password never shows in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    password: Arc<str>,
}

impl Credentials {
    pub fn new(user: impl Into<String>, password: impl Into<Arc<str>>) -> Self {
        Credentials {
            user: user.into(),
            password: password.into(),
        }
    }

    pub(crate) fn pair(&self) -> (String, String) {
        (self.user.clone(), self.password.to_string())
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl EtcdAccess {
    /// Add TLS to etcd-client's options. Credentials are not added here:
    /// etcd-client would authenticate inside `Client::connect`, which must
    /// succeed while etcd is down ([`crate::store::Store`] signs in on first
    /// use instead).
    pub(crate) fn apply(&self, opts: ConnectOptions) -> ConnectOptions {
        match &self.tls {
            Some(tls) => opts.with_tls(tls.options()),
            None => opts,
        }
    }
}

fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into());
    }
    Ok(certs)
}

fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| format!("not a PEM key file: {e}"))?
        .ok_or_else(|| "no PEM private key (-----BEGIN ... PRIVATE KEY-----) in it".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error whose source is another, as tonic and hyper wrap them.
    #[derive(Debug)]
    struct Wrapped(Box<dyn std::error::Error + Send + Sync>);

    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("transport error")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn endpoints_give_host_and_port() {
        assert_eq!(host_port("https://10.0.0.1:2379"), Some(("10.0.0.1", 2379)));
        assert_eq!(host_port("10.0.0.1:2380"), Some(("10.0.0.1", 2380)));
        assert_eq!(host_port("https://[::1]:2379"), Some(("::1", 2379)));
        assert_eq!(host_port("https://[::1]"), Some(("::1", 2379)));
        assert_eq!(
            host_port("https://etcd.example:2379/"),
            Some(("etcd.example", 2379))
        );
        assert_eq!(
            host_port("https://etcd.example"),
            Some(("etcd.example", 2379))
        );
        assert_eq!(host_port("::1"), Some(("::1", 2379)));
        assert_eq!(host_port("https://etcd.example:port"), None);
        assert_eq!(host_port("https://"), None);
    }

    #[test]
    fn a_tls_alert_is_found_under_wrapping_errors() {
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, alert);
        let e = Wrapped(Box::new(Wrapped(Box::new(io))));
        assert_eq!(alert_in(&e), Some(rustls::AlertDescription::BadCertificate));
        assert!(refuses_certificate(
            rustls::AlertDescription::BadCertificate
        ));
        assert!(!refuses_certificate(
            rustls::AlertDescription::HandshakeFailure
        ));

        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(alert_in(&Wrapped(Box::new(plain))), None);
        let other = rustls::Error::General("no".into());
        assert_eq!(alert_in(&Wrapped(Box::new(other))), None);
    }

    #[test]
    fn garbage_and_empty_files_are_refused_by_role() {
        assert!(matches!(
            EtcdTls::new(Some(b"hello".to_vec()), None),
            Err(TlsFileError::Ca(_))
        ));
        assert!(matches!(
            EtcdTls::new(None, Some((Vec::new(), Vec::new()))),
            Err(TlsFileError::Cert(_))
        ));
        assert_eq!(
            EtcdTls::new(None, None),
            Ok(EtcdTls {
                ca: None,
                identity: None
            })
        );
    }

    #[test]
    fn the_password_never_shows() {
        let c = Credentials::new("portless", "s3cret");
        let access = EtcdAccess {
            tls: None,
            credentials: Some(c),
        };
        let dbg = format!("{access:?}");
        assert!(dbg.contains("portless") && !dbg.contains("s3cret"), "{dbg}");
    }
}
