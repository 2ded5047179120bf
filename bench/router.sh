#!/usr/bin/env bash
# Router benchmark: the backend hit directly, nginx, haproxy, caddy and the
# portless router, each routing by Host to the same local backend, loaded by
# wrk with keep-alive connections, in one run, rounds interleaved. Also the
# route lookup cost and resident memory with 10,000 routes.
#
# Usage: sudo bench/router.sh [--duration S] [--rounds N] [--connections N]
#                             [--threads N] [--no-build] [--keep]
# Traffic goes to 127.0.0.1 only. Everything started here runs from a
# mktemp -d directory and is stopped on exit.
set -euo pipefail

DURATION=10
ROUNDS=3
CONNS=64
THREADS=2
BUILD=1
KEEP=0
while (($#)); do
    case $1 in
        --duration) DURATION=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --connections) CONNS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 64 ;;
    esac
done

log() { printf '[router-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOST=bench.test

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

# utime+stime of processes (clock ticks), summed. Field 2 (comm) may hold
# spaces, so count from the end of ") ".
cpu_ticks() {
    local p sum=0 t
    for p in "$@"; do
        t=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || t=0
        sum=$((sum + ${t:-0}))
    done
    echo "$sum"
}
TICK=$(getconf CLK_TCK)

ensure_packages nginx haproxy caddy wrk curl python3
stop_packaged_services

BIN=$ROOT/target/release/examples/router_bench
if ((BUILD)); then
    log "building the router (release)"
    (cd "$ROOT" && cargo build --release -q -p portless-router --example router_bench) || die "build failed"
fi
[[ -x $BIN ]] || die "$BIN missing (run without --no-build)"

WORK=$(mktemp -d /tmp/portless-router-bench.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if ((KEEP)); then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT INT TERM

wait_http() { # port, pid
    local i
    for i in $(seq 1 100); do
        kill -0 "$2" 2>/dev/null || return 1
        if curl -s -o /dev/null -H "Host: $HOST" "http://127.0.0.1:$1/"; then return 0; fi
        sleep 0.1
    done
    return 1
}

# --- backend: a small nginx answering 200 with a fixed body ---------------
BP=$(free_port)
mkdir -p "$WORK/backend"
cat >"$WORK/backend/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/backend/nginx.pid;
error_log $WORK/backend/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $WORK/backend; proxy_temp_path $WORK/backend;
    fastcgi_temp_path $WORK/backend; uwsgi_temp_path $WORK/backend; scgi_temp_path $WORK/backend;
    server { listen 127.0.0.1:$BP; location / { return 200 "hello from the backend\n"; } }
}
EOF
nginx -c "$WORK/backend/nginx.conf" -g 'daemon off;' &
PIDS+=($!); BACKEND_PID=$!

# --- nginx as the proxy ----------------------------------------------------
NP=$(free_port)
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 2;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx;
    fastcgi_temp_path $WORK/nginx; uwsgi_temp_path $WORK/nginx; scgi_temp_path $WORK/nginx;
    upstream backend { server 127.0.0.1:$BP; keepalive 128; }
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
nginx -c "$WORK/nginx/nginx.conf" -g 'daemon off;' &
PIDS+=($!); NGINX_PID=$!

# --- haproxy ---------------------------------------------------------------
HP=$(free_port)
cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 2
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
    server s1 127.0.0.1:$BP
EOF
haproxy -f "$WORK/haproxy.cfg" -db &
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
    reverse_proxy 127.0.0.1:$BP
}
EOF
XDG_DATA_HOME=$WORK XDG_CONFIG_HOME=$WORK HOME=$WORK caddy run --config "$WORK/Caddyfile" --adapter caddyfile >"$WORK/caddy.log" 2>&1 &
PIDS+=($!); CADDY_PID=$!

# --- portless router (1 route, and 10,000 routes) ---------------------------
PP=$(free_port)
"$BIN" serve "127.0.0.1:$PP" "$HOST" "127.0.0.1:$BP" 0 >"$WORK/portless.out" 2>&1 &
PIDS+=($!); PORTLESS_PID=$!
PP10K=$(free_port)
"$BIN" serve "127.0.0.1:$PP10K" "$HOST" "127.0.0.1:$BP" 10000 >"$WORK/portless10k.out" 2>&1 &
PIDS+=($!); PORTLESS10K_PID=$!

wait_http "$BP" "$BACKEND_PID" || die "backend did not start: $(cat "$WORK/backend/error.log")"
wait_http "$NP" "$NGINX_PID" || die "nginx did not start: $(cat "$WORK/nginx/error.log")"
wait_http "$HP" "$HAPROXY_PID" || die "haproxy did not start"
wait_http "$CP" "$CADDY_PID" || die "caddy did not start: $(cat "$WORK/caddy.log")"
wait_http "$PP" "$PORTLESS_PID" || die "portless did not start: $(cat "$WORK/portless.out")"
wait_http "$PP10K" "$PORTLESS10K_PID" || die "portless (10k routes) did not start"

