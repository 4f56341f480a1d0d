#!/bin/sh
# Ticker probe: a line every 500 ms with a counter, the identity (port 0x444), the restore
# generation (port 0x448), the uptime and the number of warning lines in the kernel log,
# forever. A restored or forked guest goes on counting; each fork child shows its own
# identity. Whenever the count of warning lines changes they are dumped (dmesg_warnings).
. /probe/lib.sh
n=0
last_w=0
echo "probe: ticker started"
while :; do
  n=$((n + 1))
  w=$(dmesg | grep -cE 'WARNING|BUG|unchecked MSR|lockup|LOCKUP|unstable|rcu.*stall|blocked for|panic|Oops')
  echo "tick n=$n id=$(identity) gen=$(generation) up=$(up) w=$w"
  # New warning lines (also after a restore): dump them all again.
  if [ "$w" -ne "$last_w" ]; then dmesg_warnings; last_w=$w; fi
  sleep 0.5
done
