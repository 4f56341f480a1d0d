#!/bin/sh
# Devices probe: what the kernel found through ACPI (virtio-mmio devices, CPUs), entropy from
# /dev/hwrng, then a power-off (SIGPWR to PID 1: guest-init powers off, the kernel writes
# the FADT's sleep control register with \_S5_'s type, grove-vmm exits 0).
. /probe/lib.sh
# No udev here (and guest-init loads grove.modules= only before switching to a root disk):
# load what the devices need, dependencies first; modules built into the kernel have no file.
for m in virtio_ring virtio virtio_mmio virtio_rng; do
  [ -f "/lib/modules/$m.ko" ] && busybox insmod "/lib/modules/$m.ko" 2>&1 | sed "s/^/probe: insmod $m: /"
done
echo "probe: cpus=$(grep -c ^processor /proc/cpuinfo)"
for d in /sys/bus/acpi/devices/LNRO0005:*; do
  [ -e "$d" ] && echo "probe: acpi-virtio $(cat "$d/hid") $(busybox basename "$d") status=$(cat "$d/status" 2>/dev/null)"
done
for d in /sys/bus/platform/devices/LNRO0005:*; do
  [ -e "$d/driver" ] && echo "probe: virtio-mmio platform device $(busybox basename "$d") bound to $(busybox basename "$(busybox readlink "$d/driver")")"
done
grep -q 'virtio_mmio.device' /proc/cmdline && echo "probe: cmdline also names the device (ignored by this kernel if it lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES)"
for v in /sys/bus/virtio/devices/*; do
  [ -e "$v" ] && echo "probe: virtio $(busybox basename "$v") device=$(cat "$v/device") driver=$(busybox basename "$(busybox readlink "$v/driver" 2>/dev/null)")"
done
echo "probe: modules $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
echo "probe: hwrng $(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)"
[ -c /dev/hwrng ] || busybox mknod /dev/hwrng c 10 183 2>/dev/null
echo "probe: hwrng bytes=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
busybox dmesg | grep -iE 'virtio|acpi: .*(S5|sleep|power)|hw_random|LNRO' | sed 's/^/dmesg: /' | head -30
dmesg_warnings
echo "probe: done"
kill -PWR 1
