#!/usr/bin/env bash
# what: agentd with a Linux template (guest-init's agent on vsock): Register (Debian's kernel, the guest initramfs, a root directory made into an ext4 base layer), Warm (boot to guest-init's ready mark, snapshot with the disk's frozen layer), Create and Fork into 2 through the grove CLI: every VM runs from its own writable disk layer (reads back exactly its own writes after dropping its page cache, fresh entropy per VM), identities distinct; grove exec in each VM (output, stderr, exit status, stdin, a PTY, a signal through grove kill), rewind to a checkpoint restores a file's content; Delete and template rm leave no VMM, layer, snapshot or file
# timeout: 1500
. "$GROVE_ROOT/scripts/testhost/lib.sh"
. "$GROVE_ROOT/scripts/testhost/agentd-lib.sh"
FR=()
agentd_start --pool-size 2
agentd_linux_template agentd

# VMM directory of a sandbox (by its pid), its serial log and complete tick lines.
vdir() {
  local pid
  pid="$(g --json get "$1" | jget 'd["vmm_pid"]')"
  dirname "$(grep -lx "$pid" "$DATA"/vmm/*/pid | head -1)"
}
ticks() { tr -d '\r' <"$(vdir "$1")/serial.log" 2>/dev/null | grep -E '^tick n=[0-9]+ v=[0-9a-f]{16} lines=[0-9]+ disk=(ok|FAIL)$' || true; }
# wait_ticks ID COUNT SECONDS: COUNT tick lines since its restore, none with disk=FAIL.
wait_ticks() {
  local end=$(( $(date +%s) + $3 ))
  while [ "$(ticks "$1" | wc -l)" -lt "$2" ]; do
    [ "$(g --json get "$1" | jget 'd["state"]')" = running ] || { tail -30 "$(vdir "$1")/serial.log"; fail "$1 is not running"; }
    [ "$(date +%s)" -lt "$end" ] || { tail -30 "$(vdir "$1")/serial.log"; cat "$(vdir "$1")/vmm.log"; fail "$1: fewer than $2 ticks in $3 s"; }
    sleep 1
  done
  if ticks "$1" | grep -q 'disk=FAIL'; then ticks "$1"; fail "$1: its disk does not read back its own writes"; fi
}
last_v() { ticks "$1" | tail -1 | sed 's/.* v=\([0-9a-f]*\) .*/\1/'; }

P="$(g create --template linux --label role=parent)"
wait_ticks "$P" 3 300
log "parent $P (identity $(g --json get "$P" | jget 'd["identity"]'), disk attached $(g --json get "$P" | jget 'd["disk_attached"]')): $(ticks "$P" | tail -1)"
[ "$(g --json get "$P" | jget 'd["disk_attached"]')" = True ] || fail "the parent's disk is not attached"

g --json fork "$P" --count 2 --label role=child >"$GROVE_OUT/fork.json"
mapfile -t C < <(jget '"\n".join(c["id"] for c in d["children"])' <"$GROVE_OUT/fork.json")
[ "${#C[@]}" -eq 2 ] || fail "fork gave ${#C[@]} children"
for id in "$P" "${C[@]}"; do wait_ticks "$id" 6 300; done
ids="$(for id in "$P" "${C[@]}"; do g --json get "$id" | jget 'd["identity"]'; done | sort -u | wc -l)"
[ "$ids" -eq 3 ] || fail "identities are not distinct"
for id in "${C[@]}"; do
  d="$(vdir "$id")"
  [ -s "$d/root.idx" ] || fail "$id has no writable disk layer in its VMM directory"
  log "child $id: identity $(g --json get "$id" | jget 'd["identity"]'), layer $(du -k "$d/root.data" | cut -f1) KiB written, $(ticks "$id" | tail -1)"
done
log "parent: $(ticks "$P" | tail -1)"
g ls
# Kernel warnings on any VM's console (kept in the output directory).
for id in "$P" "${C[@]}"; do
  cp "$(vdir "$id")/serial.log" "$GROVE_OUT/$id.serial"
  check_warnings "$id"
done

