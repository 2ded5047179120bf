//! Benchmark driver for bench/router.sh: the router library as the binary
//! runs it, with a fixed route table instead of Docker discovery.
//!
//! ```text
//! router_bench serve LISTEN HOST BACKEND [EXTRA_ROUTES]
//! router_bench lookup ROUTES LOOKUPS
//! ```
//! `serve` routes HOST to BACKEND (plus EXTRA_ROUTES other routes) and
//! prints `ready` when listening; with `PORTLESS_BENCH_ACCESS_LOG=PATH`
//! (or `-`) it logs every request there. `lookup` builds a table of ROUTES routes
//! and prints the mean cost of normalising a host and finding its route.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Instant;

use portless_router::host::{HostPattern, normalize_authority};

// The binary's allocator, so that the library runs as `portless run` runs it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use portless_router::{
    Backend, BackendState, RouteSpec, RouteTable, Router, RouterOptions, Scheme, bind_reuseport,
};

fn spec(host: &str, path: &str, addr: SocketAddr, id: String) -> RouteSpec {
    RouteSpec {
        hosts: vec![HostPattern::parse(host).unwrap()],
        path_prefix: path.to_owned(),
        backends: vec![Backend {
            name: id.clone(),
            id,
            addr,
            scheme: Scheme::Http,
            state: BackendState::Healthy,
        }],
    }
}

/// N routes shaped like a real host's: mostly exact hosts, some wildcards,
/// some path prefixes.
fn routes(n: usize) -> Vec<RouteSpec> {
    (0..n)
        .map(|i| {
            let addr = SocketAddr::from(([10, 255, (i / 250) as u8, (i % 250) as u8 + 1], 8080));
            match i % 10 {
                0 => spec(&format!("*.w{i}.bench.test"), "/", addr, format!("c{i}")),
                1 => spec(&format!("app{i}.bench.test"), "/api", addr, format!("c{i}")),
                _ => spec(&format!("app{i}.bench.test"), "/", addr, format!("c{i}")),
            }
        })
        .collect()
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => {
            let listen: SocketAddr = args[1].parse().unwrap();
            let host = args[2].clone();
            let backend: SocketAddr = args[3].parse().unwrap();
            let extra: usize = args.get(4).map_or(0, |s| s.parse().unwrap());
            // As the binary runs it: one thread per core, each with its
            // own runtime, listener (SO_REUSEPORT) and upstream pool.
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            // PORTLESS_BENCH_ACCESS_LOG=PATH|-: with the access log on, to
            // measure what it costs (bench/router_instr.sh passes it on).
            let access_log = std::env::var("PORTLESS_BENCH_ACCESS_LOG").ok().map(|t| {
                portless_router::access_log::AccessLog::open(
                    portless_router::access_log::Target::parse(&t),
                )
                .unwrap()
            });
            let router = Router::new(RouterOptions {
                access_log,
                ..RouterOptions::default()
            });
            let mut specs = routes(extra);
            specs.push(spec(&host, "/", backend, "bench".into()));
            router.update(specs);
            let listeners = bind_reuseport(listen, threads).unwrap();
            // Kept for the life of the process: dropping it stops serving.
            let _running = router.spawn_threads(listeners, Vec::new(), None).unwrap();
            println!("ready");
            // Serve until killed.
            loop {
                std::thread::park();
            }
        }
        Some("lookup") => {
            let n: usize = args[1].parse().unwrap();
            let lookups: usize = args[2].parse().unwrap();
            let t0 = Instant::now();
            let table = RouteTable::build(routes(n));
            let build = t0.elapsed();
            // Authorities as clients send them: mixed case, with port,
            // hitting exact hosts, wildcards, paths and misses.
            let hosts: Vec<String> = (0..1024)
                .map(|k| {
                    let i = (k * 7919) % n.max(1);
                    match k % 4 {
                        0 => format!("x.W{i}.bench.test:80"),
                        1 => format!("miss{k}.bench.test"),
                        _ => format!("App{i}.bench.test:8080"),
                    }
                })
                .collect();
            let mut found = 0usize;
            let t = Instant::now();
            for k in 0..lookups {
                let h = &hosts[k % hosts.len()];
                if let Some(norm) = normalize_authority(h)
                    && table.find(&norm, "/api/items").is_some()
                {
                    found += 1;
                }
            }
            let per = t.elapsed().as_nanos() as f64 / lookups as f64;
            println!(
                "routes={n} build_ms={:.1} lookups={lookups} found={found} ns_per_lookup={per:.1}",
                build.as_secs_f64() * 1000.0
            );
        }
        _ => {
            eprintln!(
                "usage: router_bench serve LISTEN HOST BACKEND [EXTRA_ROUTES] | lookup ROUTES LOOKUPS"
            );
            return std::process::ExitCode::from(64);
        }
    }
    std::process::ExitCode::SUCCESS
}
