//! Subnet leases against a real etcd (Debian's etcd-server on loopback)
//! that wants mutual TLS and a user with a password, with a throwaway CA
//! made by `openssl` for each test.

#![allow(clippy::unwrap_used)]

#[path = "../../tests/common/netns.rs"]
mod netns;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use netns::{Etcd, EtcdServerTls, Host, Segment, require, sh_in, unique_tag};
use portless_netplane::access::{Credentials, EtcdAccess, EtcdTls};
use portless_netplane::agent::{Agent, AgentConfig};
use portless_netplane::plan::VXLAN_DEVICE;
use portless_netplane::store::{Claim, Store};
use portless_netplane::{Error, HostRecord, Mac, Mode};

const PREFIX: &str = "/portless-tls/";
const PASSWORD: &str = "correct horse battery";

/// A throwaway PKI in a temporary directory, removed on drop: two CAs, a
/// server certificate for 127.0.0.1 and a client certificate, each signed
/// by the first CA, and a client certificate signed by the other one.
struct Pki {
    dir: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    fn new() -> Pki {
        require("openssl");
        let dir = std::env::temp_dir().join(format!("portless-pki-{}", unique_tag()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki { dir };
        pki.ca("ca");
        pki.ca("other-ca");
        pki.leaf(
            "server",
            "ca",
            "etcd",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        );
        // Not an etcd user: etcd would take the CN as the user when a
        // request carries no token, and hide token trouble.
        pki.leaf("client", "ca", "host-a", "extendedKeyUsage=clientAuth\n");
        pki.leaf(
            "stranger",
            "other-ca",
            "host-a",
            "extendedKeyUsage=clientAuth\n",
        );
        pki
    }

    fn ca(&self, name: &str) {
        let key = format!("{name}-key.pem");
        let cert = format!("{name}.pem");
        let subject = format!("/CN=portless-test-{name}");
        sh_in(
            &self.dir,
            &[
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
                "-subj",
                &subject,
                "-keyout",
                &key,
                "-out",
                &cert,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }

    /// A certificate `name` signed by the CA `signer`.
    fn leaf(&self, name: &str, signer: &str, cn: &str, ext: &str) {
        let signer_cert = format!("{signer}.pem");
        let signer_key = format!("{signer}-key.pem");
        let key = format!("{name}-key.pem");
        let csr = format!("{name}.csr");
        let cert = format!("{name}.pem");
        let extfile = format!("{name}.ext");
        let subject = format!("/CN={cn}");
        std::fs::write(
            self.dir.join(&extfile),
            format!("{ext}basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"),
        )
        .unwrap();
        sh_in(
            &self.dir,
            &[
                "openssl",
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &subject,
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
        );
        sh_in(
            &self.dir,
            &[
                "openssl",
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &signer_cert,
                "-CAkey",
                &signer_key,
                "-CAcreateserial",
                "-days",
                "1",
                "-out",
                &cert,
                "-extfile",
                &extfile,
            ],
        );
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    /// TLS as portless would use it: `ca` verifies the server, the client
    /// certificate is presented.
    fn client_tls(&self, ca: &str) -> EtcdTls {
        self.client_tls_as(ca, "client")
    }

    /// The same, presenting the client certificate `client`.
    fn client_tls_as(&self, ca: &str, client: &str) -> EtcdTls {
        EtcdTls::new(
            Some(self.read(ca)),
            Some((
                self.read(&format!("{client}.pem")),
                self.read(&format!("{client}-key.pem")),
            )),
        )
        .unwrap()
    }
}

/// etcd over mutual TLS with auth on: `root`, and `portless` with
/// read-write on [`PREFIX`] only. The PKI lives as long as etcd.
struct SecureEtcd {
    // Field order: etcd stops before its certificates go.
    etcd: Etcd,
    pki: Pki,
}

impl SecureEtcd {
    fn start() -> SecureEtcd {
        require("etcd");
        require("etcdctl");
        let pki = Pki::new();
        let tls = EtcdServerTls {
            cert: pki.path("server.pem"),
            key: pki.path("server-key.pem"),
            client_ca: pki.path("ca.pem"),
        };
        // Tokens die after a second unused, so that the tests see
        // etcd-client get a new one.
        let etcd = Etcd::on_loopback_tls(tls, &["--auth-token-ttl", "1"]);
        let e = SecureEtcd { etcd, pki };
        e.etcdctl(&["user", "add", "root:rootpw"]);
        e.etcdctl(&["user", "add", &format!("portless:{PASSWORD}")]);
        e.etcdctl(&["role", "add", "portless"]);
        e.etcdctl(&[
            "role",
            "grant-permission",
            "portless",
            "--prefix=true",
            "readwrite",
            PREFIX,
        ]);
        e.etcdctl(&["user", "grant-role", "portless", "portless"]);
        e.etcdctl(&["auth", "enable"]);
        e
    }

    fn etcdctl(&self, args: &[&str]) {
        let endpoint = self.etcd.endpoint();
        let ca = self.pki.path("ca.pem");
        let cert = self.pki.path("client.pem");
        let key = self.pki.path("client-key.pem");
        let mut all = vec![
            "etcdctl",
            "--endpoints",
            &endpoint,
            "--cacert",
            ca.to_str().unwrap(),
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--user",
            "root:rootpw",
        ];
        all.extend_from_slice(args);
        // Before `auth enable`, --user is ignored.
        sh_in(&self.pki.dir, &all);
    }

    fn access(&self, ca: &str, password: &str) -> EtcdAccess {
        EtcdAccess {
            tls: Some(self.pki.client_tls(ca)),
            credentials: Some(Credentials::new("portless", password)),
        }
    }

    async fn store(&self, ca: &str, password: &str) -> Store {
        Store::connect_with(&[self.etcd.endpoint()], PREFIX, &self.access(ca, password))
            .await
            .unwrap()
    }
}

fn claim(id: u8, ttl: u64) -> Claim {
    let underlay = Ipv4Addr::new(192, 0, 2, id);
    Claim {
        cluster: "10.92.0.0/16".parse().unwrap(),
        subnet_len: 24,
        ttl: Duration::from_secs(ttl),
        record: HostRecord {
            id: underlay.to_string(),
            subnet: "10.92.0.0/16".parse().unwrap(),
            underlay,
            vtep_mac: Mac::for_vtep(underlay),
            mode: Mode::Vxlan,
            vxlan_port: 4789,
            hostname: format!("h{id}"),
        },
    }
}

/// Retry `f` for up to `within`; the last error in the panic.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if start.elapsed() > within => panic!("{what}: still failing: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test]
async fn lease_is_taken_and_kept_over_mutual_tls_with_a_password() {
    let mut e = SecureEtcd::start();
    let store = e.store("ca.pem", PASSWORD).await;
    // Only the token is short-lived (1 s); the lease and the windows below
    // leave room for a loaded machine and etcd's leader election.
    let lease = store.claim(&claim(1, 10)).await.unwrap();
    assert!(
        lease.record.subnet.to_string().starts_with("10.92."),
        "{lease:?}"
    );

    // Kept past the token's lifetime: the keep-alive and reads go on with a
    // token etcd-client fetches again by itself.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(store.keep_alive(lease.id).await.unwrap() > 0);
    }
    let (hosts, _) = store.hosts().await.unwrap();
    assert_eq!(hosts["192.0.2.1"].subnet, lease.record.subnet);

    // An etcd outage: restarted, it knows no token of before. The lease
    // (10 s) is kept again soon after etcd is back, and the watch works
    // again.
    e.etcd.restart();
    let ttl = eventually(Duration::from_secs(10), "keep-alive after restart", || {
        store.keep_alive(lease.id)
    })
    .await;
    assert!(ttl > 0, "the lease expired during a short outage");
    let (hosts, rev) = eventually(Duration::from_secs(10), "listing after restart", || {
        store.hosts()
    })
    .await;
    assert!(hosts.contains_key("192.0.2.1"));
    let mut watch = store.watch_hosts(rev + 1).await.unwrap();
    let other = store.claim(&claim(2, 10)).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let resp = watch.message().await.unwrap().expect("watch open");
            assert!(!resp.canceled(), "watch canceled: {}", resp.cancel_reason());
            if resp.events().iter().any(|ev| {
                ev.kv()
                    .is_some_and(|kv| kv.key_str().unwrap().ends_with("hosts/192.0.2.2"))
            }) {
                return;
            }
        }
    })
    .await;
    assert!(seen.is_ok(), "the watch did not see the new host");
    store.release(other.id).await.unwrap();
    store.release(lease.id).await.unwrap();
}

#[tokio::test]
async fn a_wrong_ca_fails_at_once_saying_why() {
    let e = SecureEtcd::start();
    let store = e.store("other-ca.pem", PASSWORD).await;
    let start = Instant::now();
    let err = store.claim(&claim(1, 10)).await.unwrap_err().to_string();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        err.contains("invalid peer certificate") && err.contains("UnknownIssuer"),
        "{err}"
    );
}

/// A peer that takes the TCP connection but never answers the TLS
/// handshake: requests fail within seconds, saying so, instead of hanging.
#[tokio::test]
async fn a_stalled_tls_handshake_fails_saying_why() {
    let pki = Pki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("https://{}", listener.local_addr().unwrap());
    let mute = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let store = Store::connect_with(
        &[endpoint],
        PREFIX,
        &EtcdAccess {
            tls: Some(pki.client_tls("ca.pem")),
            credentials: None,
        },
    )
    .await
    .unwrap();
    let start = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(30), store.claim(&claim(1, 10)))
        .await
        .expect("no error within 30 s: the handshake hangs")
        .unwrap_err()
        .to_string();
    assert!(err.contains("TLS handshake timeout"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
    mute.abort();
}

#[tokio::test]
async fn a_wrong_password_fails_at_once_saying_why() {
    let e = SecureEtcd::start();
    let store = e.store("ca.pem", "wrong").await;
    let start = Instant::now();
    let err = store.claim(&claim(1, 10)).await.unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, Error::Auth { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("portless") && msg.contains("authentication failed"),
        "{msg}"
    );
    // A user without a grant on the prefix is not an authentication
    // problem but a refused request.
    let root = Store::connect_with(
        &[e.etcd.endpoint()],
        "/elsewhere/",
        &EtcdAccess {
            tls: Some(e.pki.client_tls("ca.pem")),
            credentials: Some(Credentials::new("portless", PASSWORD)),
        },
    )
    .await
    .unwrap();
    let err = root.claim(&claim(1, 10)).await.unwrap_err().to_string();
    assert!(err.contains("permission denied"), "{err}");
}

/// etcd refuses a client certificate its CA did not sign: the request
/// fails within seconds, saying that the certificate was refused, and no
/// lease is taken.
#[tokio::test]
async fn a_client_certificate_etcd_refuses_fails_at_once_saying_why() {
    let e = SecureEtcd::start();
    let access = EtcdAccess {
        tls: Some(e.pki.client_tls_as("ca.pem", "stranger")),
        credentials: Some(Credentials::new("portless", PASSWORD)),
    };
    let store = Store::connect_with(&[e.etcd.endpoint()], PREFIX, &access)
        .await
        .unwrap();
    let start = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(30), store.claim(&claim(1, 10)))
        .await
        .expect("no answer within 30 s")
        .unwrap_err()
        .to_string();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        err.contains("refused this host's client certificate (TLS alert"),
        "{err}"
    );
    // Nothing was written: the right certificate sees no lease.
    let good = e.store("ca.pem", PASSWORD).await;
    assert!(good.hosts().await.unwrap().0.is_empty());

