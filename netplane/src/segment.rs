//! The local part of a cluster network on one host (phase 1 of
//! `docker network create -d portless`): a Linux bridge per network
//! holding the network's gateway, and a veth pair per container, one end
//! on the bridge and the other handed to Docker to move into the
//! container. Containers of one network on one host reach each other over
//! the bridge; the VXLAN between hosts comes next.
//!
//! Every link is named `pn-*`, apart from the netplane's own `pl-*` links
//! (whose reconcile removes any `pl-*` link it did not plan), so that
//! neither side touches the other's. Within-bridge traffic is accepted in
//! `DOCKER-USER` (Docker's FORWARD policy is DROP and bridged frames pass
//! through iptables once Docker loaded br_netfilter).

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth};

use crate::error::{Error, Result};
use crate::netlink::{Kernel, errno, nl};

/// Prefix of every link of cluster networks.
pub const PREFIX: &str = "pn-";

const EEXIST: i32 = 17;

/// The bridge of the Docker network `docker_id` on this host.
pub fn bridge_name(docker_id: &str) -> String {
    format!("{PREFIX}br{}", short(docker_id, 10))
}

/// The host end and the container end of an endpoint's veth pair.
pub fn veth_names(endpoint_id: &str) -> (String, String) {
    let s = short(endpoint_id, 11);
    (format!("{PREFIX}h{s}"), format!("{PREFIX}c{s}"))
}

fn short(id: &str, n: usize) -> String {
    id.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(n)
        .collect()
}

async fn index_of(h: &Handle, name: &str) -> Result<Option<u32>> {
    let mut req = h.link().get().match_name(name.to_owned()).execute();
    match req.try_next().await {
        Ok(m) => Ok(m.map(|m| m.header.index)),
        Err(e) if errno(&e) == Some(19) => Ok(None),
        Err(e) => Err(nl(format!("link get {name}"))(e)),
    }
}

fn exists_ok(op: &str, r: std::result::Result<(), rtnetlink::Error>) -> Result<()> {
    match r {
        Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
        other => other.map_err(nl(op)),
    }
}

fn iptables(args: &[&str]) -> Result<bool> {
    let out = std::process::Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()?;
    Ok(out.status.success())
}

fn forward_rule(bridge: &str) -> Vec<&str> {
    vec!["DOCKER-USER", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]
}

/// Make the network's bridge, with the gateway address and MTU, up, and
/// let traffic between its ports through. Idempotent.
pub async fn ensure_bridge(
    kernel: &Kernel,
    bridge: &str,
    gateway: Ipv4Addr,
    prefix_len: u8,
    mtu: u32,
) -> Result<()> {
    let name = bridge.to_owned();
    kernel
        .call(move |h| async move {
            exists_ok(
                &format!("bridge add {name}"),
                h.link()
                    .add(LinkBridge::new(&name).mtu(mtu).build())
                    .execute()
                    .await,
            )?;
            let idx = index_of(&h, &name)
                .await?
                .ok_or_else(|| Error::Underlay(format!("bridge {name} vanished")))?;
            exists_ok(
                &format!("addr add {gateway}/{prefix_len} dev {name}"),
                h.address()
                    .add(idx, IpAddr::V4(gateway), prefix_len)
                    .execute()
                    .await,
            )?;
            h.link()
                .set(LinkUnspec::new_with_index(idx).up().build())
                .execute()
                .await
                .map_err(nl(format!("link set {name} up")))
        })
        .await??;
    let b = bridge.to_owned();
    kernel
        .blocking(move || {
            let rule = forward_rule(&b);
            let mut check = vec!["-C"];
            check.extend(&rule);
            if iptables(&check)? {
                return Ok(());
            }
            let mut insert = vec!["-I"];
            insert.extend(&rule);
            if iptables(&insert)? {
                Ok(())
            } else {
                Err(Error::Iptables(format!("cannot accept traffic on {b}")))
            }
        })
        .await?
}

/// Remove a link (a veth pair, by either end) if it exists.
pub async fn remove_link(kernel: &Kernel, name: &str) -> Result<()> {
    let n = name.to_owned();
    kernel
        .call(move |h| async move {
            let Some(idx) = index_of(&h, &n).await? else {
                return Ok(());
            };
            match h.link().del(idx).execute().await {
                Err(e) if errno(&e) == Some(19) => Ok(()),
                other => other.map_err(nl(format!("link del {n}"))),
            }
        })
        .await?
}

/// Remove a network's bridge if it exists, and its rule.
pub async fn remove_bridge(kernel: &Kernel, bridge: &str) -> Result<()> {
    remove_link(kernel, bridge).await?;
    let n = bridge.to_owned();
    kernel
        .blocking(move || {
            let mut del = vec!["-D"];
            del.extend(forward_rule(&n));
            while iptables(&del).unwrap_or(false) {}
        })
        .await
}

/// Make the veth pair of an endpoint, the host end on `bridge` and up;
/// the container end is left for Docker to move.
pub async fn add_veth(
    kernel: &Kernel,
    bridge: &str,
    host_end: &str,
    container_end: &str,
    mtu: u32,
) -> Result<()> {
    let (bridge, host_end, container_end) = (
        bridge.to_owned(),
        host_end.to_owned(),
        container_end.to_owned(),
    );
    kernel
        .call(move |h| async move {
            exists_ok(
                &format!("veth add {host_end}"),
                h.link()
                    .add(LinkVeth::new(&host_end, &container_end).mtu(mtu).build())
                    .execute()
                    .await,
            )?;
            let br = index_of(&h, &bridge)
                .await?
                .ok_or_else(|| Error::Underlay(format!("no bridge {bridge}")))?;
            let idx = index_of(&h, &host_end)
                .await?
                .ok_or_else(|| Error::Underlay(format!("veth {host_end} vanished")))?;
            h.link()
                .set(LinkUnspec::new_with_index(idx).controller(br).up().build())
                .execute()
                .await
                .map_err(nl(format!("link set {host_end} master {bridge} up")))?;
            if let Some(c) = index_of(&h, &container_end).await? {
                h.link()
                    .set(LinkUnspec::new_with_index(c).mtu(mtu).build())
                    .execute()
                    .await
                    .map_err(nl(format!("link set {container_end} mtu")))?;
            }
            Ok(())
        })
        .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_in_an_interface_name() {
        let b = bridge_name("0123456789abcdef0123");
        assert_eq!(b, "pn-br0123456789");
        assert!(b.len() <= 15);
        let (h, c) = veth_names("fedcba9876543210");
        assert_eq!(
            (h.as_str(), c.as_str()),
            ("pn-hfedcba98765", "pn-cfedcba98765")
        );
        assert!(!b.starts_with(crate::plan::LINK_PREFIX));
    }
}
