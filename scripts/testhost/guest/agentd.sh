#!/bin/sh
# agentd probe (scenario agentd), run by guest-init from the template's root disk (an ext4
# agentd made from a directory) after its ready mark. Every second: 8 bytes from /dev/hwrng
# (virtio-rng: after a restore each VM reads its own host entropy), appended to /run/mine
# (RAM: this VM's own record) and to /root/log (the disk), synced; the page cache dropped, so
# the disk is read back from the VM's disk layers: the log must equal this VM's own record
# (a sibling's writes would show as lines this VM never wrote). One line per tick:
#   tick n=N v=HEX lines=L disk=ok|FAIL
# Once /run/quiet exists the loop stops (the deterministic-fork check needs a guest that
# runs nothing of its own).
. /probe/lib.sh
[ -c /dev/hwrng ] || mknod /dev/hwrng c 10 183 2>/dev/null
echo "probe: agentd probe, hwrng $(cat /sys/class/misc/hw_random/rng_current 2>/dev/null), root $(awk '$2 == "/" { print $1 }' /proc/mounts)"
: >/run/mine
: >/root/log
sync
n=0
while [ ! -e /run/quiet ]; do
  n=$((n + 1))
  v="$(dd if=/dev/hwrng bs=8 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
  echo "$v" >>/run/mine
  echo "$v" >>/root/log
  sync
  echo 3 >/proc/sys/vm/drop_caches
  if cmp -s /run/mine /root/log; then d=ok; else d=FAIL; fi
  echo "tick n=$n v=$v lines=$(wc -l </root/log) disk=$d"
  if [ "$d" = FAIL ]; then dmesg_warnings; fi
  sleep 1
done
echo "probe: quiet"
exec sleep 2147483647
