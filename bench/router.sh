#!/usr/bin/env bash
# Router benchmark: the backend hit directly, nginx, haproxy, caddy and
# portless, each routing by Host to the same backend container, loaded by wrk
# with keep-alive connections, in one run, rounds interleaved (each round in
# its own shuffled order), medians reported. Also the route lookup cost and
# resident memory.
#
# Usage: sudo bench/router.sh [--duration S] [--rounds N] [--connections N]
#                             [--threads N] [--no-build] [--keep]
#                             [--targets LIST] [--pinned]
#
# The backend is a real container: a local image (portless-bench-nginx:local,
# made with `docker import` from the host's own /usr/sbin/nginx, the libraries
# ldd lists and a config written here) on a bridge network created here, with
# the labels portless.http.host=bench.test and portless.http.port=80. Targets:
#   direct        wrk -> the container's IP:80
#   nginx         host nginx (2 workers), upstream keep-alive -> container
#   haproxy       host haproxy (2 threads) -> container
#   caddy         host caddy reverse_proxy -> container
#   portless      the product: target/release/portless run, which learns the
#                 route from the container's Docker labels (DNS off: no
#                 --dns-listen and --dns-port 0; admin API on a free port)
#   portless-lib  the router library alone (router/examples/router_bench.rs
#                 serve, a fixed 1-route table to the container): kept to tell
#                 the product's own overhead from the library's
#   portless-10k  the same with 10,000 more routes in the table
# The ratio lines compare `portless` (the product) with the better of nginx
# and haproxy on each measure (req/s, p99, CPU per request).
#
# --pinned: the proxy alone on CPU 1, wrk and the backend container on CPU 0
# (taskset; the container with --cpuset-cpus). Each proxy gets one CPU's
# worth of workers: portless run --router-threads 1, router_bench with one
# thread (its thread count follows the CPUs it may use), nginx 1 worker,
# haproxy nbthread 1, caddy GOMAXPROCS=1; wrk runs with one thread unless
# --threads says otherwise. Default targets: nginx, haproxy, portless,
# portless-lib. Each run also reports how busy each of the two CPUs was
# (/proc/stat, all processes: the machine is shared). When the load side's
# CPU is saturated and the proxy's is not, requests per second measure the
# load side, not the proxy: then CPU per request (the proxy's user+system
# time from /proc/PID/stat over the run, divided by the requests) decides.
# Without --pinned the two busy figures are still CPU 0 ("load") and CPU 1
# ("proxy"), but every process runs on both.
#
# CPU time per request (utime+stime from /proc over a wrk run, divided by the
# requests wrk counted) is the cost of the processes doing that target's own
# work: for `direct` the backend container's nginx processes (what serving the
# request costs); for every proxy its own processes only (nginx: its workers;
# haproxy, caddy, router_bench, portless run: the one process, all threads).
# The backend container serves every target and its CPU (about the `direct`
# figure per request) is left out of the proxies' figures, as is wrk's. So a
# proxy's figure is its overhead per request, comparable across proxies.
#
# A second table splits that figure into user and system time and adds, per
# request, wrk's own CPU (bash's `times` around wrk) and the backend
# container's. Since all of them share the machine's CPUs, it ends with a
# ceiling: the req/s a proxy would reach with the best peer's system time
# and no user-space work at all (an estimate, see the comment at the table).
#
# Traffic goes to 127.0.0.1 and the bench's own container only. Every host
# process runs from a mktemp -d directory and is stopped on exit; the
# container, network and image (label portless-bench.router=1) are
# removed on exit, failure and Ctrl-C included,
# and leftovers of an earlier killed run at start. One run at a time (flock).
# --keep keeps the mktemp directory (configs, logs, raw results, each wrk
# output). --targets runs only some targets (comma-separated names from the
# list above, e.g. haproxy,portless); the ratio lines need nginx or haproxy
# and the portless target they compare.
set -euo pipefail

DURATION=10
ROUNDS=3
CONNS=64
THREADS=2
BUILD=1
KEEP=0
TARGETS=""
PINNED=0
THREADS_SET=0
while (($#)); do
    case $1 in
        --duration) DURATION=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --connections) CONNS=$2; shift 2 ;;
        --threads) THREADS=$2; THREADS_SET=1; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        --targets) TARGETS=$2; shift 2 ;;
        --pinned) PINNED=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 64 ;;
    esac
done