    // The question asked when the connection closed before the alert was
    // read: etcd answers it with the alert, and says nothing to the
    // certificate it trusts.
    let endpoint = e.etcd.endpoint();
    let wait = Duration::from_secs(5);
    let why = e
        .pki
        .client_tls_as("ca.pem", "stranger")
        .refusal(&endpoint, wait)
        .await;
    assert!(
        why.as_deref()
            .is_some_and(|w| w.contains("refused this host's client certificate (TLS alert")),
        "{why:?}"
    );
    let trusted = e
        .pki
        .client_tls("ca.pem")
        .refusal(&endpoint, Duration::from_secs(2))
        .await;
    assert_eq!(trusted, None);
}

#[tokio::test]
async fn client_key_of_another_certificate_is_refused() {
    let pki = Pki::new();
    let err = EtcdTls::new(
        Some(pki.read("ca.pem")),
        Some((pki.read("client.pem"), pki.read("server-key.pem"))),
    )
    .unwrap_err();
    assert!(
        matches!(&err, portless_netplane::access::TlsFileError::Key(m) if m.contains("does not belong")),
        "{err}"
    );
}

fn agent_config(e: &SecureEtcd, host: &Host) -> AgentConfig {
    AgentConfig {
        etcd: vec![e.etcd.endpoint()],
        etcd_access: e.access("ca.pem", PASSWORD),
        prefix: PREFIX.into(),
        cluster: "10.93.0.0/16".parse().unwrap(),
        subnet_len: 24,
        advertise: Some(host.addr),
        host_id: None,
        hostname: host.ns.name.clone(),
        mode: Mode::Vxlan,
        vxlan_port: 4789,
        vni: 43,
        vxlan_name: VXLAN_DEVICE.into(),
        lease_ttl: Duration::from_secs(10),
        bridge: Some("pl-br0".into()),
        resync: Duration::from_secs(60),
        netns: Some(host.ns.path()),
        iptables: false,
        masquerade_outside: false,
        state_dir: None,
    }
}

async fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out after {secs}s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The whole agent over TLS with a password: a host that starts while
/// etcd is down signs in once etcd is back, and the hosts that were there
/// keep their lease and see it come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_over_mutual_tls_with_a_password_ride_out_an_etcd_outage() {
    assert!(
        netns::can_run(),
        "needs root, iproute2 and ping (see test.sh)"
    );
    let mut e = SecureEtcd::start();
    let tag = unique_tag();
    let seg = Segment::new(&tag, "sw", "192.168.76.0/24");
    let h1 = Host::new(&tag, "h1", &seg, 1);
    let h2 = Host::new(&tag, "h2", &seg, 2);
    let a1 = Agent::start(agent_config(&e, &h1)).await.unwrap();
    let s1 = tokio::time::timeout(Duration::from_secs(20), a1.ready())
        .await
        .expect("h1 leased a subnet over TLS");

    // A refused password is retried, and shows in the status meanwhile.
    let refused = Agent::start(AgentConfig {
        etcd_access: e.access("ca.pem", "wrong"),
        ..agent_config(&e, &h2)
    })
    .await
    .unwrap();
    wait_for("the refusal in the status", 10, || {
        refused
            .status()
            .last_error
            .is_some_and(|m| m.contains("refused to authenticate user portless"))
    })
    .await;
    refused.stop(false).await.unwrap();

    e.etcd.stop();
    let a2 = Agent::start(agent_config(&e, &h2))
        .await
        .expect("starting must not need etcd");
    // Seen by the keep-alive (every 10/3 s, a 3 s request timeout) or the
    // watch, whichever comes first.
    wait_for("h1 sees etcd down", 20, || !a1.status().etcd_connected).await;
    assert!(a2.status().host.is_none());

    e.etcd.restart();
    let s2 = tokio::time::timeout(Duration::from_secs(20), a2.ready())
        .await
        .expect("h2 leased a subnet once etcd was back");
    assert_ne!(s1.subnet, s2.subnet);
    wait_for("each host sees the other", 20, || {
        let (p1, p2) = (a1.status().peers, a2.status().peers);
        p1.len() == 1 && p1[0].subnet == s2.subnet && p2.len() == 1 && p2[0].subnet == s1.subnet
    })
    .await;
    wait_for("h1 sees etcd back", 20, || a1.status().etcd_connected).await;
    assert_eq!(
        a1.status().host.unwrap().lease_id,
        s1.lease_id,
        "h1 kept its lease"
    );
    a2.stop(true).await.unwrap();
    a1.stop(true).await.unwrap();
}
