#!/usr/bin/env bash
# DNS benchmark: portless against knot, dnsmasq and unbound, in one run.
#
#   bench/dns.sh                   throughput (dnsperf) + resident memory
#   bench/dns.sh --unpinned        throughput as users run it: nothing pinned
#                                  or niced, every server on every core
#   bench/dns.sh --event-latency   container start event -> name answering
#
# Run as root from anywhere; see docs/BENCHMARKS.md (## DNS) for what is
# measured and why the parameters are what they are. Everything this script
# starts (daemons, containers, networks) is stopped or removed on exit.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source-path=SCRIPTDIR
source "$HERE/dns/lib.sh"

MODE=throughput
PINNED=1
LENGTH=15       # seconds per dnsperf run
ROUNDS=3        # rounds; each round runs every server once, order rotated
CLIENTS=""      # dnsperf -c: UDP sockets (source ports); 8 pinned, 4 unpinned
OUTSTANDING=""  # dnsperf -q: queries in flight at most; 100 pinned, 200 unpinned
TIMEOUT=2       # dnsperf -t: seconds after which a query counts as lost
NAMES=10000
CONTAINERS=100
SAMPLES=20
BUILD=1
WITH_PORTLESS=1
NICE=-10        # for servers and dnsperf alike: other work on the machine yields
SERVER_CPU=1
CLIENT_CPU=0
PORTLESS_BIN=${PORTLESS_BIN:-$ROOT/target/release/portless}

usage() {
    cat <<EOF
usage: bench/dns.sh [options]
  --event-latency   measure container start -> DNS answer instead of throughput
  --unpinned        throughput with nothing pinned or niced, every server with
                    one worker per CPU (knot udp-workers, unbound num-threads)
  --load-fraction F with --event-latency: meanwhile keep portless at F (0..1)
                    of its peak queries/s (measured first), e.g. 0.5
  --length S        seconds per dnsperf run (default $LENGTH)
  --rounds N        rounds over all servers, order rotated (default $ROUNDS)
  --clients N       dnsperf -c (default 8 pinned, 4 unpinned)
  --outstanding N   dnsperf -q (default 100 pinned, 200 unpinned)
  --names N         names served (default $NAMES)
  --containers N    containers started with --event-latency (default $CONTAINERS)
  --samples N       of which timed from outside with DNS queries (default $SAMPLES)
  --nice N          nice level of servers and dnsperf (default $NICE)
  --no-build        do not run cargo build --release
  --peers-only      leave portless out (throughput mode only)
  --keep            keep the work directory
Environment: PORTLESS_BIN (default target/release/portless);
  PORTLESS_BASE_BIN: another portless binary (an older build, say) measured
  in the same run as server "pl-base", for a before/after comparison
EOF
}

KEEP=0
LOAD_FRACTION=""
while (($#)); do
    case $1 in
    --event-latency) MODE=events ;;
    --unpinned) PINNED=0 ;;
    --load-fraction) LOAD_FRACTION=$2; shift ;;
    --length) LENGTH=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    --clients) CLIENTS=$2; shift ;;
    --outstanding) OUTSTANDING=$2; shift ;;
    --names) NAMES=$2; shift ;;
    --containers) CONTAINERS=$2; shift ;;
    --samples) SAMPLES=$2; shift ;;
    --nice) NICE=$2; shift ;;
    --no-build) BUILD=0 ;;
    --peers-only) WITH_PORTLESS=0 ;;
    --keep) KEEP=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done

if ((PINNED)); then
    CLIENTS=${CLIENTS:-8} OUTSTANDING=${OUTSTANDING:-100}
else
    CLIENTS=${CLIENTS:-4} OUTSTANDING=${OUTSTANDING:-200}
fi
WORKERS=1 # threads per server: one core each when pinned
((PINNED)) || WORKERS=$(nproc)
(($(nproc) >= 2)) || { SERVER_CPU=0; CLIENT_CPU=0; log "one CPU only: no pinning apart"; }
# How servers and dnsperf are started: command prefixes, which exec the
# program in the same process (its pid is the one measured).
SERVER_PREFIX=(env) CLIENT_PREFIX=(env)
if ((PINNED)); then
    SERVER_PREFIX=(nice -n "$NICE" taskset -c "$SERVER_CPU")
    CLIENT_PREFIX=(nice -n "$NICE" taskset -c "$CLIENT_CPU")
