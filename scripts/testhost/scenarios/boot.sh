#!/usr/bin/env bash
# what: Linux boots under grove-vmm to guest-init's ready mark with 1 vCPU/512 MiB and 2 vCPUs/3.5 GiB, no kernel warnings, clean reboot (exit 0)
# timeout: 900
. "$GROVE_ROOT/scripts/testhost/lib.sh"
# BOOT_CONFIGS="vcpus:mem_mib ..." overrides the two boots.
for cfg in ${BOOT_CONFIGS:-1:512 2:3584}; do
  v="${cfg%%:*}"; m="${cfg##*:}"; name="boot-${v}cpu-${m}m"
  log "$name: booting $GUEST_KERNEL"
  boot_vm "$name" boot "$v" "$m"
  wait_exit "$name" 400
  [ "$VM_RC" -eq 0 ] || { show_vm "$name"; fail "$name: grove-vmm exited $VM_RC"; }
  s="$GROVE_OUT/$name.serial"
  grep -q 'guest-init: ready' "$s" || { show_vm "$name"; fail "$name: no guest-init ready line"; }
  ms="$(boot_timer_ms "$name")"
  [ -n "$ms" ] || { show_vm "$name"; fail "$name: no boot-timer write (port 0x440)"; }
  grep -q '^probe: done' "$s" || { show_vm "$name"; fail "$name: the probe did not finish"; }
  grep -q 'guest-init: Reboot' "$s" || { show_vm "$name"; fail "$name: no clean reboot by guest-init"; }
  cpus="$(sed -n 's/^probe: cpus=\([0-9]*\).*/\1/p' "$s")"
  [ "$cpus" = "$v" ] || fail "$name: the guest sees $cpus CPUs, not $v"
  kib="$(sed -n 's/^probe: .*mem_kib=\([0-9]*\).*/\1/p' "$s")"
  # MemTotal is RAM minus the kernel's own reservations: at least 85 % of what was given.
  [ $(( kib * 100 / (m * 1024) )) -ge 85 ] || fail "$name: MemTotal $kib KiB of $m MiB"
  check_warnings "$name"
  log "$name: ready $ms ms after VMM start (guest uptime at ready: $(sed -n 's/.*guest-init: ready (uptime \([0-9]*\) ms.*/\1/p' "$s") ms), $(grep '^probe: clocksource' "$s")"
done
log PASS
