//! iptables glue: traffic inside the cluster range is neither dropped by
//! Docker's forwarding rules nor masqueraded, while traffic to the outside
//! world still is.
//!
//! portless owns two chains and the jumps into them, nothing else:
//! - `filter PORTLESS-FWD`, jumped to from `DOCKER-USER` (which Docker
//!   evaluates before its own isolation rules), or from `FORWARD` where
//!   Docker is absent: accept cluster-to-cluster traffic.
//! - `nat PORTLESS-NAT`, jumped to first thing in `POSTROUTING`: ACCEPT
//!   ends NAT for cluster-to-cluster traffic, so Docker's MASQUERADE never
//!   sees it; with no Docker, it masquerades the rest of the subnet's
//!   traffic itself.
//!
//! Commands run through [`Kernel::blocking`] so they see the executor's
//! namespace.

use std::process::Command;

use ipnet::Ipv4Net;
use tracing::debug;

use crate::error::{Error, Result};
use crate::netlink::Kernel;

pub const FILTER_CHAIN: &str = "PORTLESS-FWD";
pub const NAT_CHAIN: &str = "PORTLESS-NAT";

/// The rules for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub cluster: Ipv4Net,
    pub subnet: Ipv4Net,
    /// Masquerade the subnet's traffic leaving the cluster (when Docker does
    /// not).
    pub masquerade_outside: bool,
}

impl Rules {
    /// `(table, chain, rule)` in order.
    pub fn chain_rules(&self) -> Vec<(&'static str, &'static str, Vec<String>)> {
        let c = self.cluster.to_string();
        let s = self.subnet.to_string();
        let mut v = vec![
            (
                "filter",
                FILTER_CHAIN,
                vec![
                    "-s".into(),
                    c.clone(),
                    "-d".into(),
                    c.clone(),
                    "-j".into(),
                    "ACCEPT".into(),
                ],
            ),
            (
                "nat",
                NAT_CHAIN,
                vec![
                    "-s".into(),
                    s.clone(),
                    "-d".into(),
                    c.clone(),
                    "-j".into(),
                    "ACCEPT".into(),
                ],
            ),
        ];
        if self.masquerade_outside {
            v.push((
                "nat",
                NAT_CHAIN,
                vec![
                    "-s".into(),
                    s,
                    "!".into(),
                    "-d".into(),
                    c,
                    "-j".into(),
                    "MASQUERADE".into(),
                ],
            ));
        }
        v
    }
}

fn iptables(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("iptables").arg("-w").args(args).output()
}

fn ok(args: &[&str]) -> bool {
    iptables(args).map(|o| o.status.success()).unwrap_or(false)
}

fn must(args: &[&str]) -> Result<()> {
    let out = iptables(args).map_err(|e| Error::Iptables(format!("running iptables: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Iptables(format!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Where the filter chain hooks in: Docker's user chain if present.
fn filter_hook() -> &'static str {
    if ok(&["-t", "filter", "-n", "-L", "DOCKER-USER"]) {
        "DOCKER-USER"
    } else {
        "FORWARD"
    }
}

fn ensure_sync(rules: &Rules) -> Result<()> {
    for (table, chain) in [("filter", FILTER_CHAIN), ("nat", NAT_CHAIN)] {
        if !ok(&["-t", table, "-n", "-L", chain]) {
            must(&["-t", table, "-N", chain])?;
        }
    }
    // Rewrite the chains' contents only when they differ, so that packet
    // counters survive a resync.
    for (table, chain) in [("filter", FILTER_CHAIN), ("nat", NAT_CHAIN)] {
        let want: Vec<Vec<String>> = rules
            .chain_rules()
            .into_iter()
            .filter(|(t, c, _)| *t == table && *c == chain)
            .map(|(_, _, r)| r)
            .collect();
        let all_present = want.iter().all(|r| {
            let mut args = vec!["-t", table, "-C", chain];
            args.extend(r.iter().map(String::as_str));
            ok(&args)
        });
        let count = list_rules(table, chain).len();
        if !all_present || count != want.len() {
            debug!(table, chain, "rewriting iptables chain");
            must(&["-t", table, "-F", chain])?;
            for r in &want {
                let mut args = vec!["-t", table, "-A", chain];
                args.extend(r.iter().map(String::as_str));
                must(&args)?;
            }
        }
    }
    let hook = filter_hook();
    for (table, parent, chain) in [
        ("filter", hook, FILTER_CHAIN),
        ("nat", "POSTROUTING", NAT_CHAIN),
    ] {
        // The jump must come first: Docker inserts its own rules (such as
        // a new network's MASQUERADE) at the top of POSTROUTING, ahead of
        // ours, so presence alone is not enough.
        let jump = format!("-A {parent} -j {chain}");
        let rules = list_rules(table, parent);
        let first = rules.first().map(String::as_str) == Some(jump.as_str());
        let count = rules.iter().filter(|r| **r == jump).count();
        if !first || count != 1 {
            debug!(table, parent, chain, "moving the jump to the top");
            while ok(&["-t", table, "-D", parent, "-j", chain]) {}
            must(&["-t", table, "-I", parent, "1", "-j", chain])?;
        }
    }
    Ok(())
}

fn list_rules(table: &str, chain: &str) -> Vec<String> {
    match iptables(&["-t", table, "-S", chain]) {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

fn cleanup_sync() -> Result<()> {
    for (table, parents, chain) in [
        ("filter", &["DOCKER-USER", "FORWARD"][..], FILTER_CHAIN),
        ("nat", &["POSTROUTING"][..], NAT_CHAIN),
    ] {
        for parent in parents {
            while ok(&["-t", table, "-D", parent, "-j", chain]) {}
        }
        if ok(&["-t", table, "-n", "-L", chain]) {
            must(&["-t", table, "-F", chain])?;
            must(&["-t", table, "-X", chain])?;
        }
    }
    Ok(())
}

/// Make the rules exactly so; cheap when they already are.
pub async fn ensure(kernel: &Kernel, rules: &Rules) -> Result<()> {
    let rules = rules.clone();
    kernel.blocking(move || ensure_sync(&rules)).await?
}

/// Remove portless's chains and the jumps into them.
pub async fn cleanup(kernel: &Kernel) -> Result<()> {
    kernel.blocking(cleanup_sync).await?
}

/// Whether portless's chains exist at all.
pub async fn present(kernel: &Kernel) -> Result<bool> {
    kernel
        .blocking(|| {
            ok(&["-t", "filter", "-n", "-L", FILTER_CHAIN])
                || ok(&["-t", "nat", "-n", "-L", NAT_CHAIN])
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_accept_cluster_and_masquerade_only_the_rest() {
        let r = Rules {
            cluster: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.3.0/24".parse().unwrap(),
            masquerade_outside: true,
        };
        let rendered: Vec<String> = r
            .chain_rules()
            .iter()
            .map(|(t, c, args)| format!("{t} {c} {}", args.join(" ")))
            .collect();
        assert_eq!(
            rendered,
            [
                "filter PORTLESS-FWD -s 10.244.0.0/16 -d 10.244.0.0/16 -j ACCEPT",
                "nat PORTLESS-NAT -s 10.244.3.0/24 -d 10.244.0.0/16 -j ACCEPT",
                "nat PORTLESS-NAT -s 10.244.3.0/24 ! -d 10.244.0.0/16 -j MASQUERADE",
            ]
        );
        let docker = Rules {
            masquerade_outside: false,
            ..r
        };
        assert_eq!(docker.chain_rules().len(), 2);
    }
}