fi

[[ $EUID -eq 0 ]] || die "run as root (installs packages, pins CPUs, talks to Docker)"

WORK=$(mktemp -d /tmp/portless-dns-bench.XXXXXX)
PIDS=()
PID_portless="" # PID_* are set through eval in start()
PORTLESS_VERSION=""
DOCKER_CLEANUP=0

docker_cleanup() {
    local ids=() i
    mapfile -t ids < <(docker ps -aq --filter label=portless-bench=1 2>/dev/null || true)
    # In batches: removing 100 running containers in one call has left
    # endpoints behind in the Engine (20.10) on a loaded machine.
    for ((i = 0; i < ${#ids[@]}; i += 20)); do
        docker rm -f "${ids[@]:i:20}" >/dev/null 2>&1 || true
    done
    # The Engine may take a moment to release the endpoints of containers it
    # just removed.
    local n
    for n in 1 2 3 4 5 6 7 8 9 10; do
        mapfile -t ids < <(docker network ls -q --filter label=portless-bench=1 2>/dev/null || true)
        ((${#ids[@]} == 0)) && return
        docker network rm "${ids[@]}" >/dev/null 2>&1 && return
        sleep 0.5
    done
    log "could not remove Docker network(s) ${ids[*]} (the Engine still reports endpoints on them)"
}

cleanup() {
    local rc=$? pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    ((DOCKER_CLEANUP == 0)) || docker_cleanup
    if ((KEEP)); then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME LOGFILE CMD...: start a server (pinned to SERVER_CPU unless
# --unpinned); its pid
# goes to PID_NAME.
start() {
    local name=$1 logf=$2
    shift 2
    "${SERVER_PREFIX[@]}" "$@" >"$logf" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    eval "PID_$name=$pid"
}

# Build portless if its binary is missing or older than the sources.
# Returns non-zero with a message when no usable binary can be had.
portless_ready() {
    if ((BUILD)) && [[ $PORTLESS_BIN == "$ROOT/target/release/portless" ]]; then
        if [[ ! -x $PORTLESS_BIN ]] ||
            [[ -n $(cd "$ROOT" && find src dns router netplane Cargo.toml Cargo.lock \
                -newer "$PORTLESS_BIN" -type f -print -quit 2>/dev/null) ]]; then
            # etcd-client's build needs protoc and the protobuf includes.
            ensure_packages protobuf-compiler libprotobuf-dev
            log "building portless (cargo build --release)"
            if ! (cd "$ROOT" && cargo build --release) >"$WORK/cargo-build.log" 2>&1; then
                tail -20 "$WORK/cargo-build.log" >&2
                log "portless: cargo build --release failed (log above)"
                return 1
            fi
        fi
    fi
    if [[ ! -x $PORTLESS_BIN ]]; then
        log "portless: no binary at $PORTLESS_BIN (build with: cargo build --release)"
        return 1
    fi
}

# Which portless was measured: the binary's build time and the tree it was
# started from (HEAD, and whether the tree had uncommitted changes to
# sources); taken when portless starts, as others may commit meanwhile.
portless_version() {
    local head dirty=""
    head=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')
    (cd "$ROOT" && git diff --quiet HEAD -- src dns Cargo.toml Cargo.lock 2>/dev/null) || dirty="+changes"
    echo "binary of $(date -u -r "$PORTLESS_BIN" '+%Y-%m-%d %H:%M UTC'), tree at $head$dirty"
}

###########################################################################
# Throughput and memory
###########################################################################
throughput() {
    ensure_packages knot dnsmasq unbound dnsperf dnsutils python3
    stop_packaged_services knot dnsmasq unbound

    log "generating $NAMES names in $WORK/data"
    "$HERE/dns/gen.sh" "$WORK/data" "$NAMES"
    local data=$WORK/data
    local servers=(knot dnsmasq unbound)

    # knot: one UDP and one TCP worker when the server gets one core; one
    # UDP worker per CPU otherwise.
    local PORT_knot
    PORT_knot=$(free_port)
    mkdir -p "$WORK/knot/run" "$WORK/knot/db"
    cat >"$WORK/knot/knot.conf" <<EOF
server:
    rundir: "$WORK/knot/run"
    listen: 127.0.0.1@$PORT_knot
    udp-workers: $WORKERS
    tcp-workers: 1
    background-workers: 1
log:
  - target: stderr
    any: warning
database:
    storage: "$WORK/knot/db"
control:
    listen: "$WORK/knot/run/knot.sock"
zone:
  - domain: bench.test
    file: "$data/bench.test.zone"
    journal-content: none
    zonefile-sync: -1
    zonefile-load: whole
EOF
    start knot "$WORK/knot.log" knotd -c "$WORK/knot/knot.conf"

    # dnsmasq: the hosts file as addn-hosts, nothing else: no upstream,
    # bench.test is local (NXDOMAIN for missing names), TTL 60 like the rest.
    local PORT_dnsmasq
    PORT_dnsmasq=$(free_port)
    start dnsmasq "$WORK/dnsmasq.log" dnsmasq --keep-in-foreground --conf-file=/dev/null \
        --port="$PORT_dnsmasq" --listen-address=127.0.0.1 --bind-interfaces \
        --no-resolv --no-hosts --no-poll --addn-hosts="$data/hosts" --local=/bench.test/ \
        --local-ttl=60 --pid-file="$WORK/dnsmasq.pid" --user=root --log-facility=-

    # unbound: a static local zone with the same records, one thread.
    local PORT_unbound
    PORT_unbound=$(free_port)
    mkdir -p "$WORK/unbound"
    cat >"$WORK/unbound/unbound.conf" <<EOF
server:
    interface: 127.0.0.1
    port: $PORT_unbound
    do-ip6: no
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "$WORK/unbound"
    pidfile: "$WORK/unbound/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 0
    num-threads: $WORKERS
    so-reuseport: yes
    module-config: "iterator"
    access-control: 127.0.0.0/8 allow
    local-zone: "bench.test." static
    include: "$data/unbound-local.conf"
remote-control:
    control-enable: no
EOF
    start unbound "$WORK/unbound.log" unbound -d -c "$WORK/unbound/unbound.conf"

    local portless_note="" PORT_portless="" ADMIN_portless="" PORT_pl_base=""
    if ((WITH_PORTLESS)); then
        if portless_ready; then
            PORTLESS_VERSION=$(portless_version)
            PORT_portless=$(free_port)
            ADMIN_portless=$(free_port)
            start portless "$WORK/portless.log" "$PORTLESS_BIN" run --docker-host none \
                --dns-port 0 --dns-listen "127.0.0.1:$PORT_portless" \
                --hosts-file "$data/hosts" --admin-listen "127.0.0.1:$ADMIN_portless" \
                --upstream 127.0.0.1:9 --domain bench.test --log warn --no-router
            servers+=(portless)
            if [[ -n ${PORTLESS_BASE_BIN:-} ]]; then
                PORT_pl_base=$(free_port)
                start pl_base "$WORK/pl_base.log" "$PORTLESS_BASE_BIN" run --docker-host none \
                    --dns-port 0 --dns-listen "127.0.0.1:$PORT_pl_base" \
                    --hosts-file "$data/hosts" --admin-listen "127.0.0.1:$(free_port)" \
                    --upstream 127.0.0.1:9 --domain bench.test --log warn --no-router
                servers+=(pl_base)
            fi
        else
            portless_note="NOT RUN: no usable portless binary"
        fi
    fi

    : >"$WORK/facts.tsv"
    local s pid port up=()
    for s in "${servers[@]}"; do
        eval "pid=\$PID_$s port=\$PORT_$s"
        if wait_dns "$port" h00000.bench.test "$pid"; then
            up+=("$s")
            log "$s up: pid $pid, 127.0.0.1:$port"
        else
            log "$s did not answer h00000.bench.test on 127.0.0.1:$port; its log:"
            tail -20 "$WORK/$s.log" >&2 || true
            [[ $s == portless ]] || die "$s failed to start"
            portless_note="NOT RUN: did not answer (see log above)"
        fi
    done

    # Identical answers: every server must give what knot gives.
    local probe names=(h00000.bench.test h04321.bench.test h09999.bench.test
        x00000.bench.test x05000.bench.test nosuch.bench.test)
    declare -A ok
    for s in "${up[@]}"; do ok[$s]=ok; done
    for probe in "${names[@]}"; do
        local ref
        ref=$(dig_summary "$PORT_knot" "$probe")
        for s in "${up[@]}"; do
            eval "port=\$PORT_$s"
            local got
            got=$(dig_summary "$port" "$probe")
            if [[ $got != "$ref" ]]; then
                log "$s answers $probe with '$got', knot with '$ref'"
                ok[$s]="ANSWERS-DIFFER"
            fi
        done
    done
    for s in "${up[@]}"; do
        [[ ${ok[$s]} == ok ]] || [[ $s == portless ]] || die "$s does not serve the same data as knot"
    done

    local shape="server on CPU $SERVER_CPU, dnsperf on CPU $CLIENT_CPU" busy_cpu=$CLIENT_CPU
    if ((!PINNED)); then
        shape="nothing pinned or niced, $WORKERS worker(s) per server"
        busy_cpu="" # the whole machine: the client has no core of its own
    fi
    log "dnsperf: $ROUNDS round(s) x ${#up[@]} servers x ${LENGTH}s, -c $CLIENTS -T 1 -q $OUTSTANDING -t $TIMEOUT; $shape"
    : >"$WORK/rounds.tsv"
    local load0 load1
    load0=$(cut -d' ' -f1-3 /proc/loadavg)
    local r i n=${#up[@]} hz
    hz=$(getconf CLK_TCK)
    for ((r = 1; r <= ROUNDS; r++)); do
        for ((i = 0; i < n; i++)); do
            s=${up[$(((i + r - 1) % n))]}
            eval "pid=\$PID_$s port=\$PORT_$s"
            local out="$WORK/dnsperf-$s-$r.txt" t0 t1 c0 c1 k0 k1 w0 w1 d0 d1
            c0=$(cpu_ticks "$pid")
            k0=$(core_busy_ticks "$busy_cpu")
            w0=$(sleeps "$pid")
            d0=$(udp_drops)
            t0=$(date +%s.%N)
            "${CLIENT_PREFIX[@]}" dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/data/queries" \
                -l "$LENGTH" -c "$CLIENTS" -T 1 -q "$OUTSTANDING" -t "$TIMEOUT" >"$out" 2>&1 ||
                { cat "$out" >&2; die "dnsperf against $s failed"; }
            t1=$(date +%s.%N)
            c1=$(cpu_ticks "$pid")
            k1=$(core_busy_ticks "$busy_cpu")
            w1=$(sleeps "$pid")
            d1=$(udp_drops)
            local sent completed lost qps avg min max cpu ccpu us wq
            sent=$(awk '/Queries sent:/ {print $3}' "$out")
            completed=$(awk '/Queries completed:/ {print $3}' "$out")
            lost=$(awk '/Queries lost:/ {print $3}' "$out")
            qps=$(awk '/Queries per second:/ {print $4}' "$out")
            read -r avg min max < <(sed -n 's/.*Average Latency (s): *\([0-9.]*\) (min \([0-9.]*\), max \([0-9.]*\)).*/\1 \2 \3/p' "$out")
            cpu=$(awk -v c="$((c1 - c0))" -v hz="$hz" -v t0="$t0" -v t1="$t1" 'BEGIN {printf "%.1f", 100 * c / hz / (t1 - t0)}')
            ccpu=$(awk -v k="$((k1 - k0))" -v hz="$hz" -v t0="$t0" -v t1="$t1" 'BEGIN {printf "%.1f", 100 * k / hz / (t1 - t0)}')
            us=$(awk -v c="$((c1 - c0))" -v hz="$hz" -v n="$completed" 'BEGIN {printf "%.2f", n ? 1e6 * c / hz / n : 0}')
            wq=$(awk -v w="$((w1 - w0))" -v n="$completed" 'BEGIN {printf "%.3f", n ? w / n : 0}')
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "$r" "$sent" "$completed" \
                "$lost" "$qps" "$avg" "$min" "$max" "$cpu" "$ccpu" "$us" "$wq" "$((d1 - d0))" >>"$WORK/rounds.tsv"
            log "round $r $s: $qps qps, lost $lost/$sent (kernel UDP drops on the host: $((d1 - d0))), avg ${avg}s max ${max}s, server CPU $cpu% (${us} us/query, $wq sleeps/query), $( ((PINNED)) && echo "client core" || echo "machine (all cores)") busy $ccpu%"
        done
    done

    load1=$(cut -d' ' -f1-3 /proc/loadavg)

    # Resident memory after the run, with all names loaded and queried.
    for s in "${servers[@]}"; do
        eval "pid=\$PID_$s"
        local note=""
        [[ $s != portless ]] || note=$portless_note
        printf '%s\t%s\t%s\t%s\n' "$s" "$(rss_kib "$pid")" "${ok[$s]:-down}" "$note" >>"$WORK/facts.tsv"
    done
    if ((WITH_PORTLESS)) && [[ " ${servers[*]} " != *" portless "* ]]; then
        printf 'portless\t0\t-\t%s\n' "$portless_note" >>"$WORK/facts.tsv"
    fi

    echo
    echo "== portless DNS benchmark: throughput and memory =="
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')  host: $(nproc) CPUs, $(awk -F': *' '/model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "names: $NAMES under bench.test; queries: 90% existing, 10% missing (NXDOMAIN), type A, $(wc -l <"$WORK/data/queries") lines shuffled"
    echo "dnsperf $(dnsperf -h 2>&1 | awk '/^Version/ {print $2}'): -l $LENGTH -c $CLIENTS -T 1 -q $OUTSTANDING -t $TIMEOUT, $ROUNDS round(s), $( ((PINNED)) && echo "server pinned to CPU $SERVER_CPU, dnsperf to CPU $CLIENT_CPU, both at nice $NICE" || echo "nothing pinned or niced, $WORKERS worker(s) per server (cli core% is then the whole machine's busy share, up to $((100 * WORKERS))%)")"
    echo "load average (1/5/15 min) before the rounds: $load0; after: $load1 (other work on the machine)"
    echo "versions: knot $(knotd --version | awk '{print $NF}'), dnsmasq $(dnsmasq --version | awk 'NR==1 {print $3}'), unbound $(unbound -V | awk '/^Version/ {print $2}')${PORT_portless:+, portless $PORTLESS_VERSION}"
    echo
    python3 "$HERE/dns/summarize.py" "$WORK/rounds.tsv" "$WORK/facts.tsv"
    if [[ -n $portless_note ]] && ((WITH_PORTLESS)); then
        echo
        echo "portless: $portless_note"
        return 1
    fi
    [[ ${ok[portless]:-ok} == ok ]] || { echo "portless: answers differ from knot's (see log above)"; return 1; }
}

###########################################################################
# Event -> answer latency
###########################################################################
events() {
    ensure_packages dnsutils python3 busybox-static
    command -v docker >/dev/null || die "docker CLI not found"
    docker info >/dev/null 2>&1 || die "Docker Engine not reachable"
    portless_ready || die "portless is needed for --event-latency"
    PORTLESS_VERSION=$(portless_version)

    DOCKER_CLEANUP=1
    docker_cleanup # leftovers of an interrupted run

    local image=portless-bench-busybox
    if ! docker image inspect "$image" >/dev/null 2>&1; then
        log "building image $image from Debian's busybox-static (docker import)"
        local rootfs=$WORK/rootfs
        mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/etc"
        cp /bin/busybox "$rootfs/bin/busybox"
        for a in sh sleep nslookup cat ls; do ln -s busybox "$rootfs/bin/$a"; done
        tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/sh"]' - "$image" >/dev/null
    fi

    local net=portless-bench-$$
    docker network create --label portless-bench=1 "$net" >/dev/null

    local port admin
    port=$(free_port)
    admin=$(free_port)
    # Under load: names under portless's domain that no container has
    # (NXDOMAIN from the zone, the same UDP path as any answer), so that
    # the zone rebuilt on every event holds only the containers, as in
    # the run without load (a hosts file of 10,000 names would make every
    # rebuild cost more and measure that instead).
    if [[ -n $LOAD_FRACTION ]]; then
        ensure_packages dnsperf
        mkdir -p "$WORK/data"
        awk -v n="$NAMES" 'BEGIN {for (i = 0; i < n; i++) printf "x%05d.docker.internal A\n", i}' \
            >"$WORK/data/queries-load"
    fi
    start portless "$WORK/portless.log" "$PORTLESS_BIN" run --dns-port 0 \
        --dns-listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
        --upstream 127.0.0.1:9 --log warn --no-router
    # Wait for the admin API (metrics) and the DNS listener.
    local i
    for i in $(seq 1 100); do
        kill -0 "$PID_portless" 2>/dev/null || { tail -20 "$WORK/portless.log" >&2; die "portless exited"; }
        python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$admin/metrics', timeout=1)" 2>/dev/null && break
        sleep 0.1
    done
    ((i < 100)) || { tail -20 "$WORK/portless.log" >&2; die "portless admin API not up on 127.0.0.1:$admin"; }
    log "portless up: pid $PID_portless, dns 127.0.0.1:$port, admin 127.0.0.1:$admin"

    local load_note="none"
    if [[ -n $LOAD_FRACTION ]]; then
        # Peak first (10 s, dnsperf started as in the throughput run),
        # then a rate-limited dnsperf for the whole run at the fraction.
        local peak rate
        "${CLIENT_PREFIX[@]}" dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/data/queries-load" -l 10 \
            -c "$CLIENTS" -T 1 -q "$OUTSTANDING" -t "$TIMEOUT" >"$WORK/dnsperf-peak.txt" 2>&1 ||
            { cat "$WORK/dnsperf-peak.txt" >&2; die "dnsperf (peak) failed"; }
        peak=$(awk '/Queries per second:/ {printf "%d", $4}' "$WORK/dnsperf-peak.txt")
        rate=$(awk -v p="$peak" -v f="$LOAD_FRACTION" 'BEGIN {printf "%d", p * f}')
        log "portless peak: $peak qps; holding $rate qps ($LOAD_FRACTION) during the run"
        "${CLIENT_PREFIX[@]}" dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/data/queries-load" -l 3600 \
            -c "$CLIENTS" -T 1 -q "$OUTSTANDING" -t "$TIMEOUT" -Q "$rate" >"$WORK/dnsperf-load.txt" 2>&1 &
        PIDS+=("$!")
        load_note="dnsperf -Q $rate ($LOAD_FRACTION of a measured peak of $peak qps, -c $CLIENTS -q $OUTSTANDING, $( ((PINNED)) && echo "portless on CPU $SERVER_CPU, dnsperf on CPU $CLIENT_CPU" || echo "nothing pinned"))"
        sleep 1
    fi

    echo
    echo "== portless DNS benchmark: container start event -> answer =="
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')  host: $(nproc) CPUs; docker $(docker version -f '{{.Server.Version}}' 2>/dev/null); portless $PORTLESS_VERSION"
    echo "load average (1/5/15 min) at the start: $(cut -d' ' -f1-3 /proc/loadavg); query load on portless meanwhile: $load_note"
    python3 "$HERE/dns/events.py" --dns-port "$port" --admin "127.0.0.1:$admin" \
        --network "$net" --image "$image" --containers "$CONTAINERS" --samples "$SAMPLES" \
        --pid "$PID_portless"
}

if [[ $MODE == events ]]; then events; else throughput; fi