# Processes through agentd (ProcessService: each VM's vsock socket, guest-init's agent).
t0=$(date +%s%N)
out="$(g exec "$P" -- echo hello)" || fail "grove exec echo failed"
[ "$out" = hello ] || fail "grove exec echo printed '$out'"
log "exec: echo hello in $(( ($(date +%s%N) - t0) / 1000000 )) ms (CLI start to exit, test host)"
st=0; g exec "$P" -- sh -c 'echo err >&2; exit 7' 2>"$W/err" || st=$?
[ "$st" -eq 7 ] || fail "exit status $st, not 7"
grep -qx err "$W/err" || fail "stderr not streamed: $(cat "$W/err")"
out="$(printf 'line1\nline2\n' | g exec -i "$P" -- wc -l)"
[ "$(echo $out)" = 2 ] || fail "stdin: wc -l said '$out'"
# Each VM answers from its own memory: the last entropy value it recorded is one of its
# own ticks (after the fork, every VM draws its own).
for id in "$P" "${C[@]}"; do
  v="$(g exec "$id" -- tail -n 1 /run/mine)"
  ticks "$id" | grep -q "v=$v " || fail "$id: exec read '$v', not one of its own ticks"
done
log "exec: each of the 3 VMs read its own /run/mine"
# A PTY (no terminal here: 24x80).
out="$(g exec -t "$P" -- stty size </dev/null | tr -d '\r')"
[ "$out" = "24 80" ] || fail "PTY size '$out'"
# A PTY in a real terminal (tmux): grove puts it in raw mode (^C goes to the guest's
# process, not to grove), the PTY has the terminal's size and follows its resize (SIGWINCH →
# Resize), and the shell's exit ends grove.
TM=(tmux -L "grove-$$" -f /dev/null)
"${TM[@]}" new-session -d -x 100 -y 30 "$BIN/grove --endpoint unix:$SOCK exec -t $P -- sh; echo grove-exit=\$?; sleep 600"
pane() { "${TM[@]}" capture-pane -p -t 0 | tr -d '\r'; }
wait_pane() { # REGEX: a line of the pane matches (30 s)
  for _ in $(seq 150); do pane | grep -qE "$1" && return 0; sleep 0.2; done
  pane >&2; "${TM[@]}" kill-server; fail "terminal: no line matching '$1'"
}
size() { "${TM[@]}" display -p -t 0 '#{pane_height} #{pane_width}'; }
s1="$(size)"
"${TM[@]}" send-keys -t 0 'stty size; echo pty-$((6*7))' Enter
wait_pane '^pty-42$'
pane | grep -qx "$s1" || { pane >&2; fail "terminal: stty size is not the pane's $s1"; }
"${TM[@]}" send-keys -t 0 'sleep 300' Enter
sleep 1
"${TM[@]}" send-keys -t 0 C-c
"${TM[@]}" send-keys -t 0 'echo alive-$((1+1))' Enter
wait_pane '^alive-2$'
"${TM[@]}" resize-window -t 0 -x 120 -y 40
s2="$(size)"
[ "$s2" != "$s1" ] || fail "terminal: tmux did not resize the pane"
for _ in $(seq 50); do
  "${TM[@]}" send-keys -t 0 'stty size' Enter
  sleep 0.4
  pane | grep -qx "$s2" && break
