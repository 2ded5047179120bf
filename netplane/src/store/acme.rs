//! Automatic HTTPS across the cluster's hosts: one host orders each
//! certificate, every host answers its challenges and serves the result.
//!
//! | key                                | value                          | bound to lease |
//! |------------------------------------|--------------------------------|----------------|
//! | `{prefix}acmelock/{name}`          | host id of the orderer         | the holder's   |
//! | `{prefix}acmechal/{host}/{id}`     | a challenge answer (opaque)    | the host's     |
//! | `{prefix}acmecert/{name}`          | the certificate, sealed        | no             |
//!
//! The values are opaque bytes here: the binary decides what a challenge
//! answer holds and seals certificates before they reach etcd.

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};

use super::Store;
use crate::error::Result;

/// Everything under the ACME keys at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcmeListing {
    /// Name → the host that orders it.
    pub locks: BTreeMap<String, String>,
    /// (host, id) → challenge answer.
    pub challenges: BTreeMap<(String, String), Vec<u8>>,
    /// Name → sealed certificate.
    pub certs: BTreeMap<String, Vec<u8>>,
    pub revision: i64,
}

impl Store {
    /// Take the right to order `name` for `host`, bound to `lease` (it
    /// goes with the host). True when `host` holds it now (taken, or held
    /// already: then bound to `lease`, the host's current one).
    pub async fn acme_claim(&self, name: &str, host: &str, lease: i64) -> Result<bool> {
        self.sign_in().await?;
        let key = self.key("acmelock", name);
        let put = || TxnOp::put(key.clone(), host, Some(PutOptions::new().with_lease(lease)));
        let mut kv = self.client.kv_client();
        let fresh = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([put()]);
        if kv.txn(fresh).await?.succeeded() {
            return Ok(true);
        }
        // Ours already (say from before a restart): keep it, on our lease.
        let ours = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, host)])
            .and_then([put()]);
        Ok(kv.txn(ours).await?.succeeded())
    }

    /// Publish one challenge answer of `host` (bound to its `lease`).
    pub async fn acme_put_challenge(
        &self,
        host: &str,
        lease: i64,
        id: &str,
        value: &[u8],
    ) -> Result<()> {
        self.sign_in().await?;
        let key = self.key("acmechal", &format!("{host}/{id}"));
        self.client
            .kv_client()
            .put(key, value, Some(PutOptions::new().with_lease(lease)))
            .await?;
        Ok(())
    }

    pub async fn acme_delete_challenge(&self, host: &str, id: &str) -> Result<()> {
        self.sign_in().await?;
        let key = self.key("acmechal", &format!("{host}/{id}"));
        self.client.kv_client().delete(key, None).await?;
        Ok(())
    }

    /// Store the (sealed) certificate of `name` for every host.
    pub async fn acme_put_cert(&self, name: &str, sealed: &[u8]) -> Result<()> {
        self.sign_in().await?;
        self.client
            .kv_client()
            .put(self.key("acmecert", name), sealed, None)
            .await?;
        Ok(())
    }

    /// Every lock, challenge answer and certificate.
    pub async fn acme_list(&self) -> Result<AcmeListing> {
        self.sign_in().await?;
        let mut kv = self.client.kv_client();
        let mut out = AcmeListing::default();
        let mut revision = 0;
        for kind in ["acmelock", "acmechal", "acmecert"] {
            let base = self.key(kind, "");
            let opts = GetOptions::new().with_prefix();
            // One revision for all three: the later reads at the first's.
            let opts = if revision > 0 {
                opts.with_revision(revision)
            } else {
                opts
            };
            let resp = kv.get(base.clone(), Some(opts)).await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                let Some(rest) = kv.key_str().ok().and_then(|k| k.strip_prefix(&base)) else {
                    continue;
                };
                match kind {
                    "acmelock" => {
                        if let Ok(v) = kv.value_str() {
                            out.locks.insert(rest.to_owned(), v.to_owned());
                        }
                    }
                    "acmechal" => {
                        if let Some((host, id)) = rest.split_once('/') {
                            out.challenges
                                .insert((host.to_owned(), id.to_owned()), kv.value().to_vec());
                        }
                    }
                    _ => {
                        out.certs.insert(rest.to_owned(), kv.value().to_vec());
                    }
                }
            }
        }
        out.revision = revision;
        Ok(out)
    }

    /// Changes of any ACME key from `revision` on (list again on each).
    pub async fn acme_watch(&self, revision: i64) -> Result<etcd_client::WatchStream> {
        self.sign_in().await?;
        let mut w = self.client.watch_client();
        // The three kinds share the prefix `acme`.
        Ok(w.watch(
            self.key("acme", "").trim_end_matches('/').to_owned(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision),
            ),
        )
        .await?)
    }
}
