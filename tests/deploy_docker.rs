//! The image and the compose file, as users run them. The image is built in
//! the test run the README's way (deploy/image-rootfs.sh, given this
//! build's binary so that no release build is needed, then `docker build`
//! of the repository's Dockerfile), started with the README's own `docker
//! run` command, and deploy/docker-compose.yml is brought up with two
//! labelled apps. Ports are free ones the tests pick (by PORTLESS_*
//! variables, which the README documents), never the defaults.

#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_portless");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The image built from this test run's binary, under a unique tag;
/// removed when the last test using it drops it.
struct Image {
    tag: String,
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = run("docker", &["rmi", "-f", &self.tag]);
    }
}

fn image() -> Arc<Image> {
    static IMAGE: Mutex<Weak<Image>> = Mutex::new(Weak::new());
    let mut slot = IMAGE.lock().unwrap();
    if let Some(image) = slot.upgrade() {
        return image;
    }
    require("docker");
    let tag = format!("portless-test-image:{}", unique("i"));
    // A build context of its own: the staged files, the Dockerfile and
    // .dockerignore of the repository.
    let ctx = std::env::temp_dir().join(unique("portless-image-"));
    let rootfs = ctx.join("target/image/rootfs");
    let stage = run(
        root().join("deploy/image-rootfs.sh").to_str().unwrap(),
        &["--binary", BIN, "--out", rootfs.to_str().unwrap()],
    );
    for f in ["Dockerfile", ".dockerignore"] {
        std::fs::copy(root().join(f), ctx.join(f)).unwrap();
    }
    let built = run(
        "docker",
        &[
            "build",
            "-q",
            "--label",
            LABEL,
            "-t",
            &tag,
            ctx.to_str().unwrap(),
        ],
    );
    let _ = std::fs::remove_dir_all(&ctx);
    assert!(
        stage.status.success(),
        "deploy/image-rootfs.sh: {}{}",
        String::from_utf8_lossy(&stage.stdout),
        String::from_utf8_lossy(&stage.stderr)
    );
    let image = Arc::new(Image { tag });
    assert!(
        built.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    *slot = Arc::downgrade(&image);
    image
}

/// The README's `docker run` command (its first shell block that starts
/// with `docker run`), split into arguments after `docker`.
fn readme_docker_run() -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme
        .find("```sh\ndocker run ")
        .expect("README.md shows a `docker run` block")
        + "```sh\n".len();
    let block = &readme[start..start + readme[start..].find("```").unwrap()];
    let words: Vec<String> = block
        .replace("\\\n", " ")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(words[..2], ["docker", "run"], "{block}");
    words[1..].to_vec()
}

/// A port free for UDP and TCP on `ip`, below 1024, so that binding it
/// needs the image's NET_BIND_SERVICE (never 53: that is the default).
fn free_low_port(ip: IpAddr) -> u16 {
    let start = 600 + (std::process::id() % 300) as u16;
    (start..1024)
        .chain(600..start)
        .find(|&p| UdpSocket::bind((ip, p)).is_ok() && TcpListener::bind((ip, p)).is_ok())
        .expect("a free port below 1024")
}

fn port_free(addr: SocketAddr) -> bool {
    UdpSocket::bind(addr).is_ok() && TcpListener::bind(addr).is_ok()
}

/// A busybox web server answering `hello-NAME`, routed as `host`.
fn web_app(cleanup: &Cleanup, name: &str, network: &str, host: &str) -> IpAddr {
    let body = format!(
        "mkdir -p /www && echo hello-{name} > /www/index.html && exec httpd -f -p 8080 -h /www"
    );
    let host_label = format!("portless.http.host={host}");
    container(
        cleanup,
        name,
        &[
            "--network",
            network,
            "--label",
            &host_label,
            "--label",
            "portless.http.port=8080",
        ],
        &["sh", "-c", &body],
    );
    container_ip(name, network)
}