done
pane | grep -qx "$s2" || { pane >&2; "${TM[@]}" kill-server; fail "terminal: the PTY did not follow the resize to $s2"; }
"${TM[@]}" send-keys -t 0 'exit 5' Enter
wait_pane '^grove-exit=5$'
"${TM[@]}" kill-server
log "terminal: grove exec -t in tmux: raw (^C reached the guest), size $s1 then $s2 after a resize, exit 5"
# A signal through grove kill ends a running process; the exec's status is 128+9.
# running_proc ARGV0: the process id of the parent's running process ARGV0 (waits 30 s).
running_proc() {
  local p=""
  for _ in $(seq 150); do
    p="$(g --json ps "$P" | jget '"".join(p["process_id"] for p in d if p["running"] and p["argv"][0] == "'"$1"'")')"
    [ -n "$p" ] && break
    sleep 0.2
  done
  [ -n "$p" ] || { echo "scenario: FAIL: no running $1 in grove ps" >&2; exit 1; }  # in $(...): to the log
  echo "$p"
}
g exec "$P" -- sleep 300 >/dev/null & EX=$!
pid="$(running_proc sleep)"
g kill -s 9 "$pid"
st=0; wait "$EX" || st=$?
[ "$st" -eq 137 ] || fail "the killed exec ended with $st, not 137"
st=0; g wait "$pid" || st=$?
[ "$st" -eq 137 ] || fail "grove wait of the killed process: $st, not 137"
# A client that goes away mid-stream leaves its process running; another client attaches
# (Connect) and gets the kept output from the start, the rest live, and the exit status.
g exec "$P" -- sh -c 'for i in 1 2 3 4; do echo n=$i; sleep 1; done; exit 3' >/dev/null & EX=$!
pid="$(running_proc sh)"
kill -9 "$EX"; wait "$EX" 2>/dev/null || true
st=0; g attach "$pid" >"$W/attach.out" || st=$?
[ "$st" -eq 3 ] || fail "grove attach: status $st, not 3"
[ "$(cat "$W/attach.out")" = "$(printf 'n=1\nn=2\nn=3\nn=4')" ] || fail "grove attach printed '$(cat "$W/attach.out")'"
log "exec: a disconnected client's process ran on; grove attach replayed all of its output and its status"
g ps
# Files (FilesystemService) through grove cp: 64 MiB both ways, byte for byte (into /run,
# a tmpfs: the 64 MiB root disk would fill); a missing file is NotFound.
head -c $((64 << 20)) /dev/urandom >"$W/big"
t0=$(date +%s%N)
g cp "$W/big" "$P:/run/big"
t1=$(date +%s%N)
[ "$(g exec "$P" -- wc -c /run/big | awk '{print $1}')" = $((64 << 20)) ] || fail "the guest's /run/big has the wrong size"
g cp "$P:/run/big" "$W/big2"
t2=$(date +%s%N)
cmp "$W/big" "$W/big2" || fail "64 MiB round trip through grove cp differs"
log "files: 64 MiB in $(( (t1 - t0) / 1000000 )) ms, out in $(( (t2 - t1) / 1000000 )) ms (test host), identical"
rm -f "$W/big" "$W/big2"
g exec "$P" -- rm -f /run/big
st=0; g cp "$P:/nonexistent" "$W/x" 2>"$W/cperr" || st=$?
[ "$st" -ne 0 ] && grep -q NotFound "$W/cperr" || fail "cp of a missing file: status $st, $(cat "$W/cperr")"
[ ! -e "$W/x" ] || fail "a failed cp left $W/x"
# A path that escapes the guest's root (lexically: guest-init refuses it) is PermissionDenied.
st=0; g cp "$P:/../etc/passwd" "$W/x" 2>"$W/cperr" || st=$?
[ "$st" -ne 0 ] && grep -q PermissionDenied "$W/cperr" || fail "cp of /../etc/passwd: status $st, $(cat "$W/cperr")"
[ ! -e "$W/x" ] || fail "a refused cp left $W/x"

# Every VM reads its own entropy device: their latest values differ. (Not right after the
# fork: the guest's hw_random core and virtio-rng driver buffer up to 128 bytes, 16 ticks'
# worth, which every child inherits from the parent's memory; a run saw both children's
# sixth tick read the same buffered bytes.)
for id in "$P" "${C[@]}"; do wait_ticks "$id" 20 300; done
vs="$(for id in "$P" "${C[@]}"; do last_v "$id"; done | sort -u | wc -l)"
[ "$vs" -eq 3 ] || fail "two VMs read the same entropy: they do not run on their own devices ($(for id in "$P" "${C[@]}"; do echo "$id: $(ticks "$id" | tail -1)"; done))"
log "entropy: each VM's latest tick is its own ($(for id in "$P" "${C[@]}"; do last_v "$id"; done | tr '\n' ' '))"

