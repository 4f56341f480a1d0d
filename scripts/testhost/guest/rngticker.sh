#!/bin/sh
# virtio-rng ticker: loads the virtio-rng driver stack, then every 300 ms reads 16 bytes from
# /dev/hwrng (the driver waits for the device's interrupt) and prints them with a counter,
# forever. A restored or forked guest goes on reading from its own restored device.
. /probe/lib.sh
for m in virtio_ring virtio virtio_mmio virtio_rng; do
  [ -f "/lib/modules/$m.ko" ] && busybox insmod "/lib/modules/$m.ko" 2>&1 | sed "s/^/probe: insmod $m: /"
done
[ -c /dev/hwrng ] || busybox mknod /dev/hwrng c 10 183 2>/dev/null
echo "probe: rng ticker on $(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)"
n=0
while :; do
  n=$((n + 1))
  echo "hwrng n=$n bytes=$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n') up=$(up)"
  sleep 0.3
done
