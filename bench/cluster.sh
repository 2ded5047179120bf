#!/usr/bin/env bash
# The cluster namespace, measured (see docs/BENCHMARKS.md, ## cluster):
#   event  two real Docker Engines (tests/twohost.sh) with a real portless
#          each: 100 container starts on B, the time from B's Docker event to
#          the first answer of A's portless for the new name (polled every
#          millisecond), and etcd's writes per container start and stop.
#   networks  the same two Engines: iperf3 between containers on A and B
#          over a `docker network create -d portless` network against the
#          cluster network's VXLAN, and `docker run` on B -> the container
#          resolvable and reachable from A.
#   fleet  one etcd, one real portless, and a generator playing 1,000 hosts
#          with 100 containers each (100,000 records): initial sync time,
#          resident memory, record written -> answered, quiet and under
#          churn.
#
#   bench/cluster.sh [all|event|networks|fleet] [--n N] [--hosts N]
#                    [--per-host N] [--churn-rate N] [--churn-secs N]
#                    [--rounds N] [--iperf-secs N] [--runs N]
#
# Root only. Everything runs in network namespaces it creates and removes
# on exit; no traffic leaves them.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

if [ "$(id -u)" != 0 ]; then
  exec sudo -E "$0" "$@"
fi

what=${1:-all}
[ $# -gt 0 ] && shift
N=100 HOSTS=1000 PER=100 RATE=100 SECS=20 ROUNDS=7 SECS_IPERF=3 NRUN=30
while [ $# -gt 0 ]; do
  case $1 in
    --n) N=$2; shift 2 ;;
    --hosts) HOSTS=$2; shift 2 ;;
    --per-host) PER=$2; shift 2 ;;
    --churn-rate) RATE=$2; shift 2 ;;
    --churn-secs) SECS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --iperf-secs) SECS_IPERF=$2; shift 2 ;;
    --runs) NRUN=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have etcd || need+=(etcd-server)
