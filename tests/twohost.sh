#!/usr/bin/env bash
# twohost.sh -- two real Docker Engines plus etcd on ONE machine, each in its
# own network namespace, for testing portless cluster mode end to end.
# Adapted from ../shared/twohost.sh for the project's tests: every name,
# path and socket derives from TWOHOST_PFX (default twoh), so that test runs
# never meet each other or a harness someone started by hand
# (tests/common/engines.rs sets a unique one per run).
#
#   ./twohost.sh up      create everything (idempotent-ish: run `down` first if unsure)
#   ./twohost.sh down    remove everything this script created (and nothing else)
#   ./twohost.sh status  show what exists
#   ./twohost.sh env     print shell helpers (source <(./twohost.sh env))
#   ./twohost.sh etcd-stop | etcd-start   stop / start etcd only (outage tests)
#
# Topology (all addresses exist only inside the namespaces):
#
#   netns twoh-sw   bridge twoh-br 10.251.0.10/24   etcd on 10.251.0.10:27379
#        |                    |
#   veth twoh-a-sw       veth twoh-b-sw          (ports of twoh-br)
#        |                    |
#   netns twoh-hA: twoh-a 10.251.0.1/24   dockerd  unix:///run/twoh-A.sock
#   netns twoh-hB: twoh-b 10.251.0.2/24   dockerd  unix:///run/twoh-B.sock
#
# Each dockerd starts its OWN managed containerd (socket under its exec-root),
# uses the vfs storage driver, its own data-root/exec-root/pidfile/cgroup
# parent, and an EMPTY daemon.json (--config-file) so that the machine's
# /etc/docker/daemon.json (data-root, storage-driver ...) is not read.
# iptables rules, bridges and VXLAN devices made by dockerd or portless live
# in the namespace and vanish with it. Both engines get an image `twoh-bb`
# imported from a rootfs (no registry needed): busybox-static, iperf3 and
# iputils ping (as /usr/bin/iping, for `iping -M do -s N`) with their shared
# libraries, /var/www/index.html and a CGI /var/www/cgi-bin/ip that prints
# the client address the server sees (busybox httpd -f -p 80 -h /var/www).
#
# Pitfalls (each one was met on these machines):
#  * dockerd is started with `ip netns exec`, which also gives it a private
#    mount namespace and a fresh sysfs of the netns. That sysfs HIDES the
#    host's /sys/fs/cgroup mounts, and dockerd then exits with "Devices
#    cgroup isn't mounted". `_cgexec` mounts the same cgroup hierarchies
#    again inside that mount namespace before exec'ing dockerd.
#    (A bind from /proc/1/root/sys/fs/cgroup is refused by the kernel.)
#  * /etc/docker/daemon.json of the main Engine sets data-root and
#    storage-driver; passing those as flags too makes dockerd refuse to start
#    ("the following directives are specified both as a flag and in the
#    configuration file"), hence --config-file with an empty JSON.
#  * A new netns inherits the host's net.ipv4.ip_forward=1, and dockerd then
#    leaves the FORWARD policy at ACCEPT. Setting it to 0 first makes dockerd
#    enable forwarding itself and set FORWARD DROP, as on a fresh Docker host.
#  * cgroup v1 + cgroupfs here: --cgroup-parent keeps the containers of each
#    engine in a cgroup of their own (/twoh-A, /twoh-B), removed by `down`.
#  * busybox-static 1.35 `wget` segfaults on this machine (on the host too):
#    use `printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 IP 80` in containers.
#  * This kernel has no `dummy` link type; use veth pairs for test links.
#  * Containers' netns bind mounts live in dockerd's private mount
#    namespace: use `docker exec`, or `nsenter -t <container pid> -n`.
#  * /run/xtables.lock is shared by all namespaces (same file); no problem
#    was seen with three Engines plus portless calling iptables.
set -euo pipefail

