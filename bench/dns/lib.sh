# Helpers for bench/dns.sh. Sourced, not run.
# shellcheck shell=bash

log() { printf '[dns-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# A port on 127.0.0.1 that is free for both UDP and TCP right now.
free_port() {
    python3 - <<'EOF'
import socket
for _ in range(200):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    port = u.getsockname()[1]
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        t.bind(("127.0.0.1", port))
    except OSError:
        u.close(); t.close(); continue
    u.close(); t.close()
    print(port)
    break
else:
    raise SystemExit("no free port")
EOF
}

# Install Debian packages that are missing, without letting their maintainer
# scripts start the packaged services (a policy-rc.d that refuses every
# start, for the time of the install only), then make sure the packaged
# services are stopped and disabled: the benchmark starts its own instances.
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "installing: ${missing[*]}"
        local policy=/usr/sbin/policy-rc.d saved=""
        if [[ -e $policy ]]; then
            saved=$(mktemp)
            cp -p "$policy" "$saved"
        fi
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        local rc=0
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; then
            DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null || rc=$?
        fi
        if [[ -n $saved ]]; then mv "$saved" "$policy"; else rm -f "$policy"; fi
        ((rc == 0)) || die "apt-get install ${missing[*]} failed"
    fi
}

# Stop and disable the Debian-packaged daemons (knot, dnsmasq, unbound) so
# that none of them holds port 53 or runs system-wide during the benchmark.
stop_packaged_services() {
    local s
    for s in "$@"; do
        if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
            systemctl disable --now "$s" >/dev/null 2>&1 || true
        else
            if [[ -x /etc/init.d/$s ]]; then
                /etc/init.d/"$s" stop >/dev/null 2>&1 || true
                update-rc.d "$s" disable >/dev/null 2>&1 || true
            fi
        fi
    done
    # Whatever is left that the packages started (not ours: those are
    # started later, under $WORK).
    local pidfile
    for pidfile in /run/knot/knot.pid /run/dnsmasq/dnsmasq.pid /run/unbound.pid; do
        if [[ -s $pidfile ]]; then
            local pid
            pid=$(cat "$pidfile")
            if kill -0 "$pid" 2>/dev/null; then
                log "stopping packaged daemon pid $pid ($pidfile)"
                kill "$pid" 2>/dev/null || true
            fi
        fi
    done
}

# VmRSS of a process in KiB.
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# utime+stime of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# Voluntary context switches (sleeps) of all threads of a process so far.
sleeps() {
    cat /proc/"$1"/task/*/status 2>/dev/null | awk '/^voluntary_ctxt_switches:/ {n += $2} END {print n + 0}'
}

# UDP datagrams the kernel dropped so far, host-wide (receive or send buffer
# full, no memory): tells a server's losses from the kernel's.
udp_drops() {
    awk '$1 == "Udp:" && $2 ~ /^[0-9]+$/ {print $6 + $7 + $10}' /proc/net/snmp
}

# Busy ticks of one CPU so far (everything but idle and iowait), softirq
# included: on loopback most of the client's cost is kernel time that no
# process is charged with.
core_busy_ticks() {
    awk -v cpu="cpu$1" '$1 == cpu {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat
}

# Wait until a DNS server on 127.0.0.1:$1 answers NAME (rcode NOERROR).
wait_dns() {
    local port=$1 name=$2 pid=$3 _
    for _ in $(seq 1 300); do
        kill -0 "$pid" 2>/dev/null || return 1
        if dig +short +tries=1 +time=1 @127.0.0.1 -p "$port" "$name" A 2>/dev/null | grep -q .; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# "RCODE ANSWERS" for one query, for the identical-answers check.
dig_summary() {
    local port=$1 name=$2 out rcode
    out=$(dig +tries=1 +time=2 +noall +comments +answer @127.0.0.1 -p "$port" "$name" A 2>&1) || true
    rcode=$(sed -n 's/.*status: \([A-Z]*\),.*/\1/p' <<<"$out" | head -1)
    printf '%s %s\n' "${rcode:-NOANSWER}" "$(awk '$4 == "A" {print $5}' <<<"$out" | sort | tr '\n' ' ')"
}