# Every proxy must answer with the backend's body.
for p in "$NP" "$HP" "$CP" "$PP" "$PP10K"; do
    body=$(curl -s -H "Host: $HOST" "http://127.0.0.1:$p/")
    [[ $body == "hello from the backend" ]] || die "port $p answered: $body"
done
for p in "$NP" "$HP" "$PP"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: other.test" "http://127.0.0.1:$p/")
    [[ $code == 404 || $code == 503 ]] || die "port $p routed an unknown host ($code)"
done

log "machine: $(nproc) cores, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB; wrk -t$THREADS -c$CONNS -d${DURATION}s, $ROUNDS rounds"
declare -A TARGET=([direct]=$BP [nginx]=$NP [haproxy]=$HP [caddy]=$CP [portless]=$PP [portless-10k]=$PP10K)
# The processes doing each target's work (nginx: its workers), for CPU time
# per request: a measure of efficiency that the noise of a shared machine
# disturbs far less than requests per second.
NGINX_WORKERS=$(pgrep -P "$NGINX_PID" | tr '\n' ' ')
BACKEND_WORKERS=$(pgrep -P "$BACKEND_PID" | tr '\n' ' ')
declare -A PROCS=([direct]="$BACKEND_WORKERS" [nginx]="$NGINX_WORKERS" [haproxy]=$HAPROXY_PID [caddy]=$CADDY_PID [portless]=$PORTLESS_PID [portless-10k]=$PORTLESS10K_PID)
ORDER=(direct nginx haproxy caddy portless portless-10k)
RESULTS=$WORK/results.tsv
: >"$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
    for name in "${ORDER[@]}"; do
        port=${TARGET[$name]}
        # shellcheck disable=SC2086 # word splitting of the pid list is wanted
        t0=$(cpu_ticks ${PROCS[$name]})
        out=$(wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency -H "Host: $HOST" "http://127.0.0.1:$port/" 2>&1)
        # shellcheck disable=SC2086
        t1=$(cpu_ticks ${PROCS[$name]})
        total=$(awk '/requests in/ {print $1}' <<<"$out")
        cpu_us=$(python3 -c "print(round(($t1 - $t0) * 1e6 / $TICK / max(1, $total), 2))")
        rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
        p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
        errs=$(awk '/Non-2xx|Socket errors/ {printf "%s ", $0}' <<<"$out")
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$rps" "$p99" "${errs:-none}" "$cpu_us" >>"$RESULTS"
        log "round $round $name: $rps req/s, p99 $p99, $cpu_us us CPU/request ${errs}"
    done
done

RSS1=$(rss_kib "$PORTLESS_PID")
RSS10K=$(rss_kib "$PORTLESS10K_PID")
LOOKUP=$("$BIN" lookup 10000 5000000)
LOOKUP1=$("$BIN" lookup 1 5000000)

python3 - "$RESULTS" "$RSS1" "$RSS10K" "$LOOKUP" "$LOOKUP1" <<'EOF'
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
for n in names:
    rs = [float(r[2]) for r in rows if r[1] == n]
    ps = [ms(r[3]) for r in rows if r[1] == n]
    errs = sorted({r[4] for r in rows if r[1] == n})
    cpu = statistics.median(float(r[5]) for r in rows if r[1] == n)
    med[n] = (statistics.median(rs), statistics.median(ps), errs, cpu)
best = max(("nginx", "haproxy"), key=lambda n: med[n][0])
print(f"{'target':<14}{'req/s (median)':>16}{'p99 ms (median)':>17}{'CPU us/req':>12}  errors")
for n in names:
    print(f"{n:<14}{med[n][0]:>16.0f}{med[n][1]:>17.2f}{med[n][3]:>12.2f}  {' '.join(med[n][2])}")
for n in ("portless", "portless-10k"):
    print(f"{n} / best of nginx+haproxy ({best}): req/s x{med[n][0] / med[best][0]:.2f}, "
          f"p99 {med[n][1]:.2f} ms vs {med[best][1]:.2f} ms")
print(f"portless / direct: req/s x{med['portless'][0] / med['direct'][0]:.2f}")
for n in ("nginx", "haproxy"):
    print(f"CPU per request, portless / {n}: x{med['portless'][3] / med[n][3]:.2f}")
print(f"portless / caddy: req/s x{med['portless'][0] / med['caddy'][0]:.2f}")
print(f"resident memory: 1 route {int(sys.argv[2]) / 1024:.1f} MiB, 10,000 routes {int(sys.argv[3]) / 1024:.1f} MiB (after the load)")
print(f"lookup (normalise host + find), 10,000 routes: {sys.argv[4]}")
print(f"lookup (normalise host + find), 1 route:       {sys.argv[5]}")
EOF
