#!/usr/bin/env bash
# The root image test-host scenarios boot from virtio-blk: scripts/build-rootfs.sh's ext4
# image (Debian, guest-init as /sbin/guest-init) with scripts/testhost/guest/* added under
# /probe (debugfs, no mount needed), so guest-init's grove.run=/probe/NAME.sh finds the
# probe after it switched root. Cached in build/testhost/ by the inputs' hash; prints the
# image's path.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
BASE="${ROOTFS_OUT:-$ROOT/build/rootfs/rootfs.ext4}"
OUT="$ROOT/build/testhost"
say() { echo "testhost/rootfs: $*" >&2; }
[ -s "$BASE" ] || scripts/build-rootfs.sh >/dev/null || { say "scripts/build-rootfs.sh failed"; exit 1; }
command -v debugfs >/dev/null || { say "debugfs is missing (apt-get install e2fsprogs)"; exit 1; }
key="$( { stat -c '%s %Y' "$BASE"; cat scripts/testhost/guest/*; } | sha256sum | cut -c1-16)"
img="$OUT/rootfs-probe-$key.ext4"
if [ ! -s "$img" ]; then
  mkdir -p "$OUT"
  rm -f "$OUT"/rootfs-probe-*.ext4
  cp --sparse=always "$BASE" "$img.tmp"
  cmds="$(mktemp)"
  trap 'rm -f "$cmds" "$img.tmp"' EXIT
  echo "mkdir probe" >"$cmds"
  for f in scripts/testhost/guest/*; do
    n="$(basename "$f")"
    echo "write $f probe/$n" >>"$cmds"
    echo "set_inode_field probe/$n mode 0100755" >>"$cmds"
  done
  debugfs -w -f "$cmds" "$img.tmp" >/dev/null 2>"$cmds.err" || { cat "$cmds.err" >&2; exit 1; }
  grep -v '^debugfs' "$cmds.err" >&2 || true
  rm -f "$cmds.err"
  e2fsck -fn "$img.tmp" >/dev/null 2>&1 || { say "the image fails e2fsck after adding /probe"; exit 1; }
  mv "$img.tmp" "$img"
  say "$(basename "$img"): $(basename "$BASE") + /probe ($(ls scripts/testhost/guest | wc -l) files)"
fi
echo "$img"
