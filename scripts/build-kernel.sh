#!/usr/bin/env bash
# OPTIONAL and SLOW (tens of minutes on 2 cores): builds a minimal kernel from Debian's
# linux-source with everything the Grove guest needs built in (no modules, no initramfs
# needed): virtio-mmio with cmdline devices, virtio-pci, virtio blk/net/vsock, ext4, the
# 8250 console, devtmpfs, cgroup2, PTYs, inotify. For the fastest boot on hardware-KVM
# hosts; the default path (scripts/fetch-kernel.sh) uses Debian's cloud kernel instead.
# Outputs build/kernel-min/{vmlinux,bzImage,config}. Not run in CI.
#
# Build dependencies (Debian): build-essential bc flex bison libelf-dev libssl-dev
# (install them yourself; they are not in scripts/setup.sh because CI does not build kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="$ROOT/build/kernel-min"
CACHE="$ROOT/build/cache"
mkdir -p "$OUT" "$CACHE"
for t in make gcc bc flex bison; do
  command -v "$t" >/dev/null || { echo "build-kernel: $t is missing (apt-get install build-essential bc flex bison libelf-dev libssl-dev)" >&2; exit 1; }
done

src_pkg="${KERNEL_SOURCE_PACKAGE:-$(apt-cache search --names-only '^linux-source-[0-9.]+$' | awk '{print $1}' | sort -V | tail -1)}"
[ -n "$src_pkg" ] || { echo "build-kernel: no linux-source package found (apt-get update?)" >&2; exit 1; }
deb="$(ls "$CACHE"/"${src_pkg}"_*.deb 2>/dev/null | head -1 || true)"
if [ -z "$deb" ]; then
  (cd "$CACHE" && apt-get download -q "$src_pkg")
  deb="$(ls "$CACHE"/"${src_pkg}"_*.deb | head -1)"
fi
x="$CACHE/$src_pkg"
if [ ! -d "$x/src" ]; then
  rm -rf "$x"; dpkg-deb -x "$deb" "$x"
  mkdir -p "$x/src"
  tar -C "$x/src" --strip-components=1 -xf "$x"/usr/src/linux-source-*.tar.xz
fi
cd "$x/src"

make -s tinyconfig
cfg() { scripts/config --file .config "$@"; }
cfg -e 64BIT -e SMP -e PRINTK -e PRINTK_TIME -e TTY -e SERIAL_8250 -e SERIAL_8250_CONSOLE \
    -e BINFMT_ELF -e BINFMT_SCRIPT -e MULTIUSER -e FUTEX -e EPOLL -e SIGNALFD -e TIMERFD -e EVENTFD \
    -e SHMEM -e TMPFS -e PROC_FS -e SYSFS -e DEVTMPFS -e UNIX98_PTYS -e INOTIFY_USER -e FILE_LOCKING \
    -e CGROUPS -e MEMCG -e CGROUP_PIDS -e BLK_DEV_INITRD -e RD_GZIP \
    -e NET -e UNIX -e INET -e PACKET \
    -e PCI -e VIRTIO_MENU -e VIRTIO_PCI -e VIRTIO_MMIO -e VIRTIO_MMIO_CMDLINE_DEVICES \
    -e BLOCK -e BLK_DEV -e VIRTIO_BLK -e NETDEVICES -e NET_CORE -e VIRTIO_NET \
    -e VSOCKETS -e VIRTIO_VSOCKETS -e HW_RANDOM -e HW_RANDOM_VIRTIO \
    -e EXT4_FS -e EXT4_USE_FOR_EXT2 -e ACPI -e RTC_CLASS -e KVM_GUEST -e PARAVIRT \
    -d MODULES -d SOUND -d DRM -d USB_SUPPORT -d WIRELESS -d WLAN
make -s olddefconfig
make -s -j"$(nproc)" vmlinux bzImage
cp vmlinux "$OUT/vmlinux"
cp arch/x86/boot/bzImage "$OUT/bzImage"
cp .config "$OUT/config"
echo "$OUT/bzImage"
echo "$OUT/vmlinux"
