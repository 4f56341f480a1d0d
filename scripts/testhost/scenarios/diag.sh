#!/usr/bin/env bash
# what: prints the test host's kernel log, CPU flags, clocksource and KVM module parameters (for debugging, checks nothing)
# timeout: 120
. "$GROVE_ROOT/scripts/testhost/lib.sh"
dmesg > "$GROVE_OUT/dmesg.txt"
grep -iE 'clocksource|tsc|kvm|svm|hpet|x86/fpu|xsave' "$GROVE_OUT/dmesg.txt" | head -60
echo "clocksource: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource) (available: $(cat /sys/devices/system/clocksource/clocksource0/available_clocksource))"
grep -m1 '^flags' /proc/cpuinfo
for p in /sys/module/kvm/parameters/* /sys/module/kvm_amd/parameters/*; do echo "$p=$(cat "$p")"; done 2>/dev/null | head -40
log PASS