PFX=${TWOHOST_PFX:-twoh}
SELF=$(readlink -f "$0")
DIR=${TWOHOST_DIR:-/tmp/$PFX}
STATE=$DIR/state
LOGS=$DIR/logs
NET=10.251.0
ETCD_IP=$NET.10
ETCD_PORT=27379
ETCD_PEER_PORT=27380
ETCD_DATA=/var/lib/$PFX-etcd
ROOTFS=/var/lib/$PFX-rootfs
HOSTS="A B"

ns_of()   { echo "$PFX-h$1"; }                 # A -> twoh-hA
ip_of()   { case $1 in A) echo "$NET.1";; B) echo "$NET.2";; esac; }
lc()      { echo "$1" | tr 'A-Z' 'a-z'; }
sock_of() { echo "/run/$PFX-$1.sock"; }
dk()      { local h=$1; shift; DOCKER_HOST=unix://$(sock_of "$h") docker "$@"; }

log() { echo "[twohost] $*" >&2; }

wait_for() { # wait_for SECONDS CMD...
  local t=$1; shift
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS >= end )); then return 1; fi
    sleep 0.5
  done
}

up_netns() {
  ip netns add $PFX-sw
  ip -n $PFX-sw link set lo up
  ip -n $PFX-sw link add $PFX-br type bridge
  ip -n $PFX-sw addr add $ETCD_IP/24 dev $PFX-br
  ip -n $PFX-sw link set $PFX-br up
  for h in $HOSTS; do
    local ns l
    ns=$(ns_of "$h"); l=$(lc "$h")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # one veth end in the host namespace, the other in the switch namespace
    ip link add $PFX-$l netns "$ns" type veth peer name $PFX-$l-sw netns $PFX-sw
    ip -n $PFX-sw link set $PFX-$l-sw master $PFX-br up
    ip -n "$ns" addr add "$(ip_of "$h")/24" dev $PFX-$l
    ip -n "$ns" link set $PFX-$l up
    # ip_forward is set to 0 on purpose (a new netns inherits the host's
    # IPv4 value): dockerd then turns it on itself AND sets the FORWARD
    # policy to DROP, as on a freshly installed Docker host. With
    # ip_forward already 1 the policy stays ACCEPT and hides missing
    # ACCEPT rules. TWOHOST_FORWARD_ACCEPT=1 keeps the ACCEPT variant.
    [[ ${TWOHOST_FORWARD_ACCEPT:-0} == 1 ]] || ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=0
  done
}

up_etcd() {
  mkdir -p "$ETCD_DATA" "$LOGS" "$STATE"
  # ETCD_UNSUPPORTED_ARCH etc. are not needed on amd64.
  ip netns exec $PFX-sw setsid etcd --name $PFX-etcd --data-dir "$ETCD_DATA" \
    --listen-client-urls http://$ETCD_IP:$ETCD_PORT \
    --advertise-client-urls http://$ETCD_IP:$ETCD_PORT \
    --listen-peer-urls http://127.0.0.1:$ETCD_PEER_PORT \
    --initial-advertise-peer-urls http://127.0.0.1:$ETCD_PEER_PORT \
    --initial-cluster $PFX-etcd=http://127.0.0.1:$ETCD_PEER_PORT \
    --initial-cluster-state new \
    >>"$LOGS/etcd.log" 2>&1 </dev/null &
  echo $! >"$STATE/etcd.pid"
  wait_for 30 ip netns exec $PFX-sw etcdctl --endpoints http://$ETCD_IP:$ETCD_PORT endpoint health \
    || { log "etcd did not come up"; tail -20 "$LOGS/etcd.log"; return 1; }
  log "etcd up at http://$ETCD_IP:$ETCD_PORT (pid $(cat "$STATE/etcd.pid"))"
}

