#!/usr/bin/env bash
# The test host: runs one scenario (scripts/testhost/scenarios/NAME.sh) where grove-vmm has a
# hardware-style KVM to boot real Linux guests on.
#
#   scripts/testhost.sh NAME [ARGS...]     exit status = the scenario's (75: the test host
#                                          itself died first); log on stdout
#   scripts/testhost.sh --list             the scenarios and what they check
#
# GROVE_TESTHOST=qemu (default): a Debian kernel (linux-image-amd64) boots under
#   qemu-system-x86_64 -accel tcg -cpu max (QEMU emulates AMD-V with nested paging), loads
#   kvm_amd, and runs the scenario there. The machine's root file system is shared read-only
#   over 9p under a tmpfs overlay, so the checkout, its release binaries and guest assets are
#   at the same paths inside and a rerun after a code change needs no image rebuild.
# GROVE_TESTHOST=direct: the scenario runs right here (a host with hardware KVM).
#
# Environment:
#   TESTHOST_TIMEOUT   seconds the scenario may run (default: its "# timeout:" line, else 600)
#   TESTHOST_CPUS      test host vCPUs (default 1, see below)  TESTHOST_MEM_MIB (default 6144)
#   TESTHOST_TCG       multi|single: QEMU's TCG threading (default multi: one host thread per vCPU)
#   TESTHOST_KVM_AMD   kvm_amd's parameters inside, P=V,P=V (e.g. vgif=0)
#   GROVE_GUEST_KERNEL cloud (default: Debian's cloud kernel; its CPUs through grove-vmm's ACPI
#                      MADT) | min (scripts/build-kernel.sh, cached; ~8-25 min once) | a path
#   GROVE_CACHE        downloads and built images (default /var/cache/grove)
#   TESTHOST_OUT       output directory (default build/testhost/NAME)
#   GROVE_VMM, GROVE_BENCH  other binaries than target/release's (e.g. to bisect)
# A scenario with a "# needs: rootfs" line also gets GUEST_ROOTFS: the Debian root image
# with the probes under /probe (scripts/testhost/rootfs.sh; built by build-rootfs.sh).
# Output: $TESTHOST_OUT/{console.log (test host serial), rc, ...files the scenario wrote}.
# A scenario that cannot run (no QEMU, no kernel package) fails with its reason; nothing
# here skips.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
TH="$ROOT/scripts/testhost"
CACHE="${GROVE_CACHE:-/var/cache/grove}"
MODE="${GROVE_TESTHOST:-qemu}"

say() { echo "testhost: $*" >&2; }
die() { say "error: $*"; exit 2; }

if [ "${1:-}" = "--list" ]; then
  for f in "$TH"/scenarios/*.sh; do
    printf '%-12s %s\n' "$(basename "$f" .sh)" "$(sed -n 's/^# what: //p' "$f" | head -1)"
  done
  exit 0
fi
[ $# -ge 1 ] || die "usage: $0 SCENARIO [ARGS...] | --list"
NAME="$1"; shift
SCEN="$TH/scenarios/$NAME.sh"
[ -f "$SCEN" ] || die "no scenario $NAME (scripts/testhost.sh --list)"
LIMIT="${TESTHOST_TIMEOUT:-$(sed -n 's/^# timeout: *\([0-9]*\).*/\1/p' "$SCEN" | head -1)}"
LIMIT="${LIMIT:-600}"
OUT="${TESTHOST_OUT:-$ROOT/build/testhost/$NAME}"
rm -rf "$OUT"; mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# --- what the scenario uses, built on this machine -----------------------------------------
t_prep=$(date +%s%N)
cargo build --release --quiet -p grove-vmm -p grove-bench -p grove-netd --bins >&2 || die "cargo build --release failed"
case "$NAME" in agentd*)
  cargo build --release --quiet -p grove-agentd --bins >&2 || die "cargo build --release -p grove-agentd failed" ;;
esac
scripts/build-testguest.sh >/dev/null || die "scripts/build-testguest.sh failed"
fk="$(scripts/fetch-kernel.sh)" || die "scripts/fetch-kernel.sh failed"
BASE_INITRD="$(echo "$fk" | sed -n 3p)"
case "${GROVE_GUEST_KERNEL:-cloud}" in
  cloud) GUEST_KERNEL="$(echo "$fk" | sed -n 2p)" ;;
  min) GUEST_KERNEL="$(scripts/build-kernel.sh | sed -n 2p)" || die "scripts/build-kernel.sh failed" ;;
  *) GUEST_KERNEL="$(realpath "$GROVE_GUEST_KERNEL")" ;;
