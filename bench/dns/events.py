#!/usr/bin/env python3
"""Container start event -> DNS answer latency, for bench/dns.sh --event-latency.

With portless already running against the Docker Engine:
1. snapshot the histogram portless_discovery_event_to_answer_seconds from
   the admin /metrics;
2. start N containers (label portless-bench=1) on the bench network; every
   (N / samples)-th one is created first, then timed from outside: from
   `docker start` returning to the first positive answer for
   NAME.<domain> A from portless's DNS listener on 127.0.0.1 (the same
   query as `dig @127.0.0.1 -p PORT NAME.docker.internal`, sent from this
   process in a tight loop so no process start-up is counted);
3. snapshot the histogram again and report p50/p90/p99/max-bucket of the
   difference (only this run's events), Prometheus-style interpolation
   inside buckets.
The containers are removed by bench/dns.sh on exit, by label.
"""
import argparse
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

METRIC = "portless_discovery_event_to_answer_seconds"


def scrape(admin):
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    buckets = {}
    total = count = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(rf'{METRIC}_bucket\{{(.*)\}}\s+(\S+)', line)
        if m:
            le = re.search(r'le="([^"]+)"', m.group(1)).group(1)
            key = float("inf") if le in ("+Inf", "Inf", "inf") else float(le)
            buckets[key] = buckets.get(key, 0.0) + float(m.group(2))
            continue
        m = re.match(rf"{METRIC}_sum(?:\{{.*\}})?\s+(\S+)", line)
        if m:
            total = (total or 0.0) + float(m.group(1))
            continue
        m = re.match(rf"{METRIC}_count(?:\{{.*\}})?\s+(\S+)", line)
        if m:
            count = (count or 0.0) + float(m.group(1))
    return buckets, total, count


def quantile(q, buckets):
    """histogram_quantile(): linear interpolation inside the bucket."""
    les = sorted(buckets)
    n = buckets[les[-1]] if les else 0
    if n <= 0:
        return None
    rank = q * n
    prev_le, prev_c = 0.0, 0.0
    for le in les:
        c = buckets[le]
        if c >= rank:
            if le == float("inf"):
                return prev_le  # above the highest finite bound
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return les[-1]


def dns_query(name):
    qid = random.randint(0, 0xFFFF)
    hdr = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    return qid, hdr + q + struct.pack(">HH", 1, 1)


def answered(sock, port, name):
    """One A query; True if NOERROR with at least one answer."""
    qid, pkt = dns_query(name)
    sock.sendto(pkt, ("127.0.0.1", port))
    deadline = time.monotonic() + 0.2
    while True:
        sock.settimeout(max(0.0, deadline - time.monotonic()))
        try:
            data, _ = sock.recvfrom(4096)
        except (socket.timeout, BlockingIOError):
            return False
        if len(data) >= 12 and struct.unpack(">H", data[:2])[0] == qid:
            flags, _, ancount = struct.unpack(">HHH", data[2:8])
            return (flags & 0xF) == 0 and ancount > 0


def docker(*args):
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout


