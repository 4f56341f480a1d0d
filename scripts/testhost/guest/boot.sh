#!/bin/sh
# Boot probe: reports what the guest sees, then asks guest-init for a clean reboot (SIGINT to
# PID 1, guest-init's Ctrl-Alt-Del path): with reboot=k the kernel resets through the i8042
# and grove-vmm exits 0.
. /probe/lib.sh
mem_kib=$(sed -n 's/^MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo)
echo "probe: cpus=$(grep -c ^processor /proc/cpuinfo) mem_kib=$mem_kib identity=$(identity) uptime=$(up)"
echo "probe: clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
t1=$(up); sleep 1; t2=$(up)
echo "probe: slept 1 s: uptime $t1 -> $t2"
dmesg_warnings
dmesg_all
echo "probe: done"
kill -INT 1
