//! `portless`: the binary. CLI and configuration, Docker discovery, cluster
//! sync, the admin API, and the wiring of the dns, router and netplane
//! libraries. Only this crate knows Docker.

mod acme_cluster;
mod admin;
mod api;
mod catalog;
mod cluster;
mod config;
mod discovery;
mod dns;
mod docker;
mod ifaddrs;
mod metrics;
mod namespace;
mod plugin;
mod router_task;
mod routes;
mod status;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;

use crate::catalog::Snapshot;
use crate::config::{Cli, Command, Config, EXIT_CONFIG, LogFormat};
use crate::docker::DockerHost;

// mimalloc: the router allocates per request (hyper's heads and bodies);
// glibc malloc was 6% of its CPU under load (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse_args() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_CONFIG } else { 0 };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portless: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Run(args) => {
            let cfg = match resolve(*args) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            init_tracing(&cfg.log, cfg.log_format);
            match runtime.block_on(run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("portless: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status(args) => match runtime.block_on(status_cmd(args)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(EXIT_UNHEALTHY),
            Err(e) => {
                eprintln!("portless status: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Netplane(config::NetplaneCommand::Cleanup(args)) => {
            let cfg = match resolve(*args) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            init_tracing(&cfg.log, cfg.log_format);
            let (report, error) =
                runtime.block_on(cluster::cleanup(cfg.cluster.as_ref(), &cfg.docker));
            // What was done is said even when a part failed.
            print!("{report}");
            match error {
                None => ExitCode::SUCCESS,
                Some(e) => {
                    eprintln!("portless netplane cleanup: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The validated configuration, or the exit code of a bad one (after
/// saying why).
fn resolve(args: config::RunArgs) -> Result<Config, ExitCode> {
    args.resolve().map_err(|e| {
        eprintln!("portless: {e}");
        ExitCode::from(EXIT_CONFIG as u8)
    })
}

fn init_tracing(filter: &str, format: LogFormat) {
    use std::io::IsTerminal;
    // `resolve` has checked the filter already.
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colour codes only for a person at a terminal, never into a file,
        // journald or `docker logs`.
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    // Discovery publishes this host's catalog into `local`; consumers (DNS,
    // router, admin) read `snapshots`: the same catalog, or in cluster mode
    // the catalog with every other host's containers merged in.
    let (local_tx, local_rx) = watch::channel(Snapshot::default());
    let discovery_metrics = Arc::new(discovery::DiscoveryMetrics::default());
    let docker_enabled = cfg.docker != DockerHost::None;
    // Keeps the channel open without Docker, so receivers never see it close.
    let _idle_sender = if docker_enabled {
        // Fail fast on a socket path that cannot work at all; a daemon that
        // is merely down is retried in the background.
        docker::connect(&cfg.docker)?;
        tokio::spawn(discovery::run(
            cfg.docker.clone(),
            local_tx,
            discovery_metrics.clone(),
        ));
        None
    } else {
        tracing::info!("Docker discovery off (--docker-host none)");
        Some(local_tx)
    };
    let cluster = match cfg.cluster.clone() {
        Some(c) => Some(
            cluster::run(c, &cfg.docker, local_rx.clone())
                .await
                .context("starting cluster mode")?,
        ),
        None => None,
    };
    let snap_rx = match (&cluster, &cfg.cluster) {
        (Some(handle), Some(c)) => {
            let (tx, rx) = watch::channel(Snapshot::default());
            tokio::spawn(namespace::run(
                local_rx,
                handle.remote(),
                handle.publisher(),
                tx,
                c.docker_network.clone(),
            ));
            rx
        }
        _ => local_rx,
    };
    let dns = dns::start(&cfg.dns, snap_rx.clone())
        .await
        .context("starting DNS")?;
    // Automatic HTTPS in a cluster: one host orders each certificate, all
    // answer its challenges and serve it (src/acme_cluster.rs).
    let acme_cluster = match (
        &cluster,
        cfg.router
            .acme
            .as_ref()
            .and_then(|a| a.cluster_key.as_ref()),
    ) {
        (Some(handle), Some(key)) if cfg.router.enabled => Some(acme_cluster::Setup::new(
            handle
                .store()
                .await
                .context("automatic HTTPS: connecting to etcd")?,
            handle.lease(),
            acme_cluster::Sealer::from_file(key)?,
        )),
        _ => None,
    };
    // ACME's DNS-01 answers (wildcard hosts) become the DNS's TXT records.
    let dns01 = router_task::Dns01 {
        txt: dns.txt.clone(),
        zones: cfg
            .dns
            .ingress_zones
            .iter()
            .map(|z| z.zone.clone())
            .collect(),
    };
    let router = router_task::start(&cfg.router, snap_rx.clone(), dns01, acme_cluster)
        .await
        .context("starting the router")?;
    let admin_state = Arc::new(admin::AdminState {
        snapshots: snap_rx,
        discovery: discovery_metrics,
        docker_enabled,
        dns,
        router,
        cluster: cluster.as_ref().map(cluster::ClusterHandle::status_source),
    });
    admin::start(cfg.admin_listen, admin_state).await?;
    tracing::info!("portless running");
    shutdown_signal().await;
    tracing::info!("portless stopping");
    if let Some(cluster) = cluster {
        cluster.shutdown().await.context("stopping cluster mode")?;
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// `portless status`'s exit code when the sidecar answers but a part of it
/// is unhealthy (1: it could not be asked at all).
const EXIT_UNHEALTHY: u8 = 2;

/// Print the status; `Ok(false)` when a part is unhealthy.
async fn status_cmd(args: config::StatusArgs) -> anyhow::Result<bool> {
    let status: api::Status = serde_json::from_str(&status::get(args.admin, "/api/status").await?)
        .context("decoding /api/status")?;
    let routes: Option<api::Routes> = status::get_optional(args.admin, "/api/routes")
        .await?
        .map(|b| serde_json::from_str(&b))
        .transpose()
        .context("decoding /api/routes")?;
    let cluster: Option<api::Cluster> = status::get_optional(args.admin, "/api/cluster")
        .await?
        .map(|b| serde_json::from_str(&b))
        .transpose()
        .context("decoding /api/cluster")?;
    let problems = status::problems(&status, cluster.as_ref());
    let healthy = problems.is_empty();
    if args.json {
        let report = api::Report {
            status,
            routes,
            cluster,
            problems,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(healthy);
    }
    print!("{}", status::render(&status));
    if let Some(routes) = &routes {
        print!("{}", status::render_routes(routes));
    }
    if let Some(cluster) = &cluster {
        print!("{}", status::render_cluster(cluster));
    }
    if healthy {
        println!("\nHEALTHY");
    } else {
        println!("\nUNHEALTHY:");
        for p in &problems {
            println!("  {p}");
        }
    }
    Ok(healthy)
}
