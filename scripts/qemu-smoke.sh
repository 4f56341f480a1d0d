#!/usr/bin/env bash
# Boots the Grove guest under QEMU with software emulation (-accel tcg): Debian's cloud
# kernel + the initramfs (guest-init as /init) + the root image (guest-init as PID 1), then
# through the guest protocol over QEMU user-mode networking (a hostfwd port bound to
# 127.0.0.1 only) runs `echo hello`, writes and reads back a file, and powers the guest off.
# Exits non-zero on any failure; bounded by SMOKE_TIMEOUT seconds (default 300).
# Needs: scripts/fetch-kernel.sh and scripts/build-rootfs.sh outputs under build/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
K="$ROOT/build/kernel"
IMG="${ROOTFS_OUT:-$ROOT/build/rootfs/rootfs.ext4}"
TIMEOUT="${SMOKE_TIMEOUT:-300}"
MEM="${SMOKE_MEM:-512}"
for f in "$K/bzImage" "$K/initramfs.cpio.gz" "$IMG"; do
  [ -s "$f" ] || { echo "qemu-smoke: missing $f (run scripts/fetch-kernel.sh and scripts/build-rootfs.sh)" >&2; exit 1; }
done
GI="$(scripts/build-guest-init.sh | tail -1)"
CTL="$(dirname "$GI")/guest-ctl"
OUT="$ROOT/build/qemu"
mkdir -p "$OUT"
LOG="$OUT/console.log"
: >"$LOG"

# A free local port for the forwarded agent connection.
port=""
for _ in $(seq 1 50); do
  p=$((20000 + RANDOM % 40000))
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then port=$p; break; fi
done
[ -n "$port" ] || { echo "qemu-smoke: no free port" >&2; exit 1; }

GUEST_PORT=7000
APPEND="console=ttyS0 root=/dev/vda rw panic=-1 \
grove.modules=virtio_pci,virtio_blk,virtio_net,vmw_vsock_virtio_transport \
ip=10.0.2.15::10.0.2.2:255.255.255.0:grove:eth0:off grove.listen=tcp:0.0.0.0:$GUEST_PORT"

t0=$(date +%s%N)
qemu-system-x86_64 -accel tcg -M q35 -cpu max -smp 1 -m "$MEM" \
  -nodefaults -no-reboot -display none -monitor none \
  -serial "file:$LOG" \
  -kernel "$K/bzImage" -initrd "$K/initramfs.cpio.gz" -append "$APPEND" \
  -drive "file=$IMG,if=none,id=root,format=raw,snapshot=on" -device virtio-blk-pci,drive=root \
  -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:$GUEST_PORT" -device virtio-net-pci,netdev=n0 \
  >"$OUT/qemu.out" 2>&1 &
QPID=$!
cleanup() {
  if kill -0 "$QPID" 2>/dev/null; then kill "$QPID" 2>/dev/null || true; sleep 0.5; kill -9 "$QPID" 2>/dev/null || true; fi
}
trap cleanup EXIT
ms() { echo $(( ($(date +%s%N) - t0) / 1000000 )); }
fail() {
  echo "qemu-smoke: FAIL: $*" >&2
  echo "---- guest console (last 40 lines of $LOG) ----" >&2
  tail -40 "$LOG" >&2 || true
  cat "$OUT/qemu.out" >&2 || true
  exit 1
}
# Seconds left of the overall budget (at least 1: `timeout 0` would mean no limit).
left() { local l=$(( TIMEOUT - ($(date +%s) - t0 / 1000000000) )); [ "$l" -ge 1 ] && echo "$l" || echo 1; }

ctl() { timeout "$(left)" "$CTL" --connect "tcp:127.0.0.1:$port" "$@"; }

echo "qemu-smoke: booting (QEMU pid $QPID, tcg, ${MEM} MiB, agent on 127.0.0.1:$port)" >&2
ready=0
while [ "$(left)" -gt 1 ]; do
  kill -0 "$QPID" 2>/dev/null || fail "QEMU exited during boot"
  if ctl --wait 5 ping 2>"$OUT/ctl-wait.err"; then ready=1; cat "$OUT/ctl-wait.err" >&2; break; fi
done
[ "$ready" -eq 1 ] || fail "agent did not answer within ${TIMEOUT}s ($(tail -1 "$OUT/ctl-wait.err"))"
boot_ms=$(ms)
echo "qemu-smoke: agent answered $boot_ms ms after QEMU start" >&2

out="$(ctl exec echo hello)" || fail "exec echo hello"
echo "$out"
[ "$out" = "hello" ] || fail "echo hello printed '$out'"
exec_ms=$(ms)

payload="grove smoke $(date +%s%N) $RANDOM"
printf '%s' "$payload" | ctl write /root/smoke.txt || fail "write /root/smoke.txt"
back="$(ctl read /root/smoke.txt)" || fail "read /root/smoke.txt"
[ "$back" = "$payload" ] || fail "read back '$back', wrote '$payload'"
catback="$(ctl exec cat /root/smoke.txt)" || fail "cat /root/smoke.txt"
[ "$catback" = "$payload" ] || fail "cat in the guest printed '$catback'"
echo "qemu-smoke: file written and read back ($(printf '%s' "$payload" | wc -c) bytes)" >&2
uname_r="$(ctl exec uname -r)" || fail "uname"
pid1="$(ctl exec cat /proc/1/comm)" || fail "cat /proc/1/comm"
[ "$pid1" = "guest-init" ] || fail "PID 1 is '$pid1', not guest-init"
echo "qemu-smoke: guest kernel $uname_r, PID 1 = $pid1" >&2

tty="$(ctl exec-pty tty)" || fail "exec on a PTY"
case "$tty" in /dev/pts/*) ;; *) fail "exec-pty: tty printed '$tty'" ;; esac
ctl exec date -s @1000000000 >/dev/null || fail "set the guest clock back to 2001"
ctl post-restore grove-child || fail "post-restore"
[ "$(ctl exec hostname)" = grove-child ] || fail "post-restore did not set the hostname"
gclock="$(ctl exec date +%s)" || fail "date"
[ $(( gclock - $(date +%s) )) -ge -60 ] || fail "post-restore did not step the clock (guest $gclock)"
echo "qemu-smoke: PTY exec ($tty), post-restore (entropy + reseed, clock, hostname) OK" >&2

t_off=$(ms)
ctl poweroff || fail "poweroff request"
for _ in $(seq 1 $((2 * 60))); do
  kill -0 "$QPID" 2>/dev/null || break
  sleep 0.5
done
if kill -0 "$QPID" 2>/dev/null; then fail "guest did not power off within 60 s"; fi
wait "$QPID" && qrc=0 || qrc=$?
[ "$qrc" -eq 0 ] || fail "QEMU exited with status $qrc"
grep -q "guest-init: Poweroff" "$LOG" || fail "no clean poweroff message on the console"
grep -q "reboot: Power down" "$LOG" || fail "kernel did not power down"
off_ms=$(( $(ms) - t_off ))
trap - EXIT
echo "qemu-smoke: OK: boot to agent ${boot_ms} ms, echo done at ${exec_ms} ms, poweroff ${off_ms} ms (tcg, 1 vCPU, ${MEM} MiB)" >&2