log() { printf '[router-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

((EUID == 0)) || die "run as root (sudo $0)"
# --pinned: the CPU of the proxy, and the CPU of wrk and the backend.
PROXY_CPU=1
LOAD_CPU=0
PIN_PROXY=()
PIN_LOAD=()
CPUSET=()
PROXY_WORKERS=2
RUN_THREADS=()
if ((PINNED)); then
    RUN_THREADS=(--router-threads 1)
    (($(nproc) >= 2)) || die "--pinned needs 2 CPUs"
    PIN_PROXY=(taskset -c "$PROXY_CPU")
    PIN_LOAD=(taskset -c "$LOAD_CPU")
    CPUSET=(--cpuset-cpus "$LOAD_CPU")
    PROXY_WORKERS=1
    ((THREADS_SET)) || THREADS=1
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOST=bench.test
BODY="hello from the backend"
IMAGE=portless-bench-nginx:local
NET=portless-bench-router
CTR=portless-bench-router-backend
# Not the shared label portless-bench=1: bench/dns.sh removes every
# container and network with that label at its start and end, and took this
# run's backend away in the middle of a round when both ran at once.
LABELS=(--label portless-bench.router=1)
MINE=label=portless-bench.router=1
# The caller's PORTLESS_* settings must not change what is measured.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^PORTLESS_' || true)

exec 9>/run/lock/portless-router-bench.lock
flock -n 9 || die "another bench/router.sh is running"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    log "installing: ${missing[*]}"
    # Refuse service starts during the install: we run our own instances.
    local policy=/usr/sbin/policy-rc.d saved=""
    if [[ -e $policy ]]; then saved=$(mktemp); cp -p "$policy" "$saved"; fi
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"
    local rc=0
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null || rc=$?
    fi
    if [[ -n $saved ]]; then mv "$saved" "$policy"; else rm -f "$policy"; fi
    ((rc == 0)) || die "apt-get install ${missing[*]} failed"
}

