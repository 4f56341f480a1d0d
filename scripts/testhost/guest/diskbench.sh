#!/bin/sh
# Disk benchmark probe (grove-bench disk --virtio): runs grove-diskprobe on the first
# virtio-blk disk (/dev/vda, served by grove-vmm over virtio-mmio or by QEMU over virtio-pci),
# prints its JSON lines on the console, then powers off (the VMM exits 0).
#   grove.run=/probe/diskbench.sh,MIB,OPS
. /probe/lib.sh
# No udev here: load what the devices need, dependencies first (built-in ones have no file).
for m in virtio_ring virtio virtio_mmio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
  [ -f "/lib/modules/$m.ko" ] && busybox insmod "/lib/modules/$m.ko" 2>/dev/null
done
n=0
while [ ! -b /dev/vda ] && [ "$n" -lt 100 ]; do
  [ -e /sys/block/vda/dev ] && busybox mknod /dev/vda b "$(cut -d: -f1 /sys/block/vda/dev)" "$(cut -d: -f2 /sys/block/vda/dev)"
  n=$((n + 1)); sleep 0.1
done
echo "diskprobe: {\"kernel\":\"$(uname -r)\",\"cpus\":$(grep -c ^processor /proc/cpuinfo),\"scheduler\":\"$(cat /sys/block/vda/queue/scheduler 2>/dev/null)\"}"
/bin/grove-diskprobe /dev/vda "${1:-64}" "${2:-2000}"
echo "diskprobe: done"
kill -PWR 1
