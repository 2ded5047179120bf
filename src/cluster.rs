//! Cluster mode: the netplane agent of this host, the Docker bridge network
//! on its leased subnet, and `portless netplane cleanup`.
//!
//! The agent itself (lease, peer watch, reconcile, iptables) lives in
//! `portless-netplane`; this module only adds what needs Docker or the
//! binary's configuration.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bollard::Docker;
use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
use bollard::query_parameters::ListNetworksOptions;
use portless_netplane::agent::{self, Agent, AgentConfig, HostStatus};
use portless_netplane::netlink::Kernel;
use portless_netplane::segment;
use portless_netplane::store::Store;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api;
use crate::catalog::Snapshot;
use crate::config::cluster::ClusterConfig;
use crate::docker::DockerHost;

/// Label on every Docker network portless creates; cleanup removes exactly
/// the networks that carry it.
pub const NETWORK_LABEL: &str = "io.portless.netplane";
const MTU_OPTION: &str = "com.docker.network.driver.mtu";

/// A cheap, cloneable source of [`api::Cluster`] snapshots for the admin API.
#[derive(Clone)]
pub struct ClusterStatusSource {
    netplane: watch::Receiver<agent::Status>,
    docker: Option<Arc<Mutex<api::DockerNetwork>>>,
    bridge: Option<String>,
}

impl ClusterStatusSource {
    pub fn snapshot(&self) -> api::Cluster {
        api::Cluster {
            netplane: self.netplane.borrow().clone(),
            docker_network: self
                .docker
                .as_ref()
                .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).clone()),
            bridge: self.bridge.clone(),
        }
    }
}

