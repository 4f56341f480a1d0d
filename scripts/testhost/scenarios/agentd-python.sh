#!/usr/bin/env bash
# what: the Python client (clients/python, from build/pyenv) against agentd with a Linux template (guest-init's agent): the example search loop (fork into 4 with a different command each, keep the best-scoring child: the expected one, its siblings gone, it still runs), run() with stdout, stderr, exit code, stdin, env, streaming, signal and timeout, a PTY resized through the API, a checkpoint and a rewind to it, a 3 MiB file round trip through sb.files byte for byte, sb.files.watch events in order, 1000 concurrent Connect streams (grpc.aio) to one process each getting every line in order and the exit while a run() succeeds, agentd serving normally after; delete all leaves nothing
# timeout: 1500
. "$GROVE_ROOT/scripts/testhost/lib.sh"
. "$GROVE_ROOT/scripts/testhost/agentd-lib.sh"
PY="$GROVE_ROOT/build/pyenv/bin/python"
CHECKS="$GROVE_ROOT/clients/python/tests/linux_guest.py"
[ -x "$PY" ] || fail "$PY is missing (scripts/setup.sh makes the venv with the Python client)"
"$PY" -c 'import grove_client' || fail "grove_client does not import from $PY (scripts/setup.sh installs it)"
agentd_start --pool-size 2
agentd_linux_template idle
EP="unix:$SOCK"

P="$(g create --template linux --label role=parent)"
log "parent $P"

# The example: fork into 4, candidate i computes its expression; child 2 (6 * 9 = 54) wins.
"$PY" "$GROVE_ROOT/clients/python/examples/search.py" --endpoint "$EP" --sandbox "$P" --json \
  >"$GROVE_OUT/search.txt" 2>&1 || { cat "$GROVE_OUT/search.txt"; fail "examples/search.py failed"; }
cat "$GROVE_OUT/search.txt"
summary="$(tail -1 "$GROVE_OUT/search.txt")"
WIN="$(echo "$summary" | jget 'd["winner"]["id"]')"
[ "$(echo "$summary" | jget 'd["winner"]["index"]')" = 2 ] || fail "the winner is not child 2: $summary"
[ "$(echo "$summary" | jget 'd["winner"]["score"]')" = 54 ] || fail "the winner's score is not 54: $summary"
mapfile -t ALL < <(echo "$summary" | jget '"\n".join(d["children"])')
[ "${#ALL[@]}" -eq 4 ] || fail "the example forked ${#ALL[@]} children, not 4"
for id in "${ALL[@]}"; do
  [ "$id" = "$WIN" ] && continue
  g get "$id" >/dev/null 2>&1 && fail "sibling $id of the winner still exists"
  echo "$summary" | jget 'd["deleted"]' | grep -q "$id" || fail "$id is not in the example's deleted list"
done
[ "$(g --json get "$WIN" | jget 'd["state"]')" = running ] || fail "the winner $WIN does not run"
[ "$(g --json get "$WIN" | jget 'd["parent"]')" = "$P" ] || fail "the winner's parent is not $P"
[ "$(g --json get "$P" | jget 'd["children"]')" = "['$WIN']" ] || fail "the parent's children are not just the winner"
[ "$(g exec "$WIN" -- cat /run/candidate)" = "6 * 9" ] || fail "the winner's /run/candidate is not its candidate"
log "example: winner $WIN (child 2, score 54) kept and running; its 3 siblings are gone"

"$PY" "$CHECKS" "$EP" "$P" run || fail "run() checks"
"$PY" "$CHECKS" "$EP" "$P" files || fail "sb.files checks"
"$PY" "$CHECKS" "$EP" "$P" watch || fail "sb.files.watch checks"
t0=$(date +%s)
"$PY" "$CHECKS" "$EP" "$P" streams 1000 || { tail -30 "$W/agentd.log"; fail "1000 concurrent streams"; }
log "streams: $(( $(date +%s) - t0 )) s in all (test host, TCG)"

# Delete all; then nothing is left.
g rm --subtree "$P" >/dev/null
[ "$(g --json ls | jget 'len(d)')" -eq 0 ] || fail "sandboxes left after delete: $(g ls)"
# The checkpoint run() took (pinned, labelled grove.process=…) goes with its sandbox gone.
cps="$(g --json snapshots ls | jget '" ".join(str(s["id"]) for s in d if "grove.process" in s["labels"])')"
[ -n "$cps" ] || fail "no checkpoint snapshot (run(checkpoint=True)) is listed"
for s in $cps; do g snapshots rm "$s"; done
g template rm linux
[ -z "$(ls "$DATA/snapshots")" ] || fail "snapshot files left: $(ls -R "$DATA/snapshots")"
[ -z "$(ls "$DATA/layers")" ] || fail "layer files left: $(ls "$DATA/layers")"
for _ in $(seq 50); do [ -z "$(ls "$DATA/vmm")" ] && break; sleep 0.1; done
[ -z "$(ls "$DATA/vmm")" ] || fail "VMM directories left: $(ls "$DATA/vmm")"
left="$(pgrep -f "grove-vmm .*$DATA" || true)"
[ -z "$left" ] || fail "processes left: $left"
log PASS
