//! A real upstream resolver for forwarding tests: Debian's dnsmasq on a
//! free loopback port, serving names from a hosts file, killed on drop.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, require, unique, wait_until};

pub struct Dnsmasq {
    child: Child,
    pub addr: SocketAddr,
    hosts: std::path::PathBuf,
}

impl Dnsmasq {
    /// Serve `hosts` (hosts(5) text) under `local_zone` (names under it that
    /// are not in `hosts` get NXDOMAIN; names elsewhere get REFUSED, as
    /// dnsmasq answers with no upstream). Answers over UDP are capped at
    /// 512 bytes so large ones come back truncated.
    pub fn start(hosts: &str, local_zone: &str) -> Dnsmasq {
        require("dnsmasq");
        let path = std::env::temp_dir().join(unique("plhosts-"));
        std::fs::write(&path, hosts).unwrap();
        let port = free_port([127, 0, 0, 1].into());
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                &format!("--port={port}"),
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                &format!("--addn-hosts={}", path.display()),
                &format!("--local=/{local_zone}/"),
                "--user=root",
                "--pid-file=",
                "--local-ttl=1234",
                "--edns-packet-max=512",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dnsmasq");
        let addr = SocketAddr::new([127, 0, 0, 1].into(), port);
        let d = Dnsmasq {
            child,
            addr,
            hosts: path,
        };
        wait_until("dnsmasq to answer", Duration::from_secs(10), || {
            let r = super::dig(addr, &format!("probe.{local_zone}"), "A", &[]);
            (!r.status.is_empty()).then_some(())
        });
        d
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.hosts);
    }
}