up_dockerd() {
  local h=$1 ns
  ns=$(ns_of "$h")
  mkdir -p "$STATE" "$LOGS" /var/lib/$PFX-$h
  echo '{}' >"$STATE/daemon-$h.json"
  local bip=172.31.1.1/24
  [[ $h == B ]] && bip=172.31.2.1/24
  # the cgroup mounts as seen here, replayed inside the netns (see _cgexec)
  grep ' /sys/fs/cgroup' /proc/self/mountinfo >"$STATE/cgroup-mounts"
  # each engine reads network plugins from a directory of its own (see
  # _cgexec), where that host's portless puts its plugin socket
  mkdir -p "$DIR/plugins-$h"
  ip netns exec "$ns" setsid env TWOHOST_PLUGINS="$DIR/plugins-$h" "$SELF" _cgexec "$STATE/cgroup-mounts" dockerd \
    --config-file "$STATE/daemon-$h.json" \
    --host "unix://$(sock_of "$h")" \
    --data-root /var/lib/$PFX-$h \
    --exec-root /run/$PFX-$h-exec \
    --pidfile /run/$PFX-$h.pid \
    --storage-driver vfs \
    --bip "$bip" \
    --cgroup-parent /$PFX-$h \
    --default-address-pool base=172.30.0.0/16,size=24 \
    >"$LOGS/dockerd-$h.log" 2>&1 </dev/null &
  echo $! >"$STATE/dockerd-$h.pid"
  wait_for 60 dk "$h" info \
    || { log "dockerd $h did not come up"; tail -30 "$LOGS/dockerd-$h.log"; return 1; }
  log "dockerd $h up in netns $ns at $(sock_of "$h") (pid $(cat "$STATE/dockerd-$h.pid"))"
}

build_rootfs() {
  [[ -x $ROOTFS/bin/busybox ]] && return 0
  local bb
  bb=$(command -v busybox)
  file -L "$bb" | grep -q 'statically linked' || { log "need a static busybox (apt-get install busybox-static)"; return 1; }
  mkdir -p "$ROOTFS"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,proc,sys,dev,var/www,root}
  cp "$bb" "$ROOTFS/bin/busybox"
  chroot "$ROOTFS" /bin/busybox --install -s
  # iperf3 and iputils ping (as /usr/bin/iping: busybox ping has no -M do)
  # with every shared library they need, at the same paths
  local src dst f pair
  for pair in iperf3:/usr/bin/iperf3 ping:/usr/bin/iping; do
    src=$(command -v "${pair%%:*}" || true); dst=${pair#*:}
    [[ -n $src ]] || { log "no ${pair%%:*} on this machine; image without it"; continue; }
    cp "$src" "$ROOTFS$dst"
    for f in $(ldd "$src" | grep -o '/[^ ]*'); do
      mkdir -p "$ROOTFS$(dirname "$f")"
      cp -L "$f" "$ROOTFS$f"
    done
  done
  # busybox httpd CGI that prints the client address the server sees
  mkdir -p "$ROOTFS/var/www/cgi-bin"
  printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\necho "$REMOTE_ADDR"\n' >"$ROOTFS/var/www/cgi-bin/ip"
  chmod 755 "$ROOTFS/var/www/cgi-bin/ip"
  echo 'root:x:0:0:root:/root:/bin/sh' >"$ROOTFS/etc/passwd"
  echo 'root:x:0:' >"$ROOTFS/etc/group"
  echo "hello from twohost" >"$ROOTFS/var/www/index.html"
  chmod 1777 "$ROOTFS/tmp"
}

import_image() {
  local h=$1
  tar -C "$ROOTFS" -c . | dk "$h" import --change 'CMD ["/bin/sh"]' - $PFX-bb >/dev/null
  log "image $PFX-bb imported into engine $h"
}

# _cgexec MOUNTINFO CMD...: run inside `ip netns exec`. That command gives
# the process a private mount namespace and a fresh sysfs for the netns,
# which hides the host's /sys/fs/cgroup mounts; dockerd then fails with
# "Devices cgroup isn't mounted". Mount the same hierarchies again (same
# controllers => the very same cgroup hierarchy as on the host), then exec.
cmd_cgexec() {
  local mi=$1; shift
  local mp fstype superopts
  # mountinfo: "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS"
  while read -r mp fstype superopts; do
    superopts=$(sed 's/^r[wo],\?//' <<<"$superopts")
    mkdir -p "$mp"
    case $fstype in
      tmpfs)   mount -t tmpfs -o mode=755 cgroup "$mp" ;;
      cgroup)  [[ $superopts == name=* ]] && superopts=none,$superopts
               mount -t cgroup -o "$superopts" cgroup "$mp" ;;
      cgroup2) mount -t cgroup2 cgroup2 "$mp" ;;
    esac
  done < <(awk '{split($0, h, " - "); split(h[2], t, " "); print $5, t[1], t[3]}' "$mi")
  # Docker finds plugins in /run/docker/plugins: give this engine its own
  # (a bind mount inside its private mount namespace only), so that each
  # engine talks to its own host's portless.
  if [[ -n ${TWOHOST_PLUGINS:-} ]]; then
    mkdir -p /run/docker/plugins
    mount --bind "$TWOHOST_PLUGINS" /run/docker/plugins
  fi
  exec "$@"
}