/// The running cluster mode of this host.
pub struct ClusterHandle {
    agent: Agent,
    cfg: ClusterConfig,
    docker: Option<Docker>,
    source: ClusterStatusSource,
    docker_task: Option<JoinHandle<()>>,
    /// The network plugin's server and network sync (cluster networks).
    plugin_tasks: Vec<JoinHandle<()>>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The resolved agent configuration, with what only the running host
/// knows filled in.
fn agent_config(cfg: &ClusterConfig, docker: &DockerHost) -> AgentConfig {
    let no_docker = *docker == DockerHost::None;
    AgentConfig {
        hostname: hostname(),
        bridge: no_docker.then(|| cfg.bridge.clone()),
        // Docker masquerades its own networks' outbound traffic.
        masquerade_outside: no_docker,
        ..cfg.agent.clone()
    }
}

/// Start cluster mode: the netplane agent (lease, watch, reconcile,
/// records) and, on a Docker host, the bridge network on the leased subnet
/// once the lease is granted, made again whenever it disappears
/// (`local` is discovery's view of this host). Returns at once; progress
/// shows in the status.
pub async fn run(
    cfg: ClusterConfig,
    docker: &DockerHost,
    local: watch::Receiver<Snapshot>,
) -> anyhow::Result<ClusterHandle> {
    let agent = Agent::start(agent_config(&cfg, docker))
        .await
        .context("starting netplane")?;
    let client = match docker {
        DockerHost::None => None,
        host => Some(
            crate::docker::connect(host).context("connecting to Docker for the cluster network")?,
        ),
    };
    let docker_status = client.as_ref().map(|_| {
        Arc::new(Mutex::new(api::DockerNetwork {
            name: cfg.docker_network.clone(),
            ..Default::default()
        }))
    });
    let docker_task = match (&client, &docker_status) {
        (Some(client), Some(st)) => Some(tokio::spawn(follow_network(
            client.clone(),
            st.clone(),
            cfg.docker_network.clone(),
            agent.subscribe(),
            local,
            agent.waker(),
        ))),
        _ => None,
    };
    let plugin_tasks = match (&client, &cfg.plugin_socket) {
        // Cluster networks are an addition to cluster mode: a plugin that
        // cannot be served (a read-only /run in a container that does not
        // mount the host's /run/docker/plugins) leaves the rest running.
        (Some(client), Some(socket)) => {
            match start_plugin(&cfg, socket, &agent, client.clone()).await {
                Ok(tasks) => tasks,
                Err(e) => {
                    tracing::error!(
                        socket = %socket.display(),
                        error = format!("{e:#}"),
                        "the Docker network plugin is not served: cluster networks \
                         (docker network create -d portless) are unavailable on this host; \
                         mount the host's /run/docker/plugins, or --plugin-socket none"
                    );
                    Vec::new()
                }
            }
        }
        _ => Vec::new(),
    };
    let source = ClusterStatusSource {
        netplane: agent.subscribe(),
        docker: docker_status,
        bridge: (*docker == DockerHost::None).then(|| cfg.bridge.clone()),
    };
    Ok(ClusterHandle {
        agent,
        cfg,
        docker: client,
        source,
        docker_task,
        plugin_tasks,
    })
}

/// Serve the `portless` network and IPAM plugin and make the cluster's
/// networks on this Engine (see `crate::plugin`).
async fn start_plugin(
    cfg: &ClusterConfig,
    socket: &std::path::Path,
    agent: &Agent,
    docker: Docker,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let a = &cfg.agent;
    let store = Store::connect_with(&a.etcd, &a.prefix, &a.etcd_access).await?;
    let plugin = crate::plugin::Plugin::new(
        crate::plugin::PluginConfig {
            pool: cfg.network_pool,
            subnet_len: 24,
            cluster: a.cluster,
            cluster_vni: a.vni,
            vxlan_port: a.vxlan_port,
        },
        store,
        agent.kernel().clone(),
        docker,
        agent.subscribe(),
    );
    let server = crate::plugin::serve(plugin.clone(), socket).await?;
    let sync = tokio::spawn(crate::plugin::sync::run(plugin.clone()));
    let plane = tokio::spawn(crate::plugin::plane::run(plugin));
    Ok(vec![server, sync, plane])
}

/// Keep the cluster Docker network in place: (re)ensure it whenever the
/// lease's subnet or MTU changes, and whenever discovery shows it gone or
/// replaced (someone ran `docker network rm`); retry while Docker is away.
async fn follow_network(
    client: Docker,
    st: Arc<Mutex<api::DockerNetwork>>,
    name: String,
    mut lease: watch::Receiver<agent::Status>,
    mut local: watch::Receiver<Snapshot>,
    wake: Arc<tokio::sync::Notify>,
) {
    // The lease and network id last ensured.
    let mut done: Option<((ipnet::Ipv4Net, u32), String)> = None;
    loop {
        let host = lease.borrow_and_update().host.clone();
        let seen = {
            let snap = local.borrow_and_update();
            // Before discovery's first listing the catalog is empty: that
            // says nothing about the network.
            (!snap.catalog.networks.is_empty()).then(|| {
                snap.catalog
                    .networks
                    .values()
                    .find(|n| n.name == name)
                    .map(|n| n.id.clone())
            })
        };
        if let Some(h) = host {
            let want = (h.subnet, h.mtu);
            let stale = match (&done, &seen) {
                (None, _) => true,
                (Some((l, _)), _) if *l != want => true,
                // Gone, or another network of that name now.
                (Some((_, id)), Some(seen)) => seen.as_deref() != Some(id.as_str()),
                (Some(_), None) => false,
            };
            if stale {
                let before = done.as_ref().map(|(_, id)| id.clone());
                let res = ensure_network(&client, &name, &h).await;
                let failed = {
                    let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                    match res {
                        Ok(id) => {
                            if before.as_ref().is_some_and(|b| *b != id) {
                                tracing::warn!(network = %name, "the cluster Docker network was removed or replaced; made it again");
                            }
                            tracing::info!(network = %name, subnet = %h.subnet, mtu = h.mtu, "cluster Docker network ready");
                            s.id = Some(id.clone());
                            s.ready = true;
                            s.error = None;
                            done = Some((want, id));
                            // Docker just added its rules for the network
                            // (and a route via it can be added again):
                            // reconcile now.
                            wake.notify_one();
                            false
                        }
                        Err(e) => {
                            tracing::warn!(network = %name, error = format!("{e:#}"), "cannot ensure the cluster Docker network; retrying");
                            s.ready = false;
                            s.error = Some(format!("{e:#}"));
                            done = None;
                            true
                        }
                    }
                };
                if failed {
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    continue;
                }
            }
        }
        tokio::select! {
            r = lease.changed() => if r.is_err() { return },
            r = local.changed() => if r.is_err() { return },
        }
    }
}

impl ClusterHandle {
    /// A connection of its own to the cluster's etcd (as the agent's).
    pub async fn store(&self) -> anyhow::Result<Store> {
        let a = &self.cfg.agent;
        Ok(Store::connect_with(&a.etcd, &a.prefix, &a.etcd_access).await?)
    }