def fmt_ms(s):
    return "n/a" if s is None else f"{1000 * s:.3f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dns-port", type=int, required=True)
    ap.add_argument("--admin", required=True)
    ap.add_argument("--network", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--containers", type=int, default=100)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--domain", default="docker.internal")
    ap.add_argument("--pid", type=int)
    a = ap.parse_args()

    before, sum0, cnt0 = scrape(a.admin)
    if not before:
        print(f"ERROR: {METRIC} not found on http://{a.admin}/metrics", file=sys.stderr)
        return 1

    # The Engine's own `start` event times, to time start event -> answer.
    watcher = subprocess.Popen(
        ["docker", "events", "--filter", "label=portless-bench=1", "--filter", "event=start",
         "--format", "{{.Actor.Attributes.name}} {{.TimeNano}}"],
        stdout=subprocess.PIPE, text=True)
    start_ns = {}

    def watch():
        for line in watcher.stdout:
            f = line.split()
            if len(f) == 2:
                start_ns[f[0]] = int(f[1])

    threading.Thread(target=watch, daemon=True).start()
    time.sleep(0.5)
    every = max(1, a.containers // max(1, a.samples)) if a.samples else 0
    outside = []  # (name, docker_start_s, answer_after_return_s, answer_wall_ns)
    missing = []
    t_all = time.monotonic()
    for i in range(a.containers):
        name = f"pbench-{os.getpid()}-{i:03d}"
        common = ["--label", "portless-bench=1", "--network", a.network, "--name", name]
        if every and i % every == 0 and len(outside) + len(missing) < a.samples:
            docker("create", *common, a.image, "sleep", "3600")
            fqdn = f"{name}.{a.domain}"
            # Poll from before `docker start` is called, so an answer that
            # comes before it returns is timed too.
            hit = {}
            stop = threading.Event()

            def poll():
                psock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                psock.bind(("127.0.0.1", 0))
                while not stop.is_set():
                    if answered(psock, a.dns_port, fqdn):
                        hit["wall_ns"] = time.time_ns()
                        hit["mono"] = time.monotonic()
                        return
                    time.sleep(0.0002)

            th = threading.Thread(target=poll, daemon=True)
            th.start()
            t0 = time.monotonic()
            docker("start", name)
            t1 = time.monotonic()
            th.join(10)
            stop.set()
            if "mono" not in hit:
                missing.append(name)
            else:
                outside.append((name, t1 - t0, hit["mono"] - t1, hit["wall_ns"]))
        else:
            docker("run", "-d", *common, a.image, "sleep", "3600")
    t_all = time.monotonic() - t_all
    time.sleep(0.5)  # let the last events land in the histogram

    after, sum1, cnt1 = scrape(a.admin)
    delta = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    n = delta.get(float("inf"), 0.0)
    print(f"containers started: {a.containers} on network {a.network} in {t_all:.1f} s "
          f"(docker run -d, one after another)")
    print()
    print(f"{METRIC} (from portless /metrics, this run only):")
    print(f"  events observed: {n:.0f}")
    if n > 0:
        mean = (sum1 - sum0) / (cnt1 - cnt0) if cnt1 and cnt1 > (cnt0 or 0) else None
        print(f"  mean {fmt_ms(mean)}  p50 {fmt_ms(quantile(0.5, delta))}  "
              f"p90 {fmt_ms(quantile(0.9, delta))}  p99 {fmt_ms(quantile(0.99, delta))}")
        print("  buckets (le: events):")
        prev = 0.0
        for le in sorted(delta):
            c = delta[le]
            lab = "+Inf" if le == float("inf") else f"{1000 * le:g} ms"
            if c - prev > 0 or le == float("inf"):
                print(f"    {lab:>10}: {c:.0f}  (+{c - prev:.0f})")
            prev = c
        p99 = quantile(0.99, delta)
        if p99 is not None:
            print(f"  goal p99 < 5 ms: {'met' if p99 < 0.005 else 'NOT met'} (p99 {fmt_ms(p99)})")
    print()
    time.sleep(0.5)
    watcher.terminate()
    print(f"cross-check from outside ({len(outside)} sampled containers, polled with A queries "
          "every ~0.2 ms from before `docker start`):")
    if outside:
        pick = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]
        starts = sorted(x[1] for x in outside)
        lat = sorted(x[2] for x in outside)
        ev = sorted((x[3] - start_ns[x[0]]) / 1e9 for x in outside if x[0] in start_ns)
        print(f"  `docker start` took:                       median {fmt_ms(pick(starts, 0.5))}  "
              f"max {fmt_ms(starts[-1])}")
        print(f"  first answer after `docker start` returned: min {fmt_ms(lat[0])}  "
              f"median {fmt_ms(pick(lat, 0.5))}  max {fmt_ms(lat[-1])}")
        if ev:
            print(f"  first answer after the Engine's start event: min {fmt_ms(ev[0])}  "
                  f"median {fmt_ms(pick(ev, 0.5))}  max {fmt_ms(ev[-1])}  ({len(ev)} events seen)")
        print("  per container (docker start took, answer after it returned, answer after start event):")
        for name, s_, l, wall in outside:
            e = (wall - start_ns[name]) / 1e9 if name in start_ns else None
            print(f"    {name}: {fmt_ms(s_)}, {fmt_ms(l)}, {fmt_ms(e)}")
    if missing:
        print(f"  NEVER ANSWERED within 10 s: {' '.join(missing)}")
    if a.pid:
        try:
            rss = [l for l in open(f"/proc/{a.pid}/status") if l.startswith("VmRSS")][0].split()[1]
            print(f"\nportless RSS with {a.containers} containers: {int(rss) / 1024:.1f} MiB")
        except OSError:
            pass
    return 1 if missing or n <= 0 else 0


if __name__ == "__main__":
    sys.exit(main())
