#!/usr/bin/env bash
# what: diagnostic: repeats the vsock scenario's heavy transfers (20 MB floods beside a short exec, 64 MiB writes and reads) and prints the device counters after each
# timeout: 1500
. "$GROVE_ROOT/scripts/testhost/lib.sh"
. "$GROVE_ROOT/scripts/testhost/vsock-lib.sh"
vsock_boot parent 1 512
ctl parent --wait 300 exec echo hello >/dev/null || { show_vm parent; fail "echo hello"; }
head -c $((64 << 20)) /dev/urandom >"$VS_DIR/big"
want="$(sha256sum <"$VS_DIR/big" | cut -d' ' -f1)"
bad=0
for r in $(seq 1 ${ROUNDS:-6}); do
  ctl parent exec busybox cat /dev/zero 2>/dev/null | sleep 600 &
  STUCK=$!
  sleep 3
  alive="$(CTL_LIMIT=120 ctl parent exec echo alive 2>&1)" || { bad=1; log "round $r: alive exec beside a stuck one failed: $alive"; }
  api parent '{"cmd":"status"}' >/dev/null || { bad=1; log "status failed"; }
  kill "$STUCK" 2>/dev/null; wait "$STUCK" 2>/dev/null || true
  CTL_LIMIT=300 ctl parent exec busybox head -c 20000000 /dev/zero 2>"$VS_DIR/flood.err" | wc -c >"$VS_DIR/flood.count" &
  FLOOD=$!
  sleep 2
  alive="$(CTL_LIMIT=120 ctl parent exec echo alive 2>&1)" || { bad=1; log "round $r: alive exec failed: $alive"; }
  wait "$FLOOD" || true
  log "round $r: flood $(cat "$VS_DIR/flood.count") bytes, err '$(cat "$VS_DIR/flood.err")'; $(vsock_status parent)"
  [ "$(cat "$VS_DIR/flood.count")" -eq 20000000 ] || bad=1
  ctl parent write /tmp/big <"$VS_DIR/big" 2>"$VS_DIR/w.err" || { bad=1; log "round $r: write failed: $(cat "$VS_DIR/w.err")"; }
  back="$(ctl parent read /tmp/big 2>"$VS_DIR/r.err" | sha256sum | cut -d' ' -f1)"
  [ "$back" = "$want" ] || { bad=1; log "round $r: read back $back: $(cat "$VS_DIR/r.err")"; }
  log "round $r: write+read done; $(vsock_status parent)"
done
show_vm parent | tail -40
[ "$bad" = 0 ] || fail "some rounds failed"
log PASS
