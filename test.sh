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
have protoc || need+=(protobuf-compiler)
# etcd-client's build imports google/protobuf/*.proto, which come with
# libprotobuf-dev (only recommended by protobuf-compiler, and recommends are
# not installed below).
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
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
if [ ${#need[@]} -gt 0 ]; then
  echo "test.sh: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
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

cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast "$@"
