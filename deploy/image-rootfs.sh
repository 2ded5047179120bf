#!/usr/bin/env bash
# Stages the root filesystem of the portless image from this machine's own
# build output and files, with no container registry; `docker build -t
# portless .` then copies it into an empty image (Dockerfile: FROM scratch).
#
#   deploy/image-rootfs.sh [--binary PATH] [--out DIR]
#
# It holds:
# - portless: --binary PATH, or else target/release/portless, built first
#   with `cargo build --release` (what `cargo run --release` builds);
#   debug info stripped.
# - iptables, which the netplane runs in cluster mode: `iptables` is the
#   nf_tables variant (what Docker uses on Debian 11+, Ubuntu 20.10+, RHEL
#   8+); /usr/sbin/legacy/iptables is the legacy one, for hosts still on it
#   (put /usr/sbin/legacy first in PATH). With every xtables extension, so
#   that listing chains that hold other software's rules works.
# - the shared libraries all of them link, copied from this machine (ldd):
#   the binary and its libraries come from the same glibc by construction.
# - the CA roots (https:// etcd endpoints given without --etcd-ca) and an
#   nsswitch.conf (host names: /etc/hosts, then DNS).
#
# The default output is target/image/rootfs, which .dockerignore lets into
# the build context (and nothing else).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"

binary=""
out="target/image/rootfs"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "image-rootfs.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
done

fail() { echo "image-rootfs.sh: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || fail "$1 is needed: $2"; }
need ldd "it comes with glibc (Debian: libc-bin)"
need strip "it comes with the C toolchain that Rust links with (Debian: binutils)"
need xtables-nft-multi "install iptables (Debian: apt-get install iptables; Docker's packages depend on it)"
need xtables-legacy-multi "install iptables (Debian: apt-get install iptables)"
certs=/etc/ssl/certs/ca-certificates.crt
[ -s "$certs" ] || fail "$certs is missing (Debian: apt-get install ca-certificates)"

if [ -z "$binary" ]; then
  cargo build --release --bin portless
  binary=target/release/portless
fi
[ -x "$binary" ] || fail "$binary is not an executable"

rm -rf "$out"
mkdir -p "$out"/{usr/local/bin,usr/sbin/legacy,etc/ssl/certs,run,tmp}
chmod 1777 "$out/tmp"

# Copy an ELF file to the same path in the image, with every library it
# links (each at the path the dynamic loader found it, links resolved).
copy_elf() {
  local src="$1" dst="$2" lib
  mkdir -p "$out$(dirname "$dst")"
  cp -L "$src" "$out$dst"
  # ldd prints "name => /path (addr)" and "/lib64/ld-linux-x86-64.so.2 (addr)".
  for lib in $(ldd "$src" | grep -o '/[^ ]*'); do
    if [ ! -e "$out$lib" ]; then
      mkdir -p "$out$(dirname "$lib")"
      cp -L "$lib" "$out$lib"
    fi
  done
}

copy_elf "$binary" /usr/local/bin/portless
strip --strip-debug "$out/usr/local/bin/portless"

copy_elf "$(command -v xtables-nft-multi)" /usr/sbin/xtables-nft-multi
copy_elf "$(command -v xtables-legacy-multi)" /usr/sbin/xtables-legacy-multi
# The multi binaries act by the name they are called by.
ln -s xtables-nft-multi "$out/usr/sbin/iptables"
ln -s ../xtables-legacy-multi "$out/usr/sbin/legacy/iptables"

# Extensions (matches and targets) load from the directory compiled into
# libxtables: the xtables directory next to it.
libxtables=$(ldd "$(command -v xtables-nft-multi)" | grep -o '/[^ ]*libxtables[^ ]*')
xtdir="$(dirname "$(readlink -f "$libxtables")")/xtables"
[ -d "$xtdir" ] || fail "no xtables extensions at $xtdir"
for ext in "$xtdir"/*.so; do
  copy_elf "$ext" "$xtdir/$(basename "$ext")"
done

cp -L "$certs" "$out$certs"
echo 'hosts: files dns' > "$out/etc/nsswitch.conf"

echo "image-rootfs.sh: staged $out ($(du -sh "$out" | cut -f1)); next: docker build -t portless ."
