#!/usr/bin/env python3
"""Summarize bench/dns.sh throughput rounds.

Input: a TSV file with one line per (server, round):
  server round sent completed lost qps avg_lat_s min_lat_s max_lat_s
  server_cpu_pct client_core_busy_pct server_cpu_us_per_query
  server_sleeps_per_query host_udp_drops
and a TSV of server facts: server rss_kib answers_ok note
Prints a table (median qps over rounds, all lost queries, median average
latency, worst max latency, server CPU share, RSS) and the ratio of
portless to the best of the peers.
"""
import statistics
import sys

PEERS = ["knot", "dnsmasq", "unbound"]


def main():
    rounds_path, facts_path = sys.argv[1], sys.argv[2]
    rows = {}
    for line in open(rounds_path):
        f = line.split("\t")
        if len(f) < 14:
            continue
        srv = f[0]
        rows.setdefault(srv, []).append(
            dict(
                rnd=int(f[1]),
                sent=int(f[2]),
                completed=int(f[3]),
                lost=int(f[4]),
                qps=float(f[5]),
                avg=float(f[6]),
                max=float(f[8]),
                cpu=float(f[9]),
                ccpu=float(f[10]),
                us=float(f[11]),
                wq=float(f[12]),
                drops=int(f[13]),
            )
        )
    facts = {}
    for line in open(facts_path):
        f = line.rstrip("\n").split("\t")
        facts[f[0]] = dict(rss=int(f[1] or 0), ok=f[2], note=f[3] if len(f) > 3 else "")

    # Other portless builds to compare (bench/dns.sh PORTLESS_BASE_BIN) last.
    order = PEERS + ["portless"]
    order += sorted(s for s in set(rows) | set(facts) if s not in order)
    hdr = (
        f"{'server':<9} {'qps(median)':>12} {'qps(min..max)':>19} {'sent':>10} "
        f"{'lost':>7} {'lost%':>7} {'UDP drops':>9} {'avg lat ms':>10} {'max lat ms':>10} "
        f"{'srv CPU%':>8} {'srv us/q':>8} {'sleeps/q':>8} {'cli core%':>9} {'RSS MiB':>8}  answers"
    )
    print(hdr)
    print("-" * len(hdr))
    med = {}
    lost = {}
    us = {}
    for srv in order:
        if srv not in facts and srv not in rows:
            continue
        fact = facts.get(srv, dict(rss=0, ok="-", note=""))
        rs = rows.get(srv, [])
        if not rs:
            print(f"{srv:<9} {'-':>12} {'-':>19} {'-':>10} {'-':>7} {'-':>7} {'-':>9} {'-':>10} "
                  f"{'-':>10} {'-':>8} {'-':>8} {'-':>8} {'-':>9} {fact['rss'] / 1024:>8.1f}  "
                  f"{fact['ok']} {fact['note']}")
            continue
        q = [r["qps"] for r in rs]
        sent = sum(r["sent"] for r in rs)
        lst = sum(r["lost"] for r in rs)
        med[srv] = statistics.median(q)
        us[srv] = statistics.median(r["us"] for r in rs)
        lost[srv] = lst / sent if sent else 0.0
        print(
            f"{srv:<9} {med[srv]:>12.0f} {min(q):>9.0f}..{max(q):<9.0f} {sent:>10} "
            f"{lst:>7} {100 * lost[srv]:>6.3f}% {sum(r['drops'] for r in rs):>9} "
            f"{1000 * statistics.median(r['avg'] for r in rs):>10.3f} "
            f"{1000 * max(r['max'] for r in rs):>10.3f} "
            f"{statistics.median(r['cpu'] for r in rs):>8.0f} "
            f"{us[srv]:>8.2f} "
            f"{statistics.median(r['wq'] for r in rs):>8.3f} "
            f"{statistics.median(r['ccpu'] for r in rs):>9.0f} "
            f"{fact['rss'] / 1024:>8.1f}  {fact['ok']} {fact['note']}"
        )
    print()
    peers = [p for p in PEERS if p in med]
    if peers:
        best = max(peers, key=lambda p: med[p])
        print(f"best peer: {best} ({med[best]:.0f} qps median)")
        if "portless" in med:
            ratio = med["portless"] / med[best]
            print(f"portless / {best} = {ratio:.2f}x  (goal >= 1.20x)")
            cheap = min(peers, key=lambda p: us[p])
            if us["portless"] > 0:
                print(
                    f"server CPU per query: portless {us['portless']:.2f} us vs cheapest peer "
                    f"{cheap} {us[cheap]:.2f} us = {us[cheap] / us['portless']:.2f}x "
                    "(higher is better for portless)"
                )
            print(
                f"lost: portless {100 * lost['portless']:.3f}% vs {best} "
                f"{100 * lost[best]:.3f}%  (goal: no more than the best peer)"
            )
        else:
            print("portless: no measurement (see above)")


if __name__ == "__main__":
    main()
