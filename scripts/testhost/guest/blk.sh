#!/bin/bash
# Disk probe (scenario blk), run by guest-init from the root disk after it switched root to
# virtio-blk. Three disks, found by serial: root (/), scratch (raw I/O), mbox (read-only,
# one sector the host writes a step number into; read with O_DIRECT, so the host's writes to
# the file are seen).
#   step 0 (boot): a file written and synced; O_DIRECT writes of several sizes and offsets
#     on scratch, discard and write-zeroes, all read back; then "probe: fork-point".
#   step 1 (host wrote 1; after the fork, in the parent and every child): each writes its own
#     file and its own scratch block (patterns keyed by its identity) and reads them back
#     after dropping the page cache, and checks step 0's data.
#   step 2: everything checked again (the siblings' writes must not show), then a reboot
#     (grove-vmm exits 0).
# Every check prints "ok" or "FAIL"; checksums are sha256 of the bytes.
. /probe/lib.sh
say() { echo "probe: $*"; }
dev_of() {
  local b
  for b in /sys/block/vd*; do
    [ "$(cat "$b/serial" 2>/dev/null)" = "$1" ] && { echo "/dev/${b##*/}"; return; }
  done
}
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
pat() { yes "grove-blk $1" | head -c "$2"; }
sum() { sha256sum | cut -c1-16; }
# wr TAG OFFSET LEN: the pattern, O_DIRECT at a byte offset of scratch.
wr() { pat "$1" "$3" | dd of="$SCRATCH" bs="$3" count=1 seek="$2" oflag=direct,seek_bytes iflag=fullblock status=none; }
rd() { dd if="$SCRATCH" bs="$2" count=1 skip="$1" iflag=direct,skip_bytes status=none | sum; }
# check WHAT GOT WANT
check() { if [ "$2" = "$3" ]; then say "$1 ok"; else say "$1 FAIL (got $2, want $3)"; fi; }
mbox() { dd if="$MBOX" bs=512 count=1 iflag=direct status=none | tr -dc 0-9; }
wait_step() {
  local n=0 v
  while :; do
    v="$(mbox)"
    [ "${v:-0}" -ge "$1" ] && return 0
    n=$((n + 1))
    [ "$n" -gt 2400 ] && { say "step $1 FAIL: no word from the host in 20 min"; return 1; }
    sleep 0.5
  done
}
MB=1048576
ROOTDEV="$(awk '$2 == "/" { d = $1 } END { print d }' /proc/mounts)"
SCRATCH="$(dev_of scratch)"
MBOX="$(dev_of mbox)"
say "disks root=$ROOTDEV ($(cat "/sys/block/${ROOTDEV#/dev/}/serial" 2>/dev/null)) scratch=$SCRATCH mbox=$MBOX ro=$(cat "/sys/block/${MBOX#/dev/}/ro")"
say "queue $(cat /sys/block/${SCRATCH#/dev/}/queue/max_segments) segments, $(cat /sys/block/${SCRATCH#/dev/}/queue/max_hw_sectors_kb) KiB max, discard granularity $(cat /sys/block/${SCRATCH#/dev/}/queue/discard_granularity)"

# Step 0.
dd if=/dev/urandom of=/root/common bs=$MB count=4 status=none
drop
COMMON="$(sum </root/common)"
say "common $COMMON"
# (tag, offset, length): a page, a sector inside the next chunk, 1 MiB, 3 MiB starting
# mid-chunk; none overlaps another (b used to sit inside a's page, so a never read back).
CASES="a:0:4096 b:$((4096 + 1536)):512 c:$((4 * MB)):$MB d:$((10 * MB + 3584)):$((3 * MB))"
for c in $CASES; do IFS=: read -r t o l <<<"$c"; wr "$t" "$o" "$l"; done
drop
for c in $CASES; do
  IFS=: read -r t o l <<<"$c"
  check "raw $t at $o+$l" "$(rd "$o" "$l")" "$(pat "$t" "$l" | sum)"
done
wr e $((16 * MB)) $MB
blkdiscard -o $((16 * MB)) -l $MB "$SCRATCH" && say "discard done"
blkdiscard -z -o $((17 * MB)) -l $((64 * 1024)) "$SCRATCH" && say "write-zeroes done"
check "discarded range reads zeroes" "$(rd $((16 * MB)) $MB)" "$(head -c $MB /dev/zero | sum)"
echo "probe: fork-point"

# Step 1: after the fork, in each VM.
wait_step 1 || exit 1
ID="$(identity)"
say "step 1 id=$ID gen=$(generation)"
pat "fs $ID" $((4 * MB)) >/root/mine
wr "raw $ID" $((20 * MB)) $MB
drop
MINE="$(sum </root/mine)"
check "id=$ID own file" "$MINE" "$(pat "fs $ID" $((4 * MB)) | sum)"
check "id=$ID common file" "$(sum </root/common)" "$COMMON"
check "id=$ID own block" "$(rd $((20 * MB)) $MB)" "$(pat "raw $ID" $MB | sum)"
say "after-fork id=$ID mine=$MINE common=$COMMON"

# Step 2: again, after the siblings wrote theirs (and, for a VM restored from a snapshot of
# a child, after the restore).
wait_step 2 || exit 1
drop
say "step 2 id=$ID gen=$(generation)"
check "final id=$ID own file" "$(sum </root/mine)" "$MINE"
check "final id=$ID common file" "$(sum </root/common)" "$COMMON"
check "final id=$ID own block" "$(rd $((20 * MB)) $MB)" "$(pat "raw $ID" $MB | sum)"
for c in $CASES; do
  IFS=: read -r t o l <<<"$c"
  check "final id=$ID raw $t" "$(rd "$o" "$l")" "$(pat "$t" "$l" | sum)"
done
say "done id=$ID"
kill -INT 1