    /// This host's id and lease, as the agent holds them.
    pub fn lease(&self) -> watch::Receiver<agent::Status> {
        self.agent.subscribe()
    }

    /// Other hosts' checked container records.
    pub fn remote(&self) -> watch::Receiver<Arc<portless_netplane::membership::RemoteView>> {
        self.agent.remote()
    }

    /// Where this host's container records go.
    pub fn publisher(
        &self,
    ) -> watch::Sender<
        std::collections::BTreeMap<String, portless_netplane::records::ContainerRecord>,
    > {
        self.agent.publisher()
    }

    /// Status snapshots for the admin API (`/api/cluster`).
    pub fn status_source(&self) -> ClusterStatusSource {
        self.source.clone()
    }

    /// Stop. With `--cleanup-on-exit`: give the lease back and remove the
    /// Docker network, kernel objects and iptables rules portless created.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(t) = self.docker_task.take() {
            t.abort();
        }
        for t in self.plugin_tasks.drain(..) {
            t.abort();
        }
        if let Some(socket) = &self.cfg.plugin_socket {
            let _ = std::fs::remove_file(socket);
        }
        if !self.cfg.cleanup_on_exit {
            self.agent.stop(false).await?;
            return Ok(());
        }
        let mut first_err = None;
        if let Some(d) = &self.docker
            && let Err(e) = remove_networks(d, Some(&self.cfg.docker_network)).await
        {
            tracing::warn!(
                error = format!("{e:#}"),
                "removing the cluster Docker network failed"
            );
            first_err = Some(e);
        }
        // The cluster networks' links and chains (`-d portless`), as
        // `portless netplane cleanup` removes them; their Docker networks
        // stay (a start of portless takes them up again).
        if let Err(e) = segment::cleanup(self.agent.kernel()).await {
            let e = anyhow::Error::new(e).context("removing the links of cluster networks");
            tracing::warn!(error = format!("{e:#}"), "cleanup on exit");
            first_err.get_or_insert(e);
        }
        self.agent.stop(true).await.context("netplane cleanup")?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn network_matches(
    ipam: Option<&Ipam>,
    options: Option<&HashMap<String, String>>,
    h: &HostStatus,
) -> bool {
    let subnet_ok = ipam.and_then(|i| i.config.as_ref()).is_some_and(|c| {
        c.len() == 1
            && c[0].subnet.as_deref() == Some(h.subnet.to_string().as_str())
            && c[0].gateway.as_deref() == Some(h.gateway.to_string().as_str())
    });
    let mtu_ok = options
        .and_then(|o| o.get(MTU_OPTION))
        .is_some_and(|m| *m == h.mtu.to_string());
    subnet_ok && mtu_ok
}

/// Make sure the bridge network `name` exists on the leased subnet with the
/// right gateway and MTU; returns its id. A network of that name that is
/// not portless's is never touched.
pub async fn ensure_network(docker: &Docker, name: &str, h: &HostStatus) -> anyhow::Result<String> {
    match docker.inspect_network(name, None).await {
        Ok(n) => {
            let ours = n
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(NETWORK_LABEL));
            if !ours {
                anyhow::bail!(
                    "Docker network {name} exists and was not created by portless; \
                     remove it or choose another --docker-network"
                );
            }
            if network_matches(n.ipam.as_ref(), n.options.as_ref(), h) {
                return Ok(n.id.unwrap_or_default());
            }
            let attached = n.containers.as_ref().map_or(0, |c| c.len());
            if attached > 0 {
                anyhow::bail!(
                    "Docker network {name} is on another subnet or MTU than the lease ({} mtu {}) \
                     and has {attached} containers attached; detach them to let portless recreate it",
                    h.subnet,
                    h.mtu
                );
            }
            tracing::info!(network = %name, "recreating the cluster Docker network for a new lease");
            docker
                .remove_network(name)
                .await
                .with_context(|| format!("removing stale network {name}"))?;
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => return Err(e).with_context(|| format!("inspecting network {name}")),
    }
    let req = NetworkCreateRequest {
        name: name.to_owned(),
        driver: Some("bridge".into()),
        attachable: Some(true),
        ipam: Some(Ipam {
            driver: Some("default".into()),
            config: Some(vec![IpamConfig {
                subnet: Some(h.subnet.to_string()),
                gateway: Some(h.gateway.to_string()),
                ..Default::default()
            }]),
            options: None,
        }),
        options: Some(HashMap::from([(MTU_OPTION.to_owned(), h.mtu.to_string())])),
        labels: Some(HashMap::from([
            (NETWORK_LABEL.to_owned(), "1".to_owned()),
            ("io.portless.subnet".to_owned(), h.subnet.to_string()),
        ])),
        ..Default::default()
    };
    let resp = docker
        .create_network(req)
        .await
        .with_context(|| format!("creating network {name} on {}", h.subnet))?;
    Ok(resp.id)
}

/// Remove every Docker network carrying [`NETWORK_LABEL`] (only the one
/// named `only`, if given); the names removed.
pub async fn remove_networks(docker: &Docker, only: Option<&str>) -> anyhow::Result<Vec<String>> {
    let mut filters = HashMap::from([("label".to_owned(), vec![NETWORK_LABEL.to_owned()])]);
    if let Some(name) = only {
        filters.insert("name".to_owned(), vec![name.to_owned()]);
    }
    let nets = docker
        .list_networks(Some(ListNetworksOptions {
            filters: Some(filters),
        }))
        .await
        .context("listing networks")?;
    let mut removed = Vec::new();
    for n in nets {
        let Some(name) = n.name else { continue };
        // Docker's name filter matches substrings.
        if only.is_some_and(|o| o != name) {
            continue;
        }
        docker
            .remove_network(&name)
            .await
            .with_context(|| format!("removing network {name} (are containers still attached?)"))?;
        removed.push(name);
    }
    Ok(removed)
}

/// What `portless netplane cleanup` removed, and what failed.
#[derive(Debug, Default, Serialize)]
pub struct CleanupReport {
    pub netlink_ops: usize,
    /// Links of the cluster networks (`pn-*`) removed.
    pub network_links: usize,
    pub docker_networks: Vec<String>,
    pub lease_released: bool,
    /// Parts that failed, each with its reason; the others were done.
    pub failed: Vec<String>,
}

impl std::fmt::Display for CleanupReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "kernel objects removed: {}", self.netlink_ops)?;
        writeln!(
            f,
            "links of cluster networks (pn-*) removed: {}",
            self.network_links
        )?;
        writeln!(
            f,
            "Docker networks removed: {}",
            if self.docker_networks.is_empty() {
                "none".to_owned()
            } else {
                self.docker_networks.join(", ")
            }
        )?;
        writeln!(
            f,
            "iptables chains removed: PORTLESS-FWD, PORTLESS-NAT, PORTLESS-NETS (filter and nat; if present)"
        )?;
        writeln!(
            f,
            "etcd lease released: {}",
            if self.lease_released { "yes" } else { "no" }
        )?;
        for e in &self.failed {
            writeln!(f, "FAILED: {e}")?;
        }
        Ok(())
    }
}

