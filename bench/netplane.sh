#!/usr/bin/env bash
# netplane benchmark, in one run (see docs/BENCHMARKS.md, ## netplane):
#   1. TCP throughput container to container across two namespace hosts:
#      hand-made routes without overlay (baseline), portless route mode,
#      portless VXLAN; ratios to the baseline.
#   2. A new host's lease -> every peer's kernel entries in place.
#   3. Programming 1,000 peers into one host; 1,000 host records in etcd
#      until all are in place.
#
#   bench/netplane.sh [all|throughput|join|peers] [--secs N] [--rounds N]
#                     [--samples N] [--peers N]
#
# Root only. Everything runs in network namespaces the benchmark creates
# (and removes on exit) and against etcd instances on loopback with
# temporary data directories; no traffic leaves them. BENCH_NO_GRO=1 keeps
# GRO off on the underlay veths (it is turned on by default, as a NIC would).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

if [ "$(id -u)" != 0 ]; then
  exec sudo -E "$0" "$@"
fi

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have iperf3 || need+=(iperf3)
have etcd || need+=(etcd-server)
have ping || need+=(iputils-ping)
have ethtool || need+=(ethtool)
have ip || need+=(iproute2)
have protoc || need+=(protobuf-compiler)
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "bench/netplane.sh: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

cd "$ROOT"
cargo build --release -q -p portless-netplane --example netplane_bench
echo "netplane benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, kernel $(uname -r)"
echo
exec target/release/examples/netplane_bench "${@:-all}"