# Watch (FilesystemService.Watch through grove watch-dir): once the CLI says "watching", every
# change to the directory's entries comes, in order; a missing directory is NotFound, a file
# is not a directory (InvalidArgument); the client's end cancels the watch in the guest.
g exec "$P" -- mkdir -p /run/w
g watch-dir "$P" /run/w >"$W/watch.out" 2>"$W/watch.err" & WP=$!
for _ in $(seq 300); do grep -q '^watching$' "$W/watch.err" && break; kill -0 "$WP" 2>/dev/null || break; sleep 0.1; done
grep -q '^watching$' "$W/watch.err" || fail "grove watch-dir did not start: $(cat "$W/watch.err")"
g exec "$P" -- sh -c 'echo a >/run/w/f; mkdir /run/w/d; mv /run/w/f /run/w/g; rm /run/w/g; rmdir /run/w/d'
for _ in $(seq 300); do grep -q '^removed /run/w/d/$' "$W/watch.out" && break; sleep 0.1; done
kill "$WP"; wait "$WP" 2>/dev/null || true
cp "$W/watch.out" "$GROVE_OUT/watch.out"
# Modified may come twice (the write and the close): squeeze repeats.
got="$(uniq "$W/watch.out" | tr '\n' ' ')"
want="created /run/w/f modified /run/w/f created /run/w/d/ renamed-from /run/w/f renamed-to /run/w/g removed /run/w/g removed /run/w/d/ "
[ "$got" = "$want" ] || fail "watch-dir saw '$got', not '$want'"
st=0; g watch-dir "$P" /run/nonexistent 2>"$W/werr" || st=$?
[ "$st" -ne 0 ] && grep -q NotFound "$W/werr" || fail "watch of a missing directory: status $st, $(cat "$W/werr")"
g exec "$P" -- touch /run/w/file
st=0; g watch-dir "$P" /run/w/file 2>"$W/werr" || st=$?
[ "$st" -ne 0 ] && grep -q InvalidArgument "$W/werr" || fail "watch of a file: status $st, $(cat "$W/werr")"
g exec "$P" -- rm -rf /run/w
log "watch: create, write, mkdir, rename, remove, rmdir reported in order; a missing directory NotFound, a file InvalidArgument"

# Fork exploration: the parent forked into 4 children, each running a command as it starts
# with its own environment (per child: WORD), output streamed back per child on one stream;
# the parent keeps running.
g fork "$P" --count 4 --child-env 0:WORD=alpha --child-env 1:WORD=beta --child-env 2:WORD=gamma \
  --child-env 3:WORD=delta -- sh -c 'echo "word=$WORD index=$GROVE_CHILD_INDEX id=$GROVE_SANDBOX_ID"; tail -n 1 /run/mine' \
  >"$GROVE_OUT/forkrun.txt" || { cat "$GROVE_OUT/forkrun.txt"; fail "grove fork -- CMD failed"; }
cat "$GROVE_OUT/forkrun.txt"
i=0
for w in alpha beta gamma delta; do
  id="$(sed -n "s/^child $i \(sb-[0-9a-f]*\) exit 0$/\1/p" "$GROVE_OUT/forkrun.txt")"
  [ -n "$id" ] || fail "child $i has no 'exit 0' summary line"
  grep -qx "\[$i\] word=$w index=$i id=$id" "$GROVE_OUT/forkrun.txt" || fail "child $i did not print its own word and id"
  v="$(sed -n "s/^\[$i\] \([0-9a-f]\{16\}\)$/\1/p" "$GROVE_OUT/forkrun.txt")"
  [ -n "$v" ] || fail "child $i printed no entropy record"
  FR+=("$id")
  i=$((i + 1))
done
[ "$(grep -c '^\[[0-3]\] [0-9a-f]\{16\}$' "$GROVE_OUT/forkrun.txt")" -eq 4 ] || fail "not 4 records"
[ "$(g --json get "$P" | jget 'd["state"]')" = running ] || fail "the parent does not run after the fork"
[ "$(g --json get "$P" | jget 'len(d["children"])')" -eq 6 ] || fail "the parent does not list its 6 children"
for id in "${FR[@]}"; do g rm "$id"; done
log "fork exploration: 4 children ran their own command as they started; output per child on one stream"