/// `portless netplane cleanup`: remove every kernel object, iptables rule
/// and Docker network portless created on this host, and nothing else. With
/// cluster options and a reachable etcd, also give this host's lease back
/// so that peers drop it at once. Every part is tried even when another
/// fails; the report says what was done and what failed, and the first
/// failure is returned beside it.
pub async fn cleanup(
    cluster: Option<&ClusterConfig>,
    docker: &DockerHost,
) -> (CleanupReport, Option<anyhow::Error>) {
    let mut report = CleanupReport::default();
    let kernel = match Kernel::spawn(None).context("starting the netlink executor") {
        Ok(k) => k,
        Err(e) => {
            report.failed.push(format!("{e:#}"));
            return (report, Some(e));
        }
    };
    if let Some(cfg) = cluster {
        match release_lease(&kernel, cfg).await {
            Ok(released) => report.lease_released = released,
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "could not release the lease; it expires on its own"
            ),
        }
    }
    let mut first_err: Option<anyhow::Error> = None;
    if *docker != DockerHost::None {
        let docker_part = async {
            let d = crate::docker::connect(docker)?
                .negotiate_version()
                .await
                .context("negotiating the Docker API version")?;
            remove_networks(&d, None).await
        };
        match docker_part.await {
            Ok(names) => report.docker_networks = names,
            Err(e) => {
                report.failed.push(format!("Docker networks: {e:#}"));
                first_err = Some(e);
            }
        }
    }
    match agent::cleanup_kernel(&kernel, true).await {
        Ok(n) => report.netlink_ops = n,
        Err(e) => {
            let e = anyhow::Error::new(e).context("removing kernel objects");
            report.failed.push(format!("{e:#}"));
            first_err.get_or_insert(e);
        }
    }
    // The cluster networks' links (containers still on them lose them)
    // and their chain.
    match segment::cleanup(&kernel).await {
        Ok(n) => report.network_links = n,
        Err(e) => {
            let e = anyhow::Error::new(e).context("removing the links of cluster networks");
            report.failed.push(format!("{e:#}"));
            first_err.get_or_insert(e);
        }
    }
    (report, first_err)
}