/// GET `/` with `host` from the host's curl; the body when it answers 200.
fn curl(http: SocketAddr, host: &str) -> Option<String> {
    let url = format!("http://{http}/");
    let h = format!("Host: {host}");
    let out = run("curl", &["-sf", "-m", "3", "-H", &h, &url]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn wait_connected(admin: SocketAddr, logs: impl Fn() -> String) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if http_get(admin, "/api/status").is_some_and(|b| b.contains("\"connected\": true")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "portless did not serve its admin API at {admin}: {}",
        logs()
    );
}

/// `docker run` exactly as the README shows (its flags: host network, all
/// capabilities dropped but NET_BIND_SERVICE, read-only, the Docker
/// socket), plus a label, the test's ports by environment and a domain by a
/// configuration file: DNS answers a container's name from inside another
/// container and a host-side name under the file's domain, the router
/// reaches a labelled container, `portless status` (the health check)
/// works, and `docker stop` ends it at once and cleanly, leaving its ports
/// free and nothing else behind.
#[test]
fn image_runs_as_the_readme_shows() {
    require("curl");
    require("dig");
    require("nsenter");
    let image = image();
    let cleanup = Cleanup::new();
    let (net, gw) = network(&cleanup, &[]);
    let app = unique("plapp");
    let app_host = format!("{app}.test");
    let app_ip = web_app(&cleanup, &app, &net, &app_host);

    let lo: IpAddr = Ipv4Addr::LOCALHOST.into();
    let dns = SocketAddr::new(gw, free_low_port(gw));
    let http = SocketAddr::new(lo, free_port(lo));
    let admin = SocketAddr::new(lo, free_port(lo));
    let domain = format!("d{}.test", std::process::id());
    let conf = std::env::temp_dir().join(unique("portless-conf-"));
    std::fs::create_dir_all(&conf).unwrap();
    cleanup.push(&["rm", "-rf", conf.to_str().unwrap()]);
    std::fs::write(
        conf.join("portless.toml"),
        format!("[dns]\ndomain = \"{domain}\"\n"),
    )
    .unwrap();

    let name = unique("portless-");
    let mut args = readme_docker_run();
    let i = args
        .iter()
        .position(|a| a == "--name")
        .expect("--name in the README's docker run");
    args[i + 1] = name.clone();
    assert_eq!(
        args.last().unwrap(),
        "portless",
        "the image is the last argument: {args:?}"
    );
    args.pop();
    let env = [
        ("PORTLESS_CONFIG", "/etc/portless/portless.toml".to_owned()),
        ("PORTLESS_DNS_PORT", "0".to_owned()),
        ("PORTLESS_DNS_LISTEN", dns.to_string()),
        ("PORTLESS_HTTP_LISTEN", http.to_string()),
        ("PORTLESS_ADMIN_LISTEN", admin.to_string()),
    ];
    args.extend(["--label".into(), LABEL.into()]);
    args.extend(["-v".into(), format!("{}:/etc/portless:ro", conf.display())]);
    for (k, v) in &env {
        args.extend(["-e".into(), format!("{k}={v}")]);
    }
    args.push(image.tag.clone());
    cleanup.push(&["docker", "rm", "-f", &name]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    docker(&args);
    let logs = || {
        ok(
            "sh",
            &["-c", &format!("docker logs {name} 2>&1 | tail -30")],
        )
    };
    wait_connected(admin, logs);

    // DNS from inside a container: the query leaves from its own address.
    let peer = unique("plpeer");
    container(&cleanup, &peer, &["--network", &net], &[]);
    let answer = wait_until(
        "the app's name from the peer container",
        Duration::from_secs(10),
        || {
            let d = dig_from(&peer, dns, &app, "A");
            (d.status == "NOERROR" && !d.answers.is_empty()).then_some(d)
        },
    );
    assert_eq!(answer.answers, [app_ip.to_string()], "{}", answer.raw);
    // A host-side name under the configuration file's domain.
    let host_side = dig(dns, &format!("{app}.{domain}"), "A", &[]);
    assert_eq!(
        host_side.answers,
        [app_ip.to_string()],
        "{}\n{}",
        host_side.raw,
        logs()
    );

    // Routing to the labelled container.
    let body = wait_until("the route to the app", Duration::from_secs(10), || {
        curl(http, &app_host)
    });
    assert_eq!(body, format!("hello-{app}"));

    // The image's health check command.
    let status = docker(&["exec", &name, "portless", "status", "--json"]);
    assert!(status.contains(&app), "{status}");

    // Only the mounts it was given: no anonymous volume is left behind.
    let mounts = docker(&["inspect", "-f", "{{range .Mounts}}{{.Type}} {{end}}", &name]);
    assert!(
        mounts.split_whitespace().all(|t| t == "bind"),
        "mounts: {mounts}"
    );

    let start = Instant::now();
    docker(&["stop", "-t", "10", &name]);
    let took = start.elapsed();
    let exit = docker(&["inspect", "-f", "{{.State.ExitCode}}", &name]);
    assert_eq!(exit, "0", "exit code after docker stop: {}", logs());
    assert!(
        took < Duration::from_secs(8),
        "docker stop took {took:?}: SIGTERM was not handled"
    );
    for a in [dns, http, admin] {
        assert!(port_free(a), "{a} is still bound after docker stop");
    }
    docker(&["rm", &name]);
    let left = docker(&["ps", "-aq", "--filter", &format!("name=^{name}$")]);
    assert!(left.is_empty(), "container left: {left}");
}

/// deploy/docker-compose.yml with the two apps of a second file (as the
/// README suggests: apps next to portless), and the test's ports by
/// environment: both apps reached by their hosts with curl, each app's
/// name answered to the other by nslookup inside the container, a
/// host-side compose name answered by the host's nslookup; `down` leaves
/// no container and no network of the project.
#[test]
fn compose_file_serves_two_labelled_apps() {
    require("docker-compose");
    require("curl");
    require("nslookup");
    let image = image();
    let busybox = busybox_image();
    let cleanup = Cleanup::new();
    let project = unique("plc");
    let dir = std::env::temp_dir().join(&project);
    std::fs::create_dir_all(&dir).unwrap();
    cleanup.push(&["rm", "-rf", dir.to_str().unwrap()]);

    let lo: IpAddr = Ipv4Addr::LOCALHOST.into();
    let http = SocketAddr::new(lo, free_port(lo));
    let admin = SocketAddr::new(lo, free_port(lo));
    let base = root().join("deploy/docker-compose.yml");
    let base = base.to_str().unwrap();
    let apps = dir.join("apps.yml");
    let apps = apps.to_str().unwrap();
    let compose = |args: &[&str]| {
        let mut a = vec!["-f", base, "-f", apps, "-p", &project];
        a.extend_from_slice(args);
        run("docker-compose", &a)
    };
    cleanup.push(&[
        "docker-compose",
        "-f",
        base,
        "-f",
        apps,
        "-p",
        &project,
        "down",
        "-v",
        "-t",
        "1",
    ]);

    // A subnet of its own, derived from the pid; the next one if taken.
    let mut up = None;
    for n in 0..20u32 {
        let third = (std::process::id() + n * 37) % 250;
        let gw: IpAddr = format!("10.219.{third}.1").parse().unwrap();
        // Free on every address now, so on the new gateway too.
        let dns = SocketAddr::new(gw, free_port(Ipv4Addr::UNSPECIFIED.into()));
        let yaml = format!(
            r#"services:
  portless:
    image: {tag}
    labels: {{ portless-test: "1" }}
    environment:
      PORTLESS_DNS_PORT: "0"
      PORTLESS_DNS_LISTEN: "{dns}"
      PORTLESS_HTTP_LISTEN: "{http}"
      PORTLESS_ADMIN_LISTEN: "{admin}"
  shop:
    image: {busybox}
    command: [sh, -c, "mkdir -p /www && echo hello-shop > /www/index.html && exec httpd -f -p 8080 -h /www"]
    labels: {{ portless-test: "1", portless.http.host: shop.{project}.test, portless.http.port: "8080" }}
  blog:
    image: {busybox}
    command: [sh, -c, "mkdir -p /www && echo hello-blog > /www/index.html && exec httpd -f -p 8080 -h /www"]
    labels: {{ portless-test: "1", portless.http.host: blog.{project}.test, portless.http.port: "8080" }}
networks:
  default:
    labels: {{ portless-test: "1" }}
    ipam:
      config:
        - subnet: 10.219.{third}.0/24
          gateway: {gw}
"#,
            tag = image.tag,
        );
        std::fs::write(apps, yaml).unwrap();
        // The gateway is free before the network exists; the DNS port on
        // it is then this test's.
        let out = compose(&["up", "-d"]);
        if out.status.success() {
            up = Some(dns);
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let _ = compose(&["down", "-v", "-t", "1"]);
        assert!(
            err.contains("overlap") || err.contains("in use"),
            "docker-compose up: {err}"
        );
    }
    let dns = up.expect("no free 10.219.x.0/24 subnet for the compose test");
    let logs = || {
        String::from_utf8_lossy(&compose(&["logs", "--tail", "30", "portless"]).stdout).into_owned()
    };
    wait_connected(admin, logs);

    for app in ["shop", "blog"] {
        let host = format!("{app}.{project}.test");
        let body = wait_until(
            &format!("the route to {app}"),
            Duration::from_secs(15),
            || curl(http, &host),
        );
        assert_eq!(body, format!("hello-{app}"));
    }

    let id = |service: &str| {
        String::from_utf8_lossy(&compose(&["ps", "-q", service]).stdout)
            .trim()
            .to_owned()
    };
    let (shop, blog) = (id("shop"), id("blog"));
    let net = format!("{project}_default");
    let ip = |c: &str| container_ip(c, &net).to_string();
    let server = format!("{}:{}", dns.ip(), dns.port());
    // Inside the shop container, busybox's nslookup asks portless for blog.
    let out = wait_until(
        "nslookup of blog from shop",
        Duration::from_secs(10),
        || {
            let o = run("docker", &["exec", &shop, "nslookup", "blog", &server]);
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.contains(&ip(&blog)).then_some(text)
        },
    );
    assert!(!out.contains(&ip(&shop)), "{out}");
    // From the host, the compose name under the domain.
    let port = format!("-port={}", dns.port());
    let name = format!("shop.{project}.docker.internal");
    let host_side = ok("nslookup", &[&port, &name, &dns.ip().to_string()]);
    assert!(host_side.contains(&ip(&shop)), "{host_side}");

    let down = compose(&["down", "-v", "-t", "5"]);
    assert!(down.status.success(), "docker-compose down: {down:?}");
    let filter = format!("label=com.docker.compose.project={project}");
    assert!(
        docker(&["ps", "-aq", "--filter", &filter]).is_empty(),
        "containers left after down"
    );
    assert!(
        docker(&["network", "ls", "-q", "--filter", &filter]).is_empty(),
        "network left after down"
    );
    // (The DNS listener's address went with the network.)
    for a in [http, admin] {
        assert!(port_free(a), "{a} is still bound after down");
    }
}

/// Cluster mode in the image, run as the README says (its `docker run`
/// plus `--cap-add NET_ADMIN` and the state directory), against a private etcd, in route mode with
/// no peers so that only the Docker network and portless's iptables chains
/// are made on this host: both appear, and `docker stop` with
/// `--cleanup-on-exit` removes them.
#[test]
fn image_runs_cluster_mode_with_net_admin() {
    require("etcd");
    require("iptables");
    let image = image();
    let cleanup = Cleanup::new();
    let etcd = common::netns::Etcd::on_loopback();
    let net = unique("plic");
    cleanup.push(&["docker", "network", "rm", &net]);
    // Clear of the other tests' ranges (10.213, 10.216, 10.219, 10.220-249).
    let cidr = format!("10.{}.0.0/16", 160 + std::process::id() % 30);
    let lo: IpAddr = Ipv4Addr::LOCALHOST.into();
    let admin = SocketAddr::new(lo, free_port(lo));

    let name = unique("portless-");
    let mut args = readme_docker_run();
    let i = args.iter().position(|a| a == "--name").unwrap();
    args[i + 1] = name.clone();
    args.pop();
    args.extend(["--cap-add".into(), "NET_ADMIN".into()]);
    let state = std::env::temp_dir().join(unique("portless-state-"));
    std::fs::create_dir_all(&state).unwrap();
    cleanup.push(&["rm", "-rf", state.to_str().unwrap()]);
    args.extend([
        "-v".into(),
        format!("{}:/var/lib/portless", state.display()),
        // Cluster networks: the plugin's socket where this Docker looks.
        "-v".into(),
        "/run/docker/plugins:/run/docker/plugins".into(),
    ]);
    args.extend(["--label".into(), LABEL.into()]);
    let env = [
        ("PORTLESS_CLUSTER_ETCD", etcd.endpoint()),
        ("PORTLESS_CLUSTER_CIDR", cidr.clone()),
        ("PORTLESS_NETPLANE_MODE", "route".into()),
        ("PORTLESS_DOCKER_NETWORK", net.clone()),
        ("PORTLESS_LEASE_TTL", "2".into()),
        ("PORTLESS_CLEANUP_ON_EXIT", "true".into()),
        ("PORTLESS_DNS_PORT", "0".into()),
        ("PORTLESS_NO_ROUTER", "true".into()),
        ("PORTLESS_ADMIN_LISTEN", admin.to_string()),
    ];
    for (k, v) in &env {
        args.extend(["-e".into(), format!("{k}={v}")]);
    }
    args.push(image.tag.clone());
    cleanup.push(&["docker", "rm", "-f", &name]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    docker(&args);
    let logs = || {
        ok(
            "sh",
            &["-c", &format!("docker logs {name} 2>&1 | tail -30")],
        )
    };

    let start = Instant::now();
    loop {
        let ready = http_get(admin, "/api/cluster")
            .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v["docker_network"]["ready"] == true);
        if ready {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "cluster mode did not come up in the image: {}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let label = docker(&[
        "network",
        "inspect",
        "-f",
        "{{index .Labels \"io.portless.netplane\"}}",
        &net,
    ]);
    assert_eq!(label, "1");
    let want = format!("-s {cidr} -d {cidr} -j ACCEPT");
    wait_until(
        "portless's PORTLESS-FWD rule",
        Duration::from_secs(10),
        || {
            let out = run("iptables", &["-w", "-S", "PORTLESS-FWD"]);
            String::from_utf8_lossy(&out.stdout)
                .contains(&want)
                .then_some(())
        },
    );
    // The one place it writes, outside the read-only image.
    let saved = wait_until("the state file", Duration::from_secs(10), || {
        let n = std::fs::read_dir(&state).ok()?.count();
        (n > 0).then_some(n)
    });
    assert!(saved > 0);

    // A cluster network made with Docker's command through the image's
    // plugin: its bridge answers ARP for the network's other hosts (proxy
    // ARP, at once), set over netlink since /proc/sys is read-only here,
    // and a container gets an address on it.
    let pnet = unique("plipn");
    cleanup.push(&["docker", "network", "rm", &pnet]);
    docker(
        &[
            &common::CREATE_PORTLESS_NETWORK[..],
            &["--label", LABEL, &pnet],
        ]
        .concat(),
    );
    let pc = unique("plipc");
    container(&cleanup, &pc, &["--network", &pnet], &[]);
    let subnet: ipnet::IpNet = docker(&[
        "network",
        "inspect",
        "-f",
        "{{(index .IPAM.Config 0).Subnet}}",
        &pnet,
    ])
    .parse()
    .unwrap();
    let ip = container_ip(&pc, &pnet);
    assert!(subnet.contains(&ip), "{ip} not in {subnet}");
    let id = docker(&["network", "inspect", "-f", "{{.Id}}", &pnet]);
    let bridge = format!("pn-br{}", &id[..10]);
    for (path, want) in [
        (format!("/proc/sys/net/ipv4/conf/{bridge}/proxy_arp"), "1"),
        (
            format!("/proc/sys/net/ipv4/neigh/{bridge}/proxy_delay"),
            "0",
        ),
    ] {
        let got = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(got.trim(), want, "{path}: {}", logs());
    }
    docker(&["rm", "-f", &pc]);
    docker(&["network", "rm", &pnet]);

    docker(&["stop", "-t", "10", &name]);
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.ExitCode}}", &name]),
        "0",
        "{}",
        logs()
    );
    assert!(
        !run("docker", &["network", "inspect", &net])
            .status
            .success(),
        "the Docker network is left after docker stop"
    );
    let rules = ok("iptables", &["-w", "-S"]) + &ok("iptables", &["-w", "-t", "nat", "-S"]);
    assert!(!rules.contains("PORTLESS-"), "iptables rules left: {rules}");
}
