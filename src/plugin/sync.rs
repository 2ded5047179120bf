//! Every host makes the cluster's named networks on its own Engine
//! (`-d portless --ipam-driver portless`, same name and subnet, labelled
//! [`NETWORK_LABEL`]) and removes the ones whose record went. It follows
//! the records with an etcd watch, and compares with the Engine at least
//! every [`PERIOD`] (someone ran `docker network rm`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
use bollard::query_parameters::ListNetworksOptions;
use portless_netplane::ipam::{self, NetworkRecord};
use portless_netplane::store::NetworkListing;

use super::{DRIVER, NETWORK_LABEL, Plugin, REPLICA_OPTION, lock};

/// How often the Engine is compared with the records when nothing woke us.
pub const PERIOD: Duration = Duration::from_secs(2);

/// A portless network on this Engine.
#[derive(Debug, Clone)]
struct Have {
    name: String,
    /// Its network id (from its subnet).
    id: Option<String>,
}

/// Run forever: list, watch, reconcile; list again after any error.
pub async fn run(plugin: Arc<Plugin>) {
    loop {
        if let Err(e) = follow(&plugin).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "following cluster networks; again in 1 s"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn follow(plugin: &Arc<Plugin>) -> anyhow::Result<()> {
    let listing = plugin.store.list_networks().await?;
    let mut watch = plugin.store.watch_networks(listing.revision + 1).await?;
    reconcile(plugin, &listing).await;
    loop {
        tokio::select! {
            m = watch.message() => {
                let Some(resp) = m? else { anyhow::bail!("watch ended") };
                if resp.canceled() {
                    anyhow::bail!("watch canceled: {}", resp.cancel_reason());
                }
            }
            _ = plugin.wake.notified() => {
                // Let Docker finish what woke us (a removal under way).
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ = tokio::time::sleep(PERIOD) => {}
        }
        let listing = plugin.store.list_networks().await?;
        reconcile(plugin, &listing).await;
    }
}

async fn local_networks(plugin: &Plugin) -> anyhow::Result<Vec<Have>> {
    let nets = plugin
        .docker
        .list_networks(Some(ListNetworksOptions {
            filters: Some(HashMap::from([(
                "driver".to_owned(),
                vec![DRIVER.to_owned()],
            )])),
        }))
        .await?;
    Ok(nets
        .into_iter()
        .filter(|n| n.driver.as_deref() == Some(DRIVER))
        .filter_map(|n| {
            let subnet = n
                .ipam
                .as_ref()
                .and_then(|i| i.config.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.subnet.as_deref())
                .and_then(|s| s.parse().ok());
            Some(Have {
                name: n.name?,
                id: subnet.map(|s| ipam::network_id(&s)),
            })
        })
        .collect())
}

async fn reconcile(plugin: &Arc<Plugin>, listing: &NetworkListing) {
    let have = match local_networks(plugin).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "listing this Engine's networks");
            return;
        }
    };
    // Gone from the cluster (or another network holds the name now).
    for h in &have {
        let wanted = h.id.as_ref().and_then(|id| listing.networks.get(id));
        let keep = match wanted {
            None => false,
            // Being created; named once Docker has named it.
            Some((r, _)) if r.name.is_none() => true,
            Some((r, _)) => r.name.as_deref() == Some(h.name.as_str()),
        };
        if keep {
            continue;
        }
        if let Some(id) = &h.id {
            lock(&plugin.removing).insert(id.clone());
        }
        match plugin.docker.remove_network(&h.name).await {
            Ok(()) => tracing::info!(network = %h.name, "cluster network removed from this Engine"),
            Err(e) => {
                if let Some(id) = &h.id {
                    lock(&plugin.removing).remove(id);
                }
                tracing::warn!(network = %h.name, error = %e, "cannot remove a network that left the cluster (containers still attached here?)");
            }
        }
    }
    for (id, (rec, _)) in &listing.networks {
        let Some(name) = &rec.name else { continue };
        if have
            .iter()
            .any(|h| h.name == *name && h.id.as_deref() == Some(id))
        {
            continue;
        }
        if have.iter().any(|h| h.name == *name) {
            // Another network of that name here: removed above if it was
            // portless's; a foreign one is left alone.
            tracing::warn!(network = %name, "a network of this name that is not the cluster's exists here");
            continue;
        }
        match create(plugin, rec).await {
            Ok(()) => {
                tracing::info!(network = %name, subnet = %rec.subnet, "cluster network made on this Engine")
            }
            Err(e) => {
                tracing::warn!(network = %name, error = %e, "cannot make the cluster network here")
            }
        }
    }
}

async fn create(plugin: &Plugin, rec: &NetworkRecord) -> Result<(), bollard::errors::Error> {
    let id = rec.id();
    let mut ipam_options: HashMap<String, String> = rec
        .options
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    ipam_options.insert(REPLICA_OPTION.to_owned(), id.clone());
    let req = NetworkCreateRequest {
        name: rec.name.clone().unwrap_or_default(),
        driver: Some(DRIVER.into()),
        attachable: Some(true),
        ipam: Some(Ipam {
            driver: Some(DRIVER.into()),
            config: Some(vec![IpamConfig {
                subnet: Some(rec.subnet.to_string()),
                gateway: Some(rec.gateway.to_string()),
                ..Default::default()
            }]),
            options: Some(ipam_options),
        }),
        labels: Some(HashMap::from([(NETWORK_LABEL.to_owned(), id)])),
        ..Default::default()
    };
    plugin.docker.create_network(req).await.map(|_| ())
}
