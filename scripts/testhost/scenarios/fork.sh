#!/usr/bin/env bash
# what: a running Linux guest is forked through the control socket into FORK_CHILDREN (3) children side by side: each has its own identity, all keep ticking (clock and timers) with no kernel warnings, and the parent goes on
# timeout: 900
. "$GROVE_ROOT/scripts/testhost/lib.sh"
N="${FORK_CHILDREN:-3}"
W="$(mktemp -d /tmp/grove-fork.XXXXXX)"   # tmpfs in the test host: sockets and snapshots
trap '_end_vms; rm -rf "$W"' EXIT
api() { "$GROVE_VMM" api --api-sock "$W/parent.sock" "$1"; }

# tick_field NAME FIELD: FIELD of NAME's last tick line.
# Only complete lines (the serial may be mid-line): they end with the w= field.
tick_lines() { grep -E '^tick .* w=[0-9]+' "$GROVE_OUT/$1.serial" 2>/dev/null | tr -d '\r'; }
tick_field() { tick_lines "$1" | tail -1 | tr ' ' '\n' | sed -n "s/^$2=//p"; }
ticks() { tick_lines "$1" | wc -l; }

boot_vm parent ticker 1 512 --api-sock "$W/parent.sock"
wait_serial parent '^tick n=3 ' 400
log "parent ticking: $(tick_lines parent | tail -1)"
[ "$(tick_field parent id)" = 0 ] || fail "parent identity is $(tick_field parent id), not 0"

api '{"cmd":"fork","dir":"'"$W"'/fork"}' | tee "$GROVE_OUT/fork-reply.json"
grep -q '"ok":true' "$GROVE_OUT/fork-reply.json" || fail "fork refused"
n_at_fork="$(tick_field parent n)"
log "forked at parent tick $n_at_fork; starting $N children"
for i in $(seq 1 "$N"); do
  start_vm "child$i" restore --snapshot "$W/fork" --identity "$i"
done
for i in $(seq 1 "$N"); do
  # Three ticks of its own: the clock advances and the sleep timer fires after restore.
  wait_serial "child$i" "^tick .* id=$i " 300 3
done
parent_before="$(ticks parent)"
sleep 3
for i in $(seq 1 "$N"); do
  c="child$i"
  [ "$(tick_field "$c" id)" = "$i" ] || fail "$c: identity $(tick_field "$c" id)"
  [ "$(tick_field "$c" gen)" = 1 ] || fail "$c: generation $(tick_field "$c" gen), not 1"
  # The first line may have been half done at the fork (identity read before it); every
  # later one must carry the child's own identity.
  tick_lines "$c" | tail -n +2 | grep -v " id=$i " && fail "$c: a tick with another identity"
  first="$(tick_lines "$c" | head -1)"
  last="$(tick_lines "$c" | tail -1)"
  n1="$(echo "$first" | sed 's/.* n=\([0-9]*\) .*/\1/')"; n2="$(echo "$last" | sed 's/.* n=\([0-9]*\) .*/\1/')"
  u1="$(echo "$first" | sed 's/.* up=\([0-9.]*\) .*/\1/')"; u2="$(echo "$last" | sed 's/.* up=\([0-9.]*\) .*/\1/')"
  [ "$n1" -ge "$n_at_fork" ] || fail "$c: counter restarted ($n1 < $n_at_fork)"
  [ "$n2" -gt "$n1" ] || fail "$c: counter stuck at $n1"
  awk -v a="$u1" -v b="$u2" 'BEGIN { exit !(b > a) }' || fail "$c: uptime did not advance ($u1 -> $u2)"
  check_warnings "$c"
  kill -0 "$(cat "$GROVE_OUT/$c.pid")" || fail "$c exited"
  log "$c: ticks n=$n1..$n2 up=$u1..$u2 id=$i gen=1"
done
[ "$(ticks parent)" -gt "$parent_before" ] || fail "the parent stopped ticking after the fork"
[ "$(tick_field parent id)" = 0 ] || fail "parent identity changed"
check_warnings parent
log "parent: still ticking (n=$(tick_field parent n)), identity 0"
log PASS
