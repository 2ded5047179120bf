#!/usr/bin/env bash
# Runs every test of portless: unit, property and integration tests against
# the real Docker Engine, network namespaces and a real etcd. Installs what
# the tests need (Debian packages) when it is missing. Needs root.
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" != 0 ]; then
  exec sudo -E env "PATH=$PATH" "$0" "$@"
fi

need=()
have() { command -v "$1" >/dev/null 2>&1; }
pkg() { dpkg -s "$1" >/dev/null 2>&1; }
# No protoc: the build brings its own (.cargo/config.toml, .cargo/protoc).
have etcd || need+=(etcd-server)
have etcdctl || need+=(etcd-client)
pkg busybox-static || need+=(busybox-static)
have dig || need+=(dnsutils)
have dnsmasq || need+=(dnsmasq-base)
have nsenter || need+=(util-linux)
have ip || need+=(iproute2)
have iptables || need+=(iptables)
have curl || need+=(curl)
have docker-compose || need+=(docker-compose)
have openssl || need+=(openssl)
have ping || need+=(iputils-ping)
have iperf3 || need+=(iperf3)
have file || need+=(file)
have promtool || need+=(prometheus)
# The ACME tests: a real ACME server (pebble, and pebble-challtestsrv as its DNS).
have pebble || need+=(pebble)
# The deployment tests: the image (deploy/image-rootfs.sh strips the binary
# and copies the CA roots), the systemd unit, the chart's Python tools.
have strip || need+=(binutils)
[ -s /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
have nslookup || need+=(dnsutils)
have setpriv || need+=(util-linux)
have systemd-analyze || need+=(systemd)
have python3 || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "test.sh: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# Python tools of tests/deploy_chart.rs, pinned, in a virtualenv of this
# checkout (nothing global): Helm v4 (helm-python-sdk: Helm's Go SDK as a
# library, offline) and checkov (a security scan of the rendered chart).
venv=target/tools/venv
py_tools=(helm-python-sdk==0.2.2 checkov==3.3.30)
if [ "$(cat "$venv/.pins" 2>/dev/null)" != "${py_tools[*]}" ]; then
  echo "test.sh: installing ${py_tools[*]} into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${py_tools[@]}" \
    || { echo "test.sh: cannot install ${py_tools[*]} from PyPI; the chart tests need them" >&2; exit 1; }
  echo "${py_tools[*]}" > "$venv/.pins"
fi

docker info >/dev/null 2>&1 || { echo "test.sh: the Docker Engine is not reachable; the integration tests need it" >&2; exit 1; }

# Leftovers of an interrupted earlier run (every test object carries this label).
docker ps -aq --filter label=portless-test=1 | xargs -r docker rm -f >/dev/null
docker network ls -q --filter label=portless-test=1 | xargs -r docker network rm >/dev/null || true
# Engines, etcd and namespaces of an interrupted two-engine test run
# (tests/cluster_hosts.rs keeps its state under /tmp/portless-twohost-*).
for d in /tmp/portless-twohost-*; do
  [ -d "$d" ] || continue
  TWOHOST_PFX=${d##*/portless-twohost-} TWOHOST_DIR=$d bash tests/twohost.sh down >/dev/null 2>&1 || true
  rm -rf "$d"
done

# What the project says about its code is enforced here, before the tests:
# formatting, the lints of Cargo.toml and clippy.toml, and the fuzz crates
# (outside the workspace, so nothing else builds them) still compiling.
cargo fmt --all --check || { echo "test.sh: cargo fmt --all would change files (run it)" >&2; exit 1; }
cargo clippy --workspace --all-targets -- -D warnings
for fuzz in dns/fuzz router/fuzz; do
  (cd "$fuzz" && CARGO_TARGET_DIR="$PWD/../../target/fuzz" cargo check --bins)
done

cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast "$@"