# Rewind restores a file's earlier content (disk and memory from the checkpoint).
g exec "$P" -- sh -c 'echo one >/root/f && sync'
S1="$(g snapshot "$P")"
g exec "$P" -- sh -c 'echo two >/root/f && sync'
[ "$(g exec "$P" -- cat /root/f)" = two ] || fail "/root/f was not rewritten"
g rewind "$P" "$S1" >/dev/null
out="$(g exec "$P" -- cat /root/f)"
[ "$out" = one ] || fail "after rewind to snapshot $S1, /root/f holds '$out', not one"
wait_ticks "$P" 2 300
log "rewind: /root/f back to 'one' from checkpoint $S1; the parent ticks on"
# A checkpoint taken when a process exits (exec --checkpoint), then rewound to.
S2="$(g exec --checkpoint "$P" -- sh -c 'echo three >/root/f && sync' 2>&1 >/dev/null | sed -n 's/^checkpoint //p')"
[ -n "$S2" ] || fail "exec --checkpoint named no checkpoint"
g snapshots ls | grep -q "grove.process=p-" || fail "the checkpoint is not labelled with its process"
g exec "$P" -- sh -c 'echo four >/root/f && sync'
g rewind "$P" "$S2" >/dev/null
out="$(g exec "$P" -- cat /root/f)"
[ "$out" = three ] || fail "after rewind to checkpoint $S2, /root/f holds '$out', not three"
log "checkpoint after a process: snapshot $S2; rewind to it gives /root/f = three"

# Deterministic fork: children that keep the snapshot's clock and RNG state read the same
# random bytes; default children read their own. Linux reseeds its CRNG from the input pool
# at least every 60 s (every uptime/2 s in the first 2 minutes), so the parent is quiet (its
# probe stops: no exec draws from the CRNG), then rewound to a snapshot of that, which
# reseeds it (a default restore), and forked right after, within the reseed interval; the
# read is the children's first exec, alone (a pipeline's execs would race the read).
g exec "$P" -- touch /run/quiet
for _ in $(seq 100); do tr -d '\r' <"$(vdir "$P")/serial.log" | grep -q '^probe: quiet$' && break; sleep 0.2; done
tr -d '\r' <"$(vdir "$P")/serial.log" | grep -q '^probe: quiet$' || fail "the parent's probe did not stop"
up="$(g exec "$P" -- cut -d. -f1 /proc/uptime)"
[ "$up" -ge 120 ] || { log "waiting $((120 - up)) s: the guest's uptime is $up s"; sleep $((120 - up)); }
S3="$(g snapshot "$P")"
RND='head -c16 /dev/urandom >/tmp/rnd; od -An -tx1 /tmp/rnd | tr -d " \n"; echo'
det_fork() { # ARGS... -> the 2 children's random bytes, one line each
  g rewind "$P" "$S3" >/dev/null
  g fork "$P" --count 2 "$@" --run "$RND" >"$W/det.txt" || { cat "$W/det.txt"; fail "grove fork $* failed"; }
  for i in 0 1; do
    sed -n "s/^\[$i\] \([0-9a-f]\{32\}\)$/\1/p" "$W/det.txt" | grep . || { cat "$W/det.txt"; fail "child $i printed no random bytes"; }
    id="$(sed -n "s/^child $i \(sb-[0-9a-f]*\) exit 0$/\1/p" "$W/det.txt")"
    [ -n "$id" ] && g rm "$id"
  done
}
mapfile -t D < <(det_fork --deterministic)
[ "${#D[@]}" -eq 2 ] && [ "${D[0]}" = "${D[1]}" ] || fail "deterministic children read different random bytes: ${D[*]}"
mapfile -t N < <(det_fork)
[ "${#N[@]}" -eq 2 ] && [ "${N[0]}" != "${N[1]}" ] || fail "default children read the same random bytes: ${N[*]}"
log "deterministic fork: both children read ${D[0]}; default children read ${N[0]} and ${N[1]}"

# Delete all; then nothing is left.
for id in "${C[@]}" "$P"; do g rm "$id"; done
g snapshots rm "$S3"
g snapshots rm "$S2"
g snapshots rm "$S1"
[ "$(g --json ls | jget 'len(d)')" -eq 0 ] || fail "sandboxes left after delete"
g template rm linux
[ -z "$(ls "$DATA/snapshots")" ] || fail "snapshot files left: $(ls -R "$DATA/snapshots")"
[ -z "$(ls "$DATA/layers")" ] || fail "layer files left: $(ls "$DATA/layers")"
[ -z "$(ls "$DATA/templates")" ] || fail "template files left"
for _ in $(seq 50); do [ -z "$(ls "$DATA/vmm")" ] && break; sleep 0.1; done
[ -z "$(ls "$DATA/vmm")" ] || fail "VMM directories left: $(ls "$DATA/vmm")"
left="$(pgrep -f "grove-vmm .*$DATA" || true)"
[ -z "$left" ] || fail "processes left: $left"
log PASS
