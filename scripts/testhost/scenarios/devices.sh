#!/usr/bin/env bash
# what: Debian's stock kernel finds grove-vmm's devices through ACPI alone: virtio-rng (LNRO0005, /dev/hwrng gives bytes), the CPUs (MADT), and ACPI power-off ends grove-vmm with status 0; a guest reading /dev/hwrng is forked and each child's restored device serves it
# timeout: 900
. "$GROVE_ROOT/scripts/testhost/lib.sh"
name=devices
log "$name: booting $GUEST_KERNEL with --rng, 2 vCPUs"
boot_vm "$name" devices 2 512 --rng
wait_exit "$name" 600
s="$GROVE_OUT/$name.serial"
[ "$VM_RC" -eq 0 ] || { show_vm "$name"; fail "$name: grove-vmm exited $VM_RC (an ACPI power-off exits 0)"; }
grep -q '^probe: done' "$s" || { show_vm "$name"; fail "$name: the probe did not finish"; }
grep -q '^probe: acpi-virtio LNRO0005' "$s" || { show_vm "$name"; fail "$name: no LNRO0005 device in /sys/bus/acpi"; }
grep -q '^probe: virtio-mmio platform device LNRO0005:00 bound to virtio-mmio' "$s" \
  || { show_vm "$name"; fail "$name: the virtio-mmio driver did not bind the ACPI device"; }
grep -q '^probe: hwrng virtio_rng' "$s" || { show_vm "$name"; fail "$name: virtio_rng is not the current hwrng"; }
hex="$(tr -d '\r' <"$s" | sed -n 's/^probe: hwrng bytes=\([0-9a-f]*\)$/\1/p')"
[ "${#hex}" -eq 128 ] || { show_vm "$name"; fail "$name: /dev/hwrng gave '${hex}', not 64 bytes"; }
[ -n "$(echo "$hex" | tr -d 0)" ] || fail "$name: /dev/hwrng gave only zeros"
cpus="$(sed -n 's/^probe: cpus=\([0-9]*\).*/\1/p' "$s")"
[ "$cpus" = 2 ] || fail "$name: the guest sees $cpus CPUs, not 2 (MADT)"
grep -q 'reboot: Power down' "$s" || { show_vm "$name"; fail "$name: no 'reboot: Power down' from the kernel"; }
check_warnings "$name"
log "$name: virtio-rng through ACPI, 2 CPUs, 64 bytes from /dev/hwrng, powered off with status 0"

# A guest whose virtio-rng driver is reading is forked: each child's device is restored (queue
# state, interrupt line) and the driver, waiting on interrupts, reads on.
W="$(mktemp -d /tmp/grove-devices.XXXXXX)"
trap '_end_vms; rm -rf "$W"' EXIT
hw() { tr -d '\r' <"$GROVE_OUT/$1.serial" | grep -E '^hwrng n=[0-9]+ bytes=[0-9a-f]* up=[0-9]+\.[0-9]+$'; }  # complete lines only
field() { hw "$1" | tail -1 | tr ' ' '\n' | sed -n "s/^$2=//p"; }
boot_vm rngparent rngticker 1 512 --rng --api-sock "$W/p.sock"
wait_serial rngparent '^hwrng n=3 ' 400
n_fork="$(field rngparent n)"
"$GROVE_VMM" api --api-sock "$W/p.sock" '{"cmd":"fork","dir":"'"$W"'/fork"}' >"$GROVE_OUT/rng-fork.json"
grep -q '"ok":true' "$GROVE_OUT/rng-fork.json" || fail "fork refused: $(cat "$GROVE_OUT/rng-fork.json")"
for i in 1 2; do start_vm "rngchild$i" restore --snapshot "$W/fork" --identity "$i"; done
# The first bytes a child reads may be the parent's: what the device had delivered before the
# fork sits in guest memory (the virtio-rng driver's and the hwrng core's buffers) and every
# child has a copy. Each child must then get draws of its own from its restored device.
uniq_draw() {  # uniq_draw CHILD OTHER...: a complete draw of CHILD's that no OTHER printed
  local c="$1"; shift
  hw "$c" | cut -d' ' -f3 | sort -u >"$W/$c.draws"
  for o in "$@"; do hw "$o" | cut -d' ' -f3; done | sort -u >"$W/others"
  comm -23 "$W/$c.draws" "$W/others" | head -1
}
for i in 1 2; do
  c="rngchild$i"; o=$(( 3 - i ))
  wait_serial "$c" '^hwrng ' 300 3
  end=$(( $(date +%s) + 120 ))
  own=""
  while [ -z "$own" ]; do
    own="$(uniq_draw "$c" rngparent "rngchild$o" || true)"
    [ -n "$own" ] && break
    [ "$(date +%s)" -lt "$end" ] || { show_vm "$c"; fail "$c: no draw of its own within 120 s"; }
    sleep 1
  done
  n="$(field "$c" n)"
  [ "$n" -gt "$n_fork" ] || fail "$c: counter $n not past the fork ($n_fork)"
  shared="$(hw "$c" | cut -d' ' -f3 | grep -cxFf <(hw rngparent | cut -d' ' -f3) || true)"
  # (check_warnings fails under pipefail on a log without any candidate line: call it only
  # when there is one.)
  if grep -qE "$WARN_RE" "$GROVE_OUT/$c.serial"; then check_warnings "$c"; fi
  log "$c: reads on from its restored device (n=$n; $shared draws read from buffers shared with the parent, then its own, e.g. $own)"
done
log PASS