have etcdctl || need+=(etcd-client)
have busybox || need+=(busybox-static)
have iperf3 || need+=(iperf3)
have ping || need+=(iputils-ping)
have file || need+=(file)
if [ ${#need[@]} -gt 0 ]; then
  echo "bench/cluster.sh: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

cd "$ROOT"
cargo build --release -q --bin portless --example cluster_bench
BIN=$ROOT/target/release/portless
GEN=$ROOT/target/release/examples/cluster_bench
echo "cluster benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"

PIDS=()
CLEAN=()
cleanup() {
  local p c
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  for c in "${CLEAN[@]}"; do eval "$c" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

# Two real Engines (tests/twohost.sh) with a real portless each, in VXLAN
# mode; sets PFX and DIR.
engines_up() {
  PFX=plb$(( $$ % 100000 ))
  DIR=/tmp/portless-bench-$PFX
  export TWOHOST_PFX=$PFX TWOHOST_DIR=$DIR
  CLEAN+=("TWOHOST_PFX=$PFX TWOHOST_DIR=$DIR bash $ROOT/tests/twohost.sh down; rm -rf $DIR")
  bash tests/twohost.sh up 2>"$DIR.up.log" || { cat "$DIR.up.log" >&2; return 1; }
  local h ip
  for h in A B; do
    ip=10.251.0.1; [ $h = B ] && ip=10.251.0.2
    ip netns exec "$PFX-h$h" "$BIN" run --docker-host "unix:///run/$PFX-$h.sock" \
      --cluster-etcd http://10.251.0.10:27379 --advertise-addr "$ip" \
      --plugin-socket "$DIR/plugins-$h/portless.sock" \
      --dns-listen 127.0.0.1:5353 --upstream 127.0.0.1:9 --state-dir "$DIR/state-$h" \
      --log warn 2>"$DIR/portless-$h.log" &
    PIDS+=($!)
  done
  # Both ready: the cluster network exists on each.
  for h in A B; do
    for _ in $(seq 100); do
      ip netns exec "$PFX-h$h" "$BIN" status --json 2>/dev/null | grep -q '"ready": true' && break
      sleep 0.2
    done
  done
}

engines_down() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
  TWOHOST_PFX=$PFX TWOHOST_DIR=$DIR bash "$ROOT/tests/twohost.sh" down >/dev/null 2>&1 || true
  rm -rf "$DIR"
}

run_event() {
  engines_up
  echo
  echo "== event on B -> answer on A (two real Engines, $N container starts) =="
  ip netns exec "$PFX-hA" "$GEN" event --docker "unix:///run/$PFX-B.sock" --dns 127.0.0.1:5353 \
    --etcd http://10.251.0.10:27379 --image "$PFX-bb" --host-b 10.251.0.2 --n "$N"
  engines_down
}

# Cluster networks (`docker network create -d portless`): iperf3 between
# containers on A and B over such a network against the same over the
# cluster network's VXLAN (a client on A and a server on B on each; one
# container on both would have one default route, through one of them),
# rounds alternating the order; then `docker run` on B -> resolvable and
# reachable from A.
run_networks() {
  engines_up
  local dk_a="docker -H unix:///run/$PFX-A.sock" dk_b="docker -H unix:///run/$PFX-B.sock"
  local net=$PFX-bnet img=$PFX-bb
  # (On failure, the engines go with everything on them: tests/twohost.sh down.)
  $dk_a network create -d portless --ipam-driver portless "$net" >/dev/null
  for _ in $(seq 50); do $dk_b network inspect "$net" >/dev/null 2>&1 && break; sleep 0.1; done
  $dk_b run -d --name "$PFX-srv-c" --network portless "$img" iperf3 -s >/dev/null
  $dk_b run -d --name "$PFX-srv-n" --network "$net" "$img" iperf3 -s >/dev/null
  $dk_a run -d --name "$PFX-cli-c" --network portless "$img" sleep 1000000 >/dev/null
  $dk_a run -d --name "$PFX-cli-n" --network "$net" "$img" sleep 1000000 >/dev/null
  local ip_cluster ip_net
  ip_cluster=$($dk_b inspect -f '{{(index .NetworkSettings.Networks "portless").IPAddress}}' "$PFX-srv-c")
  ip_net=$($dk_b inspect -f "{{(index .NetworkSettings.Networks \"$net\").IPAddress}}" "$PFX-srv-n")
  echo
  echo "== iperf3 A -> B: cluster network $net ($ip_net) vs the cluster network's VXLAN ($ip_cluster), $ROUNDS rounds of $SECS_IPERF s =="
  # iperf CLIENT SERVER_IP: Gbit/s received
  iperf() {
    $dk_a exec "$1" iperf3 -c "$2" -t "$SECS_IPERF" -O 1 -J \
      | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["end"]["sum_received"]["bits_per_second"]/1e9) if "sum_received" in j.get("end", {}) else sys.exit("iperf3: " + j.get("error", "no result"))'
  }
  local r a b ratios=()
  for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then a=$(iperf "$PFX-cli-c" "$ip_cluster"); b=$(iperf "$PFX-cli-n" "$ip_net")
    else b=$(iperf "$PFX-cli-n" "$ip_net"); a=$(iperf "$PFX-cli-c" "$ip_cluster"); fi
    ratios+=("$(python3 -c "print(round($b/$a, 3))")")
    printf 'round %d: cluster network %.2f Gbit/s, -d portless network %.2f Gbit/s, ratio %s\n' "$r" "$a" "$b" "${ratios[-1]}"
  done
  python3 -c "import statistics,sys; r=[float(x) for x in sys.argv[1:]]; print(f'median ratio (-d portless / cluster network VXLAN) over {len(r)} rounds: {statistics.median(r):.3f}')" "${ratios[@]}"
  $dk_a rm -f "$PFX-cli-c" "$PFX-cli-n" >/dev/null; $dk_b rm -f "$PFX-srv-c" "$PFX-srv-n" >/dev/null
  echo
  echo "== docker run on B -> resolvable and reachable from A over $net, $NRUN runs =="
  ip netns exec "$PFX-hA" "$GEN" netrun --docker "unix:///run/$PFX-B.sock" --dns 127.0.0.1:5353 \
    --image "$img" --network "$net" --n "$NRUN"
  $dk_a network rm "$net" >/dev/null
  engines_down
}

run_fleet() {
  local ns=plbf$$ dir
  dir=$(mktemp -d /tmp/portless-fleet-XXXX)
  CLEAN+=("ip netns del $ns" "ip netns del $ns-gw" "rm -rf $dir")
  ip netns add "$ns"
  ip netns add "$ns-gw"
  ip -n "$ns" link set lo up
  ip link add plbf-u netns "$ns" type veth peer name plbf-g netns "$ns-gw"
  ip -n "$ns" addr add 192.168.77.1/24 dev plbf-u
  ip -n "$ns-gw" addr add 192.168.77.2/24 dev plbf-g
  ip -n "$ns" link set plbf-u up
  ip -n "$ns-gw" link set plbf-g up
  ip -n "$ns" route add default via 192.168.77.2
  ip netns exec "$ns" etcd --name f --data-dir "$dir/etcd" \
    --listen-client-urls http://127.0.0.1:23790 --advertise-client-urls http://127.0.0.1:23790 \
    --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
    --initial-cluster f=http://127.0.0.1:23800 --log-level error >"$dir/etcd.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do
    ip netns exec "$ns" etcdctl --endpoints http://127.0.0.1:23790 endpoint health >/dev/null 2>&1 && break
    sleep 0.1
  done
  echo
  echo "== fleet: $HOSTS hosts x $PER containers, one real portless =="
  ip netns exec "$ns" "$GEN" fleet --etcd http://127.0.0.1:23790 --dns 127.0.0.1:5353 \
    --admin 127.0.0.1:9053 --hosts "$HOSTS" --per-host "$PER" --churn-rate "$RATE" --churn-secs "$SECS" -- \
    "$BIN" run --docker-host none --cluster-etcd http://127.0.0.1:23790 --cluster-cidr 10.64.0.0/10 \
    --advertise-addr 192.168.77.1 --dns-port 0 --dns-listen 127.0.0.1:5353 \
    --http-listen 127.0.0.1:8080 --upstream 127.0.0.1:9 --state-dir "$dir/state" --log warn
  echo "etcd database size: $(ip netns exec "$ns" etcdctl --endpoints http://127.0.0.1:23790 endpoint status -w json | grep -o '"dbSize":[0-9]*' | cut -d: -f2) bytes"
}

case $what in
  event) run_event ;;
  fleet) run_fleet ;;
  networks) run_networks ;;
  all) run_event; run_networks; run_fleet ;;
  *) echo "usage: $0 [all|event|networks|fleet] [options]" >&2; exit 2 ;;
esac
