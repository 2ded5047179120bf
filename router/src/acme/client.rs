//! The HTTPS transport of the ACME client: hyper with rustls (ring), the
//! system's roots plus `--acme-ca`'s, and a note of the last `Retry-After`
//! the server sent, which instant-acme does not hand back with its errors.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls::RootCertStore;

use super::AcmeError;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// The ACME client's HTTP transport.
#[derive(Clone)]
pub struct AcmeHttp {
    client: Client<Https, BodyWrapper<Bytes>>,
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl AcmeHttp {
    /// Trusting the system's roots and every certificate in `ca_file`.
    pub fn new(ca_file: Option<&Path>) -> Result<Self, AcmeError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_roots();
        roots.add_parsable_certificates(native);
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| AcmeError::Store(path.to_owned(), e))?;
            let (certs, _) = crate::tls::read_pem_bytes(&pem)
                .map_err(|m| AcmeError::Certificate(path.to_owned(), m))?;
            if certs.is_empty() {
                return Err(AcmeError::Certificate(
                    path.to_owned(),
                    "no certificate in the file".into(),
                ));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| AcmeError::Certificate(path.to_owned(), e.to_string()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| AcmeError::Acme(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        Ok(AcmeHttp {
            client: Client::builder(TokioExecutor::new()).build(https),
            retry_after: Arc::new(Mutex::new(None)),
        })
    }

    /// The `Retry-After` of the last answer that had one, taken.
    pub fn take_retry_after(&self) -> Option<SystemTime> {
        self.retry_after
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

fn rustls_native_roots() -> Vec<rustls::pki_types::CertificateDer<'static>> {
    // Certificates the system store has that do not load are left out;
    // with none at all only --acme-ca is trusted.
    rustls_native_certs::load_native_certs().certs
}

/// `Retry-After` as seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<SystemTime> {
    let v = v.trim();
    match u64::from_str(v) {
        Ok(s) => Some(SystemTime::now() + Duration::from_secs(s)),
        Err(_) => httpdate::parse_http_date(v).ok(),
    }
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let fut = self.client.request(req);
        let note = self.retry_after.clone();
        Box::pin(async move {
            let rsp = fut
                .await
                .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
            if let Some(t) = rsp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after)
                && !rsp.status().is_success()
            {
                *note.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
            }
            Ok(BytesResponse::from(rsp))
        })
    }
}
