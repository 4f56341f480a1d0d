#!/usr/bin/env bash
# what: grove-bench disk --dmthin: snapshot and clone latency of the dm-thin backend (a pool on loop devices) beside the layered store's, same sizes, same directory, same run (BENCH_RUNS, default 30); results in diskdm.{json,txt} (measures, checks only that both ran)
# timeout: 1200
. "$GROVE_ROOT/scripts/testhost/lib.sh"
for m in crc32c_generic dm_thin_pool loop; do
  busybox modprobe "$m" || fail "modprobe $m"
done
[ -e /dev/mapper/control ] || mknod /dev/mapper/control c 10 236 2>/dev/null || true
W="$(mktemp -d /tmp/grove-diskdm.XXXXXX)"
trap '_end_vms; rm -rf "$W"' EXIT
"$GROVE_BENCH" disk --dmthin --runs "${BENCH_RUNS:-30}" --dir "$W" --json >"$GROVE_OUT/diskdm.json" \
  || fail "grove-bench disk --dmthin failed"
python3 - "$GROVE_OUT/diskdm.json" <<'PY' | tee "$GROVE_OUT/diskdm.txt"
import json, sys
r = json.load(open(sys.argv[1])); c = r["conditions"]
print(f"scenario: {c['dir']} ({c['filesystem']}), kernel {c['kernel']}, {c['cpus']} cpus, {c['runs']} runs, load {c['loadavg_before']} -> {c['loadavg_after']}")
f = lambda s: f"median {s['median']:.3f} ms, p99 {s['p99']:.3f} ms"
for s in r["snapshot_clone"]:
    g = s["disk_gib"]
    print(f"scenario: {g:>2} GiB layered snapshot: {f(s['snapshot'])}; no spare: {f(s['snapshot_no_spare'])}")
    print(f"scenario: {g:>2} GiB layered clone:    {f(s['clone'])}; no spare: {f(s['clone_no_spare'])}")
for s in r["dmthin_snapshot_clone"]:
    g = s["disk_gib"]
    print(f"scenario: {g:>2} GiB dm-thin snapshot: {f(s['snapshot'])}")
    print(f"scenario: {g:>2} GiB dm-thin clone:    {f(s['clone'])}")
if len(r["dmthin_snapshot_clone"]) != len(r["snapshot_clone"]):
    sys.exit("scenario: FAIL: dm-thin figures missing")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "incomplete results"
# The pool's devices are gone (grove-bench tears them down, also on errors).
dmsetup ls 2>/dev/null | grep -q grove-bench && fail "grove-bench left dm devices behind"
log PASS
