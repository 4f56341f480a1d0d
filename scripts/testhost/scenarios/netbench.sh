#!/usr/bin/env bash
# what: grove-bench net-guest: Linux guest to server TCP throughput on virtio-net through a netd slot, grove-vmm beside QEMU's virtio-net (microvm) in the same run (BENCH_RUNS rounds, default 5); prints the report
# timeout: 1500
. "$GROVE_ROOT/scripts/testhost/lib.sh"
. "$GROVE_ROOT/scripts/testhost/netlib.sh"
net_prepare
"$GROVE_BENCH" net-guest --runs "${BENCH_RUNS:-5}" --mib "${NETBENCH_MIB:-64}" --json | tee "$GROVE_OUT/netbench.json"
grep -q '"ratio"' "$GROVE_OUT/netbench.json" || fail "no report"
log PASS