esac
[ -s "$GUEST_KERNEL" ] || die "guest kernel $GUEST_KERNEL missing"

# Guest initramfs: fetch-kernel's (guest-init as /init, virtio modules) with a second cpio
# appended (the kernel unpacks concatenated archives): busybox and scripts/testhost/guest/*.
GUEST_INITRD="$ROOT/build/testhost/guest-initrd.cpio.gz"
bb="$(command -v busybox)" || die "busybox is missing (apt-get install busybox-static)"
ldd "$bb" >/dev/null 2>&1 && die "$bb is not static (apt-get install busybox-static)"
gx="$(mktemp -d)"
trap 'rm -rf "$gx"' EXIT
mkdir -p "$gx/bin" "$gx/probe"
cp "$bb" "$gx/bin/busybox"
for a in sh cat echo sleep date dd od hexdump uptime kill grep sed head tr cut seq mount \
         nc ip ifconfig ping wget ls tail wc sort; do
  ln -s busybox "$gx/bin/$a"
done
cp -r "$TH/guest/." "$gx/probe/"
# grove-diskprobe (guest-side disk benchmark), built static next to guest-init by
# scripts/fetch-kernel.sh's scripts/build-guest-init.sh.
dp="${GUEST_INIT_TARGET_DIR:-$ROOT/build/target-guest-init}/x86_64-unknown-linux-gnu/release/grove-diskprobe"
[ -x "$dp" ] || die "$dp is missing (scripts/build-guest-init.sh builds it)"
cp "$dp" "$gx/bin/grove-diskprobe"
chmod -R a+rX "$gx"
# Per-run temporary names and an atomic rename: runs of other scenarios may do this at once.
(cd "$gx" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1) >"$GUEST_INITRD.extra.$$"
cat "$BASE_INITRD" "$GUEST_INITRD.extra.$$" >"$GUEST_INITRD.tmp.$$"
rm -f "$GUEST_INITRD.extra.$$"
mv "$GUEST_INITRD.tmp.$$" "$GUEST_INITRD"
# A scenario with a "# needs: rootfs" line boots its guests from a virtio-blk root disk:
# the Debian image with the probes under /probe (scripts/testhost/rootfs.sh).
GUEST_ROOTFS=""
if grep -q '^# needs:.*rootfs' "$SCEN"; then
  GUEST_ROOTFS="$(scripts/testhost/rootfs.sh)" || die "scripts/testhost/rootfs.sh failed"
fi
# netd's BPF unit tests (BPF_PROG_TEST_RUN on crafted packets) for the net scenarios: built
# here, run inside on the test host's kernel (Debian's verifier).
NETD_BPF_TEST=""
case "$NAME" in net*)
  NETD_BPF_TEST="$ROOT/$(cargo test --release -p grove-netd --test bpf --no-run 2>&1 \
    | grep -o 'target/release/deps/bpf-[0-9a-f]*' | tail -1)"
  [ -x "$NETD_BPF_TEST" ] || die "cannot build netd's bpf test" ;;
esac
# Test binaries a scenario runs inside (built here: compiling under TCG would be slow).
STORAGE_DMTHIN_TEST=""
if [ "$NAME" = dmthin ]; then
  STORAGE_DMTHIN_TEST="$ROOT/$(cargo test --release -p grove-storage --test block_dmthin --no-run 2>&1 \
    | grep -o 'target/release/deps/block_dmthin-[0-9a-f]*' | tail -1)"
  [ -x "$STORAGE_DMTHIN_TEST" ] || die "cannot build storage's block_dmthin test"
fi
VMM_JAIL_TEST=""
if [ "$NAME" = jail ]; then
  VMM_JAIL_TEST="$ROOT/$(cargo test --release -p grove-vmm --test jail --no-run 2>&1 \
    | grep -o 'target/release/deps/jail-[0-9a-f]*' | tail -1)"
  [ -x "$VMM_JAIL_TEST" ] || die "cannot build grove-vmm's jail test"
fi
prep_ms=$(( ($(date +%s%N) - t_prep) / 1000000 ))

