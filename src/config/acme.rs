//! Automatic HTTPS options (ACME). See `super` for the pattern. In TOML
//! they form an `[acme]` table.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use portless_router::acme::{AcmeOptions, ChallengeKind};
use serde::{Deserialize, Serialize};

use super::cluster::DEFAULT_STATE_DIR;
use super::{ConfigError, Merge, millis_of, value};

/// Let's Encrypt's directories, by the short names `--acme-directory`
/// takes.
const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

#[derive(Debug, Default, Clone, Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AcmeOpts {
    /// Turn automatic HTTPS on: the ACME server's directory URL, or
    /// `letsencrypt` / `letsencrypt-staging`. Every exact host of a route
    /// then gets a certificate from it, renewed on its own. [default: off]
    #[arg(long, env = "PORTLESS_ACME_DIRECTORY", value_name = "URL")]
    pub acme_directory: Option<String>,
    /// Contact address for the ACME account (expiry notices).
    #[arg(long, env = "PORTLESS_ACME_EMAIL", value_name = "ADDRESS")]
    pub acme_email: Option<String>,
    /// PEM file of CA certificates to trust for the ACME server's own
    /// HTTPS (a private ACME server), beside the system's.
    #[arg(long, env = "PORTLESS_ACME_CA", value_name = "FILE")]
    pub acme_ca: Option<PathBuf>,
    /// Where the ACME account and certificates are kept (0700; keys 0600).
    #[arg(long, env = "PORTLESS_ACME_DIR", value_name = "DIR")]
    pub acme_dir: Option<PathBuf>,
    /// Challenge types in order of preference; the first the server offers
    /// is used (wildcard hosts: always dns-01).
    #[arg(
        long,
        env = "PORTLESS_ACME_CHALLENGE",
        value_name = "TYPE",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub acme_challenge: Vec<String>,
    /// The wait before a failed order is tried again, doubling with each
    /// failure up to 6 hours, and never shorter than the server's
    /// Retry-After.
    #[arg(long, env = "PORTLESS_ACME_RETRY_MS", value_name = "MS")]
    pub acme_retry_ms: Option<u64>,
    /// Cluster mode: the key (a file of 64 hex digits, `openssl rand -hex
    /// 32`, the same on every host) that seals the certificates one host
    /// orders and the others take from etcd. Needed with ACME in cluster
    /// mode.
    #[arg(long, env = "PORTLESS_ACME_CLUSTER_KEY", value_name = "FILE")]
    pub acme_cluster_key: Option<PathBuf>,
}
crate::merge_fields!(AcmeOpts {
    acme_directory,
    acme_email,
    acme_ca,
    acme_dir,
    acme_challenge,
    acme_retry_ms,
    acme_cluster_key,
});

/// Resolved ACME settings: the router library's options, and the binary's
/// own part of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    pub options: AcmeOptions,
    /// In cluster mode: the file of the key that seals the certificates
    /// shared between hosts (`crate::acme_cluster`).
    pub cluster_key: Option<PathBuf>,
}

impl AcmeOpts {
    /// Every fixed default of the ACME options (from the router library's
    /// [`AcmeOptions::new`]): the one source that resolution, `--help` and
    /// the README's reference read.
    pub fn defaults() -> Self {
        let d = AcmeOptions::new("", PathBuf::from(DEFAULT_STATE_DIR).join("acme"));
        AcmeOpts {
            acme_dir: Some(d.dir),
            acme_challenge: d.challenges.iter().map(|c| c.as_str().to_owned()).collect(),
            acme_retry_ms: Some(millis_of(d.retry_base)),
            ..AcmeOpts::default()
        }
    }

