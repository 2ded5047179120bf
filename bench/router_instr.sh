#!/usr/bin/env bash
# User-space instructions per proxied request of the router, counted by
# valgrind's callgrind: the router's own work (hyper, tokio, the allocator,
# portless's request path) without the kernel's, repeatable whatever else
# the machine is doing. It complements bench/router.sh, whose wall-clock
# figures move by 30% between rounds on a shared 2-core machine.
#
# Usage: sudo bench/router_instr.sh [--requests-seconds S] [--no-build] [--keep]
#
# A host nginx (one worker, keep-alive) answers on a free loopback port; the
# router library (router/examples/router_bench.rs serve, as `portless run`
# drives it: one thread per CPU, its allocator) routes Host: bench.test to
# it under callgrind with instrumentation off; wrk warms it up for 3 s, then
# instrumentation is switched on for S seconds (default 8) of
# `wrk -t1 -c16`, and the instructions counted are divided by the requests
# wrk completed. The top functions by inclusive count are printed too.
# Traffic goes to 127.0.0.1 only; everything runs from a mktemp -d
# directory and is stopped on exit.
set -euo pipefail

SECONDS_ON=8
BUILD=1
KEEP=0
while (($#)); do
    case $1 in
        --requests-seconds) SECONDS_ON=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 64 ;;
    esac
done

log() { printf '[router-instr %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

missing=()
for p in nginx wrk valgrind curl python3; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    # Refuse service starts during the install: we run our own nginx.
    policy=/usr/sbin/policy-rc.d saved=""
    if [[ -e $policy ]]; then saved=$(mktemp); cp -p "$policy" "$saved"; fi
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"
    rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null || {
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null || rc=$?
    }
    if [[ -n $saved ]]; then mv "$saved" "$policy"; else rm -f "$policy"; fi
    ((rc == 0)) || die "apt-get install ${missing[*]} failed"
fi

BIN=$ROOT/target/release/examples/router_bench
if ((BUILD)); then
    log "building router_bench (release)"
    (cd "$ROOT" && cargo build --release -q -p portless-router --example router_bench) || die "build failed"
fi
[[ -x $BIN ]] || die "$BIN missing (run without --no-build)"

WORK=$(mktemp -d /tmp/portless-router-instr.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if ((KEEP)); then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT INT TERM

BP=$(free_port)
cat >"$WORK/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $WORK; proxy_temp_path $WORK;
    fastcgi_temp_path $WORK; uwsgi_temp_path $WORK; scgi_temp_path $WORK;
    server { listen 127.0.0.1:$BP; location / { return 200 "hello from the backend\n"; } }
}
EOF
nginx -c "$WORK/nginx.conf" -g 'daemon off;' &
PIDS+=($!)

RP=$(free_port)
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/callgrind.out" \
    "$BIN" serve "127.0.0.1:$RP" bench.test "127.0.0.1:$BP" >"$WORK/router.log" 2>&1 &
VPID=$!
PIDS+=("$VPID")
ok=0
for _ in $(seq 1 150); do
    kill -0 "$VPID" 2>/dev/null || die "router_bench under valgrind exited: $(tail -3 "$WORK/router.log")"
    if [[ $(curl -s -H 'Host: bench.test' "http://127.0.0.1:$RP/" || true) == "hello from the backend" ]]; then
        ok=1; break
    fi
    sleep 0.2
done
((ok)) || die "the router never answered the backend's body"

log "warming up (3 s), then counting for $SECONDS_ON s"
wrk -t1 -c16 -d3s -H 'Host: bench.test' "http://127.0.0.1:$RP/" >/dev/null
callgrind_control -i on "$VPID" >/dev/null
out=$(wrk -t1 -c16 -d"${SECONDS_ON}s" -H 'Host: bench.test' "http://127.0.0.1:$RP/")
callgrind_control -i off "$VPID" >/dev/null
grep -q 'Non-2xx\|Socket errors' <<<"$out" && die "wrk saw errors: $out"
reqs=$(awk '/requests in/ {print $1}' <<<"$out")
kill "$VPID"; wait "$VPID" 2>/dev/null || true

ir=$(callgrind_annotate "$WORK/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
[[ -n $ir && -n $reqs && $reqs -gt 0 ]] || die "no count (ir=$ir, requests=$reqs)"
log "top functions (inclusive):"
callgrind_annotate --inclusive=yes "$WORK/callgrind.out" 2>/dev/null |
    sed -n '/file:function/,$p' | sed -n '3,40p' | sed -E 's#/root/.cargo/registry/src/[^/]+/##; s#'"$ROOT"'/##' | cut -c1-160 >&2
echo "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown): requests=$reqs instructions=$ir per_request=$((ir / reqs))"