cat >"$OUT/job.sh" <<EOF
# written by scripts/testhost.sh for scenario $NAME
export GROVE_ROOT='$ROOT' GROVE_OUT='OUTDIR' TESTHOST='$MODE' TESTHOST_SCENARIO='$NAME'
export GROVE_VMM='${GROVE_VMM:-$ROOT/target/release/grove-vmm}' GROVE_BENCH='${GROVE_BENCH:-$ROOT/target/release/grove-bench}'
export GUEST_KERNEL='$GUEST_KERNEL' GUEST_INITRD='$GUEST_INITRD' GUEST_KERNEL_KIND='${GROVE_GUEST_KERNEL:-cloud}' GUEST_ROOTFS='$GUEST_ROOTFS'
export NETD_BPF_TEST='$NETD_BPF_TEST' GROVE_NETD_TESTBED='$ROOT/target/release/grove-netd-testbed' BENCH_RUNS='${BENCH_RUNS:-}'
export STORAGE_DMTHIN_TEST='$STORAGE_DMTHIN_TEST' VMM_JAIL_TEST='$VMM_JAIL_TEST'
export GROVE_CACHE='$CACHE' TESTHOST_CPUS='${TESTHOST_CPUS:-1}' TESTHOST_TCG='${TESTHOST_TCG:-multi}'
$(for v in GUEST_VERBOSE GUEST_CMDLINE_EXTRA VSOCK_ROOT BOOT_CONFIGS FORK_CHILDREN BENCH_RUNS BOOTCMP_KERNELS NETBENCH_MIB; do
  [ -n "${!v:-}" ] && printf "export %s=%q\n" "$v" "${!v}"; done)
export CLOUD_KERNEL='$(echo "$fk" | sed -n 2p)' MIN_KERNEL='$([ -s build/kernel-min/vmlinux ] && echo "$ROOT/build/kernel-min/vmlinux")'
cd '$ROOT'
echo "testhost: scenario $NAME on \$(uname -r), \$(nproc) CPUs, guest kernel \$GUEST_KERNEL"
exec bash '$SCEN' $(printf '%q ' "$@")
EOF

# --- direct: right here ----------------------------------------------------------------------
if [ "$MODE" = direct ]; then
  sed -i "s|GROVE_OUT='OUTDIR'|GROVE_OUT='$OUT'|" "$OUT/job.sh"
  [ -c /dev/kvm ] || die "GROVE_TESTHOST=direct needs /dev/kvm"
  say "running $NAME directly (limit ${LIMIT} s)"
  set +e
  timeout -s KILL "$LIMIT" bash "$OUT/job.sh" 2>&1 | tee "$OUT/console.log"
  rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" -eq 137 ] && say "$NAME hit its limit of ${LIMIT} s"
  echo "$rc" >"$OUT/rc"
  say "$NAME: exit status $rc (log: $OUT/console.log)"
  exit "$rc"
fi
[ "$MODE" = qemu ] || die "GROVE_TESTHOST=$MODE: qemu or direct"
sed -i "s|GROVE_OUT='OUTDIR'|GROVE_OUT='/testhost-out'|" "$OUT/job.sh"

# --- qemu: the test host's kernel and initramfs (cached, keyed by their inputs) --------------
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is missing (apt-get install qemu-system-x86)"
meta="${TESTHOST_KERNEL_PACKAGE:-linux-image-amd64}"
pkg="$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
if [ -z "$pkg" ] && [ "$(id -u)" -eq 0 ]; then
  apt-get update -qq >&2 || true
  pkg="$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
fi
[ -n "$pkg" ] || die "cannot resolve $meta to a kernel package (apt-get update?)"
kver="${pkg#linux-image-}"
mkdir -p "$CACHE/debs" "$CACHE/testhost"
exec 9>"$CACHE/testhost/.lock"
flock 9
deb="$(ls "$CACHE/debs/${pkg}"_*.deb 2>/dev/null | sort -V | tail -1 || true)"
if [ -z "$deb" ]; then
  say "downloading $pkg"
  (cd "$CACHE/debs" && apt-get download -q "$pkg" 2>&1 | grep -v unsandboxed >&2 || true)
  deb="$(ls "$CACHE/debs/${pkg}"_*.deb 2>/dev/null | sort -V | tail -1 || true)"
  [ -n "$deb" ] || die "apt-get download $pkg failed"
fi
kx="$CACHE/testhost/$(basename "$deb" .deb)"
if [ ! -f "$kx/.done" ]; then
  say "unpacking $(basename "$deb")"
  rm -rf "$kx"; mkdir -p "$kx"
  dpkg-deb -x "$deb" "$kx"
  # modules.dep for `busybox modprobe` inside the test host.
  busybox depmod -b "$kx" "$kver" 2>/dev/null || true
  [ -s "$kx/lib/modules/$kver/modules.dep" ] || die "depmod over $kx failed"
  touch "$kx/.done"