async fn release_lease(kernel: &Kernel, cfg: &ClusterConfig) -> anyhow::Result<bool> {
    let agent = &cfg.agent;
    let id = match &agent.host_id {
        Some(id) => id.clone(),
        None => kernel.underlay(agent.advertise).await?.addr.to_string(),
    };
    let store = Store::connect_with(&agent.etcd, &agent.prefix, &agent.etcd_access).await?;
    let key = store.host_key(&id);
    let get = async {
        store.sign_in().await?;
        let mut kv = store.client().kv_client();
        Ok::<_, portless_netplane::Error>(kv.get(key, None).await?)
    };
    let resp = tokio::time::timeout(std::time::Duration::from_secs(5), get)
        .await
        .context("etcd did not answer")??;
    let Some(lease) = resp.kvs().first().map(|k| k.lease()).filter(|l| *l != 0) else {
        return Ok(false);
    };
    store.release(lease).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use portless_netplane::{Mac, Mode};

    fn host(subnet: &str, mtu: u32) -> HostStatus {
        let subnet: ipnet::Ipv4Net = subnet.parse().unwrap();
        HostStatus {
            id: "192.0.2.1".into(),
            hostname: "t".into(),
            subnet,
            gateway: subnet.hosts().next().unwrap(),
            underlay: "192.0.2.1".parse().unwrap(),
            interface: "eth0".into(),
            mode: Mode::Vxlan,
            vtep_mac: Mac::for_vtep("192.0.2.1".parse().unwrap()),
            mtu,
            lease_id: 1,
            lease_ttl: 10,
        }
    }

    struct NetGuard(String);
    impl Drop for NetGuard {
        fn drop(&mut self) {
            let _ = std::process::Command::new("docker")
                .args(["network", "rm", &self.0])
                .output();
        }
    }

    /// Against the real Docker Engine: the network sits on the leased
    /// subnet with the lease's gateway and MTU, is left alone when right,
    /// recreated when the lease changes, never taken over when foreign, and
    /// removed by label.
    #[tokio::test]
    async fn docker_network_follows_the_lease() {
        let d = crate::docker::connect(&DockerHost::default())
            .unwrap()
            .negotiate_version()
            .await
            .expect("the Docker Engine must be running for this test");
        let pid = std::process::id();
        let name = format!("pl-test-net-{pid}");
        let _g = NetGuard(name.clone());
        // Clear of 10.213.0.0/16, where the other Docker tests make networks.
        let third = pid % 250;
        let h = host(&format!("10.216.{third}.0/24"), 1450);

        let id = ensure_network(&d, &name, &h).await.unwrap();
        let n = d.inspect_network(&name, None).await.unwrap();
        let cfg = &n.ipam.unwrap().config.unwrap()[0];
        assert_eq!(cfg.subnet.as_deref(), Some(h.subnet.to_string().as_str()));
        assert_eq!(cfg.gateway.as_deref(), Some(h.gateway.to_string().as_str()));
        assert_eq!(
            n.options.unwrap().get(MTU_OPTION).map(String::as_str),
            Some("1450")
        );
        assert!(n.labels.unwrap().contains_key(NETWORK_LABEL));

        // Right already: untouched.
        assert_eq!(ensure_network(&d, &name, &h).await.unwrap(), id);
        // A new lease (here: MTU) with nothing attached: recreated.
        let h2 = host(&format!("10.216.{third}.0/24"), 1400);
        assert_ne!(ensure_network(&d, &name, &h2).await.unwrap(), id);

        assert_eq!(
            remove_networks(&d, Some(&name)).await.unwrap(),
            vec![name.clone()]
        );
        assert!(d.inspect_network(&name, None).await.is_err());

        // A network of that name that is not portless's is refused.
        let out = std::process::Command::new("docker")
            .args(["network", "create", "--label", "portless-test=1", &name])
            .output()
            .unwrap();
        assert!(out.status.success());
        let err = ensure_network(&d, &name, &h).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("not created by portless"),
            "{err:#}"
        );
        assert!(remove_networks(&d, Some(&name)).await.unwrap().is_empty());
    }
}