    /// Fill in the defaults, then validate; `None` when ACME is off.
    pub fn resolve(self) -> Result<Option<AcmeConfig>, ConfigError> {
        let Some(directory) = self.acme_directory.clone() else {
            // Options with no default, given without a server: a mistake
            // worth a word (the others are harmless).
            let set = [
                (self.acme_email.is_some(), "--acme-email"),
                (self.acme_ca.is_some(), "--acme-ca"),
                (self.acme_cluster_key.is_some(), "--acme-cluster-key"),
            ];
            if let Some((_, name)) = set.iter().find(|(on, _)| *on) {
                return Err(ConfigError::new(format!(
                    "{name} needs --acme-directory: ACME is off without it"
                )));
            }
            return Ok(None);
        };
        let directory = match directory.trim() {
            "letsencrypt" => LETSENCRYPT.to_owned(),
            "letsencrypt-staging" => LETSENCRYPT_STAGING.to_owned(),
            url => {
                let ok = url
                    .parse::<http::Uri>()
                    .is_ok_and(|u| u.scheme_str() == Some("https") && u.host().is_some());
                if !ok {
                    return Err(ConfigError::new(format!(
                        "--acme-directory {url}: an https:// URL, letsencrypt or letsencrypt-staging"
                    )));
                }
                url.to_owned()
            }
        };
        let o = self.merge(Self::defaults());
        let dir = value(o.acme_dir, "acme-dir")?;
        if dir.exists() && !dir.is_dir() {
            return Err(ConfigError::new(format!(
                "--acme-dir {}: not a directory",
                dir.display()
            )));
        }
        let mut opts = AcmeOptions::new(directory, dir);
        if let Some(email) = o.acme_email {
            let email = email.trim().trim_start_matches("mailto:").to_owned();
            let valid = email
                .split_once('@')
                .is_some_and(|(user, host)| !user.is_empty() && host.contains('.'))
                && !email.contains(char::is_whitespace);
            if !valid {
                return Err(ConfigError::new(format!(
                    "--acme-email {email}: not a mail address"
                )));
            }
            opts.email = Some(email);
        }
        if let Some(ca) = o.acme_ca {
            if !ca.is_file() {
                return Err(ConfigError::new(format!(
                    "--acme-ca {}: not a readable file",
                    ca.display()
                )));
            }
            opts.ca_file = Some(ca);
        }
        {
            let mut kinds = Vec::new();
            for c in &o.acme_challenge {
                let kind = ChallengeKind::parse(c).ok_or_else(|| {
                    ConfigError::new(format!("--acme-challenge {c}: http-01 or tls-alpn-01"))
                })?;
                if !kinds.contains(&kind) {
                    kinds.push(kind);
                }
            }
            if kinds.is_empty() {
                return Err(ConfigError::new(
                    "--acme-challenge: at least one of http-01, tls-alpn-01",
                ));
            }
            opts.challenges = kinds;
        }
        let ms = value(o.acme_retry_ms, "acme-retry-ms")?;
        if !(100..=86_400_000).contains(&ms) {
            return Err(ConfigError::new(
                "--acme-retry-ms: between 100 and 86400000",
            ));
        }
        opts.retry_base = Duration::from_millis(ms);
        let cluster_key = o.acme_cluster_key;
        if let Some(key) = &cluster_key
            && !key.is_file()
        {
            return Err(ConfigError::new(format!(
                "--acme-cluster-key {}: not a readable file",
                key.display()
            )));
        }
        Ok(Some(AcmeConfig {
            options: opts,
            cluster_key,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic in a test is a failed test
mod tests {
    use super::*;

    #[test]
    fn off_by_default_and_a_contact_or_ca_without_a_directory_is_refused() {
        assert!(AcmeOpts::default().resolve().unwrap().is_none());
        let o = AcmeOpts {
            acme_email: Some("ops@example.com".into()),
            ..Default::default()
        };
        let e = o.resolve().unwrap_err().to_string();
        assert!(e.contains("--acme-email needs --acme-directory"), "{e}");
    }

    #[test]
    fn values_are_checked() {
        let with = |f: fn(&mut AcmeOpts)| {
            let mut o = AcmeOpts {
                acme_directory: Some("letsencrypt-staging".into()),
                acme_dir: Some(std::env::temp_dir().join("portless-acme-config-test")),
                ..Default::default()
            };
            f(&mut o);
            o.resolve()
        };
        let c = with(|_| {}).unwrap().unwrap();
        assert_eq!(c.options.directory, LETSENCRYPT_STAGING);
        assert_eq!(
            c.options.challenges,
            [ChallengeKind::Http01, ChallengeKind::TlsAlpn01]
        );
        assert!(with(|o| o.acme_directory = Some("http://acme.test/dir".into())).is_err());
        assert!(with(|o| o.acme_directory = Some("not a url".into())).is_err());
        assert!(with(|o| o.acme_email = Some("nobody".into())).is_err());
        assert!(with(|o| o.acme_ca = Some("/nonexistent/ca.pem".into())).is_err());
        assert!(with(|o| o.acme_challenge = vec!["dns-01".into()]).is_err());
        assert!(with(|o| o.acme_retry_ms = Some(0)).is_err());
        let c = with(|o| {
            o.acme_challenge = vec!["tls-alpn-01".into()];
            o.acme_email = Some("mailto:ops@example.com".into());
        })
        .unwrap()
        .unwrap();
        assert_eq!(c.options.challenges, [ChallengeKind::TlsAlpn01]);
        assert_eq!(c.options.email.as_deref(), Some("ops@example.com"));
    }

    #[test]
    fn toml_table_parses_and_rejects_unknown_keys() {
        let o: AcmeOpts = toml::from_str(
            "acme-directory = \"https://acme.example.test/dir\"\nacme-challenge = [\"tls-alpn-01\", \"http-01\"]\n",
        )
        .unwrap();
        let c = o.resolve().unwrap().unwrap();
        assert_eq!(c.options.directory, "https://acme.example.test/dir");
        assert_eq!(
            c.options.challenges,
            [ChallengeKind::TlsAlpn01, ChallengeKind::Http01]
        );
        assert!(toml::from_str::<AcmeOpts>("directory = \"x\"").is_err());
    }
}