cmd_up() {
  command -v etcd >/dev/null || { log "need etcd (apt-get install etcd-server etcd-client)"; exit 1; }
  up_netns
  up_etcd
  for h in $HOSTS; do up_dockerd "$h"; done
  build_rootfs
  for h in $HOSTS; do import_image "$h"; done
  log "up. Use: DOCKER_HOST=unix://$(sock_of A) docker ...; ip netns exec $(ns_of A) ...; etcd http://$ETCD_IP:$ETCD_PORT (from inside the namespaces)"
}

kill_pidfile() { # kill_pidfile FILE [SECONDS]: TERM, wait, then KILL; only that PID
  local f=$1 t=${2:-20} pid
  [[ -f $f ]] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    wait_for "$t" bash -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

cmd_down() {
  # portless instances started by the test scripts record their pids here too
  local f
  for f in "$STATE"/portless-*.pid; do [[ -e $f ]] && kill_pidfile "$f" 10; done
  for h in $HOSTS; do
    if [[ -S $(sock_of "$h") ]]; then
      local ids
      ids=$(dk "$h" ps -aq 2>/dev/null || true)
      [[ -n $ids ]] && dk "$h" rm -f $ids >/dev/null 2>&1 || true
    fi
    kill_pidfile "$STATE/dockerd-$h.pid" 30
    rm -rf /var/lib/$PFX-$h /run/$PFX-$h-exec /run/$PFX-$h.pid "$(sock_of "$h")"
    # empty cgroup dirs left by --cgroup-parent
    for f in /sys/fs/cgroup/*/$PFX-$h; do [[ -d $f ]] && find "$f" -depth -type d -exec rmdir {} \; 2>/dev/null; done
    ip netns del "$(ns_of "$h")" 2>/dev/null || true
  done
  kill_pidfile "$STATE/etcd.pid" 10
  rm -rf "$ETCD_DATA"
  ip netns del $PFX-sw 2>/dev/null || true
  rm -rf "$ROOTFS"
  log "down"
}

cmd_status() {
  ip netns list | grep "^$PFX" || true
  for f in "$STATE"/*.pid; do [[ -e $f ]] && echo "$(basename "$f"): $(cat "$f") $(kill -0 "$(cat "$f")" 2>/dev/null && echo alive || echo dead)"; done
  for h in $HOSTS; do [[ -S $(sock_of "$h") ]] && { echo "engine $h:"; dk "$h" ps --format '  {{.Names}} {{.Status}}'; }; done
  return 0
}

cmd_env() {
  cat <<EOF
dA() { DOCKER_HOST=unix://$(sock_of A) docker "\$@"; }
dB() { DOCKER_HOST=unix://$(sock_of B) docker "\$@"; }
nsA() { ip netns exec $(ns_of A) "\$@"; }
nsB() { ip netns exec $(ns_of B) "\$@"; }
ectl() { ip netns exec $PFX-sw etcdctl --endpoints http://$ETCD_IP:$ETCD_PORT "\$@"; }
EOF
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  etcd-stop) kill_pidfile "$STATE/etcd.pid" 10 ;;       # outage tests: data dir kept
  etcd-start) up_etcd ;;
  _cgexec) shift; cmd_cgexec "$@" ;;
  *) echo "usage: $0 up|down|status|env|etcd-stop|etcd-start" >&2; exit 2 ;;
esac
