//! Wiring of the router: bind its listeners, load certificates, and keep
//! the route table in step with the catalog.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use portless_router::access_log::AccessLog;
use portless_router::acme::{AcmeState, CertStatus, Issuer};
use portless_router::tls::{self, CertResolver};
use portless_router::{Router, RouterThreads, bind_reuseport};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::api;
use crate::catalog::Snapshot;
use crate::config::router::RouterConfig;
use crate::dns::TxtRecords;
use crate::routes::{self, AddressChoice, RouteProblem};

/// How often the certificate directory is checked for changes.
const CERT_POLL: Duration = Duration::from_secs(2);

/// A running router. Dropping it stops the listeners and the sync task;
/// connections already open finish on their own tasks.
pub struct RouterHandle {
    router: Router,
    state: Arc<ArcSwap<PlanState>>,
    certs: Option<Arc<CertResolver>>,
    /// With automatic HTTPS: each host's certificate state.
    acme: Option<Arc<AcmeState>>,
    /// The bound plain-HTTP address (useful with port 0).
    pub http_addr: SocketAddr,
    /// The bound HTTPS address, when certificates are configured.
    pub https_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    /// Dropping it stops the serving threads.
    _threads: RouterThreads,
}

#[derive(Default)]
struct PlanState {
    choices: Vec<AddressChoice>,
    problems: Vec<RouteProblem>,
}

impl Drop for RouterHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl RouterHandle {
    /// `/api/routes`.
    pub fn routes(&self) -> api::Routes {
        let state = self.state.load();
        let routes = self
            .router
            .status()
            .into_iter()
            .map(|r| api::Route {
                route: r.key,
                host: r.host,
                path: r.path_prefix,
                requests: r.requests,
                backends: r
                    .backends
                    .into_iter()
                    .map(|b| api::Backend {
                        id: b.id,
                        container: b.name,
                        addr: b.addr,
                        scheme: b.scheme.as_str().to_owned(),
                        state: b.state.to_owned(),
                        in_flight: b.in_flight,
                        requests: b.requests,
                        connect_failures: b.connect_failures,
                    })
                    .collect(),
            })
            .collect();
        let certificates = self
            .certs
            .as_ref()
            .map(|c| c.names())
            .unwrap_or_default()
            .into_iter()
            .map(|(name, file)| api::Certificate {
                name,
                file: file.display().to_string(),
            })
            .collect();
        api::Routes {
            http_listen: self.http_addr,
            https_listen: self.https_addr,
            routes,
            addresses: state.choices.clone(),
            not_routed: state.problems.clone(),
            certificates,
            acme: self.acme.as_ref().map(|a| {
                a.status()
                    .into_iter()
                    .map(|c| api::AcmeCertificate {
                        host: c.host,
                        state: c.phase.as_str().to_owned(),
                        not_after: c.not_after.map(unix_secs),
                        next_attempt: c.next_attempt.map(unix_secs),
                        last_error: c.last_error,
                        failures: c.failures,
                        orders: c.orders,
                    })
                    .collect()
            }),
        }
    }

    /// The router's counters, for `/metrics`.
    pub fn metrics(&self) -> portless_router::metrics::Snapshot {
        self.router.metrics()
    }

    /// Automatic HTTPS, for `/metrics`: each host's certificate state and
    /// the orders by result (issued, failed); None when it is off.
    pub fn acme(&self) -> Option<(Vec<CertStatus>, (u64, u64))> {
        self.acme.as_ref().map(|a| (a.status(), a.orders()))
    }
}

/// Seconds since the Unix epoch.
fn unix_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Start the router unless `--no-router`: load certificates, bind its
/// listeners, and follow the catalog. Returns once everything is bound;
/// errors (bind, certificates) are meant to stop the program.
pub async fn start(
    cfg: &RouterConfig,
    snapshots: watch::Receiver<Snapshot>,
    dns01: Dns01,
    acme_cluster: Option<crate::acme_cluster::Setup>,
) -> anyhow::Result<Option<RouterHandle>> {
    if !cfg.enabled {
        info!("router off (--no-router)");
        return Ok(None);
    }
    run(cfg.clone(), snapshots, dns01, acme_cluster)
        .await
        .map(Some)
}

/// Where ACME's DNS-01 answers go: the DNS's TXT records, served for names
/// inside the ingress zones (the router and the DNS never meet but here).
pub struct Dns01 {
    pub txt: watch::Sender<TxtRecords>,
    /// The ingress zones, lower case, no trailing dot.
    pub zones: Vec<String>,
}

