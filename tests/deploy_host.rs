//! Running portless on a host as the README says: `cargo run` needs no
//! protoc installed (the build brings its own), and the systemd unit is
//! valid and its capability set is enough for cluster mode.

#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{Etcd, Host, Netns, Segment, require, unique_tag};

const BIN: &str = env!("CARGO_BIN_EXE_portless");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// etcd-client's build compiles etcd's .proto files with the protoc named
/// by PROTOC in .cargo/config.toml. In a mount namespace where the system's
/// protoc and its include files are hidden, as on a fresh machine, that
/// protoc still compiles them all, well-known imports included.
#[test]
fn protoc_comes_with_the_build() {
    require("unshare");
    let config: toml::Table = std::fs::read_to_string(root().join(".cargo/config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let protoc = &config["env"]["PROTOC"];
    assert_eq!(protoc["relative"].as_bool(), Some(true), "{protoc}");
    let protoc = root().join(protoc["value"].as_str().unwrap());
    assert!(protoc.exists(), "{} is missing", protoc.display());

    // etcd-client's sources, as cargo knows them.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(root().join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo metadata: {out:?}");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let etcd_client = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "etcd-client")
        .expect("etcd-client in the dependency graph");
    let dir = Path::new(etcd_client["manifest_path"].as_str().unwrap())
        .parent()
        .unwrap();
    // The files its build.rs compiles.
    let build_rs = std::fs::read_to_string(dir.join("build.rs")).unwrap();
    let protos: Vec<&str> = build_rs
        .split('"')
        .filter(|s| s.starts_with("proto/") && s.ends_with(".proto"))
        .collect();
    assert!(
        protos.len() >= 3,
        "no .proto files found in {}",
        dir.display()
    );

    let mut hide = String::new();
    for p in ["/usr/bin/protoc", "/usr/local/bin/protoc"] {
        if Path::new(p).exists() {
            hide += &format!("mount --bind /dev/null {p}; ");
        }
    }
    if Path::new("/usr/include/google").is_dir() {
        hide += "mount -t tmpfs none /usr/include/google; ";
    }
    let script = format!(
        "set -e; {hide} if protoc --version >/dev/null 2>&1; then echo 'a system protoc is still visible' >&2; exit 99; fi; \
         cd '{dir}'; '{protoc}' --include_imports -o /dev/null -I proto {protos}",
        dir = dir.display(),
        protoc = protoc.display(),
        protos = protos.join(" ")
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .env("CARGO", &cargo)
        .env_remove("PROTOC")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the build's protoc failed without a system protoc: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The unit file as systemd reads it: `systemd-analyze verify` has nothing
/// to say about it (unknown keys, bad values), and it restarts on failure
/// but not after a refused configuration.
#[test]
fn systemd_unit_verifies() {
    require("systemd-analyze");
    let unit = std::fs::read_to_string(root().join("deploy/portless.service")).unwrap();
    assert!(unit.contains("\nRestart=on-failure\n"), "{unit}");
    assert!(unit.contains("\nRestartPreventExitStatus=64\n"), "{unit}");
    // verify checks that ExecStart's binary exists: point it at this build.
    let dir = std::env::temp_dir().join(format!("portless-unit-{}", unique_tag()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("portless.service");
    std::fs::write(&file, unit.replace("/usr/local/bin/portless", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

/// The value of `key=` in the unit's [Service] section.
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
        .to_owned()
}

/// The unit's ExecStart, run as the unit runs it (root bounded to its
/// CapabilityBoundingSet, no new privileges), is enough for cluster mode:
/// in a host namespace with etcd on its segment, it leases a subnet and
/// programs its links and iptables chains.
#[test]
fn systemd_capability_set_runs_cluster_mode() {
    for tool in ["setpriv", "ip", "iptables", "etcd", "curl"] {
        require(tool);
    }
    let unit = std::fs::read_to_string(root().join("deploy/portless.service")).unwrap();
    assert_eq!(unit_value(&unit, "NoNewPrivileges"), "yes");
    let caps: Vec<String> = unit_value(&unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect();
    let bounding = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let exec = unit_value(&unit, "ExecStart");
    let exec: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(exec[..2], ["/usr/local/bin/portless", "run"], "{exec:?}");

    let tag = unique_tag();
    let seg = Segment::new(&tag, "sw", "192.168.90.0/24");
    let etcd_ns = Netns::new(format!("pl-{tag}-etcd"));
    let etcd_ip = seg.plug(&etcd_ns, "eth0", 10);
    let _etcd = Etcd::in_netns(&etcd_ns, etcd_ip);
    let host = Host::new(&tag, "h1", &seg, 1);
    let endpoint = format!("http://{etcd_ip}:2379");
    let addr = host.addr.to_string();
    let state = std::env::temp_dir().join(format!("portless-unit-state-{tag}"));
    let state_s = state.to_str().unwrap().to_owned();

    let mut cmd = host.ns.command(&[
        "setpriv",
        "--bounding-set",
        &bounding,
        "--no-new-privs",
        BIN,
    ]);
    cmd.args(&exec[1..])
        .args(["--docker-host", "none", "--cluster-etcd", &endpoint])
        .args(["--advertise-addr", &addr, "--dns-port", "0", "--no-router"])
        .args(["--admin-listen", "127.0.0.1:9053", "--lease-ttl", "2"])
        .args(["--state-dir", &state_s])
        .env("PORTLESS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let leased = loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("portless exited with {status} under {bounding}: {err}");
        }
        let out = host
            .ns
            .command(&[
                "curl",
                "-sf",
                "-m",
                "2",
                "http://127.0.0.1:9053/api/cluster",
            ])
            .output()
            .unwrap();
        if let Ok(s) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            && s["host"]["subnet"].is_string()
            && s["reconciles"].as_u64().is_some_and(|n| n > 0)
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no lease and reconcile within 20 s under {bounding}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Its own iptables chain and bridge, made with these capabilities only.
    let chain = host
        .ns
        .command(&["iptables", "-w", "-S", "PORTLESS-FWD"])
        .output()
        .unwrap();
    let links = host.ns.command(&["ip", "-o", "link"]).output().unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&state);
    assert!(
        chain.status.success() && String::from_utf8_lossy(&chain.stdout).contains("ACCEPT"),
        "no PORTLESS-FWD chain: {chain:?} (lease {leased})"
    );
    assert!(
        String::from_utf8_lossy(&links.stdout).contains("pl-"),
        "no pl-* link: {}",
        String::from_utf8_lossy(&links.stdout)
    );
}
