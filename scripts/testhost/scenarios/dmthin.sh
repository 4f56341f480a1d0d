#!/usr/bin/env bash
# what: storage's dm-thin tests (block_dmthin: the conformance suite incl. crash recovery) on the test host's device-mapper (dm-thin-pool, loop)
# timeout: 900
. "$GROVE_ROOT/scripts/testhost/lib.sh"
for m in crc32c_generic dm_thin_pool loop; do
  busybox modprobe "$m" || fail "modprobe $m"
done
[ -e /dev/mapper/control ] || mknod /dev/mapper/control c 10 236 2>/dev/null || true
[ -x "$STORAGE_DMTHIN_TEST" ] || fail "no block_dmthin test binary"
log "running $(basename "$STORAGE_DMTHIN_TEST") (device-mapper $(dmsetup version 2>/dev/null | tail -1 | awk '{print $NF}'))"
# No GROVE_ALLOW_SKIP: a missing capability fails here.
cd "$GROVE_ROOT/storage"
"$STORAGE_DMTHIN_TEST" --test-threads=1 2>&1 | tee "$GROVE_OUT/dmthin-test.log"
rc=${PIPESTATUS[0]}
grep -q '^test result: ok' "$GROVE_OUT/dmthin-test.log" || fail "block_dmthin failed (status $rc)"
grep -q 'skipped' "$GROVE_OUT/dmthin-test.log" && fail "a dm-thin test skipped in the test host"
log PASS
