#!/bin/sh
# Network probe (virtio-net in a netd slot; addresses from the kernel command line):
# 1. the interface guest-init configured from ip=, the server's view of us (whoami: the
#    slot's address), a denied address that must not answer;
# 2. then it asks whoami every half second: when the answer's address changes, this guest is
#    a fork child in another slot; it shows its interface again and waits at the barrier,
#    which answers once two children are connected at the same time.
. /probe/lib.sh
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | head -1; }
S=$(arg probe.server); S2=$(arg probe.server2); W=$(arg probe.whoami); B=$(arg probe.barrier)
iface() {
  echo "probe: eth0 $(ip -4 -o addr show dev eth0 | sed -n 's/.* inet \([0-9./]*\).*/\1/p') \
mac=$(cat /sys/class/net/eth0/address) operstate=$(cat /sys/class/net/eth0/operstate)"
}
addr_of() { echo "$1" | sed -n 's/^from \([0-9.]*\):.*/\1/p'; }
# guest-init has just set eth0 up; its operstate turns "up" only when the kernel's link
# watch has run (asynchronous, rate-limited to once a second, slow when emulated).
n=0
while [ "$(cat /sys/class/net/eth0/operstate)" != up ] && [ $n -lt 100 ]; do
  sleep 0.1; n=$((n + 1))
done
echo "probe: link watch: operstate $(cat /sys/class/net/eth0/operstate) after $n x 0.1 s"
iface
echo "probe: route $(ip -4 route show default)"
first=$(nc -w 10 "$S" "$W" </dev/null)
echo "probe: whoami $first"
if r=$(nc -w 4 "$S2" "$W" </dev/null) && [ -n "$r" ]; then
  echo "probe: denied address answered: $r"
else
  echo "probe: denied address $S2 unreachable"
fi
echo "probe: phase1 done"
me=$(addr_of "$first")
while :; do
  r=$(nc -w 5 "$S" "$W" </dev/null)
  now=$(addr_of "$r")
  if [ -n "$now" ] && [ "$now" != "$me" ]; then
    echo "probe: restored: whoami $r"
    iface
    echo "probe: $(nc -w 10 "$S" "$B" </dev/null)"
    break
  fi
  sleep 0.5
done
echo "probe: done"
