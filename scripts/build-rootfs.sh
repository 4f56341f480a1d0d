#!/usr/bin/env bash
# Builds the guest root image: debootstrap (minbase + bash coreutils python3 git
# ca-certificates procps + extras) into build/rootfs/tree, guest-init installed as
# /sbin/guest-init, packed into an ext4 image with `mkfs.ext4 -d`.
#
#   scripts/build-rootfs.sh [--size 2G] [--packages "curl jq"] [--out build/rootfs/rootfs.ext4]
#   (or ROOTFS_SIZE / ROOTFS_EXTRA_PACKAGES / ROOTFS_OUT in the environment)
#
# The debootstrap tree is cached per package set (build/rootfs/tree-<hash>); re-runs only
# reinstall guest-init and repack the image. The mirror is the Debian one apt uses.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
SIZE="${ROOTFS_SIZE:-1G}"
EXTRA="${ROOTFS_EXTRA_PACKAGES:-}"
OUTIMG="${ROOTFS_OUT:-$ROOT/build/rootfs/rootfs.ext4}"
SUITE="${ROOTFS_SUITE:-bookworm}"
while [ $# -gt 0 ]; do
  case "$1" in
    --size) SIZE="$2"; shift 2 ;;
    --packages) EXTRA="$2"; shift 2 ;;
    --out) OUTIMG="$2"; shift 2 ;;
    *) echo "usage: $0 [--size 1G] [--packages \"p1 p2\"] [--out FILE]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "build-rootfs: debootstrap needs root" >&2; exit 1; }

# The Debian mirror apt already uses (one-line or deb822 sources), not the security one.
mirror="${DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  mirror="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -oE '(https?://[^ ]+/debian)/?( |$)' | grep -v security | head -1 | tr -d ' ' || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

PKGS="bash,coreutils,python3,git,ca-certificates,procps"
for p in $EXTRA; do PKGS="$PKGS,$p"; done
key="$(echo "$SUITE $PKGS" | sha256sum | cut -c1-12)"
TREE="$ROOT/build/rootfs/tree-$key"
mkdir -p "$ROOT/build/rootfs"

if [ ! -f "$TREE/.debootstrap-done" ]; then
  rm -rf "$TREE"
  echo "build-rootfs: debootstrap $SUITE ($PKGS) from $mirror" >&2
  t0=$(date +%s)
  dlog="$ROOT/build/rootfs/debootstrap-$key.log"
  # One retry: a mirror hiccup should not fail CI.
  if ! debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$TREE" "$mirror" >"$dlog" 2>&1; then
    echo "build-rootfs: debootstrap failed, retrying once" >&2
    tail -5 "$dlog" >&2
    rm -rf "$TREE"
    debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$TREE" "$mirror" >"$dlog" 2>&1 || {
      tail -20 "$dlog" >&2; echo "build-rootfs: debootstrap failed" >&2; exit 1; }
  fi
  # Shrink: package caches and docs are not needed inside the guest.
  rm -rf "$TREE"/var/cache/apt/archives/*.deb "$TREE"/var/lib/apt/lists/* \
         "$TREE"/usr/share/doc/* "$TREE"/usr/share/man/* "$TREE"/usr/share/locale/*
  echo "build-rootfs: debootstrap took $(( $(date +%s) - t0 )) s" >&2
  touch "$TREE/.debootstrap-done"
fi

GI="$(scripts/build-guest-init.sh | tail -1)"
install -m 0755 "$GI" "$TREE/sbin/guest-init"
echo grove >"$TREE/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 grove\n' >"$TREE/etc/hosts"
printf 'nameserver 10.0.2.3\n' >"$TREE/etc/resolv.conf"
mkdir -p "$TREE/grove"

tmpimg="$OUTIMG.tmp"
rm -f "$tmpimg"
truncate -s "$SIZE" "$tmpimg"
mkfs.ext4 -q -F -L grove-root -E root_owner=0:0 -d "$TREE" "$tmpimg" \
  -e remount-ro 2>&1 | grep -v '^$' >&2 || true
[ -s "$tmpimg" ] && e2fsck -fn "$tmpimg" >/dev/null 2>&1 || { echo "build-rootfs: mkfs.ext4 -d failed" >&2; exit 1; }
mv "$tmpimg" "$OUTIMG"
echo "build-rootfs: $(du -sh "$TREE" | cut -f1) tree packed into $SIZE image" >&2
echo "$OUTIMG"
