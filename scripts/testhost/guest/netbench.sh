#!/bin/sh
# Throughput probe for grove-bench net-guest: asks the control port what to do; uploads N
# 64 KiB blocks of zeros to the sink when told, until told "done"; then reboots (the VMM
# exits).
. /probe/lib.sh
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | head -1; }
S=$(arg probe.server); C=$(arg probe.ctrl); K=$(arg probe.sink)
echo "probe: netbench ready, $(ip -4 -o addr show dev eth0 | sed -n 's/.* inet \([0-9./]*\).*/\1/p')"
while :; do
  c=$(nc -w 10 "$S" "$C" </dev/null)
  case "$c" in
    upload\ *) dd if=/dev/zero bs=65536 count="${c#upload }" 2>/dev/null | nc -w 10 "$S" "$K" ;;
    done) break ;;
    *) sleep 0.3 ;;
  esac
done
echo "probe: done"
kill -INT 1
