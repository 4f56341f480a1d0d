#!/usr/bin/env bash
# what: grove-bench explore: fork exploration through agentd with a Linux template (guest-init's agent, idle probe, 256 MiB, 1 vCPU): ForkRun(N) of a running parent with a per-child command vs the anchors' way (Snapshot, N Creates from it at once, Start in each), alternating in the same run, N = 1, 4, 16, BENCH_RUNS samples each (default 8), timed to each child's first output byte; results in explore.{txt,json}. A bench (not in test.sh's list): it fails only if a flow fails or leaves something behind
# timeout: 1080
. "$GROVE_ROOT/scripts/testhost/lib.sh"
. "$GROVE_ROOT/scripts/testhost/agentd-lib.sh"
runs="${BENCH_RUNS:-8}"
children=1,4,16
# 256 MiB per VM: a parent and 16 children take 17 x 256 MiB of admission (the test host's
# default limit, 90 % of its ~6 GiB, holds that), but they share the template's and the
# snapshots' pages MAP_PRIVATE, so only what each dirties costs memory. The test host has one
# CPU: agentd's default of 16 vCPUs per host CPU would refuse the parent's 16 children, so
# vCPUs are not the limit here. A standby pool of 16 per shape: both flows restore their
# children into standby VMMs (the bench refills the pool, untimed, before every sample and
# reports pool misses per flow).
mem=256
pool=16
agentd_start --pool-size "$pool" --max-vcpus 64
agentd_linux_template idle "$mem"
log "load average before the bench: $(cat /proc/loadavg)"
t0=$(date +%s)
st=0
"$GROVE_BENCH" explore --endpoint "unix:$SOCK" --template linux --children "$children" --runs "$runs" \
  --json-out "$GROVE_OUT/explore.json" >"$GROVE_OUT/explore.txt" || st=$?
cat "$GROVE_OUT/explore.txt"
[ "$st" -eq 0 ] || { tail -40 "$W/agentd.log"; fail "grove-bench explore failed (status $st)"; }
log "bench took $(( $(date +%s) - t0 )) s; load average after: $(cat /proc/loadavg)"
# The bench deleted its parents, children and snapshots: only the template's warm snapshot is left.
[ "$(g --json ls | jget 'len(d)')" -eq 0 ] || { g ls; fail "sandboxes left after the bench"; }
[ "$(g --json snapshots ls | jget 'len(d)')" -eq 1 ] || { g snapshots ls; fail "snapshots left after the bench"; }
g template rm linux
[ -z "$(ls "$DATA/snapshots")" ] || fail "snapshot files left: $(ls "$DATA/snapshots")"
log PASS