async fn run(
    cfg: RouterConfig,
    mut snapshots: watch::Receiver<Snapshot>,
    dns01: Dns01,
    acme_cluster: Option<crate::acme_cluster::Setup>,
) -> anyhow::Result<RouterHandle> {
    let mut opts = cfg.options.clone();
    let mut tasks = Vec::new();
    if let Some(target) = &cfg.access_log {
        let log = AccessLog::open(target.clone())
            .with_context(|| format!("opening the access log {target:?}"))?;
        // SIGHUP reopens the file (after a rotation that kept its name, or
        // by hand); a file moved away is noticed without it.
        let hup = log.clone();
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("listening for SIGHUP")?;
        tasks.push(tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                info!("SIGHUP: reopening the access log");
                hup.reopen();
            }
        }));
        opts.access_log = Some(log);
    }

    // Certificates before any socket: a bad directory stops start-up.
    let mut tls = None;
    let acme_state = cfg.acme.as_ref().map(|_| Arc::new(AcmeState::default()));
    if let Some(addr) = cfg.https_listen {
        let store = match &cfg.cert_dir {
            Some(dir) => {
                let (store, problems) = tls::load_cert_dir(dir)
                    .with_context(|| format!("loading certificates from {}", dir.display()))?;
                for p in &problems {
                    warn!(error = %p, "certificate skipped");
                }
                if store.is_empty() && acme_state.is_none() {
                    warn!(dir = %dir.display(), "no usable certificate yet; HTTPS handshakes fail until one appears");
                }
                store
            }
            None => tls::CertStore::default(),
        };
        let resolver = Arc::new(match &acme_state {
            Some(acme) => CertResolver::with_acme(store, acme.clone()),
            None => CertResolver::new(store),
        });
        let config = tls::server_config(resolver.clone()).context("TLS configuration")?;
        tls = Some((addr, resolver, config));
    }
    // The ACME store (and the certificates kept in it) before any socket
    // too: an unusable --acme-dir or --acme-ca stops start-up, and a
    // restart serves the stored certificates from its first handshake.
    let mut issuer = None;
    if let (Some(acme_cfg), Some(state), Some((_, resolver, _))) = (&cfg.acme, &acme_state, &tls) {
        let mut acme_cfg = acme_cfg.options.clone();
        acme_cfg.dns01_zones = dns01.zones;
        let dir = acme_cfg.dir.clone();
        let mut built = Issuer::new(acme_cfg, state.clone(), resolver.clone())
            .with_context(|| format!("automatic HTTPS: the ACME store in {}", dir.display()))?
            .with_dns01(dns01.txt.clone());
        if let Some(setup) = acme_cluster {
            let link = setup.start(state.clone(), dns01.txt);
            built = built.with_cluster(link.coord, link.incoming);
        }
        issuer = Some(built);
        opts.acme = Some(state.clone());
    }

    // One listening socket per thread (SO_REUSEPORT): the kernel spreads
    // connections, and each thread serves its own with its own pool.
    let http = bind_reuseport(cfg.http_listen, cfg.threads)
        .with_context(|| format!("binding the router's HTTP listener {}", cfg.http_listen))?;
    let http_addr = http[0].local_addr()?;
    let mut https = Vec::new();
    let mut https_addr = None;
    let mut certs = None;
    let mut tls_config = None;
    if let Some((addr, resolver, config)) = tls {
        https = bind_reuseport(addr, cfg.threads)
            .with_context(|| format!("binding the router's HTTPS listener {addr}"))?;
        https_addr = Some(https[0].local_addr()?);
        if let Some(dir) = cfg.cert_dir.clone() {
            tasks.push(tokio::spawn(tls::watch_cert_dir(
                dir,
                resolver.clone(),
                CERT_POLL,
            )));
        }
        certs = Some(resolver);
        tls_config = Some(config);
    }
    // The port the HTTPS listener got (`--https-listen ADDR:0` picks one).
    if cfg.redirect_https {
        opts.redirect_https_port = https_addr.map(|a| a.port());
    }
    let router = Router::new(opts);
    let threads = router
        .spawn_threads(http, https, tls_config)
        .context("starting the router's threads")?;
    if let Some(issuer) = issuer {
        // Ordered only for the names the route table claims.
        tasks.push(tokio::spawn(issuer.run(router.hosts())));
    }

    let state = Arc::new(ArcSwap::from_pointee(PlanState::default()));
    let sync_router = router.clone();
    let sync_state = state.clone();
    tasks.push(tokio::spawn(async move {
        let mut reported: BTreeSet<(String, String)> = BTreeSet::new();
        let mut chosen: Vec<AddressChoice> = Vec::new();
        loop {
            let catalog = snapshots.borrow_and_update().catalog.clone();
            let plan = routes::plan(&catalog);
            let now: BTreeSet<(String, String)> = plan
                .problems
                .iter()
                .map(|p| (p.container.clone(), p.reason.clone()))
                .collect();
            for (container, reason) in now.difference(&reported) {
                warn!(%container, %reason, "container not routed");
            }
            reported = now;
            for c in plan.choices.iter().filter(|c| !chosen.contains(c)) {
                debug!(
                    container = %c.container,
                    group = %c.group,
                    network = %c.network,
                    addr = %c.addr,
                    chosen_by = c.chosen_by.as_str(),
                    "route address"
                );
            }
            chosen = plan.choices.clone();
            let n = plan.specs.len();
            sync_router.update(plan.specs);
            sync_state.store(Arc::new(PlanState {
                choices: plan.choices,
                problems: plan.problems,
            }));
            debug!(specs = n, "routes synced from catalog");
            if snapshots.changed().await.is_err() {
                // Discovery is gone: keep serving the last table.
                break;
            }
        }
    }));
    info!(http = %http_addr, https = ?https_addr, "router started");
    Ok(RouterHandle {
        router,
        state,
        certs,
        acme: acme_state,
        http_addr,
        https_addr,
        tasks,
        _threads: threads,
    })
}
