#!/usr/bin/env bash
# Builds the minimal Grove guest kernel from Debian's linux-source package: everything the
# guest needs built in (no modules, so no module loading in the initramfs), nothing that
# probes hardware grove-vmm does not have.
#
#   scripts/build-kernel.sh            prints bzImage, vmlinux and config paths (last 3 lines)
#
# Built in: 64-bit SMP, the MP table and ACPI, KVM guest support (kvmclock, PV spinlocks,
# x2APIC), the 8250 console (one UART), virtio PCI and MMIO (with cmdline devices),
# virtio blk/net/vsock/rng/console, ext4, tmpfs/devtmpfs, cgroup2, PTYs, inotify, IPv4/IPv6,
# /dev/port, ioperm (guest-init's boot-timer write). Left out: modules, the i8042/input
# stack (a 2 s probe in the stock kernel), sound, DRM, USB, wireless, HPET, the CMOS RTC
# driver, debugging. Every symbol asked for is checked in the final .config: a typo or an
# unmet dependency fails the build instead of silently dropping a feature.
#
# Cost: 25 minutes measured on the 2-core machine while test hosts ran beside it (1515 s,
# docs/testing.md); paid once per machine and config: the result is cached outside the clone in
# ${GROVE_CACHE:-/var/cache/grove}/kernel-min/<key>, key = hash of the source package version,
# this script (the config fragment lives here) and the compiler version. Copies land in
# build/kernel-min/{bzImage,vmlinux,config}.
#
# Build dependencies (Debian, installed by scripts/setup.sh): build-essential bc flex bison
# libelf-dev libssl-dev lz4.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
CACHE="${GROVE_CACHE:-/var/cache/grove}"
OUT="$ROOT/build/kernel-min"
SRC_PKG="${KERNEL_SOURCE_PACKAGE:-linux-source-6.1}"
JOBS="${KERNEL_JOBS:-$(nproc)}"
mkdir -p "$OUT" "$CACHE/debs" "$CACHE/kernel-src" "$CACHE/kernel-min"
for t in make gcc bc flex bison lz4; do
  command -v "$t" >/dev/null || { echo "build-kernel: $t is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
[ -f /usr/include/libelf.h ] || { echo "build-kernel: libelf-dev is missing" >&2; exit 1; }

# The config fragment: -e enables, -d disables, --set-val sets. Order matters only for the
# check below (every -e must end up =y, every -d unset).
FRAGMENT=(
  -e 64BIT -e SMP -e X86_MPPARSE -e ACPI -e X86_X2APIC -e HYPERVISOR_GUEST -e PARAVIRT
  -e KVM_GUEST -e PARAVIRT_SPINLOCKS -e X86_TSC -e HIGH_RES_TIMERS -e NO_HZ_IDLE
  -e CPU_SUP_INTEL -e CPU_SUP_AMD -e CC_OPTIMIZE_FOR_PERFORMANCE -e KERNEL_LZ4
  -e PRINTK -e PRINTK_TIME -e BUG -e KALLSYMS -e EARLY_PRINTK -e MULTIUSER -e POSIX_TIMERS
  -e FUTEX -e EPOLL -e SIGNALFD -e TIMERFD -e EVENTFD -e AIO -e ADVISE_SYSCALLS -e FHANDLE
  -e SHMEM -e TMPFS -e PROC_FS -e PROC_SYSCTL -e SYSFS -e DEVTMPFS -e DEVTMPFS_MOUNT
  -e UNIX98_PTYS -e INOTIFY_USER -e FILE_LOCKING -e BINFMT_ELF -e BINFMT_SCRIPT
  -e CGROUPS -e MEMCG -e CGROUP_PIDS -e BLK_DEV_INITRD -e RD_GZIP -e X86_IOPL_IOPERM
  -e TTY -e SERIAL_8250 -e SERIAL_8250_CONSOLE -e DEVPORT
  -e NET -e UNIX -e INET -e IPV6 -e PACKET
  -e PCI -e PCI_MSI -e VIRTIO_MENU -e VIRTIO_PCI -e VIRTIO_MMIO -e VIRTIO_MMIO_CMDLINE_DEVICES
  -e VIRTIO_CONSOLE -e BLOCK -e BLK_DEV -e VIRTIO_BLK -e NETDEVICES -e NET_CORE -e VIRTIO_NET
  -e VSOCKETS -e VIRTIO_VSOCKETS -e HW_RANDOM -e HW_RANDOM_VIRTIO
  -e EXT4_FS -e EXT4_USE_FOR_EXT2 -e RTC_CLASS
  -d MODULES -d SOUND -d DRM -d USB_SUPPORT -d WIRELESS -d WLAN -d VT -d INPUT -d SERIO
  -d RTC_DRV_CMOS -d RANDOMIZE_BASE -d FTRACE -d KERNEL_XZ -d CC_OPTIMIZE_FOR_SIZE
  --set-val SERIAL_8250_NR_UARTS 1 --set-val SERIAL_8250_RUNTIME_UARTS 1
)

deb="$(ls "$CACHE/debs/${SRC_PKG}"_*.deb 2>/dev/null | sort -V | tail -1 || true)"
if [ -z "$deb" ]; then
  echo "build-kernel: downloading $SRC_PKG" >&2
  (cd "$CACHE/debs" && apt-get download -q "$SRC_PKG" 2>&1 | grep -v 'unsandboxed' >&2 || true)
  deb="$(ls "$CACHE/debs/${SRC_PKG}"_*.deb 2>/dev/null | sort -V | tail -1 || true)"
  [ -n "$deb" ] || { echo "build-kernel: apt-get download $SRC_PKG failed (apt-get update?)" >&2; exit 1; }
fi
ver="$(basename "$deb" .deb)"
key="$( { echo "$ver"; sed -n '/^FRAGMENT=(/,/^)/p' "$0"; gcc --version | head -1; } | sha256sum | cut -c1-16)"
dest="$CACHE/kernel-min/$key"

exec 9>"$CACHE/kernel-min/.lock"
flock 9
if [ ! -s "$dest/vmlinux" ]; then
  src="$CACHE/kernel-src/$ver"
  if [ ! -f "$src/.extracted" ]; then
    echo "build-kernel: extracting $ver" >&2
    rm -rf "$src"; mkdir -p "$src"
    tmp="$(mktemp -d "$CACHE/kernel-src/x.XXXXXX")"
    dpkg-deb --fsys-tarfile "$deb" | tar -C "$tmp" -x --wildcards './usr/src/linux-source-*.tar.xz'
    tar -C "$src" --strip-components=1 -xf "$tmp"/usr/src/linux-source-*.tar.xz
    rm -rf "$tmp"
    touch "$src/.extracted"
  fi
  obj="$CACHE/kernel-min/build-$key"
  rm -rf "$obj"; mkdir -p "$obj"
  t0=$(date +%s)
  make -s -C "$src" O="$obj" tinyconfig >/dev/null
  "$src/scripts/config" --file "$obj/.config" "${FRAGMENT[@]}"
  make -s -C "$src" O="$obj" olddefconfig >/dev/null
  # Every symbol asked for must have stuck.
  bad=()
  set -- "${FRAGMENT[@]}"
  while [ $# -gt 0 ]; do
    case "$1" in
      -e) grep -qx "CONFIG_$2=y" "$obj/.config" || bad+=("$2=y"); shift 2 ;;
      -d) grep -q "^CONFIG_$2=" "$obj/.config" && bad+=("$2 off"); shift 2 ;;
      --set-val) grep -qx "CONFIG_$2=$3" "$obj/.config" || bad+=("$2=$3"); shift 3 ;;
      *) shift ;;
    esac
  done
  if ((${#bad[@]})); then
    echo "build-kernel: these config choices did not stick (dependencies?): ${bad[*]}" >&2
    exit 1
  fi
  echo "build-kernel: building $ver (key $key) with $JOBS jobs" >&2
  log="$obj/build.log"
  if ! make -C "$src" O="$obj" -j"$JOBS" vmlinux bzImage >"$log" 2>&1; then
    tail -30 "$log" >&2; echo "build-kernel: build failed (log: $log)" >&2; exit 1
  fi
  mkdir -p "$dest.tmp"
  cp "$obj/vmlinux" "$dest.tmp/vmlinux"
  cp "$obj/arch/x86/boot/bzImage" "$dest.tmp/bzImage"
  cp "$obj/.config" "$dest.tmp/config"
  echo "$ver built in $(( $(date +%s) - t0 )) s with $JOBS jobs on $(nproc) cores" >"$dest.tmp/build-info"
  rm -rf "$dest"; mv "$dest.tmp" "$dest"
  rm -rf "$obj"
  echo "build-kernel: $(cat "$dest/build-info")" >&2
fi
flock -u 9
for f in vmlinux bzImage config; do cp -p "$dest/$f" "$OUT/$f"; done
echo "$OUT/bzImage"
echo "$OUT/vmlinux"
echo "$OUT/config"
