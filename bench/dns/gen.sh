#!/usr/bin/env bash
# Generate the DNS benchmark data set into DIR:
#   hosts          hosts(5): N names hNNNNN.bench.test, distinct 10.x.y.z
#                  addresses (record data only, no traffic goes there).
#                  Served by portless (--hosts-file) and dnsmasq (addn-hosts).
#   bench.test.zone  the same names as a zone file, for knot.
#   unbound-local.conf  the same names as unbound local-data lines.
#   queries        dnsperf input: 90% existing names (each name 9 times),
#                  10% missing names xNNNNN.bench.test (each once), A only,
#                  shuffled with a fixed seed so every run uses the same order.
# Usage: gen.sh DIR [N]
set -euo pipefail

dir=${1:?usage: gen.sh DIR [N]}
n=${2:-10000}
zone=bench.test
ttl=60
mkdir -p "$dir"

awk -v n="$n" -v zone="$zone" -v ttl="$ttl" -v dir="$dir" 'BEGIN {
    hosts = dir "/hosts"; zf = dir "/" zone ".zone"; ub = dir "/unbound-local.conf"
    q = dir "/queries.unshuffled"
    printf "# portless DNS benchmark: %d names under %s\n", n, zone > hosts
    printf "$ORIGIN %s.\n$TTL %d\n", zone, ttl > zf
    printf "@ SOA ns.%s. hostmaster.%s. 1 3600 600 86400 %d\n", zone, zone, ttl > zf
    printf "@ NS ns.%s.\nns A 127.0.0.1\n", zone > zf
    printf "server:\n" > ub
    for (i = 0; i < n; i++) {
        name = sprintf("h%05d", i)
        addr = sprintf("10.%d.%d.%d", int(i / 62500) + 1, int(i / 250) % 250, i % 250 + 1)
        printf "%s %s.%s\n", addr, name, zone > hosts
        printf "%s A %s\n", name, addr > zf
        printf "  local-data: \"%s.%s. %d IN A %s\"\n", name, zone, ttl, addr > ub
        for (k = 0; k < 9; k++) printf "%s.%s A\n", name, zone > q
        printf "x%05d.%s A\n", i, zone > q
    }
}'

# A fixed random source keeps the order identical from run to run.
shuf --random-source=<(yes portless-dns-bench) "$dir/queries.unshuffled" >"$dir/queries"
rm -f "$dir/queries.unshuffled"