fi
MODDIR="$kx/lib/modules/$kver"
HOST_KERNEL="$kx/boot/vmlinuz-$kver"
# Debian's generic kernel (the test host's own) as a third guest kernel to compare.
sed -i "1a export GENERIC_KERNEL='$HOST_KERNEL'" "$OUT/job.sh"

# Modules the init needs before the host root is mounted, dependencies first (from each
# module's .modinfo depends=, as scripts/fetch-kernel.sh does).
BOOT_MODULES=(virtio_pci 9pnet_virtio 9p overlay)
ikey="$( { echo "$kver $(busybox | head -1) ${BOOT_MODULES[*]}"; cat "$TH/init"; } | sha256sum | cut -c1-16)"
HOST_INITRD="$CACHE/testhost/initramfs-$ikey.cpio.gz"
if [ ! -s "$HOST_INITRD" ]; then
  ir="$(mktemp -d)"
  mkdir -p "$ir"/{bin,dev,proc,sys,mods,tmp}
  cp "$bb" "$ir/bin/busybox"
  install -m 0755 "$TH/init" "$ir/init"
  declare -A seen=()
  addm() {
    local m="${1//-/_}" ko d
    [ -n "${seen[$m]:-}" ] && return 0
    seen[$m]=1
    grep -qE "/(${m}|${m//_/-})\.ko\$" "$MODDIR/modules.builtin" && return 0
    ko="$(find "$MODDIR/kernel" \( -name "$m.ko" -o -name "${m//_/-}.ko" \) | head -1)"
    [ -n "$ko" ] || die "module $m not in $kver"
    for d in $(tr '\0' '\n' <"$ko" | LC_ALL=C grep -a '^depends=' | head -1 | cut -d= -f2 | tr ',' ' '); do
      addm "$d"
    done
    cp "$ko" "$ir/mods/$m.ko"
    echo "$m" >>"$ir/mods/order"
  }
  for m in "${BOOT_MODULES[@]}"; do addm "$m"; done
  (cd "$ir" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1) >"$HOST_INITRD.tmp"
  mv "$HOST_INITRD.tmp" "$HOST_INITRD"
  rm -rf "$ir"
fi
flock -u 9

# --- boot it -----------------------------------------------------------------------------------
# One vCPU by default: with two, QEMU's emulation of nested SVM now and then hands a guest
# the test host's own state on a VMRUN (the guest then runs the test host's kvm_amd code:
# an endless nested page fault loop, a triple fault, or the test host's kernel dying in
# exception entry). 4 of 13 blk runs with 2 vCPUs hit it, 0 of 14 with one (QEMU 10.0.2,
# 2026-12-02; docs/testing.md). TESTHOST_CPUS=2 runs two, for parallel guests.
CPUS="${TESTHOST_CPUS:-1}"
MEM="${TESTHOST_MEM_MIB:-6144}"
TCG="${TESTHOST_TCG:-multi}"
# tsc=reliable: the test host's TSC (TCG reads this machine's TSC) is its clocksource, so KVM
# has a master clock and the guests' kvm-clock follows their TSC. Its frequency is given
# (tsc_early_khz, from this machine's /proc/cpuinfo): calibrating it under TCG on a loaded
# machine came out far off once, and with a "reliable" TSC nothing corrects that (the test
# host's clock then ran ~50x fast and its time limit fired early).
khz="$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)"
APPEND="console=ttyS0 panic=-1 loglevel=4 mitigations=off nokaslr tsc=reliable ${khz:+tsc_early_khz=$khz} \
testhost.timeout=$LIMIT testhost.modules=$MODDIR testhost.root=$ROOT${TESTHOST_KVM_AMD:+ testhost.kvm_amd=$TESTHOST_KVM_AMD}"
LOG="$OUT/console.log"
: >"$LOG"
say "$NAME: booting the test host ($kver, tcg thread=$TCG, $CPUS vCPUs, $MEM MiB; limit ${LIMIT} s; prep ${prep_ms} ms)"
t0=$(date +%s%N)
qemu-system-x86_64 -accel "tcg,thread=$TCG" -M q35 -cpu max -smp "$CPUS" -m "$MEM" \
  -nodefaults -no-user-config -no-reboot -display none \
  -monitor "unix:$OUT/qemu-monitor.sock,server=on,wait=off" \
  -serial "file:$LOG" \
  -kernel "$HOST_KERNEL" -initrd "$HOST_INITRD" -append "$APPEND" \
  -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
  -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
  -fsdev "local,id=out,path=$OUT,security_model=none,multidevs=remap" \
  -device virtio-9p-pci,fsdev=out,mount_tag=out \
  >"$OUT/qemu.out" 2>&1 &
QPID=$!
cleanup() {
  if kill -0 "$QPID" 2>/dev/null; then kill "$QPID" 2>/dev/null || true; sleep 1; kill -9 "$QPID" 2>/dev/null || true; fi
  rm -rf "$gx"
}
trap cleanup EXIT
# The test host enforces the limit itself; this bound covers its boot and shutdown too.
outer=$(( LIMIT + ${TESTHOST_BOOT_ALLOWANCE:-240} ))
# A test host whose heartbeat (its init touches $OUT/heartbeat every 2 s) stops for this long
# hangs as a whole: QEMU's emulation of nested SVM can leave its vCPU in an endless loop
# (2026-12-02: the 1-vCPU test host stopped mid-scenario, QEMU at 100 % CPU, nothing
# printed, debug.sh not picked up). Its registers are saved (QEMU's monitor) and it counts
# as dead (75), not as the scenario's failure.
HANG_S="${TESTHOST_HANG_S:-180}"
printed=0
overran=0
hung=0
monitor() { # COMMAND: QEMU's monitor's answer
  python3 - "$OUT/qemu-monitor.sock" "$1" <<'PY' 2>&1
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n"); time.sleep(2); out = b""
try:
    while True:
        b = s.recv(65536)
        if not b: break
        out += b
except OSError: pass
sys.stdout.write(out.decode(errors="replace"))
PY
}
while kill -0 "$QPID" 2>/dev/null; do
  now=$(date +%s)
  if [ $(( ($(date +%s%N) - t0) / 1000000000 )) -ge "$outer" ]; then
    say "$NAME: the test host did not finish within ${outer} s; stopping QEMU"
    kill "$QPID" 2>/dev/null || true
    overran=1
    break
  fi
  if [ -f "$OUT/heartbeat" ] && [ $(( now - $(stat -c %Y "$OUT/heartbeat") )) -ge "$HANG_S" ]; then
    say "$NAME: the test host hangs (no heartbeat for ${HANG_S} s); its registers: $OUT/hung-registers.txt; stopping QEMU"
    { monitor "info registers"; monitor "info cpus"; } >"$OUT/hung-registers.txt" 2>&1
    kill "$QPID" 2>/dev/null || true
    hung=1
    break
  fi
  n=$(wc -l <"$LOG" 2>/dev/null || echo 0)
  if [ "$n" -gt "$printed" ]; then sed -n "$((printed + 1)),${n}p" "$LOG"; printed=$n; fi
  sleep 0.5
done
wait "$QPID" 2>/dev/null && qrc=0 || qrc=$?
n=$(wc -l <"$LOG" 2>/dev/null || echo 0)
[ "$n" -gt "$printed" ] && sed -n "$((printed + 1)),${n}p" "$LOG"
total_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
if [ ! -s "$OUT/rc" ] && [ "$hung" -eq 1 ]; then
  say "$NAME: FAILED: the test host hung (status 75: not the scenario's verdict)"
  exit 75
fi
if [ ! -s "$OUT/rc" ] && [ "$overran" -eq 1 ]; then
  say "$NAME: FAILED: overran its limit"
  exit 1
fi
if [ ! -s "$OUT/rc" ]; then
  # The test host itself died (its kernel panicked or reset: with -no-reboot QEMU then
  # exits 0) before the scenario ended. A user-space grove-vmm cannot crash a correct kernel:
  # this is the emulation's or the test host kernel's failure, not the scenario's verdict.
  # Status 75 (EX_TEMPFAIL) tells scripts/test.sh so; a scenario's own failures are 1.
  say "$NAME: FAILED: the test host died without an exit status (QEMU status $qrc; last kernel lines and $OUT/qemu.out below)"
  grep -a -E 'Kernel panic|BUG:|double fault|Oops' "$LOG" | tail -5 >&2 || true
  cat "$OUT/qemu.out" >&2
  exit 75
fi
rc="$(cat "$OUT/rc")"
say "$NAME: exit status $rc, test host run ${total_ms} ms (log: $LOG)"
exit "$rc"
