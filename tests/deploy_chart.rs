//! The Helm chart (charts/portless), checked by real Helm v4 (the Go SDK
//! through helm-python-sdk, offline) and scanned by checkov, both from the
//! virtualenv ./test.sh installs (target/tools/venv): lint and render of
//! the defaults and every example, the values reaching the DaemonSet, the
//! schema refusing bad values, the configuration it renders accepted by
//! portless itself, and no scan finding the chart's README does not
//! explain.

#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_portless");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("charts/portless")
}

/// Run tests/chart.py with the virtualenv's Python; its JSON output.
fn chart_py(args: &[&str]) -> Value {
    let python = root().join("target/tools/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run ./test.sh, which installs helm-python-sdk and checkov there",
        python.display()
    );
    let out = Command::new(&python)
        .arg(root().join("tests/chart.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chart.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn examples() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(chart().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

/// A temporary file holding `text`, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(ext: &str, text: &str) -> TempFile {
        let p = std::env::temp_dir().join(format!("{}.{ext}", common::unique("portless-chart-")));
        std::fs::write(&p, text).unwrap();
        TempFile(p)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn render(values_yaml: Option<&str>) -> Vec<Value> {
    let file = values_yaml.map(|y| TempFile::new("yaml", y));
    let args: Vec<&str> = match &file {
        Some(f) => vec!["render", f.path()],
        None => vec!["render"],
    };
    chart_py(&args).as_array().unwrap().clone()
}

fn object<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

fn env_of(ds: &Value) -> Vec<(String, String)> {
    ds["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn env_value(ds: &Value, name: &str) -> Option<String> {
    env_of(ds)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// The mount whose path holds `path`, and its volume.
fn mounted<'a>(ds: &'a Value, path: &str) -> (&'a Value, &'a Value) {
    let pod = &ds["spec"]["template"]["spec"];
    let mounts = pod["containers"][0]["volumeMounts"].as_array().unwrap();
    let m = mounts
        .iter()
        .find(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("nothing mounted at {path}: {mounts:?}"));
    let v = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == m["name"])
        .unwrap_or_else(|| panic!("no volume {}", m["name"]));
    (m, v)
}

fn port_names(ds: &Value) -> BTreeSet<String> {
    ds["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect()
}

/// `helm lint --strict` of the defaults and of every example values file:
/// no errors and no warnings (the one info, "icon is recommended", is not
/// one: the project has no icon).
#[test]
fn chart_lints_clean_with_defaults_and_every_example() {
    let report = chart_py(&["lint"]);
    let report = report.as_object().unwrap();
    assert_eq!(report.len(), 1 + examples().len(), "{report:?}");
    for (name, r) in report {
        assert_eq!(r["total_charts_linted"], 1, "{name}: {r}");
        assert!(r["errors"].as_array().unwrap().is_empty(), "{name}: {r}");
        let serious: Vec<&Value> = r["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["severity"].as_u64().unwrap() >= 2)
            .collect();
        assert!(serious.is_empty(), "{name}: {serious:?}");
    }
}

/// `helm template` of the defaults and every example renders a DaemonSet
/// in the release's namespace, on the host network, with probes on
/// /healthz, resources, and the capabilities its mode needs and no more.
#[test]
fn chart_renders_defaults_and_every_example() {
    let mut cases: Vec<(String, Option<String>)> = vec![("defaults".into(), None)];
    for e in examples() {
        cases.push((
            e.display().to_string(),
            Some(std::fs::read_to_string(&e).unwrap()),
        ));
    }
    for (name, values) in cases {
        let objects = render(values.as_deref());
        for o in &objects {
            assert_eq!(o["metadata"]["namespace"], "portless", "{name}: {o}");
        }
        let ds = object(&objects, "DaemonSet");
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], true, "{name}");
        let c = &pod["containers"][0];
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{name}: {probe}");
            assert_eq!(c[probe]["httpGet"]["port"], "admin", "{name}: {probe}");
        }
        assert!(c["resources"]["requests"]["memory"].is_string(), "{name}");
        let sc = &c["securityContext"];
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
        let cluster = env_value(ds, "PORTLESS_CLUSTER_ETCD").is_some();
        let legacy = values
            .as_deref()
            .is_some_and(|v| v.contains("iptables: legacy"));
        let mut want = vec!["NET_BIND_SERVICE"];
        if cluster {
            want.push("NET_ADMIN");
        }
        if legacy {
            want.push("NET_RAW");
        }
        assert_eq!(sc["capabilities"]["add"], json!(want), "{name}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        // The admin port the probes name is declared.
        let ports = c["ports"].as_array().unwrap();
        assert!(
            ports.iter().any(|p| p["name"] == "admin"),
            "{name}: {ports:?}"
        );
    }
}

/// Given values reach the DaemonSet (and its ConfigMap): ports, the
/// domain, etcd endpoints, user and the Secrets of its TLS files and
/// password, the certificate Secrets, the admin address, the image digest.
#[test]
fn rendered_daemonset_carries_the_values() {
    let values = r#"
image: { repository: registry.example.com/portless, digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef" }
config:
  log: debug
  dns: { dns-port: 5353, domain: corp.example, ttl: 30, dns-listen: ["10.1.2.3:1053"] }
  router: { http-listen: "0.0.0.0:8080", https-listen: "0.0.0.0:8443", redirect-https: true }
  cluster: { cluster-cidr: 10.250.0.0/16, netplane-mode: route, vni: 42 }
admin: { address: hostIP, port: 9100 }
tls:
  secrets: [{ name: shop-tls }, { name: star-tls, default: true }]
cluster:
  enabled: true
  etcd:
    endpoints: [https://10.0.0.10:2379, https://10.0.0.11:2379]
    tls: { secretName: etcd-client }
    user: portless
    passwordSecret: { name: etcd-pass, key: pw }
  stateDir: /srv/portless
serviceMonitor: { enabled: true, interval: 15s }
"#;
    let objects = render(Some(values));
    let ds = object(&objects, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(
        c["image"],
        "registry.example.com/portless@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );

    // Ports: DNS (UDP and TCP), the extra listener, HTTP, HTTPS, admin.
    let ports: BTreeSet<(String, u64, String)> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["containerPort"].as_u64().unwrap(),
                p["protocol"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: BTreeSet<(String, u64, String)> = [
        ("dns", 5353, "UDP"),
        ("dns-tcp", 5353, "TCP"),
        ("dnsx-0", 1053, "UDP"),
        ("dnsx-tcp-0", 1053, "TCP"),
        ("http", 8080, "TCP"),
        ("https", 8443, "TCP"),
        ("admin", 9100, "TCP"),
    ]
    .into_iter()
    .map(|(n, p, t)| (n.to_owned(), p, t.to_owned()))
    .collect();
    assert_eq!(ports, want);

    // The environment the chart sets.
    assert_eq!(
        env_value(ds, "PORTLESS_ADMIN_LISTEN").unwrap(),
        "$(HOST_IP):9100"
    );
    assert_eq!(
        env_value(ds, "PORTLESS_CLUSTER_ETCD").unwrap(),
        "https://10.0.0.10:2379,https://10.0.0.11:2379"
    );
    assert_eq!(env_value(ds, "PORTLESS_ETCD_USER").unwrap(), "portless");
    assert_eq!(
        env_value(ds, "PORTLESS_ADVERTISE_ADDR").unwrap(),
        "$(HOST_IP)"
    );
    assert_eq!(
        env_value(ds, "PORTLESS_CERT_DIR").unwrap(),
        "/etc/portless/certs"
    );
    // The password is a file, never a variable's value.
    assert!(
        env_of(ds)
            .iter()
            .all(|(k, _)| !k.contains("PASSWORD") || k.ends_with("_FILE")),
        "{:?}",
        env_of(ds)
    );

    // Each file named by a variable is mounted from the Secret given.
    let volume_of = |path: &str| -> &Value { mounted(ds, path).1 };
    for var in [
        "PORTLESS_ETCD_CA",
        "PORTLESS_ETCD_CERT",
        "PORTLESS_ETCD_KEY",
    ] {
        let path = env_value(ds, var).unwrap();
        let v = volume_of(&path);
        assert_eq!(v["secret"]["secretName"], "etcd-client", "{var}");
        let file = Path::new(&path).file_name().unwrap().to_str().unwrap();
        assert!(
            v["secret"]["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["path"] == file),
            "{var}: {v}"
        );
    }
    let pw = volume_of(&env_value(ds, "PORTLESS_ETCD_PASSWORD_FILE").unwrap());
    assert_eq!(pw["secret"]["secretName"], "etcd-pass");
    assert_eq!(
        pw["secret"]["items"],
        json!([{"key": "pw", "path": "password"}])
    );
    let certs = volume_of("/etc/portless/certs/");
    let sources: Vec<(String, Vec<String>)> = certs["projected"]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["secret"]["name"].as_str().unwrap().to_owned(),
                s["secret"]["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i["path"].as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        sources,
        [
            (
                "shop-tls".to_owned(),
                vec!["shop-tls.crt".to_owned(), "shop-tls.key".to_owned()]
            ),
            (
                "star-tls".to_owned(),
                vec!["default.crt".to_owned(), "default.key".to_owned()]
            ),
        ]
    );
    let state = volume_of(&env_value(ds, "PORTLESS_STATE_DIR").unwrap());
    assert_eq!(state["hostPath"]["path"], "/srv/portless");
    let sock = volume_of("/var/run/docker.sock");
    assert_eq!(sock["hostPath"]["type"], "Socket");

    // Probes go to the node's address (no host: the pod IP, which is it).
    assert!(
        c["livenessProbe"]["httpGet"].get("host").is_none(),
        "{}",
        c["livenessProbe"]
    );

    // The configuration file: the domain, ports and cluster tunables, with
    // whole numbers as integers.
    let cm = object(&objects, "ConfigMap");
    let toml_text = cm["data"]["portless.toml"].as_str().unwrap();
    let t: toml::Table = toml_text
        .parse()
        .unwrap_or_else(|e| panic!("{e}: {toml_text}"));
    assert_eq!(t["log"].as_str(), Some("debug"));
    assert_eq!(t["dns"]["domain"].as_str(), Some("corp.example"));
    assert_eq!(t["dns"]["dns-port"].as_integer(), Some(5353));
    assert_eq!(t["dns"]["ttl"].as_integer(), Some(30));
    assert_eq!(t["router"]["http-listen"].as_str(), Some("0.0.0.0:8080"));
    assert_eq!(t["cluster"]["vni"].as_integer(), Some(42));
    assert_eq!(t["cluster"]["cluster-cidr"].as_str(), Some("10.250.0.0/16"));
    // Its checksum rolls the pods when it changes.
    let sum = ds["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        .as_str()
        .unwrap();
    assert_eq!(sum.len(), 64);

    // The ServiceMonitor scrapes /metrics on the admin port.
    let sm = object(&objects, "ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "admin");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(sm["spec"]["endpoints"][0]["interval"], "15s");
    let svc = object(&objects, "Service");
    assert_eq!(svc["spec"]["ports"][0]["port"], 9100);
}

/// Automatic HTTPS: `config.acme` becomes the `[acme]` table; the account
/// and certificates go under the node's state directory (mounted whenever
/// ACME is on, cluster mode or not); the ACME server's CA and the cluster
/// key are files mounted read-only from the Secret or ConfigMap given; and
/// the HTTPS port is declared without any `tls.secrets`.
#[test]
fn rendered_daemonset_carries_the_acme_values() {
    // Cluster mode: the CA from a Secret, the sealing key.
    let values = r#"
config:
  acme:
    acme-directory: https://ca.internal:9000/acme/acme/directory
    acme-email: ops@example.com
    acme-challenge: [http-01]
    acme-retry-ms: 30000
  router: { https-listen: "0.0.0.0:8443", redirect-https: true }
acme:
  caSecret: { name: internal-ca, key: root.pem }
  clusterKeySecret: { name: portless-acme-key, key: k }
cluster:
  enabled: true
  etcd: { endpoints: [http://10.0.0.10:2379] }
  stateDir: /srv/portless
"#;
    let objects = render(Some(values));
    let ds = object(&objects, "DaemonSet");
    let cm = object(&objects, "ConfigMap");
    let toml_text = cm["data"]["portless.toml"].as_str().unwrap();
    let t: toml::Table = toml_text
        .parse()
        .unwrap_or_else(|e| panic!("{e}: {toml_text}"));
    let acme = t["acme"].as_table().unwrap();
    assert_eq!(
        acme["acme-directory"].as_str(),
        Some("https://ca.internal:9000/acme/acme/directory")
    );
    assert_eq!(acme["acme-email"].as_str(), Some("ops@example.com"));
    assert_eq!(
        acme["acme-challenge"],
        toml::Value::Array(vec!["http-01".into()])
    );
    assert_eq!(acme["acme-retry-ms"].as_integer(), Some(30000));
    assert_eq!(acme.len(), 4, "{toml_text}");

    // The store under the state directory, on the node.
    let state = env_value(ds, "PORTLESS_STATE_DIR").unwrap();
    let dir = env_value(ds, "PORTLESS_ACME_DIR").unwrap();
    assert_eq!(dir, format!("{state}/acme"));
    let (m, v) = mounted(ds, &dir);
    assert_eq!(v["hostPath"]["path"], "/srv/portless", "{v}");
    assert_ne!(m["readOnly"], true, "{m}");
    // The files, read-only and for root only.
    for (var, secret, key, file) in [
        ("PORTLESS_ACME_CA", "internal-ca", "root.pem", "ca.crt"),
        ("PORTLESS_ACME_CLUSTER_KEY", "portless-acme-key", "k", "key"),
    ] {
        let path = env_value(ds, var).unwrap_or_else(|| panic!("no {var}"));
        assert!(path.ends_with(&format!("/{file}")), "{var}: {path}");
        let (m, v) = mounted(ds, &path);
        assert_eq!(m["readOnly"], true, "{var}: {m}");
        assert_eq!(v["secret"]["secretName"], secret, "{var}: {v}");
        assert_eq!(v["secret"]["defaultMode"], 0o400, "{var}: {v}");
        assert_eq!(
            v["secret"]["items"],
            json!([{"key": key, "path": file}]),
            "{var}"
        );
    }
    // HTTPS with no certificate Secret: the port, and no --cert-dir.
    assert!(port_names(ds).contains("https"), "{:?}", port_names(ds));
    let https = ds["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "https")
        .unwrap();
    assert_eq!(https["containerPort"], 8443);
    assert_eq!(env_value(ds, "PORTLESS_CERT_DIR"), None);

    // One host, the CA from a ConfigMap: the state directory is mounted
    // for the store alone, and no cluster key is asked for.
    let values = r#"
config:
  acme: { acme-directory: letsencrypt-staging }
acme:
  caConfigMap: { name: trust-bundle, key: bundle.pem }
"#;
    let objects = render(Some(values));
    let ds = object(&objects, "DaemonSet");
    assert_eq!(env_value(ds, "PORTLESS_STATE_DIR"), None);
    assert_eq!(env_value(ds, "PORTLESS_ACME_CLUSTER_KEY"), None);
    let (_, v) = mounted(ds, &env_value(ds, "PORTLESS_ACME_DIR").unwrap());
    assert_eq!(v["hostPath"]["path"], "/var/lib/portless", "{v}");
    assert_eq!(v["hostPath"]["type"], "DirectoryOrCreate", "{v}");
    let (m, v) = mounted(ds, &env_value(ds, "PORTLESS_ACME_CA").unwrap());
    assert_eq!(m["readOnly"], true, "{m}");
    assert_eq!(v["configMap"]["name"], "trust-bundle", "{v}");
    assert_eq!(
        v["configMap"]["items"],
        json!([{"key": "bundle.pem", "path": "ca.crt"}])
    );
    assert!(port_names(ds).contains("https"), "{:?}", port_names(ds));

    // Off (the defaults): no ACME variable, no state directory, no HTTPS.
    let objects = render(None);
    let ds = object(&objects, "DaemonSet");
    let env = env_of(ds);
    assert!(
        env.iter().all(|(k, _)| !k.starts_with("PORTLESS_ACME_")),
        "{env:?}"
    );
    let volumes = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    assert!(
        volumes
            .iter()
            .all(|v| v.get("hostPath").is_none() || v["hostPath"]["type"] == "Socket"),
        "{volumes:?}"
    );
    assert!(!port_names(ds).contains("https"), "{:?}", port_names(ds));
    let cm = object(&objects, "ConfigMap");
    assert!(
        !cm["data"]["portless.toml"]
            .as_str()
            .unwrap()
            .contains("[acme]"),
        "{cm}"
    );
}

/// The schema refuses bad values before anything renders, naming what is
/// wrong; and a ServiceMonitor over a loopback admin API is refused.
#[test]
fn schema_refuses_bad_values() {
    let bad = [
        (json!({"config": {"dns": {"dns-port": 70000}}}), "dns-port"),
        (json!({"config": {"dns": {"dns-port": "53"}}}), "dns-port"),
        (json!({"config": {"dns": {"bogus": 1}}}), "bogus"),
        (json!({"config": {"cert-dir": "/x"}}), "cert-dir"),
        (
            json!({"config": {"cluster": {"etcd-password-file": "/x"}}}),
            "etcd-password-file",
        ),
        (
            json!({"config": {"router": {"http-listen": "80"}}}),
            "http-listen",
        ),
        (
            json!({"config": {"cluster": {"netplane-mode": "fast"}}}),
            "netplane-mode",
        ),
        (json!({"cluster": {"enabled": true}}), "endpoints"),
        (
            json!({"cluster": {"etcd": {"endpoints": ["etcd:2379,etcd2:2379"]}}}),
            "endpoints",
        ),
        (
            json!({"cluster": {"etcd": {"user": "u"}}}),
            "passwordSecret",
        ),
        (json!({"cluster": {"iptables": "ebpf"}}), "iptables"),
        (json!({"admin": {"address": "my host"}}), "address"),
        (json!({"tls": {"secrets": [{"name": "Bad_Name"}]}}), "name"),
        (json!({"image": {"digest": "latest"}}), "digest"),
        (json!({"replicas": 3}), "replicas"),
        (
            json!({"config": {"acme": {"acme-directory": "http://acme.test/dir"}}}),
            "acme-directory",
        ),
        (
            json!({"config": {"acme": {"acme-directory": "staging"}}}),
            "acme-directory",
        ),
        (
            json!({"config": {"acme": {"acme-challenge": ["dns-01"]}}}),
            "acme-challenge",
        ),
        (
            json!({"config": {"acme": {"acme-challenge": "http-01"}}}),
            "acme-challenge",
        ),
        (
            json!({"config": {"acme": {"acme-email": "nobody"}}}),
            "acme-email",
        ),
        (
            json!({"config": {"acme": {"acme-retry-ms": 0}}}),
            "acme-retry-ms",
        ),
        // Files are the chart's, from .acme.
        (json!({"config": {"acme": {"acme-dir": "/x"}}}), "acme-dir"),
        (
            json!({"config": {"acme": {"acme-cluster-key": "/x"}}}),
            "acme-cluster-key",
        ),
        (
            json!({"acme": {"clusterKeySecret": {"name": "Bad_Name"}}}),
            "name",
        ),
        // What portless would refuse at start, refused with the values'
        // names.
        (
            json!({"config": {"acme": {"acme-directory": "letsencrypt"}},
                   "cluster": {"enabled": true, "etcd": {"endpoints": ["http://10.0.0.1:2379"]}}}),
            "needs acme.clusterKeySecret.name",
        ),
        (
            json!({"acme": {"caSecret": {"name": "acme-ca"}}}),
            "need config.acme.acme-directory",
        ),
        (
            json!({"config": {"acme": {"acme-directory": "letsencrypt"}},
                   "acme": {"caSecret": {"name": "a"}, "caConfigMap": {"name": "b"}}}),
            "not both",
        ),
        (
            json!({"config": {"router": {"redirect-https": true}}}),
            "redirect-https needs tls.secrets or config.acme",
        ),
        (
            json!({"config": {"router": {"https-listen": "0.0.0.0:443"}}}),
            "https-listen needs tls.secrets or config.acme",
        ),
        (
            json!({"config": {"router": {"no-router": true}, "acme": {"acme-directory": "letsencrypt"}}}),
            "needs the router",
        ),
        (
            json!({"serviceMonitor": {"enabled": true}}),
            "serviceMonitor.enabled needs",
        ),
    ];
    for (values, names) in bad {
        let f = TempFile::new("json", &values.to_string());
        let r = chart_py(&["schema", f.path()]);
        assert_eq!(r["ok"], false, "accepted: {values}");
        let err = r["error"].as_str().unwrap();
        assert!(
            err.contains(names),
            "{values}: the error does not name {names}: {err}"
        );
    }
    // And good values pass (the test above is not refusing everything).
    let good = [
        json!({"config": {"dns": {"dns-port": 0}}, "cluster": {"enabled": true, "etcd": {"endpoints": ["http://10.0.0.1:2379"]}}}),
        json!({"config": {"acme": {"acme-directory": "https://ca.internal:9000/acme/acme/directory",
                                   "acme-email": "mailto:ops@example.com",
                                   "acme-challenge": ["tls-alpn-01", "http-01"], "acme-retry-ms": 100},
                          "router": {"redirect-https": true, "https-listen": "0.0.0.0:443"}},
               "acme": {"caSecret": {"name": "acme-ca"}}}),
        json!({"config": {"acme": {"acme-directory": "letsencrypt-staging"}},
               "acme": {"clusterKeySecret": {"name": "acme-key"}},
               "cluster": {"enabled": true, "etcd": {"endpoints": ["http://10.0.0.1:2379"]}}}),
    ];
    for values in good {
        let f = TempFile::new("json", &values.to_string());
        let r = chart_py(&["schema", f.path()]);
        assert_eq!(r["ok"], true, "{values}: {r}");
    }
}

/// The schema's `config` keys are portless's own options and nothing else,
/// and every option of `portless run` is either one of them or set by the
/// chart from its other values: the chart cannot drift from the binary.
#[test]
fn schema_config_keys_are_exactly_portless_options() {
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(chart().join("values.schema.json")).unwrap())
            .unwrap();
    let config = &schema["properties"]["config"]["properties"];
    let mut keys = BTreeSet::new();
    for (k, v) in config.as_object().unwrap() {
        match v.get("properties") {
            Some(table) if ["dns", "router", "acme", "cluster"].contains(&k.as_str()) => {
                keys.extend(table.as_object().unwrap().keys().cloned())
            }
            _ => {
                keys.insert(k.clone());
            }
        }
    }
    let help = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let options: BTreeSet<String> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|r| r.split([' ', '=']).next().unwrap().to_owned())
        .filter(|f| f != "help")
        .collect();
    // Set by the chart: files from Secrets and ConfigMaps, the admin API,
    // the Docker socket, etcd, directories on the node, and per-node
    // identities.
    let by_chart: BTreeSet<String> = [
        "config",
        "docker-host",
        "admin-listen",
        "hosts-file",
        "cert-dir",
        "cluster-etcd",
        "etcd-ca",
        "etcd-cert",
        "etcd-key",
        "etcd-user",
        "etcd-password-file",
        "advertise-addr",
        "state-dir",
        "host-id",
        "acme-dir",
        "acme-ca",
        "acme-cluster-key",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    let unknown: Vec<&String> = keys.difference(&options).collect();
    assert!(
        unknown.is_empty(),
        "schema keys portless does not have: {unknown:?}"
    );
    let uncovered: Vec<&String> = options
        .difference(&keys)
        .filter(|o| !by_chart.contains(*o))
        .collect();
    assert!(
        uncovered.is_empty(),
        "portless options the chart neither accepts nor sets: {uncovered:?}"
    );
    let both: Vec<&String> = keys.intersection(&by_chart).collect();
    assert!(
        both.is_empty(),
        "set by the chart and accepted in config: {both:?}"
    );
}

/// The configuration file the chart renders, from the defaults and every
/// example, is accepted by portless itself (which refuses unknown keys and
/// bad values with exit code 64 before binding anything). It then starts,
/// with every listener moved to free loopback ports and no Docker, and serves
/// /healthz.
#[test]
fn rendered_configuration_is_accepted_by_portless() {
    let mut cases: Vec<Option<PathBuf>> = vec![None];
    cases.extend(examples().into_iter().map(Some));
    for case in cases {
        let values = case.as_ref().map(|p| std::fs::read_to_string(p).unwrap());
        let objects = render(values.as_deref());
        let cm = object(&objects, "ConfigMap");
        let file = TempFile::new("toml", cm["data"]["portless.toml"].as_str().unwrap());
        let certs = std::env::temp_dir().join(common::unique("portless-chart-certs-"));
        std::fs::create_dir_all(&certs).unwrap();
        // The ACME account and certificates: a directory of the test's, as
        // the chart gives a node's (no route, so nothing is ordered and no
        // ACME server is asked).
        let acme_dir = std::env::temp_dir().join(common::unique("portless-chart-acme-"));
        let admin = SocketAddr::new(
            Ipv4Addr::LOCALHOST.into(),
            common::free_port(Ipv4Addr::LOCALHOST.into()),
        );
        let admin_s = admin.to_string();
        // Two distinct free ports: both held while picking.
        let (a, b) = (
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        );
        let http = a.local_addr().unwrap().to_string();
        let https = b.local_addr().unwrap().to_string();
        drop((a, b));
        let mut child = Command::new(BIN)
            .args([
                "run",
                "--config",
                file.path(),
                "--docker-host",
                "none",
                "--dns-port",
                "0",
            ])
            .args(["--http-listen", &http, "--https-listen", &https])
            .args(["--admin-listen", &admin_s])
            .env("PORTLESS_CERT_DIR", &certs)
            .env("PORTLESS_ACME_DIR", &acme_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let served = loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                break Err(format!("exited with {status}: {err}"));
            }
            if common::http_get(admin, "/healthz").is_some() {
                break Ok(());
            }
            if Instant::now() > deadline {
                break Err("no /healthz within 15 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = child.kill();
        let _ = child.wait();
        // With an [acme] table, portless opened its store there before
        // serving /healthz: automatic HTTPS was on.
        let acme_on = cm["data"]["portless.toml"]
            .as_str()
            .unwrap()
            .contains("\n[acme]\n");
        let acme_opened = acme_dir.is_dir();
        let _ = std::fs::remove_dir_all(&certs);
        let _ = std::fs::remove_dir_all(&acme_dir);
        if let Err(e) = served {
            panic!(
                "{:?}: portless refused the rendered configuration: {e}\n{}",
                case,
                cm["data"]["portless.toml"].as_str().unwrap()
            );
        }
        assert_eq!(acme_on, acme_opened, "{case:?}: ACME on, store opened");
    }
}

/// checkov over the rendered defaults and every example: every finding is
/// a row of the chart README's "Security scan" table (which says why it
/// stays), and every row there is still a finding (the table stays true).
#[test]
fn checkov_findings_are_the_ones_the_chart_readme_explains() {
    let scan = chart_py(&["scan"]);
    assert!(
        scan["summary"]["passed"].as_u64().unwrap() > 100,
        "checkov checked nothing: {scan}"
    );
    assert_eq!(scan["summary"]["parsing_errors"], 0, "{scan}");
    let found: BTreeSet<String> = scan["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f[0].as_str().unwrap().to_owned())
        .collect();
    let readme = std::fs::read_to_string(chart().join("README.md")).unwrap();
    let table = &readme[readme
        .find("## Security scan")
        .expect("a Security scan section")..];
    let explained: BTreeSet<String> = table
        .lines()
        .filter(|l| l.starts_with("| CKV"))
        .flat_map(|l| {
            l.split('|')
                .nth(1)
                .unwrap()
                .split(',')
                .map(|c| c.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    let unexplained: Vec<&String> = found.difference(&explained).collect();
    assert!(
        unexplained.is_empty(),
        "checkov findings the chart README does not explain: {unexplained:?}\n{scan}"
    );
    let stale: Vec<&String> = explained.difference(&found).collect();
    assert!(
        stale.is_empty(),
        "the chart README explains findings checkov no longer reports: {stale:?}"
    );
}

/// The Grafana dashboard ships with the chart (a ConfigMap for Grafana's
/// sidecar, when asked for) exactly as it is in docs/, and is a dashboard:
/// every panel queries through the data source variable.
#[test]
fn the_grafana_dashboard_ships_with_the_chart_as_in_docs() {
    let docs = std::fs::read_to_string(root().join("docs/grafana-dashboard.json")).unwrap();
    let dash: Value = serde_json::from_str(&docs).expect("the dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    let queries: Vec<&Value> = panels
        .iter()
        .filter(|p| p["type"] != "row")
        .flat_map(|p| p["targets"].as_array().expect("targets"))
        .collect();
    assert!(queries.len() >= 10, "{} queries", queries.len());
    for q in &queries {
        assert_eq!(q["datasource"]["uid"], "${datasource}", "{q}");
        assert!(
            q["expr"].as_str().is_some_and(|e| e.contains("portless_")),
            "{q}"
        );
    }
    // Off by default; on, the ConfigMap carries the same JSON.
    assert!(!render(None).iter().any(|o| {
        o["kind"] == "ConfigMap"
            && o["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with("-dashboard"))
    }));
    let objects = render(Some("grafanaDashboard:\n  enabled: true\n"));
    let cm = objects
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("-dashboard"))
        })
        .expect("no dashboard ConfigMap rendered");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1", "{cm}");
    let shipped: Value =
        serde_json::from_str(cm["data"]["portless.json"].as_str().unwrap()).unwrap();
    assert_eq!(shipped, dash);
}