stop_packaged_services() {
    local s
    for s in nginx haproxy caddy; do
        if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
            systemctl disable --now "$s" >/dev/null 2>&1 || true
        elif [[ -x /etc/init.d/$s ]]; then
            /etc/init.d/"$s" stop >/dev/null 2>&1 || true
            update-rc.d "$s" disable >/dev/null 2>&1 || true
        fi
    done
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# utime and stime of processes (clock ticks), each summed: "USER SYS".
# Field 2 (comm) may hold spaces, so count from the end of ") ".
cpu_ticks() {
    local p u=0 s=0 t
    for p in "$@"; do
        read -r -a t < <(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12, $13}') || t=(0 0)
        u=$((u + ${t[0]:-0})); s=$((s + ${t[1]:-0}))
    done
    echo "$u $s"
}
TICK=$(getconf CLK_TCK)
# Busy ticks of one CPU, all processes (user, nice, system, irq, softirq,
# steal from /proc/stat): "BUSY TOTAL".
core_ticks() {
    awk -v c="cpu$1" '$1 == c {b = $2 + $3 + $4 + $7 + $8 + $9; print b, b + $5 + $6}' /proc/stat
}
# User+system seconds of this shell's reaped descendants (the second line of
# bash's `times`), to time wrk itself: it runs, and is reaped, between two
# calls. `times` must run in this shell, not in a $(...) subshell, whose
# count of descendants starts at zero.
children_cpu() {
    times >"$WORK/times"
    python3 -c '
import re, sys
t = open(sys.argv[1]).read().splitlines()[-1]
print(sum(float(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", t)))' "$WORK/times"
}

# Everything this script made in Docker (by label): the container, then the
# network, then the image.
docker_cleanup() {
    local ids
    mapfile -t ids < <(docker ps -aq --filter "$MINE" 2>/dev/null || true)
    ((${#ids[@]} == 0)) || docker rm -f "${ids[@]}" >/dev/null 2>&1 || true
    mapfile -t ids < <(docker network ls -q --filter "$MINE" 2>/dev/null || true)
    ((${#ids[@]} == 0)) || docker network rm "${ids[@]}" >/dev/null 2>&1 || true
    mapfile -t ids < <(docker images -q --filter "$MINE" 2>/dev/null || true)
    ((${#ids[@]} == 0)) || docker rmi -f "${ids[@]}" >/dev/null 2>&1 || true
}

ensure_packages nginx haproxy caddy wrk curl python3 protobuf-compiler libprotobuf-dev
stop_packaged_services
command -v docker >/dev/null || die "docker CLI not found"
docker info >/dev/null 2>&1 || die "Docker Engine not reachable"

PORTLESS=$ROOT/target/release/portless
BIN=$ROOT/target/release/examples/router_bench
if ((BUILD)); then
    log "building portless and router_bench (release)"
    (cd "$ROOT" && cargo build --release -q -p portless --bin portless -p portless-router --example router_bench) \
        || die "build failed"
fi
[[ -x $PORTLESS ]] || die "$PORTLESS missing (run without --no-build)"
[[ -x $BIN ]] || die "$BIN missing (run without --no-build)"

# Host processes of an earlier killed run: the servers this script starts, in
# its mktemp -d directory (started with fd 9 closed: they hold no lock).
for d in /proc/[0-9]*; do
    [[ $(readlink "$d/cwd" 2>/dev/null) == /tmp/portless-router-bench.* ]] || continue
    [[ $(cat "$d/comm" 2>/dev/null) =~ ^(nginx|haproxy|caddy|portless|router_bench)$ ]] || continue
    log "stopping ${d#/proc/} left by an earlier run: $(tr '\0' ' ' <"$d/cmdline" 2>/dev/null)"
    kill "${d#/proc/}" 2>/dev/null || true
done
WORK=$(mktemp -d /tmp/portless-router-bench.XXXXXX)
cd "$WORK"
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    docker_cleanup
    if ((KEEP)); then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_http() { # addr:port, pid that must stay alive
    local i
    for i in $(seq 1 100); do
        kill -0 "$2" 2>/dev/null || return 1
        if curl -s -o /dev/null -H "Host: $HOST" "http://$1/"; then return 0; fi
        sleep 0.1
    done
    return 1
}

# --- the backend: host nginx in a container ----------------------------------
docker_cleanup # an earlier killed run's leftovers
log "building image $IMAGE (docker import of the host's nginx)"
R=$WORK/rootfs
mkdir -p "$R/usr/sbin" "$R/etc/nginx" "$R/tmp" "$R/var/log/nginx"
chmod 1777 "$R/tmp"
cp -L /usr/sbin/nginx "$R/usr/sbin/nginx"
for lib in $(ldd /usr/sbin/nginx | grep -o '/[^ ]*'); do
    mkdir -p "$R$(dirname "$lib")"
    cp -L "$lib" "$R$lib"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$R/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$R/etc/group"
printf 'passwd: files\ngroup: files\n' >"$R/etc/nsswitch.conf"
cat >"$R/etc/nginx/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes 1;
user nobody nogroup;
pid /tmp/nginx.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path /tmp; proxy_temp_path /tmp;
    fastcgi_temp_path /tmp; uwsgi_temp_path /tmp; scgi_temp_path /tmp;
    server { listen 80; location / { return 200 "$BODY\n"; } }
}
EOF
tar -C "$R" --numeric-owner --owner=0 --group=0 -c . |
    docker import -c 'ENTRYPOINT ["/usr/sbin/nginx", "-c", "/etc/nginx/nginx.conf"]' -c 'EXPOSE 80' \
        -c 'LABEL portless-bench.router=1' - "$IMAGE" >/dev/null
docker network create "${LABELS[@]}" "$NET" >/dev/null # Docker picks a free subnet
docker run -d --name "$CTR" "${LABELS[@]}" "${CPUSET[@]}" --network "$NET" \
    --label "portless.http.host=$HOST" --label portless.http.port=80 "$IMAGE" >/dev/null
BACKEND_PID=$(docker inspect -f '{{.State.Pid}}' "$CTR")
BIP=$(docker inspect -f "{{(index .NetworkSettings.Networks \"$NET\").IPAddress}}" "$CTR")
[[ -n $BIP ]] || die "backend container has no address on $NET"
BACKEND=$BIP:80
wait_http "$BACKEND" "$BACKEND_PID" || die "backend did not start: $(docker logs "$CTR" 2>&1)"
# Its nginx master and worker, as host pids.
BACKEND_PROCS=$(docker top "$CTR" -eo pid | tail -n +2 | tr '\n' ' ')
log "backend container $CTR at $BACKEND (network $NET $(docker network inspect -f '{{range .IPAM.Config}}{{.Subnet}}{{end}}' "$NET"))"

# --- nginx as the proxy ----------------------------------------------------
NP=$(free_port)
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes $PROXY_WORKERS;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx;
    fastcgi_temp_path $WORK/nginx; uwsgi_temp_path $WORK/nginx; scgi_temp_path $WORK/nginx;
    upstream backend { server $BACKEND; keepalive 128; }
    server {
        listen 127.0.0.1:$NP;
        server_name $HOST;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }
    server { listen 127.0.0.1:$NP default_server; return 404; }
}
EOF
"${PIN_PROXY[@]}" nginx -c "$WORK/nginx/nginx.conf" -g 'daemon off;' 9>&- &
PIDS+=($!); NGINX_PID=$!

# --- haproxy ---------------------------------------------------------------
HP=$(free_port)
cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread $PROXY_WORKERS
    maxconn 4096
defaults
    mode http
    timeout connect 3s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    option forwardfor
    http-reuse always
frontend fe
    bind 127.0.0.1:$HP
    acl is_bench hdr(host) -i $HOST
    use_backend be if is_bench
backend be
    server s1 $BACKEND
EOF
"${PIN_PROXY[@]}" haproxy -f "$WORK/haproxy.cfg" -db 9>&- &
PIDS+=($!); HAPROXY_PID=$!

# --- caddy -----------------------------------------------------------------
CP=$(free_port)
cat >"$WORK/Caddyfile" <<EOF
{
    admin off
    auto_https off
}
http://$HOST:$CP {
    bind 127.0.0.1
    reverse_proxy $BACKEND
}
EOF
GOMAXPROCS=$PROXY_WORKERS XDG_DATA_HOME=$WORK XDG_CONFIG_HOME=$WORK HOME=$WORK "${PIN_PROXY[@]}" caddy run --config "$WORK/Caddyfile" --adapter caddyfile >"$WORK/caddy.log" 2>&1 9>&- &
PIDS+=($!); CADDY_PID=$!

# --- portless: the product, routes from Docker labels -------------------------
PP=$(free_port)
AP=$(free_port)
# DNS off: no listener on the gateways (--dns-port 0), none fixed; the
# upstream is never asked. HTTPS stays off without --cert-dir.
"${PIN_PROXY[@]}" "$PORTLESS" run --http-listen "127.0.0.1:$PP" --admin-listen "127.0.0.1:$AP" \
    "${RUN_THREADS[@]}" \
    --dns-port 0 --upstream 127.0.0.1:9 >"$WORK/portless.log" 2>&1 9>&- &
PIDS+=($!); PORTLESS_PID=$!

# --- the router library (1 route, and 10,000 more) ---------------------------
PL=$(free_port)
"${PIN_PROXY[@]}" "$BIN" serve "127.0.0.1:$PL" "$HOST" "$BACKEND" 0 >"$WORK/portless-lib.out" 2>&1 9>&- &
PIDS+=($!); LIB_PID=$!
PL10K=$(free_port)
"${PIN_PROXY[@]}" "$BIN" serve "127.0.0.1:$PL10K" "$HOST" "$BACKEND" 10000 >"$WORK/portless-10k.out" 2>&1 9>&- &
PIDS+=($!); LIB10K_PID=$!

wait_http "127.0.0.1:$NP" "$NGINX_PID" || die "nginx did not start: $(cat "$WORK/nginx/error.log")"
wait_http "127.0.0.1:$HP" "$HAPROXY_PID" || die "haproxy did not start"
wait_http "127.0.0.1:$CP" "$CADDY_PID" || die "caddy did not start: $(cat "$WORK/caddy.log")"
wait_http "127.0.0.1:$PL" "$LIB_PID" || die "portless-lib did not start: $(cat "$WORK/portless-lib.out")"
wait_http "127.0.0.1:$PL10K" "$LIB10K_PID" || die "portless-10k did not start: $(cat "$WORK/portless-10k.out")"
# portless run answers 404 until it has learned the route from Docker.
for i in $(seq 1 300); do
    kill -0 "$PORTLESS_PID" 2>/dev/null || die "portless run exited: $(cat "$WORK/portless.log")"
    [[ $(curl -s -H "Host: $HOST" "http://127.0.0.1:$PP/" || true) == "$BODY" ]] && break
    ((i < 300)) || die "portless run did not route $HOST to the container in 30 s: $(tail -20 "$WORK/portless.log")"
    sleep 0.1
done

# Every target must answer with the backend's body, and the proxies that
# route by Host must refuse another host.
for a in "$BACKEND" "127.0.0.1:"{"$NP","$HP","$CP","$PP","$PL","$PL10K"}; do
    body=$(curl -s -H "Host: $HOST" "http://$a/")
    [[ $body == "$BODY" ]] || die "$a answered: $body"
done
for a in "127.0.0.1:"{"$NP","$HP","$PP","$PL","$PL10K"}; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: other.test" "http://$a/")
    [[ $code == 404 || $code == 503 ]] || die "$a routed an unknown host ($code)"
done

log "machine: $(nproc) cores, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB; wrk -t$THREADS -c$CONNS -d${DURATION}s, $ROUNDS rounds; load average $(cut -d' ' -f1-3 /proc/loadavg)"
((PINNED)) && log "pinned: proxies on CPU $PROXY_CPU; wrk and the backend on CPU $LOAD_CPU"
declare -A TARGET=([direct]=$BACKEND [nginx]=127.0.0.1:$NP [haproxy]=127.0.0.1:$HP [caddy]=127.0.0.1:$CP
    [portless]=127.0.0.1:$PP [portless-lib]=127.0.0.1:$PL [portless-10k]=127.0.0.1:$PL10K)
# The processes doing each target's work (see the header), for CPU time per
# request: a measure of efficiency that the noise of a shared machine
# disturbs far less than requests per second.
NGINX_WORKERS=$(pgrep -P "$NGINX_PID" | tr '\n' ' ')
declare -A PROCS=([direct]="$BACKEND_PROCS" [nginx]="$NGINX_WORKERS" [haproxy]=$HAPROXY_PID [caddy]=$CADDY_PID
    [portless]=$PORTLESS_PID [portless-lib]=$LIB_PID [portless-10k]=$LIB10K_PID)
ORDER=(direct nginx haproxy caddy portless portless-lib portless-10k)
((PINNED)) && ORDER=(nginx haproxy portless portless-lib)
if [[ -n $TARGETS ]]; then
    IFS=, read -r -a ORDER <<<"$TARGETS"
    for name in "${ORDER[@]}"; do
        [[ -n ${TARGET[$name]:-} ]] || die "unknown target: $name"
    done
fi
RESULTS=$WORK/results.tsv
: >"$RESULTS"
# The targets of round N in an order shuffled with N as the seed: no target
# always runs right after the same one (a run leaves the backend and the
# CPUs in a state the next starts from: one target following caddy in every
# round measured up to 1.25x the same code elsewhere in the order), and a
# run's orders can be repeated.
round_order() {
    local -a o=("${ORDER[@]}")
    local i j t
    RANDOM=$1
    for ((i = ${#o[@]} - 1; i > 0; i--)); do
        j=$((RANDOM % (i + 1)))
        t=${o[i]}; o[i]=${o[j]}; o[j]=$t
    done
    printf '%s\n' "${o[@]}"
}
for round in $(seq 1 "$ROUNDS"); do
    mapfile -t this_round < <(round_order "$round")
    log "round $round order: ${this_round[*]}"
    for name in "${this_round[@]}"; do
        addr=${TARGET[$name]}
        # shellcheck disable=SC2086 # word splitting of the pid list is wanted
        t0=$(cpu_ticks ${PROCS[$name]})
        # shellcheck disable=SC2086
        b0=$(cpu_ticks $BACKEND_PROCS)
        children_cpu >"$WORK/w0"
        k0=$(core_ticks "$LOAD_CPU"); q0=$(core_ticks "$PROXY_CPU")
        out=$("${PIN_LOAD[@]}" wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency -H "Host: $HOST" "http://$addr/" 2>&1)
        k1=$(core_ticks "$LOAD_CPU"); q1=$(core_ticks "$PROXY_CPU")
        children_cpu >"$WORK/w1"
        w0=$(<"$WORK/w0"); w1=$(<"$WORK/w1")
        # shellcheck disable=SC2086
        b1=$(cpu_ticks $BACKEND_PROCS)
        # shellcheck disable=SC2086
        t1=$(cpu_ticks ${PROCS[$name]})
        printf '%s\n' "$out" >"$WORK/wrk-$name-$round.txt"
        total=$(awk '/requests in/ {print $1}' <<<"$out")
        # Per request, in microseconds: the target's processes (user+sys,
        # user, sys), wrk, and the backend container.
        read -r cpu_us user_us sys_us wrk_us backend_us < <(python3 - "$t0" "$t1" "$b0" "$b1" "$w0" "$w1" "$TICK" "${total:-0}" <<'PY'
import sys
t0, t1, b0, b1 = ([int(x) for x in a.split()] for a in sys.argv[1:5])
w0, w1, tick, n = float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7]), max(1, int(sys.argv[8]))
us = lambda ticks: round(ticks * 1e6 / tick / n, 2)
u, s = t1[0] - t0[0], t1[1] - t0[1]
print(us(u + s), us(u), us(s), round((w1 - w0) * 1e6 / n, 2), us(sum(b1) - sum(b0)))
PY
)
        rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
        p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
        p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
        # How busy the load side's CPU and the proxy's CPU were (percent).
        read -r kb qb < <(python3 - "$k0" "$k1" "$q0" "$q1" <<'PY'
import sys
k0, k1, q0, q1 = ([int(x) for x in a.split()] for a in sys.argv[1:5])
pct = lambda a, b: round(100 * (b[0] - a[0]) / max(1, b[1] - a[1]), 1)
print(pct(k0, k1), pct(q0, q1))
PY
)
        errs=$(awk '/Non-2xx|Socket errors/ {printf "%s ", $0}' <<<"$out")
        [[ -n $rps && -n $p99 ]] || die "wrk against $name failed: $out"
        # A backend gone mid-run (removed from outside) makes every figure
        # of the run meaningless: stop rather than report them.
        [[ $errs != *Non-2xx* ]] || [[ $(docker inspect -f '{{.State.Running}}' "$CTR" 2>/dev/null) == true ]] ||
            die "the backend container is gone (round $round, $name): $errs"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$rps" "$p99" "${errs:-none}" \
            "$cpu_us" "$user_us" "$sys_us" "$wrk_us" "$backend_us" "$p50" "$kb" "$qb" >>"$RESULTS"
        log "round $round $name: $rps req/s, p50 $p50, p99 $p99, $cpu_us us CPU/request (user $user_us, sys $sys_us; wrk $wrk_us, backend $backend_us), CPU $LOAD_CPU busy $kb%, CPU $PROXY_CPU busy $qb% ${errs}"
    done
done

RSS_RUN=$(rss_kib "$PORTLESS_PID")
RSS_LIB=$(rss_kib "$LIB_PID")
RSS_10K=$(rss_kib "$LIB10K_PID")
LOOKUP=$("$BIN" lookup 10000 5000000)
LOOKUP1=$("$BIN" lookup 1 5000000)

python3 - "$RESULTS" "$RSS_RUN" "$RSS_LIB" "$RSS_10K" "$LOOKUP" "$LOOKUP1" "$PINNED" <<'EOF'
import sys, statistics
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
def ms(v):
    v = v.strip()
    for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    return float("nan")
names = []
for r in rows:
    if r[1] not in names:
        names.append(r[1])
med = {}
split = {}
extra = {}
pinned = sys.argv[7] == "1"
for n in names:
    rs = [float(r[2]) for r in rows if r[1] == n]
    ps = [ms(r[3]) for r in rows if r[1] == n]
    errs = sorted({r[4] for r in rows if r[1] == n})
    cpu = statistics.median(float(r[5]) for r in rows if r[1] == n)
    med[n] = (statistics.median(rs), statistics.median(ps), errs, cpu)
    # user, sys, wrk, backend: microseconds of CPU per request
    split[n] = tuple(statistics.median(float(r[i]) for r in rows if r[1] == n) for i in range(6, 10))
    # p50 ms, load CPU busy %, proxy CPU busy %
    extra[n] = (statistics.median(ms(r[10]) for r in rows if r[1] == n),
                statistics.median(float(r[11]) for r in rows if r[1] == n),
                statistics.median(float(r[12]) for r in rows if r[1] == n))
peers = [n for n in ("nginx", "haproxy") if n in med]
print(f"{'target':<14}{'req/s (median)':>16}{'p50 ms':>8}{'p99 ms (median)':>17}{'CPU us/req':>12}"
      f"{'user':>7}{'sys':>7}{'load CPU %':>11}{'proxy CPU %':>12}  errors")
for n in names:
    print(f"{n:<14}{med[n][0]:>16.0f}{extra[n][0]:>8.2f}{med[n][1]:>17.2f}{med[n][3]:>12.2f}"
          f"{split[n][0]:>7.2f}{split[n][1]:>7.2f}{extra[n][1]:>11.1f}{extra[n][2]:>12.1f}  {' '.join(med[n][2])}")
if peers:
    best_rps = max(peers, key=lambda n: med[n][0])
    best_p99 = min(peers, key=lambda n: med[n][1])
    best_cpu = min(peers, key=lambda n: med[n][3])
    for n in ("portless", "portless-lib", "portless-10k"):
        if n not in med:
            continue
        print(f"{n} / best of {'+'.join(peers)}: req/s x{med[n][0] / med[best_rps][0]:.2f} ({best_rps}), "
              f"p99 {med[n][1]:.2f} ms vs {med[best_p99][1]:.2f} ms ({best_p99}), "
              f"CPU/request x{med[n][3] / med[best_cpu][3]:.2f} ({best_cpu})")
    if pinned:
        # The load side saturates first when its CPU is (nearly) fully busy
        # while the proxy's is not: then req/s is the load side's limit.
        load_sat = [n for n in names if extra[n][1] >= 95 and extra[n][2] < 95]
        print(f"pinned: load CPU saturated before the proxy's for: {', '.join(load_sat) or 'none'}; "
              f"proxy CPU saturated for: {', '.join(n for n in names if extra[n][2] >= 95) or 'none'}")
        if "portless" in med:
            r = med["portless"][3] / med[best_cpu][3]
            print(f"goal (CPU per request, portless / {best_cpu}): x{r:.2f}: "
                  f"<= 1.0 {'met' if r <= 1.0 else 'NOT met'}, <= 0.9 {'met' if r <= 0.9 else 'NOT met'}")
# Where the CPU of a request goes (medians, microseconds per request), and
# what that allows. wrk, the backend and the proxy share the machine's CPUs,
# so a proxy's requests per second are about
#     CPUs x utilisation / (wrk + backend + proxy)      [us per request]
# A proxy that made the same system calls as the best peer but spent no time
# in user space at all would cost the peer's `sys` alone: its ceiling is the
# peer's req/s times (wrk + backend + proxy) / (wrk + backend + sys). This is
# an estimate (wrk's and the backend's cost per request, and utilisation,
# are taken as the peer's), not a measurement of such a proxy.
cpus = __import__("os").cpu_count()
print()
print(f"{'CPU us/request':<14}{'proxy user':>11}{'proxy sys':>10}{'wrk':>8}{'backend':>9}{'sum':>8}{'utilisation':>12}")
for n in names:
    u, sy, w, b = split[n]
    total = (0 if n == "direct" else u + sy) + w + b
    util = med[n][0] * total / (cpus * 1e6)
    print(f"{n:<14}{u:>11.2f}{sy:>10.2f}{w:>8.2f}{b:>9.2f}{total:>8.2f}{util:>12.2f}")
if peers:
    u, sy, w, b = split[best_rps]
    full = w + b + u + sy
    ceiling = full / (w + b + sy)
    budget = full / 1.1 - (w + b)
    print(f"ceiling: a proxy with {best_rps}'s system time and no user-space work at all: "
          f"x{ceiling:.2f} {best_rps}'s req/s; x1.10 needs a proxy cost of {budget:.2f} us/request "
          f"({best_rps}: {u:.2f} user + {sy:.2f} sys)")
print()
def ratio(a, b, what="req/s", i=0):
    if a in med and b in med:
        print(f"{a} / {b}: {what} x{med[a][i] / med[b][i]:.2f}")
ratio("portless", "direct")
ratio("portless", "caddy")
if "portless" in med and "portless-lib" in med:
    print(f"portless / portless-lib: req/s x{med['portless'][0] / med['portless-lib'][0]:.2f}, "
          f"CPU/request x{med['portless'][3] / med['portless-lib'][3]:.2f}")
kib = lambda s: int(s) / 1024
print(f"resident memory after the load: portless run {kib(sys.argv[2]):.1f} MiB; "
      f"library: 1 route {kib(sys.argv[3]):.1f} MiB, 10,000 routes {kib(sys.argv[4]):.1f} MiB")
print(f"lookup (normalise host + find), 10,000 routes: {sys.argv[5]}")
print(f"lookup (normalise host + find), 1 route:       {sys.argv[6]}")
EOF
